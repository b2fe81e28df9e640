"""The real training run the end-to-end tests share, on the tiny model and codec: one place for
the flags that keep it offline and fast, and train.py started as its console script."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tiny"
# The tiny model and codec, built in code; no sample generation (each test turns it on if it needs it).
TINY = ["--model", "tiny", "--codec", "tiny", "--set", "samples.num_texts=0"]


def run_train(*argv: str) -> int:
    """train.py as the console script runs it (`run_main`): an error is one line on stderr and
    exit code 2, a signal ends in 130/143/129; returns the exit code."""
    from autotune.cli import run_main
    from train import main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, list(argv))
    return exit_info.value.code

