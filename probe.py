#!/usr/bin/env python3
"""What will my GPU get, and why: `python probe.py [--json]`.

A thin wrapper: the command is `autotune.commands.probe` (installed as `llasa-probe`)."""

from autotune.commands.probe import build_parser, entry, main  # noqa: F401 - tests and tools import these

if __name__ == "__main__":
    entry()
