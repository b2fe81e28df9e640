"""`train.py --sweep KEY=V1,V2 ...`: a grid search, one normal run per trial.

The guide's step 2 (パラメータチューニング: try learning rates 1e-5, 5e-5, 1e-4
and LoRA ranks 8, 16, 32, keep the setting with the best validation loss) as
one command:

    python train.py --data dataset/ --auto --sweep training.learning_rate=1e-5,5e-5,1e-4 --sweep lora.r=8,16,32

    parse_sweeps -> validate_trials -> prepare_sweep_dir -> run each trial -> rank -> report

- The grid is the cartesian product of the `--sweep` flags, in the order given.
- Every trial is `autotune.run.run()` in this process with the trial's values
  appended to `--set`, writing to `<sweep dir>/<trial name>` (e.g. `lr=1e-05_r=8`).
  Trials run one after another; under `torchrun` each trial uses every process
  (DDP), as a single run would. On several GPUs see the last point.
- One dry run per distinct memory shape: the trials share `plan_cache`, so
  trials that differ only in e.g. the learning rate reuse one measured plan.
- `--resume` continues an interrupted sweep: a trial whose folder holds
  `run_summary.json` is not run again (its figures are read back); an
  unfinished trial starts over in its folder.
- A failing trial (a one-line `AutotuneError` such as "no plan fits", any other
  exception, or a non-finite final loss) is recorded with its reason, ranked
  last, and the sweep goes on. Ctrl-C stops the sweep after writing
  `sweep.json` with what is done.
- Ranking: by validation loss (the best eval loss, else the final one); trials
  without a validation loss come after, by train loss; failed trials last.
- Exit code: 0 when at least one trial finished, 1 when every trial failed,
  2 for a usage error (nothing is trained).
- Output: a ranked table, the winner's `--set` flags ready to paste, and
  `<sweep dir>/sweep.json` (`trials` ranked, `best`, `best_sets`); `--json`
  prints that object on stdout (everything else goes to stderr).
- Several GPUs: when the sweep is one process (not under `torchrun`) and the
  probe sees several GPUs of the first GPU's kind, trials run that many at a
  time, one per GPU: each is `python train.py <its flags>` in a child process
  with `CUDA_VISIBLE_DEVICES=<that GPU's uuid>`, its output in
  `<trial folder>/console.log` (in `<sweep dir>/.logs/<trial>.log` while it
  runs); the sweep's console shows one line per start and finish. With
  `--auto`, each memory shape is dry-run once, in `<sweep dir>/.dry-runs/<n>/`
  (`train.py --dry-run`, on a free GPU), and the trials of that shape train
  with its plan (`train.py --plan <dry run>/shape.json`, without `--auto`), so
  an out-of-memory error mid-trial can still step down the ladder. `sweep.json` records each
  trial's `gpu`, `started_at`, `finished_at` and `dry_run`, and the dry runs.
  On `--resume` a dry run whose shape and GPU are unchanged is reused. Ctrl-C
  (or SIGTERM) is passed on to the running trials, which save a checkpoint and
  stop; the sweep then writes `sweep.json` and exits 130 (143).
  `--dry-run`, `--check-data`, `--merge` and `--resume CHECKPOINT`
  are refused with `--sweep` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from autotune.config import load_yaml_file, parse_set, resolve_config
from autotune.dryrun import free_cuda_memory
from autotune.errors import AutotuneError
from autotune.run import cli_sets
from autotune.rundir import RUN_CONFIG as RUN_MARKER
from autotune.rundir import RunFolder, mark_ours

SWEEP_MARKER = "sweep.json"
SUMMARY = "run_summary.json"
FAILED_MARKER = "failed.json"      # <trial>/: it failed; --resume starts it over
EXAMPLE = "`--sweep lora.r=8,16,32` (a dotted config key, `=`, then comma-separated values)"

# Short names for trial folders; any other key is named by its last part.
_SHORT = {
    "training.learning_rate": "lr",
    "training.per_device_train_batch_size": "batch",
    "training.gradient_accumulation_steps": "accum",
    "training.num_train_epochs": "epochs",
    "training.weight_decay": "wd",
    "training.warmup_ratio": "warmup",
    "training.lr_scheduler_type": "sched",
    "lora.r": "r",
    "lora.lora_alpha": "alpha",
    "lora.lora_dropout": "dropout",
    "lora.target_modules": "targets",
}


# ------------------------------------------------------------------ model ---

@dataclass
class Axis:
    """One `--sweep key=v1,v2` flag."""

    key: str
    values: list[Any]
    flag: str          # as the user wrote it, for messages


@dataclass
class Trial:
    index: int                      # position in the grid (0-based)
    name: str                       # folder name
    settings: dict[str, Any]        # {dotted key: value}
    sets: list[str]                 # ["key=value", ...] as passed to --set
    status: str = "pending"         # pending | ok | failed
    earlier: bool = False           # finished in an earlier invocation (`--resume` did not run it again)
    error: str | None = None
    eval_loss: float | None = None
    train_loss: float | None = None
    tokens_per_second: float | None = None
    peak_gpu_bytes: int | None = None
    wall_seconds: float | None = None
    plan: dict[str, Any] | None = None
    gpu: str | None = None                  # CUDA_VISIBLE_DEVICES of its child (several GPUs only)
    started_at: float | None = None         # epoch seconds
    finished_at: float | None = None
    dry_run: str | None = None              # `.dry-runs/<n>`: where its plan was measured (several GPUs only)
    resume_plan: str | None = None          # on --resume, a stopped trial's own plan: it continues from its checkpoint

    @property
    def done(self) -> bool:
        return self.status in ("ok", "failed")

    @property
    def succeeded(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "sets": self.sets, "status": self.status,
                "earlier": self.earlier,
                "error": self.error, "eval_loss": self.eval_loss, "train_loss": self.train_loss,
                "tokens_per_second": self.tokens_per_second, "peak_gpu_bytes": self.peak_gpu_bytes,
                "wall_seconds": self.wall_seconds, "plan": self.plan, "gpu": self.gpu,
                "started_at": self.started_at, "finished_at": self.finished_at, "dry_run": self.dry_run}


# ---------------------------------------------------------------- parsing ---

def split_values(text: str) -> list[str]:
    """`8,16,32` -> ["8", "16", "32"]; commas inside [...], {...} or quotes do not split
    (`[q_proj,v_proj],[q_proj,k_proj,v_proj]` is two values)."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_sweeps(items: list[str]) -> list[Axis]:
    """The `--sweep` flags, parsed and checked for syntax (not yet against the schema)."""
    axes: list[Axis] = []
    seen: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise AutotuneError(f"`--sweep {item}` gives no values: write it like {EXAMPLE}")
        if not key:
            raise AutotuneError(f"`--sweep {item}` names no key: write it like {EXAMPLE}")
        if any(c.isspace() for c in key):
            raise AutotuneError(f"`--sweep {item}`: the key `{key}` holds a space: write it like {EXAMPLE}")
        if key in seen:
            raise AutotuneError(f"`--sweep {key}` is given twice (`--sweep {seen[key]}` and `--sweep {item}`): "
                                f"list all its values in one flag, e.g. `--sweep {key}=a,b,c`")
        seen[key] = item
        if not raw.strip():
            raise AutotuneError(f"`--sweep {item}` gives no values: write it like {EXAMPLE}")
        raws = split_values(raw)
        values: list[Any] = []
        for text in raws:
            if not text.strip():
                raise AutotuneError(f"`--sweep {item}` has an empty value: separate values with single commas, "
                                    f"e.g. `--sweep {key}=a,b,c` (write an empty string as '\"\"')")
            try:
                _, value = parse_set(f"{key}={text.strip()}")
            except AutotuneError:
                raise AutotuneError(f"`--sweep {item}`: `{text.strip()}` is not a YAML value: quote strings and "
                                    f"write lists as [a,b], e.g. `--sweep lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj]`") from None
            if any(_same(value, v) for v in values):
                raise AutotuneError(f"`--sweep {item}` lists `{text.strip()}` twice: give each value once")
            values.append(value)
        axes.append(Axis(key, values, item))
    return axes


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


# ------------------------------------------------------------ trial names ---

def format_value(key: str, value: Any) -> str:
    """A value as `--set` text that parses back to the same value."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        if _same(parse_set(f"{key}={text}")[1], value):
            return text
    except AutotuneError:
        pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _short_names(keys: list[str]) -> dict[str, str]:
    short = {k: _SHORT.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "x"


def trial_name(settings: dict[str, Any], short: dict[str, str]) -> str:
    parts = []
    for key, value in settings.items():
        if isinstance(value, list):
            text = "+".join(str(v) for v in value)
        elif isinstance(value, bool) or value is None:
            text = json.dumps(value)
        else:
            text = str(value) if not isinstance(value, float) else repr(value)
        parts.append(f"{_safe(short[key])}={_safe(text)}")
    name = "_".join(parts)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


MAX_TRIALS = 1000


def build_grid(axes: list[Axis]) -> list[Trial]:
    size = math.prod(len(a.values) for a in axes)
    if size > MAX_TRIALS:
        raise AutotuneError(f"the sweep has {size} trials, more than {MAX_TRIALS}: fewer values per `--sweep` "
                            "(the guide's tuning stage is 3 x 3)")
    short = _short_names([a.key for a in axes])
    trials: list[Trial] = []
    names: set[str] = set()
    for index, combo in enumerate(itertools.product(*(a.values for a in axes))):
        settings = {a.key: v for a, v in zip(axes, combo)}
        name = trial_name(settings, short)
        if name in names:   # two values that only differ in characters a folder name cannot hold
            name = f"{name}-{index + 1}"
        names.add(name)
        trials.append(Trial(index, name, settings, [f"{k}={format_value(k, v)}" for k, v in settings.items()]))
    return trials


def set_line(trial: Trial) -> str:
    """`--set a=1 --set b=2`, ready to paste into a shell."""
    return " ".join(f"--set {shlex.quote(s)}" for s in trial.sets)


# ------------------------------------------------------------- validation ---

def check_flags(args) -> None:
    if getattr(args, "check_data", False):
        raise AutotuneError("`--sweep` trains every trial and `--check-data` trains nothing: "
                            "run `--check-data` on its own first, then the sweep")
    if getattr(args, "dry_run", False):
        raise AutotuneError("`--sweep` cannot be combined with `--dry-run`: to see one trial's plan run "
                            "`--dry-run --set key=value` without `--sweep` (the sweep itself dry-runs each memory shape once)")
    if getattr(args, "plan", None):
        raise AutotuneError("`--sweep` measures the plans itself (one dry run per memory shape with `--auto`): "
                            "drop `--plan`, or pin single keys with `--set`")
    if getattr(args, "merge", False):
        raise AutotuneError("`--merge` with `--sweep` would write a merged model for every trial: "
                            "run the sweep without it, then rerun the winner with `--merge`")
    resume = getattr(args, "resume", None)
    if resume and resume != "latest":
        raise AutotuneError(f"with `--sweep`, `--resume` takes no checkpoint (got `{resume}`): "
                            "`--resume` alone continues the sweep in `--output-dir`")
    if resume and not getattr(args, "output_dir", None):
        raise AutotuneError("`--resume` with `--sweep` needs the sweep's `--output-dir`")


def validate_trials(args, axes: list[Axis], trials: list[Trial]) -> None:
    """Every trial's config must validate before anything loads or trains."""
    user_yaml = load_yaml_file(args.config) if args.config else None
    base = cli_sets(args)
    resolve_config(None, user_yaml, base)   # a bad `--set` is reported as such
    for axis in axes:                       # blame the flag and the value that is wrong
        for value in axis.values:
            try:
                resolve_config(None, user_yaml, base + [f"{axis.key}={format_value(axis.key, value)}"])
            except AutotuneError as exc:
                raise AutotuneError(f"`--sweep {axis.flag}`: {_why(exc)}") from None
    for trial in trials:                    # combinations (e.g. bf16 and fp16 both on)
        try:
            resolve_config(None, user_yaml, base + trial.sets)
        except AutotuneError as exc:
            raise AutotuneError(f"`--sweep` trial {trial.name} ({' '.join(trial.sets)}): {_why(exc)}") from None


def _why(exc: AutotuneError) -> str:
    return "; ".join(" ".join(d.split()) for d in exc.details) if exc.details else exc.one_line()


# ---------------------------------------------------------- sweep folder ---

def _is_trial_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (SUMMARY, RUN_MARKER, "autotune.json"))


def is_sweep_dir(out: Path) -> bool:
    if not out.is_dir() or (out / RUN_MARKER).exists():
        return False
    return (out / SWEEP_MARKER).exists() or any(_is_trial_dir(p) for p in out.iterdir())


def prepare_sweep_dir(ctx) -> dict[str, Any] | None:
    """Create or reuse the sweep folder, locked for this process; returns the previous
    sweep.json (on --resume), if any. `--overwrite` replaces only a sweep or run of this
    tool, or an empty folder (see `rundir.RunFolder`)."""
    out, args = ctx.output_dir, ctx.args
    if out.exists() and not out.is_dir():
        raise AutotuneError(f"`--output-dir {out}` is a file: pass a folder")
    sweep = is_sweep_dir(out)
    previous = None
    if args.resume:
        if not sweep:
            what = "a single run, not a sweep" if (out / RUN_MARKER).exists() else "no sweep"
            raise AutotuneError(f"`--resume`: `{out}` holds {what}: pass the sweep's `--output-dir`, "
                                "or drop `--resume` to start a new sweep")
        if (out / SWEEP_MARKER).exists():
            try:
                previous = json.loads((out / SWEEP_MARKER).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = None
    folder = RunFolder(out)
    action = folder.check(resume=bool(args.resume), overwrite=args.overwrite)
    if action == "reuse" and sweep:
        action = "replace" if args.overwrite else None
        if action is None:
            raise AutotuneError(f"`{out}` already holds a sweep: add `--resume` to continue it, `--overwrite` to "
                                "replace it, or choose another `--output-dir`")
    if ctx.is_main:
        folder.claim(action)
        folder.training_started()   # the trials start now: a replaced sweep can go
        ctx.folder = folder
    return previous


def base_record(args) -> dict[str, Any]:
    """What must match for `--resume` to continue a sweep: everything but the grid."""
    settings = dict(parse_set(s) for s in cli_sets(args))
    return {"data": args.data, "config": args.config, "auto": bool(args.auto),
            "settings": json.loads(json.dumps(settings, default=str))}


def check_same_base(previous: dict[str, Any] | None, base: dict[str, Any], out: Path) -> None:
    old = (previous or {}).get("base")
    if not old or old == base:
        return
    diffs = [k for k in ("data", "config", "auto") if old.get(k) != base.get(k)]
    old_s, new_s = old.get("settings", {}), base.get("settings", {})
    diffs += [f"--set {k}" for k in sorted(set(old_s) | set(new_s)) if old_s.get(k) != new_s.get(k)]
    raise AutotuneError(f"`--resume`: the sweep in `{out}` was started with other flags ({', '.join(diffs)} differ): "
                        "rerun it with the same `--data`, `--config`, `--auto` and `--set` flags, "
                        "or replace `--resume` with `--overwrite` to start it over")


# ------------------------------------------------------------- the trials ---

def record_summary(trial: Trial, folder: Path) -> None:
    """A run that exited cleanly: its figures, or why they cannot be read."""
    if not (folder / SUMMARY).exists():
        trial.status, trial.error = "failed", f"the run wrote no {SUMMARY}"
        return
    trial.status = "ok"
    try:
        read_summary(trial, folder)
    except (OSError, ValueError) as exc:
        trial.status, trial.error = "failed", f"cannot read {SUMMARY} ({exc})"


def _finished(summary: Path) -> bool:
    """A summary written by a run that ended, not by one stopped on a signal."""
    if not summary.is_file():
        return False
    try:
        return not json.loads(summary.read_text(encoding="utf-8")).get("interrupted")
    except (OSError, ValueError):
        return False


def trial_args(args, trial: Trial, out: Path):
    a = copy.copy(args)
    a.sweep = []
    a.sets = list(args.sets) + trial.sets
    a.output_dir = str(out / trial.name)
    # The sweep's `--resume`: a trial stopped after it began training continues from its
    # newest checkpoint with its own plan (a new dry run could choose a rank or optimizer
    # the checkpoint cannot load); any other unfinished trial starts over in its folder.
    resuming = trial.resume_plan is not None
    a.resume = "latest" if resuming else None
    a.overwrite = not resuming
    a.plan = trial.resume_plan
    a.auto = args.auto and not resuming
    a.dry_run = False
    a.check_data = False
    # Trials share the codec cache that plain runs beside the sweep use.
    a.codec_cache = str(out.parent / ".codec-cache")
    a.argv = None  # a trial's own resume hint would name the trial; the sweep prints its own
    return a


def resume_plan(folder: Path) -> str | None:
    """The plan a stopped trial trained with, as a `--plan` file: its run_summary.json
    (written when it stopped; it holds the plan after any out-of-memory step-down), else
    its run_config.yaml (a trial killed outright; rewritten at each step-down). Only
    read, never written, so the processes of a DDP sweep all see the same answer.
    None when neither reads."""
    from autotune.config import validate

    try:
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        if _readable_plan(summary.get("plan")):
            return str(folder / SUMMARY)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        validate(load_yaml_file(folder / RUN_MARKER))
    except AutotuneError:
        return None
    return str(folder / RUN_MARKER)


def mark_failed(ctx, trial: Trial, folder: Path) -> None:
    """A failed trial's own record that it failed: the next `--resume` starts it over,
    where continuing from its checkpoint would fail the same way."""
    if not ctx.is_main or not folder.is_dir():
        return
    try:
        write_record(folder / FAILED_MARKER, {"error": trial.error})
    except OSError:
        pass


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def read_summary(trial: Trial, folder: Path) -> None:
    """Fill a trial's figures from its run_summary.json; a non-finite loss fails it."""
    summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    metric = "eval_loss"
    try:
        import yaml

        resolved = yaml.safe_load((folder / "resolved_config.yaml").read_text(encoding="utf-8")) or {}
        metric = (resolved.get("training") or {}).get("metric_for_best_model", metric)
    except (OSError, ValueError, AttributeError):
        pass
    best = summary.get("best_eval_loss") if metric in ("eval_loss", "loss") else None
    final_eval = summary.get("final_eval_loss")
    train = summary.get("final_train_loss")
    eval_loss = best if best is not None else final_eval
    trial.eval_loss, trial.train_loss = _finite(eval_loss), _finite(train)
    trial.tokens_per_second = _finite(summary.get("tokens_per_second"))
    peak = summary.get("peak_gpu_bytes")
    trial.peak_gpu_bytes = int(peak) if isinstance(peak, (int, float)) and math.isfinite(peak) else None
    trial.wall_seconds = _finite(summary.get("wall_seconds"))
    trial.plan = summary.get("plan")
    bad = [f"{label} is {value}" for label, value in (("final train loss", train), ("eval loss", eval_loss))
           if isinstance(value, (int, float)) and not math.isfinite(value)]
    if train is None and eval_loss is None:
        bad.append("the run logged no loss")
    if bad:
        trial.status, trial.error = "failed", "; ".join(bad)


def run_trial(ctx, trial: Trial, cache: dict) -> None:
    from autotune import run as run_module

    folder = ctx.output_dir / trial.name
    started = trial.started_at = time.time()
    # The trials' own JSON (e.g. the dry-run record) must not mix into the sweep's `--json` object.
    guard = redirect_stdout(sys.stderr) if ctx.args.json else nullcontext()
    try:
        with guard:
            code = run_module.run(trial_args(ctx.args, trial, ctx.output_dir), plan_cache=cache)
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
        free_cuda_memory()
        trial.finished_at = time.time()
    if trial.status == "failed":
        mark_failed(ctx, trial, folder)
    if trial.wall_seconds is None:
        trial.wall_seconds = round(trial.finished_at - started, 2)


# ---------------------------------------------------------------- ranking ---

def rank(trials: list[Trial]) -> list[Trial]:
    """Validation loss ascending; then trials with only a train loss; failed and unrun last."""
    def key(t: Trial):
        if not t.succeeded:
            return (2, 0, math.inf, t.index)
        if t.eval_loss is not None:
            return (0, 0, t.eval_loss, t.index)
        return (1, 0, t.train_loss if t.train_loss is not None else math.inf, t.index)

    return sorted(trials, key=key)


def sweep_record(ctx, axes: list[Axis], trials: list[Trial], base: dict[str, Any], complete: bool,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    done = rank([t for t in trials if t.done])
    best = next((t for t in done if t.succeeded), None)
    record = {
        "version": 1,
        "complete": complete,
        "output_dir": str(ctx.output_dir),
        "grid": {a.key: a.values for a in axes},
        "base": base,
        "ranked_by": "eval_loss" if best is None or best.eval_loss is not None else "train_loss",
        "trials": [t.to_dict() for t in done],
        "pending": [t.name for t in trials if not t.done],
        "best": best.to_dict() if best else None,
        "best_sets": set_line(best) if best else None,
    }
    record.update(extra or {})
    return record


def write_record(path: Path, record: dict[str, Any]) -> None:
    from autotune.trainer import write_json  # imports torch: only once there is something to write

    write_json(path, record, allow_nan=False)


def _cell(key: str, value: Any) -> str:
    """A setting as a short table cell: `0.001`, `1e-05`, `q_proj+v_proj`."""
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return format_value(key, value)


def show(ctx, axes: list[Axis], trials: list[Trial], record: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    short = _short_names([a.key for a in axes])
    ranked = rank([t for t in trials if t.done])
    table = Table(title=f"Sweep: {len(ranked)} of {len(trials)} trials, ranked by "
                        f"{'validation' if record['ranked_by'] == 'eval_loss' else 'train'} loss", title_justify="left")
    table.add_column("#", justify="right")
    for a in axes:
        table.add_column(short[a.key], no_wrap=True)
    for column in ("eval loss", "train loss", "tokens/s", "peak GiB", "status"):
        table.add_column(column, justify="right" if column != "status" else "left", no_wrap=True)
    for i, t in enumerate(ranked, 1):
        status = ("[green]ok[/green]" if t.status == "ok" else "[red]failed[/red]") + (" (earlier)" if t.earlier else "")
        table.add_row(str(i), *(escape(_cell(k, v)) for k, v in t.settings.items()),
                      num(t.eval_loss, ".4f"), num(t.train_loss, ".4f"), num(t.tokens_per_second, ",.0f"),
                      "-" if t.peak_gpu_bytes is None else f"{t.peak_gpu_bytes / 2**30:.2f}", status)
    c = ctx.console
    c.print(table)
    for t in ranked:
        if t.status == "failed":
            c.print(f"[red]failed[/red] {escape(t.name)}: {escape(t.error or '')}", highlight=False)
    if record["pending"]:
        c.print(f"[yellow]{len(record['pending'])} trials not run yet: rerun with `--resume` to finish them[/yellow]")
    best = record["best"]
    if best is None:
        c.print("[red]no trial finished[/red]: see the errors above")
        return
    if record["ranked_by"] == "train_loss":
        c.print("[yellow]no validation loss: ranked by train loss, which rewards overfitting; "
                "add validation data (`--val`, or keep `data.val_fraction` > 0)[/yellow]")
    figure = best["eval_loss"] if best["eval_loss"] is not None else best["train_loss"]
    c.print(f"best: [bold]{escape(best['name'])}[/bold] ({record['ranked_by'].replace('_', ' ')} "
            f"{num(figure, '.4f')}), adapter in {escape(str(ctx.output_dir / best['name']))}")
    c.print("train the winner with:")
    c.print(record["best_sets"], markup=False, highlight=False, soft_wrap=True)
    c.print(f"(all trials: {escape(str(ctx.output_dir / SWEEP_MARKER))})")


# ----------------------------------------------------------- several GPUs ---
#
# One trial per GPU at a time, each a `train.py` child process that sees only its
# GPU. The children are started in a session of their own, so a Ctrl-C in the
# terminal reaches the sweep alone, which passes it on once to each child.

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
DRY_RUNS = ".dry-runs"           # <sweep>/.dry-runs/<n>/: one dry run per memory shape
LOGS = ".logs"                   # a running trial's output, moved to <trial>/console.log when it ends
CODEC_CACHE = ".codec-cache"
CONSOLE_LOG = "console.log"
SHAPE_RECORD = "shape.json"      # <sweep>/.dry-runs/<n>/shape.json: the shape, the GPU and the plan
POLL_SECONDS = 0.2
# A child that stopped on a signal: 130/143 after saving a checkpoint (or before training
# began), negative when the signal itself ended it.
STOPPED = {130: "SIGINT", 143: "SIGTERM", -int(signal.SIGINT): "SIGINT", -int(signal.SIGTERM): "SIGTERM"}
# train.py flags the sweep sets itself for each child (or refuses with `--sweep`).
_NOT_PASSED = {"help", "sweep", "json", "resume", "overwrite", "output_dir", "dry_run", "check_data", "merge", "auto",
               "plan"}
class SweepTerminated(SystemExit):
    """SIGTERM during a sweep on several GPUs: the trials saved and stopped; exit 143."""


def visible_gpus() -> list:
    """The GPUs this process sees, `CUDA_VISIBLE_DEVICES` applied (the seam tests replace)."""
    from autotune.hardware import probe

    return list(probe().gpus)


def _kind(gpu) -> tuple:
    return (gpu.name, gpu.total_bytes, gpu.cc)


def _kind_record(gpu) -> dict[str, Any]:
    return {"name": gpu.name, "total_bytes": gpu.total_bytes, "cc": list(gpu.cc) if gpu.cc else None}


def gpus_for_trials(ctx) -> tuple[list, list]:
    """(the GPUs to run trials on, one at a time each; the GPUs left out). No GPUs: the
    trials run one after another in this process, as under `torchrun` or with one GPU.

    Only GPUs of the first GPU's kind (name, memory, compute capability): a sweep on one
    GPU trains on the first, the trials are compared with each other, and a plan measured
    on one card must fit the card its trials run on."""
    if ctx.processes > 1:   # under torchrun each trial uses every process
        return [], []
    gpus = visible_gpus()
    if len(gpus) < 2:
        return [], []
    same = [g for g in gpus if _kind(g) == _kind(gpus[0])]
    if len(same) < 2:
        return [], []
    return same, [g for g in gpus if _kind(g) != _kind(gpus[0])]


def cuda_visible(gpu) -> str:
    """What `CUDA_VISIBLE_DEVICES` names this GPU by: its uuid (a MIG slice's too),
    which unlike an index does not depend on `CUDA_DEVICE_ORDER`."""
    return gpu.uuid or str(gpu.index)


def gpu_label(gpu) -> str:
    return gpu.uuid if gpu.is_mig_slice else f"GPU {gpu.index}"


def child_env(gpu) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible(gpu)
    if not gpu.uuid:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"   # NVML's order, which `index` counts in
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)                        # one process per trial
    env["PYTHONUNBUFFERED"] = "1"                 # console.log is current while the trial runs
    env.setdefault("COLUMNS", "120")              # rich's tables in console.log, not 80 columns
    return env


_parser = None


def _train_parser() -> argparse.ArgumentParser:
    global _parser
    if _parser is None:
        spec = importlib.util.spec_from_file_location("_autotune_sweep_train", TRAIN_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _parser = module.build_parser()
    return _parser


def child_flags(args) -> list[str]:
    """`args` back as train.py flags (`--flag=value`, so a value may start with `-`), read off
    train.py's own parser so that a new flag is passed on too. The flags in `_NOT_PASSED`
    are left for the caller."""
    flags: list[str] = []
    for action in _train_parser()._actions:
        if not action.option_strings or action.dest in _NOT_PASSED or action.default is argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, action.default)
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            if value != action.default:
                flags.append(flag)
        elif isinstance(value, list):
            flags += [f"{flag}={item}" for item in value]
        elif value is not None and value != action.default:
            flags.append(f"{flag}={value}")
    return flags


def die_with_parent():
    """A `preexec_fn` that has Linux send the child SIGTERM when the sweep dies, even by
    SIGKILL: the trial then saves a checkpoint and stops (the sweep's `--resume` continues
    it from there), where it would otherwise train on, orphaned, on a GPU the next sweep wants.
    None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:   # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def child_command(flags: list[str]) -> list[str]:
    return [sys.executable, str(TRAIN_PY), *flags]


def _readable_plan(plan: Any) -> bool:
    from autotune.dryrun import Plan

    try:
        Plan.from_record(plan)   # the check `train.py --plan` makes
    except Exception:  # noqa: BLE001 - any malformed plan is unreadable
        return False
    return True


def plan_label(plan: dict[str, Any]) -> str:
    from autotune.dryrun import Plan

    try:
        return Plan.from_dict(plan).label()
    except (KeyError, TypeError, ValueError):
        return json.dumps(plan, default=str)


def child_error(log: Path, code: int) -> str:
    """Why a child failed, in one line: its `error:` line (exit 2), the last line it wrote
    (a traceback's ends with the exception), or the signal that killed it."""
    try:
        with open(log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    lines = [" ".join(line.split()) for line in re.split(r"[\r\n]+", text)]
    lines = [line for line in lines if line and not line.startswith("# ")]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if code == 2 and errors:
        return errors[-1]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the run was killed by {name}" + (" (out of host memory?)" if name == "SIGKILL" else "")
    last = errors[-1] if errors else lines[-1] if lines else None
    return f"{last[:300]} (exit code {code})" if last else f"the run exited with code {code}"


@dataclass
class Shape:
    """One memory shape of the grid and its dry run."""

    number: int
    key: str
    trials: list[Trial]                  # every trial of this shape, in grid order
    plan: dict[str, Any] | None = None
    status: str = "pending"              # pending | running | ok | reused | failed
    error: str | None = None
    gpu: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def folder_name(self) -> str:
        return f"{DRY_RUNS}/{self.number}"

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.folder_name, "trials": [t.name for t in self.trials], "status": self.status,
                "plan": self.plan, "error": self.error, "gpu": self.gpu, "started_at": self.started_at,
                "finished_at": self.finished_at}


@dataclass
class Child:
    proc: subprocess.Popen
    gpu: Any
    log: Path
    trial: Trial | None = None
    shape: Shape | None = None


@dataclass
class ParallelSweep:
    """The pending trials, one per GPU at a time; with `--auto` first one dry run per memory shape."""

    ctx: Any
    trials: list[Trial]                  # the whole grid
    gpus: list
    save: Any                            # () -> None: writes sweep.json
    shapes: list[Shape] = field(default_factory=list)
    shape_of: dict[str, Shape] = field(default_factory=dict)
    queue: list[tuple[str, Any]] = field(default_factory=list)   # ("dry", Shape) | ("trial", Trial)
    running: dict[int, Child] = field(default_factory=dict)      # position in `gpus` -> its child
    signals: list[str] = field(default_factory=list)             # signals the sweep received
    stop_reason: str | None = None                               # a child stopped on this signal

    @property
    def out(self) -> Path:
        return self.ctx.output_dir

    def record(self) -> dict[str, Any]:
        """What sweep.json says about the GPUs and the dry runs."""
        return {"gpus": [cuda_visible(g) for g in self.gpus],
                "dry_runs": [s.to_dict() for s in self.shapes if s.status != "unused"]}

    def say(self, gpu, text: str) -> None:
        from rich.markup import escape

        self.ctx.console.print(f"[{escape(gpu_label(gpu))}] {text}", highlight=False, soft_wrap=True)

    # --------------------------------------------------------------- plan ---

    def find_shapes(self, pending: list[Trial]) -> None:
        """Group the grid by memory shape, as `run()` keys its plan cache: the plan
        built from each trial's config on the GPU the trials get."""
        from autotune.dryrun import Plan
        from autotune.profiles import bitsandbytes_installed, load_profiles, recommend
        from autotune.run import memory_shape

        args = self.ctx.args
        user_yaml = load_yaml_file(args.config) if args.config else None
        profiles, bnb = load_profiles(), bitsandbytes_installed()
        by_key: dict[str, Shape] = {}
        for trial in self.trials:
            if trial.resume_plan is not None:
                continue   # continues with its own plan; no dry run waits for it
            rec = recommend(self.gpus[:1], user_yaml=user_yaml, sets=cli_sets(args) + trial.sets,
                            profiles=profiles, bnb_available=bnb)
            key = memory_shape(Plan.from_config(rec.config, 1), rec.config)
            if key not in by_key:
                by_key[key] = Shape(len(by_key) + 1, key, [])
                self.shapes.append(by_key[key])
            by_key[key].trials.append(trial)
            self.shape_of[trial.name] = by_key[key]
        waiting = {t.name for t in pending}
        for shape in self.shapes:
            saved = self.saved_plan(shape)
            if saved is not None:
                for trial in shape.trials:   # finished earlier with this plan
                    trial.dry_run = shape.folder_name
            if not any(t.name in waiting for t in shape.trials):
                shape.status = "unused" if saved is None else "ok"   # every trial finished earlier
                shape.plan = saved
            elif saved is not None and args.resume:
                shape.plan, shape.status = saved, "reused"
                self.ctx.console.print(f"dry run {shape.number}/{len(self.shapes)}: reusing the plan measured "
                                       f"earlier for this memory shape ({plan_label(saved)})", highlight=False)

    def saved_plan(self, shape: Shape) -> dict[str, Any] | None:
        """The plan an earlier dry run of this sweep measured for this shape on this kind of GPU."""
        try:
            saved = json.loads((self.out / shape.folder_name / SHAPE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("shape") != shape.key or saved.get("gpu") != _kind_record(self.gpus[0]):
            return None
        plan = saved.get("plan")
        return plan if _readable_plan(plan) else None

    def link_codec_cache(self) -> None:
        """A child caches codec output next to its output folder (`../.codec-cache`); point
        those at the cache the trials of a sweep on one GPU, and plain runs beside it, share.
        Without links (a file system without them) the children encode into their own."""
        shared = self.out.parent / CODEC_CACHE
        try:
            shared.mkdir(parents=True, exist_ok=True)
            for folder in (self.out, self.out / DRY_RUNS) if self.ctx.args.auto else (self.out,):
                folder.mkdir(parents=True, exist_ok=True)
                link = folder / CODEC_CACHE
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(Path("..") / CODEC_CACHE, target_is_directory=True)
        except OSError:
            pass

    # ---------------------------------------------------------------- run ---

    def run(self, pending: list[Trial]) -> None:
        args = self.ctx.args
        self.link_codec_cache()
        if args.auto:
            self.find_shapes(pending)
        for trial in pending:
            shape = self.shape_of.get(trial.name)
            if shape is not None and shape.status == "pending" and ("dry", shape) not in self.queue:
                self.queue.append(("dry", shape))
            self.queue.append(("trial", trial))
        try:
            with self.catching_signals():
                while self.queue or self.running:
                    if self.signals or self.stop_reason:
                        self.stop()
                    self.start_what_fits()
                    if not self.reap():
                        time.sleep(POLL_SECONDS)
        finally:
            self.end_leftovers()
            try:
                (self.out / LOGS).rmdir()   # each log went to its trial's folder
            except OSError:
                pass

    def next_job(self) -> tuple[str, Any] | None:
        for job in self.queue:
            kind, item = job
            shape = self.shape_of.get(item.name) if kind == "trial" else None
            if kind == "dry" or shape is None or shape.plan is not None:
                self.queue.remove(job)
                return job
        return None

    def start_what_fits(self) -> None:
        for slot, gpu in enumerate(self.gpus):
            if slot in self.running:
                continue
            job = self.next_job()
            if job is None:
                if self.queue and not self.running:
                    raise RuntimeError(f"sweep: nothing can start, yet {len(self.queue)} jobs wait")  # a bug, not a user error
                return
            self.start(slot, gpu, *job)

    def start(self, slot: int, gpu, kind: str, item) -> None:
        from rich.markup import escape

        args, total = self.ctx.args, len(self.trials)
        if kind == "dry":
            shape: Shape = item
            first = next(t for t in shape.trials if not t.done)
            folder = self.out / shape.folder_name
            if folder.exists():
                shutil.rmtree(folder)   # an earlier sweep's, of another shape or unfinished
            mark_ours(folder)   # the child's console.log lands there before the child claims it
            log = folder / CONSOLE_LOG
            flags = child_flags(trial_args(args, first, self.out)) + ["--auto", "--dry-run", f"--output-dir={folder}"]
            others = len(shape.trials) - 1
            title = (f"dry run {shape.number}/{len(self.shapes)}, the memory shape of {first.name}"
                     + (f" and {others} more trial{'s' if others > 1 else ''}" if others else ""))
            shape.status, shape.gpu, shape.started_at = "running", cuda_visible(gpu), time.time()
        else:
            trial: Trial = item
            shape = self.shape_of.get(trial.name)
            a = trial_args(args, trial, self.out)
            folder = self.out / trial.name
            log = self.out / LOGS / f"{trial.name}.log"
            flags = child_flags(a) + [f"--output-dir={folder}", "--resume" if a.resume else "--overwrite"]
            # As `--plan`, not as `--set`: pinned values could not step down after an OOM mid-trial.
            if a.plan:
                flags.append(f"--plan={a.plan}")
            elif shape is not None:
                flags.append(f"--plan={self.out / shape.folder_name / SHAPE_RECORD}")
                trial.dry_run = shape.folder_name
            title = f"trial {trial.index + 1}/{total} {trial.name}"
            trial.gpu, trial.started_at, trial.finished_at = cuda_visible(gpu), time.time(), None
        command = child_command(flags)
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log, "wb") as handle:
                handle.write(f"# CUDA_VISIBLE_DEVICES={cuda_visible(gpu)} {shlex.join(command)}\n".encode("utf-8", "replace"))
                handle.flush()
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                        env=child_env(gpu), start_new_session=True, preexec_fn=die_with_parent())
        except OSError as exc:
            error = f"cannot start `{command[0]}` ({exc.strerror or exc})"
            if kind == "dry":
                self.dry_run_failed(gpu, item, error, title)
            else:
                self.trial_ended(gpu, item, log, None, error)
            return
        if kind == "dry":
            self.running[slot] = Child(proc, gpu, log, shape=item)
        else:
            self.running[slot] = Child(proc, gpu, log, trial=item)
        self.say(gpu, f"{escape(title)}: started (log: {escape(str(log))})")

    def reap(self) -> bool:
        """Record every child that ended; whether one did."""
        ended = False
        for slot, child in list(self.running.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.running[slot]
            ended = True
            if child.shape is not None:
                self.dry_run_ended(child, code)
            else:
                self.trial_ended(child.gpu, child.trial, child.log, code)
        return ended

    def trial_ended(self, gpu, trial: Trial, log: Path, code: int | None, error: str | None = None) -> None:
        from rich.markup import escape

        trial.finished_at = time.time()
        folder = self.out / trial.name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(log, folder / CONSOLE_LOG)
            log = folder / CONSOLE_LOG
        except OSError:
            pass
        title = f"trial {trial.index + 1}/{len(self.trials)} {escape(trial.name)}"
        if code in STOPPED:
            trial.gpu = trial.started_at = trial.finished_at = None   # unfinished: run again on --resume
            self.stop_reason = self.stop_reason or STOPPED[code]
            self.say(gpu, f"{title}: [yellow]stopped by {STOPPED[code]}[/yellow] (checkpoints in {escape(str(folder))})")
            return
        if error is not None:
            trial.status, trial.error = "failed", error
        elif code != 0:
            trial.status, trial.error = "failed", child_error(log, code)
        else:
            record_summary(trial, folder)
        if trial.status == "failed":
            mark_failed(self.ctx, trial, folder)
        if trial.wall_seconds is None:
            trial.wall_seconds = round(trial.finished_at - (trial.started_at or trial.finished_at), 2)
        shape = self.shape_of.get(trial.name)
        if trial.plan is None and shape is not None:
            trial.plan = shape.plan
        if trial.status == "ok":
            figure = (f"eval loss {trial.eval_loss:.4f}" if trial.eval_loss is not None
                      else f"train loss {trial.train_loss:.4f}" if trial.train_loss is not None else "no loss")
            self.say(gpu, f"{title}: [green]finished[/green] in {trial.finished_at - trial.started_at:.1f} s, {figure}")
        else:
            self.say(gpu, f"{title}: [red]failed[/red]: {escape(trial.error or '')} (log: {escape(str(log))})")
        self.save()

    def dry_run_ended(self, child: Child, code: int) -> None:
        from rich.markup import escape

        shape = child.shape
        shape.finished_at = time.time()
        folder = self.out / shape.folder_name
        title = f"dry run {shape.number}/{len(self.shapes)}"
        if code in STOPPED:
            shape.status = "pending"
            self.stop_reason = self.stop_reason or STOPPED[code]
            self.say(child.gpu, f"{title}: [yellow]stopped by {STOPPED[code]}[/yellow]")
            return
        if code != 0:
            self.dry_run_failed(child.gpu, shape, child_error(child.log, code), title)
            return
        try:
            plan = json.loads((folder / "autotune.json").read_text(encoding="utf-8"))["plan"]
            if not _readable_plan(plan):
                raise ValueError("its plan is incomplete")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.dry_run_failed(child.gpu, shape, f"the dry run left no readable plan in {folder / 'autotune.json'} "
                                                  f"({type(exc).__name__}: {exc})", title)
            return
        shape.plan, shape.status = plan, "ok"
        try:
            write_record(folder / SHAPE_RECORD, {"shape": shape.key, "gpu": _kind_record(child.gpu), "plan": plan})
        except OSError:
            pass
        self.say(child.gpu, f"{title}: [green]done[/green] in {shape.finished_at - shape.started_at:.1f} s: "
                            f"{escape(plan_label(plan))}")
        self.save()

    def dry_run_failed(self, gpu, shape: Shape, error: str, title: str) -> None:
        """No plan for this shape: each of its trials fails with the dry run's reason, as it would
        in a sweep on one GPU, where each trial's own dry run fails."""
        from rich.markup import escape

        shape.status, shape.error = "failed", error
        shape.finished_at = shape.finished_at or time.time()
        failed = []
        for trial in shape.trials:
            if ("trial", trial) in self.queue:
                self.queue.remove(("trial", trial))
                trial.status, trial.error, trial.dry_run = "failed", error, shape.folder_name
                failed.append(trial.name)
        self.say(gpu, f"{escape(title)}: [red]failed[/red]: {escape(error)}; so did its trial{'s' if len(failed) > 1 else ''} "
                      f"{escape(', '.join(failed))} (log: {escape(str(self.out / shape.folder_name / CONSOLE_LOG))})")
        self.save()

    # ------------------------------------------------------------ signals ---

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM are noted, not raised: the loop passes them on to the children."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.signals.append(signal.Signals(signum).name)

        from autotune.reliability import stop_signals_handled_by

        with stop_signals_handled_by(handler):
            yield

    def stop(self) -> None:
        """Pass the stop on to every running child (which saves a checkpoint and exits), wait
        for them, then end the sweep: KeyboardInterrupt (exit 130), or SweepTerminated (143)."""
        why = self.signals[0] if self.signals else self.stop_reason
        sig = signal.SIGTERM if why == "SIGTERM" else signal.SIGINT
        if self.running:
            cause = why if self.signals else f"a trial stopped on {why}"
            self.ctx.console.print(f"[yellow]{cause}: stopping the sweep; the {len(self.running)} running "
                                   "children save a checkpoint and stop (Ctrl-C again: at once, without saving)[/yellow]")
        for child in self.running.values():
            self.send(child, sig)
        seen = len(self.signals)
        while self.running:
            if len(self.signals) > seen:
                again = len(self.signals) - seen
                for child in self.running.values():
                    if again == 1:
                        self.send(child, signal.SIGINT)   # a second Ctrl-C: stop now, without saving
                    else:
                        child.proc.kill()
                seen = len(self.signals)
            if not self.reap():
                time.sleep(POLL_SECONDS)
        self.save()
        if why == "SIGTERM":
            raise SweepTerminated(143)
        raise KeyboardInterrupt

    @staticmethod
    def send(child: Child, sig: int) -> None:
        try:
            child.proc.send_signal(sig)
        except (OSError, ValueError):
            pass   # it ended meanwhile

    def end_leftovers(self) -> None:
        """After an error in the sweep itself: no child may outlive it."""
        for child in self.running.values():
            self.send(child, signal.SIGTERM)
        deadline = time.time() + 60
        for child in self.running.values():
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        self.running.clear()


# ----------------------------------------------------------------- driver ---

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


def run_sweep(ctx) -> int:
    from rich.markup import escape

    args = ctx.args
    check_flags(args)
    axes = parse_sweeps(list(args.sweep))
    trials = build_grid(axes)
    validate_trials(args, axes, trials)
    from autotune.data import find_layout

    find_layout(Path(args.data))   # a wrong --data path fails here, not in every trial
    base = base_record(args)
    previous = prepare_sweep_dir(ctx)
    check_same_base(previous, base, ctx.output_dir)
    out, c = ctx.output_dir, ctx.console

    gpus, left_out = gpus_for_trials(ctx)
    if gpus and not TRAIN_PY.is_file():
        c.print(f"[yellow]! {len(gpus)} GPUs, but {escape(str(TRAIN_PY))} is missing: the trials run one after "
                "another on the first GPU[/yellow]")
        gpus, left_out = [], []
    # Decided up front, so every process of a DDP sweep skips the same trials.
    finished = {t.name for t in trials if args.resume and _finished(out / t.name / SUMMARY)}
    # A trial that began training and was stopped continues from its checkpoint; one that
    # failed (failed.json) starts over, or it would fail the same way from its checkpoint.
    for t in trials:
        folder = out / t.name
        if (args.resume and t.name not in finished and (folder / RUN_MARKER).is_file()
                and not (folder / FAILED_MARKER).exists()):
            t.resume_plan = resume_plan(folder)
            if t.resume_plan is None:
                c.print(f"[yellow]! trial {escape(t.name)} starts over: its run_config.yaml does not read[/yellow]")
    keys = ", ".join(f"{a.key} ({len(a.values)})" for a in axes)
    how = (f"{len(gpus)} at a time, one per GPU ({', '.join(gpu_label(g) for g in gpus)})" if gpus
           else "one after another")
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

    def save(complete: bool) -> dict[str, Any]:
        record = sweep_record(ctx, axes, trials, base, complete, parallel.record() if parallel else None)
        if ctx.is_main:
            write_record(out / SWEEP_MARKER, record)
        return record

    if gpus:
        parallel = ParallelSweep(ctx, trials, gpus, lambda: save(False))
    save(False)
    cache: dict = {}
    try:
        if parallel is not None:
            for trial in trials:
                if trial.name in finished:
                    _skip_finished(ctx, trial, len(trials), previous)
            save(False)
            parallel.run([t for t in trials if t.name not in finished])
        else:
            for number, trial in enumerate(trials, 1):
                if trial.name in finished:
                    _skip_finished(ctx, trial, len(trials), previous)
                    continue
                c.rule(escape(f"trial {number}/{len(trials)}: {trial.name}  ({' '.join(trial.sets)})"))
                run_trial(ctx, trial, cache)
                if trial.status == "failed":
                    c.print(f"[red]trial {escape(trial.name)} failed[/red]: {escape(trial.error or '')}", highlight=False)
                save(False)
    except (KeyboardInterrupt, SweepTerminated):
        record = save(False)
        if ctx.is_main:
            show(ctx, axes, trials, record)
            c.print(f"[yellow]sweep interrupted: rerun the same command with `--resume` "
                    f"(and `--output-dir {escape(str(out))}`) to finish it[/yellow]")
        raise
    record = save(True)
    if ctx.is_main:
        show(ctx, axes, trials, record)
        if args.json:
            print(json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False, default=str))
    return 0 if record["best"] is not None else 1
