"""The sweep's grid: parsing `--sweep`, trial names and settings, each trial's request and
record, ranking and the table."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.config import load_yaml_file, parse_set, resolve_config
from autotune.errors import AutotuneError
from autotune.rundir import FAILED_RECORD, RESOLVED_CONFIG, RUN_CONFIG, RUN_SUMMARY, SWEEP_RECORD








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
    scores: dict[str, Any] | None = None    # the scores of the trial's saved adapter (its step's evaluation)
    sample: dict[str, Any] | None = None    # one of that evaluation's clips, for the sweep's report

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
                "started_at": self.started_at, "finished_at": self.finished_at, "dry_run": self.dry_run,
                "scores": self.scores}

    def score(self, by: str) -> float | None:
        """The trial's `error_rate` or `similarity` (of its saved adapter), or None."""
        return _finite((self.scores or {}).get(f"mean_{by}"))


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
    base = args.config_sets()
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


def base_record(args, axes: list[Axis] | None = None) -> dict[str, Any]:
    """What must match for `--resume` to continue a sweep: everything but the grid, including
    the values a `--config` file holds (an edited file changes what the remaining trials learn)."""
    from autotune.config import load_yaml_file, resolve_config

    settings = dict(parse_set(s) for s in args.config_sets())
    swept = {a.key for a in axes or []}
    resolved = resolve_config(user_yaml=load_yaml_file(args.config) if args.config else None,
                              sets=list(args.config_sets())).config.to_dict()
    for key in swept:
        _drop_dotted(resolved, key)
    return {"data": args.data, "config": args.config, "auto": bool(args.auto),
            "settings": json.loads(json.dumps(settings, default=str)),
            "config_values": json.loads(json.dumps(resolved, default=str))}


def _drop_dotted(tree: dict[str, Any], key: str) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(last, None)


def check_same_base(previous: dict[str, Any] | None, base: dict[str, Any], out: Path) -> None:
    from autotune.config import changed_keys

    old = (previous or {}).get("base")
    if not old or old == base:
        return
    diffs = [k for k in ("data", "config", "auto") if old.get(k) != base.get(k)]
    old_s, new_s = old.get("settings", {}), base.get("settings", {})
    diffs += [f"--set {k}" for k in sorted(set(old_s) | set(new_s)) if old_s.get(k) != new_s.get(k)]
    if "config_values" in old:   # sweeps recorded before this have no values to compare
        diffs += [f"`{k}` {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}"
                  for k, a, b in changed_keys(old["config_values"], base.get("config_values", {}))
                  if f"--set {k}" not in diffs]
    if not diffs:
        return
    shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    raise AutotuneError(f"`--resume`: the sweep in `{out}` was started with other settings ({shown} differ): "
                        "rerun it with the same `--data`, `--config` (as it was), `--auto` and `--set` flags, "
                        "or replace `--resume` with `--overwrite` to start it over")


def record_summary(trial: Trial, folder: Path) -> None:
    """A run that exited cleanly: its figures, or why they cannot be read."""
    if not (folder / RUN_SUMMARY).exists():
        trial.status, trial.error = "failed", f"the run wrote no {RUN_SUMMARY}"
        return
    trial.status = "ok"
    try:
        read_summary(trial, folder)
    except (OSError, ValueError) as exc:
        trial.status, trial.error = "failed", f"cannot read {RUN_SUMMARY} ({exc})"


def trial_args(request, trial: Trial, out: Path):
    """The request of one trial: the sweep's, with the trial's values appended to `--set`,
    in `<sweep dir>/<trial name>`."""
    # The sweep's `--resume`: a trial stopped after it began training continues from its
    # newest checkpoint with its own plan (a new dry run could choose a rank or optimizer
    # the checkpoint cannot load); any other unfinished trial starts over in its folder.
    resuming = trial.resume_plan is not None
    return request.replace(
        sweep=[], sets=list(request.sets) + trial.sets, output_dir=str(out / trial.name),
        resume="latest" if resuming else None, overwrite=not resuming, plan=trial.resume_plan,
        auto=request.auto and not resuming, dry_run=False, check_data=False,
        # Trials share the codec cache that plain runs beside the sweep use.
        codec_cache=str(out.parent / ".codec-cache"),
        argv=None)  # a trial's own resume hint would name the trial; the sweep prints its own


def resume_plan(folder: Path) -> str | None:
    """The plan a stopped trial trained with, as a `--plan` file: its run_summary.json
    (written when it stopped; it holds the plan after any out-of-memory step-down), else
    its run_config.yaml (a trial killed outright; rewritten at each step-down). Only
    read, never written, so the processes of a DDP sweep all see the same answer.
    None when neither reads."""
    from autotune.config import validate

    try:
        summary = json.loads((folder / RUN_SUMMARY).read_text(encoding="utf-8"))
        if readable_plan(summary.get("plan")):
            return str(folder / RUN_SUMMARY)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        validate(load_yaml_file(folder / RUN_CONFIG))
    except AutotuneError:
        return None
    return str(folder / RUN_CONFIG)


def mark_failed(ctx, trial: Trial, folder: Path) -> None:
    """A failed trial's own record that it failed: the next `--resume` starts it over,
    where continuing from its checkpoint would fail the same way."""
    if not ctx.is_main or not folder.is_dir():
        return
    try:
        write_record(folder / FAILED_RECORD, {"error": trial.error})
    except OSError:
        pass


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def read_summary(trial: Trial, folder: Path) -> None:
    """Fill a trial's figures from its run_summary.json; a non-finite loss fails it."""
    summary = json.loads((folder / RUN_SUMMARY).read_text(encoding="utf-8"))
    metric = "eval_loss"
    try:
        import yaml

        resolved = yaml.safe_load((folder / RESOLVED_CONFIG).read_text(encoding="utf-8")) or {}
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
    scores = summary.get("scores") or {}
    trial.scores = scores.get("adapter")
    trial.sample = scores.get("adapter_sample")
    bad = [f"{label} is {value}" for label, value in (("final train loss", train), ("eval loss", eval_loss))
           if isinstance(value, (int, float)) and not math.isfinite(value)]
    if train is None and eval_loss is None:
        bad.append("the run logged no loss")
    if bad:
        trial.status, trial.error = "failed", "; ".join(bad)


# What trials are ranked by, best first: the scores of their saved adapters when every
# trial that succeeded has one (intelligibility, else speaker similarity), else the
# validation loss, else the train loss (see `ranking_basis`).
RANKING_LABELS = {"error_rate": "intelligibility (CER/WER of the samples)", "similarity": "speaker similarity",
                  "eval_loss": "validation loss", "train_loss": "train loss"}


def ranking_basis(trials: list[Trial]) -> str:
    ok = [t for t in trials if t.succeeded]
    for by in ("error_rate", "similarity"):
        if ok and all(t.score(by) is not None for t in ok):
            return by
    return "eval_loss" if any(t.eval_loss is not None for t in ok) or not ok else "train_loss"


def rank(trials: list[Trial], by: str | None = None) -> list[Trial]:
    """By `by` (default: `ranking_basis`): error rate ascending, similarity descending, or
    validation loss ascending then trials with only a train loss; failed and unrun last."""
    by = by or ranking_basis(trials)

    def key(t: Trial):
        if not t.succeeded:
            return (2, 0, math.inf, t.index)
        if by in ("error_rate", "similarity"):
            value = t.score(by)
            return (0, 0, -value if by == "similarity" else value, t.index) if value is not None else (1, 0, 0, t.index)
        if t.eval_loss is not None:
            return (0, 0, t.eval_loss, t.index)
        return (1, 0, t.train_loss if t.train_loss is not None else math.inf, t.index)

    return sorted(trials, key=key)


def sweep_record(ctx, axes: list[Axis], trials: list[Trial], base: dict[str, Any], complete: bool,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    by = ranking_basis([t for t in trials if t.done])
    done = rank([t for t in trials if t.done], by)
    best = next((t for t in done if t.succeeded), None)
    record = {
        "version": 1,
        "complete": complete,
        "output_dir": str(ctx.output_dir),
        "grid": {a.key: a.values for a in axes},
        "base": base,
        "ranked_by": by,
        "trials": [t.to_dict() for t in done],
        "pending": [t.name for t in trials if not t.done],
        "best": best.to_dict() if best else None,
        "best_sets": set_line(best) if best else None,
    }
    record.update(extra or {})
    return record


def pace(trials: list[Trial], since: float) -> dict[str, Any]:
    """The trials this invocation finished (`ok`), per hour of its wall time from `since`
    (the sweep's start, dry runs included) to the last trial's end."""
    ran = [t for t in trials if t.done and not t.earlier and t.finished_at]
    end = max((t.finished_at for t in ran), default=None)
    if end is None or end <= since:
        return {"wall_seconds": None, "trials_per_hour": None}
    wall = end - since
    return {"wall_seconds": round(wall, 1), "trials_per_hour": round(sum(t.succeeded for t in ran) * 3600 / wall, 2)}


def write_record(path: Path, record: dict[str, Any]) -> None:
    from autotune.rundir import write_json

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
    from rich.text import Text

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    short = _short_names([a.key for a in axes])
    by = record["ranked_by"]
    ranked = rank([t for t in trials if t.done], by)
    scored = any(t.scores for t in ranked)
    # (header, cells, right-aligned, dropped first when the terminal is narrow: higher goes first)
    columns: list[tuple[str, list[str], bool, int]] = [("#", [str(i) for i in range(1, len(ranked) + 1)], True, 0)]
    columns += [(short[a.key], [escape(_cell(a.key, t.settings.get(a.key))) for t in ranked], False, 0) for a in axes]
    if scored:
        columns += [("CER/WER", [num(t.score("error_rate"), ".1%") for t in ranked], True, 0),
                    ("similarity", [num(t.score("similarity"), ".3f") for t in ranked], True, 1)]
    columns += [("eval loss", [num(t.eval_loss, ".4f") for t in ranked], True, 0),
                ("train loss", [num(t.train_loss, ".4f") for t in ranked], True, 4),
                ("tokens/s", [num(t.tokens_per_second, ",.0f") for t in ranked], True, 3),
                ("peak GiB", ["-" if t.peak_gpu_bytes is None else f"{t.peak_gpu_bytes / 2**30:.2f}"
                              for t in ranked], True, 2),
                ("status", [("[green]ok[/green]" if t.status == "ok" else "[red]failed[/red]")
                            + (" (earlier)" if t.earlier else "") for t in ranked], False, 0)]

    def width(column) -> int:
        header, cells, _, _ = column
        return max([len(header)] + [len(Text.from_markup(cell).plain) for cell in cells])

    # Every value shown whole (a learning rate cut to `0.0…` says nothing): on a narrow terminal the
    # least needed columns go instead, and the settings and the ranking stay.
    while sum(width(col) + 3 for col in columns) + 1 > ctx.console.width and any(col[3] for col in columns):
        columns.remove(max(columns, key=lambda col: col[3]))
    table = Table(title=f"Sweep: {len(ranked)} of {len(trials)} trials, ranked by {RANKING_LABELS[by]}",
                  title_justify="left")
    for column in columns:
        table.add_column(column[0], justify="right" if column[2] else "left", no_wrap=True, min_width=width(column))
    for row in zip(*(column[1] for column in columns)):
        table.add_row(*row)
    c = ctx.console
    c.print(table)
    for t in ranked:
        if t.status == "failed":
            c.print(f"[red]failed[/red] {escape(t.name)}: {escape(t.error or '')}", highlight=False)
    if record.get("trials_per_hour") is not None:
        c.print(f"pace: {sum(1 for t in ranked if t.succeeded and not t.earlier)} trials in "
                f"{record['wall_seconds'] / 60:.1f} min, {record['trials_per_hour']:,.1f} trials/hour", highlight=False)
    if record["pending"]:
        c.print(f"[yellow]{len(record['pending'])} trials not run yet: rerun with `--resume` to finish them[/yellow]")
    best = record["best"]
    if best is None:
        c.print("[red]no trial finished[/red]: see the errors above")
        return
    if by == "train_loss":
        c.print("[yellow]no validation loss: ranked by train loss, which rewards overfitting; "
                "add validation data (`--val`, or keep `data.val_fraction` > 0)[/yellow]")
    elif by == "eval_loss" and scored:
        c.print("[yellow]not every trial was scored: ranked by validation loss, not by the scores[/yellow]")
    if by in ("error_rate", "similarity"):
        shown = f"{by.replace('_', ' ')} {num((best['scores'] or {}).get('mean_' + by), '.1%' if by == 'error_rate' else '.3f')}"
    else:
        shown = f"{by.replace('_', ' ')} {num(best[by], '.4f')}"
    c.print(f"best: [bold]{escape(best['name'])}[/bold] ({shown}), adapter in {escape(str(ctx.output_dir / best['name']))}")
    c.print("train the winner with:")
    c.print(record["best_sets"], markup=False, highlight=False, soft_wrap=True)
    c.print(f"(all trials: {escape(str(ctx.output_dir / SWEEP_RECORD))}; to listen: "
            f"{escape(str(ctx.output_dir / 'report.html'))})")


def write_report(out: Path, trials: list[Trial], record: dict[str, Any], warn) -> None:
    """The sweep's report.html: the trials ranked as in the table, one sample of each."""
    from autotune.errors import AutotuneError
    from autotune.report import write_sweep_report

    by = record["ranked_by"]
    metric = f"mean_{by}" if by in ("error_rate", "similarity") else by
    rows = []
    for t in rank([t for t in trials if t.done], by):
        sample = dict(t.sample) if t.sample else None
        if sample:
            for key in ("wav", "reference_wav"):
                path = sample.get(key)
                if path and not Path(path).is_absolute():
                    sample[key] = f"{t.name}/{path}"
        metrics = {**{f"mean_{k}": t.score(k) for k in ("error_rate", "similarity")},
                   "eval_loss": t.eval_loss, "train_loss": t.train_loss}
        rows.append({"name": t.name, "status": t.status + (f": {t.error}" if t.error else ""),
                     "params": t.settings, "metrics": metrics, "report": f"{t.name}/report.html", "sample": sample})
    try:
        write_sweep_report(out, rows, metric=metric, higher_is_better=by == "similarity",
                           title=f"Sweep {out.name}: ranked by {RANKING_LABELS[by]}")
    except AutotuneError as exc:
        warn(f"report.html not written: {exc.one_line()}")


def readable_plan(plan: Any) -> bool:
    from autotune.tuning.plan import Plan

    try:
        Plan.from_record(plan)   # the check `train.py --plan` makes
    except Exception:  # noqa: BLE001 - any malformed plan is unreadable
        return False
    return True

