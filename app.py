#!/usr/bin/env python3
"""The web UI: `python app.py` speaks, compares and keeps checkpoints of the runs under runs/.

A thin wrapper: the command is `autotune.commands.app` (installed as `llasa-app`)."""

from autotune.commands.app import entry

if __name__ == "__main__":
    entry()
