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


def test_vram_limit_makes_a_large_batch_back_off(tmp_path: Path, capsys):
    from train import main

    # 0.05 GiB cannot hold batch 16 of the tiny model's activations: the ladder must step down.
    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--dry-run", "--json",
                 "--output-dir", str(tmp_path / "out"), "--vram-limit", "0.25",
                 "--set", "training.per_device_train_batch_size=16", "--set", "training.gradient_accumulation_steps=1"
                 ]) in (0,)
    record = json.loads(capsys.readouterr().out)
    sizes = {a["settings"]["effective_batch_size"] for a in record["attempts"]}
    assert sizes == {16}
