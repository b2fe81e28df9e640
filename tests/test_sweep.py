"""`train.py --sweep`: a grid of real tiny runs on the CPU, in-process.

One 2x2 sweep (learning rate x LoRA rank) is trained once for the module; the
resume and failure tests train one more trial each. Ranking, NaN, crash and
Ctrl-C bookkeeping use a fake `autotune.pipeline.run` and cost nothing.

Several GPUs: `autotune.sweep.pool.visible_gpus` answers two fake H100s (from the
real fingerprints), so the sweep runs its trials as `train.py` children two at
a time; on the CPU they simply train on the CPU. One real 2x2 sweep is trained
that way for the module (two dry runs, four trials), and one trial each for
resume and failure; signals and crashes use a fake `train.py` that costs nothing.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import autotune.pipeline as run_module  # noqa: E402
from autotune.cli import run_main  # noqa: E402
from autotune.training import trainer as T  # noqa: E402
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


@pytest.fixture(scope="module", autouse=True)
def one_gpu_at_most():
    """The in-process tests stay in-process on a machine with several GPUs: the sweep spreads
    trials over GPUs only where a test says it sees two (`two_gpus`, `parallel_sweep`)."""
    import autotune.sweep.pool

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune.sweep.pool, "visible_gpus", lambda: [])
        yield


class Spy:
    """Counts calls of a function in `autotune.pipeline` and passes them through."""

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
    assert {plans[n]["settings"]["lora.r"] for n in NAMES} == {2, 4}


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
    assert set(status.values()) == {"ok"}, "a resumed sweep keeps each finished trial's real status"
    assert {t["name"] for t in record["trials"] if t["earlier"]} == set(status)


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
    (["--sweep", "lora.r=8,16", "--plan", "autotune.json"], "drop `--plan`"),
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
    assert "holds no run of this tool" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


# ------------------------------------------ bookkeeping with a fake run() ---

def fake_run(outcomes: dict[str, object], calls: list[str]):
    """A stand-in for `autotune.pipeline.run`: per trial name, a loss pair to write, or an exception to raise."""

    def run(args, *, plan_cache=None):
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        ("r=3", "ok"), ("r=2", "ok"), ("r=1", "ok")]


def two_trials(out: Path) -> list[str]:
    """A real two-trial sweep (lora.r=2,4) of four steps, a checkpoint every two."""
    return [*FAST, "--sweep", "lora.r=2,4", "--output-dir", str(out), "--set", "training.max_steps=4",
            "--set", "training.save_steps=2", "--set", "training.eval_steps=2"]


def in_trial_r4(action):
    """LlasaTrainer.training_step that first calls `action(global_step)` in trial r=4."""
    real_step = T.LlasaTrainer.training_step

    def step(self, model, inputs, num_items_in_batch=None):
        if self.run_dir.name == "r=4":   # args.output_dir is the run's staging folder
            action(self.state.global_step)
        return real_step(self, model, inputs, num_items_in_batch)

    return step


@pytest.mark.slow
def test_resume_continues_a_stopped_trial_from_its_checkpoint(tmp_path, capsys):
    """A real Ctrl-C in the second trial: it saves a checkpoint and the sweep stops;
    `--resume` continues that trial from the checkpoint instead of starting it over."""
    interrupted = []

    def ctrl_c_at_step_2(step: int) -> None:
        if step == 2 and not interrupted:
            interrupted.append(step)
            os.kill(os.getpid(), signal.SIGINT)   # the handler lets this step finish, then saves

    out, argv = tmp_path / "sweep", two_trials(tmp_path / "sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T.LlasaTrainer, "training_step", in_trial_r4(ctrl_c_at_step_2))
        with pytest.raises(KeyboardInterrupt):
            main(*argv)
    assert interrupted and (out / "r=4" / "checkpoint-3").is_dir()
    record = json.loads((out / "sweep.json").read_text())
    assert record["pending"] == ["r=4"]
    capsys.readouterr()

    def no_dry_run(*a, **k):
        # A new dry run could pick a rank or optimizer its checkpoint cannot load.
        raise AssertionError("a resumed trial continues with its own plan")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "dry_run", no_dry_run)
        assert main(*argv, "--resume") == 0
    squeezed = "".join(capsys.readouterr().out.split())   # rich wraps long paths anywhere
    assert f"resumingfrom{out / 'r=4' / 'checkpoint-3'}" in squeezed
    assert f"planfrom{out / 'r=4' / 'run_summary.json'}" in squeezed
    record = json.loads((out / "sweep.json").read_text())
    assert {t["name"]: t["status"] for t in record["trials"]} == {"r=2": "ok", "r=4": "ok"}
    assert json.loads((out / "r=4" / "run_summary.json").read_text())["steps"] == 4
    state = json.loads((out / "r=4" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert logged[:3] == [1, 2, 3] and logged[-1] == 4   # the first steps' history came from the checkpoint


@pytest.mark.slow
def test_resume_starts_a_failed_trial_over(tmp_path, capsys):
    """A trial that failed (not one that was stopped) would fail the same way from its
    checkpoint: `--resume` starts it over."""
    def crash_at_step_3(step: int) -> None:
        if step == 3:
            raise RuntimeError("boom")

    out, argv = tmp_path / "sweep", two_trials(tmp_path / "sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T.LlasaTrainer, "training_step", in_trial_r4(crash_at_step_3))
        assert main(*argv) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert {t["name"]: t["status"] for t in record["trials"]} == {"r=2": "ok", "r=4": "failed"}
    assert (out / "r=4" / "checkpoint-2").is_dir() and record["pending"] == []
    assert json.loads((out / "r=4" / "failed.json").read_text())["error"] == "RuntimeError: boom"
    # A --resume stopped before it reaches the failed trial leaves it listed as pending;
    # its own failed.json still says it failed.
    record["pending"] = ["r=4"]
    (out / "sweep.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(*argv, "--resume") == 0
    assert "resumingfrom" not in "".join(capsys.readouterr().out.split())
    record = json.loads((out / "sweep.json").read_text())
    assert {t["name"]: t["status"] for t in record["trials"]} == {"r=2": "ok", "r=4": "ok"}
    state = json.loads((out / "r=4" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert not (out / "r=4" / "failed.json").exists()   # gone with the old attempt


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
    from autotune.sweep.grid import build_grid, parse_sweeps, set_line

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
    from autotune.rundir import RUN_SUMMARY, finished_run

    done, stopped, missing = tmp_path / "done", tmp_path / "stopped", tmp_path / "missing"
    for folder in (done, stopped, missing):
        folder.mkdir()
    (done / RUN_SUMMARY).write_text(json.dumps({"interrupted": None, "final_eval_loss": 1.0}))
    (stopped / RUN_SUMMARY).write_text(json.dumps({"interrupted": "SIGINT"}))
    assert finished_run(done) and finished_run(stopped) is None and finished_run(missing) is None


# ------------------------------------------- several GPUs: one trial per GPU ---

import autotune.sweep.pool as sweep_module  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
PARALLEL = [a.replace("=3", "=2") if a.startswith("training.") and a.endswith("_steps=3") else a for a in FAST]


def fake_gpus(*names: str):
    """GpuInfo of fake cards, read by the real probe through the fake NVML."""
    from autotune.hardware import probe
    from tests.fake_nvml import FakeNvml, fixture_gpu

    return probe(env={}, nvml=FakeNvml([fixture_gpu(n, i) for i, n in enumerate(names)])).gpus


@pytest.fixture
def two_gpus(monkeypatch):
    gpus = fake_gpus(H100, H100)
    monkeypatch.setattr(sweep_module, "visible_gpus", lambda: gpus)
    return gpus


def intervals(record: dict) -> list[tuple[float, float, str, str]]:
    """(start, end, gpu, what) of every child: the dry runs and the trials."""
    spans = [(d["started_at"], d["finished_at"], d["gpu"], d["dry_run"]) for d in record["dry_runs"]
             if d["started_at"] is not None]
    return spans + [(t["started_at"], t["finished_at"], t["gpu"], t["name"]) for t in record["trials"]
                    if t["started_at"] is not None]


def most_at_once(spans) -> int:
    events = sorted([(s, 1) for s, *_ in spans] + [(e, -1) for _, e, *_ in spans], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "sweep"
    gpus = fake_gpus(H100, H100)
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_module, "visible_gpus", lambda: gpus)
        started = time.time()
        with redirect_stdout(buffer):
            code = main(*PARALLEL, *GRID, "--output-dir", str(out))
    return {"out": out, "code": code, "text": buffer.getvalue(), "gpus": [g.uuid for g in gpus],
            "seconds": time.time() - started, "record": json.loads((out / "sweep.json").read_text())}


@pytest.mark.slow
def test_parallel_trials_run_one_per_gpu_two_at_a_time(parallel_sweep):
    record, out = parallel_sweep["record"], parallel_sweep["out"]
    assert parallel_sweep["code"] == 0 and record["complete"] and record["pending"] == []
    assert {t["name"] for t in record["trials"]} == NAMES
    assert all(t["status"] == "ok" for t in record["trials"]) and ranked_ok(record["trials"])
    assert record["gpus"] == parallel_sweep["gpus"]
    spans = intervals(record)
    assert len(spans) == 6 and all(s < e for s, e, *_ in spans)
    assert most_at_once(spans) == 2                    # never three at once, and two did overlap
    for i, (s1, e1, gpu1, what1) in enumerate(spans):
        assert gpu1 in parallel_sweep["gpus"]
        for s2, e2, gpu2, what2 in spans[i + 1:]:
            if s1 < e2 and s2 < e1:
                assert gpu1 != gpu2, f"{what1} and {what2} ran at once on {gpu1}"
    for t in record["trials"]:
        folder = out / t["name"]
        assert json.loads((folder / "run_summary.json").read_text())["steps"] == 2
        header = (folder / "console.log").read_text().splitlines()[0]
        assert header.startswith(f"# CUDA_VISIBLE_DEVICES={t['gpu']} ") and "-m autotune.commands.train " in header
    assert not (out / ".logs").exists()
    text = parallel_sweep["text"]
    assert "2 at a time" in text and "--set training.learning_rate=" in text
    assert sum("started" in line for line in text.splitlines()) == 6
    assert sum("finished in" in line for line in text.splitlines()) == 4
    assert record["best_sets"] in text.splitlines()


@pytest.mark.slow
def test_parallel_dry_runs_once_per_memory_shape_and_trains_with_its_plan(parallel_sweep):
    record, out = parallel_sweep["record"], parallel_sweep["out"]
    dry = record["dry_runs"]
    assert len(dry) == 2 and [d["status"] for d in dry] == ["ok", "ok"]
    assert sorted(p.parent.name for p in (out / ".dry-runs").glob("*/autotune.json")) == ["1", "2"]
    assert not list(out.glob("*/autotune.json"))       # the trials dry-ran nothing
    by_r = {d["plan"]["settings"]["lora.r"]: d for d in dry}
    assert set(by_r) == {2, 4}
    for t in record["trials"]:
        r = t["settings"]["lora.r"]
        assert t["dry_run"] == by_r[r]["dry_run"] and t["name"] in by_r[r]["trials"]
        micro = "training.per_device_train_batch_size"
        assert t["plan"]["settings"]["lora.r"] == r
        assert t["plan"]["settings"][micro] == by_r[r]["plan"]["settings"][micro]
        log = (out / t["name"] / "console.log").read_text()
        header = log.splitlines()[0]
        assert " --auto" not in header and " --dry-run" not in header
        # The plan goes as `--plan`, not as pinned `--set` values, so an OOM mid-trial can still step down.
        shape_record = out / by_r[r]["dry_run"] / "shape.json"
        assert f"--set=lora.r={r}" in header and "--set=training.lean_loss=" not in header
        assert f"--plan={shape_record}" in header
        assert json.loads((out / t["name"] / "run_summary.json").read_text())["plan_from"] == str(shape_record)
        assert "Dry run" not in log


@pytest.mark.slow
@pytest.mark.parametrize("began_training", [False, True])
def test_parallel_resume_runs_only_the_unfinished_trial(parallel_sweep, two_gpus, tmp_path, began_training):
    out = tmp_path / "sweep"
    shutil.copytree(parallel_sweep["out"], out, symlinks=True)
    (out / "sweep.json").write_text(json.dumps({**parallel_sweep["record"], "output_dir": str(out)}))
    victim = parallel_sweep["record"]["trials"][1]["name"]
    (out / victim / "run_summary.json").unlink()
    if not began_training:
        (out / victim / "run_config.yaml").unlink()
    assert main(*PARALLEL, *GRID, "--output-dir", str(out), "--resume") == 0
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["trials"]) == 4 and record["complete"] and ranked_ok(record["trials"])
    status = {t["name"]: t["status"] for t in record["trials"]}
    assert status.pop(victim) == "ok" and set(status.values()) == {"ok"}
    ran = [t["name"] for t in record["trials"] if not t["earlier"]]
    assert ran == [victim]
    # the others keep their status and times from the first invocation
    before = {t["name"]: t for t in parallel_sweep["record"]["trials"]}
    assert all(t["started_at"] == before[t["name"]]["started_at"] for t in record["trials"] if t["earlier"])
    assert not list(out.glob("*/autotune.json"))   # nothing dry-ran again
    header = (out / victim / "console.log").read_text().splitlines()[0]
    if began_training:
        # it continues from its checkpoint with the config it trained with; no dry run waits for it
        assert " --resume" in header and f"--plan={out / victim / 'run_config.yaml'}" in header
        assert not any(victim in d["trials"] for d in record["dry_runs"])
    else:
        # it starts over with its memory shape's plan, measured by the first sweep and reused
        assert " --overwrite" in header and "shape.json" in header
        shape = next(d for d in record["dry_runs"] if victim in d["trials"])
        assert shape["status"] == "reused" and shape["started_at"] is None


@pytest.mark.slow
def test_parallel_failing_trial_is_listed_with_its_error(two_gpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(*[a for a in PARALLEL if a != "--auto"], "--sweep", "data.max_length=16,2048",
                "--output-dir", str(out), "--json")
    captured = capsys.readouterr()
    assert code == 0
    record = json.loads(captured.out)
    assert record == json.loads((out / "sweep.json").read_text())
    first, last = record["trials"]
    assert (first["name"], first["status"]) == ("max_length=2048", "ok")
    assert (last["name"], last["status"]) == ("max_length=16", "failed")
    assert "longer than max_length 16" in last["error"] and not last["error"].startswith("error:")
    assert record["dry_runs"] == [] and {first["gpu"], last["gpu"]} <= set(record["gpus"])
    assert "failed" in captured.err and (out / "max_length=16" / "console.log").is_file()


# A stand-in for train.py: no torch, answers in milliseconds. What each trial does is
# keyed by its `lora.r`, read from the file named by FAKE_TRAIN; a dry run (`--dry-run`)
# writes the autotune.json in FAKE_DRY.
FAKE_TRAIN = r'''
import json, os, signal, sys, time
from pathlib import Path

flags = sys.argv[1:]
out = Path(next(f.split("=", 1)[1] for f in flags if f.startswith("--output-dir=")))
r = [f.rsplit("=", 1)[1] for f in flags if f.startswith("--set=lora.r=")][-1]
plan = json.loads(Path(os.environ["FAKE_TRAIN"]).read_text())[r]
out.mkdir(parents=True, exist_ok=True)
(out / "env.json").write_text(json.dumps({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "flags": flags}))
if "--dry-run" in flags:   # the dry run's record, as the test wrote it
    (out / "autotune.json").write_text(os.environ["FAKE_DRY"])
    sys.exit(0)

def stop(signum, frame):
    with open(out / "signals.txt", "a") as f:
        f.write(signal.Signals(signum).name + "\n")
    sys.exit({"SIGINT": 130, "SIGTERM": 143}[signal.Signals(signum).name])

signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
if plan == "wait":
    (out / "started").write_text("")
    time.sleep(30)
    sys.exit(3)
if plan == "crash":
    raise RuntimeError("boom")
if plan == "error":
    print("error: no plan fits in 8 GiB", file=sys.stderr)
    sys.exit(2)
if plan == "stopped":
    sys.exit(130)
if plan.startswith("sleep:"):   # "sleep:SECONDS:LOSS": a trial that takes a while
    _, seconds, plan = plan.split(":")
    time.sleep(float(seconds))
loss = float(plan)
(out / "run_summary.json").write_text(json.dumps({"final_train_loss": loss, "final_eval_loss": loss,
    "best_eval_loss": loss, "tokens_per_second": 1.0, "wall_seconds": 0.1, "plan": {}}))
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch, two_gpus):
    script, plans = tmp_path / "fake_train.py", tmp_path / "plans.json"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setenv("FAKE_TRAIN", str(plans))
    monkeypatch.setattr(sweep_module, "child_command", lambda flags: [sys.executable, str(script), *flags])

    def set_plans(**by_r):
        plans.write_text(json.dumps({k.lstrip("r"): v for k, v in by_r.items()}))

    return set_plans


NO_AUTO = [a for a in FAST if a != "--auto"]


def test_children_get_their_own_gpu_and_crashes_are_reasons(fake_train, two_gpus, tmp_path):
    fake_train(r1="1.0", r2="crash", r3="error", r4="0.5")
    out = tmp_path / "sweep"
    assert main(*NO_AUTO, "--sweep", "lora.r=1,2,3,4", "--output-dir", str(out)) == 0
    record = json.loads((out / "sweep.json").read_text())
    by_name = {t["name"]: t for t in record["trials"]}
    assert [t["name"] for t in record["trials"]] == ["r=4", "r=1", "r=2", "r=3"]
    assert by_name["r=2"]["error"] == "RuntimeError: boom (exit code 1)"
    assert by_name["r=3"]["error"] == "no plan fits in 8 GiB"
    for name, trial in by_name.items():
        env = json.loads((out / name / "env.json").read_text())
        assert env["gpu"] == trial["gpu"] and env["gpu"] in {g.uuid for g in two_gpus}
        assert f"--output-dir={out / name}" in env["flags"] and "--overwrite" in env["flags"]
        assert "--data=" + str(ROOT / "examples" / "tiny") in env["flags"] and "--model=tiny" in env["flags"]
        assert "--auto" not in env["flags"] and "--sweep" not in " ".join(env["flags"])


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "child"])
def test_a_signal_is_passed_to_the_running_children_and_resume_finishes(fake_train, tmp_path, how):
    fake_train(r1="wait", r2="wait" if how != "child" else "stopped", r3="0.5")
    out = tmp_path / "sweep"
    argv = [*NO_AUTO, "--sweep", "lora.r=1,2,3", "--output-dir", str(out)]

    def signal_when_both_started():
        deadline = time.time() + 20
        while time.time() < deadline and not all((out / f"r={r}" / "started").exists() for r in (1, 2)):
            time.sleep(0.05)
        os.kill(os.getpid(), getattr(signal, how))

    if how != "child":
        threading.Thread(target=signal_when_both_started, daemon=True).start()
    expected = SystemExit if how == "SIGTERM" else KeyboardInterrupt
    with pytest.raises(expected) as exc:
        main(*argv)
    if how == "SIGTERM":
        assert exc.value.code == 143
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] is False and record["trials"] == []
    assert record["pending"] == ["r=1", "r=2", "r=3"]      # r=3 never started
    forwarded = "SIGINT" if how == "child" else how
    assert (out / "r=1" / "signals.txt").read_text() == forwarded + "\n"   # once: it may save a checkpoint
    if how != "child":
        assert (out / "r=2" / "signals.txt").read_text() == forwarded + "\n"
    assert not (out / "r=3").exists()
    (out / "r=1" / "run_config.yaml").write_text("{}\n")   # as a trial that began training leaves it
    fake_train(r1="1.0", r2="0.7", r3="0.5")
    assert main(*argv, "--resume") == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [(t["name"], t["status"]) for t in record["trials"]] == [("r=3", "ok"), ("r=2", "ok"), ("r=1", "ok")]
    flags = {r: json.loads((out / f"r={r}" / "env.json").read_text())["flags"] for r in (1, 2)}
    assert "--resume" in flags[1] and "--overwrite" not in flags[1]   # continues from its checkpoint
    assert f"--plan={out / 'r=1' / 'run_config.yaml'}" in flags[1]   # with the config it trained with
    assert "--overwrite" in flags[2] and "--resume" not in flags[2]   # never began training: starts over


def test_child_flags_parse_back_to_the_same_run(tmp_path):
    from autotune.request import build_parser, parse_request
    from autotune.sweep.grid import Trial, trial_args
    from autotune.sweep.children import child_flags

    (tmp_path / "c.yaml").write_text("training: {seed: 1}\n")
    args = parse_request(["--data", "d", "--config", str(tmp_path / "c.yaml"), "--model", "tiny", "--codec", "x",
                                      "--val", "v", "--vram-limit", "7.5", "--trust-remote-code", "--auto", "--json",
                                      "--set", "training.seed=-1", "--set", "lora.target_modules=[q_proj]",
                                      "--sweep", "lora.r=1,2", "--output-dir", "o"])
    trial = Trial(0, "r=1", {"lora.r": 1}, ["lora.r=1"])
    a = trial_args(args, trial, tmp_path)
    back = build_parser().parse_args(child_flags(a))
    for key in ("data", "config", "model", "codec", "val", "vram_limit", "trust_remote_code", "sets"):
        assert getattr(back, key) == getattr(a, key), key
    assert back.sets[-1] == "lora.r=1"
    assert not back.auto and not back.json and back.sweep == [] and back.output_dir is None


def test_which_gpus_a_sweep_spreads_over(monkeypatch):
    from types import SimpleNamespace

    from autotune.sweep.pool import gpus_for_trials

    def ctx(processes=1, auto=False, per_gpu=None):
        return SimpleNamespace(processes=processes, request=SimpleNamespace(auto=auto, trials_per_gpu=per_gpu))

    one = ctx()
    mixed = fake_gpus(H100, "NVIDIA GeForce RTX 4090", H100)
    monkeypatch.setattr(sweep_module, "visible_gpus", lambda: mixed)
    used, left = gpus_for_trials(one)
    assert [g.index for g in used] == [0, 2] and [g.index for g in left] == [1]
    assert gpus_for_trials(ctx(processes=2)) == ([], [])                  # under torchrun: sequential
    assert gpus_for_trials(ctx(processes=2, per_gpu=4)) == ([], [])
    monkeypatch.setattr(sweep_module, "visible_gpus", lambda: fake_gpus(H100))
    assert gpus_for_trials(one) == ([], [])                               # one trial at a time: in this process
    assert gpus_for_trials(ctx(per_gpu=1, auto=True)) == ([], [])
    assert [g.index for g in gpus_for_trials(ctx(per_gpu=2))[0]] == [0]   # two at a time on the one GPU
    assert [g.index for g in gpus_for_trials(ctx(auto=True))[0]] == [0]   # as many as the dry run's peak allows
    monkeypatch.setattr(sweep_module, "visible_gpus", lambda: fake_gpus(H100, "NVIDIA GeForce RTX 4090"))
    assert gpus_for_trials(one) == ([], [])                               # one of a kind: sequential on the first
    assert [g.index for g in gpus_for_trials(ctx(per_gpu=3))[0]] == [0]
    monkeypatch.setattr(sweep_module, "visible_gpus", lambda: [])
    assert gpus_for_trials(ctx(per_gpu=3)) == ([], [])                     # no GPU: in this process


def test_a_trial_is_stopped_when_the_sweep_is_killed(tmp_path):
    """SIGKILL on the sweep cannot be caught; the kernel sends its children SIGTERM instead."""
    if sweep_module.die_with_parent() is None:
        pytest.skip("parent-death signals are Linux only")
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time\n"
        "from autotune.sweep import pool as sweep\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         start_new_session=True, preexec_fn=sweep.die_with_parent())\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT)
    try:
        deadline = time.time() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        os.kill(child_pid, 0)  # running
        parent.kill()
        parent.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                break
            # a zombie until init reaps it still answers kill(0); its state says it ended
            try:
                state = Path(f"/proc/{child_pid}/stat").read_text().split(")")[-1].split()[0]
            except FileNotFoundError:   # reaped in between
                break
            if state == "Z":
                break
            time.sleep(0.05)
        else:
            os.kill(child_pid, signal.SIGKILL)
            pytest.fail("the child outlived the killed sweep")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_pool_starts_the_trainer_through_the_package(tmp_path):
    """Children run `python -m autotune.commands.train`: an installed wheel has no train.py on disk.
    From a folder that is not the checkout, the module still answers `--help`."""
    command = sweep_module.child_command(["--help"])
    assert command[:3] == [sys.executable, "-m", "autotune.commands.train"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--sweep" in done.stdout
