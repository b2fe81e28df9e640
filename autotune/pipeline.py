"""The driver of `train.py`, top to bottom:

    the folder -> probe -> profile -> config -> data -> plan (dry run) -> train -> finish

Each step is a function here with what it needs passed in; the work lives one level down
(`tuning/`, `training/`, `data.py`, `rundir.py`). A sweep (`--sweep`) is `autotune.sweep`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from autotune import distributed, resuming
from autotune.config import Config, config_rule_problems, dump_yaml
from autotune.config_yaml import load_yaml_file
from autotune.errors import AutotuneError
from autotune.request import RunRequest
from autotune.signals import RunInterrupted, RunSignals, process_signals
from autotune.rundir import (AUTOTUNE_RECORD, RESOLVED_CONFIG, RUN_CONFIG, RUN_SUMMARY, RunFolder, finished_run,
                             nested_problem, path_text, write_json, write_text)
from autotune.run_summary import run_summary
from autotune.training.scoring import LoadedScorers, report_info, scoring_on, time_scorers
from autotune.tuning.plan import Plan

# PEFT looks up `tiny` on the hub when saving an adapter; the lookup is harmless
# offline and its warning only confuses.
warnings.filterwarnings("ignore", message="Unable to fetch remote file")
warnings.filterwarnings("ignore", message="Could not find a config file in")
# transformers 5 renamed gradient -> activation checkpointing; PEFT still calls the old names.
warnings.filterwarnings("ignore", message=".*checkpointing.* is deprecated and will be removed in v6", category=FutureWarning)


@dataclass
class Context:
    """What every step of one run shares: the request, where it writes, how it speaks, which
    process it is. What one step hands the next is passed as a value, not kept here."""

    request: RunRequest
    console: Console
    output_dir: Path
    signals: RunSignals              # the process's one signal policy
    is_main: bool = True
    processes: int = 1
    local_rank: int = 0
    notes: list[str] = field(default_factory=list)
    codec_cache: Path | None = None  # default: <output>/../.codec-cache; a sweep shares its parent's
    folder: RunFolder | None = None  # once claimed
    resume_changes: list[dict[str, Any]] = field(default_factory=list)   # accepted by --allow-changes

    def warn(self, message: str) -> None:
        # soft_wrap: a path or a command in the message stays whole to copy (the terminal wraps it).
        self.console.print(f"[yellow]! {escape(message)}[/yellow]", soft_wrap=True)

    @property
    def device(self) -> str:
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def make_context(request: RunRequest) -> Context:
    processes, rank, local_rank = distributed.world()
    console = Console(stderr=request.json, quiet=rank != 0)
    output = Path(request.output_dir) if request.output_dir else default_output_dir(request.data)
    return Context(request, console, output, process_signals(), is_main=rank == 0, processes=processes,
                   local_rank=local_rank, codec_cache=Path(request.codec_cache) if request.codec_cache else None)


def default_output_dir(data: str | None) -> Path:
    """`runs/<time>` here, unless here is inside the data folder (`cd dataset; python ../train.py
    --data .`): then `runs/<time>` beside the data folder, which a run never writes into."""
    from autotune.files import is_within

    name = datetime.now().strftime("%Y%m%d-%H%M%S")
    if data:
        try:
            folder = Path(data) if Path(data).is_dir() else Path(data).parent
            if is_within(Path.cwd(), folder):
                return Path(folder).resolve().parent / "runs" / name
        except OSError:
            pass
    return Path("runs") / name


def user_inputs(request: RunRequest) -> dict[str, Path]:
    """The user's own files a run reads: they may never be inside what the run writes or replaces."""
    named = {"--data": request.data, "--val": request.val, "--config": request.config}
    return {flag: Path(value) for flag, value in named.items() if value}


# ------------------------------------------------------------- the driver ---

def run(request: RunRequest, *, plan_cache: dict | None = None) -> int:
    """One whole run. `plan_cache` (the sweep's) maps a memory shape to a dry-run result, so
    trials that differ only in e.g. the learning rate share one."""
    ctx = make_context(request)
    ctx.signals.install()
    ctx.signals.start_run()
    try:
        return _run(ctx, plan_cache)
    except RunInterrupted as exc:
        if ctx.folder is not None:
            ctx.folder.restore()   # a replaced run comes back when the new one never trained
        return stopped_before_training(ctx, exc)
    except BaseException:
        if ctx.folder is not None:
            ctx.folder.restore()
        raise
    finally:
        ctx.signals.uninstall()
        if ctx.folder is not None:
            ctx.folder.release()


def _run(ctx: Context, plan_cache: dict | None) -> int:
    request = ctx.request
    given = None
    if request.plan:
        from autotune.tuning.plan import read_plan_file

        if request.auto or request.dry_run:
            flag = "--auto" if request.auto else "--dry-run"
            raise AutotuneError(f"`--plan` trains with a plan measured earlier and `{flag}` measures a new one: "
                                "drop one of them")
        given = read_plan_file(request.plan, ctx.processes)   # before `--overwrite` could touch it
    from autotune.data import find_layout

    find_layout(Path(request.data))  # a wrong --data path is the commonest mistake: say so first
    distributed.start(ctx.processes)
    folder = RunFolder(ctx.output_dir)
    action = decide_folder(ctx, folder)   # None for --check-data, which writes no run
    rec = probe_and_recommend(ctx)
    tokenizer, builder = load_tokenizer_for_data(ctx, rec.config)
    data = load_data(ctx, rec.config, builder)
    if request.check_data:
        return report_data(ctx, data)
    if scoring_on(rec.config):
        from autotune.training.scoring import check_metric_has_texts

        check_metric_has_texts(rec.config, data.val, data.train)
    if action == "resume":
        ctx.resume_changes = resuming.resume_changes(ctx.output_dir, rec.config, request.data,
                                                     allow_changes=request.allow_changes, pinned=rec.resolved.pinned)
        if ctx.resume_changes:
            ctx.notes.append(f"resumed with changed settings: {resuming.describe_changes(ctx.resume_changes)}")
        finished = finished_run(ctx.output_dir)   # its summary, when it ended
        if finished is not None and not resuming.extends_the_run(ctx.resume_changes):
            ctx.console.print(resuming.nothing_to_resume(ctx.output_dir, finished), markup=False, highlight=False,
                              soft_wrap=True)
            return 0
    claim_folder(ctx, folder, action)
    from autotune import tables

    tables.first_screen(ctx.console, rec, data.summary(), ctx.notes,
                        " (the dry run may change it)" if request.auto else
                        " (`--plan` replaces it)" if request.plan else "")
    plan, dry, scorers = choose_plan(ctx, rec, data, tokenizer, builder, given, plan_cache)
    if request.dry_run:
        return 0
    return train(ctx, rec, plan, dry, scorers, data, tokenizer, builder)


# ------------------------------------------------------------- the folder ---

def decide_folder(ctx: Context, folder: RunFolder) -> str:
    """What using `--output-dir` will do, decided before anything is changed, so that a
    folder we may not use is said before any work. An old run that a killed `--overwrite` left
    aside is put back first (or named, when that would lose something)."""
    request = ctx.request
    resume = "checkpoint" if request.resume not in (None, "latest") else bool(request.resume)

    def decide() -> str:
        problem = nested_problem(ctx.output_dir, user_inputs(request))
        if problem:
            raise AutotuneError(problem)
        for line in folder.recover_left_aside():
            ctx.warn(line)
        if request.check_data:
            return None
        return folder.check(resume=resume, overwrite=request.overwrite, dry_run=request.dry_run)

    return distributed.on_main_then_share(ctx.is_main, ctx.processes, decide)


def claim_folder(ctx: Context, folder: RunFolder, action: str) -> None:
    """Only now, with the config, the data and the folder all checked, is anything replaced."""
    if ctx.is_main:
        ctx.folder = folder
    distributed.on_main_then_share(ctx.is_main, ctx.processes, lambda: folder.claim(action))


def stopped_before_training(ctx: Context, exc) -> int:
    """A signal while the data was read or encoded, or during the dry run: one line, and how to
    go on. Audio encoded so far is in the codec cache, so nothing is encoded twice."""
    from autotune import signals

    argv, program = signals.command_line(ctx.request)
    if ctx.folder is not None and ctx.folder.path.is_dir():
        hint = "resume with: " + signals.resume_command(argv, ctx.output_dir, program)
    else:
        hint = "run the same command again (audio encoded so far is cached)"
    ctx.console.print(f"{exc.name} before training started: stopped, nothing was trained in "
                      f"`{path_text(ctx.output_dir)}`; {hint}", style="yellow", markup=False, highlight=False,
                      soft_wrap=True)
    return signals.EXIT_CODES.get(exc.name, 130)


def write_run_config(ctx: Context, config: Config) -> None:
    """run_config.yaml: marks the folder as a run and holds the config it trains with now
    (rewritten after an out-of-memory step-down or a NaN rollback), written whole or not at all."""
    if ctx.is_main:
        if not resuming.recorded_request(ctx.output_dir) or ctx.resume_changes:
            resuming.record_request(ctx.output_dir, ctx.request.data)
        write_text(ctx.output_dir / RUN_CONFIG, dump_yaml(config))


# ------------------------------------------------------ probe and config ---

def probe_and_recommend(ctx: Context):
    """probe -> profile -> config: the GPUs through NVML, the guide's profile for them, and the
    user's file and flags on top; every config rule checked before any data or model is read."""
    from autotune.hardware import probe
    from autotune.profiles import recommend

    result = probe()
    gpus = result.gpus[: ctx.processes] if result.gpus else []   # one GPU per process
    request = ctx.request
    user_yaml = load_yaml_file(request.config) if request.config else None
    rec = recommend(gpus, user_yaml=user_yaml, sets=request.config_sets())
    rec.warnings = list(result.warnings) + rec.warnings
    if not gpus and result.reason:
        rec.reasons.insert(0, f"no GPU: {result.reason}")
    if not request.check_data and rec.config.samples.num_texts > 0:
        from autotune.training.samples import check_reference

        check_reference(rec.config.samples)  # a bad clip is found now, not after the model loads
    problems = config_rule_problems(rec.config) + logging_dir_problems(rec.config)
    if problems:
        raise AutotuneError(f"invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
                            details=problems)
    if rec.config.autotune.vram_limit_gib is not None and not gpus:
        rec.warnings.append("`--vram-limit` has no effect without a GPU")
    return rec


def logging_dir_problems(config: Config) -> list[str]:
    """TensorBoard's folder is made when training starts: a file in its way, or a place no one may
    write (`/proc/...`), is said now, before anything loads."""
    from autotune.files import folder_problem

    t = config.training
    if not t.logging_dir or "tensorboard" not in t.report_to:
        return []
    problem = folder_problem(t.logging_dir)
    return [f"`training.logging_dir` {t.logging_dir}: {problem}; choose a folder you can write, or leave it "
            "out for `<output>/logs`"] if problem else []


# ------------------------------------------------------------------- data ---

def load_tokenizer_for_data(ctx: Context, config: Config):
    """The model's tokenizer (it counts prompt tokens exactly). For `--check-data` a tokenizer
    that is not on disk is no error: the offline replica of Llasa's counts exactly, and without
    it lengths are estimated conservatively."""
    from autotune.llasa import PromptBuilder
    from autotune.model import load_tokenizer

    name = config.model.name_or_path
    try:
        tokenizer = load_tokenizer(name, trust_remote_code=config.model.trust_remote_code,
                                   local_only=ctx.request.check_data)
    except AutotuneError:
        if not ctx.request.check_data:
            raise
        from autotune import replica

        if replica.replica_available():
            ctx.notes.append(f"the tokenizer of `{name}` is not available locally: prompt lengths are counted "
                             "with the offline replica of Llasa's tokenizer (exact for Llasa models)")
            tokenizer = replica.build_llasa_tokenizer()
            return tokenizer, PromptBuilder(tokenizer, config.data.text_normalization)
        ctx.notes.append(f"the tokenizer of `{name}` is not available locally: prompt lengths are conservative "
                         "estimates (UTF-8 bytes + 64 template tokens); `pip install \"llasa-autotune[replica]\"` "
                         "counts them exactly")
        return None, None
    return tokenizer, PromptBuilder(tokenizer, config.data.text_normalization)


def codec_cache_dir(ctx: Context) -> Path:
    # Next to the runs, not inside the user's data folder, shared by every run.
    return ctx.codec_cache or ctx.output_dir.parent / ".codec-cache"


def load_data(ctx: Context, config: Config, builder):
    from autotune.data import MAX_NAMED_SPEAKERS, load_dataset

    def codec_loader():
        import torch

        from autotune.codec import DeferredCodec

        # Loads the weights only if some audio is not in the cache yet.
        return DeferredCodec(config.data.codec, device="cuda" if torch.cuda.is_available() else "cpu")

    data = load_dataset(ctx.request.data, max_length=config.data.max_length, val_fraction=config.data.val_fraction,
                        split_seed=config.data.split_seed, eval_data=config.eval_data_dir, prompt_builder=builder,
                        codec_loader=codec_loader, cache_dir=codec_cache_dir(ctx),
                        max_errors_shown=config.data.max_errors_shown,
                        progress=ctx.is_main and not ctx.request.json,
                        allow_outside_paths=config.data.allow_outside_paths,
                        text_normalization=config.data.text_normalization,
                        ljspeech_column=config.data.ljspeech_column,
                        codec_optional=ctx.request.check_data, recorded_split=recorded_split(ctx))
    ctx.notes.extend(data.notes)
    speakers = len(data.speakers())
    if data.speaker_conditioning:
        ctx.notes.append(f"{speakers} speakers: each prompt names its speaker "
                         "(`Speaker NAME`, as Llasa's multi-speaker recipe); `synthesize.py --speaker NAME` picks one")
    elif speakers > 1:
        ctx.notes.append(f"{speakers} speakers, more than {MAX_NAMED_SPEAKERS}: prompts name none (trained as one "
                         "set of voices); keep only the speakers you want in the data to name them")
    return data


def recorded_split(ctx: Context) -> dict[str, Any] | None:
    """On `--resume`, the split the run started with (split.json): validation stays what it was,
    whatever the data gained since."""
    from autotune.files import read_user_json
    from autotune.rundir import SPLIT_RECORD

    path = ctx.output_dir / SPLIT_RECORD
    if not ctx.request.resume or ctx.request.check_data or not path.is_file():
        return None
    try:
        record = read_user_json(path, what="split record")
    except AutotuneError:
        return None   # damaged: the split is drawn again, as for a new run
    return record if isinstance(record, dict) else None


def report_data(ctx: Context, data) -> int:
    summary = data.summary()
    summary["notes"] = list(ctx.notes)
    if ctx.request.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    from autotune import tables

    tables.data_table(ctx.console, summary, ctx.notes)
    return 0


# ------------------------------------------------------------------- plan ---

def choose_plan(ctx: Context, rec, data, tokenizer, builder, given, plan_cache: dict | None):
    """The plan to train with: a `--plan` file's, a dry run's (`--auto`, `--dry-run`), or the
    profile's as it is -> (plan, the dry run or None, the scorers it loaded and timed or None)."""
    from autotune.tuning.plan import memory_shape

    config = rec.config
    plan = Plan.from_config(config, ctx.processes)
    if given is not None:
        return check_given_plan(ctx, rec, *given), None, None
    if not (ctx.request.auto or ctx.request.dry_run):
        return plan, None, None
    key = memory_shape(plan, config)
    if plan_cache is not None and key in plan_cache:
        dry = plan_cache[key]
        ctx.console.print(f"dry run: reusing the plan measured for the same memory shape ({dry.plan.label()})")
        return dry.plan, dry, None
    dry, scorers = dry_run(ctx, rec, data, tokenizer, builder, plan)
    if plan_cache is not None:
        plan_cache[key] = dry
    return dry.plan, dry, scorers


def check_given_plan(ctx: Context, rec, plan: Plan, measured: dict[str, Any]) -> Plan:
    from autotune.profiles import lowest_cc, runnable_precisions
    from autotune.tuning.plan import check_plan_fits

    check_plan_fits(plan, measured, where=f"`--plan {ctx.request.plan}`", processes=ctx.processes,
                    config=rec.config, pinned=rec.resolved.pinned,
                    runnable_precisions=runnable_precisions(lowest_cc(rec.gpus)),
                    optimizer_runs=_optimizer_runs_here(plan["training.optim"], rec))
    ctx.console.print(f"plan from {ctx.request.plan}: {plan.label()} (effective batch {plan.effective_batch_size})",
                      highlight=False, soft_wrap=True, markup=False)
    return plan


def _optimizer_runs_here(optim: str, rec) -> bool:
    """The same rule the profile applies: fused AdamW needs CUDA, the 8-bit optimizers bitsandbytes."""
    from autotune.profiles import adapt_to_hardware

    adapted, _ = adapt_to_hardware({"training": {"optim": optim}}, rec.gpus)
    return adapted["training"]["optim"] == optim


def dry_run(ctx: Context, rec, data, tokenizer, builder, start: Plan) -> tuple[Any, LoadedScorers | None]:
    """The dry run, and the scorers it loaded and timed (reused by the training)."""
    from autotune import tables
    from autotune.batches import build_examples, make_collator
    from autotune.tuning import dryrun
    from autotune.tuning.plan import measured_with

    config = rec.config
    device = ctx.device
    examples = build_examples(data.train, builder)
    val_examples = build_examples(data.val, builder) if data.val else []
    longest_val = max(data.val or data.train, key=lambda s: s.num_tokens)

    def collator_for(plan_config: Config):
        return make_collator(builder.tokens.pad, plan_config.data.packing, builder.tokens.hidden_from_attention,
                             compiled=plan_config.training.torch_compile)

    def log(attempt):
        mark = "[green]fits[/green]" if attempt.ok else "[red]no[/red]"
        peak = f"{attempt.peak_bytes / 2**30:.2f} GiB" if attempt.peak_bytes else "-"
        tps = f"{attempt.tokens_per_second:,.0f} tok/s" if attempt.tokens_per_second else ""
        ctx.console.print(f"  {mark} {attempt.plan.label()}  peak {peak} {tps}  ({attempt.why})"
                          + (f": {attempt.error}" if attempt.error else ""))

    result = dryrun.dry_run(config, start, pinned=rec.resolved.pinned, examples=examples, val_examples=val_examples,
                            collator_for=collator_for, device=device, tokenizer=tokenizer, run_tokens=run_tokens(config, data),
                            sample_text=longest_val.text if config.samples.num_texts > 0 else None,
                            workdir=ctx.output_dir if ctx.output_dir.is_dir() else None, log=log,
                            announce=ctx.console.print)
    if ctx.processes > 1:
        mine = rec.gpus[min(ctx.local_rank, len(rec.gpus) - 1)].total_bytes if rec.gpus else 0
        chosen, rank = distributed.agree_on_plan(ctx.processes, mine, result.plan.to_dict())
        agreed = Plan.from_record(chosen)
        if agreed != result.plan:
            ctx.console.print(f"plan of process {rank} (smallest GPU) used by all: {agreed.label()}")
        result.plan = agreed
    record = result.to_dict()
    record["device"] = device
    record["measured_with"] = measured_with(config)
    scorers = None
    if ctx.is_main and scoring_on(config):
        scorer, record["scores"] = time_scorers(config, warn=ctx.warn, say=ctx.console.print)
        scorers = LoadedScorers(scorer, record["scores"])
    if ctx.request.json and ctx.request.dry_run:
        print(json.dumps(record, indent=2))
    tables.attempts_table(ctx.console, result)
    if ctx.is_main:
        write_json(ctx.output_dir / AUTOTUNE_RECORD, record)
    return result, scorers


def run_tokens(config: Config, data) -> float:
    """About how many tokens the run will train: what a one-off cost (compilation) is weighed against."""
    t = config.training
    per_epoch = sum(s.num_tokens for s in data.train)
    if t.max_steps > 0:
        per_sample = per_epoch / max(1, len(data.train))
        return t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * per_sample
    return per_epoch * t.num_train_epochs


# ------------------------------------------------------------------ train ---

def train(ctx: Context, rec, plan: Plan, dry, scorers: LoadedScorers | None, data, tokenizer, builder) -> int:
    from autotune.training import recovery
    from autotune.tuning.dryrun import apply_vram_limit

    device = ctx.device
    apply_vram_limit(rec.config, device)
    resume_from = recovery.resolve_resume(ctx.request.resume, ctx.output_dir, ctx.console, ctx.is_main)
    setting = recovery.FitSetting(
        output_dir=ctx.output_dir, device=device, console=ctx.console, signals=ctx.signals, data=data,
        tokenizer=tokenizer, builder=builder, pinned=rec.resolved.pinned, is_main=ctx.is_main,
        processes=ctx.processes, notes=ctx.notes, named_checkpoint=ctx.request.resume not in (None, "latest"),
        on_training_started=(ctx.folder.training_started if ctx.folder is not None else lambda: None),
        write_config=lambda config: write_run_config(ctx, config), keeper=make_keeper(ctx, rec, plan, device, scorers))
    result = recovery.fit(rec.config, plan, setting, resume_from)
    return finish(ctx, rec, dry, data, tokenizer, result, setting.keeper)


def make_keeper(ctx: Context, rec, plan: Plan, device: str, scorers: LoadedScorers | None):
    """The run's `ScoreKeeper` when scores are on (on every process: all take part in choosing the
    best), with the scorers the dry run loaded when it did."""
    if not scoring_on(rec.config):
        return None
    from autotune.training.scoring import ScoreKeeper

    keeper = ScoreKeeper(rec.config, ctx.output_dir, training_device=device, console=ctx.console,
                         report_info=report_info(ctx.output_dir, rec, plan),
                         scorer=scorers.scorer if scorers else None, warn=ctx.warn)
    keeper.timing = scorers.timing if scorers else None
    if ctx.request.resume:
        keeper.restore()
    return keeper


# ----------------------------------------------------------------- finish ---

def finish(ctx: Context, rec, dry, data, tokenizer, result, keeper) -> int:
    """The summary, the adapter and its model card, the plots; the resume hint when stopped."""
    from autotune import signals, tables
    from autotune.checkpoints import newest_checkpoint
    from autotune.diagnosis import diagnose
    from autotune.model_card import write_model_card
    from autotune.rundir import MERGED_DIR
    from autotune.training.outputs import save_adapter

    trainer, config = result.outcome.trainer, result.config
    interrupted = trainer.interrupt.requested if result.outcome.interrupted else None
    history = trainer.state.log_history
    out = ctx.output_dir
    findings = diagnose(history, config)
    summary = run_summary(rec, dry, data, result, findings, keeper=keeper, plan_from=ctx.request.plan,
                          resume_changes=ctx.resume_changes, notes=ctx.notes)
    summary["adapter_saved"] = False
    if ctx.is_main:
        # A signal now waits for these files to be whole: a run stopped here is still complete.
        with ctx.signals.saving():
            # An interrupted run is unfinished: its adapter so far is in its checkpoint, not the output folder.
            saved = not interrupted and save_adapter(trainer.model, out, ctx.console)
            summary["adapter_saved"] = bool(saved)
            write_text(out / RESOLVED_CONFIG, dump_yaml(config))
            if ctx.request.merge and saved:
                merged = trainer.model.merge_and_unload()
                merged.save_pretrained(str(out / MERGED_DIR))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(out / MERGED_DIR))
                summary["merged"] = MERGED_DIR
            if saved:
                write_model_card(out, summary, config.to_dict(), data.summary())
            summary["signal_after_last_step"] = ctx.signals.received if not interrupted else None
            write_json(out / RUN_SUMMARY, summary)
            write_final_report(ctx, rec, result, summary, keeper)
    if interrupted:
        newest = newest_checkpoint(out)
        argv, program = signals.command_line(ctx.request)
        ctx.console.print(f"{interrupted}: stopped at step {summary['steps']} of {summary['max_steps']}; "
                          f"the newest checkpoint is {newest or 'none'}. Resume with:", style="yellow", markup=False)
        ctx.console.print("  " + signals.resume_command(argv, out, program), soft_wrap=True, markup=False,
                          highlight=False)
        return signals.EXIT_CODES[interrupted]
    tables.final_table(ctx.console, out, summary, findings)
    if ctx.signals.received:
        # Training had ended when the signal came: the run is whole, nothing to resume.
        ctx.console.print(f"{ctx.signals.received} after the last step: the run finished and was saved whole",
                          style="yellow", markup=False)
        return signals.EXIT_CODES.get(ctx.signals.received, 130)
    return 0


def write_final_report(ctx: Context, rec, result, summary: dict[str, Any], keeper) -> None:
    """report.html as the run ended (with or without scores): the headline, the curves, the clips."""
    from autotune.training.scoring import headline, write_run_report

    trainer = result.outcome.trainer
    write_run_report(ctx.output_dir, report_info(ctx.output_dir, rec, result.plan), trainer.state,
                     keeper.evaluations if keeper is not None else [], trainer.args.metric_for_best_model or "eval_loss",
                     summary=headline(summary), warn=ctx.warn)
