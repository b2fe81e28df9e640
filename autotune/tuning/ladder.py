"""The back-off ladder and the search down it, as plain functions.

Rungs, cheapest loss of speed first, then those that change the model, last the data:
smaller micro-batch with more accumulation; gradient checkpointing; the lean loss; the
8-bit optimizer; a smaller LoRA rank; 4-bit base weights; a shorter max length (by
skipping longer samples). Each rung changes only plan keys the user left to the tuner,
and the effective batch never changes. `search` takes the measuring function as an
argument, so tests fake the hardware (raising the real `torch.OutOfMemoryError`) while
the dry run measures the real training step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from autotune.config import EIGHT_BIT_OPTIMIZERS
from autotune.errors import AutotuneError
from autotune.tuning.plan import ACCUMULATION, MICRO_BATCH, Plan

# Below this, a shorter max length would skip most real utterances (about 8 s of speech).
SHORTEST_MAX_LENGTH = 512


def is_oom(exc: BaseException) -> bool:
    """Out of memory, by type first; by message only for cuDNN/allocator errors
    that arrive as RuntimeError."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(s in text for s in ("CUDA out of memory", "CUDNN_STATUS_ALLOC_FAILED",
                                       "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "CUBLAS_STATUS_ALLOC_FAILED",
                                       "out of memory"))
    return False


def _smaller_divisor(n: int, below: int) -> int | None:
    for d in range(below - 1, 0, -1):
        if n % d == 0:
            return d
    return None


def _larger_divisor(n: int, above: int) -> int | None:
    for d in range(above + 1, n + 1):
        if n % d == 0:
            return d
    return None


def _rebatch(plan: Plan, micro: int) -> Plan:
    per_process = plan.micro_batch_size * plan.accumulation_steps
    return plan.with_values({MICRO_BATCH: micro, ACCUMULATION: per_process // micro})


def _halve_batch(plan: Plan, ctx: dict) -> Plan | None:
    """About half the micro-batch: the largest divisor of the per-process batch
    not above ceil(micro / 2), so the effective batch stays exact."""
    per_process = plan.micro_batch_size * plan.accumulation_steps
    if plan.micro_batch_size <= 1:
        return None
    micro = _smaller_divisor(per_process, (plan.micro_batch_size + 1) // 2 + 1)
    return _rebatch(plan, micro) if micro else None


def _checkpointing(plan: Plan, ctx: dict) -> Plan | None:
    return None if plan["training.gradient_checkpointing"] else plan.with_values({"training.gradient_checkpointing": True})


def _lean(plan: Plan, ctx: dict) -> Plan | None:
    return None if plan["training.lean_loss"] else plan.with_values({"training.lean_loss": True})


def _eight_bit(plan: Plan, ctx: dict) -> Plan | None:
    if plan["training.optim"] in EIGHT_BIT_OPTIMIZERS or not ctx.get("bitsandbytes"):
        return None
    return plan.with_values({"training.optim": "adamw_8bit"})


def _smaller_rank(plan: Plan, ctx: dict) -> Plan | None:
    if plan["lora.r"] <= 4:
        return None
    # alpha / r is the adapter's scale: keep it, so the learning rate still fits.
    return plan.with_values({"lora.r": plan["lora.r"] // 2, "lora.lora_alpha": max(1, plan["lora.lora_alpha"] // 2)})


def _four_bit(plan: Plan, ctx: dict) -> Plan | None:
    if plan.load_in_4bit or not ctx.get("bitsandbytes") or not ctx.get("cuda"):
        return None
    return plan.with_values({"model.load_in_4bit": True})


def _shorter(plan: Plan, ctx: dict) -> Plan | None:
    """Half the max length, but at least below the longest sample, or nothing changes."""
    target = min(plan.max_length // 2, ctx.get("longest_tokens", plan.max_length) - 1)
    if target < SHORTEST_MAX_LENGTH:
        return None
    return plan.with_values({"data.max_length": target})


# Cheapest loss of speed first, then what changes the model, last the data.
RUNGS: list[tuple[str, tuple[str, ...], Callable[[Plan, dict], Plan | None]]] = [
    ("smaller micro-batch, more accumulation", (MICRO_BATCH, ACCUMULATION), _halve_batch),
    ("gradient checkpointing", ("training.gradient_checkpointing",), _checkpointing),
    ("lean loss", ("training.lean_loss",), _lean),
    ("8-bit optimizer", ("training.optim",), _eight_bit),
    ("smaller LoRA rank", ("lora.r", "lora.lora_alpha"), _smaller_rank),
    ("4-bit base weights", ("model.load_in_4bit",), _four_bit),
    ("shorter max length (skips longer samples)", ("data.max_length",), _shorter),
]


def next_rung(plan: Plan, pinned: set[str], ctx: dict | None = None) -> tuple[str, Plan] | None:
    """The next plan down the ladder, moving only keys the user left to the tuner."""
    ctx = ctx or {}
    for name, keys, step in RUNGS:
        if any(k in pinned for k in keys):
            continue
        new = step(plan, ctx)
        if new is not None and new != plan:
            return name, new
    return None


def faster_candidates(plan: Plan, pinned: set[str], ctx: dict | None = None) -> list[tuple[str, Plan]]:
    """Plans that may run faster than `plan` if memory allows. Compilation and Liger's
    kernels are tried only where they run (`ctx`: "compile" and "liger")."""
    ctx = ctx or {}
    out = []
    if plan["training.gradient_checkpointing"] and "training.gradient_checkpointing" not in pinned:
        out.append(("checkpointing off", plan.with_values({"training.gradient_checkpointing": False})))
    if not any(k in pinned for k in (MICRO_BATCH, ACCUMULATION)):
        per_process = plan.micro_batch_size * plan.accumulation_steps
        bigger = _larger_divisor(per_process, plan.micro_batch_size)
        if bigger:
            out.append(("larger micro-batch", _rebatch(plan, bigger)))
    for key, name in (("training.use_liger_kernel", "liger"), ("training.torch_compile", "compile")):
        if ctx.get(name) and not plan[key] and key not in pinned:
            out.append((f"{name} on", plan.with_values({key: True})))
    return out


def pinned_blockers(pinned: set[str]) -> list[str]:
    return sorted(k for _, keys, _ in RUNGS for k in keys if k in pinned)


@dataclass
class Measurement:
    peak_bytes: int | None
    tokens_per_second: float
    seconds: float
    overhead_seconds: float = 0.0   # paid once per run (compilation), on top of the steady steps


@dataclass
class Attempt:
    plan: Plan
    why: str
    ok: bool
    peak_bytes: int | None = None
    tokens_per_second: float | None = None
    seconds: float = 0.0
    error: str | None = None
    overhead_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "label": self.plan.label(), "why": self.why, "ok": self.ok,
                "peak_bytes": self.peak_bytes, "tokens_per_second": self.tokens_per_second,
                "seconds": round(self.seconds, 3), "overhead_seconds": round(self.overhead_seconds, 3),
                "error": self.error}


@dataclass
class DryRunResult:
    plan: Plan
    attempts: list[Attempt]
    seconds: float
    reason: str
    budget_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "attempts": [a.to_dict() for a in self.attempts],
                "seconds": round(self.seconds, 3), "reason": self.reason, "budget_bytes": self.budget_bytes}


def _try(measure: Callable[[Plan], Measurement], plan: Plan, why: str, free: Callable[[], None]) -> Attempt:
    started = time.perf_counter()
    error = None
    try:
        m = measure(plan)
        return Attempt(plan, why, True, m.peak_bytes, m.tokens_per_second, time.perf_counter() - started,
                       overhead_seconds=m.overhead_seconds)
    except Exception as exc:
        if not is_oom(exc):
            raise
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'out of memory'}"
    # Outside the handler: the failed step's frames (and their tensors) are gone now.
    free()
    return Attempt(plan, why, False, error=error, seconds=time.perf_counter() - started)


def run_time(attempt: "Attempt", run_tokens: float | None) -> float:
    """What a plan costs the run: its one-off overhead (compilation) plus the run's tokens
    at its steady speed. Without the run's length, the speed alone decides."""
    speed = attempt.tokens_per_second or 0.0
    if speed <= 0:
        return float("inf")
    if not run_tokens:
        return 1.0 / speed
    return attempt.overhead_seconds + run_tokens / speed


def free_memory() -> None:
    """What a failed attempt held, back to the device: accelerate's own cache clearing."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def search(start: Plan, measure: Callable[[Plan], Measurement], *, pinned: set[str], max_attempts: int = 12,
           time_plans: bool = True, ctx: dict | None = None, budget_bytes: int | None = None,
           free: Callable[[], None] | None = None, log: Callable[[Attempt], None] | None = None) -> DryRunResult:
    """Down the ladder until a plan fits, then try faster plans while memory allows.

    An attempt fits when it did not run out of memory and its peak stays under
    `budget_bytes` (the safety margin). The effective batch never changes.
    """
    t0 = time.perf_counter()
    attempts: list[Attempt] = []
    free = free or free_memory

    def run(plan: Plan, why: str) -> Attempt:
        attempt = _try(measure, plan, why, free)
        if attempt.ok and budget_bytes is not None and attempt.peak_bytes is not None and attempt.peak_bytes > budget_bytes:
            attempt.ok = False
            attempt.error = (f"peak {attempt.peak_bytes / 2**30:.2f} GiB is over the safety margin "
                             f"({budget_bytes / 2**30:.2f} GiB)")
        attempts.append(attempt)
        if log:
            log(attempt)
        assert attempt.plan.effective_batch_size == start.effective_batch_size
        return attempt

    plan, why = start, "starting plan (profile < your config < --set)"
    best = None
    while len(attempts) < max_attempts:
        attempt = run(plan, why)
        if attempt.ok:
            best = attempt
            break
        step = next_rung(plan, pinned, ctx)
        if step is None:
            break
        why, plan = step
    if best is None:
        tried = "; ".join(f"{a.plan.label()}: {a.error}" for a in attempts)
        blockers = pinned_blockers(pinned)
        pinned_note = (f" Pinned by you and left alone: {', '.join(f'`{k}`' for k in blockers)}." if blockers else "")
        raise AutotuneError(f"no plan fits this GPU after {len(attempts)} attempts ({tried}).{pinned_note} "
                            "What would help: a smaller model, a shorter `data.max_length`, "
                            "4-bit weights (`--set model.load_in_4bit=true`), or a GPU with more memory")

    reason = f"fits: {best.plan.label()}"
    if time_plans:
        run_tokens = (ctx or {}).get("run_tokens")
        improved = True
        while improved and len(attempts) < max_attempts:
            improved = False
            for name, candidate in faster_candidates(best.plan, pinned, ctx):
                if len(attempts) >= max_attempts:
                    break
                if any(a.plan == candidate for a in attempts):
                    continue
                attempt = run(candidate, f"faster? {name}")
                if attempt.ok and run_time(attempt, run_tokens) < run_time(best, run_tokens) / 1.02:
                    best, improved = attempt, True
                    reason = f"fastest that fits: {best.plan.label()} ({name}, {best.tokens_per_second:,.0f} tokens/s)"
                    break
    return DryRunResult(best.plan, attempts, time.perf_counter() - t0, reason, budget_bytes)
