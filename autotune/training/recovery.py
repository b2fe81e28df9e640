"""One fit, and the retries around it: out of memory takes the next rung of the ladder and
resumes from the newest checkpoint with the same effective batch; `training.nan_patience`
non-finite steps in a row roll back to the last good checkpoint with the guide's remedies.

`fit` is what the driver calls; `fit_once` builds the model and the trainer (the same
`build_trainer` the dry run measures with) and trains.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from autotune import checkpoints as K
from autotune.batches import ExampleDataset, build_examples, make_collator
from autotune.config import Config
from autotune.data import DataReport, drop_too_long, split_record
from autotune.errors import AutotuneError
from autotune.memory import free_memory, is_oom
from autotune.plan import Plan, next_rung
from autotune.rundir import RUN_CONFIG, SPLIT_RECORD, path_text, write_failure, write_json

MAX_NAN_ROLLBACKS = 2
# What a checkpoint's adapter and optimizer state fix: resuming with other values cannot load it.
RESUME_FIXED_KEYS = frozenset({"lora.r", "lora.lora_alpha", "lora.target_modules", "training.optim"})


@dataclass
class FitSetting:
    """What a fit needs from the run, besides the config and the plan."""

    output_dir: Path
    device: str
    console: Any
    signals: Any                      # signals.RunSignals
    data: DataReport
    tokenizer: Any
    builder: Any                      # llasa.PromptBuilder
    pinned: set[str]
    is_main: bool = True
    processes: int = 1
    named_checkpoint: bool = False    # `--resume checkpoint-N`: one that does not fit is an error, not a fall back
    notes: list[str] = field(default_factory=list)
    on_training_started: Callable[[], None] = lambda: None
    write_config: Callable[[Config], None] = lambda config: None
    keeper: Any = None                # scoring.ScoreKeeper when `scores` are on: one for the whole run


@dataclass
class Outcome:
    trainer: Any = None
    oom_error: str | None = None
    interrupted: bool = False


@dataclass
class FitResult:
    outcome: Outcome
    config: Config
    plan: Plan
    recoveries: list[dict[str, Any]]
    nan_rollbacks: list[dict[str, Any]]
    nonfinite_steps: list[int]
    wall_seconds: float


def fit(config: Config, plan: Plan, setting: FitSetting, resume_from: Path | None) -> FitResult:
    """Train with `plan`, stepping down on out of memory and rolling back on NaN."""
    config = plan.apply(config)
    if resume_from:
        check_resume_matches(resume_from, config)
    setting.write_config(config)
    train_set, val_set = datasets(setting, config.data.max_length)
    collator = make_collator(setting.builder.tokens.pad, config.data.packing,
                             setting.builder.tokens.hidden_from_attention, compiled=config.training.torch_compile)
    recoveries: list[dict[str, Any]] = []
    nan_rollbacks: list[dict[str, Any]] = []
    nonfinite_steps: list[int] = []
    started = time.time()
    while True:
        outcome = fit_once(config, plan, setting, train_set, val_set, collator, resume_from)
        if outcome.oom_error is None:
            guard = outcome.trainer.nonfinite
            nonfinite_steps += guard.skipped_steps
            if guard.exhausted_at is None or outcome.interrupted:  # a Ctrl-C wins over a rollback
                break
            # `nan_patience` non-finite steps in a row: back to the last checkpoint with the guide's remedies.
            outcome = None  # this attempt's model goes before the next one loads
            free_memory()
            config, rollback = nan_rollback(config, guard, len(nan_rollbacks), setting.output_dir)
            setting.write_config(config)
            nan_rollbacks.append(rollback)
            resume_from = Path(rollback["resumed_from"]) if rollback["resumed_from"] else None
            setting.console.print(describe_rollback(rollback), style="yellow", markup=False, highlight=False)
            continue
        # Out of memory mid-training: next rung, same effective batch, from the newest checkpoint.
        free_memory()
        from autotune.profiles import bitsandbytes_installed

        cuda = setting.device.startswith("cuda")
        # Only rungs a checkpoint can resume into: a new rank or optimizer would not load its state.
        step = next_rung(plan, setting.pinned | RESUME_FIXED_KEYS,
                         {"cuda": cuda, "bitsandbytes": cuda and bitsandbytes_installed()})
        if step is None or len(recoveries) >= config.autotune.oom_retries:
            raise AutotuneError(f"out of memory during training ({outcome.oom_error}) and no recovery is left "
                                f"after {len(recoveries)} retries: lower `training.per_device_train_batch_size` or "
                                "use `--auto`; checkpoints so far are kept in the output folder")
        why, plan = step
        config = plan.apply(config)
        setting.write_config(config)   # a run killed from here on resumes with the stepped-down plan
        if config.data.max_length < max(len(e["input_ids"]) for e in train_set.examples):
            train_set, val_set = datasets(setting, config.data.max_length)
        resume_from = K.newest_checkpoint(setting.output_dir)
        recoveries.append({"error": outcome.oom_error, "rung": why, "plan": plan.to_dict(),
                           "resumed_from": str(resume_from) if resume_from else None})
        setting.console.print(f"[yellow]out of memory during training: retrying with {why} ({plan.label()}), "
                              f"from {resume_from or 'the start'}[/yellow]")
    return FitResult(outcome, config, plan, recoveries, nan_rollbacks, nonfinite_steps, time.time() - started)


def datasets(setting: FitSetting, max_length: int):
    """Train/val examples at the plan's max length; what it drops is listed, never cut."""
    data = setting.data
    data.train = drop_too_long(data.train, max_length, data.skipped)
    data.val = drop_too_long(data.val, max_length, data.skipped)
    if not data.train:
        raise AutotuneError(f"no training sample is shorter than {max_length} tokens: "
                            "use a GPU with more memory or `--set model.load_in_4bit=true`")
    if setting.is_main:
        write_json(setting.output_dir / SPLIT_RECORD, split_record(data))
    if data.skipped:
        setting.console.print(f"[yellow]skipped {len(data.skipped)} samples longer than {max_length} tokens "
                              f"(listed in {SPLIT_RECORD})[/yellow]")
    return (ExampleDataset(build_examples(data.train, setting.builder)),
            ExampleDataset(build_examples(data.val, setting.builder)) if data.val else None)


def fit_once(config: Config, plan: Plan, setting: FitSetting, train_set, val_set, collator,
             resume_from: Path | None) -> Outcome:
    """Build the model and the trainer, and train once; an out-of-memory error comes back as
    `Outcome.oom_error`, raised outside the handler so its tensors can be freed."""
    import os

    from transformers import set_seed

    from autotune.model import apply_lora, load_base_model
    from autotune.training.samples import maybe_add_sample_callback
    from autotune.training.trainer import build_trainer, stop_progress, tensorboard_dir

    set_seed(config.training.seed)  # the LoRA init draws from the global RNG: same seed, same run
    base = load_base_model(config.model.name_or_path, precision=plan.precision,
                           attn_implementation=config.model.attn_implementation,
                           trust_remote_code=config.model.trust_remote_code, load_in_4bit=plan.load_in_4bit,
                           device=setting.device)
    model = apply_lora(base, r=config.lora.r, lora_alpha=config.lora.lora_alpha, lora_dropout=config.lora.lora_dropout,
                       target_modules=config.lora.target_modules, bias=config.lora.bias,
                       gradient_checkpointing=config.training.gradient_checkpointing, quantized=plan.load_in_4bit)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(config, setting.output_dir))
    trainer = build_trainer(config, model, train_set=train_set, val_set=val_set, collator=collator,
                            output_dir=setting.output_dir, use_cpu=not setting.device.startswith("cuda"),
                            console=setting.console, processes=setting.processes, notes=setting.notes)
    data = setting.data
    if setting.keeper is not None:
        setting.keeper.use_data(data.val, data.train)
    maybe_add_sample_callback(trainer, config, setting.output_dir, setting.tokenizer, data.val, setting.console,
                              train=data.train, should_stop=lambda: trainer.interrupt.requested is not None,
                              keeper=setting.keeper)
    trainer.add_guards(config.training.nan_patience)  # last: they end a step
    trainer.resume_fallback = not setting.named_checkpoint
    K.require_room_for_checkpoints(setting.output_dir, model, config.training.optim)
    error = None
    try:
        setting.on_training_started()
        with setting.signals.training(trainer.interrupt):  # Ctrl-C/SIGTERM/SIGHUP: finish the step, save, stop
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as exc:
        if not is_oom(exc):
            unwritable = None if isinstance(exc, AutotuneError) else write_failure(exc)
            if unwritable is None:
                raise
            previous = K.newest_checkpoint(setting.output_dir)
            kept = (f"the newest whole checkpoint, `{previous.name}`, is kept" if previous is not None
                    else "no checkpoint was saved yet")
            raise AutotuneError(f"cannot write in `{path_text(setting.output_dir)}` ({unwritable}); {kept}: make "
                                "the folder writable (or free space) and continue with `--resume`") from None
        error = " ".join(str(exc).split())[:200]
    finally:
        stop_progress(trainer)
    if error is not None:
        del trainer, model, base
        return Outcome(oom_error=error)
    return Outcome(trainer, interrupted=trainer.interrupt.stopped_at is not None)


# ------------------------------------------------------------------ resume ---

def check_resume_matches(checkpoint: Path, config: Config) -> None:
    """A changed LoRA shape or optimizer would fail deep inside loading: say so first."""
    import yaml

    try:
        saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the checkpoint checks already vetted it; nothing to compare
    now = {"lora.r": config.lora.r, "lora.lora_alpha": config.lora.lora_alpha,
           "lora.target_modules": sorted(config.lora.target_modules)}
    before = {"lora.r": saved.get("r"), "lora.lora_alpha": saved.get("lora_alpha"),
              "lora.target_modules": sorted(saved.get("target_modules") or [])}
    try:
        run_config = yaml.safe_load((checkpoint.parent / RUN_CONFIG).read_text(encoding="utf-8")) or {}
        before["training.optim"] = run_config.get("training", {}).get("optim")
        now["training.optim"] = config.training.optim
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    changed = [k for k in now if before.get(k) is not None and before[k] != now[k]]
    if changed:
        what = ", ".join(f"`{k}` {before[k]} -> {now[k]}" for k in changed)
        raise AutotuneError(f"cannot resume `{checkpoint}` with a different {what}: its adapter and optimizer state "
                            f"were saved with the old value; drop the change or start a new `--output-dir`")


def resolve_resume(resume: str | None, output_dir: Path, console: Any, is_main: bool = True) -> Path | None:
    """The checkpoint `--resume` continues from: the newest that verifies, or the one named."""
    from rich.markup import escape

    if not resume:
        return None
    if resume == "latest":
        if is_main:
            for leftover in K.clean_staging(output_dir):
                console.print(f"--resume: removed {escape(leftover.name)}, a save that was cut short")
        found, skipped = K.scan_checkpoints(output_dir)
        for path, why in skipped:
            console.print(f"[yellow]--resume: skipping {escape(path.name)}: {escape(why)}[/yellow]")
        if found is None:
            console.print(f"[yellow]--resume: no complete checkpoint in {output_dir}; starting from step 0[/yellow]")
        return found
    path = Path(resume)
    problem = K.checkpoint_problem(path)
    if problem:
        raise AutotuneError(f"`--resume {resume}` is not a complete checkpoint ({problem}): "
                            f"pass a `checkpoint-N` folder, or `--resume` alone for the newest in `{output_dir}`")
    return path


# ----------------------------------------------------------------- NaN/inf ---

def nan_remedies(learning_rate: float, max_grad_norm: float, warmup_ratio: float) -> dict[str, float]:
    """The guide's remedies for a NaN loss: half the learning rate, clip at 0.5, warm up longer."""
    return {"learning_rate": learning_rate / 2, "max_grad_norm": min(max_grad_norm, 0.5),
            "warmup_ratio": max(0.1, warmup_ratio)}


def nan_rollback(config: Any, guard: Any, rollbacks_so_far: int, output_dir: Path) -> tuple[Any, dict]:
    """After `guard` gave up: the config with the remedies and the record of the
    rollback to the newest complete checkpoint (None: the start). Raises once
    `MAX_NAN_ROLLBACKS` are spent."""
    from autotune.errors import AutotuneError

    t = config.training
    if rollbacks_so_far >= MAX_NAN_ROLLBACKS:
        raise AutotuneError(nan_give_up_message(guard.exhausted_at, guard.patience, rollbacks_so_far, t, output_dir))
    remedies = nan_remedies(t.learning_rate, t.max_grad_norm, t.warmup_ratio)
    config = config.model_copy(update={"training": t.model_copy(update=remedies)})
    resume_from = K.scan_checkpoints(output_dir)[0]
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
