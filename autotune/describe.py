"""A run in words, as people read it: rates as percentages, similarity as a cosine, the plan
and the hardware as a sentence.

One way of showing each value, for every page and file that shows it: report.html, the
sweep's page, the model card and the console's score lines. Only the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["format_value", "hardware_in_words", "percent", "plan_in_words", "scores_in_words", "similarity"]


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def plain(value: Any) -> str:
    """A value as a short string: `—` for none, yes/no, 4 significant digits, thousands separated."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value)
    return str(value)


def percent(value: Any) -> str:
    """An error rate as people read it: `12.5 %` (`—` when there is none)."""
    number = finite(value)
    return "—" if number is None else f"{100 * number:.1f} %"


def similarity(value: Any) -> str:
    """A cosine similarity: `0.912` (`—` when there is none)."""
    number = finite(value)
    return "—" if number is None else f"{number:.3f}"


#: Keys whose values are rates (0.125 is 12.5 %), wherever they sit in a record.
_RATE_KEYS = ("cer", "wer", "error_rate")


def format_value(key: str, value: Any) -> str:
    """A recorded value for people: rates as percentages, bytes as GiB, the rest as numbers."""
    last = key.rsplit(".", 1)[-1]
    if finite(value) is not None and (last in _RATE_KEYS or last.removeprefix("mean_") in _RATE_KEYS):
        return percent(value)
    if finite(value) is not None and last.endswith("_bytes"):
        return f"{value / 2**30:,.1f} GiB"
    return plain(value)


def scores_in_words(means: dict[str, Any]) -> str:
    """`CER 12.5 %, speaker similarity 0.912` from an evaluation's means (`mean_cer`, ...),
    or `not scored`."""
    parts = [f"{label} {percent(means[key])}" for key, label in (("mean_cer", "CER"), ("mean_wer", "WER"))
             if finite(means.get(key)) is not None]
    if finite(means.get("mean_similarity")) is not None:
        parts.append(f"speaker similarity {similarity(means['mean_similarity'])}")
    return ", ".join(parts) or "not scored"


#: LoRA on all of these is what community trainers call "all 7 projections".
_ALL_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def plan_in_words(plan: dict[str, Any] | None) -> str:
    """`batch 4 x 2 (8 samples per step), gradient checkpointing off, bf16, LoRA r 16 (alpha 32)
    on all 7 projections, ...` from a plan as the run records it (`Plan.to_dict`)."""
    if not plan:
        return "not recorded"
    v = plan.get("settings") or {}
    micro, accumulation = v.get("training.per_device_train_batch_size"), v.get("training.gradient_accumulation_steps")
    processes = plan.get("processes") or 1
    parts = []
    if micro is not None and accumulation is not None:
        batch = f"batch {micro} x {accumulation}" + (f" x {processes} processes" if processes > 1 else "")
        effective = plan.get("effective_batch_size")
        parts.append(batch + (f" ({effective} samples per step)" if effective is not None else ""))
    if "training.gradient_checkpointing" in v:
        parts.append(f"gradient checkpointing {'on' if v['training.gradient_checkpointing'] else 'off'}")
    if plan.get("precision"):
        parts.append(str(plan["precision"]))
    if v.get("lora.r") is not None:
        targets = set(v.get("lora.target_modules") or [])
        on = ("all 7 projections" if targets == _ALL_PROJECTIONS
              else ", ".join(sorted(targets)) if targets else "the default modules")
        alpha = f" (alpha {v['lora.lora_alpha']})" if v.get("lora.lora_alpha") is not None else ""
        parts.append(f"LoRA r {v['lora.r']}{alpha} on {on}")
    if "training.lean_loss" in v:
        parts.append("memory-lean loss" if v["training.lean_loss"] else "stock loss")
    if v.get("training.optim"):
        parts.append(f"optimizer {v['training.optim']}")
    extras = [name for key, name in (("model.load_in_4bit", "4-bit base weights"),
                                     ("training.torch_compile", "torch.compile"),
                                     ("training.use_liger_kernel", "Liger kernels")) if v.get(key)]
    parts += extras
    if v.get("data.max_length") is not None:
        parts.append(f"up to {v['data.max_length']:,} tokens per sample")
    return ", ".join(parts) or str(plan.get("label") or "not recorded")


def hardware_in_words(gpus: Sequence[Any]) -> str:
    """`1 x NVIDIA H200 (139.8 GiB)`, or that the run used the CPU."""
    if not gpus:
        return "no GPU: the run used the CPU"
    names: dict[str, int] = {}
    for gpu in gpus:
        row = gpu if isinstance(gpu, dict) else {"name": gpu}
        total = finite(row.get("total_bytes"))
        name = str(row.get("name") or "unknown GPU") + (f" ({total / 2**30:.1f} GiB)" if total else "")
        names[name] = names.get(name, 0) + 1
    return ", ".join(f"{count} x {name}" for name, count in names.items())
