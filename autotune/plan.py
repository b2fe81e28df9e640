"""The plan is config: the dotted keys the auto-tuner chooses, with their values, and the
back-off ladder's rungs that change them.

A plan is applied with the same machinery as `--set` (`set_dotted`, then the schema's
validation), so a plan value is typed and checked exactly as a user's would be, and the
keys the user pinned are never in a plan the tuner changed. Besides the keys, a plan
knows how many processes share the effective batch.

The rungs, cheapest loss of speed first, then those that change the model, last the data:
smaller micro-batch with more accumulation; gradient checkpointing; the lean loss; the
8-bit optimizer; a smaller LoRA rank; 4-bit base weights; a shorter max length (by
skipping longer samples). Each changes only plan keys the user left to the tuner, and the
effective batch never changes. The dry run walks them (`tuning.ladder.search`) and so does
a training that runs out of memory (`training.recovery`): both from here, below them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from autotune.config import EIGHT_BIT_OPTIMIZERS, Config, precision_of, precision_settings, validate
from autotune.dotted import get_dotted, set_dotted

# `torch.compile`'s mode: "reduce-overhead" replays the compiled step as CUDA graphs, which pays
# once the shapes are few (packed rows padded to buckets). None is the default mode.
COMPILE_MODE = "training.torch_compile_mode"

# The keys the tuner owns (unless the user pinned them): what decides memory and speed.
PLAN_KEYS: tuple[str, ...] = (
    "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
    "training.bf16", "training.fp16", "training.gradient_checkpointing", "training.lean_loss", "training.optim",
    "lora.r", "lora.lora_alpha", "lora.target_modules", "model.load_in_4bit", "data.max_length",
    "training.torch_compile", "training.use_liger_kernel", "data.packing", COMPILE_MODE,
)
MICRO_BATCH = "training.per_device_train_batch_size"
ACCUMULATION = "training.gradient_accumulation_steps"

# Plans recorded before plans were config used these names; `from_record` still reads them.
_OLD_NAMES = {"per_device_train_batch_size": MICRO_BATCH, "gradient_accumulation_steps": ACCUMULATION,
              "gradient_checkpointing": "training.gradient_checkpointing", "lean_loss": "training.lean_loss",
              "optim": "training.optim", "lora_r": "lora.r", "lora_alpha": "lora.lora_alpha",
              "lora_target_modules": "lora.target_modules", "load_in_4bit": "model.load_in_4bit",
              "max_length": "data.max_length"}


@dataclass(frozen=True)
class Plan:
    """Values for `PLAN_KEYS`, and the processes that share the effective batch."""

    settings: tuple[tuple[str, Any], ...]
    processes: int = 1

    # -- building -------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Config, processes: int = 1) -> "Plan":
        tree = config.to_dict()
        return cls.of({key: get_dotted(tree, key) for key in PLAN_KEYS}, processes)

    @classmethod
    def of(cls, values: Mapping[str, Any], processes: int = 1) -> "Plan":
        unknown = set(values) - set(PLAN_KEYS)
        if unknown or set(values) != set(PLAN_KEYS):
            raise ValueError(f"a plan sets exactly {PLAN_KEYS}; got {sorted(values)}")
        return cls(tuple((key, _frozen(values[key])) for key in PLAN_KEYS), processes)

    def with_values(self, values: Mapping[str, Any]) -> "Plan":
        """This plan with some keys changed (the ladder's rungs)."""
        return Plan.of({**self.as_dict(), **values}, self.processes)

    def apply(self, config: Config) -> Config:
        """The config with this plan's values: `set_dotted` then validation, as `--set` does."""
        tree = config.to_dict()
        for key, value in self.settings:
            set_dotted(tree, key, list(value) if isinstance(value, tuple) else value)
        return validate(tree)

    # -- reading --------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    @property
    def micro_batch_size(self) -> int:
        return self[MICRO_BATCH]

    @property
    def accumulation_steps(self) -> int:
        return self[ACCUMULATION]

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.processes

    @property
    def precision(self) -> str:
        return precision_of(self["training.bf16"], self["training.fp16"])

    @property
    def load_in_4bit(self) -> bool:
        return self["model.load_in_4bit"]

    @property
    def max_length(self) -> int:
        return self["data.max_length"]

    def label(self) -> str:
        v = self.as_dict()
        parts = [f"batch {self.micro_batch_size}x{self.accumulation_steps}"
                 + (f"x{self.processes}" if self.processes > 1 else ""),
                 "ckpt" if v["training.gradient_checkpointing"] else "no-ckpt",
                 "lean-loss" if v["training.lean_loss"] else "stock-loss", v["training.optim"], f"r{v['lora.r']}"]
        if self.load_in_4bit:
            parts.append("4bit")
        if v["training.torch_compile"]:
            parts.append(f"compiled ({v[COMPILE_MODE]})" if v.get(COMPILE_MODE) else "compiled")
        if v["training.use_liger_kernel"]:
            parts.append("liger")
        if v["data.packing"]:
            parts.append("packed")
        parts.append(f"len {self.max_length}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """As recorded in autotune.json, shape.json and run_summary.json."""
        return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings},
                "processes": self.processes, "effective_batch_size": self.effective_batch_size,
                "precision": self.precision, "label": self.label()}

    @classmethod
    def from_record(cls, record: Any) -> "Plan":
        """A plan as a file recorded it, checked: every value goes through the config schema,
        so it is typed and in range as a config value would be. Raises ValueError (or a
        pydantic error) when it is not a plan."""
        if not isinstance(record, dict) or type(record.get("processes")) is not int or record["processes"] < 1:
            raise ValueError("not a recorded plan")
        values = record.get("settings")
        if values is None:   # the flat names of earlier versions
            values = {new: record[old] for old, new in _OLD_NAMES.items() if old in record}
            if record.get("precision") in ("bf16", "fp16", "fp32"):
                values.update(precision_settings(record["precision"]))
        if not isinstance(values, dict):
            raise ValueError("not a recorded plan")
        # Keys that came later (compile, liger, packing) were off when an older plan was measured.
        values = {"training.torch_compile": False, "training.use_liger_kernel": False, "data.packing": False,
                  COMPILE_MODE: None, **values}
        if set(values) != set(PLAN_KEYS):
            raise ValueError("not a recorded plan")
        tree: dict[str, Any] = {}
        for key, value in values.items():
            set_dotted(tree, key, value)
        return cls.from_config(validate(tree), record["processes"])


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def memory_shape(plan: Plan, config: Config) -> str:
    """What decides memory: the plan and the lean loss's chunk (not the learning rate)."""
    return repr(sorted(plan.as_dict().items()) + [("processes", plan.processes)]
                + sorted(measured_with(config).items()))


def measured_with(config: Config) -> dict[str, Any]:
    """What decides memory besides the plan (see `memory_shape`), as a dry run records it."""
    return {"training.lean_loss_chunk_size": config.training.lean_loss_chunk_size}


# ------------------------------------------------------------------ rungs ---

# Below this, a shorter max length would skip most real utterances (about 8 s of speech).
SHORTEST_MAX_LENGTH = 512


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
    """Plans that may run faster than `plan` if memory allows, at the same effective batch: no
    checkpointing; fewer, larger micro-batches (a larger token budget per launch); packed rows
    (no padding, position ids); Liger's kernels and compilation where they run (`ctx`: "liger",
    "compile"). A compiled step packs its rows too: one row a micro-batch, its length rounded
    to a bucket, so the graph sees few shapes."""
    ctx = ctx or {}
    out = []
    if plan["training.gradient_checkpointing"] and "training.gradient_checkpointing" not in pinned:
        out.append(("checkpointing off", plan.with_values({"training.gradient_checkpointing": False})))
    if not any(k in pinned for k in (MICRO_BATCH, ACCUMULATION)):
        per_process = plan.micro_batch_size * plan.accumulation_steps
        bigger = _larger_divisor(per_process, plan.micro_batch_size)
        if bigger:
            out.append(("larger micro-batch", _rebatch(plan, bigger)))
    if not plan["data.packing"] and "data.packing" not in pinned:
        out.append(("packed rows", plan.with_values({"data.packing": True})))
    if ctx.get("liger") and not plan["training.use_liger_kernel"] and "training.use_liger_kernel" not in pinned:
        out.append(("liger on", plan.with_values({"training.use_liger_kernel": True})))
    if ctx.get("compile") and not plan["training.torch_compile"] and "training.torch_compile" not in pinned:
        packed = {} if "data.packing" in pinned else {"data.packing": True}
        out.append(("compile on", plan.with_values({"training.torch_compile": True, **packed})))
    # CUDA graphs replay one recorded step per shape: offered once a compiled step's shapes are the
    # few buckets of packed rows, and measured with its warm-up (the recordings) like the rest.
    if (ctx.get("cuda_graphs") and plan["training.torch_compile"] and plan["data.packing"]
            and plan[COMPILE_MODE] != "reduce-overhead" and COMPILE_MODE not in pinned):
        out.append(("CUDA graphs", plan.with_values({COMPILE_MODE: "reduce-overhead"})))
    return out


def pinned_blockers(pinned: set[str]) -> list[str]:
    return sorted(k for _, keys, _ in RUNGS for k in keys if k in pinned)


