"""The driver of `train.py`, top to bottom:

    check_output_dir -> probe_and_recommend -> load_data -> first_screen
    -> dry_run (with --auto) -> train -> finish

Each step is a named function here; the work lives in the modules they call.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from autotune.config import (Config, changed_keys, config_rule_problems, dump_yaml, get_dotted, load_yaml_file,
                             validate)
from autotune.errors import AutotuneError

# PEFT looks up `tiny` on the hub when saving an adapter; the lookup is harmless
# offline and its warning only confuses.
warnings.filterwarnings("ignore", message="Unable to fetch remote file")
warnings.filterwarnings("ignore", message="Could not find a config file in")
# transformers 5 renamed gradient -> activation checkpointing; PEFT still calls the old names.
warnings.filterwarnings("ignore", message=".*checkpointing.* is deprecated and will be removed in v6", category=FutureWarning)



@dataclass
class Context:
    args: argparse.Namespace
    console: Console
    output_dir: Path
    is_main: bool = True
    processes: int = 1
    local_rank: int = 0
    notes: list[str] = field(default_factory=list)
    codec_cache: Path | None = None  # default: <output>/../.codec-cache; a sweep shares its parent's
    signals: Any = None              # reliability.RunSignals, installed for the whole run
    folder: Any = None               # rundir.RunFolder, once claimed
    resume_changes: list[dict[str, Any]] = field(default_factory=list)   # accepted by --allow-changes


# ------------------------------------------------------------- the driver ---

def run(args: argparse.Namespace, *, plan_cache: dict | None = None) -> int:
    """One whole run. `plan_cache` (used by the sweep) maps a memory shape to a
    dry-run result, so trials that differ only in e.g. the learning rate share one."""
    ctx = make_context(args)
    if args.sweep:
        from autotune.sweep import run_sweep

        try:
            return run_sweep(ctx)
        finally:
            if ctx.folder is not None:
                ctx.folder.release()
    from autotune.signals import RunSignals

    ctx.signals = RunSignals()
    ctx.signals.install()
    try:
        return _run(ctx, plan_cache)
    except BaseException as exc:
        from autotune.signals import RunInterrupted

        if ctx.folder is not None:
            ctx.folder.restore()   # a replaced run comes back when the new one never trained
        if isinstance(exc, RunInterrupted):
            return stopped_before_training(ctx, exc)
        raise
    finally:
        ctx.signals.uninstall()
        if ctx.folder is not None:
            ctx.folder.release()


def _run(ctx: Context, plan_cache: dict | None) -> int:
    args = ctx.args
    given = read_plan(args)
    from autotune.data import find_layout
    from autotune.rundir import RunFolder

    find_layout(Path(args.data))  # a wrong --data path is the commonest mistake: say so first
    start_distributed(ctx)
    folder = RunFolder(ctx.output_dir)
    action = None
    if not args.check_data:
        # Decided now (nothing is changed yet), so a folder we may not use is said before any work.
        resume = "checkpoint" if args.resume not in (None, "latest") else bool(args.resume)
        action = on_main_then_share(ctx, lambda: folder.check(resume=resume, overwrite=args.overwrite,
                                                              dry_run=args.dry_run))
    rec = probe_and_recommend(ctx)
    config = rec.config
    tokenizer, builder = load_tokenizer_for_data(ctx, config)
    data = load_data(ctx, config, builder)
    if args.check_data:
        return report_data(ctx, data)
    if ctx.is_main:
        # Only now, with the config, the data and the folder all checked, is anything replaced.
        ctx.folder = folder
        on_main_then_share(ctx, lambda: folder.claim(action))
    else:
        on_main_then_share(ctx, lambda: None)
    if action == "resume":
        check_resume_flags(ctx, rec)
    first_screen(ctx, rec, data)
    from autotune.dryrun import Plan

    plan = Plan.from_config(config, ctx.processes)
    dry = None
    if given is not None:
        plan = check_plan_fits(ctx, rec, *given)
    elif args.auto or args.dry_run:
        key = memory_shape(plan, config)
        if plan_cache is not None and key in plan_cache:
            dry = plan_cache[key]
            ctx.console.print(f"dry run: reusing the plan measured for the same memory shape ({dry.plan.label()})")
        else:
            dry = dry_run(ctx, rec, data, builder, plan)
            dry.plan = agree_on_plan(ctx, rec, dry.plan)
            if plan_cache is not None:
                plan_cache[key] = dry
        plan = dry.plan
    if args.dry_run:
        return 0
    return train(ctx, rec, plan, dry, data, tokenizer, builder)


def check_resume_flags(ctx: Context, rec) -> None:
    """`--resume` continues the run in the folder: flags that change what it learns (the data, the
    learning rate, the steps...) are refused unless `--allow-changes`, which records them."""
    from autotune.dryrun import Plan
    from autotune.rundir import RUN_CONFIG, path_text

    path = ctx.output_dir / RUN_CONFIG
    if not path.is_file():
        return   # nothing trained yet: this "resume" starts the run
    try:
        before = validate(load_yaml_file(path)).to_dict()
    except AutotuneError:
        return   # unreadable: the checkpoint checks say what is wrong with the run
    changes = [(k, a, b) for k, a, b in changed_keys(before, rec.config.to_dict(), set(Plan.KEYS))]
    recorded = _recorded_request(ctx.output_dir)
    data_now = path_text(Path(ctx.args.data).resolve())
    if recorded.get("data") and recorded["data"] != data_now:
        changes.insert(0, ("--data", recorded["data"], data_now))
    if not changes:
        return
    shown = ", ".join(f"`{k}` {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}"
                      for k, a, b in changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
    if not getattr(ctx.args, "allow_changes", False):
        raise AutotuneError(f"`--resume` with other settings than the run in `{path_text(ctx.output_dir)}` was "
                            f"started with: {shown}; resume with the same flags, add `--allow-changes` to continue "
                            "with the new ones (recorded in run_summary.json), or start a new `--output-dir`")
    ctx.notes.append(f"resumed with changed settings: {shown}")
    ctx.resume_changes = [{"key": k, "before": a, "after": b} for k, a, b in changes]


def _recorded_request(output_dir: Path) -> dict[str, Any]:
    from autotune.rundir import RUN_REQUEST

    try:
        value = json.loads((output_dir / RUN_REQUEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def stopped_before_training(ctx: Context, exc) -> int:
    """A signal while the data was read or encoded, or during the dry run: one line, and
    how to go on. Audio encoded so far is in the codec cache, so nothing is encoded twice."""
    from autotune import signals as R
    from autotune.rundir import path_text

    what = {"preparing": "before training started"}.get(exc.phase, exc.phase)
    argv, program = R.command_line(ctx.args)
    if ctx.folder is not None and ctx.folder.path.is_dir():
        hint = "resume with: " + R.resume_command(argv, ctx.output_dir, program)
    else:
        hint = "run the same command again (audio encoded so far is cached)"
    ctx.console.print(f"{exc.name} {what}: stopped, nothing was trained in `{path_text(ctx.output_dir)}`; {hint}",
                      style="yellow", markup=False, highlight=False, soft_wrap=True)
    return R.EXIT_CODES.get(exc.name, 130)


# ------------------------------------------------------ several processes ---

def start_distributed(ctx: Context) -> None:
    """Under `accelerate launch` (or torchrun) with several processes, join the
    process group now, so the steps before training can agree with each other.
    The Trainer's Accelerator later reuses the same state."""
    if ctx.processes > 1:
        from accelerate import PartialState

        PartialState()


def on_main_then_share(ctx: Context, step):
    """Run a step with side effects on the main process only; every process then gets
    its result, or raises the same one-line error, instead of one hanging."""
    error = result = None
    if ctx.is_main:
        try:
            result = step()
        except AutotuneError as exc:
            error = exc.one_line()
    if ctx.processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error, result]
        broadcast_object_list(box, from_process=0)
        error, result = box
    if error:
        raise AutotuneError(error)
    return result


def agree_on_plan(ctx: Context, rec, plan):
    """Every process trains with one plan: the one the smallest GPU allows."""
    if ctx.processes <= 1:
        return plan
    from accelerate.utils import gather_object

    from autotune.dryrun import Plan

    mine = rec.gpus[min(ctx.local_rank, len(rec.gpus) - 1)].total_bytes if rec.gpus else 0
    everyone = gather_object([(mine or 0, int(os.environ.get("RANK", "0")), plan.to_dict())])
    _, rank, chosen = min(everyone, key=lambda item: (item[0], item[1]))
    agreed = Plan.from_dict(chosen)
    if agreed != plan:
        ctx.console.print(f"plan of process {rank} (smallest GPU) used by all: {agreed.label()}")
    return agreed


def memory_shape(plan, config: Config) -> str:
    """What decides memory: everything in the plan, the lean loss's chunk and packing
    (the learning rate is not in it)."""
    return repr(sorted(plan.to_dict().items())
                + [("lean_loss_chunk_size", config.training.lean_loss_chunk_size), ("packing", config.data.packing)])


def make_context(args: argparse.Namespace) -> Context:
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    quiet = args.json
    console = Console(stderr=quiet, quiet=rank != 0)
    output = Path(args.output_dir) if args.output_dir else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    cache = getattr(args, "codec_cache", None)
    return Context(args, console, output, is_main=rank == 0, processes=processes,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), codec_cache=Path(cache) if cache else None)


# --------------------------------------------------------- a given plan ---

def read_plan(args: argparse.Namespace):
    """`--plan FILE`: the plan in a dry run's autotune.json (a sweep's shape.json has the
    same "plan"), read and checked before anything else happens, so that a bad file is
    found at once and `--overwrite` cannot delete it before it is read. None without it."""
    if not args.plan:
        return None
    if args.auto or args.dry_run:
        flag = "--auto" if args.auto else "--dry-run"
        raise AutotuneError(f"`--plan` trains with a plan measured earlier and `{flag}` measures a new one: drop one of them")
    from autotune.dryrun import Plan

    path = Path(args.plan)
    fix = "pass the autotune.json a dry run (`--auto` or `--dry-run`) wrote"
    if path.suffix in (".yaml", ".yml"):
        # A run's run_config.yaml: the config it trained with (a sweep resumes killed trials so).
        try:
            config = validate(load_yaml_file(path))
        except AutotuneError as exc:
            raise AutotuneError(f"`--plan {path}` holds no valid run config ({exc.one_line()}): {fix}") from None
        return Plan.from_config(config, int(os.environ.get("WORLD_SIZE", "1"))), measured_with(config)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AutotuneError(f"cannot read `--plan {path}` ({exc.strerror or exc}): {fix}") from None
    except ValueError:
        raise AutotuneError(f"`--plan {path}` is not JSON: {fix}") from None
    try:
        plan = Plan.from_record(record.get("plan") if isinstance(record, dict) else None)
    except Exception:  # noqa: BLE001 - any malformed plan is the same user error
        raise AutotuneError(f"`--plan {path}` holds no valid dry-run plan: {fix}") from None
    recorded = record.get("measured_with")
    return plan, recorded if isinstance(recorded, dict) else {}


def measured_with(config: Config) -> dict[str, Any]:
    """What decides memory besides the plan (see `memory_shape`), as a dry run records it."""
    return {"training.lean_loss_chunk_size": config.training.lean_loss_chunk_size,
            "data.packing": config.data.packing}


def check_plan_fits(ctx: Context, rec, plan, measured: dict[str, Any]):
    """A plan from `--plan` against this run: its processes, this machine, the keys the
    user pinned. Its values themselves stay unpinned, so an out-of-memory error
    mid-training can still take the next rung."""
    from autotune.profiles import adapt_to_hardware

    where = f"`--plan {ctx.args.plan}`"
    if plan.processes != ctx.processes:
        raise AutotuneError(f"{where} was measured for {plan.processes} process(es) and this run has "
                            f"{ctx.processes}: run the dry run again with `--auto`")
    wanted = {"bf16": plan.precision == "bf16", "fp16": plan.precision == "fp16", "optim": plan.optim}
    adapted, reasons = adapt_to_hardware({"training": dict(wanted)}, rec.gpus)
    runnable = {"bf16": ["bf16"], "fp16": ["bf16", "fp16"], "fp32": ["bf16", "fp16", "fp32"]}[plan.precision]
    have = "bf16" if adapted["training"]["bf16"] else "fp16" if adapted["training"]["fp16"] else "fp32"
    if have not in runnable or adapted["training"]["optim"] != plan.optim:
        why = next((r for r in reasons if "instead of" in r), "this machine differs")
        raise AutotuneError(f"{where} was measured on other hardware ({why}): run the dry run again with `--auto`")
    now = measured_with(rec.config)
    if not plan.lean_loss:
        now.pop("training.lean_loss_chunk_size")   # no chunks without the lean loss
    for key, value in sorted(measured.items()):
        if key in now and now[key] != value:
            raise AutotuneError(f"{where} was measured with `{key}` {json.dumps(value)} and this run has "
                                f"{json.dumps(now[key])}: "
                                f"`--set {key}={json.dumps(value)}`, or run the dry run again with `--auto`")
    planned = plan.apply(rec.config)
    ours, theirs = rec.config.model_dump(), planned.model_dump()
    for key in sorted(rec.resolved.pinned):
        a, b = get_dotted(ours, key), get_dotted(theirs, key)
        if a != b:
            raise AutotuneError(f"`{key}` is set to {a!r} but {where} has {b!r}: drop the setting, "
                                "or run the dry run again with it")
    ctx.console.print(f"plan from {ctx.args.plan}: {plan.label()} (effective batch {plan.effective_batch_size})",
                      highlight=False, soft_wrap=True)
    return plan


# ------------------------------------------------------ probe and config ---

def cli_sets(args: argparse.Namespace) -> list[str]:
    """Flags that are shorthands for config keys; they pin like `--set`."""
    sets = []
    if args.model:
        sets.append(f"model.name_or_path={json.dumps(args.model)}")
    if args.codec:
        sets.append(f"data.codec={json.dumps(args.codec)}")
    if args.trust_remote_code:
        sets.append("model.trust_remote_code=true")
    if args.val:
        sets.append(f"eval_data_dir={json.dumps(args.val)}")
    if args.vram_limit is not None:
        sets.append(f"autotune.vram_limit_gib={args.vram_limit}")
    return sets + list(args.sets)


def probe_and_recommend(ctx: Context):
    from autotune.hardware import probe
    from autotune.profiles import recommend

    result = probe()
    gpus = result.gpus
    if gpus:
        gpus = _gpus_this_run_uses(ctx, gpus)
    user_yaml = load_yaml_file(ctx.args.config) if ctx.args.config else None
    rec = recommend(gpus, user_yaml=user_yaml, sets=cli_sets(ctx.args))
    rec.warnings = list(result.warnings) + rec.warnings
    if not gpus and result.reason:
        rec.reasons.insert(0, f"no GPU: {result.reason}")
    if not ctx.args.check_data and rec.config.samples.num_texts > 0:
        from autotune.samples import check_reference

        check_reference(rec.config.samples)  # a bad clip is found now, not after the model loads
    problems = config_rule_problems(rec.config)   # before any data is read or model loaded
    if problems:
        raise AutotuneError(f"invalid config ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
                            details=problems)
    vram_limit = rec.config.autotune.vram_limit_gib
    if vram_limit is not None and not gpus:
        rec.warnings.append("`--vram-limit` has no effect without a GPU")
    return rec


def _gpus_this_run_uses(ctx: Context, gpus):
    """One process per GPU under DDP; a single process uses the first visible GPU."""
    if ctx.processes > 1:
        return gpus[: ctx.processes]
    return gpus[:1]


# ------------------------------------------------------------------- data ---

def load_tokenizer_for_data(ctx: Context, config: Config):
    """The model's tokenizer (needed to count prompt tokens exactly). For
    `--check-data` a tokenizer that is not on disk is no error: lengths are then
    estimated conservatively."""
    from autotune.llasa import PromptBuilder
    from autotune.model import load_tokenizer

    name = config.model.name_or_path
    try:
        tokenizer = load_tokenizer(name, trust_remote_code=config.model.trust_remote_code,
                                   local_only=ctx.args.check_data)
    except AutotuneError:
        if not ctx.args.check_data:
            raise
        from autotune import replica

        if replica.replica_available():
            # Llasa's tokenizer is Llama 3's BPE plus its own tokens: the replica counts exactly.
            ctx.notes.append(f"the tokenizer of `{name}` is not available locally: prompt lengths are counted "
                             "with the offline replica of Llasa's tokenizer (exact for Llasa models)")
            tokenizer = replica.build_llasa_tokenizer()
            return tokenizer, PromptBuilder(tokenizer)
        ctx.notes.append(f"the tokenizer of `{name}` is not available locally: prompt lengths are conservative "
                         "estimates (UTF-8 bytes + 64 template tokens); `pip install \"llasa-autotune[replica]\"` "
                         "counts them exactly")
        return None, None
    return tokenizer, PromptBuilder(tokenizer)


def codec_cache_dir(ctx: Context) -> Path:
    # Next to the runs, not inside the user's data folder, shared by every run.
    return ctx.codec_cache or ctx.output_dir.parent / ".codec-cache"


def load_data(ctx: Context, config: Config, builder):
    from autotune.data import MAX_NAMED_SPEAKERS, load_dataset

    def codec_loader():
        from autotune.codec import DeferredCodec

        # Loads the weights only if some audio is not in the cache yet.
        return DeferredCodec(config.data.codec, device="cuda" if _cuda() else "cpu")

    data = load_dataset(ctx.args.data, max_length=config.data.max_length, val_fraction=config.data.val_fraction,
                        split_seed=config.data.split_seed, eval_data=config.eval_data_dir, prompt_builder=builder,
                        codec_loader=codec_loader, cache_dir=codec_cache_dir(ctx),
                        max_errors_shown=config.data.max_errors_shown, progress=ctx.is_main and not ctx.args.json,
                        allow_outside_paths=config.data.allow_outside_paths)
    speakers = len(data.speakers())
    if data.speaker_conditioning:
        ctx.notes.append(f"{speakers} speakers: each prompt names its speaker "
                         "(`Speaker NAME`, as Llasa's multi-speaker recipe); `synthesize.py --speaker NAME` picks one")
    elif speakers > 1:
        ctx.notes.append(f"{speakers} speakers, more than {MAX_NAMED_SPEAKERS}: prompts name none (trained as one "
                         "set of voices); keep only the speakers you want in the data to name them")
    return data


def report_data(ctx: Context, data) -> int:
    summary = data.summary()
    summary["notes"] = list(ctx.notes)
    if ctx.args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="Data", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("layout", summary["layout"])
    table.add_row("samples", f"{summary['train_samples']} train, {summary['val_samples']} validation ({summary['val_source']})")
    table.add_row("audio", f"{summary['audio_seconds'] / 3600:.2f} h ({summary['audio_seconds']:.0f} s)")
    p = summary["token_percentiles"]
    table.add_row("tokens", f"p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {summary['max_tokens']}"
                  + ("" if summary["token_count_exact"] else " (estimated)"))
    if summary["longest"]:
        table.add_row("longest", f"{summary['longest']['source']} ({summary['longest']['tokens']} tokens)")
    if summary["speakers"]:
        shown = ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in list(summary["speakers"].items())[:8])
        more = len(summary["speakers"]) - 8
        table.add_row("speakers", f"{len(summary['speakers'])}: {shown}" + (f" and {more} more" if more > 0 else ""))
    table.add_row("skipped", str(len(summary["skipped"])))
    ctx.console.print(table)
    for item in summary["skipped"][:20]:
        ctx.console.print(f"  skipped {item['source']}: {item['reason']}")
    for note in ctx.notes:
        ctx.console.print(f"[yellow]! {note}[/yellow]")
    return 0


# ------------------------------------------------------------ first screen ---

def first_screen(ctx: Context, rec, data) -> None:
    from autotune.probe_report import gpu_table, settings_table

    c = ctx.console
    if rec.gpus:
        c.print(gpu_table(rec.gpus))
    else:
        c.print("[bold]No GPU[/bold]: training on the CPU (fine for `--model tiny`, far too slow for Llasa)")
    note = (" (the dry run may change it)" if ctx.args.auto else " (`--plan` replaces it)" if ctx.args.plan else "")
    c.print(settings_table(rec, "Plan from the profile" + note))
    for reason in rec.reasons:
        c.print(f"  - {reason}")
    for warning in rec.warnings + ctx.notes:
        c.print(f"  [yellow]! {warning}[/yellow]")
    s = data.summary()
    c.print(f"data: {s['train_samples']} train / {s['val_samples']} validation samples, "
            f"{s['audio_seconds'] / 60:.1f} min of audio, longest {s['max_tokens']} tokens, {len(s['skipped'])} skipped"
            + (f", {len(s['speakers'])} speakers" if s["speakers"] else ""))
    if rec.config.model.name_or_path == "tiny":
        c.print("[yellow]--model tiny: a tiny random model for the offline demo; it produces no meaningful speech[/yellow]")


# ---------------------------------------------------------------- dry run ---

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_for(ctx: Context) -> str:
    return f"cuda:{ctx.local_rank}" if _cuda() else "cpu"


def apply_vram_limit(config: Config, device: str, fraction_of_limit: float = 1.0) -> int | None:
    """Cap the process's share of the GPU; returns the cap in bytes (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    limit = config.autotune.vram_limit_gib
    cap = min(total, int(limit * 2**30)) if limit else total
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * fraction_of_limit / total), index)
    return int(cap * fraction_of_limit)


def dry_run(ctx: Context, rec, data, builder, start):
    from autotune.batches import build_examples, make_collator
    from autotune.dryrun import RealMeasure, search
    from autotune.model import load_base_model
    from autotune.profiles import bitsandbytes_installed

    config = rec.config
    device = device_for(ctx)
    budget = apply_vram_limit(config, device, config.autotune.memory_fraction)
    examples = build_examples(data.train, builder)
    collator = make_collator(builder.tokens.pad, config.data.packing, builder.tokens.hidden_from_attention)

    def load_base(precision: str, four_bit: bool):
        return load_base_model(config.model.name_or_path, precision=precision,
                               attn_implementation=config.model.attn_implementation,
                               trust_remote_code=config.model.trust_remote_code, load_in_4bit=four_bit, device=device)

    measure = RealMeasure(load_base=load_base, examples=examples, collator=collator, device=device,
                          steps=config.autotune.dry_run_steps, learning_rate=config.training.learning_rate,
                          lora_dropout=config.lora.lora_dropout, chunk_size=config.training.lean_loss_chunk_size)
    cuda = device.startswith("cuda")
    ctx.console.print(f"[bold]Dry run[/bold] on {device}: longest batch "
                      f"{max(len(e['input_ids']) for e in examples)} tokens per row"
                      + (f", budget {budget / 2**30:.1f} GiB ({config.autotune.memory_fraction:.0%})" if budget else ""))

    def log(attempt):
        mark = "[green]fits[/green]" if attempt.ok else "[red]no[/red]"
        peak = f"{attempt.peak_bytes / 2**30:.2f} GiB" if attempt.peak_bytes else "-"
        tps = f"{attempt.tokens_per_second:,.0f} tok/s" if attempt.tokens_per_second else ""
        ctx.console.print(f"  {mark} {attempt.plan.label()}  peak {peak} {tps}  ({attempt.why})"
                          + (f": {attempt.error}" if attempt.error else ""))

    result = search(start, measure, pinned=rec.resolved.pinned, max_attempts=config.autotune.max_attempts,
                    time_plans=config.autotune.time_plans and cuda,
                    ctx={"cuda": cuda, "bitsandbytes": cuda and bitsandbytes_installed(),
                         "longest_tokens": max(len(e["input_ids"]) for e in examples)},
                    budget_bytes=budget, log=log)
    del measure
    from autotune.dryrun import free_cuda_memory

    free_cuda_memory()
    if cuda:
        apply_vram_limit(config, device, 1.0)  # training gets the whole (limited) card back
    record = result.to_dict()
    record["device"] = device
    record["measured_with"] = measured_with(config)
    if ctx.args.json and ctx.args.dry_run:
        print(json.dumps(record, indent=2))
    show_attempts(ctx, result)
    if ctx.is_main and not ctx.args.check_data:
        from autotune.trainer import write_json

        write_json(ctx.output_dir / "autotune.json", record)
    return result


def show_attempts(ctx: Context, result) -> None:
    from rich.table import Table

    table = Table(title=f"Dry run: {len(result.attempts)} attempts in {result.seconds:.1f} s", title_justify="left")
    for column in ("#", "plan", "why", "fits", "peak GiB", "tokens/s", "error"):
        table.add_column(column)
    for i, a in enumerate(result.attempts, 1):
        table.add_row(str(i), a.plan.label(), a.why, "yes" if a.ok else "no",
                      f"{a.peak_bytes / 2**30:.2f}" if a.peak_bytes else "-",
                      f"{a.tokens_per_second:,.0f}" if a.tokens_per_second else "-", a.error or "")
    ctx.console.print(table)
    ctx.console.print(f"chosen: {result.reason}")


# ------------------------------------------------------------------ train ---

def train(ctx: Context, rec, plan, dry, data, tokenizer, builder) -> int:
    from autotune import trainer as T
    from autotune.batches import ExampleDataset, build_examples, make_collator
    from autotune.data import split_record

    config = plan.apply(rec.config)
    out = ctx.output_dir
    resume_from = resolve_resume(ctx)
    if resume_from:
        check_resume_matches(resume_from, config)

    def datasets(max_length: int):
        """Train/val examples at the plan's max length; what it drops is listed, never cut."""
        from autotune.data import drop_too_long

        data.train = drop_too_long(data.train, max_length, data.skipped)
        data.val = drop_too_long(data.val, max_length, data.skipped)
        if not data.train:
            raise AutotuneError(f"no training sample is shorter than {max_length} tokens: "
                                "use a GPU with more memory or `--set model.load_in_4bit=true`")
        if ctx.is_main:
            T.write_json(out / "split.json", split_record(data))
        if data.skipped:
            ctx.console.print(f"[yellow]skipped {len(data.skipped)} samples longer than {max_length} tokens "
                              "(listed in split.json)[/yellow]")
        return (ExampleDataset(build_examples(data.train, builder)),
                ExampleDataset(build_examples(data.val, builder)) if data.val else None)

    write_run_config(ctx, config)
    train_set, val_set = datasets(config.data.max_length)
    collator = make_collator(builder.tokens.pad, config.data.packing, builder.tokens.hidden_from_attention)

    recoveries: list[dict[str, Any]] = []
    nan_rollbacks: list[dict[str, Any]] = []
    nonfinite_steps: list[int] = []
    started = time.time()
    device = device_for(ctx)
    apply_vram_limit(config, device)
    while True:
        outcome = _train_once(ctx, config, plan, train_set, val_set, collator, tokenizer, resume_from, device,
                              data=data)
        if outcome.oom_error is None:
            guard = outcome.trainer.nonfinite
            nonfinite_steps += guard.skipped_steps
            if guard.exhausted_at is None or outcome.interrupted:  # a Ctrl-C wins over a rollback
                break
            # `nan_patience` non-finite steps in a row: back to the last checkpoint with the guide's remedies.
            from autotune import reliability as R
            from autotune.dryrun import free_cuda_memory

            outcome = None  # this attempt's model goes before the next one loads
            free_cuda_memory()
            config, rollback = R.nan_rollback(config, guard, len(nan_rollbacks), out)  # raises after the last one
            write_run_config(ctx, config)
            nan_rollbacks.append(rollback)
            resume_from = Path(rollback["resumed_from"]) if rollback["resumed_from"] else None
            ctx.console.print(R.describe_rollback(rollback), style="yellow", markup=False, highlight=False)
            continue
        # Out of memory mid-training: next rung, same effective batch, from the newest checkpoint.
        from autotune.dryrun import free_cuda_memory, next_rung

        free_cuda_memory()
        # Only rungs a checkpoint can resume into: a new rank or optimizer would not load its state.
        from autotune.profiles import bitsandbytes_installed

        cuda = device.startswith("cuda")
        step = next_rung(plan, rec.resolved.pinned | RESUME_FIXED_KEYS,
                         {"cuda": cuda, "bitsandbytes": cuda and bitsandbytes_installed()})
        if step is None or len(recoveries) >= config.autotune.oom_retries:
            raise AutotuneError(f"out of memory during training ({outcome.oom_error}) and no recovery is left "
                                f"after {len(recoveries)} retries: lower `training.per_device_train_batch_size` or use "
                                "`--auto`; checkpoints so far are kept in the output folder")
        why, plan = step
        config = plan.apply(config)
        write_run_config(ctx, config)   # a run killed from here on resumes with the stepped-down plan
        if config.data.max_length < max(len(e["input_ids"]) for e in train_set.examples):
            train_set, val_set = datasets(config.data.max_length)
        resume_from = T.newest_checkpoint(out)
        recoveries.append({"error": outcome.oom_error, "rung": why, "plan": plan.to_dict(),
                           "resumed_from": str(resume_from) if resume_from else None})
        ctx.console.print(f"[yellow]out of memory during training: retrying with {why} ({plan.label()}), "
                          f"from {resume_from or 'the start'}[/yellow]")
    return finish(ctx, rec, plan, dry, outcome, config, recoveries, time.time() - started, tokenizer,
                  nan_rollbacks=nan_rollbacks, nonfinite_steps=nonfinite_steps, speakers=data.speakers(),
                  data_summary=data.summary(),
                  speaker_conditioning=data.speaker_conditioning)


def write_run_config(ctx: Context, config: Config) -> None:
    """run_config.yaml: marks the folder as a run and holds the config it trains with now
    (rewritten after an out-of-memory step-down or a NaN rollback), written whole or not at all."""
    if ctx.is_main:
        from autotune.rundir import RUN_CONFIG, RUN_REQUEST, path_text, write_json, write_text

        if not (ctx.output_dir / RUN_REQUEST).is_file() or ctx.resume_changes:
            write_json(ctx.output_dir / RUN_REQUEST, {"data": path_text(Path(ctx.args.data).resolve())})
        write_text(ctx.output_dir / RUN_CONFIG, dump_yaml(config))


@dataclass
class Outcome:
    trainer: Any = None
    throughput: Any = None
    early: Any = None
    oom_error: str | None = None
    interrupted: bool = False


def _train_once(ctx, config, plan, train_set, val_set, collator, tokenizer, resume_from, device,
                data) -> Outcome:
    from autotune import trainer as T
    from autotune.dryrun import is_oom
    from autotune.model import apply_lora, load_base_model

    precision = plan.precision
    from transformers import set_seed

    set_seed(config.training.seed)  # the LoRA init draws from the global RNG: same seed, same run
    base = load_base_model(config.model.name_or_path, precision=precision,
                           attn_implementation=config.model.attn_implementation,
                           trust_remote_code=config.model.trust_remote_code, load_in_4bit=plan.load_in_4bit, device=device)
    model = apply_lora(base, r=config.lora.r, lora_alpha=config.lora.lora_alpha, lora_dropout=config.lora.lora_dropout,
                       target_modules=config.lora.target_modules, bias=config.lora.bias,
                       gradient_checkpointing=config.training.gradient_checkpointing, quantized=plan.load_in_4bit)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(T.tensorboard_dir(config, ctx.output_dir))
    args = T.training_arguments(config, ctx.output_dir, has_eval=val_set is not None and len(val_set) > 0,
                                use_cpu=not device.startswith("cuda"), notes=ctx.notes)
    trainer = T.LlasaTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                             data_collator=collator, callbacks=T.callbacks_for(config, args.eval_strategy != "no"),
                             lean_loss=config.training.lean_loss,
                             lean_chunk_size=config.training.lean_loss_chunk_size, console=ctx.console)
    throughput = T.ThroughputCallback(trainer, ctx.processes)
    early = T.EarlyStopRecorder()
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress bar shows the same, on one line
    # First in line: the loggers (TensorBoard) see the `tokens_per_second` it adds to each log.
    trainer.callback_handler.callbacks.insert(0, throughput)
    trainer.add_callback(early)
    trainer.add_callback(T.RichProgressCallback(ctx.console))
    from autotune.samples import maybe_add_sample_callback

    maybe_add_sample_callback(trainer, config, ctx.output_dir, tokenizer, data.val, ctx.console, train=data.train,
                              should_stop=lambda: trainer.interrupt.requested is not None)
    trainer.add_guards(config.training.nan_patience)  # last: they end a step
    from autotune import reliability as R

    R.require_room_for_checkpoints(ctx.output_dir, model, config.training.optim)
    if resume_from:
        ctx.console.print(f"resuming from [bold]{resume_from}[/bold] (optimizer, scheduler, RNG and data position restored)")
    error = None
    try:
        if ctx.folder is not None:
            ctx.folder.training_started()   # the run --overwrite replaced can go now
        with ctx.signals.training(trainer.interrupt):  # Ctrl-C/SIGTERM/SIGHUP: finish the step, save, stop
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as exc:
        if not is_oom(exc):
            raise
        error = " ".join(str(exc).split())[:200]
    finally:
        # A live progress bar would keep redrawing over whatever comes next.
        for cb in list(trainer.callback_handler.callbacks):
            if isinstance(cb, T.RichProgressCallback) and cb.progress is not None:
                cb.progress.stop()
                cb.progress = None
    if error is not None:
        # Outside the handler, so the failed step's tensors can be freed.
        del trainer, model, base
        return Outcome(oom_error=error)
    return Outcome(trainer, throughput, early, interrupted=trainer.interrupt.stopped_at is not None)


# What a checkpoint's adapter and optimizer state fix: resuming with other values cannot load it.
RESUME_FIXED_KEYS = frozenset({"lora.r", "lora.lora_alpha", "lora.target_modules", "training.optim"})


def check_resume_matches(checkpoint: Path, config: Config) -> None:
    """A changed LoRA shape or optimizer would fail deep inside loading: say so first."""
    import yaml

    from autotune.rundir import RUN_CONFIG

    try:
        saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # checkpoint_problem already vetted it; nothing to compare
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


def resolve_resume(ctx: Context) -> Path | None:
    from rich.markup import escape

    from autotune import reliability as R

    arg = ctx.args.resume
    if not arg:
        return None
    if arg == "latest":
        if ctx.is_main:
            for leftover in R.clean_staging(ctx.output_dir):
                ctx.console.print(f"--resume: removed {escape(leftover.name)}, a save that was cut short")
        found, skipped = R.scan_checkpoints(ctx.output_dir)
        for path, why in skipped:
            ctx.console.print(f"[yellow]--resume: skipping {escape(path.name)}: {escape(why)}[/yellow]")
        if found is None:
            ctx.console.print(f"[yellow]--resume: no complete checkpoint in {ctx.output_dir}; starting from step 0[/yellow]")
        return found
    path = Path(arg)
    problem = R.checkpoint_problem(path)
    if problem:
        raise AutotuneError(f"`--resume {arg}` is not a complete checkpoint ({problem}): "
                            f"pass a `checkpoint-N` folder, or `--resume` alone for the newest in `{ctx.output_dir}`")
    return path


# ----------------------------------------------------------------- finish ---

def finish(ctx, rec, plan, dry, outcome, config, recoveries, wall_seconds, tokenizer, *,
           nan_rollbacks=(), nonfinite_steps=(), speakers=None, speaker_conditioning=False,
           data_summary=None) -> int:
    from autotune import reliability as R
    from autotune import trainer as T

    trainer = outcome.trainer
    interrupted = trainer.interrupt.requested if outcome.interrupted else None
    history = trainer.state.log_history
    out = ctx.output_dir
    findings = T.diagnose(history, config)
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    peak = None
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    summary = {
        "profile": {"name": rec.profile.name, "title": rec.profile.title},
        "gpus": [g.to_dict() for g in rec.gpus],
        "plan": plan.to_dict(),
        "dry_run": dry.to_dict() if dry else None,
        "plan_from": str(ctx.args.plan) if getattr(ctx.args, "plan", None) else None,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "best_eval_loss": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "stopped_early_at": outcome.early.stopped_early_at,
        "tokens_per_second": outcome.throughput.overall(),
        "peak_gpu_bytes": peak,
        "wall_seconds": round(wall_seconds, 2),
        "oom_recoveries": recoveries,
        "interrupted": interrupted,
        "nan_rollbacks": list(nan_rollbacks),
        "nonfinite_steps_skipped": list(nonfinite_steps),
        "checkpoints_refused": trainer.refused_saves,
        "diagnosis": [f.to_dict() for f in findings],
        "resume_changes": ctx.resume_changes,
        "speakers": speakers or {},
        "speaker_conditioning": speaker_conditioning,
        "notes": ctx.notes,
    }
    summary["adapter_saved"] = False
    if ctx.is_main:
        from autotune import rundir

        # A signal now waits for these files to be whole: a run stopped here is still complete.
        with ctx.signals.saving():
            # An interrupted run is unfinished: its adapter so far is in its checkpoint, not the output folder.
            saved = not interrupted and T.save_adapter(trainer.model, out, ctx.console)
            summary["adapter_saved"] = bool(saved)
            rundir.write_text(out / rundir.RESOLVED_CONFIG, dump_yaml(config))
            summary["loss_plot"] = rundir.LOSS_PLOT if T.plot_losses(history, out / rundir.LOSS_PLOT) else None
            if ctx.args.merge and saved:
                merged = trainer.model.merge_and_unload()
                merged.save_pretrained(str(out / rundir.MERGED_DIR))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(out / rundir.MERGED_DIR))
                summary["merged"] = rundir.MERGED_DIR
            if saved:
                from autotune.model_card import write_model_card

                write_model_card(out, summary, config.to_dict(), data_summary or {})
            late = ctx.signals.received if not interrupted else None
            summary["signal_after_last_step"] = late
            rundir.write_json(out / rundir.RUN_SUMMARY, summary)
    if interrupted:
        newest = T.newest_checkpoint(out)
        argv, program = R.command_line(ctx.args)
        ctx.console.print(f"{interrupted}: stopped at step {summary['steps']} of {summary['max_steps']}; "
                          f"the newest checkpoint is {newest or 'none'}. Resume with:", style="yellow", markup=False)
        ctx.console.print("  " + R.resume_command(argv, out, program), soft_wrap=True, markup=False, highlight=False)
        return R.EXIT_CODES[interrupted]
    final_table(ctx, summary, findings)
    if ctx.signals.received:
        # Training had ended when the signal came: the run is whole, nothing to resume.
        ctx.console.print(f"{ctx.signals.received} after the last step: the run finished and was saved whole",
                          style="yellow", markup=False)
        return R.EXIT_CODES.get(ctx.signals.received, 130)
    return 0


def final_table(ctx: Context, summary: dict[str, Any], findings) -> None:
    from rich.markup import escape
    from rich.table import Table

    def fmt(value, spec=".4f"):
        return "-" if value is None else format(value, spec)

    table = Table(title="Run summary", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("output", str(ctx.output_dir))
    table.add_row("steps", f"{summary['steps']} of {summary['max_steps']}"
                  + (f" (early stop at {summary['stopped_early_at']})" if summary["stopped_early_at"] else ""))
    table.add_row("final train loss", fmt(summary["final_train_loss"]))
    table.add_row("final eval loss", fmt(summary["final_eval_loss"]))
    table.add_row("best eval loss", fmt(summary["best_eval_loss"]))
    table.add_row("tokens/s", fmt(summary["tokens_per_second"], ",.0f"))
    table.add_row("peak GPU memory", "-" if summary["peak_gpu_bytes"] is None else f"{summary['peak_gpu_bytes'] / 2**30:.2f} GiB")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    table.add_row("plan", f"batch {summary['plan']['per_device_train_batch_size']} x "
                  f"{summary['plan']['gradient_accumulation_steps']} = {summary['plan']['effective_batch_size']} effective")
    ctx.console.print(table)
    for f in findings:
        ctx.console.print(f"[yellow]{f.kind}[/yellow]: {escape(f.message)}\n  try: {escape(' '.join(f.remedies))}")
    if summary.get("adapter_saved"):
        ctx.console.print(f"adapter: {ctx.output_dir}/adapter_model.safetensors  "
                          f"(PeftModel.from_pretrained(base, '{ctx.output_dir}'))")
