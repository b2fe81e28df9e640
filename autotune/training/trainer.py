"""The HF Trainer that trains Llasa: its arguments from the config, and `LlasaTrainer`, whose
step is the lean loss and whose checkpoints are written whole and verified on resume.
The dry run measures plans with this same trainer."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from autotune import checkpoint_checks as C
from autotune import checkpoints as K
from autotune.training.callbacks import InterruptCallback, NonFiniteGuard, nonfinite_parameters
from autotune.batches import EpochLengthGroupedSampler, ExampleDataset
from autotune.config import Config, config_rule_problems
from autotune.console import say, warn
from autotune.errors import AutotuneError


# --------------------------------------------------------------- datasets ---


# -------------------------------------------------------------- arguments ---

def training_arguments(config: Config, output_dir: Path, *, has_eval: bool, use_cpu: bool,
                       notes: list[str], sequential: bool = False, whole_steps: bool = False) -> TrainingArguments:
    """The config's `training` section as `TrainingArguments`, with the checks HF
    would otherwise raise as a traceback turned into one-line errors."""
    t = config.training
    eval_on = has_eval and t.eval_strategy != "no"
    if not has_eval and t.eval_strategy != "no":
        notes.append("no validation samples: validation, early stopping and best-model selection are off")
    load_best = t.load_best_model_at_end and eval_on
    problems = config_rule_problems(config)
    if problems:
        raise AutotuneError(problems[0])
    report_to = [r for r in t.report_to if r != "none"]
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise AutotuneError("`report_to: tensorboard` needs tensorboard: `pip install tensorboard`, "
                                "or `--set training.report_to=none`") from None
    for name in report_to:
        if name != "tensorboard" and importlib.util.find_spec(name.replace("-", "_")) is None:
            raise AutotuneError(f"`training.report_to` names `{name}`, which is not installed: "
                                f"`pip install {name}`, or `--set training.report_to=tensorboard`")
    _check_scheduler_kwargs(t.lr_scheduler_type, t.lr_scheduler_kwargs)
    optim = {"adamw_8bit": "adamw_bnb_8bit"}.get(t.optim, t.optim)
    kwargs = dict(
        output_dir=str(output_dir),
        # `whole_steps`: the dataloader hands over one optimizer step's samples at once and the
        # token-budget collator splits them (batches.TokenBudgetCollator): the same samples per step.
        per_device_train_batch_size=(t.per_device_train_batch_size * t.gradient_accumulation_steps if whole_steps
                                     else t.per_device_train_batch_size),
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        gradient_accumulation_steps=1 if whole_steps else t.gradient_accumulation_steps,
        # HF's NaN check reads every micro-step's loss on the host; the NaN guard decides instead.
        logging_nan_inf_filter=False,
        torch_compile=t.torch_compile,
        use_liger_kernel=t.use_liger_kernel,
        bf16=t.bf16, fp16=t.fp16,
        **_checkpointing_args(t.gradient_checkpointing),
        optim=optim,
        # transformers 5 reads a float below 1 in `warmup_steps` as the ratio.
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler_type, lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        eval_strategy=t.eval_strategy if eval_on else "no",
        eval_steps=t.eval_steps if eval_on else None,
        save_strategy=t.save_strategy, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_strategy="steps", logging_steps=t.logging_steps, logging_first_step=True,
        report_to=report_to or "none",
        load_best_model_at_end=load_best,
        metric_for_best_model=t.metric_for_best_model if eval_on else None,
        greater_is_better=t.higher_is_better if eval_on else None,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=t.dataloader_pin_memory and not use_cpu,
        # `sequential`: the dry run feeds its rows in the order it measures them.
        train_sampling_strategy="sequential" if sequential else "group_by_length" if t.group_by_length else "random",
        seed=t.seed, data_seed=t.seed,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=True,
        # Every LoRA parameter is used in every forward: skip DDP's extra graph walk.
        ddp_find_unused_parameters=False,
    )
    return TrainingArguments(**_for_this_transformers(kwargs))


def _check_scheduler_kwargs(kind: str, kwargs: dict[str, Any]) -> None:
    """Unknown schedule arguments would only fail as a TypeError once training starts."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)]
    allowed = [n for n in inspect.signature(schedule).parameters
               if n not in ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise AutotuneError(f"`training.lr_scheduler_kwargs` has {', '.join(f'`{k}`' for k in unknown)}, which "
                            f"`{kind}` does not take; it takes: {', '.join(allowed) or 'nothing'}")


def _for_this_transformers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Names moved within transformers 5.x: map ours onto what this version takes."""
    import inspect

    params = inspect.signature(TrainingArguments.__init__).parameters
    out = dict(kwargs)
    if "train_sampling_strategy" not in params:
        # Older 5.x: no sequential sampler; the dry run then times rows in a random order.
        out["group_by_length"] = out.pop("train_sampling_strategy") == "group_by_length"
    if "warmup_ratio" in params and isinstance(out.get("warmup_steps"), float):
        out["warmup_ratio"] = out.pop("warmup_steps")
    return out


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """transformers renamed gradient_checkpointing to activation_checkpointing in 5.x."""
    import inspect

    params = inspect.signature(TrainingArguments.__init__).parameters
    name = "activation_checkpointing" if "activation_checkpointing" in params else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def tensorboard_dir(config: Config, output_dir: Path) -> Path:
    return Path(config.training.logging_dir) if config.training.logging_dir else output_dir / "logs"


RESTORED = "optimizer, scheduler, RNG and data position restored"


# ------------------------------------------------------------------ trainer ---

class LlasaTrainer(Trainer):
    """HF Trainer with the speech-only lean loss, a count of real (non-padding)
    tokens, and the reliability guards: atomic checkpoints that never hold NaN
    weights, a one-line error on a full disk, no non-finite best metric, a
    seeded data order and the arguments' learning rate on resume."""

    # The lean loss returns sum / num_items_in_batch: already normalised over the accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, lean_loss: bool = True, lean_chunk_size: int = 1024, console: Any = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lean_loss = lean_loss
        self.lean_chunk_size = lean_chunk_size
        self.tokens_seen = 0  # non-padding training tokens on this process
        self.console = console
        self.nonfinite: NonFiniteGuard | None = None   # set by add_guards
        self.interrupt: InterruptCallback | None = None
        self.refused_saves: list[int] = []  # steps whose checkpoint held NaN/inf weights and was not written
        self.throughput: Any = None   # callbacks.ThroughputCallback, set by build_trainer
        self.micro_batch_size: int | None = None
        self.early: Any = None        # callbacks.EarlyStopRecorder, set by build_trainer

    def add_guards(self, nan_patience: int) -> None:
        """Register the NaN guard and the interrupt handling. Call it after adding
        every other callback: both end a step, and callbacks that act on a stopping
        step (the samples) must not take that for the end of training."""
        # fp16's gradient scaler skips overflowing steps itself while it calibrates.
        scaler = getattr(self.accelerator, "scaler", None)
        self.nonfinite = NonFiniteGuard(nan_patience, judge_gradients=scaler is None)
        self.interrupt = InterruptCallback()
        self.add_callback(self.nonfinite)
        self.add_callback(self.interrupt)

    # -- data order ---------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        grouped = (getattr(self.args, "train_sampling_strategy", None) == "group_by_length"
                   or getattr(self.args, "group_by_length", None) is True)
        if grouped and isinstance(dataset, ExampleDataset):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return EpochLengthGroupedSampler(dataset.lengths, group, seed=seed)
        return super()._get_train_sampler(train_dataset)

    # -- NaN/inf ------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        parts = inputs.get("micro_batches") if isinstance(inputs, dict) else None
        if parts is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            # One optimizer step's samples split by tokens (batches.TokenBudgetCollator): each part
            # is forward and backward on its own, so memory holds one part at a time; their losses
            # are sums over `num_items_in_batch` labelled tokens, so the gradients add up exactly.
            loss = None
            for j, part in enumerate(parts):
                last = j == len(parts) - 1
                sync = (contextlib.nullcontext() if last or self.accelerator.num_processes == 1
                        else self.accelerator.no_sync(model))
                with sync:
                    part_loss = super().training_step(model, part, num_items_in_batch)
                loss = part_loss if loss is None else loss + part_loss
        if self.nonfinite is not None:
            self.nonfinite.note_loss(loss)
        return loss

    def evaluate(self, *args, **kwargs):
        # Evaluation batches are plain rows: the token budget splits a training step only.
        from autotune.batches import TokenBudgetCollator

        collator = self.data_collator
        if isinstance(collator, TokenBudgetCollator):
            self.data_collator = collator.rows
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = collator

    def _get_num_items_in_batch(self, batch_samples, device):
        # Private, because HF counts labelled tokens from a top-level `labels` that a
        # token-budget step (a list of micro-batches) does not have; the collator counted them
        # on the host, so nothing waits for the device either.
        if batch_samples and isinstance(batch_samples[0], dict) and "micro_batches" in batch_samples[0]:
            count = torch.tensor(sum(b["num_labels"] for b in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return count
        return super()._get_num_items_in_batch(batch_samples, device)

    def _clip_grad_norm(self, model):
        # Private, because the public API does not hand the gradient norm to callbacks: the
        # NaN guard reads it (a device tensor) instead of reducing every gradient again.
        norm = super()._clip_grad_norm(model)
        if self.nonfinite is not None:
            self.nonfinite.grad_norm = norm
        return norm

    def floating_point_ops(self, inputs):
        parts = inputs.get("micro_batches") if isinstance(inputs, dict) else None
        if parts is None:
            return super().floating_point_ops(inputs)
        return sum(super(LlasaTrainer, self).floating_point_ops(part) for part in parts)

    def _determine_best_metric(self, metrics, trial):
        # np.less(nan, best) is False, but -inf would win: a non-finite metric is never the best.
        name = self.args.metric_for_best_model
        if name is not None:
            value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return False
        return super()._determine_best_metric(metrics, trial)

    # -- resume -------------------------------------------------------------

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.lr_scheduler is not None:
            retarget_learning_rate(self.optimizer, self.lr_scheduler, self.args.learning_rate)

    # -- checkpoints ----------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """HF's save, written into `.tmp-checkpoint-N` and renamed into place once
        complete (weights, optimizer, scheduler, RNG, trainer_state.json, then the
        manifest of sizes and hashes), so a kill at any moment leaves no half
        checkpoint for `--resume` to pick, and later damage is found."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        bad = nonfinite_parameters(self.model)
        if bad:
            self.refused_saves.append(step)
            warn(self.console, f"! not saving {final.name}: {len(bad)} adapter tensors hold NaN or inf "
                                f"(e.g. {bad[0]}); the previous checkpoints are kept")
            return
        staging = K.staging_dir(final)
        try:
            self._write_checkpoint(trial, run_dir, staging, final)
        except Exception as exc:
            free = K.free_bytes(run_dir)
            if not K.is_disk_full(exc, free):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            previous, _ = K.scan_checkpoints(run_dir)
            raise AutotuneError(K.disk_full_message(final.name, run_dir, free, previous)) from exc

    def _write_checkpoint(self, trial, run_dir: Path, staging: Path, final: Path) -> None:
        # Follows transformers' Trainer._save_checkpoint (5.x) with the folder swapped; no push to the hub.
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # a save of this step a kill cut short
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(staging), _internal_call=True)
        if self.state.best_global_step:
            self.accelerator.wait_for_everyone()
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if best == final or best.exists():   # `final` appears only at the rename below
                self.state.best_model_checkpoint = str(best)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        if main:
            for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(staging / "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process wrote its RNG state into `staging`
        if main:
            C.write_manifest(staging, self.state.global_step)   # last: a manifest means the save finished
            K.publish_checkpoint(staging, final)
        self.accelerator.wait_for_everyone()
        if main:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    # -- verified resume and best model --------------------------------------

    # False for a checkpoint the user named (`--resume checkpoint-N`): one that does not
    # fit is an error, not a fall back to an older one.
    resume_fallback = True
    best_refused: str | None = None   # "checkpoint-N: why", when the best checkpoint failed verification

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint:
            resume_from_checkpoint = self.verified_resume(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def verified_resume(self, checkpoint: str | bool) -> str | None:
        """`checkpoint` if it verifies against this model and trainer, else (with one
        line per checkpoint skipped) the newest older one in its folder that does, else
        None: training starts from step 0. With `resume_fallback` off, a checkpoint that
        does not verify is an error. `True` means the newest in the output folder."""
        expected = self.checkpoint_expectations()
        if checkpoint is True:
            found, skipped = C.newest_verified_checkpoint(Path(self.args.output_dir), expected)
            folder = Path(self.args.output_dir)
        else:
            path = Path(checkpoint)
            problem = C.verify_checkpoint(path, expected)
            if problem is None:
                self._note_unmanifested(path)
                say(self.console, f"resuming from {path} ({RESTORED})")
                return str(path)
            if not self.resume_fallback:
                raise AutotuneError(f"cannot resume from `{path}`: {problem}; pass another `checkpoint-N`, "
                                    f"or `--resume` alone for the newest one that fits")
            folder = path.parent
            found, skipped = C.newest_verified_checkpoint(folder, expected, below_step=C.checkpoint_step(path))
            skipped = [(path, problem), *skipped]
        for bad, why in skipped:
            warn(self.console, f"--resume: skipping {bad.name}: {why}")
        if found is None:
            warn(self.console, f"--resume: no checkpoint in {folder} fits this run; starting from step 0")
            return None
        self._note_unmanifested(found)
        say(self.console, f"resuming from {found} ({RESTORED})")
        return str(found)

    def _note_unmanifested(self, path: Path) -> None:
        if not C.has_manifest(path):
            warn(self.console, f"--resume: {path.name} has no manifest (saved by an older version): its files' "
                                "structure was checked, not their bytes")

    def checkpoint_expectations(self) -> C.Expected:
        """What a checkpoint must hold to load into this model, optimizer and schedule."""
        a = self.args
        groups = C.optimizer_layout(self.model, set(self.get_decay_parameter_names(self.model)), self.optimizer)
        try:
            samples = len(self.train_dataset)
        except TypeError:
            samples = None
        return C.Expected(
            adapter=C.adapter_shapes(self.model), optimizer_groups=groups,
            scheduler_keys=C.scheduler_keys(a.lr_scheduler_type, a.lr_scheduler_kwargs, len(groups)),
            max_steps=C.planned_max_steps(a.max_steps, samples, processes=a.world_size,
                                          micro_batch_size=a.per_device_train_batch_size,
                                          accumulation=a.gradient_accumulation_steps, epochs=a.num_train_epochs))

    def _load_best_model(self):
        # A best checkpoint damaged since it was saved would load wrong weights, or fail at the very end.
        best = Path(self.state.best_model_checkpoint)
        problem = C.verify_checkpoint(best, self.checkpoint_expectations())
        if problem:
            self.best_refused = f"{best.name}: {problem}"
            warn(self.console, f"! not loading the best checkpoint {best.name}: {problem}; keeping the final weights")
            return
        super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        # Counted by the collator on the host (batches.host_counts): no device sync per step.
        tokens = inputs.pop("num_tokens", None)
        inputs.pop("num_labels", None)
        positions = inputs.pop("label_positions", None)
        if model.training:
            if tokens is None:
                mask = inputs.get("attention_mask")
                tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self.tokens_seen += int(tokens)
        if not self.lean_loss:
            self.loss_is_scaled_for_ga = num_items_in_batch is not None and self.model_accepts_loss_kwargs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from autotune.loss import compute_lean_loss

        loss, _count = compute_lean_loss(model, {**inputs, "label_positions": positions},
                                         chunk_size=self.lean_chunk_size, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None:
            # A mean over this micro-batch: the Trainer must still divide by accumulation.
            self.loss_is_scaled_for_ga = False
        elif self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # num_items_in_batch counts every process's tokens; DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


# ---------------------------------------------------------------- callbacks ---


# ---------------------------------------------------------------- diagnosis ---


# ------------------------------------------------------------------ outputs ---


def retarget_learning_rate(optimizer, scheduler, learning_rate: float) -> None:
    """On resume the checkpoint restores the old peak learning rate into the
    scheduler and the optimizer; the arguments' one wins (a NaN rollback halves
    it), at the checkpoint's position in the schedule. A plain resume is untouched."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR) or all(base == learning_rate for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    values = [learning_rate * fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, value in zip(optimizer.param_groups, values):
        group["initial_lr"] = learning_rate
        group["lr"] = value
    scheduler._last_lr = values


# ----------------------------------------------------------------- building ---

def build_trainer(config: Config, model, *, train_set, val_set, collator, output_dir: Path, use_cpu: bool,
                  console: Any = None, processes: int = 1, notes: list[str] | None = None,
                  progress: bool = True, sequential: bool = False) -> LlasaTrainer:
    """The one trainer every fit uses, training and the dry run alike: its arguments from the
    config, the lean loss, and the standard callbacks. The throughput callback goes first, so
    that the loggers (TensorBoard) see the `tokens_per_second` it adds to each log."""
    from transformers.trainer_callback import PrinterCallback

    from autotune.training.callbacks import (EarlyStopRecorder, RichProgressCallback, ThroughputCallback,
                                             callbacks_for)

    from autotune.batches import LlasaCollator, TokenBudgetCollator

    t = config.training
    whole_steps = (config.data.token_budget and isinstance(collator, LlasaCollator) and t.gradient_accumulation_steps > 1
                   and len(train_set) > 0)
    if whole_steps:
        # What the dry run measured: micro-batch rows of the longest sample, in padded tokens.
        collator = TokenBudgetCollator(collator, t.per_device_train_batch_size * collator.width([max(train_set.lengths)]))
    args = training_arguments(config, output_dir, has_eval=val_set is not None and len(val_set) > 0,
                              use_cpu=use_cpu, notes=notes if notes is not None else [], sequential=sequential,
                              whole_steps=whole_steps)
    trainer = LlasaTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                           data_collator=collator, callbacks=callbacks_for(config, args.eval_strategy != "no"),
                           lean_loss=config.training.lean_loss, lean_chunk_size=config.training.lean_loss_chunk_size,
                           console=console)
    trainer.micro_batch_size = t.per_device_train_batch_size   # the plan's, whatever the dataloader hands over
    trainer.throughput = ThroughputCallback(trainer, processes)
    trainer.early = EarlyStopRecorder()
    trainer.remove_callback(PrinterCallback)  # the progress line shows the same, on one line
    trainer.callback_handler.callbacks.insert(0, trainer.throughput)
    trainer.add_callback(trainer.early)
    if progress and console is not None:
        trainer.add_callback(RichProgressCallback(console))
    return trainer


def stop_progress(trainer: LlasaTrainer) -> None:
    """A live progress bar would keep redrawing over whatever comes next."""
    from autotune.training.callbacks import RichProgressCallback

    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, RichProgressCallback) and cb.progress is not None:
            cb.progress.stop()
            cb.progress = None
