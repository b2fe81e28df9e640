#!/usr/bin/env python3
"""Every target of the speed issues, read from what bench/gpu_checks.sh wrote into one folder.
Prints one JSON object: per target the measured value, the threshold, and `pass` (true, false,
or null when its check did not run or cannot run on this device), plus the files missing.

    python bench/targets.py gpu-out            # after bench/gpu_checks.sh
    python bench/targets.py gpu-out --require-files   # exit 1 when a check's JSON is missing (CI)

Targets:
  mfu_whole_card        ours at the guide's effective batch on the whole card: MFU >= 35%
  speedup_24/12/8_gib   ours against the guide's profile on a card capped to that size: >= 2x
  dry_run_seconds       dry run plus compilation, ours on the whole card: <= 60 s
  fits_1b_8gib, fits_3b_12gib, fits_3b_4bit_8gib
                        trains at ~2,048 tokens a sample without an out-of-memory error, peak <= 90%
  estimate_b4_nockpt, estimate_b8_nockpt
                        bench/memory.py --estimate within +-5% of the measured peak (no checkpointing)
  estimate_b16_ckpt     within +-2% with checkpointing
  syncs_non_logging     host syncs in a steady step that does not log: 0
  serve_batched_speedup the speech server at its most clients: batched >= 3x one request at a time
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# What gpu_checks.sh writes, by step (the CPU rehearsal writes the same names).
FILES = ["memory-b4-nockpt.json", "memory-b8-nockpt.json", "memory-b16-ckpt.json", "estimate-b4-nockpt.json",
         "estimate-b8-nockpt.json", "estimate-b16-ckpt.json",
         "whole-card.json", "caps.json", "target-1b-8gib.json", "target-3b-12gib.json", "target-3b-4bit-8gib.json",
         "syncs.json", "serve.json"]


def load(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def target(value: Any, threshold: str, ok: bool | None, **extra: Any) -> dict[str, Any]:
    return {"value": value, "threshold": threshold, "pass": ok, **extra}


def runs(report: Any, name: str) -> list[dict[str, Any]]:
    return [r for r in (report or {}).get("runs", []) if r.get("run") == name]


def measured_peak(report: Any, mode: str = "stock") -> float | None:
    for entry in ((report or {}).get("measurements") or {}).values():
        result = entry.get(mode)
        if isinstance(result, dict) and result.get("peak_gib"):
            return result["peak_gib"]
    return None


def estimated_peak(report: Any, mode: str = "stock") -> float | None:
    for shape in ((report or {}).get("estimates") or {}).values():
        result = shape.get(mode)
        if isinstance(result, dict):
            return result.get("peak_gib")   # as bench/memory.py measures: no optimizer state
    return None


def fits(report: Any, limit: float) -> dict[str, Any]:
    ours = runs(report, "ours")
    if not ours:
        return target(None, "no OOM, peak <= 90% of the cap", None)
    r = ours[0]
    peak = r.get("peak_gib")
    ok = None if peak is None else (not r.get("error") and not r.get("oom_recoveries") and peak <= 0.9 * limit)
    return target(peak, f"peak <= {0.9 * limit:.1f} GiB, no OOM", ok, plan=r.get("plan"), error=r.get("error"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--require-files", action="store_true", help="exit 1 when a check's JSON is missing")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    got = {name: load(folder, name) for name in FILES}
    out: dict[str, Any] = {"missing": [n for n in FILES if got[n] is None]}

    whole = got["whole-card.json"]
    ours = runs(whole, "ours")
    mfu = ours[0].get("mfu") if ours else None
    out["mfu_whole_card"] = target(mfu, ">= 0.35", None if mfu is None else mfu >= 0.35)
    dry = (ours[0].get("dry_run") or {}) if ours else {}
    seconds = dry.get("seconds")
    out["dry_run_seconds"] = target(seconds, "<= 60 (compilation included)", None if seconds is None else seconds <= 60,
                                    compile_seconds=dry.get("compile_seconds"))
    speedups = (got["caps.json"] or {}).get("speedup_vs_stock_profile") or {}
    for cap in ("24", "12", "8"):
        value = speedups.get(f"{cap}.0", speedups.get(cap))
        out[f"speedup_{cap}_gib"] = target(value, ">= 2.0", None if value is None else value >= 2.0)
    out["fits_1b_8gib"] = fits(got["target-1b-8gib.json"], 8)
    out["fits_3b_12gib"] = fits(got["target-3b-12gib.json"], 12)
    out["fits_3b_4bit_8gib"] = fits(got["target-3b-4bit-8gib.json"], 8)
    for key, band in (("b4-nockpt", 0.05), ("b8-nockpt", 0.05), ("b16-ckpt", 0.02)):
        name = "estimate_" + key.replace("-", "_")
        real, estimate = measured_peak(got[f"memory-{key}.json"]), estimated_peak(got[f"estimate-{key}.json"])
        error = None if not real or estimate is None else round(estimate / real - 1, 4)
        out[name] = target(error, f"|estimate / measured - 1| <= {band}", None if error is None else abs(error) <= band,
                           measured_gib=real, estimated_gib=estimate)
    steady = (got["syncs.json"] or {}).get("steady") or {}
    syncs = steady.get("syncs_per_non_logging_step_max")
    out["syncs_non_logging"] = target(syncs, "== 0", None if syncs is None else syncs == 0,
                                      launches_per_1000_tokens=steady.get("launches_per_1000_tokens"),
                                      recompiles=(got["syncs.json"] or {}).get("recompiles"))
    serve = got["serve.json"] or {}
    wanted = serve.get("target") or {}
    speedup = (serve.get("speedup_batched_vs_one_at_a_time") or {}).get(str(wanted.get("clients")))
    out["serve_batched_speedup"] = target(speedup, f">= {wanted.get('speedup_at_least', 3.0)} at {wanted.get('clients')} clients",
                                          None if speedup is None else speedup >= wanted.get("speedup_at_least", 3.0),
                                          device=(serve.get("machine") or {}).get("gpu") or (serve.get("machine") or {}).get("device"))
    print(json.dumps(out, indent=2))
    return 1 if args.require_files and out["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
