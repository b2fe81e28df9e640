"""The training loop's callbacks: throughput, the progress line, early stopping's record,
a log at the last step, the interrupt that saves and stops, the NaN guard, and the
publishing of checkpoints (whole, verified, never with NaN weights).
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from autotune import checkpoint_checks as C
from autotune import checkpoints as K
from autotune.config import Config
from autotune.console import warn


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (non-padding, all processes) to each log line."""

    def __init__(self, trainer: Any, processes: int):
        self.trainer = trainer
        self.processes = processes
        self.start = None
        self.last_time = None
        self.last_tokens = self.start_tokens = 0
        self.rates: list[float] = []
        self.marks: list[tuple[int, float, int]] = []   # (step, time, tokens) at each log: the device is synced there

    def on_train_begin(self, args, state, control, **kwargs):
        # Every (re)start counts from here: HF's `auto_find_batch_size` restarts training after
        # each out-of-memory attempt, and those attempts' tokens are no throughput.
        self.start = self.last_time = time.perf_counter()
        self.start_tokens = self.last_tokens = self.trainer.tokens_seen
        self.rates = []
        self.marks = [(state.global_step, self.start, self.start_tokens)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.last_time is None:
            return
        now = time.perf_counter()
        tokens = self.trainer.tokens_seen
        if now > self.last_time and tokens > self.last_tokens:
            rate = (tokens - self.last_tokens) * self.processes / (now - self.last_time)
            logs["tokens_per_second"] = round(rate, 1)
            self.rates.append(rate)
        self.last_time, self.last_tokens = now, tokens
        self.marks.append((state.global_step, now, tokens))

    def marks_since_start(self) -> list[list[float]]:
        """[step, seconds since this (re)start, this process's tokens since it] at each log: the device is synced
        there, so any steady-state window can be read off afterwards."""
        if not self.marks:
            return []
        s0, t0, n0 = self.marks[0]
        return [[s, round(t - t0, 4), n - n0] for s, t, n in self.marks]

    def steady(self, warmup_steps: int = 10) -> tuple[float | None, int]:
        """(tokens/s, timed steps) from the first log at or after `warmup_steps` steps into
        this (re)start to the last log: compilation, allocator growth and the first batches
        left out. (None, 0) when no two logs are that far in."""
        return steady_rate(self.marks, warmup_steps, self.processes)

    def overall(self) -> float | None:
        if self.start is None:
            return None
        elapsed = time.perf_counter() - self.start
        tokens = self.trainer.tokens_seen - self.start_tokens
        return tokens * self.processes / elapsed if elapsed > 0 else None


def steady_rate(marks, warmup_steps: int, processes: int = 1) -> tuple[float | None, int]:
    """(tokens/s, timed steps) between the first of `marks` ([step, time, tokens], the first at the
    start) at least `warmup_steps` in and the last; (None, 0) when fewer than two are."""
    if not marks:
        return None, 0
    first_step = marks[0][0]
    later = [m for m in marks if m[0] - first_step >= warmup_steps]
    if len(later) < 2:
        return None, 0
    (s0, t0, n0), (s1, t1, n1) = later[0], later[-1]
    if t1 <= t0:
        return None, 0
    return (n1 - n0) * processes / (t1 - t0), s1 - s0


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with loss, learning rate, tokens/s and ETA (main process only)."""

    def __init__(self, console):
        self.console = console
        self.progress = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "tps": "-", "eval": "-"}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, **self.fields)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.fields["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.fields["lr"] = f"{logs['learning_rate']:.2e}"
        if "tokens_per_second" in logs:
            self.fields["tps"] = f"{logs['tokens_per_second']:,.0f}"
        if "eval_loss" in logs:
            self.fields["eval"] = f"{logs['eval_loss']:.4f}"
        self.progress.update(self.task, **self.fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None


class EarlyStopRecorder(TrainerCallback):
    """Remembers whether early stopping ended the run (for the summary)."""

    def __init__(self):
        self.stopped_early_at: int | None = None

    def on_evaluate(self, args, state, control, **kwargs):
        # Runs after EarlyStoppingCallback (added first), which sets the flag here.
        if control.should_training_stop and state.global_step < state.max_steps:
            self.stopped_early_at = state.global_step


class LogLastStep(TrainerCallback):
    """Logs the loss at the last step too, so the final train loss is the end of the run's
    and not the last multiple of `logging_steps` (often the first step of a short trial)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True


def callbacks_for(config: Config, has_eval: bool) -> list[TrainerCallback]:
    t = config.training
    callbacks: list[TrainerCallback] = [LogLastStep()]
    if t.use_early_stopping and has_eval and t.eval_strategy != "no":
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience,
                                               early_stopping_threshold=t.early_stopping_threshold))
    return callbacks



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


def agree_across_processes(value: int, device: Any) -> int:
    """The largest `value` over all DDP processes (itself when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class NonFiniteGuard(TrainerCallback):
    """Skips the update of a step whose loss or gradients are NaN or inf (neither the weights
    nor the optimizer's moments move), and after `patience` such steps in a row stops
    training for a rollback.

    With a fused optimizer in one process (the profiles' AdamW), nothing waits for the
    device: the verdict is a device tensor built from the loss and the gradient norm the
    Trainer computes for clipping anyway, handed to the fused kernel as `found_inf` (which
    then skips the update on the device), and read on the host only at steps that log,
    save or evaluate. Otherwise (several processes, other optimizers) each step is judged
    on the host, the skip is done by clearing the gradients.

    `LlasaTrainer.training_step` reports each micro-batch's loss through `note_loss` and
    its clipping the gradient norm (`grad_norm`). With fp16 the gradient scaler already
    skips overflowing steps while it calibrates, so only a non-finite loss counts there
    (`judge_gradients=False`)."""

    def __init__(self, patience: int, judge_gradients: bool = True):
        self.patience = patience
        self.judge_gradients = judge_gradients
        self.streak = 0
        self.skipped_steps: list[int] = []
        self.exhausted_at: int | None = None
        self.grad_norm: torch.Tensor | None = None
        self.deferred = False                      # verdicts kept on the device, read at logging steps
        self._loss_ok: torch.Tensor | None = None
        self._skipped_this_step = False
        self._pending: list[tuple[int, torch.Tensor]] = []   # (step, bad) not read yet

    def note_loss(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()  # stays on the device
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        if (isinstance(inner, torch.optim.Optimizer) and inner.defaults.get("fused") and args.world_size == 1
                and self.judge_gradients and self.grad_norm is not None and torch.is_tensor(self.grad_norm)):
            ok = torch.isfinite(self.grad_norm.detach())
            if self._loss_ok is not None:
                ok = ok & self._loss_ok.to(ok.device)
            bad = ~ok
            inner.found_inf = bad.to(torch.float32)   # the fused kernel skips this update on the device
            self._pending.append((state.global_step + 1, bad))
            self._loss_ok = self.grad_norm = None
            self.deferred = True
            return
        ok = self._loss_ok is None or bool(self._loss_ok)
        self._loss_ok = self.grad_norm = None
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
        if self.deferred:
            if (control.should_log or control.should_save or control.should_evaluate
                    or control.should_training_stop or state.global_step >= state.max_steps):
                self._settle(state, control)
            return
        if not self._skipped_this_step:
            return
        # A rollback must go back to before the trouble: no checkpoint from inside a bad streak.
        control.should_save = False
        if self.streak >= self.patience:
            self.exhausted_at = state.global_step
            control.should_training_stop = True

    def _settle(self, state, control) -> None:
        """Read the verdicts kept on the device (the one host sync, at a logging step)."""
        if not self._pending:
            return
        verdicts = torch.stack([bad for _, bad in self._pending]).tolist()
        longest = 0
        for (step, _), bad in zip(self._pending, verdicts):
            if bad:
                self.streak += 1
                self.skipped_steps.append(step)
                longest = max(longest, self.streak)
            else:
                self.streak = 0
        self._pending = []
        if self.streak:
            control.should_save = False   # no checkpoint from inside a bad streak
        if longest >= self.patience:
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


# ------------------------------------------------------------- checkpoints ---

class RefuseNonFiniteSaves(TrainerCallback):
    """No checkpoint holds NaN or inf weights: a save that would is not made at all (the previous
    checkpoints are kept), said in one line and listed in `trainer.refused_saves`. Registered
    last, so it sees every other callback's wish to save (a step's end, an evaluation's, an
    epoch's), which is the last moment before the Trainer writes."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def _check(self, state, control) -> None:
        if not control.should_save:
            return
        bad = nonfinite_parameters(self.trainer.model)
        if bad:
            control.should_save = False
            self.trainer.refused_saves.append(state.global_step)
            warn(self.trainer.console, f"! not saving checkpoint-{state.global_step}: {len(bad)} adapter tensors hold "
                                       f"NaN or inf (e.g. {bad[0]}); the previous checkpoints are kept")

    def on_step_end(self, args, state, control, **kwargs):
        self._check(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        self._check(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check(state, control)


class PublishCheckpoints(TrainerCallback):
    """Each checkpoint the Trainer wrote into the staging folder (`TrainingArguments.output_dir`,
    hidden in the run folder) becomes the run's `checkpoint-N` only once whole: its
    trainer_state.json names the published best checkpoint, the manifest of sizes and hashes is
    written last (`checkpoint_checks.write_manifest`), and one rename publishes it after its
    bytes reached the disk (`checkpoints.publish_checkpoint`). A kill at any moment leaves no
    half checkpoint for `--resume` to pick, and later damage is found. Then the oldest are
    rotated away, the best kept. At the end, a best checkpoint damaged since it was saved is not
    loaded: the final weights are kept."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        staging_root, run_dir = Path(args.output_dir), trainer.run_dir
        trainer.accelerator.wait_for_everyone()   # every process wrote its RNG state
        if args.should_save:
            name = f"{K.CHECKPOINT_PREFIX}{state.global_step}"
            best = state.best_model_checkpoint
            if best is not None and Path(best).parent == staging_root:
                state.best_model_checkpoint = str(run_dir / Path(best).name)
            forget_nonfinite_best(state)
            state.save_to_json(str(staging_root / name / "trainer_state.json"))
            C.write_manifest(staging_root / name, state.global_step)   # last: a manifest means the save finished
            K.publish_checkpoint(staging_root / name, run_dir / name)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
        trainer.accelerator.wait_for_everyone()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer's last log (its run's totals) comes right before it loads the best checkpoint.
        if logs and "train_runtime" in logs and args.load_best_model_at_end and state.best_model_checkpoint:
            best = Path(state.best_model_checkpoint)
            problem = C.verify_checkpoint(best, self.trainer.checkpoint_expectations())
            if problem:
                self.trainer.best_refused = f"{best.name}: {problem}"
                warn(self.trainer.console, f"! not loading the best checkpoint {best.name}: {problem}; "
                                           "keeping the final weights")
                state.best_model_checkpoint = None

    def on_train_end(self, args, state, control, **kwargs):
        forget_nonfinite_best(state)
        if args.should_save:
            shutil.rmtree(args.output_dir, ignore_errors=True)   # empty once every save was published


def forget_nonfinite_best(state: Any) -> None:
    """A best metric still at its starting infinity means no evaluation was best (each non-finite
    one counted as the worst): none is recorded, as before any evaluation."""
    if isinstance(state.best_metric, float) and not math.isfinite(state.best_metric):
        state.best_metric = None
