"""The search down the back-off ladder and up to the fastest plan that fits, as plain functions.

`search` takes the measuring function as an argument, so tests fake the hardware (raising the
real `torch.OutOfMemoryError`) while the dry run measures the real training step. The rungs
themselves (`next_rung`, `faster_candidates`) are `autotune.plan`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from autotune.errors import AutotuneError
from autotune.memory import free_memory, is_oom
from autotune.plan import Plan, faster_candidates, next_rung, pinned_blockers


@dataclass
class Measurement:
    peak_bytes: int | None
    tokens_per_second: float
    seconds: float
    overhead_seconds: float = 0.0   # paid once per run (compilation), on top of the steady steps
    launches_per_1000_tokens: float | None = None   # kernel launches of a steady step per 1,000 trained tokens


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
    launches_per_1000_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "label": self.plan.label(), "why": self.why, "ok": self.ok,
                "peak_bytes": self.peak_bytes, "tokens_per_second": self.tokens_per_second,
                "seconds": round(self.seconds, 3), "overhead_seconds": round(self.overhead_seconds, 3),
                "launches_per_1000_tokens": self.launches_per_1000_tokens, "error": self.error}


@dataclass
class DryRunResult:
    plan: Plan
    attempts: list[Attempt]
    seconds: float
    reason: str
    budget_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        chosen = next((a for a in self.attempts if a.ok and a.plan == self.plan), None)
        return {"plan": self.plan.to_dict(), "attempts": [a.to_dict() for a in self.attempts],
                "seconds": round(self.seconds, 3), "reason": self.reason, "budget_bytes": self.budget_bytes,
                # the chosen plan's kernel launches per 1,000 trained tokens (autotune.launches)
                "launches_per_1000_tokens": chosen.launches_per_1000_tokens if chosen else None}


def _try(measure: Callable[[Plan], Measurement], plan: Plan, why: str, free: Callable[[], None]) -> Attempt:
    started = time.perf_counter()
    error = None
    try:
        m = measure(plan)
        return Attempt(plan, why, True, m.peak_bytes, m.tokens_per_second, time.perf_counter() - started,
                       overhead_seconds=m.overhead_seconds, launches_per_1000_tokens=m.launches_per_1000_tokens)
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
