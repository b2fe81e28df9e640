#!/usr/bin/env python3
"""Sweep throughput: trials per hour with one trial per GPU at a time against several
(`train.py --sweep ... --trials-per-gpu`), on a random-weight Llasa and the realistic TTS
length mix of bench/autotune.py. Prints one JSON object.

    python bench/sweep.py --out sweep.json                         # GPU: Llasa-1B, 1 / auto / 2 / 3 per GPU
    python bench/sweep.py --device cpu --shape tiny --settings 1,2 # CPU: the plumbing only (see below)

Every setting runs the same sweep with `--auto` (one dry run per memory shape, then the
trials) as the user would, in its own folder, as a `train.py` process: `--trials` trials
that differ only in the learning rate, `--steps` optimizer steps each, no evaluation,
samples or checkpoints. Its figure is sweep.json's `trials_per_hour`: the finished trials
per hour of the sweep's wall time, from its start (dry run and every child's start-up
included) to the last trial's end. `speedup` is against the first setting. A one-trial
sweep runs first and is left out (`warmup`): the first sweep on a machine pays one-off costs.

`context_bytes` is what one CUDA process holds outside PyTorch's allocator after a
matmul (the CUDA context, cuBLAS's workspace): the sweep leaves `CONTEXT_BYTES` per child
for it when trials share a GPU.

On a CPU the sweep runs its trials one after another whatever `--trials-per-gpu` says (the
flag acts on GPUs only), so the CPU figures check the script, not the sharing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# bench/autotune.py by its path: its module name would be the `autotune` package's.
_spec = importlib.util.spec_from_file_location("bench_autotune", ROOT / "bench" / "autotune.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
SHAPES, write_dataset = _bench.SHAPES, _bench.write_dataset


def context_bytes() -> int | None:
    """Device memory one process holds beyond its allocator's reservation, measured in a
    fresh process on an otherwise idle GPU; None without CUDA."""
    code = ("import torch, json\n"
            "if not torch.cuda.is_available(): print('null'); raise SystemExit\n"
            "free0, total = torch.cuda.mem_get_info()\n"
            "a = torch.randn(1024, 1024, device='cuda', dtype=torch.bfloat16); (a @ a).sum().item()\n"
            "free, total = torch.cuda.mem_get_info()\n"
            "print(json.dumps(total - free - torch.cuda.memory_reserved()))\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_setting(setting: str, args, data: Path, tmp: Path, trials: int | None = None, name: str | None = None) -> dict:
    out = tmp / f"sweep-{name or setting}"
    rates = ",".join(f"{(i + 1) * 5e-5:g}" for i in range(trials or args.trials))
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--model", SHAPES[args.shape],
               "--codec", "tiny", "--auto", "--output-dir", str(out), "--json",
               "--sweep", f"training.learning_rate={rates}", "--trials-per-gpu", setting,
               "--set", "samples.num_texts=0", "--set", "training.eval_strategy=no",
               "--set", "training.report_to=none", "--set", "training.save_strategy=no",
               "--set", f"training.max_steps={args.steps}", "--set", f"training.logging_steps={args.steps}"]
    for s in args.sets:
        command += ["--set", s]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:   # what finished is still in sweep.json
        code, stderr = None, f"timed out after {args.timeout:g} s\n" + (exc.stderr or b"").decode("utf-8", "replace")[-2000:]
    entry: dict = {"trials_per_gpu": setting, "seconds": round(time.perf_counter() - started, 1), "exit_code": code}
    if code is None:
        entry["error"] = f"timed out after {args.timeout:g} s"
    try:
        record = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return entry | {"error": entry.get("error") or (stderr.strip().splitlines() or ["no sweep.json"])[-1][:300]}
    trials = record.get("trials", [])
    entry.update(trials_ok=sum(t["status"] == "ok" for t in trials), trials_failed=sum(t["status"] == "failed" for t in trials),
                 trials_per_hour=record.get("trials_per_hour"), wall_seconds=record.get("wall_seconds"),
                 most_at_once=record.get("most_at_once"),
                 dry_runs=[{k: d.get(k) for k in ("peak_bytes", "trials_per_gpu", "status")}
                           for d in record.get("dry_runs", [])],
                 trial_tokens_per_second=[t.get("tokens_per_second") for t in trials],
                 peak_gib=[round(t["peak_gpu_bytes"] / 2**30, 2) if t.get("peak_gpu_bytes") else None for t in trials],
                 errors=[t["error"] for t in trials if t.get("error")][:3])
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llasa-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--settings", default="1,auto,2,3", help="`--trials-per-gpu` values to compare; the first is the "
                                                            "baseline (default 1,auto,2,3)")
    ap.add_argument("--trials", type=int, default=4, help="trials per sweep (default 4)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per trial (default 30)")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--timeout", type=float, default=600, help="seconds each sweep may take (default 600)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; use --device cpu --shape tiny to check the script"}))
        return 2
    from autotune.hardware import probe

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    data = write_dataset(tmp / "data", args.samples)
    gpu = probe().gpus[0] if args.device == "cuda" else None
    report = {"gpu": gpu.to_dict() if gpu else None, "device": args.device, "shape": args.shape,
              "trials": args.trials, "steps": args.steps, "samples": args.samples,
              "context_bytes": context_bytes() if args.device == "cuda" else None, "runs": []}
    if args.device == "cpu":
        report["note"] = "CPU: every setting runs its trials one after another"
    # Left out: the first sweep on a machine pays one-off costs (caches, kernels) the others would not.
    report["warmup"] = run_setting(settings[0], args, data, tmp, trials=1, name="warmup")
    for setting in settings:
        entry = run_setting(setting, args, data, tmp)
        base = report["runs"][0] if report["runs"] else entry
        if base.get("trials_per_hour") and entry.get("trials_per_hour"):
            entry["speedup"] = round(entry["trials_per_hour"] / base["trials_per_hour"], 2)
        report["runs"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
        if args.out:   # after every setting: a run cut short still leaves what it measured
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
