"""bench/targets.py turns the folder bench/gpu_checks.sh fills into one verdict per target: what
it reads from each JSON, and that a missing file fails the CPU rehearsal instead of passing it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def verdicts(folder: Path, *flags: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "targets.py"), str(folder), *flags],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def test_each_target_reads_its_own_file(tmp_path):
    (tmp_path / "caps.json").write_text(json.dumps({"speedup_vs_stock_profile": {"24.0": 3.2, "12.0": 1.9}}))
    (tmp_path / "syncs.json").write_text(json.dumps({"steady": {"syncs_per_non_logging_step_max": 0,
                                                                "launches_per_1000_tokens": 812.5}}))
    (tmp_path / "serve.json").write_text(json.dumps({
        "speedup_batched_vs_one_at_a_time": {"1": 0.97, "16": 2.4},
        "target": {"clients": 16, "speedup_at_least": 3.0}, "machine": {"device": "cuda", "gpu": "NVIDIA H100"}}))
    (tmp_path / "memory-b16-ckpt.json").write_text(json.dumps({"measurements": {"x": {"stock": {"peak_gib": 76.3}}}}))
    (tmp_path / "estimate-b16-ckpt.json").write_text(json.dumps({"estimates": {"llasa-1b": {"stock": {
        "peak_gib": 76.28}}}}))
    code, out = verdicts(tmp_path)
    assert code == 0
    assert out["speedup_24_gib"]["pass"] is True and out["speedup_12_gib"]["pass"] is False
    assert out["speedup_8_gib"]["pass"] is None                     # not measured: neither passed nor failed
    assert out["syncs_non_logging"]["pass"] is True and out["syncs_non_logging"]["launches_per_1000_tokens"] == 812.5
    assert out["serve_batched_speedup"]["value"] == 2.4 and out["serve_batched_speedup"]["pass"] is False
    assert out["serve_batched_speedup"]["device"] == "NVIDIA H100"
    assert out["estimate_b16_ckpt"]["value"] == -0.0003 and out["estimate_b16_ckpt"]["pass"] is True
    assert out["estimate_b4_nockpt"]["pass"] is None and out["mfu_whole_card"]["pass"] is None
    assert "whole-card.json" in out["missing"] and "serve.json" not in out["missing"]


def test_a_missing_file_fails_the_rehearsal(tmp_path):
    code, out = verdicts(tmp_path, "--require-files")
    assert code == 1 and "serve.json" in out["missing"] and "syncs.json" in out["missing"]
