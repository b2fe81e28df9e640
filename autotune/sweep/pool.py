"""Trials on GPUs: each trial a `train.py` child process that sees only its GPU, one or
more per GPU at a time. The children are started in a session of their own, so a Ctrl-C in
the terminal reaches the sweep alone, which passes it on once to each child.

Several trials on one GPU (`--trials-per-gpu`): a child that shares its GPU with k-1 others
is capped (`--vram-limit`) at 1/k of the card less `CONTEXT_BYTES` each, so k caps and k CUDA
contexts add up to the card, and it plans as a card of that size. With `auto`, a GPU runs
one trial at a time unless a dry run measured a peak that fits k times under
`autotune.memory_fraction` of such caps; with N, every child runs as one of N."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from autotune.config import load_yaml_file
from autotune.rundir import AUTOTUNE_RECORD, mark_ours
from autotune.sweep.children import (child_env, child_error, child_flags, cuda_visible, die_with_parent, gpu_label,
                                     plan_label)
from autotune.sweep.grid import Trial, readable_plan, mark_failed, record_summary, trial_args, write_record
from autotune.sweep.sharing import (card_bytes, chosen_peak, recorded_cap, share_gib, sharing_for_cap,
                                    trials_that_fit)


# Children start through the package, so an installed wheel (no train.py on disk) runs them too.
TRAIN_MODULE = "autotune.commands.train"


DRY_RUNS = ".dry-runs"           # <sweep>/.dry-runs/<n>/: one dry run per memory shape


LOGS = ".logs"                   # a running trial's output, moved to <trial>/console.log when it ends


CODEC_CACHE = ".codec-cache"


CONSOLE_LOG = "console.log"


SHAPE_RECORD = "shape.json"      # <sweep>/.dry-runs/<n>/shape.json: the shape, the GPU and the plan


POLL_SECONDS = 0.2


# A child that stopped on a signal: 130/143 after saving a checkpoint (or before training
# began), negative when the signal itself ended it.
STOPPED = {130: "SIGINT", 143: "SIGTERM", -int(signal.SIGINT): "SIGINT", -int(signal.SIGTERM): "SIGTERM"}


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
    """(the GPUs to run trial children on; the GPUs left out). No GPUs: the trials run one
    after another in this process, as under `torchrun`, on a CPU, or on one GPU that can only
    take one trial at a time (`--trials-per-gpu 1`, or `auto` without `--auto`, where no dry
    run measures a peak).

    Only GPUs of the first GPU's kind (name, memory, compute capability): a sweep on one
    GPU trains on the first, the trials are compared with each other, and a plan measured
    on one card must fit the card its trials run on."""
    if ctx.processes > 1:   # under torchrun each trial uses every process
        return [], []
    gpus = visible_gpus()
    if not gpus:
        return [], []
    same = [g for g in gpus if _kind(g) == _kind(gpus[0])]
    per_gpu = ctx.request.trials_per_gpu
    shares = per_gpu not in (None, "auto", 1) or (per_gpu in (None, "auto") and ctx.request.auto)
    if len(same) < 2 and not (shares and same[0].total_bytes):
        return [], []
    return same, [g for g in gpus if _kind(g) != _kind(gpus[0])]


def child_command(flags: list[str]) -> list[str]:
    return [sys.executable, "-m", TRAIN_MODULE, *flags]


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
    fraction: float = 0.9                # the trials' autotune.memory_fraction
    peak_bytes: int | None = None        # the plan's peak, as the dry run measured it
    per_gpu: int = 1                     # how many of its trials share a GPU

    @property
    def folder_name(self) -> str:
        return f"{DRY_RUNS}/{self.number}"

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.folder_name, "trials": [t.name for t in self.trials], "status": self.status,
                "plan": self.plan, "error": self.error, "gpu": self.gpu, "started_at": self.started_at,
                "finished_at": self.finished_at, "peak_bytes": self.peak_bytes, "trials_per_gpu": self.per_gpu}


@dataclass
class Child:
    proc: subprocess.Popen
    gpu: Any
    log: Path
    trial: Trial | None = None
    shape: Shape | None = None
    position: int = 0                    # its GPU's place in `ParallelSweep.gpus`
    sharing: int = 1                     # it is one of this many on its GPU (it holds 1/sharing)


@dataclass
class ParallelSweep:
    """The pending trials, one or more per GPU at a time; with `--auto` first one dry run per
    memory shape."""

    ctx: Any
    trials: list[Trial]                  # the whole grid
    gpus: list
    save: Any                            # () -> None: writes sweep.json
    shapes: list[Shape] = field(default_factory=list)
    shape_of: dict[str, Shape] = field(default_factory=dict)
    queue: list[tuple[str, Any]] = field(default_factory=list)   # ("dry", Shape) | ("trial", Trial)
    running: dict[int, Child] = field(default_factory=dict)      # a number per start -> its child
    signals: list[str] = field(default_factory=list)             # signals the sweep received
    stop_reason: str | None = None                               # a child stopped on this signal
    started: int = 0                                             # children started so far
    most_at_once: dict[str, int] = field(default_factory=dict)   # GPU -> the most children it ran at once
    resumed_caps: dict[str, float | None] = field(default_factory=dict)  # a resumed trial -> the cap it ran with

    @property
    def out(self) -> Path:
        return self.ctx.output_dir

    @property
    def per_gpu(self) -> int | None:
        """`--trials-per-gpu N`; None for `auto`."""
        value = self.ctx.request.trials_per_gpu
        return value if isinstance(value, int) else None

    def card(self, gpu) -> int:
        return card_bytes(gpu, self.ctx.request.vram_limit)

    def record(self) -> dict[str, Any]:
        """What sweep.json says about the GPUs and the dry runs."""
        return {"gpus": [cuda_visible(g) for g in self.gpus], "trials_per_gpu": self.per_gpu or "auto",
                "most_at_once": dict(self.most_at_once),
                "dry_runs": [s.to_dict() for s in self.shapes if s.status != "unused"]}

    def say(self, gpu, text: str) -> None:
        from rich.markup import escape

        self.ctx.console.print(f"[{escape(gpu_label(gpu))}] {text}", highlight=False, soft_wrap=True)

    # --------------------------------------------------------------- plan ---

    def find_shapes(self, pending: list[Trial]) -> None:
        """Group the grid by memory shape, as `run()` keys its plan cache: the plan
        built from each trial's config on the GPU the trials get."""
        from autotune.tuning.plan import Plan
        from autotune.profiles import bitsandbytes_installed, load_profiles, recommend
        from autotune.tuning.plan import memory_shape

        args = self.ctx.request
        user_yaml = load_yaml_file(args.config) if args.config else None
        profiles, bnb = load_profiles(), bitsandbytes_installed()
        by_key: dict[str, Shape] = {}
        for trial in self.trials:
            if trial.resume_plan is not None:
                continue   # continues with its own plan; no dry run waits for it
            rec = recommend(self.gpus[:1], user_yaml=user_yaml, sets=args.config_sets() + trial.sets,
                            profiles=profiles, bnb_available=bnb)
            key = memory_shape(Plan.from_config(rec.config, 1), rec.config)
            if key not in by_key:
                by_key[key] = Shape(len(by_key) + 1, key, [], fraction=rec.config.autotune.memory_fraction)
                self.shapes.append(by_key[key])
            by_key[key].trials.append(trial)
            self.shape_of[trial.name] = by_key[key]
        waiting = {t.name for t in pending}
        for shape in self.shapes:
            saved, shape.peak_bytes = self.saved_plan(shape)
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

    def kind_record(self) -> dict[str, Any]:
        """The GPU the dry runs plan for, as shape.json records it: its kind, and the cap a
        dry run runs under when it shares the GPU (or the user's `--vram-limit`)."""
        record = _kind_record(self.gpus[0])
        cap = self.dry_run_cap()
        if cap:
            record["vram_limit_gib"] = cap
        return record

    def dry_run_cap(self) -> float | None:
        return self.cap_for("dry", None, self.gpus[0]) or self.ctx.request.vram_limit

    def saved_plan(self, shape: Shape) -> tuple[dict[str, Any] | None, int | None]:
        """The plan an earlier dry run of this sweep measured for this shape on this kind of GPU
        (under the same cap), and its peak; (None, None) when there is none."""
        try:
            saved = json.loads((self.out / shape.folder_name / SHAPE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, None
        if not isinstance(saved, dict) or saved.get("shape") != shape.key or saved.get("gpu") != self.kind_record():
            return None, None
        plan, peak = saved.get("plan"), saved.get("peak_bytes")
        if not readable_plan(plan):
            return None, None
        return plan, peak if isinstance(peak, int) and peak > 0 else None

    def link_codec_cache(self) -> None:
        """A child caches codec output next to its output folder (`../.codec-cache`); point
        those at the cache the trials of a sweep on one GPU, and plain runs beside it, share.
        Without links (a file system without them) the children encode into their own."""
        shared = self.out.parent / CODEC_CACHE
        try:
            shared.mkdir(parents=True, exist_ok=True)
            for folder in (self.out, self.out / DRY_RUNS) if self.ctx.request.auto else (self.out,):
                folder.mkdir(parents=True, exist_ok=True)
                link = folder / CODEC_CACHE
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(Path("..") / CODEC_CACHE, target_is_directory=True)
        except OSError:
            pass

    # ---------------------------------------------------------------- run ---

    def run(self, pending: list[Trial]) -> None:
        args = self.ctx.request
        self.link_codec_cache()
        if args.auto:
            self.find_shapes(pending)
        for trial in pending:
            shape = self.shape_of.get(trial.name)
            if shape is not None and shape.status == "pending" and ("dry", shape) not in self.queue:
                self.queue.append(("dry", shape))
            self.queue.append(("trial", trial))
            if trial.resume_plan is not None:   # read once, not at every look at the queue
                self.resumed_caps[trial.name] = recorded_cap(self.out / trial.name)
        for shape in self.shapes:
            if shape.status == "reused":
                self.decide_sharing(shape)
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

    def sharing(self, kind: str, item) -> int:
        """How many children like this one a GPU runs at once: `--trials-per-gpu N`; with
        `auto` a dry run has its GPU to itself, and a trial shares it as its shape's measured
        peak allows. A resumed trial keeps the cap it ran with."""
        if kind == "trial" and item.resume_plan is not None:
            return sharing_for_cap(self.card(self.gpus[0]), self.resumed_caps.get(item.name))
        if self.per_gpu:
            return self.per_gpu
        shape = self.shape_of.get(item.name) if kind == "trial" else None
        return shape.per_gpu if shape is not None else 1

    def load(self, position: int) -> float:
        """How much of a GPU its running children hold (1.0: all of it)."""
        return sum(1 / c.sharing for c in self.running.values() if c.position == position)

    def next_job(self) -> tuple[int, tuple[str, Any]] | None:
        """The first job, in the queue's order, that can start, and the GPU it fits on (the
        least loaded); a trial waits for its shape's dry run."""
        for job in self.queue:
            kind, item = job
            shape = self.shape_of.get(item.name) if kind == "trial" else None
            if kind == "trial" and shape is not None and shape.plan is None:
                continue
            need = 1 / self.sharing(kind, item)
            free = [(self.load(p), p) for p in range(len(self.gpus)) if self.load(p) + need <= 1 + 1e-9]
            if free:
                self.queue.remove(job)
                return min(free)[1], job
        return None

    def start_what_fits(self) -> None:
        while True:
            picked = self.next_job()
            if picked is None:
                if self.queue and not self.running:
                    raise RuntimeError(f"sweep: nothing can start, yet {len(self.queue)} jobs wait")  # a bug, not a user error
                return
            position, (kind, item) = picked
            self.start(position, self.gpus[position], kind, item)

    def cap_for(self, kind: str, item, gpu) -> float | None:
        """The `--vram-limit` a child gets when it shares its GPU (None: the sweep's own flags)."""
        if kind == "trial" and item.resume_plan is not None:
            return self.resumed_caps.get(item.name)
        k = self.sharing(kind, item)
        return share_gib(self.card(gpu), k) if k > 1 else None

    def start(self, position: int, gpu, kind: str, item) -> None:
        from rich.markup import escape

        args, total = self.ctx.request, len(self.trials)
        sharing, cap = self.sharing(kind, item), self.cap_for(kind, item, gpu)
        if cap is not None:
            args = args.replace(vram_limit=cap)
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
        child = Child(proc, gpu, log, position=position, sharing=sharing)
        if kind == "dry":
            child.shape = item
        else:
            child.trial = item
        self.started += 1
        self.running[self.started] = child
        label = cuda_visible(gpu)
        now = sum(1 for c in self.running.values() if c.position == position)
        self.most_at_once[label] = max(self.most_at_once.get(label, 0), now)
        shared = f", 1 of up to {sharing} on this GPU, capped at {cap:g} GiB" if sharing > 1 and cap else ""
        self.say(gpu, f"{escape(title)}: started{shared} (log: {escape(str(log))})")

    def reap(self) -> bool:
        """Record every child that ended; whether one did."""
        ended = False
        for number, child in list(self.running.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.running[number]
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
            plan = json.loads((folder / AUTOTUNE_RECORD).read_text(encoding="utf-8"))["plan"]
            if not readable_plan(plan):
                raise ValueError("its plan is incomplete")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.dry_run_failed(child.gpu, shape, f"the dry run left no readable plan in {folder / 'autotune.json'} "
                                                  f"({type(exc).__name__}: {exc})", title)
            return
        shape.plan, shape.status = plan, "ok"
        shape.peak_bytes = chosen_peak(folder / AUTOTUNE_RECORD)
        try:
            write_record(folder / SHAPE_RECORD, {"shape": shape.key, "gpu": self.kind_record(), "plan": plan,
                                                 "peak_bytes": shape.peak_bytes})
        except OSError:
            pass
        self.decide_sharing(shape)
        together = (f"; its trials run {shape.per_gpu} at a time on a GPU (peak {shape.peak_bytes / 2**30:.1f} GiB, "
                    f"each capped at {share_gib(self.card(child.gpu), shape.per_gpu):g} GiB)"
                    if shape.per_gpu > 1 and not self.per_gpu else "")
        self.say(child.gpu, f"{title}: [green]done[/green] in {shape.finished_at - shape.started_at:.1f} s: "
                            f"{escape(plan_label(plan))}{together}")
        self.save()

    def decide_sharing(self, shape: Shape) -> None:
        """`auto`: as many of the shape's trials on a GPU as its measured peak allows, and no
        more than wait to run (a cap costs the profile of a smaller card for nothing)."""
        if self.per_gpu:
            shape.per_gpu = self.per_gpu
            return
        waiting = sum(1 for kind, item in self.queue if kind == "trial" and self.shape_of.get(item.name) is shape)
        fits = trials_that_fit(shape.peak_bytes, self.card(self.gpus[0]), shape.fraction)
        shape.per_gpu = max(1, min(fits, waiting))

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

        from autotune.signals import stop_signals_handled_by

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
