#!/usr/bin/env python3
"""An OpenAI-compatible speech server for your runs: `python serve.py --runs runs/`.

A thin wrapper: the command is `autotune.commands.serve` (installed as `llasa-serve`)."""

from autotune.commands.serve import entry

if __name__ == "__main__":
    entry()
