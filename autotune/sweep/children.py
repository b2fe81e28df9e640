"""A trial's child process: the GPU it sees, its environment and flags, its death with the
sweep, and why it failed, in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any


# train.py flags the sweep sets itself for each child (or refuses with `--sweep`).
_NOT_PASSED = {"help", "sweep", "json", "resume", "overwrite", "output_dir", "dry_run", "check_data", "merge", "auto",
               "plan", "trials_per_gpu"}


def cuda_visible(gpu) -> str:
    """What `CUDA_VISIBLE_DEVICES` names this GPU by: its uuid (a MIG slice's too),
    which unlike an index does not depend on `CUDA_DEVICE_ORDER`."""
    return gpu.uuid or str(gpu.index)


def gpu_label(gpu) -> str:
    return gpu.uuid if gpu.is_mig_slice else f"GPU {gpu.index}"


def child_env(gpu) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible(gpu)
    if not gpu.uuid:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"   # NVML's order, which `index` counts in
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)                        # one process per trial
    # `python -m autotune.commands.train` finds this very package, installed or a checkout run from anywhere.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"                 # console.log is current while the trial runs
    env.setdefault("COLUMNS", "120")              # rich's tables in console.log, not 80 columns
    return env


def child_flags(request) -> list[str]:
    """The trial's request back as `train.py` flags; those in `_NOT_PASSED` are the caller's."""
    return request.to_argv(leave_out=_NOT_PASSED)


def die_with_parent():
    """A `preexec_fn` that has Linux send the child SIGTERM when the sweep dies, even by
    SIGKILL: the trial then saves a checkpoint and stops (the sweep's `--resume` continues
    it from there), where it would otherwise train on, orphaned, on a GPU the next sweep wants.
    None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:   # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def plan_label(plan: dict[str, Any]) -> str:
    from autotune.tuning.plan import Plan

    try:
        return Plan.from_record(plan).label()
    except (KeyError, TypeError, ValueError):
        return json.dumps(plan, default=str)


def child_error(log: Path, code: int) -> str:
    """Why a child failed, in one line: its `error:` line (exit 2), the last line it wrote
    (a traceback's ends with the exception), or the signal that killed it."""
    try:
        with open(log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    lines = [" ".join(line.split()) for line in re.split(r"[\r\n]+", text)]
    lines = [line for line in lines if line and not line.startswith("# ")]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if code == 2 and errors:
        return errors[-1]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the run was killed by {name}" + (" (out of host memory?)" if name == "SIGKILL" else "")
    last = errors[-1] if errors else lines[-1] if lines else None
    return f"{last[:300]} (exit code {code})" if last else f"the run exited with code {code}"
