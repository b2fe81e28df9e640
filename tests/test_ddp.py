"""Two processes on the CPU (gloo) through `accelerate launch`: one plan, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_run_through_accelerate_launch(tmp_path: Path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train.py"), "--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--auto",
           "--output-dir", str(out), "--set", "training.max_steps=4", "--set", "training.eval_steps=2",
           "--set", "training.save_steps=2", "--set", "samples.num_texts=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    # The effective batch counts the processes: 2 per device x 2 accumulation x 2 processes.
    assert summary["plan"]["processes"] == 2
    assert summary["plan"]["effective_batch_size"] == 8
    assert summary["steps"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    # Only the main process logs and prints: one TensorBoard writer, one summary table.
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("Run summary") == 1
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


@pytest.mark.slow
def test_both_processes_fail_with_one_line_when_the_output_folder_is_taken(tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train.py"), "--data", str(ROOT / "examples" / "tiny"), "--model", "tiny",
           "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    # Every process raises the same one-line error; the launcher stops the rest
    # once the first exits, so at least one prints it.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("already holds files" in e for e in errors)
    # accelerate's launcher prints its own traceback for a failed child; none of ours.
    assert "/autotune/" not in result.stderr and 'train.py", line' not in result.stderr
    assert (out / "notes.txt").read_text() == "someone else's"
