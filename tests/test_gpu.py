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
