"""The YAML files of laksjdjf/llasa-trainer, the trainer the tuning guide was written for,
read as ours: their top-level paths become command-line defaults, their names for the model,
the codec and the test sample become our keys, and what has no meaning here is refused with
the reason. `config.resolve_config` applies it to every file it reads."""

from __future__ import annotations

import copy
from typing import Any

from autotune.errors import AutotuneError


# laksjdjf/llasa-trainer (the trainer the tuning guide was written for) keeps a run's
# paths at the top level of its YAML; they are defaults for our command-line flags.
LLASA_TRAINER_RUN_KEYS = {"data_dir": "--data", "output_dir": "--output-dir",
                          "cuda_visible_devices": "CUDA_VISIBLE_DEVICES"}


# ... and names two config values its own way.
LLASA_TRAINER_CONFIG_KEYS = {"model_name": "model.name_or_path", "codec_model_name": "data.codec",
                             "test.text": "samples.texts", "test.interval": "samples.every_n_steps"}


def translate_llasa_trainer(tree: dict[str, Any], notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A llasa-trainer YAML read as ours: -> (our config tree, run keys for the command line).

    What has no meaning here is refused with the reason: `lora: null` (llasa-trainer's full
    fine-tuning) is out of scope for a LoRA trainer. A tree without their keys comes back as it is."""
    run: dict[str, Any] = {}
    mapped: list[str] = []
    for key, flag in LLASA_TRAINER_RUN_KEYS.items():
        if key in tree:
            value = tree.pop(key)
            if value is None:
                continue
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise AutotuneError(f"`{key}` must be a path or a value such as \"0,1\", got `{_short(value)}`")
            run[key] = str(value)
            mapped.append(f"{key} -> {flag}")
    if "test" in tree:
        test = tree.pop("test")
        if test is not None:
            if not isinstance(test, dict):
                raise AutotuneError(f"`test` must be a mapping with `text` and `interval`, got `{_short(test)}`")
            unknown = sorted(set(test) - {"text", "interval"})
            if unknown:
                raise AutotuneError(f"unknown key `test.{unknown[0]}` (allowed: text, interval)")
            for sub in ("text", "interval"):
                if sub in test:
                    tree.setdefault("samples", {}).setdefault(LLASA_TRAINER_CONFIG_KEYS[f"test.{sub}"].split(".")[1],
                                                              test[sub])
                    mapped.append(f"test.{sub} -> {LLASA_TRAINER_CONFIG_KEYS[f'test.{sub}']}")
    for key in ("model_name", "codec_model_name"):
        if key in tree:
            value = tree.pop(key)
            ours = LLASA_TRAINER_CONFIG_KEYS[key]
            section, name = ours.split(".")
            if value is not None and _get(tree, ours) is None:   # our own key wins where a file has both
                tree.setdefault(section, {})[name] = value
                mapped.append(f"{key} -> {ours}")
    if "lora" in tree and tree["lora"] is None:
        raise AutotuneError("`lora: null` asks for full fine-tuning, which this trainer does not do (it trains LoRA "
                            "adapters): give a `lora:` section, e.g. `lora: {r: 16, lora_alpha: 32}`")
    if mapped:
        notes.append("read llasa-trainer keys: " + ", ".join(mapped))
    return tree, run


def run_keys(tree: dict[str, Any] | None) -> dict[str, str]:
    """The command-line defaults a llasa-trainer YAML holds (`data_dir`, `output_dir`, `cuda_visible_devices`)."""
    return translate_llasa_trainer(copy.deepcopy(tree or {}), [])[1]


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
