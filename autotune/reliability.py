"""Surviving interruption, kills, NaNs and a full disk without losing work.

- Ctrl-C / SIGTERM: `catch_interrupts` + `InterruptCallback` finish the current
  step, save a checkpoint and stop; a second signal aborts at once. The run
  then exits 130 (SIGINT) or 143 (SIGTERM) and prints `resume_command`.
- kill -9 / power loss / damage: checkpoints are written into `.tmp-checkpoint-N`,
  a manifest of sizes and hashes last, and renamed into place once complete
  (`publish_checkpoint`); `--resume` only takes a checkpoint that verifies
  (`checkpoint_problem`, then the model's shapes in the trainer: see
  `autotune.checkpoints`), falling back to the newest one that does.
- NaN / inf: `NonFiniteGuard` skips the update of a step whose loss or
  gradients are not finite; after `training.nan_patience` such steps in a row
  the run rolls back to the last checkpoint with the guide's remedies
  (`nan_remedies`), at most `MAX_NAN_ROLLBACKS` times.
- Disk full: `is_disk_full` and `disk_full_message` turn a failed save into one line.

Decisions are plain functions; the callbacks and the signal handlers are the edges.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import TrainerCallback

from autotune import checkpoints as C

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".tmp-"     # `.tmp-checkpoint-N`: a save in progress, never resumed from
REPLACED_PREFIX = ".old-"    # `.old-checkpoint-N`: a same-step checkpoint being replaced
from autotune.signals import (EXIT_CODES, STOP_SIGNALS, RunInterrupted, RunSignals, _say,  # noqa: F401
                              command_line, resume_command)
MAX_NAN_ROLLBACKS = 2


# ------------------------------------------------------------ interruption ---

class InterruptCallback(TrainerCallback):
    """Once a signal is requested: save a checkpoint at the end of this step and stop.

    Registered after every other callback: it ends the step, and callbacks that act
    on the final step (the samples) must not mistake an interrupt for the end of training."""

    def __init__(self):
        self.requested: str | None = None   # "SIGINT" or "SIGTERM", set by the signal handler
        self.stopped_at: int | None = None  # the step whose checkpoint the interrupt saved

    def on_step_end(self, args, state, control, **kwargs):
        self._stop_if_requested(args, state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        # A signal during an evaluation: save right after it rather than one more step later.
        self._stop_if_requested(args, state, control)

    def _stop_if_requested(self, args, state, control) -> None:
        if self.stopped_at is not None:
            return
        # Every DDP process must stop at the same step, or the others hang in the next all-reduce.
        code = agree_across_processes(signal_number(self.requested), args.device)
        if not code:
            return
        self.requested = self.requested or signal.Signals(code).name
        control.should_save = True
        control.should_training_stop = True
        if state.global_step < state.max_steps:
            self.stopped_at = state.global_step


def signal_number(name: str | None) -> int:
    return int(getattr(signal, name)) if name else 0


@contextmanager
def catch_interrupts(callback: InterruptCallback) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ask `callback` to stop after this step; the previous
    handlers come back afterwards. A second signal aborts at once: SIGINT as
    KeyboardInterrupt (the command line prints one line, exit 130), SIGTERM as
    exit 143. No-op outside the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if callback.requested is not None:
            _say(f"\n{name} again: stopping now, without saving (the last checkpoint is kept)\n")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_CODES.get(name, 128 + signum))
        callback.requested = name
        _say(f"\n{name}: finishing this step, then saving a checkpoint and stopping "
             "(press Ctrl-C again to stop at once without saving)\n")

    with stop_signals_handled_by(handler):
        yield


@contextmanager
def stop_signals_handled_by(handler) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP go to `handler` inside the block; the previous handlers come back after."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def agree_across_processes(value: int, device: Any) -> int:
    """The largest `value` over all DDP processes (itself when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


# ---------------------------------------------------------------- NaN/inf ---

class NonFiniteGuard(TrainerCallback):
    """Skips the update of a step whose loss or gradients are NaN or inf (the
    optimizer sees no gradients, so neither the weights nor its moments move),
    and after `patience` such steps in a row stops training for a rollback.

    `LlasaTrainer.training_step` reports each micro-batch's loss through `note_loss`.
    With fp16 the gradient scaler already skips overflowing steps while it
    calibrates, so only a non-finite loss counts there (`judge_gradients=False`)."""

    def __init__(self, patience: int, judge_gradients: bool = True):
        self.patience = patience
        self.judge_gradients = judge_gradients
        self.streak = 0
        self.skipped_steps: list[int] = []
        self.exhausted_at: int | None = None
        self._loss_ok: torch.Tensor | None = None
        self._skipped_this_step = False

    def note_loss(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()  # stays on the device: one sync per step, below
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ok = self._loss_ok is None or bool(self._loss_ok)
        self._loss_ok = None
        if ok and self.judge_gradients and model is not None:
            ok = gradients_finite(model)
        bad = agree_across_processes(0 if ok else 1, args.device) > 0
        self._skipped_this_step = bad
        if not bad:
            self.streak = 0
            return
        for p in model.parameters() if model is not None else ():
            p.grad = None   # torch optimizers leave a parameter without a gradient untouched
        self.streak += 1
        self.skipped_steps.append(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._skipped_this_step:
            return
        # A rollback must go back to before the trouble: no checkpoint from inside a bad streak.
        control.should_save = False
        if self.streak >= self.patience:
            self.exhausted_at = state.global_step
            control.should_training_stop = True


def gradients_finite(model: torch.nn.Module) -> bool:
    return all(_all_finite([p.grad for p in model.parameters() if p.grad is not None]))


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of trainable tensors holding NaN or inf (what a checkpoint would save)."""
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    return [n for (n, _), ok in zip(named, _all_finite([t for _, t in named])) if not ok]


def _all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor: no NaN or inf. One device sync for all of them, not one each."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).cpu().tolist()


def nan_remedies(learning_rate: float, max_grad_norm: float, warmup_ratio: float) -> dict[str, float]:
    """The guide's remedies for a NaN loss: half the learning rate, clip at 0.5, warm up longer."""
    return {"learning_rate": learning_rate / 2, "max_grad_norm": min(max_grad_norm, 0.5),
            "warmup_ratio": max(0.1, warmup_ratio)}


def nan_rollback(config: Any, guard: NonFiniteGuard, rollbacks_so_far: int, output_dir: Path) -> tuple[Any, dict]:
    """After `guard` gave up: the config with the remedies and the record of the
    rollback to the newest complete checkpoint (None: the start). Raises once
    `MAX_NAN_ROLLBACKS` are spent."""
    from autotune.errors import AutotuneError

    t = config.training
    if rollbacks_so_far >= MAX_NAN_ROLLBACKS:
        raise AutotuneError(nan_give_up_message(guard.exhausted_at, guard.patience, rollbacks_so_far, t, output_dir))
    remedies = nan_remedies(t.learning_rate, t.max_grad_norm, t.warmup_ratio)
    config = config.model_copy(update={"training": t.model_copy(update=remedies)})
    resume_from = scan_checkpoints(output_dir)[0]
    return config, {"at_step": guard.exhausted_at, "bad_steps": guard.skipped_steps[-guard.patience:],
                    "resumed_from": str(resume_from) if resume_from else None, **remedies}


def describe_rollback(record: dict) -> str:
    bad = len(record["bad_steps"])
    return (f"the loss or the gradients were NaN/inf for {bad} step{'s' if bad != 1 else ''} in a row (up to step "
            f"{record['at_step']}): rolling back to {record['resumed_from'] or 'the start'} with learning_rate "
            f"{record['learning_rate']:g}, max_grad_norm {record['max_grad_norm']:g}, "
            f"warmup_ratio {record['warmup_ratio']:g}")


def nan_give_up_message(at_step: int, patience: int, rollbacks: int, training: Any, output_dir: Path) -> str:
    steps = f"{patience} step{'s' if patience != 1 else ''}"
    return (f"the loss or the gradients were NaN or infinite for {steps} in a row (up to step {at_step}), "
            f"even after {rollbacks} rollbacks that halved the learning rate to {training.learning_rate:g}, clipped "
            f"gradients at {training.max_grad_norm:g} and warmed up over {training.warmup_ratio:g} of the steps: try "
            f"`--set training.learning_rate={training.learning_rate / 4:g} --set training.max_grad_norm=0.3`, or "
            "fp32/bf16 instead of fp16, and check the data for broken samples; checkpoints so far are kept in "
            f"`{output_dir}`")


# ------------------------------------------------------------ checkpoints ---

def staging_dir(final: Path) -> Path:
    return final.with_name(STAGING_PREFIX + final.name)


def publish_checkpoint(staging: Path, final: Path) -> None:
    """Make a fully written `staging` folder the checkpoint `final` in one rename,
    after its bytes reached the disk: a kill or power cut leaves either the old
    state or the whole new checkpoint, never half of one."""
    _fsync_tree(staging)
    replaced = None
    if final.exists():
        replaced = final.with_name(REPLACED_PREFIX + final.name)
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


def clean_staging(output_dir: Path) -> list[Path]:
    """Remove the leftovers of saves a kill interrupted; returns what was removed."""
    removed = []
    for prefix in (STAGING_PREFIX, REPLACED_PREFIX):
        for path in sorted(output_dir.glob(prefix + CHECKPOINT_PREFIX + "*")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def checkpoint_problem(path: Path) -> str | None:
    """Why `--resume` cannot continue from `path`, or None when it verifies: its
    manifest (sizes, hashes) and the structure of its states, before any model
    exists (`checkpoints.verify_checkpoint`; the trainer adds the model's shapes)."""
    return C.verify_checkpoint(path)


# Kept under their old names: the file checks now live with the rest of verification.
safetensors_problem = C.safetensors_problem
_torch_file_problem = C.torch_file_problem


def scan_checkpoints(output_dir: Path, expected: C.Expected | None = None,
                     below_step: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest `checkpoint-N` that verifies, and the newer ones skipped with why."""
    return C.newest_verified_checkpoint(output_dir, expected, below_step)


# -------------------------------------------------------------- disk full ---

def is_disk_full(exc: BaseException, free_bytes: int | None) -> bool:
    """ENOSPC/EDQUOT by errno; torch's zip writer and safetensors only say it in
    words ("file write failed" with nothing left free)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
        return True
    return "file write failed" in text and free_bytes is not None and free_bytes < 64 * 2**20


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_message(what: str, output_dir: Path, free: int | None, previous: Path | None) -> str:
    room = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
    kept = (f"the previous checkpoint `{previous.name}` is intact; free space, then resume with `--resume`"
            if previous is not None else "no earlier checkpoint was saved; free space and start again")
    return f"disk full while saving {what} under `{output_dir}` ({room}): {kept}"


def checkpoint_bytes(trainable_numel: int, param_bytes: int, optim: str) -> int:
    """About what one checkpoint takes: the adapter, the optimizer's two moments, a little more."""
    moment_bytes = 1 if "8bit" in optim else 0 if optim == "sgd" else 4
    return trainable_numel * (param_bytes + 2 * moment_bytes) + 2**20


def require_room_for_checkpoints(output_dir: Path, model: torch.nn.Module, optim: str) -> None:
    """Once the adapter exists its checkpoint size is known: fail now rather than at the first save."""
    from autotune.errors import AutotuneError

    trainable = [p for p in model.parameters() if p.requires_grad]
    size = checkpoint_bytes(sum(p.numel() for p in trainable), trainable[0].element_size() if trainable else 4, optim)
    problem = room_problem(free_bytes(output_dir), size, output_dir)
    if problem:
        raise AutotuneError(problem)


def room_problem(free: int | None, one_checkpoint_bytes: int, output_dir: Path) -> str | None:
    """A save writes the new checkpoint before the oldest is rotated away: room for two, to be safe."""
    needed = 2 * one_checkpoint_bytes
    if free is None or free >= needed:
        return None
    return (f"only {free / 2**20:.0f} MiB free under `{output_dir}`: each checkpoint takes about "
            f"{one_checkpoint_bytes / 2**20:.0f} MiB (adapter and optimizer state) and a save needs room for "
            f"{needed / 2**20:.0f} MiB; free space or choose another `--output-dir`")
