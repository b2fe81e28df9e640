"""Hostile flags and files (issue #22's config/CLI kinds): each is one line, exit code 2, within
seconds, and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tiny"
TINY = ["--data", str(DATA), "--model", "tiny", "--codec", "tiny"]


def run(*argv: str, script: str = "train.py", timeout: float = 60) -> tuple[int, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stderr, time.monotonic() - started


def one_line(err: str) -> str:
    """The error as the user sees it: one line, or (for a list of problems) one line then one
    `  - problem` line each; never a traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert all(line.startswith("  - ") for line in lines[1:]), err
    return " ".join(lines)


def in_process(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from autotune.cli import run_main
    from train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_main(main, list(argv))
    return exit_info.value.code, err.getvalue()


@pytest.mark.parametrize("script", ["train.py", "probe.py"])
def test_a_config_that_is_a_fifo_is_refused_at_once(tmp_path, script):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    argv = (*TINY, "--check-data") if script == "train.py" else ()
    code, err, seconds = run(*argv, "--config", str(fifo), script=script, timeout=30)
    assert code == 2 and "FIFO" in one_line(err) and seconds < 20


def test_a_config_of_dev_zero_is_refused_without_reading_it(tmp_path):
    code, err, seconds = run(*TINY, "--check-data", "--config", "/dev/zero", timeout=30)
    assert code == 2 and "device file" in one_line(err) and seconds < 20


@pytest.mark.parametrize("item, said", [
    ("training.lr_scheduler_kwargs={power: high}", "`power` must be a finite number"),
    ("samples.max_new_tokens=1e9", "less than or equal to 2048"),
    ("...=5", "is not a key"),
])
def test_values_that_would_trace_back_or_run_for_hours_are_one_line(item, said):
    code, err = in_process(*TINY, "--check-data", "--set", item)
    assert code == 2 and said in one_line(err)


@pytest.mark.parametrize("where", ["file", "proc"])
def test_a_logging_dir_that_cannot_be_a_folder_is_one_line(tmp_path, where):
    if where == "file":
        target = tmp_path / "logs"
        target.write_text("not a folder")
    else:
        target = Path("/proc/self/no-such-place/logs")
    code, err = in_process(*TINY, "--check-data", "--set", f"training.logging_dir={target}")
    assert code == 2 and "training.logging_dir" in one_line(err)


@pytest.mark.parametrize("script", ["probe.py", pytest.param("train.py", marks=pytest.mark.slow)])
def test_a_reader_that_goes_away_is_no_traceback(tmp_path, script):
    """`probe.py --json | head`: the reader is gone before the output is written."""
    err = tmp_path / "stderr"
    argv = "--json" if script == "probe.py" else f"--data {DATA} --model tiny --codec tiny --check-data --json"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} {ROOT / script} {argv} 2>{err} | true"],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    text = err.read_text()
    assert "Traceback" not in text and "BrokenPipe" not in text, text
    assert done.returncode == 0
