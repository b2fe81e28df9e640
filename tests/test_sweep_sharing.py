"""Several sweep trials on one GPU (`--trials-per-gpu`).

The GPU is one fake H100 (the real fingerprint, through a fake NVML); the children are
the fake `train.py` of test_sweep.py (no torch, a trial takes as long as it is told), and
in the slow test the real `train.py`, which trains on the CPU. What is checked is what the
sweep decides and does: how many children run on the GPU at once, the cap each one gets,
and what sweep.json records.
"""

from __future__ import annotations

import json
import sys

import pytest

import autotune.sweep.pool as pool
import autotune.sweep.sharing as sharing
from autotune.config import validate
from autotune.tuning.plan import Plan
from tests.test_sweep import FAKE_TRAIN, FAST, H100, PARALLEL, fake_gpus, intervals, main, most_at_once

GIB = 2**30
CARD = 85520809984   # the H100 80GB HBM3 of the fixtures, as NVML reports it
NO_AUTO = [a for a in FAST if a != "--auto"]
FOUR = ["--sweep", "lora.r=1,2,3,4"]   # four memory shapes: without `--auto` that costs nothing
# One memory shape (one dry run) for the `--auto` sweeps; the fake trains every trial as r=2.
LR4 = ["--set", "lora.r=2", "--sweep", "training.learning_rate=1e-3,2e-3,3e-3,4e-3"]
LR2 = ["--set", "lora.r=2", "--sweep", "training.learning_rate=1e-3,2e-3"]
LR4_NAMES = ["lr=0.001", "lr=0.002", "lr=0.003", "lr=0.004"]


@pytest.fixture
def one_h100(monkeypatch):
    gpus = fake_gpus(H100)
    monkeypatch.setattr(pool, "visible_gpus", lambda: gpus)
    return gpus[0]


@pytest.fixture
def fake_train(tmp_path, monkeypatch, one_h100):
    """Each trial sleeps 0.8 s then reports a loss; a dry run records a plan with the given peak."""
    script, plans = tmp_path / "fake_train.py", tmp_path / "plans.json"
    script.write_text(FAKE_TRAIN)
    plans.write_text(json.dumps({str(r): f"sleep:0.8:{r / 10}" for r in range(1, 5)}))
    monkeypatch.setenv("FAKE_TRAIN", str(plans))
    monkeypatch.setattr(pool, "child_command", lambda flags: [sys.executable, str(script), *flags])

    def dry_run_peak(gib: float | None) -> None:
        plan = Plan.from_config(validate({})).to_dict()
        peak = int(gib * GIB) if gib else None
        monkeypatch.setenv("FAKE_DRY", json.dumps({"plan": plan, "attempts": [
            {"plan": plan, "ok": True, "peak_bytes": peak, "tokens_per_second": 1.0}]}))

    return dry_run_peak


def children(out, names):
    return {n: json.loads((out / n / "env.json").read_text()) for n in names}


def vram_flags(env) -> list[str]:
    return [f for f in env["flags"] if f.startswith("--vram-limit=")]


# ------------------------------------------------------------- arithmetic ---

def test_the_caps_add_up_to_the_card():
    assert sharing.share_bytes(CARD, 1) == CARD                       # alone: the whole card, no cap
    for k in range(2, 9):
        share = sharing.share_bytes(CARD, k)
        assert k * share + k * sharing.CONTEXT_BYTES <= CARD < k * (share + 1) + k * sharing.CONTEXT_BYTES
        assert sharing.share_gib(CARD, k) * GIB <= share              # rounded down, never up
    assert sharing.share_gib(CARD, 2) == 39.07 and sharing.share_gib(CARD, 3) == 25.79


@pytest.mark.parametrize("peak_gib, fraction, expected", [
    (20.0, 0.9, 3),      # 0.9 x 25.79 GiB holds 20; 0.9 x 19.2 does not
    (17.0, 0.9, 4),
    (36.0, 0.9, 1),      # 0.9 x 39.07 = 35.2 < 36: alone
    (36.0, 1.0, 2),      # a user who allows the whole cap
    (0.5, 0.9, 8),       # never more than MAX_PER_GPU
    (None, 0.9, 1),      # no measured peak (a dry run on a CPU): one at a time
])
def test_how_many_trials_a_measured_peak_allows(peak_gib, fraction, expected):
    peak = int(peak_gib * GIB) if peak_gib else None
    k = sharing.trials_that_fit(peak, CARD, fraction)
    assert k == expected
    if peak and 1 < k < sharing.MAX_PER_GPU:     # the dry run's own rule holds for k and fails for k + 1
        assert peak <= fraction * sharing.share_bytes(CARD, k) and peak > fraction * sharing.share_bytes(CARD, k + 1)


def test_a_resumed_trial_keeps_the_share_its_cap_came_from(tmp_path):
    for k in (2, 3, 5):
        assert sharing.sharing_for_cap(CARD, sharing.share_gib(CARD, k)) == k
    assert sharing.sharing_for_cap(CARD, None) == 1
    assert sharing.sharing_for_cap(CARD, 70.0) == 1                   # a user's own cap: alone
    (tmp_path / "run_config.yaml").write_text("autotune:\n  vram_limit_gib: 25.79\n")
    assert sharing.recorded_cap(tmp_path) == 25.79
    assert sharing.recorded_cap(tmp_path / "missing") is None


# ------------------------------------------------- the sweep, fake children ---

def test_two_per_gpu_runs_two_children_at_once_each_capped(fake_train, one_h100, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(*NO_AUTO, *FOUR, "--trials-per-gpu", "2", "--output-dir", str(out)) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["trials_per_gpu"] == 2 and record["most_at_once"] == {one_h100.uuid: 2}
    assert most_at_once(intervals(record)) == 2                    # overlapping, and never three
    assert [t["name"] for t in record["trials"]] == ["r=1", "r=2", "r=3", "r=4"]   # ranked by loss
    for name, env in children(out, ["r=1", "r=2", "r=3", "r=4"]).items():
        assert env["gpu"] == one_h100.uuid and vram_flags(env) == ["--vram-limit=39.07"]
    assert record["trials_per_hour"] > 0 and record["wall_seconds"] > 0
    text = " ".join("".join(capsys.readouterr()).split())
    assert "2 at a time on GPU 0, each capped at 39.07 GiB" in text and "trials/hour" in text


@pytest.mark.slow
def test_auto_shares_the_gpu_as_the_measured_peak_allows(fake_train, one_h100, tmp_path, capsys):
    fake_train(20.0)   # 20 GiB fits three times under 0.9 of a third of an H100
    out = tmp_path / "sweep"
    assert main(*FAST, *LR4, "--output-dir", str(out)) == 0
    record = json.loads((out / "sweep.json").read_text())
    (dry,) = record["dry_runs"]
    assert dry["peak_bytes"] == 20 * GIB and dry["trials_per_gpu"] == 3
    assert record["trials_per_gpu"] == "auto" and record["most_at_once"] == {one_h100.uuid: 3}
    trial_spans = [s for s in intervals(record) if not s[3].startswith(".dry-runs")]
    assert most_at_once(trial_spans) == 3
    assert dry["finished_at"] <= min(s[0] for s in trial_spans)    # the dry run had the GPU to itself
    envs = children(out, LR4_NAMES)
    assert all(vram_flags(env) == ["--vram-limit=25.79"] for env in envs.values())
    assert vram_flags(json.loads((out / ".dry-runs" / "1" / "env.json").read_text())) == []
    shape = json.loads((out / ".dry-runs" / "1" / "shape.json").read_text())
    assert shape["peak_bytes"] == 20 * GIB and "vram_limit_gib" not in shape["gpu"]
    assert "its trials run 3 at a time on a GPU" in " ".join("".join(capsys.readouterr()).split())


@pytest.mark.slow
def test_auto_runs_one_at_a_time_when_the_peak_fills_the_card(fake_train, one_h100, tmp_path):
    fake_train(60.0)
    out = tmp_path / "sweep"
    assert main(*FAST, *LR2, "--output-dir", str(out)) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["dry_runs"][0]["trials_per_gpu"] == 1 and record["most_at_once"] == {one_h100.uuid: 1}
    assert all(vram_flags(env) == [] for env in children(out, LR4_NAMES[:2]).values())


@pytest.mark.slow
def test_auto_without_a_measured_peak_runs_one_at_a_time(fake_train, one_h100, tmp_path):
    fake_train(None)   # what a dry run on a CPU records
    out = tmp_path / "sweep"
    assert main(*FAST, *LR2, "--output-dir", str(out)) == 0
    assert json.loads((out / "sweep.json").read_text())["most_at_once"] == {one_h100.uuid: 1}


@pytest.mark.slow
def test_n_per_gpu_plans_the_dry_run_for_the_share_and_resume_reuses_it(fake_train, one_h100, tmp_path):
    fake_train(30.0)
    out = tmp_path / "sweep"
    assert main(*FAST, *LR2, "--trials-per-gpu", "2", "--output-dir", str(out)) == 0
    dry_env = json.loads((out / ".dry-runs" / "1" / "env.json").read_text())
    assert vram_flags(dry_env) == ["--vram-limit=39.07"]           # measured as the trials will run
    shape = json.loads((out / ".dry-runs" / "1" / "shape.json").read_text())
    assert shape["gpu"]["vram_limit_gib"] == 39.07
    # another share: the plan measured for half the card is not reused for a third of it
    (out / "lr=0.002" / "run_summary.json").unlink()
    assert main(*FAST, *LR2, "--trials-per-gpu", "3", "--resume", "--output-dir", str(out)) == 0
    dry_env = json.loads((out / ".dry-runs" / "1" / "env.json").read_text())
    assert vram_flags(dry_env) == ["--vram-limit=25.79"]           # dry-run again, for the new share
    assert json.loads((out / ".dry-runs" / "1" / "shape.json").read_text())["gpu"]["vram_limit_gib"] == 25.79
    record = json.loads((out / "sweep.json").read_text())
    assert [t["name"] for t in record["trials"] if t["earlier"]] == ["lr=0.001"]


def test_trials_per_gpu_is_refused_without_a_sweep_and_out_of_range(tmp_path, capsys):
    from autotune.cli import run_main
    from train import main as train_main

    for argv, words in ((["--trials-per-gpu", "2"], "only applies to a sweep"),
                        ([*LR2, "--trials-per-gpu", "0"], "from 1 to 8"),
                        ([*LR2, "--trials-per-gpu", "many"], "from 1 to 8")):
        with pytest.raises(SystemExit) as stop:
            run_main(train_main, [*NO_AUTO, *argv, "--output-dir", str(tmp_path / "x")])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_without_a_gpu_the_flag_says_it_does_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pool, "visible_gpus", lambda: [])
    out = tmp_path / "sweep"
    assert main(*NO_AUTO, "--sweep", "training.learning_rate=1e-3", "--trials-per-gpu", "2",
                "--output-dir", str(out)) == 0
    assert "has no effect without a GPU" in " ".join("".join(capsys.readouterr()).split())


# ------------------------------------------------ the sweep, real children ---

@pytest.mark.slow
def test_two_real_trials_share_one_gpu(one_h100, tmp_path):
    """The real `train.py` children (on the CPU) with `--auto --trials-per-gpu 2`: the dry run
    and both trials run capped at half the card, the trials side by side, and both finish."""
    out = tmp_path / "sweep"
    assert main(*PARALLEL, "--sweep", "training.learning_rate=1e-3,5e-3", "--trials-per-gpu", "2",
                "--output-dir", str(out)) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [t["status"] for t in record["trials"]] == ["ok", "ok"]
    assert record["most_at_once"] == {one_h100.uuid: 2} and len(record["dry_runs"]) == 1
    assert most_at_once([s for s in intervals(record) if not s[3].startswith(".dry-runs")]) == 2
    for t in record["trials"]:
        log = (out / t["name"] / "console.log").read_text()
        assert "--vram-limit=39.07" in log.splitlines()[0]
        assert "has no effect without a GPU" in log        # the child trains on the CPU, and says so
    assert record["trials_per_hour"] > 0
