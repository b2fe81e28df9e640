"""The sweep folder, trials run in this process, and the driver `run_sweep`."""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError
from autotune.rundir import FAILED_RECORD, RUN_CONFIG, SWEEP, SWEEP_RECORD, RunFolder, finished_run, has_trained, nested_problem
from autotune.sweep.grid import (Trial, base_record, build_grid, check_flags, check_same_base, mark_failed,
                                 pace, parse_sweeps, record_summary, resume_plan, show, sweep_record, trial_args,
                                 write_report, validate_trials, write_record)
from autotune.sweep.children import gpu_label
from autotune.sweep.pool import ParallelSweep, SweepTerminated, gpus_for_trials
from autotune.sweep.sharing import card_bytes, share_gib
from autotune.tuning.ladder import free_memory


def prepare_sweep_dir(ctx) -> dict[str, Any] | None:
    """Create or reuse the sweep folder, locked for this process; returns the previous
    sweep.json (on --resume), if any. A sweep is a folder of its own kind (its marker says so):
    `--resume` continues only a sweep, and `--overwrite` replaces only a sweep or run of this
    tool, or an empty folder, moving it aside until a trial trains (see `rundir.RunFolder`)."""
    from autotune.files import read_user_json
    from autotune.pipeline import user_inputs

    out, args = ctx.output_dir, ctx.request
    problem = nested_problem(out, user_inputs(args))
    if problem:
        raise AutotuneError(problem)
    folder = RunFolder(out, SWEEP)
    if ctx.is_main:
        for line in folder.recover_left_aside():
            ctx.warn(line)
    action = folder.check(resume=bool(args.resume), overwrite=args.overwrite)
    previous = None
    if action == "resume" and (out / SWEEP_RECORD).is_file():
        try:
            previous = read_user_json(out / SWEEP_RECORD, what="sweep record")
        except AutotuneError:
            previous = None
    if ctx.is_main:
        folder.claim(action)
        ctx.folder = folder
    return previous


def settle_replaced(ctx, trials: list[Trial]) -> None:
    """A sweep that replaced another (`--overwrite`) lets the old one go once a trial trains."""
    folder = ctx.folder
    if folder is not None and folder.replaced is not None:
        if any(has_trained(ctx.output_dir / t.name) for t in trials):
            folder.training_started()


def restore_replaced(ctx) -> bool:
    """No trial trained: what `--overwrite` moved aside comes back (True), and this sweep's folder goes."""
    folder = ctx.folder
    if folder is None or folder.replaced is None:
        return False
    folder.restore()
    if folder.replaced is None:
        ctx.warn(f"no trial trained: `{ctx.output_dir}` is back as it was before `--overwrite`")
    return True


def run_trial(ctx, trial: Trial, cache: dict) -> None:
    from autotune import pipeline

    folder = ctx.output_dir / trial.name
    started = trial.started_at = time.time()
    # The trials' own JSON (e.g. the dry-run record) must not mix into the sweep's `--json` object.
    guard = redirect_stdout(sys.stderr) if ctx.request.json else nullcontext()
    try:
        with guard:
            code = pipeline.run(trial_args(ctx.request, trial, ctx.output_dir), plan_cache=cache)
    except AutotuneError as exc:
        trial.status, trial.error = "failed", exc.one_line()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:   # a crash in one trial must not lose the others
        trial.status = "failed"
        trial.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ctx.console.print(traceback.format_exc(), markup=False, highlight=False)
    else:
        if code in (130, 143):
            # The trial saved a checkpoint and stopped on a signal: stop the sweep too.
            raise KeyboardInterrupt
        if code not in (0, None):
            trial.status, trial.error = "failed", f"the run exited with code {code}"
        else:
            record_summary(trial, folder)
    finally:
        free_memory()
        trial.finished_at = time.time()
    if trial.status == "failed":
        mark_failed(ctx, trial, folder)
    if trial.wall_seconds is None:
        trial.wall_seconds = round(trial.finished_at - started, 2)


def _skip_finished(ctx, trial: Trial, total: int, previous: dict[str, Any] | None = None) -> None:
    """A trial an earlier invocation finished: its own figures and status, and its times
    as the previous sweep.json recorded them."""
    record_summary(trial, ctx.output_dir / trial.name)
    trial.earlier = True
    before = next((t for t in (previous or {}).get("trials", []) if t.get("name") == trial.name), {})
    for key in ("started_at", "finished_at", "gpu", "dry_run"):
        if before.get(key) is not None:
            setattr(trial, key, before[key])
    ctx.console.print(f"trial {trial.index + 1}/{total} [bold]{trial.name}[/bold]: finished earlier, not run again")


def run_sweep(request) -> int:
    """`train.py --sweep ...`: the grid, one run per trial, ranked; the sweep folder is held
    (locked) by this process until it ends."""
    from autotune.pipeline import make_context

    ctx = make_context(request)
    try:
        return _sweep(ctx)
    finally:
        if ctx.folder is not None:
            ctx.folder.release()


def spread(args, gpus: list) -> str:
    """How the trials are spread, for the sweep's first line."""
    if not gpus:
        return "one after another"
    names = ", ".join(gpu_label(g) for g in gpus)
    per_gpu = args.trials_per_gpu
    if isinstance(per_gpu, int) and per_gpu > 1:
        cap = share_gib(card_bytes(gpus[0], args.vram_limit), per_gpu)
        where = f"on {names}" if len(gpus) == 1 else f"{per_gpu} per GPU ({names})"
        return f"{per_gpu * len(gpus)} at a time {where}, each capped at {cap:g} GiB"
    if per_gpu in (None, "auto") and args.auto:
        where = f"one at a time on {names}" if len(gpus) == 1 else f"{len(gpus)} at a time, one per GPU ({names})"
        return f"{where}, more where a dry run's measured peak leaves room"
    return f"{len(gpus)} at a time, one per GPU ({names})"


def _sweep(ctx) -> int:
    from rich.markup import escape

    args = ctx.request
    check_flags(args)
    axes = parse_sweeps(list(args.sweep))
    trials = build_grid(axes)
    validate_trials(args, axes, trials)
    from autotune.data import find_layout

    find_layout(Path(args.data))   # a wrong --data path fails here, not in every trial
    base = base_record(args, axes)
    previous = prepare_sweep_dir(ctx)
    check_same_base(previous, base, ctx.output_dir)
    out, c = ctx.output_dir, ctx.console

    gpus, left_out = gpus_for_trials(ctx)
    # Decided up front, so every process of a DDP sweep skips the same trials.
    finished = {t.name for t in trials if args.resume and finished_run(out / t.name) is not None}
    # A trial that began training and was stopped continues from its checkpoint; one that
    # failed (failed.json) starts over, or it would fail the same way from its checkpoint.
    for t in trials:
        folder = out / t.name
        if (args.resume and t.name not in finished and (folder / RUN_CONFIG).is_file()
                and not (folder / FAILED_RECORD).exists()):
            t.resume_plan = resume_plan(folder)
            if t.resume_plan is None:
                c.print(f"[yellow]! trial {escape(t.name)} starts over: its run_config.yaml does not read[/yellow]")
    keys = ", ".join(f"{a.key} ({len(a.values)})" for a in axes)
    how = spread(args, gpus)
    if args.trials_per_gpu not in (None, "auto", 1) and not gpus:
        c.print(f"[yellow]! `--trials-per-gpu {args.trials_per_gpu}` has no effect "
                f"{'under torchrun' if ctx.processes > 1 else 'without a GPU'}: the trials run one after another[/yellow]")
    c.print(f"[bold]Sweep[/bold]: {len(trials)} trials over {keys}, {escape(how)}, in {escape(str(out))}"
            + (f"; {len(finished)} finished earlier" if finished else ""))
    for gpu in left_out:
        c.print(f"[yellow]! {escape(gpu_label(gpu))} ({escape(gpu.name or '?')}) is left out: trials run on GPUs "
                f"like the first ({escape(gpus[0].name or '?')}), so that they compare; pick GPUs with "
                "CUDA_VISIBLE_DEVICES[/yellow]")
    for a in axes:
        pinned = [s for s in args.sets if s.partition("=")[0].strip() == a.key]
        if pinned:
            c.print(f"[yellow]! `--set {pinned[-1]}` is replaced by the sweep's values of `{a.key}`[/yellow]")

    parallel: ParallelSweep | None = None
    started = time.time()   # trials/hour counts from here: dry runs and every child's start-up included

    def save(complete: bool) -> dict[str, Any]:
        settle_replaced(ctx, trials)
        record = sweep_record(ctx, axes, trials, base, complete,
                              {**pace(trials, started), **(parallel.record() if parallel else {})})
        if ctx.is_main:
            write_record(out / SWEEP_RECORD, record)
            write_report(out, trials, record, lambda m: c.print(f"[yellow]! {escape(m)}[/yellow]"))
        return record

    if gpus:
        parallel = ParallelSweep(ctx, trials, gpus, lambda: save(False))
    # Finished trials keep their status and times in the very first record: a kill right after it
    # must not leave a sweep.json that forgot them.
    for trial in trials:
        if trial.name in finished:
            _skip_finished(ctx, trial, len(trials), previous)
    save(False)
    cache: dict = {}
    try:
        if parallel is not None:
            parallel.run([t for t in trials if t.name not in finished])
        else:
            for number, trial in enumerate(trials, 1):
                if trial.name in finished:
                    continue
                c.rule(escape(f"trial {number}/{len(trials)}: {trial.name}  ({' '.join(trial.sets)})"))
                run_trial(ctx, trial, cache)
                if trial.status == "failed":
                    c.print(f"[red]trial {escape(trial.name)} failed[/red]: {escape(trial.error or '')}", highlight=False)
                save(False)
    except (KeyboardInterrupt, SweepTerminated):
        record = save(False)
        if restore_replaced(ctx):
            raise
        if ctx.is_main:
            show(ctx, axes, trials, record)
            c.print(f"[yellow]sweep interrupted: rerun the same command with `--resume` "
                    f"(and `--output-dir {escape(str(out))}`) to finish it[/yellow]")
        raise
    except BaseException:
        restore_replaced(ctx)
        raise
    record = save(True)
    if restore_replaced(ctx):
        return 1
    if ctx.is_main:
        show(ctx, axes, trials, record)
        if args.json:
            print(json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False, default=str))
    return 0 if record["best"] is not None else 1
