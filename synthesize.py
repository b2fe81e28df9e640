#!/usr/bin/env python3
"""Speak text with a trained adapter: `python synthesize.py --adapter runs/X --text "..." -o out.wav`.

A thin wrapper: the command is `autotune.commands.synthesize` (installed as `llasa-synthesize`)."""

from autotune.commands.synthesize import *  # noqa: F401,F403 - tests and tools import its functions
from autotune.commands.synthesize import entry

if __name__ == "__main__":
    entry()
