"""The trainer rests on what transformers documents; the few private names it still touches are
listed in `training.trainer.TRANSFORMERS_PRIVATE`. When a transformers release changes one of
them, this says which and why we use it, before a run can silently change what it does."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import transformers
from transformers import Trainer

from autotune.training import trainer as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(T.TRANSFORMERS_PRIVATE))
def test_each_private_trainer_method_still_has_the_signature_we_override(name):
    params, why = T.TRANSFORMERS_PRIVATE[name]
    method = getattr(Trainer, name, None)
    assert method is not None, (f"transformers {transformers.__version__} has no `Trainer.{name}`, which "
                                f"LlasaTrainer overrides because it {why}: find where that moved and update "
                                "autotune/training/trainer.py")
    got = tuple(inspect.signature(method).parameters)
    assert got == params, (f"transformers {transformers.__version__} changed `Trainer.{name}{params}` to "
                           f"`{got}`; LlasaTrainer overrides it because it {why}: update the override in "
                           "autotune/training/trainer.py")


def test_the_trainer_overrides_no_other_private_method():
    """Zero copies of transformers' code: an override of anything else private must be listed
    (with its reason) or replaced by a documented hook."""
    own = {name for name, value in vars(T.LlasaTrainer).items()
           if name.startswith("_") and not name.startswith("__") and callable(value)}
    private_of_trainer = {name for name in own if hasattr(Trainer, name)}
    assert private_of_trainer == set(T.TRANSFORMERS_PRIVATE)


def test_no_module_reimplements_the_trainers_checkpoint_save():
    """The issue's check: `grep -rn "def _save_checkpoint|_save_rng_state|_save_optimizer_and_scheduler" autotune`."""
    found = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "autotune").rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if "def _save_checkpoint" in line or "_save_rng_state" in line or "_save_optimizer_and_scheduler" in line]
    assert found == []


def test_transformers_is_the_series_the_suite_ran_on():
    """`pyproject.toml` pins transformers to the 5.25 series, where these tests last passed."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert (major, minor) == (5, 25), (f"transformers {transformers.__version__}: the trainer was checked on 5.25.x; "
                                       "run the suite on the new series, then widen the pin in pyproject.toml")
