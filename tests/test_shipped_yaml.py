"""Every YAML the repository ships loads and validates: profiles and example configs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autotune.config import load_yaml_file, resolve_config  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402
from autotune.profiles import PROFILES_DIR, load_profiles  # noqa: E402

SHIPPED = sorted(p for folder in ("autotune/profiles", "config") for p in (REPO / folder).rglob("*.yaml"))
PROFILE_FILES = [p for p in SHIPPED if p.parent == PROFILES_DIR]
CONFIG_FILES = [p for p in SHIPPED if p.is_relative_to(REPO / "config")]


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def test_the_glob_found_the_shipped_files():
    assert len(SHIPPED) >= 8, ids(SHIPPED)
    assert len(PROFILE_FILES) >= 7
    assert {p.name for p in CONFIG_FILES} >= {"optimized_training.yaml", "low_memory.yaml"}
    # A profile in a subfolder would never be loaded: load_profiles reads one folder.
    assert set(SHIPPED) == set(PROFILE_FILES) | set(CONFIG_FILES)


def test_profiles_folder_loads_as_a_whole():
    profiles = load_profiles()
    assert sorted(p.source for p in profiles) == sorted(str(p) for p in PROFILE_FILES)
    names = [p.name for p in profiles]
    assert len(names) == len(set(names)), "profile names must be unique"


@pytest.mark.parametrize("path", PROFILE_FILES, ids=ids(PROFILE_FILES))
def test_each_profile_validates_on_its_own(path, tmp_path):
    shutil.copy(path, tmp_path / path.name)
    (profile,) = load_profiles(tmp_path)
    assert profile.name == path.stem  # the file name is the profile's name
    resolve_config(profile.settings)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=ids(CONFIG_FILES))
def test_each_config_validates(path):
    resolved = resolve_config(user_yaml=load_yaml_file(path))
    assert resolved.pinned, "a shipped config that pins nothing does nothing"
    assert resolved.notes == [], "shipped configs use current key names"
    assert "evaluation_strategy" not in path.read_text(encoding="utf-8")


def test_optimized_training_is_the_guides_accuracy_and_speed_settings():
    resolved = resolve_config(user_yaml=load_yaml_file(REPO / "config" / "optimized_training.yaml"))
    t, lora = resolved.config.training, resolved.config.lora
    assert (t.eval_strategy, t.eval_steps, t.load_best_model_at_end, t.metric_for_best_model) == (
        "steps", 50, True, "eval_loss")
    assert (t.use_early_stopping, t.early_stopping_patience, t.early_stopping_threshold) == (True, 5, 0.001)
    assert (t.learning_rate, t.warmup_ratio, t.lr_scheduler_type) == (5e-5, 0.05, "cosine_with_restarts")
    assert (t.weight_decay, t.max_grad_norm) == (0.01, 1.0)
    assert (t.group_by_length, t.dataloader_pin_memory, t.report_to) == (True, True, ["tensorboard"])
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 64, 0.05)
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Left to the auto-tuner on purpose: not pinned.
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "optim",
                "gradient_checkpointing", "dataloader_num_workers"):
        assert f"training.{key}" not in resolved.pinned


def test_low_memory_is_the_guides_8_to_12gb_and_memory_settings():
    resolved = resolve_config(user_yaml=load_yaml_file(REPO / "config" / "low_memory.yaml"))
    t, lora = resolved.config.training, resolved.config.lora
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1, 16)
    assert (t.gradient_checkpointing, t.optim) == (True, "adamw_8bit")
    assert (t.load_best_model_at_end, t.dataloader_num_workers, t.save_total_limit) == (False, 0, 2)
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (8, 16, ["q_proj", "v_proj"])
    # Precision follows the card's compute capability.
    assert "training.bf16" not in resolved.pinned and "training.fp16" not in resolved.pinned


def test_invalid_profile_gives_one_line_error(tmp_path):
    for path in PROFILE_FILES:
        shutil.copy(path, tmp_path / path.name)
    broken = tmp_path / "rtx3090.yaml"
    data = yaml.safe_load(broken.read_text(encoding="utf-8"))
    data["settings"]["lora"]["rnak"] = 8
    data["settings"]["training"]["gradient_accumulation_steps"] = 0
    broken.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(AutotuneError) as excinfo:
        load_profiles(tmp_path)
    message = excinfo.value.one_line()
    assert "\n" not in message
    assert message == (
        f"profile `{broken}` has invalid settings: invalid config (2 problems): "
        "`training.gradient_accumulation_steps`: input should be greater than 0, got `0`; "
        "unknown key `lora.rnak` (did you mean `lora.r`?)"
    )


@pytest.mark.parametrize("text, expected", [
    ("name: x\ntitle: X\nmatch: {names: ['RTX']}\nsettigns: {}\n", "Extra inputs are not permitted"),
    ("name: x\ntitle: X\nmatch: {names: ['RTX (']}\n", "missing ), unterminated subpattern"),
    ("name: x\n  title: [\n", "is invalid: "),
    ("- name\n- title\n", "must hold a mapping (`name:`, `title:`, `match:`, `settings:`), got a list"),
    ("", "got a NoneType"),
    (b"name: \xff\n", "can't decode byte 0xff"),
    ("name: x\ntitle: X\nmatch: !!python/object/apply:os.system ['true']\n", "python/object/apply:os.system"),
])
def test_broken_profile_file_gives_one_line_error(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(AutotuneError) as excinfo:
        load_profiles(tmp_path)
    message = excinfo.value.one_line()
    assert message.startswith(f"profile `{path}` is invalid: ")
    assert expected in message
    assert "\n" not in message
