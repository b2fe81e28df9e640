"""Adapters load strictly: every tensor of the file lands on the model, every LoRA module of the
model gets its tensors, the shapes match and the values are finite, or it is one line.

PEFT's own loading warns and goes on: a file with renamed tensors, with no tensors, with 4 of
28, or an `adapter_config.json` that turns on DoRA for a plain LoRA file all load "fine" and
speak with zeros or random values where the adapter should be. Here the file is read first
(`read_adapter`: the config through the bounded reader, the tensor names and shapes from the
safetensors header, every value checked finite), then PEFT's public API loads it
(`PeftModel.from_pretrained` or `load_adapter`) and the model's adapter state
(`get_peft_model_state_dict`) is compared with the file, name by name and shape by shape.
A refused adapter is taken out of the model again, so one base model can keep serving.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError
from autotune.files import read_user_json, special_file_kind
from autotune.loading import describe_weight_problems
from autotune.rundir import path_text

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG_LIMIT_BYTES = 1_000_000
SUPPORTED_PEFT_TYPES = ("LORA",)

# PEFT looks up the base model's name on the hub; offline (or for `tiny`) that only warns.
for _message in ("Unable to fetch remote file", "Could not find a config file in"):
    warnings.filterwarnings("ignore", message=_message)


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder as read from disk, before any model sees it."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]     # name in the file -> shape

    @property
    def base_model(self) -> str | None:
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name.strip() else None


def read_adapter(folder: str | os.PathLike[str], *, what: str = "--adapter") -> AdapterFiles:
    """Read and check an adapter folder: its config (bounded, a LoRA config), and its weights
    (a regular safetensors file whose every tensor is finite). Nothing is loaded into a model.

    Raises:
        AutotuneError: one line saying what is wrong with the folder and what to pass instead.
    """
    path = Path(folder).expanduser()
    shown = path_text(folder)
    if not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise AutotuneError(f"`{what} {shown}` {state}: pass the output folder of a training run "
                            f"(it holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise AutotuneError(f"`{what} {shown}` holds no {ADAPTER_CONFIG}: pass the output folder of a finished "
                            "training run or one of its checkpoint-N folders")
    config = read_user_json(config_file, what="adapter config", limit_bytes=ADAPTER_CONFIG_LIMIT_BYTES)
    if not isinstance(config, dict):
        raise AutotuneError(f"`{path_text(config_file)}` is not a PEFT adapter config (expected a JSON object): "
                            "the adapter is damaged; use another checkpoint")
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AutotuneError(f"`{path_text(config_file)}` is a `{config.get('peft_type')}` adapter: only LoRA adapters "
                            "(`\"peft_type\": \"LORA\"`, what training writes) can be spoken with")
    return AdapterFiles(path, config, _read_tensors(path, shown))


def _read_tensors(folder: Path, shown: str) -> dict[str, tuple[int, ...]]:
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        other = " (only a pickled adapter_model.bin, which is not loaded: save the adapter as safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise AutotuneError(f"`{shown}` holds no {ADAPTER_WEIGHTS}{other}: the adapter is incomplete; "
                            "use another checkpoint")
    kind = special_file_kind(os.stat(weights).st_mode)
    if kind:
        raise AutotuneError(f"`{path_text(weights)}` is {kind}, not a regular file: the adapter is damaged")
    import torch
    from safetensors import safe_open

    tensors: dict[str, tuple[int, ...]] = {}
    bad: list[str] = []
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                tensors[name] = tuple(tensor.shape)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise AutotuneError(f"`{path_text(weights)}` cannot be read ({reason}): the adapter is damaged; "
                            "use another checkpoint") from None
    if bad:
        raise AutotuneError(f"`{path_text(weights)}` holds NaN or infinite values in {len(bad)} of {len(tensors)} "
                            f"tensors (e.g. `{sorted(bad)[0]}`): the training diverged before this save; "
                            "use an earlier checkpoint")
    return tensors


def load_strictly(model: Any, adapter: AdapterFiles, adapter_name: str) -> Any:
    """Load `adapter` into `model` under `adapter_name` and check that it fits exactly.

    `model` is a plain transformers model (it is wrapped with `PeftModel.from_pretrained`) or a
    `PeftModel` already holding other adapters (`load_adapter` adds this one beside them).
    Returns the `PeftModel`. On any mismatch the adapter is taken out again (a plain model is
    unwrapped back to itself) before the one-line `AutotuneError`.
    """
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict

    adding = isinstance(model, PeftModel)
    peft_model = model if adding else None
    try:
        with warnings.catch_warnings():
            # PEFT's "missing adapter keys" warning: the comparison below says it in one line.
            warnings.simplefilter("ignore")
            if not adding:
                # `PeftModel.from_pretrained` in its two public steps, so that a failed load leaves a
                # PeftModel to unload (from_pretrained would leave its LoRA layers in the base).
                config = PeftConfig.from_pretrained(str(adapter.folder))
                config.inference_mode = True
                peft_model = PeftModel(model, config, adapter_name=adapter_name)
            peft_model.load_adapter(str(adapter.folder), adapter_name=adapter_name)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign adapter, told on one line
        if peft_model is not None:
            _take_out(peft_model, adapter_name, adding)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise AutotuneError(f"cannot apply the adapter in `{path_text(adapter.folder)}` ({reason}): was it trained "
                            "on this base model? pass the right one with `--model`") from None
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    expected = {name: tuple(tensor.shape) for name, tensor in state.items()}
    problem = adapter_mismatch(adapter.tensors, expected, adapter.config)
    if problem:
        _take_out(peft_model, adapter_name, adding)
        raise AutotuneError(f"the adapter in `{path_text(adapter.folder)}` does not fit the model ({problem}), so "
                            "it would speak with missing or random weights: use the run's own folder or checkpoint, "
                            "with the base model it was trained on")
    return peft_model


def adapter_mismatch(in_file: dict[str, tuple[int, ...]], in_model: dict[str, tuple[int, ...]],
                     config: dict[str, Any]) -> str:
    """'' when the file's tensors are exactly the model's adapter tensors, else what differs."""
    missing = set(in_model) - set(in_file)
    unexpected = set(in_file) - set(in_model)
    mismatched = [(name, in_file[name], in_model[name]) for name in set(in_file) & set(in_model)
                  if in_file[name] != in_model[name]]
    problem = describe_weight_problems(missing, unexpected, mismatched)
    if problem and not in_file:
        problem = f"the file holds no tensors; {problem}"
    if problem and config.get("use_dora") and any("magnitude" in name for name in missing):
        problem += "; `use_dora: true` in adapter_config.json, but the file holds no DoRA magnitudes"
    return problem


def _take_out(model: Any, adapter_name: str, added: bool) -> None:
    """Remove a refused adapter: `delete_adapter` beside others; `unload` (the base model's own
    modules back in place) when it was the first."""
    try:
        if added:
            if adapter_name in getattr(model, "peft_config", {}):
                model.delete_adapter(adapter_name)
        else:
            model.unload()
    except Exception:  # noqa: BLE001 - the caller raises the real problem
        pass
