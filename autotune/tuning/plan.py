"""The plan is config: the dotted keys the auto-tuner chooses, with their values.

A plan is applied with the same machinery as `--set` (`set_dotted`, then the schema's
validation), so a plan value is typed and checked exactly as a user's would be, and the
keys the user pinned are never in a plan the tuner changed. Besides the keys, a plan
knows how many processes share the effective batch.

`--plan FILE` reads a plan an earlier dry run recorded (`read_plan_file`) and checks
it against this run (`check_plan_fits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from autotune.config import Config, load_yaml_file, precision_of, precision_settings, validate
from autotune.dotted import get_dotted, set_dotted
from autotune.errors import AutotuneError

# The keys the tuner owns (unless the user pinned them): what decides memory and speed.
PLAN_KEYS: tuple[str, ...] = (
    "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
    "training.bf16", "training.fp16", "training.gradient_checkpointing", "training.lean_loss", "training.optim",
    "lora.r", "lora.lora_alpha", "lora.target_modules", "model.load_in_4bit", "data.max_length",
    "training.torch_compile", "training.use_liger_kernel",
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
            parts.append("compiled")
        if v["training.use_liger_kernel"]:
            parts.append("liger")
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
        # Keys that came later (compile, liger) were off when an older plan was measured.
        values = {"training.torch_compile": False, "training.use_liger_kernel": False, **values}
        if set(values) != set(PLAN_KEYS):
            raise ValueError("not a recorded plan")
        tree: dict[str, Any] = {}
        for key, value in values.items():
            set_dotted(tree, key, value)
        return cls.from_config(validate(tree), record["processes"])


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def memory_shape(plan: Plan, config: Config) -> str:
    """What decides memory: the plan, the lean loss's chunk and packing (not the learning rate)."""
    return repr(sorted(plan.as_dict().items()) + [("processes", plan.processes)]
                + sorted(measured_with(config).items()))


def measured_with(config: Config) -> dict[str, Any]:
    """What decides memory besides the plan (see `memory_shape`), as a dry run records it."""
    return {"training.lean_loss_chunk_size": config.training.lean_loss_chunk_size,
            "data.packing": config.data.packing}


# -------------------------------------------------------------- --plan FILE ---

def read_plan_file(path: str | Path, processes: int) -> tuple[Plan, dict[str, Any]]:
    """`--plan FILE`: the plan in a dry run's autotune.json (a sweep's shape.json, a run's
    run_summary.json), or the config a run trained with (its run_config.yaml), and what it
    was measured with. Read and checked before anything else happens, so a bad file is found
    at once and `--overwrite` cannot delete it before it is read."""
    path = Path(path)
    fix = "pass the autotune.json a dry run (`--auto` or `--dry-run`) wrote"
    if path.suffix in (".yaml", ".yml"):
        try:
            config = validate(load_yaml_file(path))
        except AutotuneError as exc:
            raise AutotuneError(f"`--plan {path}` holds no valid run config ({exc.one_line()}): {fix}") from None
        return Plan.from_config(config, processes), measured_with(config)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AutotuneError(f"cannot read `--plan {path}` ({exc.strerror or exc}): {fix}") from None
    except ValueError:
        raise AutotuneError(f"`--plan {path}` is not JSON: {fix}") from None
    try:
        plan = Plan.from_record(record.get("plan") if isinstance(record, dict) else None)
    except Exception:  # noqa: BLE001 - any malformed plan is the same user error
        raise AutotuneError(f"`--plan {path}` holds no valid dry-run plan: {fix}") from None
    recorded = record.get("measured_with")
    return plan, recorded if isinstance(recorded, dict) else {}


def check_plan_fits(plan: Plan, measured: dict[str, Any], *, where: str, processes: int, config: Config,
                    pinned: set[str], runnable_precisions: list[str], optimizer_runs: bool) -> None:
    """A plan from `--plan` against this run: its processes, this machine's precisions and
    optimizer, what it was measured with, and the keys the user pinned. Its values themselves
    stay unpinned, so an out-of-memory error mid-training can still take the next rung."""
    if plan.processes != processes:
        raise AutotuneError(f"{where} was measured for {plan.processes} process(es) and this run has "
                            f"{processes}: run the dry run again with `--auto`")
    if plan.precision not in runnable_precisions or not optimizer_runs:
        what = (f"{plan.precision}, and this machine runs {', '.join(runnable_precisions)}"
                if plan.precision not in runnable_precisions else f"{plan['training.optim']}, which cannot run here")
        raise AutotuneError(f"{where} was measured on other hardware ({what}): run the dry run again with `--auto`")
    now = measured_with(config)
    if not plan["training.lean_loss"]:
        now.pop("training.lean_loss_chunk_size")   # no chunks without the lean loss
    for key, value in sorted(measured.items()):
        if key in now and now[key] != value:
            raise AutotuneError(f"{where} was measured with `{key}` {json.dumps(value)} and this run has "
                                f"{json.dumps(now[key])}: `--set {key}={json.dumps(value)}`, "
                                "or run the dry run again with `--auto`")
    ours, theirs = config.to_dict(), plan.apply(config).to_dict()
    for key in sorted(pinned):
        a, b = get_dotted(ours, key), get_dotted(theirs, key)
        if a != b:
            raise AutotuneError(f"`{key}` is set to {a!r} but {where} has {b!r}: drop the setting, "
                                "or run the dry run again with it")
