"""End to end on the CPU with the tiny model: real transformers, PEFT and Trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autotune.errors import AutotuneError
from tests.tiny_runs import DATA, ROOT, TINY

FAST = ["--data", str(DATA), *TINY,
        "--set", "training.logging_steps=1", "--set", "training.learning_rate=5e-3"]


def train(*extra: str) -> int:
    from train import main

    return main([*FAST, *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code = train("--output-dir", str(out), "--set", "training.max_steps=6", "--set", "training.eval_steps=2",
                 "--set", "training.save_steps=2", "--set", "training.use_early_stopping=false")
    assert code == 0
    return out


def test_outputs_of_a_finished_run(finished_run: Path):
    out = finished_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "resolved_config.yaml", "run_summary.json",
                 "report.html", "split.json", "run_config.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents.*")), "TensorBoard events"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["profile"]["name"] == "cpu"
    assert summary["plan"]["effective_batch_size"] == 4
    assert summary["final_train_loss"] > 0 and summary["final_eval_loss"] > 0
    assert summary["tokens_per_second"] > 0
    assert summary["wall_seconds"] > 0
    # A mark at the start and at each log; too short a run for a steady figure past 10 steps.
    marks = summary["throughput_marks"]
    assert [m[0] for m in marks][0] == 0 and marks[-1][0] == 6
    assert all(a[1] <= b[1] and a[2] < b[2] for a, b in zip(marks, marks[1:]))
    assert summary["steady_tokens_per_second"] is None and summary["steady_timed_steps"] == 0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [2, 4, 6]


def test_adapter_loads_with_peft_onto_the_tiny_base(finished_run: Path):
    from peft import PeftModel

    from autotune.llasa import build_tiny_model

    model = PeftModel.from_pretrained(build_tiny_model(), str(finished_run))
    lora = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora
    from safetensors.torch import load_file

    saved = load_file(str(finished_run / "adapter_model.safetensors"))
    key = next(k for k in saved if "lora_B" in k)
    assert saved[key].abs().sum() > 0  # it trained


def test_early_stopping_stops(tmp_path: Path):
    out = tmp_path / "out"
    # A threshold no improvement can reach: every evaluation counts as "no better".
    assert train("--output-dir", str(out), "--set", "training.max_steps=40", "--set", "training.eval_steps=2",
                 "--set", "training.save_steps=2", "--set", "training.early_stopping_threshold=100",
                 "--set", "training.early_stopping_patience=2") == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["stopped_early_at"] is not None
    assert summary["steps"] < 40


def test_resume_continues_the_step_count(tmp_path: Path, capsys):
    out = tmp_path / "out"
    common = ["--output-dir", str(out), "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
              "--set", "training.use_early_stopping=false"]
    assert train(*common, "--set", "training.max_steps=4") == 0
    with pytest.raises(AutotuneError, match="already holds a single run"):
        train(*common, "--set", "training.max_steps=8")
    # Training longer changes the run (its schedule): refused unless asked for, then recorded.
    with pytest.raises(AutotuneError, match=r"`training.max_steps` 4 -> 8.*--allow-changes"):
        train(*common, "--set", "training.max_steps=8", "--resume")
    assert train(*common, "--set", "training.max_steps=8", "--resume", "--allow-changes") == 0
    assert "resuming from" in capsys.readouterr().out
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["resume_changes"] == [{"key": "training.max_steps", "before": 4, "after": 8}]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps[0] <= 1 and steps[-1] == 8 and 5 in steps


@pytest.mark.slow
def test_oom_mid_training_recovers_from_the_newest_checkpoint(tmp_path: Path, monkeypatch, capsys):
    from autotune.training import trainer as T

    real_step = T.LlasaTrainer.training_step
    raised = []

    def flaky(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 4 and self.micro_batch_size == 2 and not raised:
            raised.append(self.state.global_step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(T.LlasaTrainer, "training_step", flaky)
    out = tmp_path / "out"
    assert train("--output-dir", str(out), "--set", "training.max_steps=6", "--set", "training.eval_steps=2",
                 "--set", "training.save_steps=2", "--set", "training.use_early_stopping=false") == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert raised == [4]
    [recovery] = summary["oom_recoveries"]
    assert recovery["resumed_from"].endswith("checkpoint-4")
    assert recovery["plan"]["settings"]["training.per_device_train_batch_size"] == 1
    assert recovery["plan"]["effective_batch_size"] == summary["plan"]["effective_batch_size"] == 4
    assert summary["steps"] == 6
    assert "out of memory during training" in capsys.readouterr().out
    # run_config.yaml follows the step-down: a run killed after it resumes with batch 1, not 2
    import yaml

    started = yaml.safe_load((out / "run_config.yaml").read_text())["training"]
    assert (started["per_device_train_batch_size"], started["gradient_accumulation_steps"]) == (1, 4)


@pytest.mark.slow
def test_a_plan_file_trains_without_a_dry_run_and_can_still_step_down(tmp_path: Path, monkeypatch, capsys):
    """`--plan` (what a sweep on several GPUs gives its trials) trains with a measured plan;
    unlike the same values given as `--set`, they are not pinned, so an OOM steps down."""
    from autotune.training import trainer as T

    dry = tmp_path / "dry"
    assert train("--output-dir", str(dry), "--auto", "--dry-run") == 0
    plan = json.loads((dry / "autotune.json").read_text())["plan"]
    batch = plan["settings"]["training.per_device_train_batch_size"]
    assert batch > 1  # room to step down

    real_step = T.LlasaTrainer.training_step
    raised = []

    def flaky(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 2 and self.micro_batch_size == batch and not raised:
            raised.append(self.state.global_step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(T.LlasaTrainer, "training_step", flaky)
    common = ["--set", "training.max_steps=4", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
              "--set", "training.use_early_stopping=false"]
    out = tmp_path / "out"
    assert train("--output-dir", str(out), "--plan", str(dry / "autotune.json"), *common) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["dry_run"] is None and summary["plan_from"] == str(dry / "autotune.json")
    assert not (out / "autotune.json").exists()
    [recovery] = summary["oom_recoveries"]
    assert recovery["plan"]["settings"]["training.per_device_train_batch_size"] < batch
    assert recovery["plan"]["effective_batch_size"] == plan["effective_batch_size"]
    assert summary["steps"] == 4
    assert f"plan from {dry / 'autotune.json'}" in capsys.readouterr().out

    # The same values pinned with --set (as the sweep used to pass them) leave the ladder nowhere to go.
    raised.clear()
    values = plan["settings"]
    pinned = [f"{key}={json.dumps(values[key])}" for key in (
        "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
        "training.gradient_checkpointing", "training.lean_loss", "data.max_length")]
    with pytest.raises(AutotuneError, match="no recovery is left"):
        train("--output-dir", str(tmp_path / "pinned"), *common, *[a for s in pinned for a in ("--set", s)])


@pytest.mark.slow
def test_a_run_config_yaml_is_a_plan_too(tmp_path: Path, capsys):
    """What a sweep resumes a killed trial with: the config the run trained with."""
    first = tmp_path / "first"
    assert train("--output-dir", str(first), "--set", "training.max_steps=1", "--set", "training.eval_steps=1",
                 "--set", "training.per_device_train_batch_size=1", "--set", "training.gradient_accumulation_steps=4") == 0
    capsys.readouterr()
    out = tmp_path / "second"
    assert train("--output-dir", str(out), "--plan", str(first / "run_config.yaml"),
                 "--set", "training.max_steps=1", "--set", "training.eval_steps=1") == 0
    plan = json.loads((out / "run_summary.json").read_text())["plan"]
    assert (plan["settings"]["training.per_device_train_batch_size"],
            plan["settings"]["training.gradient_accumulation_steps"]) == (1, 4)
    (tmp_path / "broken.yaml").write_text("training: {max_steps: abc}\n")
    with pytest.raises(AutotuneError, match="holds no valid run config"):
        train("--output-dir", str(tmp_path / "third"), "--plan", str(tmp_path / "broken.yaml"))


@pytest.mark.slow
def test_a_plan_in_the_output_folder_survives_overwrite(tmp_path: Path):
    """Dry-run into a folder, then train there with its plan: `--overwrite` clears the
    folder, so the plan must have been read first."""
    out = tmp_path / "run"
    assert train("--output-dir", str(out), "--auto", "--dry-run") == 0
    plan = json.loads((out / "autotune.json").read_text())["plan"]
    assert train("--output-dir", str(out), "--plan", str(out / "autotune.json"), "--overwrite",
                 "--set", "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2") == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["plan"] == plan and summary["steps"] == 2


@pytest.mark.parametrize("extra, make, words", [
    (["--auto"], None, "drop one of them"),
    ([], "missing", "cannot read"),
    ([], "not json", "is not JSON"),
    ([], '{"plan": {"per_device_train_batch_size": 2}}', "holds no valid dry-run plan"),
    pytest.param(["--set", "lora.r=4"], "dry", "`lora.r` is set to 4", marks=pytest.mark.slow),
    pytest.param([], 'training.bf16="maybe"', "holds no valid dry-run plan", marks=pytest.mark.slow),
    pytest.param([], "lora.target_modules=[]", "holds no valid dry-run plan", marks=pytest.mark.slow),
    pytest.param([], "training.per_device_train_batch_size=0", "holds no valid dry-run plan", marks=pytest.mark.slow),
    pytest.param([], "processes=2", "measured for 2 process(es)", marks=pytest.mark.slow),
    pytest.param([], "training.bf16=true", "measured on other hardware (bf16, and this machine runs fp32)", marks=pytest.mark.slow),
    pytest.param([], '"training.optim"="adamw_8bit"', "measured on other hardware (adamw_8bit, which cannot run here)", marks=pytest.mark.slow),
    pytest.param(["--set", "training.lean_loss_chunk_size=4096"], "dry",
                 "measured with `training.lean_loss_chunk_size` 1024 and this run has 4096", marks=pytest.mark.slow),
    pytest.param(["--set", "data.packing=true"], "dry", "`data.packing` is set to True but", marks=pytest.mark.slow),
])
def test_bad_plan_files_are_one_line_errors(tmp_path: Path, capsys, extra, make, words):
    from train import main

    path = tmp_path / "autotune.json"
    if make == "dry" or "=" in (make or "") and not make.startswith("{"):
        assert train("--output-dir", str(tmp_path / "dry"), "--auto", "--dry-run") == 0
        path = tmp_path / "dry" / "autotune.json"
        if make != "dry":   # one value of a real plan changed: a dotted key of its settings, or `processes`
            key, value = make.split("=", 1)
            key = key.strip('"')
            record = json.loads(path.read_text())
            (record["plan"]["settings"] if "." in key else record["plan"])[key] = json.loads(value)
            path.write_text(json.dumps(record))
    elif make not in (None, "missing"):
        path.write_text(make)
    elif make is None:
        path.write_text("{}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        from autotune.cli import run_main

        run_main(main, [*FAST, "--output-dir", str(tmp_path / "out"), "--plan", str(path), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


@pytest.mark.slow
def test_the_lean_loss_chunk_size_reaches_the_dry_run_and_the_trainer(tmp_path: Path, monkeypatch):
    import autotune.loss as loss_module
    from autotune.config import resolve_config
    from autotune.tuning.plan import Plan
    from autotune.tuning.plan import memory_shape

    seen = []
    real = loss_module.compute_lean_loss

    def spy(model, inputs, **kwargs):
        seen.append(kwargs.get("chunk_size"))
        return real(model, inputs, **kwargs)

    monkeypatch.setattr(loss_module, "compute_lean_loss", spy)
    assert train("--output-dir", str(tmp_path / "out"), "--auto", "--set", "training.lean_loss_chunk_size=7",
                 "--set", "training.max_steps=1", "--set", "training.eval_steps=1") == 0
    assert seen and set(seen) == {7}   # dry-run steps, training steps and evaluation alike
    # a sweep over the chunk size is not one memory shape
    a, b = (resolve_config(None, None, [f"training.lean_loss_chunk_size={n}"]).config for n in (512, 1024))
    assert memory_shape(Plan.from_config(a), a) != memory_shape(Plan.from_config(b), b)


def test_errors_that_are_not_oom_are_not_recovered(tmp_path: Path, monkeypatch):
    from autotune.training import trainer as T

    def broken(self, model, inputs, num_items_in_batch=None):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(T.LlasaTrainer, "training_step", broken)
    with pytest.raises(RuntimeError, match="device-side assert"):
        train("--output-dir", str(tmp_path / "out"), "--set", "training.max_steps=2")


def test_dry_run_on_cpu_runs_a_real_step_and_reports(tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert train("--output-dir", str(out), "--dry-run", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["plan"]["effective_batch_size"] == 4
    assert record["plan"]["settings"]["training.per_device_train_batch_size"] == 2
    [attempt] = record["attempts"]
    assert attempt["ok"] and attempt["tokens_per_second"] > 0 and attempt["peak_bytes"] is None
    assert record["seconds"] > 0
    assert json.loads((out / "autotune.json").read_text())["plan"] == record["plan"]
    assert not (out / "adapter_model.safetensors").exists()


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere"], "data path `nowhere` does not exist"),
    pytest.param(["--data", str(DATA), "--model", "/no/such/model", "--output-dir", "{tmp}/o"], "cannot load the model `/no/such/model`", marks=pytest.mark.slow),
    (["--data", str(DATA), "--model", "tiny", "--set", "lora.rnak=4", "--output-dir", "{tmp}/o"], "did you mean `lora.r`"),
    pytest.param(["--data", str(DATA), "--model", "tiny", "--output-dir", "/proc/forbidden"], "cannot write to `/proc/forbidden`", marks=pytest.mark.slow),
    (["--data", str(DATA), "--model", "tiny", "--output-dir", "{tmp}/full"], "already holds files"),
    pytest.param(["--data", str(DATA), "--model", "tiny", "--set", "lora.target_modules=[nope]", "--output-dir",
                  "{tmp}/o"], "`lora.target_modules` names nope", marks=pytest.mark.slow),
    pytest.param(["--data", str(DATA), "--model", "tiny", "--resume", "{tmp}/none", "--output-dir", "{tmp}/o"], "is not a complete checkpoint", marks=pytest.mark.slow),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args, message):
    """One error line; a list of problems follows it, one problem per line."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("x")
    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: "), result.stderr
    assert all(line.startswith("  - ") for line in lines[1:]), result.stderr
    assert any(message in line for line in lines)
    assert "Traceback" not in result.stderr


def test_resume_with_a_different_lora_shape_is_one_clear_error(tmp_path: Path):
    out = tmp_path / "out"
    common = ["--output-dir", str(out), "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
              "--set", "training.max_steps=2"]
    assert train(*common) == 0
    with pytest.raises(AutotuneError, match=r"`lora.r` 8 -> 4"):
        train(*common, "--set", "lora.r=4", "--resume")


def test_oom_recovery_never_changes_what_a_checkpoint_fixes(tmp_path: Path, monkeypatch):
    """With batch, checkpointing and lean loss pinned, the next rungs (8-bit optimizer,
    smaller rank) would not load the checkpoint's state: recovery must stop instead."""
    from autotune.training import trainer as T

    real_step = T.LlasaTrainer.training_step

    def flaky(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(T.LlasaTrainer, "training_step", flaky)
    with pytest.raises(AutotuneError, match="out of memory during training"):
        train("--output-dir", str(tmp_path / "out"), "--set", "training.max_steps=4", "--set", "training.eval_steps=2",
              "--set", "training.save_steps=2", "--set", "training.per_device_train_batch_size=2",
              "--set", "training.gradient_checkpointing=false", "--set", "training.lean_loss=true",
              "--set", "data.max_length=4096")
    assert (tmp_path / "out" / "checkpoint-2").is_dir()  # the work so far is kept
