"""Interruption, kills, NaNs and a full disk: real signals, real Trainer, tiny model on the CPU."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autotune import checkpoints as K
from autotune import signals as S
from autotune.training import callbacks as CB
from autotune.training import recovery as RC
from autotune.errors import AutotuneError
from tests.tiny_runs import TINY

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "examples" / "tiny" / "train.jsonl"
# One sample per micro-batch, two per step: 11 training samples make 6 steps an epoch.
FAST = [*TINY, "--set", "training.logging_steps=1",
        "--set", "training.learning_rate=5e-3", "--set", "training.eval_strategy=no", "--set", "training.report_to=none",
        "--set", "training.per_device_train_batch_size=1", "--set", "training.gradient_accumulation_steps=2",
        "--set", "training.use_early_stopping=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    lines = TINY_DATA.read_text(encoding="utf-8").splitlines()[:12]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def args_for(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), *FAST, "--output-dir", str(out), *extra]


def train(argv: list[str]) -> int:
    from train import main

    return main(argv)


def summary_of(out: Path) -> dict:
    return json.loads((out / "run_summary.json").read_text())


def losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


# ----------------------------------------------------- signals, for real ---

@pytest.fixture(scope="module")
def signalled(data, tmp_path_factory) -> dict[str, dict]:
    """Three real `train.py` processes, run side by side: each is signalled once
    its first checkpoint exists (so training is under way), then waited for.

    The second Ctrl-C of "double" goes only once the first one's message is on
    stderr, as a person presses it again after reading that message: two SIGINTs
    sent back to back can both land before the interpreter runs its handler, and
    CPython then calls the handler once for the two."""
    plans = {"sigint": [signal.SIGINT], "sigterm": [signal.SIGTERM], "double": [signal.SIGINT, signal.SIGINT]}
    first_message = "SIGINT: finishing this step"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in plans:
        folder = tmp_path_factory.mktemp(name)
        out = folder / "out"
        argv = args_for(data, out, "--set", "training.max_steps=400", "--set", "training.save_steps=2")
        stdout, stderr = (folder / "stdout").open("w"), (folder / "stderr").open("w")
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                                stdout=stdout, stderr=stderr)
        runs[name] = {"proc": proc, "out": out, "folder": folder, "files": (stdout, stderr), "argv": argv}
    deadline = time.time() + 120
    pending = set(runs)
    sent = dict.fromkeys(runs, 0)   # how many of its signals each run has had
    while pending and time.time() < deadline:
        for name in sorted(pending):
            run, plan = runs[name], plans[name]
            if run["proc"].poll() is not None:
                pending.discard(name)
            elif sent[name] == 0:
                if (run["out"] / "checkpoint-2" / "trainer_state.json").is_file():
                    run["proc"].send_signal(plan[0])
                    sent[name] = 1
            elif first_message in (run["folder"] / "stderr").read_text(errors="replace"):
                run["proc"].send_signal(plan[sent[name]])
                sent[name] += 1
            if sent[name] == len(plan):
                pending.discard(name)
        # Fine polling while a run waits to be asked again: its window is the rest of one step and a save.
        time.sleep(0.005 if any(0 < sent[name] < len(plans[name]) for name in pending) else 0.1)
    for run in runs.values():
        try:
            run["code"] = run["proc"].wait(timeout=max(5.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            run["proc"].kill()
            run["code"] = run["proc"].wait()
        for f in run["files"]:
            f.close()
        run["stdout"] = (run["folder"] / "stdout").read_text()
        run["stderr"] = (run["folder"] / "stderr").read_text()
    return runs


@pytest.mark.slow
def test_sigint_saves_the_step_says_how_to_resume_and_exits_130(signalled, capsys):
    run = signalled["sigint"]
    assert run["code"] == 130, run["stderr"][-2000:]
    assert "Traceback" not in run["stderr"]
    out = run["out"]
    summary = summary_of(out)
    step = summary["steps"]
    assert summary["interrupted"] == "SIGINT" and 2 <= step < 400
    checkpoint = out / f"checkpoint-{step}"
    assert K.checkpoint_problem(checkpoint) is None
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / "adapter_model.safetensors").exists()  # unfinished: the adapter so far is the checkpoint's
    [hint] = [line.strip() for line in run["stdout"].splitlines() if line.strip().startswith("python ")]
    words = shlex.split(hint)
    assert words[:2] == ["python", str(ROOT / "train.py")]
    assert words[-3:] == ["--resume", "--output-dir", str(out)]
    at = run["argv"].index("--output-dir")
    assert words[2:-3] == run["argv"][:at] + run["argv"][at + 2:]  # the same options, exactly

    # The printed command continues the run (two more steps than where it stopped, to stay quick:
    # a changed setting, which --resume accepts only when asked).
    assert train(words[2:] + ["--set", f"training.max_steps={step + 2}", "--allow-changes"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoint}" in " ".join(printed.split())
    summary = summary_of(out)
    assert summary["steps"] == step + 2 and summary["interrupted"] is None
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(signalled):
    run = signalled["sigterm"]
    assert run["code"] == 143, run["stderr"][-2000:]
    assert "Traceback" not in run["stderr"]
    summary = summary_of(run["out"])
    assert summary["interrupted"] == "SIGTERM"
    assert K.checkpoint_problem(run["out"] / f"checkpoint-{summary['steps']}") is None
    assert "--resume --output-dir" in run["stdout"]


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(signalled):
    run = signalled["double"]
    assert run["code"] == 130, run["stderr"][-2000:]
    assert "Traceback" not in run["stderr"]
    assert "SIGINT again: stopping now" in run["stderr"]
    assert not (run["out"] / "run_summary.json").exists()
    # Whatever the abort cut short, --resume still finds a complete checkpoint.
    assert K.scan_checkpoints(run["out"])[0] is not None


# ------------------------------------------------------------ exact resume ---

@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(data, tmp_path, monkeypatch):
    """8 steps straight, against: SIGINT during step 7 (in the second epoch, so the
    data order of a later epoch and the skip into it both matter), then --resume."""
    from autotune.training import trainer as T

    common = ["--set", "training.max_steps=8", "--set", "training.save_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(args_for(data, straight, *common)) == 0

    real_step = T.LlasaTrainer.training_step
    sent = []

    def step_then_interrupt(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 6 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, as a Ctrl-C would
        return real_step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(T.LlasaTrainer, "training_step", step_then_interrupt)
    assert train(args_for(data, split, *common)) == 130
    assert summary_of(split)["steps"] == 7 and (split / "checkpoint-7").is_dir()
    monkeypatch.setattr(T.LlasaTrainer, "training_step", real_step)
    assert train(args_for(data, split, *common, "--resume")) == 0

    assert summary_of(split)["steps"] == summary_of(straight)["steps"] == 8
    want, got = losses(straight / "checkpoint-8"), losses(split / "checkpoint-8")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(split / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


# ---------------------------------------------------------------- NaN/inf ---

def poison_loss(monkeypatch, bad_steps, when=lambda trainer: True):
    from autotune.training import trainer as T

    real = T.LlasaTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step + 1 in bad_steps and when(self):
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(T.LlasaTrainer, "compute_loss", compute_loss)


@pytest.mark.slow
def test_nan_steps_are_skipped_then_rolled_back_with_the_remedies(data, tmp_path, monkeypatch, capsys):
    # Steps 3, 4 and 5 are NaN in the first attempt only (its learning rate is the original).
    poison_loss(monkeypatch, {3, 4, 5}, when=lambda t: t.args.learning_rate == 5e-3)
    out = tmp_path / "out"
    assert train(args_for(data, out, "--set", "training.max_steps=6", "--set", "training.save_steps=2")) == 0
    summary = summary_of(out)
    assert summary["steps"] == 6
    assert summary["nonfinite_steps_skipped"] == [3, 4, 5]
    assert summary["nan_rollbacks"] == [{"at_step": 5, "bad_steps": [3, 4, 5], "resumed_from": str(out / "checkpoint-2"),
                                         "learning_rate": 2.5e-3, "max_grad_norm": 0.5, "warmup_ratio": 0.1}]
    assert "rolling back to" in " ".join(capsys.readouterr().out.split())

    # The resumed run trained with the remedies, and its schedule is the halved one from step 3 on.
    args = torch.load(out / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert (args.learning_rate, args.max_grad_norm) == (2.5e-3, 0.5)
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    schedule = get_scheduler(args.lr_scheduler_type, probe, num_warmup_steps=args.get_warmup_steps(6),
                             num_training_steps=6)
    expected = []
    for _ in range(6):
        expected.append(schedule.get_last_lr()[0])
        probe.step()
        schedule.step()
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    logged = {h["step"]: h["learning_rate"] for h in state["log_history"] if "learning_rate" in h}
    for step in range(3, 7):
        assert logged[step] == pytest.approx(expected[step - 1], rel=1e-6), step

    from safetensors.torch import load_file

    saved = list(out.rglob("adapter_model.safetensors"))
    assert len(saved) >= 3
    for file in saved:
        for key, tensor in load_file(str(file)).items():
            assert torch.isfinite(tensor).all(), (file, key)


@pytest.mark.slow
def test_nan_that_persists_stops_after_two_rollbacks_with_one_line(data, tmp_path, monkeypatch):
    poison_loss(monkeypatch, set(range(1, 100)))
    out = tmp_path / "out"
    with pytest.raises(AutotuneError) as caught:
        train(args_for(data, out, "--set", "training.max_steps=6", "--set", "training.nan_patience=1"))
    message = caught.value.one_line()
    assert "NaN or infinite for 1 step in a row" in message and "after 2 rollbacks" in message
    assert "--set training.learning_rate=" in message and str(out) in message
    assert caught.value.exit_code == 2


def test_a_skipped_step_moves_neither_weights_nor_optimizer_state():
    from types import SimpleNamespace

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    guard = CB.NonFiniteGuard(patience=2)
    args, control = SimpleNamespace(device="cpu"), SimpleNamespace(should_save=True, should_training_stop=False)
    state = SimpleNamespace(global_step=0)
    for step in range(2):
        loss = model(torch.ones(1, 3)).sum() * float("nan")
        loss.backward()
        guard.note_loss(loss)
        guard.on_pre_optimizer_step(args, state, control, model=model)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        guard.on_step_end(args, state, control)
        assert control.should_save is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state  # no moments, no step count
    assert guard.skipped_steps == [1, 2] and guard.exhausted_at == 2 and control.should_training_stop
    # A finite step resets the streak.
    model(torch.ones(1, 3)).sum().backward()
    guard.on_pre_optimizer_step(args, state, control, model=model)
    assert guard.streak == 0 and model.weight.grad is not None


def test_nan_remedies():
    assert RC.nan_remedies(1e-4, 1.0, 0.05) == {"learning_rate": 5e-5, "max_grad_norm": 0.5, "warmup_ratio": 0.1}
    assert RC.nan_remedies(1e-4, 0.3, 0.2) == {"learning_rate": 5e-5, "max_grad_norm": 0.3, "warmup_ratio": 0.2}


def test_a_non_finite_eval_loss_never_becomes_the_best():
    import numpy as np

    from autotune.training.trainer import worst_if_nonfinite

    for higher in (False, True):
        for value in (float("nan"), float("-inf"), float("inf")):
            metric = worst_if_nonfinite({"eval_loss": value}, "eval_loss", higher)["eval_loss"]
            assert not (np.greater if higher else np.less)(metric, 1.0)


def test_resume_takes_the_arguments_learning_rate_at_the_checkpoint_position():
    from transformers import get_scheduler

    from autotune.training.trainer import retarget_learning_rate

    def build(lr, warmup):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=10)

    optimizer, scheduler = build(1e-3, 0)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    # A plain resume: nothing changes.
    same_opt, same_sched = build(1e-3, 0)
    same_opt.load_state_dict(saved[0])
    same_sched.load_state_dict(saved[1])
    retarget_learning_rate(same_opt, same_sched, 1e-3)
    assert same_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    # A rollback: half the peak, longer warmup, same position (step 4).
    new_opt, new_sched = build(5e-4, 5)
    new_opt.load_state_dict(saved[0])
    new_sched.load_state_dict(saved[1])
    retarget_learning_rate(new_opt, new_sched, 5e-4)
    assert new_sched.last_epoch == 4
    assert new_opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 4 / 5)
    assert new_sched.get_last_lr() == [new_opt.param_groups[0]["lr"]]


# ----------------------------------------------------- checkpoints, disk ---

def fake_checkpoint(path: Path, step: int) -> Path:
    """A checkpoint's files with real states (verification checks their structure), without a model."""
    import random

    import numpy as np
    from safetensors.torch import save_file
    from transformers import TrainerState, get_scheduler

    path.mkdir(parents=True)
    TrainerState(global_step=step, max_steps=8).save_to_json(str(path / "trainer_state.json"))
    save_file({"lora_A": torch.ones(64, 64)}, str(path / "adapter_model.safetensors"))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(64, 64))])
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=8).state_dict(),
               path / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               path / "rng_state.pth")
    return path


def _set_best_metric(path: Path, value: float) -> None:
    state = json.loads((path / "trainer_state.json").read_text())
    state.update(best_metric=value, best_global_step=2, best_model_checkpoint=str(path.parent / "checkpoint-2"))
    (path / "trainer_state.json").write_text(json.dumps(state))


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, why", [
    (lambda p: (p / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda p: (p / "trainer_state.json").write_text('{"global_st'), "trainer_state.json does not parse"),
    # safetensors' own reader judges the file: a cut file, a cut or damaged header, trailing bytes.
    (lambda p: truncate(p / "adapter_model.safetensors"), "adapter_model.safetensors is damaged"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x05"), "adapter_model.safetensors is damaged"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]"),
     "adapter_model.safetensors is damaged"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes() + b"x"),
     "adapter_model.safetensors is damaged"),
    (lambda p: _set_best_metric(p, float("nan")), "records a best metric of nan"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "no adapter weights"),
    (lambda p: truncate(p / "optimizer.pt"), "optimizer.pt is truncated or corrupt"),
    (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda p: (p / "rng_state.pth").unlink(), "no RNG state"),
])
def test_checkpoint_problem_names_what_is_wrong(tmp_path, damage, why):
    path = fake_checkpoint(tmp_path / "checkpoint-4", 4)
    assert K.checkpoint_problem(path) is None
    damage(path)
    assert why in K.checkpoint_problem(path)


def test_resume_skips_a_broken_newest_checkpoint_and_cleans_leftovers(tmp_path, capsys):
    from rich.console import Console

    from autotune.training.recovery import resolve_resume

    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-2", 2)
    fake_checkpoint(out / "checkpoint-4", 4)
    truncate(out / "checkpoint-4" / "optimizer.pt")
    fake_checkpoint(out / ".tmp-checkpoint-6", 6)   # a save a kill cut short
    console = Console(width=200)
    assert resolve_resume("latest", out, console) == out / "checkpoint-2"
    printed = capsys.readouterr().out
    assert "skipping checkpoint-4: optimizer.pt is truncated or corrupt" in printed
    assert "removed .tmp-checkpoint-6" in printed
    assert not (out / ".tmp-checkpoint-6").exists()
    with pytest.raises(AutotuneError, match="is not a complete checkpoint \\(optimizer.pt is truncated"):
        resolve_resume(str(out / "checkpoint-4"), out, console)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    from autotune.training import trainer as T

    real_save = T.LlasaTrainer._save_optimizer_and_scheduler

    def full_at_4(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "optimizer.pt").write_bytes(b"half")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir, "optimizer.pt")))
        return real_save(self, output_dir)

    monkeypatch.setattr(T.LlasaTrainer, "_save_optimizer_and_scheduler", full_at_4)
    out = tmp_path / "out"
    argv = args_for(data, out, "--set", "training.max_steps=6", "--set", "training.save_steps=2")
    with pytest.raises(AutotuneError) as caught:
        train(argv)
    message = caught.value.one_line()
    assert message.startswith(f"disk full while saving checkpoint-4 under `{out}` (")
    assert "MiB free): the previous checkpoint `checkpoint-2` is intact; free space, then resume with `--resume`" in message
    assert K.checkpoint_problem(out / "checkpoint-2") is None
    assert not (out / "checkpoint-4").exists() and not (out / ".tmp-checkpoint-4").exists()

    # Space freed: --resume continues from checkpoint-2 to the end.
    monkeypatch.setattr(T.LlasaTrainer, "_save_optimizer_and_scheduler", real_save)
    capsys.readouterr()
    assert train(argv + ["--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert summary_of(out)["steps"] == 6


def test_is_disk_full():
    assert K.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), 10**9)
    assert K.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), 10**9)
    assert K.is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), 0)
    assert not K.is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), 10**10)
    assert K.is_disk_full(Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), None)
    assert not K.is_disk_full(OSError(errno.EACCES, "Permission denied"), 0)


def test_torch_save_on_a_full_device_is_recognised_as_a_full_disk():
    """What torch's zip writer raises when the disk fills: no errno, only words, chained."""
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with pytest.raises(Exception) as caught:
        torch.save({"x": torch.zeros(1000)}, "/dev/full")
    assert K.is_disk_full(caught.value, free_bytes=0)
    assert not K.is_disk_full(RuntimeError("unexpected pos 4 vs 2"), free_bytes=10 * 2**30)


def test_room_for_checkpoints():
    size = K.checkpoint_bytes(10_000_000, 4, "adamw_torch")
    assert size == 10_000_000 * 12 + 2**20
    assert K.room_problem(None, size, Path("o")) is None
    assert K.room_problem(3 * size, size, Path("o")) is None
    assert "each checkpoint takes about 115 MiB" in K.room_problem(size, size, Path("o"))


def test_publish_replaces_atomically(tmp_path):
    final = tmp_path / "checkpoint-3"
    fake_checkpoint(final, 3)
    staging = fake_checkpoint(K.staging_dir(final), 3)
    (staging / "marker").write_text("new")
    K.publish_checkpoint(staging, final)
    assert (final / "marker").read_text() == "new" and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


# ------------------------------------------------------------ resume hint ---

@pytest.mark.parametrize("argv, want", [
    (["--data", "d", "--output-dir", "o", "--overwrite"], "python train.py --data d --resume --output-dir OUT"),
    (["--data", "d", "--resume", "o/checkpoint-4", "--set", "a=b"], "python train.py --data d --set a=b --resume --output-dir OUT"),
    (["--data", "d", "--resume", "--set", "x=1"], "python train.py --data d --set x=1 --resume --output-dir OUT"),
    (["--output=o", "--data", "my data", "--set", "lora.target_modules=[q_proj]"],
     "python train.py --data 'my data' --set 'lora.target_modules=[q_proj]' --resume --output-dir OUT"),
])
def test_resume_command(argv, want):
    assert S.resume_command(argv, Path("OUT")) == want


def test_resume_command_without_the_command_line():
    assert S.resume_command(None, Path("runs/x")) == "python train.py <the same options> --resume --output-dir runs/x"


def test_a_signal_asks_a_second_aborts_and_the_handlers_come_back():
    before = tuple(signal.getsignal(sig) for sig in S.STOP_SIGNALS)
    callback = CB.InterruptCallback()
    signals = S.RunSignals()
    signals.install()
    try:
        assert signal.getsignal(signal.SIGHUP) not in before
        with pytest.raises(S.RunInterrupted):   # before training: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        signals.received = None
        with signals.training(callback):
            os.kill(os.getpid(), signal.SIGHUP)   # a closed terminal asks as SIGTERM does
            time.sleep(0.01)
            assert callback.requested == "SIGHUP"
            with pytest.raises(SystemExit) as caught:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
            assert caught.value.code == 143
    finally:
        signals.uninstall()
    assert tuple(signal.getsignal(sig) for sig in S.STOP_SIGNALS) == before


def test_a_checkpoint_with_a_flipped_byte_inside_is_skipped(tmp_path):
    import torch

    from autotune.checkpoint_checks import torch_file_problem as _torch_file_problem

    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: torch.arange(4096, dtype=torch.float32)}}, path)
    assert _torch_file_problem(path) is None
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a tensor's bytes; the zip directory at the end survives
    path.write_bytes(bytes(data))
    assert _torch_file_problem(path) == "is corrupt (a checksum does not match)"
