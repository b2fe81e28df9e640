"""What a checkpoint must hold before `--resume` or the best-model reload trusts it.

A checkpoint is written into a staging folder and published in one rename
(`reliability.publish_checkpoint`); the last file written before the rename is
`manifest.json`: every file's size and SHA-256, the adapter's tensors (name,
dtype, shape) and the step. `verify_checkpoint` then checks, before loading
anything into a model:

- the manifest: sizes and hashes (a bit flip, a truncation, an edit);
- the structure of each state against what HF's loaders read: `trainer_state.json`
  as `TrainerState` fields with their types and `global_step` in range; the adapter's
  safetensors header; the optimizer's `state` and `param_groups`; the scheduler's
  keys; the RNG states, set on scratch generators;
- with `Expected` (what the live model and trainer take, see
  `LlasaTrainer.checkpoint_expectations`): adapter names and shapes equal to the
  model's LoRA tensors, the optimizer's groups and parameter shapes, the
  scheduler's keys, `global_step <= max_steps`.

Checkpoints saved before manifests existed are accepted on the structure checks
alone (`has_manifest` tells the caller, which says so): they hold the user's
progress, and the structure checks plus the zip CRCs of the torch files catch all
but a bit flip inside the adapter's tensor bytes.

Every torch file is opened with `weights_only=True`, after its zip CRCs passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import types
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autotune.rundir import CHECKPOINT_PREFIX, checkpoint_step

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")
# What HF's resume reads besides the weights; a manifest that leaves one out is not ours.
STATE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
# The keys `Trainer._load_rng_state` reads unconditionally (device states are optional: HF logs and goes on).
RNG_KEYS = frozenset({"python", "numpy", "cpu"})
# What LambdaLR's `load_state_dict` and `get_last_lr` read, in every torch 2.x (newer private keys vary).
SCHEDULER_KEYS = frozenset({"base_lrs", "last_epoch", "lr_lambdas", "_last_lr", "_step_count"})
# Optimizer state entries shaped like their parameter (torch AdamW/SGD, Adafactor, bitsandbytes 8-bit).
PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")
EMBEDDING_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Expected:
    """What this run can resume from; None leaves that part unchecked (before the model exists)."""
    adapter: dict[str, Shape] | None = None           # saved tensor name -> shape: the model's LoRA tensors
    optimizer_groups: list[list[Shape]] | None = None  # per param group, its parameters' shapes in order
    scheduler_keys: frozenset[str] | None = None      # keys this run's scheduler needs (of SCHEDULER_KEYS)
    max_steps: int | None = None


# ------------------------------------------------------- what a run expects ---

def adapter_shapes(model: torch.nn.Module) -> dict[str, Shape] | None:
    """The LoRA tensors a PEFT model saves (names as in its safetensors), None for another model."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.utils import get_peft_model_state_dict

    # No embedding layers: "auto" would ask the hub; `verify_checkpoint` tolerates them.
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def optimizer_layout(model: torch.nn.Module, decay_names: set[str], optimizer: Any = None) -> list[list[Shape]]:
    """Parameter shapes per group in the optimizer's order: the optimizer's own once it
    exists, else HF `create_optimizer`'s two groups (with weight decay, without)."""
    if optimizer is not None:
        return [[tuple(p.shape) for p in group["params"]] for group in optimizer.param_groups]
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return [[shape for n, shape in named if n in decay_names], [shape for n, shape in named if n not in decay_names]]


def scheduler_keys(kind: Any, kwargs: dict | None, groups: int) -> frozenset[str] | None:
    """The `SCHEDULER_KEYS` a scheduler of `kind` saves, from one built on a scratch optimizer."""
    from transformers import get_scheduler

    probe = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(max(1, groups))], lr=1e-3)
    try:
        schedule = get_scheduler(kind, probe, num_warmup_steps=1, num_training_steps=10,
                                 scheduler_specific_kwargs=dict(kwargs or {}))
    except Exception:  # noqa: BLE001 - a schedule we cannot build here: check the keys every one has
        return None
    return frozenset(schedule.state_dict()) & SCHEDULER_KEYS


def planned_max_steps(max_steps: int, samples: int | None, *, processes: int, micro_batch_size: int,
                      accumulation: int, epochs: float) -> int | None:
    """A run's last step: `max_steps`, or HF's count from the epochs (an upper bound:
    as if the last partial batch were kept). None when the data has no length."""
    if max_steps > 0:
        return max_steps
    if samples is None:
        return None
    batches = math.ceil(math.ceil(samples / max(1, processes)) / micro_batch_size)
    return math.ceil(epochs * max(1, math.ceil(batches / accumulation)))


# ----------------------------------------------------------------- manifest ---

def write_manifest(folder: Path, step: int) -> None:
    """Record every file in `folder` (size, SHA-256), the adapter's tensors and `step`.
    Called last, on a complete staging folder: a manifest means the save finished."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    weights = _weights_file(folder)
    adapter = None
    if weights is not None:
        tensors, _problem = adapter_tensors(weights)
        adapter = {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in (tensors or {}).items()}
    record = {"format": MANIFEST_FORMAT, "step": step, "files": files,
              "adapter": {"file": weights.name, "tensors": adapter} if weights is not None else None}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(folder / MANIFEST)


def has_manifest(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:   # hashlib.file_digest is Python 3.11+; we support 3.10
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    try:
        record = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST} does not parse ({_short(exc)})"
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(files, dict) or record.get("format") != MANIFEST_FORMAT
            or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                       for v in files.values())):
        return None, f"{MANIFEST} is not a checkpoint manifest (format {MANIFEST_FORMAT})"
    return record, None


def _manifest_problem(path: Path, record: dict) -> str | None:
    files = record["files"]
    for name in STATE_FILES:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing (the manifest lists it)"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (changed on disk since it was saved)"
    return None


# ------------------------------------------------------------------ verify ---

def verify_checkpoint(path: Path, expected: Expected | None = None) -> str | None:
    """Why resuming from `path` would fail or go wrong, in one phrase; None when it verifies."""
    expected = expected or Expected()
    if not path.is_dir():
        return "no such folder"
    manifest = None
    if has_manifest(path):
        manifest, problem = _read_manifest(path)
        problem = problem or _manifest_problem(path, manifest)
        if problem:
            return problem
    state, problem = _trainer_state(path)
    if problem:
        return problem
    step = state["global_step"]
    for problem in (_step_problem(path, step, manifest, expected.max_steps),
                    _adapter_problem(path, manifest, expected.adapter),
                    _optimizer_problem(path / "optimizer.pt", expected.optimizer_groups),
                    _scheduler_problem(path / "scheduler.pt", step, expected),
                    _rng_problem(path)):
        if problem:
            return problem
    return None


def newest_verified_checkpoint(output_dir: Path, expected: Expected | None = None,
                               below_step: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest `checkpoint-N` (N < `below_step` when given) that verifies, and the newer ones skipped with why."""
    numbered = []
    for path in output_dir.glob(CHECKPOINT_PREFIX + "*"):
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and (below_step is None or step < below_step):
            numbered.append((step, path))
    skipped = []
    for _, path in sorted(numbered, reverse=True):
        problem = verify_checkpoint(path, expected)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _step_problem(path: Path, step: int, manifest: dict | None, max_steps: int | None) -> str | None:
    named = checkpoint_step(path)
    if named is not None and named != step:
        return f"trainer_state.json says step {step} but the folder is {path.name}"
    if manifest is not None and manifest.get("step") != step:
        return f"trainer_state.json says step {step} but the manifest says {manifest.get('step')}"
    if max_steps is not None and max_steps > 0 and step > max_steps:
        return f"its step {step} is past this run's last step ({max_steps})"
    return None


# ----------------------------------------------------------- trainer state ---

def _trainer_state(path: Path) -> tuple[dict | None, str | None]:
    file = path / "trainer_state.json"
    if not file.is_file():
        return None, "no trainer_state.json (its save did not finish)"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"trainer_state.json does not parse ({_short(exc)})"
    if not isinstance(state, dict) or "global_step" not in state:
        return None, "trainer_state.json is not a trainer state"
    problem = trainer_state_problem(state)
    return (None, f"trainer_state.json {problem}") if problem else (state, None)


def trainer_state_problem(state: dict[str, Any]) -> str | None:
    """`state` against `TrainerState`'s fields and their types, as `TrainerState.load_from_json` takes it."""
    from transformers import TrainerState

    fields = _field_types(TrainerState)
    unknown = sorted(set(state) - set(fields))
    if unknown:
        return f"has keys a TrainerState does not: {', '.join(unknown[:5])}"
    for key, value in state.items():
        if not _json_matches(value, fields[key]):
            return f"has `{key}` = {json.dumps(value)[:40]}, not of type {_type_name(fields[key])}"
    if state["global_step"] < 0:
        return f"has a negative `global_step` ({state['global_step']})"
    best = state.get("best_metric")
    if isinstance(best, float) and not math.isfinite(best):
        # A non-finite metric is never the best (the trainer refuses it): the file was damaged, and
        # trusting it would end the run with whatever checkpoint it names.
        return f"records a best metric of {best} (no evaluation is best at a non-finite value)"
    log = state.get("log_history") or []
    if not all(isinstance(entry, dict) for entry in log):
        return "has a `log_history` entry that is not a record"
    try:
        TrainerState(**state)
    except Exception as exc:  # noqa: BLE001 - whatever __post_init__ rejects is the same verdict
        return f"is not a TrainerState ({_short(exc)})"
    return None


def _field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable forward reference: take the raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _json_matches(value: Any, kind: Any) -> bool:
    """Whether a JSON value can stand for `kind`. Unknown kinds pass: only what we can read is judged."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_json_matches(value, a) for a in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is list or origin is list:
        # `stateful_callbacks` is declared a list of callbacks and saved as a dict of their states.
        of_objects = any(isinstance(a, (str, typing.ForwardRef))
                         or (typing.get_origin(a) is None and isinstance(a, type) and a not in _JSON_TYPES)
                         for a in args)
        return isinstance(value, (list, dict)) if of_objects else isinstance(value, list)
    if kind is dict or origin is dict:
        return isinstance(value, dict)
    return True


_JSON_TYPES = (int, float, str, bool, list, dict, type(None))


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


# ----------------------------------------------------------------- adapter ---

def _weights_file(path: Path) -> Path | None:
    return next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)


def _adapter_problem(path: Path, manifest: dict | None, expected: dict[str, Shape] | None) -> str | None:
    weights = _weights_file(path)
    if weights is None:
        return "no adapter weights (adapter_model.safetensors)"
    tensors, problem = adapter_tensors(weights)
    if problem:
        return f"{weights.name} {problem}"
    if manifest is not None and manifest.get("adapter") is not None:
        recorded = manifest["adapter"]
        listed = recorded.get("tensors") if isinstance(recorded, dict) else None
        if not isinstance(listed, dict) or recorded.get("file") != weights.name:
            return f"{MANIFEST} does not describe {weights.name}"
        have = {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in tensors.items()}
        if have != listed:
            return f"{weights.name}'s tensors differ from the manifest's ({_difference(have, listed)})"
    if expected is not None:
        # PEFT may add whole embedding layers to a LoRA save (`save_embedding_layers="auto"`); they are no LoRA tensor.
        have = {name: shape for name, (_dtype, shape) in tensors.items()
                if name in expected or "lora_" in name or not name.endswith(EMBEDDING_WEIGHTS)}
        if have != expected:
            return f"{weights.name} does not fit this model's adapter ({_difference(have, expected)})"
    return None


def _difference(have: dict, want: dict) -> str:
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected tensors, e.g. {extra[0]}"
    name = next(k for k in sorted(want) if have[k] != want[k])
    return f"{name} is {_describe(have[name])}, expected {_describe(want[name])}"


def _describe(entry: Any) -> str:
    if isinstance(entry, dict):
        return f"{entry.get('dtype')} {list(entry.get('shape') or [])}"
    return str(list(entry))


def adapter_tensors(weights: Path) -> tuple[dict[str, tuple[str, Shape]] | None, str | None]:
    """name -> (dtype, shape) of a weights file, from the safetensors header alone, or
    a problem. A .bin file is opened with `weights_only=True` and memory-mapped."""
    if weights.suffix == ".safetensors":
        header, problem = _safetensors_header(weights)
        if problem:
            return None, problem
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}, None
    problem = torch_file_problem(weights)
    if problem:
        return None, problem
    loaded, problem = _torch_load(weights, mmap=True)
    if problem:
        return None, problem
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return None, "is not a dict of tensors"
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in loaded.items()}, None


def _safetensors_header(path: Path) -> tuple[dict | None, str | None]:
    """name -> {"dtype", "shape"} from a safetensors file's header, read by safetensors itself
    (`safe_open` refuses a truncated file, a cut-off or damaged header, offsets that do not
    match the shapes, and bytes after the last tensor), without loading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            entries = {}
            for name in handle.keys():
                tensor = handle.get_slice(name)
                entries[name] = {"dtype": tensor.get_dtype(), "shape": list(tensor.get_shape())}
    except (SafetensorError, OSError, ValueError) as exc:
        return None, f"is damaged ({_short(exc) or type(exc).__name__})"
    return entries, None


# -------------------------------------------------------- optimizer, scheduler ---

def torch_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return "is missing"
    # torch.save writes a zip whose directory sits at the very end: a cut-off file has none.
    if not zipfile.is_zipfile(path):
        return "is truncated or corrupt"
    # A flipped byte inside keeps the directory intact: check every member's CRC
    # (cheap at adapter and LoRA-optimizer sizes).
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                return "is corrupt (a checksum does not match)"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return "is truncated or corrupt"
    return None


def _torch_load(path: Path, mmap: bool = False) -> tuple[Any, str | None]:
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():   # numpy's RNG state, as HF's own loader allows
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), None
    except Exception as exc:  # noqa: BLE001 - unpickling refused or failed: either way not loadable
        return None, f"does not load safely ({_short(exc)})"


def _optimizer_problem(path: Path, groups: list[list[Shape]] | None) -> str | None:
    problem = torch_file_problem(path)
    if problem:
        return f"{path.name} {problem}"
    saved, problem = _torch_load(path, mmap=True)
    if problem:
        return f"{path.name} {problem}"
    problem = optimizer_state_problem(saved, groups)
    return f"{path.name} {problem}" if problem else None


def optimizer_state_problem(saved: Any, groups: list[list[Shape]] | None) -> str | None:
    """A torch optimizer `state_dict()`: `state` and `param_groups`, indices that agree,
    and with `groups` known the same group sizes and parameter shapes."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        return "is not an optimizer state (no `state` and `param_groups`)"
    saved_groups = saved["param_groups"]
    if not saved_groups or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups):
        return "has no parameter groups"
    ids = [i for g in saved_groups for i in g["params"]]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        return "has parameter groups with repeated or non-integer ids"
    if not set(saved["state"]) <= set(ids):
        return "has state for parameters no group holds"
    if groups is None:
        return None
    want = [len(g) for g in groups]
    have = [len(g["params"]) for g in saved_groups]
    if want != have:
        return f"has {have} parameters per group; this model's optimizer has {want}"
    shapes = dict(zip(ids, (shape for g in groups for shape in g)))
    for index, entry in saved["state"].items():
        if not isinstance(entry, dict):
            return f"has a state for parameter {index} that is not a record"
        for key in PARAM_SHAPED:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != shapes[index]:
                return f"has `{key}` of parameter {index} shaped {list(value.shape)}, not {list(shapes[index])}"
    return None


def _scheduler_problem(path: Path, step: int, expected: Expected) -> str | None:
    problem = torch_file_problem(path)
    if problem:
        return f"{path.name} {problem}"
    saved, problem = _torch_load(path)
    if problem:
        return f"{path.name} {problem}"
    problem = scheduler_state_problem(saved, step, expected)
    return f"{path.name} {problem}" if problem else None


def scheduler_state_problem(saved: Any, step: int, expected: Expected) -> str | None:
    """A scheduler `state_dict()`: the keys its `load_state_dict` reads (`expected.scheduler_keys`,
    else what every torch scheduler has), with values of the right kind."""
    if not isinstance(saved, dict):
        return "is not a scheduler state"
    needed = expected.scheduler_keys if expected.scheduler_keys is not None else frozenset({"last_epoch", "base_lrs"})
    missing = sorted(needed - set(saved))
    if missing:
        return f"is not a scheduler state this run can load (no {', '.join(missing)})"
    last = saved.get("last_epoch")
    if "last_epoch" in saved and not (isinstance(last, int) and not isinstance(last, bool) and 0 <= last <= step):
        return f"has `last_epoch` {last!r}, not a step between 0 and {step}"
    groups = len(expected.optimizer_groups) if expected.optimizer_groups is not None else None
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if key not in saved:
            continue
        value = saved[key]
        ok = isinstance(value, list) and all(
            (v is None or isinstance(v, dict)) if key == "lr_lambdas" else _is_number(v) for v in value)
        if not ok or (groups is not None and len(value) != groups):
            return f"has `{key}` = {str(value)[:40]}, not one entry per parameter group"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------- RNG ---

def _rng_problem(path: Path) -> str | None:
    files = sorted(path.glob("rng_state*.pth"))
    if not files:
        return "no RNG state (rng_state.pth)"
    for file in files:
        problem = torch_file_problem(file)
        if problem is None:
            saved, problem = _torch_load(file)
            problem = problem or rng_state_problem(saved)
        if problem:
            return f"{file.name} {problem}"
    return None


def rng_state_problem(saved: Any) -> str | None:
    """What `Trainer._load_rng_state` would trip on: each state is set on a scratch generator."""
    if not isinstance(saved, dict):
        return "is not an RNG state"
    missing = sorted(RNG_KEYS - set(saved))
    if missing:
        return f"has no {', '.join(missing)} state"
    import numpy as np

    try:
        random.Random().setstate(saved["python"])
        np.random.RandomState().set_state(saved["numpy"])
        torch.Generator().set_state(saved["cpu"])
    except Exception as exc:  # noqa: BLE001 - a state the generators refuse, in whatever way
        return f"holds a state the generators refuse ({_short(exc)})"
    return None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:80]

