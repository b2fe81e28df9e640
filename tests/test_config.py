"""The typed config: layering, `--set` parsing, aliases, and every error at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.config import (  # noqa: E402
    ALL_PROJECTIONS,
    Config,
    load_yaml_file,
    parse_set,
    resolve_config,
)
from autotune.errors import AutotuneError  # noqa: E402

PROFILE = {
    "training": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "bf16": True,
                 "optim": "adamw_torch_fused", "dataloader_num_workers": 8},
    "lora": {"r": 64, "lora_alpha": 128},
}
ALIAS_NOTE = "`evaluation_strategy` is the old name of `eval_strategy`; it was read as `eval_strategy`."


def problems_of(excinfo: pytest.ExceptionInfo[AutotuneError]) -> list[str]:
    return excinfo.value.details


# ---------------------------------------------------------------- layering ---

def test_defaults_validate_and_pin_nothing():
    resolved = resolve_config()
    # `auto` text normalisation is decided for the default model (HKUSTAudio's: none) and recorded.
    assert resolved.config == Config(data={"text_normalization": "none"})
    assert resolved.pinned == set()
    assert resolved.notes == []


def test_profile_is_below_yaml_which_is_below_set():
    user = {"lora": {"r": 32}, "training": {"learning_rate": 2e-5, "per_device_train_batch_size": 1}}
    resolved = resolve_config(PROFILE, user, ["lora.r=4", "training.dataloader_num_workers=2"])
    cfg = resolved.config
    assert cfg.lora.r == 4                                    # --set beats YAML beats profile
    assert cfg.lora.lora_alpha == 128                         # profile only
    assert cfg.training.per_device_train_batch_size == 1      # YAML beats profile
    assert cfg.training.gradient_accumulation_steps == 2      # profile only
    assert cfg.training.learning_rate == 2e-5                 # YAML only
    assert cfg.training.dataloader_num_workers == 2           # --set beats profile
    assert cfg.training.optim == "adamw_torch_fused"          # profile only
    assert cfg.training.weight_decay == 0.0                   # schema default


def test_pinned_is_exactly_what_the_user_wrote():
    user = {"lora": {"r": 32, "target_modules": ["q_proj"]}, "training": {"lr_scheduler_kwargs": {"num_cycles": 2}}}
    resolved = resolve_config(PROFILE, user, ["training.learning_rate=5e-5"])
    assert resolved.pinned == {"lora.r", "lora.target_modules", "training.lr_scheduler_kwargs",
                               "training.learning_rate"}
    assert resolved.config.training.lr_scheduler_kwargs == {"num_cycles": 2}


def test_choosing_one_precision_pins_and_turns_off_the_other():
    # The profile says bf16; the user asks for fp16 only. That is a choice, not a conflict.
    resolved = resolve_config(PROFILE, None, ["training.fp16=true"])
    assert resolved.config.training.fp16 is True
    assert resolved.config.training.bf16 is False
    assert {"training.bf16", "training.fp16"} <= resolved.pinned

    resolved = resolve_config({"training": {"fp16": True}}, {"training": {"bf16": True}})
    assert (resolved.config.training.bf16, resolved.config.training.fp16) == (True, False)


def test_turning_precision_off_pins_both_without_touching_the_other():
    resolved = resolve_config(PROFILE, {"training": {"fp16": False}})
    assert resolved.config.training.bf16 is True
    assert {"training.bf16", "training.fp16"} <= resolved.pinned


def test_inputs_are_not_mutated():
    profile = {"lora": {"r": 64, "target_modules": ["q_proj"]}}
    user = {"lora": {"lora_alpha": 8}, "training": {"evaluation_strategy": "epoch"}}
    resolve_config(profile, user, ["lora.r=2"])
    assert profile == {"lora": {"r": 64, "target_modules": ["q_proj"]}}
    assert user == {"lora": {"lora_alpha": 8}, "training": {"evaluation_strategy": "epoch"}}


# ------------------------------------------------------------------ --set ---

@pytest.mark.parametrize("item, key, value", [
    ("training.learning_rate=5e-5", "training.learning_rate", 5e-5),
    ("training.learning_rate=1E-4", "training.learning_rate", 1e-4),
    ("training.learning_rate=5.0e-5", "training.learning_rate", 5e-5),
    ("training.bf16=true", "training.bf16", True),
    ("training.bf16=False", "training.bf16", False),
    ("lora.r=16", "lora.r", 16),
    ("lora.target_modules=[q_proj, v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
    ("training.per_device_eval_batch_size=null", "training.per_device_eval_batch_size", None),
    ("model.name_or_path=org/model=v2", "model.name_or_path", "org/model=v2"),
    ("  lora.r =8", "lora.r", 8),
])
def test_set_values_parse_as_yaml_scalars(item, key, value):
    parsed_key, parsed = parse_set(item)
    assert parsed_key == key
    assert parsed == value
    assert type(parsed) is type(value)


def test_set_values_reach_the_typed_config():
    cfg = resolve_config(None, None, ["training.learning_rate=5e-5", "training.gradient_checkpointing=false",
                                      "lora.target_modules=[q_proj, v_proj]",
                                      "training.per_device_eval_batch_size=null"]).config
    assert cfg.training.learning_rate == 5e-5
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.training.gradient_checkpointing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training.per_device_eval_batch_size is None


@pytest.mark.parametrize("item", ["nonsense", "=5", " =5"])
def test_set_without_a_key_is_an_error(item):
    with pytest.raises(AutotuneError) as excinfo:
        parse_set(item)
    assert str(excinfo.value) == (f"`--set {item}` must look like `section.key=value`, "
                                  "for example `--set lora.r=16`")


def test_set_with_invalid_yaml_value_is_one_line_error():
    with pytest.raises(AutotuneError) as excinfo:
        parse_set("lora.target_modules=[q_proj")
    message = excinfo.value.one_line()
    assert message.startswith("`--set lora.target_modules=[q_proj`: the value is not valid YAML (")
    assert "\n" not in message


# ------------------------------------------------------------------- alias ---

def test_evaluation_strategy_in_yaml_is_read_as_eval_strategy_with_a_note():
    resolved = resolve_config(None, {"training": {"evaluation_strategy": "epoch"}})
    assert resolved.config.training.eval_strategy == "epoch"
    assert resolved.notes == [ALIAS_NOTE]
    assert "training.eval_strategy" in resolved.pinned
    assert "training.evaluation_strategy" not in resolved.pinned


def test_evaluation_strategy_in_set_is_read_as_eval_strategy_with_a_note():
    resolved = resolve_config(None, None, ["training.evaluation_strategy=no"])
    assert resolved.config.training.eval_strategy == "no"
    assert resolved.notes == [ALIAS_NOTE]
    assert resolved.pinned == {"training.eval_strategy"}


def test_new_name_wins_over_the_alias_in_the_same_file():
    resolved = resolve_config(None, {"training": {"evaluation_strategy": "epoch", "eval_strategy": "steps"}})
    assert resolved.config.training.eval_strategy == "steps"


def test_no_note_for_the_current_name():
    assert resolve_config(None, {"training": {"eval_strategy": "epoch"}}).notes == []


# ------------------------------------------------------------------ errors ---

def test_every_error_is_reported_at_once():
    user = {
        "lora": {"rnak": 8, "r": 0, "lora_alpha": "big", "target_modules": []},
        "training": {"per_device_train_batch_size": -1, "gradient_accumulation_steps": 0,
                     "bf16": "maybe", "learning_rate": -1.0},
        "data": {"max_length": 2.5},
        "trainig": {"bf16": True},
    }
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(PROFILE, user, ["training.eval_steps=0"])
    assert str(excinfo.value) == "invalid config (11 problems)"
    assert sorted(problems_of(excinfo)) == sorted([
        "unknown key `lora.rnak` (did you mean `lora.r`?)",
        "`lora.r`: input should be greater than 0, got `0`",
        "`lora.lora_alpha`: input should be a valid integer, unable to parse string as an integer, got `big`",
        "`lora.target_modules`: must name at least one module, e.g. [q_proj, v_proj], got `[]`",
        "`training.per_device_train_batch_size`: input should be greater than 0, got `-1`",
        "`training.gradient_accumulation_steps`: input should be greater than 0, got `0`",
        "`training.bf16`: input should be a valid boolean, unable to interpret input, got `maybe`",
        "`training.learning_rate`: input should be greater than 0, got `-1.0`",
        "`training.eval_steps`: input should be greater than 0, got `0`",
        "`data.max_length`: input should be a valid integer, got a number with a fractional part, got `2.5`",
        "unknown key `trainig` (did you mean `training`?)",
    ])
    one_line = excinfo.value.one_line()
    assert "\n" not in one_line
    assert one_line.startswith("invalid config (11 problems): ")
    assert "unknown key `lora.rnak` (did you mean `lora.r`?)" in one_line


@pytest.mark.parametrize("key, hint", [
    ("lora.rnak", "(did you mean `lora.r`?)"),
    ("lora.rank", "(did you mean `lora.r`?)"),
    ("lora.alpha", "(did you mean `lora.lora_alpha`?)"),
    ("lora.lora_alpah", "(did you mean `lora.lora_alpha`?)"),
    ("training.learning_rat", "(did you mean `training.learning_rate`?)"),
    ("training.bf61", "(did you mean `training.bf16`?)"),
    ("lora.zzzz", "(allowed: r, lora_alpha, lora_dropout, target_modules, bias)"),
])
def test_unknown_keys_get_a_hint(key, hint):
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(None, None, [f"{key}=8"])
    assert problems_of(excinfo) == [f"unknown key `{key}` {hint}"]


def test_unknown_section_lists_nothing_it_cannot_know():
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(None, {"zzzzzz": {"a": 1}})
    assert problems_of(excinfo)[0].startswith("unknown key `zzzzzz` (allowed: model, data, training, lora")


def test_bf16_and_fp16_both_true_is_an_error_with_other_errors():
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(None, {"training": {"bf16": True, "fp16": True}, "lora": {"rnak": 8}})
    assert problems_of(excinfo) == [
        "`training`: `training.bf16` and `training.fp16` are both true: choose one",
        "unknown key `lora.rnak` (did you mean `lora.r`?)",
    ]
    assert str(excinfo.value) == "invalid config (2 problems)"


def test_bf16_and_fp16_both_true_is_said_even_when_another_training_key_is_invalid():
    # The section's own check runs only after its fields validate; the user still hears of both.
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(None, None, ["training.bf16=1", "training.fp16=true", "training.max_steps=abc"])
    problems = problems_of(excinfo)
    assert len(problems) == 2 and problems[0].startswith("`training.max_steps`")
    assert problems[1] == "`training`: `training.bf16` and `training.fp16` are both true: choose one"


@pytest.mark.parametrize("user, problem", [
    ({"training": {"optim": "adam"}},
     "`training.optim`: input should be 'adamw_torch', 'adamw_torch_fused', 'adamw_8bit', 'adamw_bnb_8bit', "
     "'paged_adamw_8bit', 'adafactor' or 'sgd', got `adam`"),
    ({"training": {"report_to": 5}}, "`training.report_to`: input should be a valid list, got `5`"),
    ({"training": 5}, "`training`: input should be a valid dictionary or instance of TrainingSection, got `5`"),
    ({"lora": {"target_modules": [1]}}, "`lora.target_modules`: input should be a valid string, got `1`"),
    ({"training": {"learning_rate": "fast"}},
     "`training.learning_rate`: input should be a valid number, unable to parse string as a number, got `fast`"),
])
def test_wrong_types_name_the_key_and_the_value(user, problem):
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(None, user)
    assert problems_of(excinfo) == [problem]
    assert str(excinfo.value) == "invalid config (1 problem)"


def test_single_string_report_to_and_target_modules_become_lists():
    cfg = resolve_config(None, {"training": {"report_to": "none"}, "lora": {"target_modules": "q_proj"}}).config
    assert cfg.training.report_to == ["none"]
    assert cfg.lora.target_modules == ["q_proj"]


# -------------------------------------------------------------- YAML files ---

def write(tmp_path: Path, text: str | bytes, name: str = "user.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_yaml_file_loads_guide_style_values(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: 5e-5\n  bf16: true\nlora:\n  target_modules: [q_proj, v_proj]\n")
    data = load_yaml_file(path)
    assert data == {"training": {"learning_rate": 5e-5, "bf16": True}, "lora": {"target_modules": ["q_proj", "v_proj"]}}
    assert isinstance(data["training"]["learning_rate"], float)


def test_empty_yaml_file_is_an_empty_config(tmp_path):
    assert load_yaml_file(write(tmp_path, "# nothing yet\n")) == {}


def test_utf8_bom_and_japanese_comments_are_fine(tmp_path):
    path = write(tmp_path, "\ufeff# 省メモリ\nlora:\n  r: 8  # 最小限\n")
    assert load_yaml_file(path) == {"lora": {"r": 8}}


def test_missing_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(path)
    assert str(excinfo.value) == f"config file `{path}` does not exist: check the path"


def test_invalid_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "training:\n  bf16: [true\n  lr: 1\n")
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(path)
    message = excinfo.value.one_line()
    assert message.startswith(f"`{path}` is not valid YAML: ")
    assert "\n" not in message


def test_yaml_list_is_not_a_config(tmp_path):
    path = write(tmp_path, "- training\n- lora\n")
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(path)
    assert str(excinfo.value) == (f"`{path}` must hold a mapping of sections (`training:`, `lora:` ...), "
                                  "got a list")


def test_directory_is_unreadable(tmp_path):
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(tmp_path)
    assert str(excinfo.value) == f"config file `{tmp_path}` is a folder, not a regular file: pass the file itself"


def test_non_utf8_file_is_unreadable(tmp_path):
    path = write(tmp_path, b"lora:\n  r: \xff\xfe\n")
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(path)
    assert str(excinfo.value) == f"config file `{path}` is not UTF-8 text (byte 11): save it as UTF-8"


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "big"])
def test_a_config_that_is_no_regular_file_or_huge_is_one_line_at_once(tmp_path, special):
    """A FIFO would block a plain open() forever and /dev/zero would fill memory: the bounded
    reader refuses both at once, and a file of many megabytes by its size."""
    import time

    if special == "fifo":
        path = tmp_path / "config.yaml"
        os.mkfifo(path)
    elif special == "big":
        path = tmp_path / "config.yaml"
        path.write_bytes(b"# " + b"x" * 5_000_000 + b"\n")
    else:
        path = Path(special)
    started = time.monotonic()
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(path)
    assert time.monotonic() - started < 5
    assert "\n" not in excinfo.value.one_line() and str(path) in str(excinfo.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_file_without_read_permission(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n")
    path.chmod(0)
    try:
        with pytest.raises(AutotuneError) as excinfo:
            load_yaml_file(path)
    finally:
        path.chmod(0o600)
    assert str(excinfo.value).startswith(f"cannot read config file `{path}` (")


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"training: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(AutotuneError) as excinfo:
        load_yaml_file(path)
    message = excinfo.value.one_line()
    assert message.startswith(f"`{path}` is not valid YAML: ")
    assert "python/object/apply:os.system" in message
    assert not marker.exists()


def test_python_tag_in_set_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(AutotuneError) as excinfo:
        parse_set(f"lora.r=!!python/object/apply:os.system ['touch {marker}']")
    assert "the value is not valid YAML" in str(excinfo.value)
    assert not marker.exists()


def test_loaded_file_then_layered_and_pinned(tmp_path):
    path = write(tmp_path, "training:\n  evaluation_strategy: epoch\nlora:\n  r: 32\n  target_modules: [q_proj, v_proj]\n")
    resolved = resolve_config(PROFILE, load_yaml_file(path), ["lora.r=8"])
    assert resolved.config.lora.r == 8
    assert resolved.config.lora.lora_alpha == 128
    assert resolved.config.training.eval_strategy == "epoch"
    assert resolved.pinned == {"training.eval_strategy", "lora.r", "lora.target_modules"}
    assert resolved.notes == [ALIAS_NOTE]


def test_schema_default_targets_every_projection():
    assert Config().lora.target_modules == ALL_PROJECTIONS
    assert len(ALL_PROJECTIONS) == 7


@pytest.mark.parametrize("text", ["training:\n  eval_strategy: no\n", "training:\n  eval_strategy: 'no'\n"])
def test_bare_no_is_the_eval_strategy_no(tmp_path, text):
    # YAML 1.1 reads a bare `no` as false; the schema takes it as TrainingArguments' "no".
    assert resolve_config(None, load_yaml_file(write(tmp_path, text))).config.training.eval_strategy == "no"
    assert resolve_config(None, None, ["training.eval_strategy=no"]).config.training.eval_strategy == "no"


def test_bare_no_is_the_save_strategy_no(tmp_path):
    # The same YAML reading for `save_strategy`: `--set training.save_strategy=no` must not fail.
    assert resolve_config(None, None, ["training.save_strategy=no", "training.eval_strategy=no",
                                       "training.load_best_model_at_end=false"]).config.training.save_strategy == "no"
    text = "training:\n  save_strategy: no\n  eval_strategy: no\n"
    assert resolve_config(None, load_yaml_file(write(tmp_path, text))).config.training.save_strategy == "no"
