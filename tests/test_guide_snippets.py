"""Every YAML snippet of the tuning guide (`../shared/tuning-guide.ja.md`, copied to tests/fixtures/) loads as written, on its
own and all of them in one file, and the resolved config carries its values (issue #28): the
guide writes `TrainingArguments` keys at the top level (`optim: adamw_torch_fused`), uses the old
name `evaluation_strategy`, and a range `num_train_epochs: 20-30`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from autotune.config import load_yaml_file, resolve_config
from autotune.dotted import get_dotted
from autotune.errors import AutotuneError

# The guide as the project keeps it (../shared), copied here so the tests run in any checkout;
# test_the_copy_is_the_guide keeps the two the same wherever the shared folder is beside the repository.
GUIDE = Path(__file__).resolve().parent / "fixtures" / "tuning-guide.ja.md"
SHARED_GUIDE = Path(__file__).resolve().parents[2] / "shared" / "tuning-guide.ja.md"

BLOCKS = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)

# Where the guide's top-level keys belong: written out here, not derived from the code under test.
TOP_LEVEL = {
    "optim": "training.optim", "bf16": "training.bf16", "fp16": "training.fp16",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "per_device_train_batch_size": "training.per_device_train_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "num_train_epochs": "training.num_train_epochs", "save_steps": "training.save_steps",
    "eval_steps": "training.eval_steps", "use_early_stopping": "training.use_early_stopping",
    "early_stopping_patience": "training.early_stopping_patience",
    "eval_data_dir": "eval_data_dir",
}
RENAMED = {"training.evaluation_strategy": "training.eval_strategy"}


def expected_values(tree: dict) -> dict[str, object]:
    """dotted key -> the value the guide means, from what YAML itself reads (a later duplicate
    key wins, as it does for anyone who pastes snippets into one file)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            for sub, leaf in value.items():
                name = RENAMED.get(f"{key}.{sub}", f"{key}.{sub}")
                out[name] = leaf
        else:
            assert key in TOP_LEVEL, f"the guide has a new top-level key `{key}`: add where it belongs"
            out[TOP_LEVEL[key]] = value
    for name, value in list(out.items()):
        if isinstance(value, str) and re.fullmatch(r"\d+-\d+", value):
            out[name] = float(value.split("-")[1])   # a range: its upper end
        elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?e-?\d+", value):
            out[name] = float(value)
    return out


def check_carried(text: str, tmp_path: Path) -> None:
    path = tmp_path / "snippet.yaml"
    path.write_text(text, encoding="utf-8")
    resolved = resolve_config(user_yaml=load_yaml_file(path))
    config = resolved.config.to_dict()
    want = expected_values(yaml.safe_load(text) or {})
    assert want, "an empty snippet tests nothing"
    for name, value in want.items():
        got = get_dotted(config, name)
        if isinstance(got, list) and isinstance(value, str):
            value = [value]   # `report_to: tensorboard` is TrainingArguments' one-item list
        if isinstance(value, list):
            assert got == value, name
        else:
            assert got == value or (isinstance(value, (int, float)) and got == pytest.approx(value)), name
        assert name in resolved.pinned or name == "eval_data_dir"


def test_the_guide_has_snippets():
    assert len(BLOCKS) >= 20


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_snippet_loads_and_is_carried(index, tmp_path):
    check_carried(BLOCKS[index], tmp_path)


def test_all_snippets_in_one_file_load_and_are_carried(tmp_path):
    check_carried("\n".join(BLOCKS), tmp_path)


def test_a_top_level_key_is_read_in_its_section_with_one_note():
    resolved = resolve_config(user_yaml={"optim": "adamw_torch_fused", "bf16": True})
    assert resolved.config.training.optim == "adamw_torch_fused" and resolved.config.training.bf16
    assert {"training.optim", "training.bf16"} <= resolved.pinned
    notes = [n for n in resolved.notes if "top-level" in n]
    assert len(notes) == 1 and "`training.optim`" in notes[0]


def test_the_section_wins_over_the_same_key_at_the_top_level():
    resolved = resolve_config(user_yaml={"optim": "adamw_torch", "training": {"optim": "adamw_torch_fused"}})
    assert resolved.config.training.optim == "adamw_torch_fused"


def test_set_takes_the_guide_shorthand_too():
    resolved = resolve_config(sets=["max_steps=10", "r=8"])
    assert resolved.config.training.max_steps == 10 and resolved.config.lora.r == 8
    assert {"training.max_steps", "lora.r"} <= resolved.pinned


@pytest.mark.parametrize("tree, hint", [
    ({"max_step": 5}, "did you mean `training.max_steps`?"),
    ({"learnig_rate": 1e-4}, "did you mean `training.learning_rate`?"),
    ({"lora_rank": 8}, "unknown key `lora_rank`"),
])
def test_an_unknown_top_level_key_gets_did_you_mean(tree, hint):
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(user_yaml=tree)
    assert any(hint in d for d in excinfo.value.details)


def test_a_name_of_several_sections_is_ambiguous_with_both_named(monkeypatch):
    from autotune import config as C

    monkeypatch.setattr(C, "_homes", lambda name: ["training.seed", "data.seed"] if name == "seed" else [])
    with pytest.raises(AutotuneError) as excinfo:
        C.resolve_config(user_yaml={"seed": 1})
    assert any("`training.seed` or `data.seed`" in d for d in excinfo.value.details)


def test_a_backwards_range_is_one_problem():
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(user_yaml={"training": {"num_train_epochs": "30-20"}})
    assert any("runs backwards" in d for d in excinfo.value.details)


@pytest.mark.parametrize("item", ["...=5", ".=1", "a..b=2", "lora.=3", "=4"])
def test_set_with_a_key_that_is_not_a_key_is_one_line(item):
    with pytest.raises(AutotuneError) as excinfo:
        resolve_config(sets=[item])
    message = excinfo.value.one_line()
    assert "config`" not in message and ("is not a key" in message or "must look like" in message)


def test_the_copy_is_the_guide():
    if not SHARED_GUIDE.is_file():
        pytest.skip(f"the shared guide is not at {SHARED_GUIDE} in this checkout")
    assert GUIDE.read_bytes() == SHARED_GUIDE.read_bytes(), f"copy {SHARED_GUIDE} to {GUIDE} again"
