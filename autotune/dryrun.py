"""The OOM-backoff dry run: a few real steps on the longest batch, down a ladder
of rungs until the plan fits, then (memory allowing) up again to the fastest.

`Plan`, `is_oom`, `next_rung` and `faster_candidates` are plain functions,
tested without a GPU. `search` takes the measuring function as an argument, so
tests fake the hardware (raising the real `torch.OutOfMemoryError`) while the
real run measures the real model.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable

from autotune.config import Config
from autotune.errors import AutotuneError


@dataclass(frozen=True)
class Plan:
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    processes: int
    precision: str
    gradient_checkpointing: bool
    lean_loss: bool
    optim: str
    lora_r: int
    lora_alpha: int
    lora_target_modules: tuple[str, ...]
    load_in_4bit: bool
    max_length: int

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.processes

    @classmethod
    def from_config(cls, config: Config, processes: int = 1) -> "Plan":
        t = config.training
        return cls(per_device_train_batch_size=t.per_device_train_batch_size,
                   gradient_accumulation_steps=t.gradient_accumulation_steps, processes=processes,
                   precision="bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
                   gradient_checkpointing=t.gradient_checkpointing, lean_loss=t.lean_loss, optim=t.optim,
                   lora_r=config.lora.r, lora_alpha=config.lora.lora_alpha,
                   lora_target_modules=tuple(config.lora.target_modules), load_in_4bit=config.model.load_in_4bit,
                   max_length=config.data.max_length)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Plan":
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in fields}
        kept["lora_target_modules"] = tuple(kept["lora_target_modules"])
        return cls(**kept)

    @classmethod
    def from_record(cls, values: Any) -> "Plan":
        """A plan as a file recorded it (`to_dict`), checked: every value goes through the
        config schema and back, so it is typed and in range as a config value would be.
        Raises ValueError (or a pydantic error) when it is not one."""
        if (not isinstance(values, dict) or values.get("precision") not in ("bf16", "fp16", "fp32")
                or not isinstance(values.get("lora_target_modules"), list)
                or type(values.get("processes")) is not int or values["processes"] < 1):
            raise ValueError("not a recorded plan")
        plan = cls.from_dict(values)
        return cls.from_config(plan.apply(Config()), plan.processes)

    # The config keys a plan sets (see `apply`): the tuner's to choose unless pinned.
    KEYS = ("training.per_device_train_batch_size", "training.gradient_accumulation_steps",
            "training.gradient_checkpointing", "training.lean_loss", "training.optim", "training.bf16",
            "training.fp16", "lora.r", "lora.lora_alpha", "lora.target_modules", "model.load_in_4bit",
            "data.max_length")

    def apply(self, config: Config) -> Config:
        """The config with this plan's values."""
        out = config.model_copy(deep=True)
        t = out.training
        t.per_device_train_batch_size = self.per_device_train_batch_size
        t.gradient_accumulation_steps = self.gradient_accumulation_steps
        t.gradient_checkpointing = self.gradient_checkpointing
        t.lean_loss = self.lean_loss
        t.optim = self.optim
        t.bf16, t.fp16 = self.precision == "bf16", self.precision == "fp16"
        out.lora.r, out.lora.lora_alpha = self.lora_r, self.lora_alpha
        out.lora.target_modules = list(self.lora_target_modules)
        out.model.load_in_4bit = self.load_in_4bit
        out.data.max_length = self.max_length
        return out

    def label(self) -> str:
        parts = [f"batch {self.per_device_train_batch_size}x{self.gradient_accumulation_steps}"
                 + (f"x{self.processes}" if self.processes > 1 else ""),
                 "ckpt" if self.gradient_checkpointing else "no-ckpt",
                 "lean-loss" if self.lean_loss else "stock-loss", self.optim, f"r{self.lora_r}"]
        if self.load_in_4bit:
            parts.append("4bit")
        parts.append(f"len {self.max_length}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lora_target_modules"] = list(self.lora_target_modules)
        out["effective_batch_size"] = self.effective_batch_size
        return out


# ----------------------------------------------------------------- rungs ---

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
    per_process = plan.per_device_train_batch_size * plan.gradient_accumulation_steps
    return dataclasses.replace(plan, per_device_train_batch_size=micro, gradient_accumulation_steps=per_process // micro)


def _halve_batch(plan: Plan, ctx: dict) -> Plan | None:
    """About half the micro-batch: the largest divisor of the per-process batch
    not above ceil(micro / 2), so the effective batch stays exact."""
    per_process = plan.per_device_train_batch_size * plan.gradient_accumulation_steps
    if plan.per_device_train_batch_size <= 1:
        return None
    micro = _smaller_divisor(per_process, (plan.per_device_train_batch_size + 1) // 2 + 1)
    return _rebatch(plan, micro) if micro else None


def _checkpointing(plan: Plan, ctx: dict) -> Plan | None:
    return None if plan.gradient_checkpointing else dataclasses.replace(plan, gradient_checkpointing=True)


def _lean(plan: Plan, ctx: dict) -> Plan | None:
    return None if plan.lean_loss else dataclasses.replace(plan, lean_loss=True)


def _eight_bit(plan: Plan, ctx: dict) -> Plan | None:
    if "8bit" in plan.optim or not ctx.get("bitsandbytes"):
        return None
    return dataclasses.replace(plan, optim="adamw_8bit")


def _smaller_rank(plan: Plan, ctx: dict) -> Plan | None:
    if plan.lora_r <= 4:
        return None
    # alpha / r is the adapter's scale: keep it, so the learning rate still fits.
    return dataclasses.replace(plan, lora_r=plan.lora_r // 2, lora_alpha=max(1, plan.lora_alpha // 2))


def _four_bit(plan: Plan, ctx: dict) -> Plan | None:
    if plan.load_in_4bit or not ctx.get("bitsandbytes") or not ctx.get("cuda"):
        return None
    return dataclasses.replace(plan, load_in_4bit=True)


def _shorter(plan: Plan, ctx: dict) -> Plan | None:
    """Half the max length, but at least below the longest sample, or nothing changes."""
    shortest = ctx.get("min_max_length", 512)
    target = min(plan.max_length // 2, ctx.get("longest_tokens", plan.max_length) - 1)
    if target < shortest:
        return None
    return dataclasses.replace(plan, max_length=target)


# Cheapest loss of speed first, then what changes the model, last the data.
RUNGS: list[tuple[str, tuple[str, ...], Callable[[Plan, dict], Plan | None]]] = [
    ("smaller micro-batch, more accumulation",
     ("training.per_device_train_batch_size", "training.gradient_accumulation_steps"), _halve_batch),
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


def faster_candidates(plan: Plan, pinned: set[str]) -> list[tuple[str, Plan]]:
    """Plans that may run faster than `plan` if memory allows."""
    out = []
    if plan.gradient_checkpointing and "training.gradient_checkpointing" not in pinned:
        out.append(("checkpointing off", dataclasses.replace(plan, gradient_checkpointing=False)))
    batch_keys = ("training.per_device_train_batch_size", "training.gradient_accumulation_steps")
    if not any(k in pinned for k in batch_keys):
        per_process = plan.per_device_train_batch_size * plan.gradient_accumulation_steps
        bigger = _larger_divisor(per_process, plan.per_device_train_batch_size)
        if bigger:
            out.append(("larger micro-batch", _rebatch(plan, bigger)))
    return out


def pinned_blockers(pinned: set[str]) -> list[str]:
    return sorted(k for _, keys, _ in RUNGS for k in keys if k in pinned)


# ---------------------------------------------------------------- search ---

@dataclass
class Measurement:
    peak_bytes: int | None
    tokens_per_second: float
    seconds: float


@dataclass
class Attempt:
    plan: Plan
    why: str
    ok: bool
    peak_bytes: int | None = None
    tokens_per_second: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.plan.to_dict(), "label": self.plan.label(), "why": self.why, "ok": self.ok,
                "peak_bytes": self.peak_bytes, "tokens_per_second": self.tokens_per_second,
                "seconds": round(self.seconds, 3), "error": self.error}


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
        return Attempt(plan, why, True, m.peak_bytes, m.tokens_per_second, time.perf_counter() - started)
    except Exception as exc:
        if not is_oom(exc):
            raise
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'out of memory'}"
    # Outside the handler: the failed step's frames (and their tensors) are gone now.
    free()
    return Attempt(plan, why, False, error=error, seconds=time.perf_counter() - started)


def free_cuda_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def search(start: Plan, measure: Callable[[Plan], Measurement], *, pinned: set[str], max_attempts: int = 12,
           time_plans: bool = True, ctx: dict | None = None, budget_bytes: int | None = None,
           free: Callable[[], None] = free_cuda_memory, log: Callable[[Attempt], None] | None = None) -> DryRunResult:
    """Down the ladder until a plan fits, then try faster plans while memory allows.

    An attempt fits when it did not run out of memory and its peak stays under
    `budget_bytes` (the safety margin). The effective batch never changes.
    """
    t0 = time.perf_counter()
    attempts: list[Attempt] = []

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
        improved = True
        while improved and len(attempts) < max_attempts:
            improved = False
            for name, candidate in faster_candidates(best.plan, pinned):
                if len(attempts) >= max_attempts:
                    break
                if any(a.plan == candidate for a in attempts):
                    continue
                attempt = run(candidate, f"faster? {name}")
                if attempt.ok and (attempt.tokens_per_second or 0) > (best.tokens_per_second or 0) * 1.02:
                    best, improved = attempt, True
                    reason = f"fastest that fits: {best.plan.label()} ({name}, {best.tokens_per_second:,.0f} tokens/s)"
                    break
    return DryRunResult(best.plan, attempts, time.perf_counter() - t0, reason, budget_bytes)


# ------------------------------------------------------ real measurement ---

class RealMeasure:
    """Measures a plan with real optimizer steps on the real model and the
    longest batch the data can produce.

    The base model is loaded once per weight format and kept; each attempt adds
    LoRA, steps, and removes it again, so a ladder costs seconds, not reloads.
    """

    def __init__(self, *, load_base: Callable[[str, bool], Any], examples: list[dict[str, list[int]]],
                 collator: Callable, device: str, steps: int, learning_rate: float, lora_dropout: float,
                 chunk_size: int):
        self.load_base = load_base
        self.examples = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
        self.collator = collator
        self.device = device
        self.steps = steps
        self.learning_rate = learning_rate
        self.lora_dropout = lora_dropout
        self.chunk_size = chunk_size  # the lean loss's, as training will use it
        self._base: dict[tuple[str, bool], Any] = {}

    def _batch(self, plan: Plan) -> dict[str, Any]:
        rows = [e for e in self.examples if len(e["input_ids"]) <= plan.max_length][: plan.per_device_train_batch_size]
        if not rows:
            raise AutotuneError(f"no sample is shorter than max_length {plan.max_length}")
        while len(rows) < plan.per_device_train_batch_size:  # tiny datasets: repeat the longest
            rows.append(rows[0])
        return {k: v.to(self.device) for k, v in self.collator(rows).items()}

    def base(self, plan: Plan):
        key = (plan.precision, plan.load_in_4bit)
        if key not in self._base:
            # Keep one weight format in memory at a time.
            self._base.clear()
            free_cuda_memory()
            self._base[key] = self.load_base(plan.precision, plan.load_in_4bit)
        return self._base[key]

    def __call__(self, plan: Plan) -> Measurement:
        import torch

        from autotune.loss import compute_lean_loss
        from autotune.model import apply_lora, set_gradient_checkpointing

        base = self.base(plan)
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        model = apply_lora(base, r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=self.lora_dropout,
                           target_modules=list(plan.lora_target_modules), gradient_checkpointing=plan.gradient_checkpointing,
                           quantized=plan.load_in_4bit)
        try:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = make_optimizer(plan.optim, params, self.learning_rate, cuda)
            batch = self._batch(plan)
            mask = batch.get("attention_mask")  # packed rows have none: every token is real
            tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision)
            elapsed = 0.0
            for step in range(self.steps):
                started = time.perf_counter()
                with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=dtype is not None and cuda):
                    if plan.lean_loss:
                        loss, _ = compute_lean_loss(model, batch, chunk_size=self.chunk_size)
                    else:
                        loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started  # the last step: warm
                del loss
            peak = torch.cuda.max_memory_allocated() if cuda else None
            return Measurement(peak, tokens / elapsed if elapsed > 0 else 0.0, elapsed)
        finally:
            set_gradient_checkpointing(model, False)
            restored = model.unload()
            self._base[(plan.precision, plan.load_in_4bit)] = restored


def make_optimizer(name: str, params: list, lr: float, cuda: bool):
    import torch

    if "8bit" in name:
        import bitsandbytes as bnb

        return (bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit)(params, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, fused=(name == "adamw_torch_fused" and cuda))
