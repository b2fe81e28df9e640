#!/usr/bin/env python3
"""Fine-tune Llasa with LoRA on your GPU: `python train.py --data dataset/ --auto`.

A thin wrapper: the command is `autotune.commands.train` (installed as `llasa-train`)."""

from autotune.commands.train import build_parser, entry, main  # noqa: F401 - tests and tools import these

if __name__ == "__main__":
    entry()
