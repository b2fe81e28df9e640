"""`train.py --sweep`: a grid of real tiny runs on the CPU, in-process.

One 2x2 sweep (learning rate x LoRA rank) is trained once for the module; the
resume and failure tests train one more trial each. Ranking, NaN, crash and
Ctrl-C bookkeeping use a fake `autotune.run.run` and cost nothing.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import autotune.run as run_module  # noqa: E402
from autotune.cli import run_main  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402

FAST = ["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--codec", "tiny", "--auto",
        "--set", "training.max_steps=3", "--set", "training.eval_steps=3", "--set", "training.save_steps=3",
        "--set", "training.logging_steps=1", "--set", "samples.num_texts=0",
        # one sample per step and a one-step dry run keep the six real trainings here cheap
        "--set", "training.per_device_train_batch_size=1", "--set", "training.gradient_accumulation_steps=1",
        "--set", "autotune.dry_run_steps=1"]
GRID = ["--sweep", "training.learning_rate=1e-3,5e-3", "--sweep", "lora.r=2,4"]
NAMES = {"lr=0.001_r=2", "lr=0.001_r=4", "lr=0.005_r=2", "lr=0.005_r=4"}


def main(*argv: str) -> int:
    from train import main as train_main

    return train_main(list(argv))


class Spy:
    """Counts calls of a function in `autotune.run` and passes them through."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, ctx, *args, **kwargs):
        self.calls.append(ctx.output_dir.name)
        return self.real(ctx, *args, **kwargs)


def ranked_ok(trials: list[dict]) -> bool:
    losses = [t["eval_loss"] for t in trials]
    return all(isinstance(x, float) for x in losses) and losses == sorted(losses)


# ------------------------------------------------------- the real 2x2 sweep ---

@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        dry = Spy(run_module.dry_run)
        train = Spy(run_module.train)
        mp.setattr(run_module, "dry_run", dry)
        mp.setattr(run_module, "train", train)
        with redirect_stdout(buffer):
            code = main(*FAST, *GRID, "--output-dir", str(out))
    return {"out": out, "code": code, "text": buffer.getvalue(), "dry": dry.calls, "train": train.calls,
            "record": json.loads((out / "sweep.json").read_text())}


def test_every_trial_runs_in_its_own_folder(grid_sweep):
    out = grid_sweep["out"]
    assert grid_sweep["code"] == 0
    assert {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} == NAMES
    for name in NAMES:
        summary = json.loads((out / name / "run_summary.json").read_text())
        assert summary["steps"] == 3
    assert sorted(grid_sweep["train"]) == sorted(NAMES)


def test_one_dry_run_per_memory_shape(grid_sweep):
    # lora.r is part of the memory shape, the learning rate is not: two shapes, two dry runs.
    out = grid_sweep["out"]
    assert len(grid_sweep["dry"]) == 2
    assert len(list(out.glob("*/autotune.json"))) == 2
    assert {n.split("_")[1] for n in grid_sweep["dry"]} == {"r=2", "r=4"}
    plans = {t["name"]: t["plan"] for t in grid_sweep["record"]["trials"]}
    assert {plans[n]["lora_r"] for n in NAMES} == {2, 4}


def test_sweep_json_is_ranked_by_eval_loss(grid_sweep):
    record = grid_sweep["record"]
    trials = record["trials"]
    assert record["complete"] is True and record["pending"] == []
    assert {t["name"] for t in trials} == NAMES
    assert ranked_ok(trials)
    assert all(t["status"] == "ok" and t["error"] is None for t in trials)
    assert all(t["train_loss"] > 0 and t["tokens_per_second"] > 0 for t in trials)
    assert record["best"] == trials[0]
    settings = trials[0]["settings"]
    assert set(settings) == {"training.learning_rate", "lora.r"}
    assert settings["training.learning_rate"] in (1e-3, 5e-3) and settings["lora.r"] in (2, 4)
    # the trial trained with its values
    resolved = (grid_sweep["out"] / trials[0]["name"] / "resolved_config.yaml").read_text()
    assert f"r: {settings['lora.r']}" in resolved


def test_the_winning_set_line_is_printed(grid_sweep):
    best = grid_sweep["record"]["best"]["settings"]
    line = f"--set training.learning_rate={best['training.learning_rate']!r} --set lora.r={best['lora.r']}"
    assert grid_sweep["record"]["best_sets"] == line
    assert line in grid_sweep["text"].splitlines()
    assert "Sweep: 4 of 4 trials" in grid_sweep["text"]


def test_resume_runs_only_the_unfinished_trial(grid_sweep, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    shutil.copytree(grid_sweep["out"], out)
    (out / "sweep.json").write_text(json.dumps({**grid_sweep["record"], "output_dir": str(out)}))
    victim = grid_sweep["record"]["trials"][1]["name"]
    (out / victim / "run_summary.json").unlink()   # interrupted during this trial
    train = Spy(run_module.train)
    monkeypatch.setattr(run_module, "train", train)
    assert main(*FAST, *GRID, "--output-dir", str(out), "--resume") == 0
    assert train.calls == [victim]
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["trials"]) == 4 and record["complete"]
    assert ranked_ok(record["trials"])
    status = {t["name"]: t["status"] for t in record["trials"]}
    assert status.pop(victim) == "ok"
    assert set(status.values()) == {"skipped-finished"}


def test_a_failing_trial_is_ranked_last_and_the_sweep_goes_on(tmp_path, capsys):
    # max_length 16 is shorter than every sample: that trial fails before loading a model.
    # No --auto here: the other trial trains with the profile's plan, skipping a dry run.
    out = tmp_path / "sweep"
    code = main(*[a for a in FAST if a != "--auto"], "--sweep", "data.max_length=16,2048", "--output-dir", str(out), "--json")
    captured = capsys.readouterr()
    assert code == 0
    record = json.loads(captured.out)   # --json: stdout holds only the sweep object
    assert record == json.loads((out / "sweep.json").read_text())
    first, last = record["trials"]
    assert (first["name"], first["status"]) == ("max_length=2048", "ok")
    assert (last["name"], last["status"]) == ("max_length=16", "failed")
    assert "longer than max_length 16" in last["error"] and last["eval_loss"] is None
    assert record["best"]["name"] == "max_length=2048"
    assert "failed" in captured.err


# ---------------------------------------------------------- usage errors ---

@pytest.mark.parametrize("argv, words", [
    (["--sweep", "lora.r"], "gives no values"),
    (["--sweep", "lora.r="], "gives no values"),
    (["--sweep", "lora.rnak=1,2"], "did you mean `lora.r`"),
    (["--sweep", "lora.r=0,8"], "greater than 0"),
    (["--sweep", "lora.r=8,,16"], "empty value"),
    (["--sweep", "lora.r=8", "--sweep", "lora.r=16"], "given twice"),
    (["--sweep", "=8,16"], "names no key"),
    (["--sweep", "lora.r=8,8"], "twice"),
    (["--sweep", "lora.r=8,16", "--dry-run"], "--dry-run"),
    (["--sweep", "lora.r=8,16", "--check-data"], "--check-data"),
    (["--sweep", "training.bf16=true,false", "--set", "training.fp16=true"], "both true"),
    (["--sweep", "lora.r=8,16", "--data", "no/such/folder"], "does not exist"),
])
def test_usage_errors_exit_2_with_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, argv, words):
    def no_training(*a, **k):
        raise AssertionError("must fail before any trial runs")

    monkeypatch.setattr(run_module, "dry_run", no_training)
    monkeypatch.setattr(run_module, "train", no_training)
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        run_main(lambda a: main(*a), [*FAST, *argv, "--output-dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert not out.exists()


def test_an_existing_folder_that_is_no_sweep_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        run_main(lambda a: main(*a), [*FAST, *GRID, "--output-dir", str(out)])
    assert exc.value.code == 2 and "already holds files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main(lambda a: main(*a), [*FAST, *GRID, "--output-dir", str(out), "--resume"])
    assert "holds no sweep" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


# ------------------------------------------ bookkeeping with a fake run() ---

def fake_run(outcomes: dict[str, object], calls: list[str]):
    """A stand-in for `autotune.run.run`: per trial name, a loss pair to write, or an exception to raise."""
    real = run_module.run

    def run(args, *, plan_cache=None):
        if args.sweep:   # train.main -> the real driver -> the sweep -> this fake per trial
            return real(args, plan_cache=plan_cache)
        folder = Path(args.output_dir)
        calls.append(folder.name)
        assert args.sweep == [] and args.overwrite and not args.resume and plan_cache is not None
        outcome = outcomes[folder.name]
        if isinstance(outcome, BaseException):
            raise outcome
        folder.mkdir(parents=True, exist_ok=True)
        train_loss, eval_loss = outcome
        (folder / "run_summary.json").write_text(json.dumps({
            "final_train_loss": train_loss, "final_eval_loss": eval_loss, "best_eval_loss": eval_loss,
            "tokens_per_second": 100.0, "peak_gpu_bytes": 2**30, "wall_seconds": 1.0, "plan": {}}))
        return 0

    return run


def test_nan_crash_and_no_plan_are_failures_ranked_last(tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    monkeypatch.setattr(run_module, "run", fake_run({
        "r=1": (2.0, 1.5), "r=2": (1.0, None), "r=3": (math.nan, 0.5),
        "r=4": AutotuneError("no plan fits in 8 GiB"), "r=5": RuntimeError("boom"), "r=6": (3.0, 1.2)}, calls))
    out = tmp_path / "sweep"
    assert main(*FAST, "--sweep", "lora.r=1,2,3,4,5,6", "--output-dir", str(out)) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [t["name"] for t in record["trials"]] == ["r=6", "r=1", "r=2", "r=3", "r=4", "r=5"]
    by_name = {t["name"]: t for t in record["trials"]}
    assert by_name["r=3"]["status"] == "failed" and "nan" in by_name["r=3"]["error"]
    assert by_name["r=4"]["error"] == "no plan fits in 8 GiB"
    assert by_name["r=5"]["error"] == "RuntimeError: boom"
    assert by_name["r=2"]["status"] == "ok" and by_name["r=2"]["eval_loss"] is None   # no eval: after those with one
    assert record["best"]["name"] == "r=6" and record["best_sets"] == "--set lora.r=6"
    assert by_name["r=6"]["peak_gpu_bytes"] == 2**30
    assert "--set lora.r=6" in capsys.readouterr().out


def test_every_trial_failing_exits_1(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(run_module, "run", fake_run({"r=1": AutotuneError("x"), "r=2": AutotuneError("y")}, calls))
    out = tmp_path / "sweep"
    assert main(*FAST, "--sweep", "lora.r=1,2", "--output-dir", str(out)) == 1
    record = json.loads((out / "sweep.json").read_text())
    assert record["best"] is None and [t["status"] for t in record["trials"]] == ["failed", "failed"]


def test_ctrl_c_saves_what_is_done_and_resume_finishes(tmp_path, monkeypatch):
    calls: list[str] = []
    outcomes = {"r=1": (1.0, 1.0), "r=2": KeyboardInterrupt(), "r=3": (1.0, 0.5)}
    monkeypatch.setattr(run_module, "run", fake_run(outcomes, calls))
    out = tmp_path / "sweep"
    argv = [*FAST, "--sweep", "lora.r=1,2,3", "--output-dir", str(out)]
    with pytest.raises(KeyboardInterrupt):
        main(*argv)
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] is False
    assert [t["name"] for t in record["trials"]] == ["r=1"] and record["pending"] == ["r=2", "r=3"]
    outcomes["r=2"] = (1.0, 0.7)
    calls.clear()
    assert main(*argv, "--resume") == 0
    assert calls == ["r=2", "r=3"]
    record = json.loads((out / "sweep.json").read_text())
    assert [(t["name"], t["status"]) for t in record["trials"]] == [
        ("r=3", "ok"), ("r=2", "ok"), ("r=1", "skipped-finished")]


def test_resume_with_other_flags_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "run", fake_run({"r=1": (1.0, 1.0)}, []))
    out = tmp_path / "sweep"
    assert main(*FAST, "--sweep", "lora.r=1", "--output-dir", str(out)) == 0
    with pytest.raises(SystemExit) as exc:
        run_main(lambda a: main(*a), [*FAST, "--set", "training.max_steps=9", "--sweep", "lora.r=1",
                                      "--output-dir", str(out), "--resume"])
    assert exc.value.code == 2 and "training.max_steps" in capsys.readouterr().err


def test_names_and_set_lines_round_trip():
    from autotune.config import parse_set
    from autotune.sweep import build_grid, parse_sweeps, set_line

    axes = parse_sweeps(["training.learning_rate=1e-5,5e-5,1e-4", "lora.target_modules=[q_proj,v_proj],[q_proj,k_proj]",
                         "training.lr_scheduler_type=cosine,'linear'"])
    assert axes[0].values == [1e-5, 5e-5, 1e-4]
    assert axes[1].values == [["q_proj", "v_proj"], ["q_proj", "k_proj"]]
    trials = build_grid(axes)
    assert len(trials) == 12
    assert trials[0].name == "lr=1e-05_targets=q_proj+v_proj_sched=cosine"
    for trial in trials:
        assert "/" not in trial.name
        assert {k: v for k, v in (parse_set(s) for s in trial.sets)} == trial.settings
    assert set_line(trials[0]) == ("--set training.learning_rate=1e-05 --set 'lora.target_modules=[\"q_proj\",\"v_proj\"]' "
                                   "--set training.lr_scheduler_type=cosine")


def test_a_trial_stopped_by_a_signal_is_not_finished(tmp_path):
    from autotune.sweep import _finished

    done, stopped = tmp_path / "done.json", tmp_path / "stopped.json"
    done.write_text(json.dumps({"interrupted": None, "final_eval_loss": 1.0}))
    stopped.write_text(json.dumps({"interrupted": "SIGINT"}))
    assert _finished(done) and not _finished(stopped) and not _finished(tmp_path / "missing.json")
