"""GPU-only checks: skipped cleanly without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_measures_peak_memory_on_cuda(tmp_path: Path, capsys):
    from train import main

    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--dry-run", "--json",
                 "--output-dir", str(tmp_path / "out")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["device"].startswith("cuda")
    assert all(a["peak_bytes"] and a["peak_bytes"] > 0 for a in record["attempts"] if a["ok"])


def test_the_dry_run_counts_kernel_launches_with_the_cuda_runtime(tmp_path: Path, capsys):
    from train import main

    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--dry-run", "--json",
                 "--output-dir", str(tmp_path / "out")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["launches_per_1000_tokens"] and record["launches_per_1000_tokens"] > 0
    assert all(a["launches_per_1000_tokens"] > 0 for a in record["attempts"] if a["ok"])


def test_a_cuda_step_that_does_not_log_never_waits_for_the_host(tmp_path: Path):
    """The CPU test's probe on a real device: pinned batches copied without blocking, no read back."""
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.syncs import probe_pipeline

    steps = probe_pipeline(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--codec", "tiny",
                            "--output-dir", str(tmp_path / "run"), "--set", "samples.num_texts=0",
                            "--set", "training.eval_strategy=no", "--set", "training.report_to=none",
                            "--set", "training.max_steps=6", "--set", "training.logging_steps=3",
                            "--set", "training.save_steps=6"], "cuda:0")
    quiet = {s["step"]: s["sites"] for s in steps if s["step"] in (2, 4, 5)}
    assert quiet == {2: {}, 4: {}, 5: {}}
