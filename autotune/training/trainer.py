"""The HF Trainer that trains Llasa: its arguments from the config, and `LlasaTrainer`, whose
step is the lean loss and whose checkpoints are published whole and verified on resume.
The dry run measures plans with this same trainer.

Built on what transformers documents (`compute_loss`, `training_step`, `get_batch_samples`,
`evaluate`, `train`, `TrainingArguments`, callbacks); the one private method it overrides is
named in `TRANSFORMERS_PRIVATE`, with why. transformers is pinned to the 5.25 series."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from autotune import checkpoint_checks as C
from autotune import checkpoints as K
from autotune.batches import LengthGroupedOrder, TokenBudgetCollator, with_4d_mask, without_mask_parts
from autotune.config import Config, config_rule_problems
from autotune.console import say, warn
from autotune.errors import AutotuneError
from autotune.rundir import checkpoint_step
from autotune.training.callbacks import (InterruptCallback, NonFiniteGuard, PublishCheckpoints,
                                         RefuseNonFiniteSaves)

# Pinning needs an accelerator; on a CPU the DataLoader says so and goes on unpinned, as it should.
warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator", category=UserWarning)


# -------------------------------------------------------------- arguments ---

def training_arguments(config: Config, output_dir: Path, *, has_eval: bool, use_cpu: bool,
                       notes: list[str], sequential: bool = False) -> TrainingArguments:
    """The config's `training` section as `TrainingArguments`, with the checks HF
    would otherwise raise as a traceback turned into one-line errors.

    The dataloader hands over one optimizer step's samples at once and the collator splits
    them into micro-batches (`batches.TokenBudgetCollator`): to the Trainer every step is one
    batch of `per_device_train_batch_size x gradient_accumulation_steps` samples. Its order is
    the dataset's (`batches.LengthGroupedOrder` when grouped by length), or random."""
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
    pin = t.dataloader_pin_memory
    checkpointing = t.gradient_checkpointing
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.per_device_train_batch_size * t.gradient_accumulation_steps,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        # HF's NaN check reads every micro-step's loss on the host; the NaN guard decides instead.
        logging_nan_inf_filter=False,
        torch_compile=t.torch_compile,
        # None (the default mode) until the schema has the key (plan.COMPILE_MODE)
        torch_compile_mode=getattr(t, "torch_compile_mode", None) if t.torch_compile else None,
        use_liger_kernel=t.use_liger_kernel,
        bf16=t.bf16, fp16=t.fp16,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
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
        # Pinned batches copied without blocking: the host queues the step while they travel. Asked for
        # on a CPU too, where there is nothing to pin or copy, so a CPU run takes the path a GPU's does.
        dataloader_pin_memory=pin,
        accelerator_config={"non_blocking": pin},
        # `sequential`: the dry run's rows, or a length-grouped order the dataset itself holds.
        train_sampling_strategy="sequential" if sequential or t.group_by_length else "random",
        seed=t.seed, data_seed=t.seed,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=True,
        # Every LoRA parameter is used in every forward: skip DDP's extra graph walk.
        ddp_find_unused_parameters=False,
    )


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


def tensorboard_dir(config: Config, output_dir: Path) -> Path:
    return Path(config.training.logging_dir) if config.training.logging_dir else output_dir / "logs"


RESTORED = "optimizer, scheduler, RNG and data position restored"

# Where the Trainer writes a checkpoint (`TrainingArguments.output_dir`): a hidden folder of the
# run, so that transformers' own save never touches the run's `checkpoint-N` folders. Each
# save is published from there, whole and verified (`callbacks.PublishCheckpoints`), and what
# a kill leaves there is removed on `--resume` (`checkpoints.clean_staging`, by its prefix).
STAGING_ROOT = K.STAGING_PREFIX + K.CHECKPOINT_PREFIX + "saves"

# The one private `Trainer` method overridden here, with why. tests/test_transformers_internals.py
# fails with a clear message when one changes signature (transformers is pinned to the 5.25 series).
TRANSFORMERS_PRIVATE = {
    "_clip_grad_norm": (("self", "model"), "hands the gradient norm the Trainer computes for clipping to the "
                                           "NaN guard, which no public hook receives; computing it again "
                                           "would reduce every gradient a second time each step"),
}


# ------------------------------------------------------------------ trainer ---

class LlasaTrainer(Trainer):
    """HF Trainer with the speech-only lean loss, a count of real (non-padding) tokens, and
    the reliability guards: checkpoints published whole and never with NaN weights, a
    one-line error on a full disk, no non-finite best metric, a seeded data order and the
    arguments' learning rate on resume. Everything but `_clip_grad_norm` goes through what
    transformers documents: `compute_loss`, `training_step`, `get_batch_samples`,
    `evaluate`, `train` and callbacks."""

    # The lean loss returns sum / num_items_in_batch: already normalised over the accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, run_dir: Path, lean_loss: bool = True, lean_chunk_size: int = 1024,
                 console: Any = None, mask_dtype: Any = None, build_mask: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.run_dir = Path(run_dir)
        self.lean_loss = lean_loss
        self.lean_chunk_size = lean_chunk_size
        self.build_mask = build_mask      # the 4-D mask ourselves (sdpa, eager); flash attention takes the 2-D one
        self.mask_dtype = mask_dtype      # eager attention adds its mask: 0 and the dtype's minimum
        self.tokens_seen = 0  # non-padding training tokens on this process
        self.console = console
        self.nonfinite: NonFiniteGuard | None = None   # set by add_guards
        self.interrupt: InterruptCallback | None = None
        self.refused_saves: list[int] = []  # steps whose checkpoint held NaN/inf weights and was not written
        self.throughput: Any = None   # callbacks.ThroughputCallback, set by build_trainer
        self.micro_batch_size: int | None = None
        self.early: Any = None        # callbacks.EarlyStopRecorder, set by build_trainer

    @property
    def staging_root(self) -> Path:
        return Path(self.args.output_dir)

    def add_guards(self, nan_patience: int) -> None:
        """Register the NaN guard, the interrupt handling and the refusal of checkpoints with
        NaN weights. Call it after adding every other callback: the first two end a step, and
        callbacks that act on a stopping step (the samples) must not take that for the end of
        training; the refusal must see every callback's wish to save."""
        # fp16's gradient scaler skips overflowing steps itself while it calibrates.
        scaler = getattr(self.accelerator, "scaler", None)
        self.nonfinite = NonFiniteGuard(nan_patience, judge_gradients=scaler is None)
        self.interrupt = InterruptCallback()
        self.add_callback(self.nonfinite)
        self.add_callback(self.interrupt)
        self.add_callback(RefuseNonFiniteSaves(self))

    # -- a step -------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The collator counted the labelled tokens on the host (`num_labels`): the loss divides by a
        # host number, where the Trainer's own count would be a tensor made inside the step.
        batches, counted = super().get_batch_samples(epoch_iterator, num_batches, device)
        labelled = [b.get("num_labels") if isinstance(b, dict) else None for b in batches]
        if not batches or any(n is None for n in labelled):
            return batches, counted
        total = sum(labelled)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Every process divides by all processes' tokens: a collective, once per step.
            total = self.accelerator.gather(torch.tensor(total, device=device)).sum()
        return batches, total

    def training_step(self, model, inputs, num_items_in_batch=None):
        parts = inputs.get("micro_batches") if isinstance(inputs, dict) else None
        if parts is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            # One optimizer step's samples split into micro-batches (batches.TokenBudgetCollator): each
            # is forward and backward on its own, so memory holds one at a time; their losses are sums
            # over `num_items_in_batch` labelled tokens, so the gradients add up exactly.
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

    def _clip_grad_norm(self, model):
        # Private: see TRANSFORMERS_PRIVATE. The NaN guard reads the norm (a device tensor).
        norm = super()._clip_grad_norm(model)
        if self.nonfinite is not None:
            self.nonfinite.grad_norm = norm
        return norm

    def floating_point_ops(self, inputs):
        parts = inputs.get("micro_batches") if isinstance(inputs, dict) else None
        if parts is None:
            return super().floating_point_ops(inputs)
        return sum(super(LlasaTrainer, self).floating_point_ops(part) for part in parts)

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
        # The 4-D mask made here: transformers would read a 2-D one back to decide whether it needs one.
        inputs = with_4d_mask(inputs, self.mask_dtype) if self.build_mask else without_mask_parts(inputs)
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

    def evaluate(self, *args, **kwargs):
        # Evaluation batches are plain rows: the token budget splits a training step only.
        collator = self.data_collator
        if isinstance(collator, TokenBudgetCollator):
            self.data_collator = collator.rows
        try:
            metrics = super().evaluate(*args, **kwargs)
        finally:
            self.data_collator = collator
        # What picks the best checkpoint (and early stopping, and the schedule) reads these after the
        # loggers did: a non-finite value becomes the worst one, so it is never the best.
        return worst_if_nonfinite(metrics, self.args.metric_for_best_model, bool(self.args.greater_is_better))

    # -- a run ----------------------------------------------------------------

    # False for a checkpoint the user named (`--resume checkpoint-N`): one that does not
    # fit is an error, not a fall back to an older one.
    resume_fallback = True
    best_refused: str | None = None   # "checkpoint-N: why", when the best checkpoint failed verification

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if resume_from_checkpoint:
            resume_from_checkpoint = self.verified_resume(resume_from_checkpoint)
        if self.args.should_save:
            shutil.rmtree(self.staging_root, ignore_errors=True)   # what an earlier attempt left half-written
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        except Exception as exc:
            free = K.free_bytes(self.run_dir)
            if not K.is_disk_full(exc, free):
                raise
            saving = sorted(p.name for p in self.staging_root.glob(f"{K.CHECKPOINT_PREFIX}*"))
            shutil.rmtree(self.staging_root, ignore_errors=True)
            previous, _ = K.scan_checkpoints(self.run_dir)
            what = saving[-1] if saving else f"the outputs of step {self.state.global_step}"
            raise AutotuneError(K.disk_full_message(what, self.run_dir, free, previous)) from exc

    def verified_resume(self, checkpoint: str | bool) -> str | None:
        """`checkpoint` if it verifies against this model and trainer, else (with one
        line per checkpoint skipped) the newest older one in its folder that does, else
        None: training starts from step 0. With `resume_fallback` off, a checkpoint that
        does not verify is an error. `True` means the newest in the run folder."""
        expected = self.checkpoint_expectations()
        if checkpoint is True:
            folder = Path(self.run_dir)
            found, skipped = C.newest_verified_checkpoint(folder, expected)
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
            found, skipped = C.newest_verified_checkpoint(folder, expected, below_step=checkpoint_step(path))
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


def worst_if_nonfinite(metrics: dict[str, Any], metric: str | None, greater_is_better: bool) -> dict[str, Any]:
    """`metrics` with the best-model metric replaced by the worst value for its direction when it
    is NaN or infinite: np.less(nan, best) is False, but -inf would win."""
    if metric is None:
        return metrics
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    value = metrics.get(key)
    if isinstance(value, (int, float)) and not math.isfinite(value):
        metrics[key] = -math.inf if greater_is_better else math.inf
    return metrics


# ------------------------------------------------------------------ resume ---

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


class ResumeLearningRate(TrainerCallback):
    """On a resume, the arguments' learning rate at the checkpoint's position in the schedule:
    training begins after the checkpoint's optimizer and scheduler are loaded."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is not None and lr_scheduler is not None:
            retarget_learning_rate(optimizer, lr_scheduler, args.learning_rate)


# ----------------------------------------------------------------- building ---

def build_trainer(config: Config, model, *, train_set, val_set, collator, output_dir: Path, use_cpu: bool,
                  console: Any = None, processes: int = 1, notes: list[str] | None = None,
                  progress: bool = True, sequential: bool = False) -> LlasaTrainer:
    """The one trainer every fit uses, training and the dry run alike: its arguments from the
    config, the lean loss, and the standard callbacks. The throughput callback goes first, so
    that the loggers (TensorBoard) see the `tokens_per_second` it adds to each log.

    `collator` makes one micro-batch (`batches.make_collator`); each step's samples are split
    into micro-batches by tokens (`data.token_budget`: as many rows as fit the padded tokens of
    `per_device_train_batch_size` rows of the longest sample, what the dry run measured) or by
    count. Checkpoints are written under the run's staging folder and published whole."""
    from transformers.trainer_callback import PrinterCallback

    from autotune.training.callbacks import (EarlyStopRecorder, RichProgressCallback, ThroughputCallback,
                                             callbacks_for)

    t = config.training
    micro = t.per_device_train_batch_size
    budget = (micro * collator.width([max(train_set.lengths)])
              if config.data.token_budget and len(train_set) > 0 else None)
    step_collator = TokenBudgetCollator(collator, budget, micro)
    if t.group_by_length and not sequential and len(train_set) > 0:
        train_set = LengthGroupedOrder(train_set, micro * t.gradient_accumulation_steps, seed=t.seed)
    args = training_arguments(config, Path(output_dir) / STAGING_ROOT, has_eval=val_set is not None and len(val_set) > 0,
                              use_cpu=use_cpu, notes=notes if notes is not None else [], sequential=sequential)
    attention = config.model.attn_implementation
    trainer = LlasaTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                           data_collator=step_collator, callbacks=callbacks_for(config, args.eval_strategy != "no"),
                           run_dir=Path(output_dir), lean_loss=t.lean_loss, lean_chunk_size=t.lean_loss_chunk_size,
                           console=console, build_mask=attention != "flash_attention_2",
                           mask_dtype=_input_dtype(model) if attention == "eager" else None)
    trainer.micro_batch_size = micro   # the plan's, whatever the dataloader hands over
    trainer.throughput = ThroughputCallback(trainer, processes)
    trainer.early = EarlyStopRecorder()
    trainer.remove_callback(PrinterCallback)  # the progress line shows the same, on one line
    trainer.callback_handler.callbacks.insert(0, trainer.throughput)
    trainer.add_callback(trainer.early)
    trainer.add_callback(ResumeLearningRate())
    trainer.add_callback(PublishCheckpoints(trainer))
    if progress and console is not None:
        trainer.add_callback(RichProgressCallback(console))
    return trainer


def _input_dtype(model) -> torch.dtype:
    """The dtype of what enters the attention (the embeddings'): transformers' eager mask is in it."""
    return model.get_input_embeddings().weight.dtype


def stop_progress(trainer: LlasaTrainer) -> None:
    """A live progress bar would keep redrawing over whatever comes next."""
    from autotune.training.callbacks import RichProgressCallback

    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, RichProgressCallback) and cb.progress is not None:
            cb.progress.stop()
            cb.progress = None
