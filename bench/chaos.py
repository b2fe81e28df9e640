#!/usr/bin/env python
"""Reliability under chaos: kill -9, damaged checkpoints, two runs in one folder, a full disk.

    python bench/chaos.py --kills 100 --corruptions 50 --seed 0 --json
    python bench/chaos.py --kills 4 --corruptions 4 --concurrent 2 --disk-full 1   # a quick look

Every trial is a real `train.py` process on the tiny model (CPU, 12 steps, a
checkpoint every 3), and ends by comparing the run's final adapter (every tensor,
bit for bit) and its per-step losses with one uninterrupted reference run:
identical is "survived", anything else (another result, a traceback, a resume
that never completes) is "lost".

- kill: kill -9 at a random moment (start-up, training, a save, the final
  save); then `--resume` until the run completes. Kinds: `kill_random`
  (uniform over a run's length), `kill_in_save` (the moment a `.tmp-checkpoint-N`
  staging folder appears), `kill_during_resume` (the first `--resume` is killed
  too, at a random moment).
- corruption: the newest checkpoint of a run stopped after step 9 is damaged
  (the kinds of issue 17, random bit flips, truncations, deleted files; the
  manifest itself), then `--resume`: it must fall back and end identical.
- concurrent: a second `train.py` (plain, `--resume`, `--overwrite`) into the
  folder of a run in progress (paused with SIGSTOP meanwhile, so the two surely
  overlap) must exit 2 naming the first one's PID, and the first run must end
  identical; a second run that is not refused counts as lost.
- disk_full: the run folder on a small tmpfs is filled while training runs;
  after space is freed, `--resume` must end identical (needs root for `mount`).
- signal: SIGINT, SIGTERM or SIGHUP at a random moment of a run (start-up, data,
  training, a save, the last evaluation, the final files): it must exit 130, 143 or 129
  (0 only if it had finished), never be killed by the signal, never trace back; then
  `--resume` must end identical.
- overwrite_kill: `--overwrite` of a finished run, killed -9 at a random moment; the next
  start must put the old run back whole or name where it is, and a run started again
  must end identical: the old run's adapter is never lost unless the new run trained.
- lookalike: `--overwrite` and `--resume` into a user's folder that holds a file named
  like a run's (`run_config.yaml`, `sweep.json`) but no marker: exit 2, every file kept.

Prints one JSON object (`--json`) or a short table: tried, survived, lost, per
kind, and what each loss was. At most `--jobs` (default 2) trials run at once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 12, 3
FAST = ["--model", "tiny", "--codec", "tiny", "--set", "samples.num_texts=0", "--set", "training.logging_steps=1",
        "--set", "training.learning_rate=5e-3", "--set", "training.eval_strategy=no",
        "--set", "training.report_to=none", "--set", "training.per_device_train_batch_size=1",
        "--set", "training.gradient_accumulation_steps=2", "--set", "training.use_early_stopping=false",
        "--set", f"training.max_steps={MAX_STEPS}", "--set", f"training.save_steps={SAVE_STEPS}"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
RUN_TIMEOUT_S = 600
MAX_RESUMES = 6


@dataclass
class Trial:
    kind: str
    survived: bool = False
    why: str = ""
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------ runs ---

class Runner:
    def __init__(self, work: Path, data: Path):
        self.work = work
        self.data = data
        self.reference: dict | None = None
        self.reference_seconds = 0.0
        self.locked_seconds = 0.0   # how long a run holds its folder (claim to exit)
        self._lock = threading.Lock()
        self._serial = 0

    def argv(self, out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), "--data", str(self.data), *FAST, "--output-dir", str(out), *extra]

    def log_path(self, out: Path) -> Path:
        # Never beside `out`: a full disk there must not take the run's own output down with it.
        with self._lock:
            self._serial += 1
            folder = self.work / "logs"
            folder.mkdir(exist_ok=True)
            return folder / f"{self._serial:04d}-{out.parent.name}-{out.name}.log"

    def start(self, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
        log = self.log_path(out)
        handle = log.open("w")
        proc = subprocess.Popen(self.argv(out, *extra), cwd=ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        return proc, log

    def run(self, out: Path, *extra: str, kill_after: float | None = None) -> tuple[int | None, str]:
        """Exit code (None: we killed it) and its output."""
        proc, log = self.start(out, *extra)
        killed = wait_or_kill(proc, kill_after)
        return (None if killed else proc.returncode), log.read_text(errors="replace")

    def resume_to_end(self, out: Path, trial: Trial, kill_first_after: float | None = None) -> bool:
        """`--resume` until a run exits 0 (a user who retries); False, with why, if it never does."""
        for attempt in range(MAX_RESUMES):
            extra = ["--resume"]
            code, text = self.run(out, *extra, kill_after=kill_first_after if attempt == 0 else None)
            trial.detail.setdefault("resumes", []).append(code)
            if "Traceback (most recent call last)" in text and code is not None:
                trial.detail.setdefault("tracebacks", []).append(last_lines(text))
            if code == 0:
                return True
            if code == 2 and "holds no run of this tool to resume" in text:
                # Killed before the run claimed the folder: nothing to resume, so start it (as a user would).
                code, text = self.run(out)
                trial.detail["restarted"] = True
                if code == 0:
                    return True
            if code not in (None, 0):
                trial.detail.setdefault("errors", []).append(last_lines(text))
        trial.why = f"no resume completed in {MAX_RESUMES} tries: {trial.detail.get('errors', ['?'])[-1]}"
        return False

    def compare(self, out: Path, trial: Trial) -> None:
        """Survived: the final adapter and every step's loss equal the reference's."""
        got = final_result(out)
        if isinstance(got, str):
            trial.survived, trial.why = False, got
            return
        want = self.reference
        if got["steps"] != want["steps"]:
            trial.survived, trial.why = False, f"stopped at step {got['steps']} of {want['steps']}"
        elif got["losses"] != want["losses"]:
            bad = [s for s in want["losses"] if got["losses"].get(s) != want["losses"][s]]
            trial.survived, trial.why = False, f"losses differ at steps {bad[:5]}"
        elif got["adapter"].keys() != want["adapter"].keys():
            trial.survived, trial.why = False, "adapter tensors differ in names"
        else:
            import torch

            diff = max((got["adapter"][k] - want["adapter"][k]).abs().max().item() for k in want["adapter"])
            trial.survived = all(torch.equal(got["adapter"][k], want["adapter"][k]) for k in want["adapter"])
            trial.why = "" if trial.survived else f"adapter differs by up to {diff:.3g}"


def wait_or_kill(proc: subprocess.Popen, kill_after: float | None) -> bool:
    """Wait for `proc`; with `kill_after`, kill -9 it then if still running. True if killed."""
    try:
        proc.wait(timeout=kill_after if kill_after is not None else RUN_TIMEOUT_S)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)   # only the process we started, by its PID
        proc.wait()
        return True


def wait_for(proc: subprocess.Popen, path: Path, timeout: float = RUN_TIMEOUT_S) -> float | None:
    """Poll until `path` exists (its time) or `proc` ends (None)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if path.exists():
            return time.time()
        time.sleep(0.01)
    return None


def final_result(out: Path) -> dict | str:
    import torch  # noqa: F401 - safetensors.torch needs it
    from safetensors.torch import load_file

    summary, adapter, state = out / "run_summary.json", out / "adapter_model.safetensors", out / f"checkpoint-{MAX_STEPS}"
    if not (summary.is_file() and adapter.is_file() and (state / "trainer_state.json").is_file()):
        return "no finished run (summary, adapter or last checkpoint missing)"
    history = json.loads((state / "trainer_state.json").read_text())["log_history"]
    return {"steps": json.loads(summary.read_text())["steps"], "adapter": load_file(str(adapter)),
            "losses": {h["step"]: h["loss"] for h in history if "loss" in h}}


def last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-400:]


# ---------------------------------------------------------------- kills ---

def trial_kill(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    trial = Trial(kind)
    out = runner.work / f"{kind}-{index}"
    span = runner.reference_seconds * 1.3
    if kind == "kill_in_save":
        step = rng.choice(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
        proc, _log = runner.start(out)
        trial.detail["in_save"] = kill_when_staging(proc, out / f".tmp-checkpoint-{step}", rng)
        trial.detail["target_step"] = step
    else:
        at = rng.uniform(0, span)
        if kind == "kill_during_resume":
            at = rng.uniform(0.3 * span, span)   # late enough that often a checkpoint exists
        proc, _log = runner.start(out)
        trial.detail["killed_at_s"] = round(at, 2)
        trial.detail["killed"] = wait_or_kill(proc, at)
    trial.detail["checkpoints_left"] = sorted(p.name for p in out.glob("checkpoint-*")) if out.is_dir() else []
    trial.detail["staging_left"] = sorted(p.name for p in out.glob(".tmp-*")) if out.is_dir() else []
    kill_resume = rng.uniform(0, span) if kind == "kill_during_resume" else None
    if runner.resume_to_end(out, trial, kill_first_after=kill_resume):
        runner.compare(out, trial)
    return trial


def kill_when_staging(proc: subprocess.Popen, staging: Path, rng: random.Random) -> bool:
    """kill -9 `proc` once `staging` appears (plus 0-30 ms, to land anywhere in the save).
    True if the staging folder was there at the kill."""
    deadline = time.time() + RUN_TIMEOUT_S
    while proc.poll() is None and time.time() < deadline:
        if staging.exists():
            time.sleep(rng.uniform(0, 0.03))
            there = staging.exists()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return there
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return False


# ----------------------------------------------------------- corruptions ---

def damage(kind: str, checkpoint: Path, rng: random.Random) -> str:
    """Apply one damage to `checkpoint`; returns what was done."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter = checkpoint / "adapter_model.safetensors"

    def edit_state(**changes):
        file = checkpoint / "trainer_state.json"
        state = json.loads(file.read_text())
        state.update(changes)
        file.write_text(json.dumps(state))

    def edit_adapter(change):
        save_file(change(load_file(str(adapter))), str(adapter), metadata={"format": "pt"})

    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    if kind == "rng_empty":
        torch.save({}, checkpoint / "rng_state.pth")
    elif kind == "optimizer_empty":
        torch.save({}, checkpoint / "optimizer.pt")
    elif kind == "optimizer_no_groups":
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        torch.save({**saved, "param_groups": []}, checkpoint / "optimizer.pt")
    elif kind == "scheduler_empty":
        torch.save({}, checkpoint / "scheduler.pt")
    elif kind == "state_extra_key":
        edit_state(bogus=1)
    elif kind == "state_string_step":
        edit_state(global_step=str(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]))
    elif kind == "state_step_99":
        edit_state(global_step=99)
    elif kind == "adapter_wrong_shape":
        edit_adapter(lambda t: {**t, sorted(t)[0]: torch.zeros(3, 5)})
    elif kind == "adapter_renamed_key":
        raw = bytearray(adapter.read_bytes())
        at = raw.find(b"lora_A")
        raw[at:at + 6] = b"lora_X"
        adapter.write_bytes(bytes(raw))
    elif kind == "adapter_deleted_tensor":
        edit_adapter(lambda t: {k: v for k, v in t.items() if k != sorted(t)[0]})
    elif kind == "adapter_empty":
        save_file({}, str(adapter))
    elif kind == "adapter_data_flip":
        raw = bytearray(adapter.read_bytes())
        (header,) = struct.unpack("<Q", raw[:8])
        at = rng.randrange(8 + header, len(raw))
        raw[at] ^= 1 << rng.randrange(8)
        adapter.write_bytes(bytes(raw))
        return f"{kind} at byte {at}"
    elif kind == "bit_flip":
        file = rng.choice(files)
        raw = bytearray(file.read_bytes())
        at = rng.randrange(len(raw))
        raw[at] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(raw))
        return f"{kind} in {file.name} at byte {at}"
    elif kind == "truncate":
        file = rng.choice(files)
        keep = rng.randrange(file.stat().st_size)
        with file.open("r+b") as f:
            f.truncate(keep)
        return f"{kind} {file.name} to {keep} bytes"
    elif kind == "delete_file":
        file = rng.choice(files)
        file.unlink()
        return f"{kind} {file.name}"
    elif kind == "all_checkpoints":
        for other in checkpoint.parent.glob("checkpoint-*"):
            torch.save({}, other / "rng_state.pth")
    else:
        raise ValueError(kind)
    return kind


CORRUPTIONS = ("rng_empty", "optimizer_empty", "optimizer_no_groups", "scheduler_empty", "state_extra_key",
               "state_string_step", "state_step_99", "adapter_wrong_shape", "adapter_renamed_key",
               "adapter_deleted_tensor", "adapter_empty", "adapter_data_flip", "bit_flip", "truncate", "delete_file",
               "all_checkpoints")


def stopped_after_step_9(runner: Runner, out: Path) -> None:
    """The reference run's folder as a kill right after checkpoint-9 leaves it."""
    shutil.copytree(runner.work / "reference", out, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(out / f"checkpoint-{MAX_STEPS}")
    for name in ("adapter_model.safetensors", "run_summary.json"):
        (out / name).unlink()


def trial_corruption(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    trial = Trial(kind)
    out = runner.work / f"corrupt-{index}"
    stopped_after_step_9(runner, out)
    trial.detail["damage"] = damage(kind, out / f"checkpoint-{MAX_STEPS - SAVE_STEPS}", rng)
    if runner.resume_to_end(out, trial):
        runner.compare(out, trial)
    return trial


# ------------------------------------------------------------ concurrent ---

def trial_concurrent(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    """A second `train.py` into the folder of a first one that holds it: the first is
    paused (SIGSTOP, which changes none of its results) at a random moment after it
    claimed the folder, the second runs to its end, then the first continues. The
    second must exit 2 naming the first's PID, and the first must end identical to the
    reference. (Without the pause a tiny run is over before a second one has started up.)"""
    trial = Trial(kind)
    out = runner.work / f"{kind}-{index}"
    flags = {"concurrent_plain": [], "concurrent_resume": ["--resume"], "concurrent_overwrite": ["--overwrite"]}[kind]
    first, first_log = runner.start(out)
    wait_for(first, out / ".lock")
    time.sleep(rng.uniform(0, 0.8 * runner.locked_seconds))
    paused = first.poll() is None
    if paused:
        first.send_signal(signal.SIGSTOP)
    # Alive is not enough: a run that finished has let go of the folder before its process exits.
    holding = paused and lock_held(out / ".lock")
    try:
        second, second_log = runner.start(out, *flags)
        wait_or_kill(second, None)
    finally:
        if paused:
            first.send_signal(signal.SIGCONT)
    wait_or_kill(first, None)
    texts = first_log.read_text(errors="replace"), second_log.read_text(errors="replace")
    refused = second.returncode == 2 and str(first.pid) in texts[1]
    trial.detail.update(first_exit=first.returncode, second_exit=second.returncode, overlapped=holding,
                        refused_with_pid=refused)
    for name, code, text in (("first", first.returncode, texts[0]), ("second", second.returncode, texts[1])):
        if code not in (0, None):
            trial.detail[f"{name}_output"] = last_lines(text, 1)
        if "Traceback (most recent call last)" in text:
            trial.detail.setdefault("tracebacks", []).append(last_lines(text))
    runner.compare(out, trial)
    if trial.survived and holding and not refused:
        trial.survived, trial.why = False, f"the second run was not refused with the first's PID: {last_lines(texts[1], 1)}"
    return trial


def lock_held(lock: Path) -> bool:
    """Whether some process holds `lock` (an exclusive flock, as the run folder's)."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)   # closing drops a shared lock we may have taken
    return False


# ------------------------------------------------------------- disk full ---

def can_mount_tmpfs(work: Path) -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    probe = work / "mount-probe"
    probe.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs ({' '.join(done.stderr.split())[:120] or done.returncode}): needs root"
    subprocess.run(["umount", str(probe)], check=False)
    return None


def trial_disk_full(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    """The run starts with room (it asks for 512 MiB), then the disk fills at a random moment
    of training; once space is freed, `--resume` must finish it identically."""
    trial = Trial(kind)
    mount = runner.work / f"tmpfs-{index}"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mount)], check=True)
    try:
        out = mount / "out"
        filler = mount / "filler"
        proc, log = runner.start(out)
        # Training is a few seconds of a tiny run: fill as it starts, or just after a save.
        after = rng.choice(["run_config.yaml", *(f"checkpoint-{k}" for k in range(SAVE_STEPS, MAX_STEPS, SAVE_STEPS))])
        wait_for(proc, out / after)
        time.sleep(rng.uniform(0, 0.3))
        leave = rng.choice([0, 4096, 64 * 1024, 256 * 1024])
        trial.detail["filled_after"] = after
        fill(filler, leave)
        trial.detail["left_bytes"] = leave
        wait_or_kill(proc, None)
        text = log.read_text(errors="replace")
        trial.detail["first_exit"] = proc.returncode
        if proc.returncode not in (0, 2):
            trial.detail["first_output"] = last_lines(text)
        if "Traceback (most recent call last)" in text:
            trial.detail.setdefault("tracebacks", []).append(last_lines(text))
        filler.unlink(missing_ok=True)   # space freed: the user resumes in place
        if proc.returncode == 0 or runner.resume_to_end(out, trial):
            runner.compare(out, trial)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    return trial


def fill(filler: Path, leave: int) -> None:
    """Take all free space under `filler`'s folder but `leave` bytes."""
    free = shutil.disk_usage(filler.parent).free
    size = max(0, free - leave)
    with filler.open("wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError:
            pass


# ----------------------------------------------------------------- driver ---

def make_data(work: Path) -> Path:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "examples" / "tiny" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


# ------------------------------------------------------ hostile moments ---

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def trial_signal(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    trial = Trial(kind)
    out = runner.work / f"{kind}-{index}"
    sig = rng.choice(list(EXIT_CODES))
    at = rng.uniform(0, runner.reference_seconds * 1.1)
    proc, log = runner.start(out)
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            trial.why = f"{sig.name} at {at:.1f} s: still running {RUN_TIMEOUT_S} s later"
            return trial
    text = log.read_text(errors="replace")
    trial.detail.update(signal=sig.name, at_s=round(at, 2), code=proc.returncode)
    if "Traceback (most recent call last)" in text:
        trial.detail.setdefault("tracebacks", []).append(last_lines(text))
        trial.why = f"{sig.name} at {at:.1f} s: a traceback"
        return trial
    if proc.returncode not in (0, EXIT_CODES[sig]):
        trial.why = f"{sig.name} at {at:.1f} s: exit {proc.returncode}, not {EXIT_CODES[sig]}"
        return trial
    if proc.returncode != 0 and not runner.resume_to_end(out, trial):
        return trial
    runner.compare(out, trial)
    return trial


def trial_overwrite_kill(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    from safetensors.torch import load_file

    trial = Trial(kind)
    out = runner.work / f"{kind}-{index}"
    shutil.copytree(runner.work / "reference", out, ignore=shutil.ignore_patterns(".lock"))
    old = load_file(str(out / "adapter_model.safetensors"))
    at = rng.uniform(0, runner.reference_seconds * 0.6)
    proc, _log = runner.start(out, "--overwrite")
    trial.detail["killed_at_s"] = round(at, 2)
    trial.detail["killed"] = wait_or_kill(proc, at)
    aside = sorted(p.name for p in out.parent.glob(f".replaced-{out.name}-*"))
    trial.detail["aside_after_kill"] = aside
    # The next start (a dry look at the data) puts the old run back or names it.
    code, text = runner.run(out, "--check-data")
    still_aside = sorted(out.parent.glob(f".replaced-{out.name}-*"))
    trained = (out / "run_config.yaml").is_file() and any(out.glob("checkpoint-*"))
    if still_aside and not any(str(p) in " ".join(text.split()) for p in still_aside):
        trial.why = f"an old run stays in {still_aside[0].name} and the next start did not name it"
        return trial
    if not trained and not still_aside:
        adapter = out / "adapter_model.safetensors"
        back = adapter.is_file() and load_file(str(adapter)).keys() == old.keys()
        if not back:
            trial.why = "the new run never trained and the old run is not back"
            return trial
        trial.detail["put_back"] = True
        trial.survived = True
        return trial
    if runner.resume_to_end(out, trial):
        runner.compare(out, trial)
    for path in still_aside:
        shutil.rmtree(path, ignore_errors=True)
    return trial


def trial_lookalike(runner: Runner, index: int, kind: str, rng: random.Random) -> Trial:
    trial = Trial(kind)
    out = runner.work / f"{kind}-{index}"
    out.mkdir(parents=True)
    (out / rng.choice(["run_config.yaml", "sweep.json"])).write_text("mine\n")
    (out / "thesis.txt").write_text("years of work")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in (["--overwrite"], ["--resume"], []):
        code, text = runner.run(out, *extra)
        if code != 2 or "Traceback" in text:
            trial.why = f"`{' '.join(extra) or 'plain'}` into a lookalike folder exited {code}"
            return trial
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    trial.survived = after == before
    trial.why = "" if trial.survived else "the user's files changed"
    return trial


def plan_trials(args, rng: random.Random) -> list[tuple]:
    kills = ["kill_random", "kill_in_save", "kill_during_resume"]
    trials = [(trial_kill, i, kills[i % len(kills)]) for i in range(args.kills)]
    corruptions = list(CORRUPTIONS)
    trials += [(trial_corruption, i, corruptions[i % len(corruptions)]) for i in range(args.corruptions)]
    concurrent = ["concurrent_plain", "concurrent_resume", "concurrent_overwrite"]
    trials += [(trial_concurrent, i, concurrent[i % len(concurrent)]) for i in range(args.concurrent)]
    trials += [(trial_disk_full, i, "disk_full") for i in range(args.disk_full)]
    trials += [(trial_signal, i, "signal") for i in range(args.signals)]
    trials += [(trial_overwrite_kill, i, "overwrite_kill") for i in range(args.overwrite_kills)]
    trials += [(trial_lookalike, i, "lookalike") for i in range(args.lookalikes)]
    rng.shuffle(trials)
    return [t for t in trials if not args.only or any(word in t[2] for word in args.only)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100, help="kill -9 trials (default 100)")
    p.add_argument("--corruptions", type=int, default=50, help="damaged-checkpoint trials (default 50)")
    p.add_argument("--concurrent", type=int, default=9, help="second-run-into-the-same-folder trials (default 9)")
    p.add_argument("--disk-full", type=int, default=6, help="full-disk trials on a tmpfs, root only (default 6)")
    p.add_argument("--signals", type=int, default=20, help="a stop signal at a random moment (default 20)")
    p.add_argument("--overwrite-kills", type=int, default=10,
                   help="--overwrite killed -9 at a random moment (default 10)")
    p.add_argument("--lookalikes", type=int, default=4, help="a user's folder that looks like a run (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--work", metavar="DIR", help="keep every run here (default: a temporary folder, removed)")
    p.add_argument("--only", action="append", metavar="WORD", help="only the trial kinds containing WORD (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    runner = Runner(work, make_data(work))
    started = time.time()
    proc, log = runner.start(work / "reference")
    locked = wait_for(proc, work / "reference" / ".lock")
    proc.wait()
    code, text = proc.returncode, log.read_text(errors="replace")
    runner.reference_seconds = time.time() - started
    runner.locked_seconds = time.time() - (locked or started)
    if code != 0:
        print(f"error: the reference run failed: {last_lines(text)}", file=sys.stderr)
        return 2
    runner.reference = final_result(work / "reference")
    skipped = {}
    if args.disk_full:
        why = can_mount_tmpfs(work)
        if why:
            skipped["disk_full"] = why
            args.disk_full = 0
    trials = plan_trials(args, rng)
    seeds = [rng.randrange(2**32) for _ in trials]
    results: list[Trial] = []
    done = threading.Lock()

    def one(job):
        (fn, index, kind), seed = job
        try:
            trial = fn(runner, index, kind, random.Random(seed))
        except Exception as exc:  # noqa: BLE001 - a bench failure is a finding, not a crash
            trial = Trial(kind, False, f"bench error: {type(exc).__name__}: {exc}")
        with done:
            results.append(trial)
            if not args.json:
                mark = "ok  " if trial.survived else "LOST"
                print(f"[{len(results)}/{len(trials)}] {mark} {kind} {trial.why}", flush=True)
        return trial

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, zip(trials, seeds)))

    report = summarize(results, args, runner, time.time() - started, skipped)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def summarize(results: list[Trial], args, runner: Runner, seconds: float, skipped: dict) -> dict:
    kinds: dict[str, dict] = {}
    for t in results:
        k = kinds.setdefault(t.kind, {"tried": 0, "survived": 0, "lost": 0})
        k["tried"] += 1
        k["survived" if t.survived else "lost"] += 1
    in_save = [t for t in results if t.kind == "kill_in_save"]
    concurrent = [t for t in results if t.kind.startswith("concurrent")]
    tracebacks = [tb for t in results for tb in t.detail.get("tracebacks", [])]
    return {
        "command": "python bench/chaos.py " + " ".join(sys.argv[1:]),
        "seed": args.seed, "seconds": round(seconds, 1), "reference_seconds": round(runner.reference_seconds, 1),
        "tried": len(results), "survived": sum(t.survived for t in results),
        "lost": sum(not t.survived for t in results),
        "kinds": dict(sorted(kinds.items())),
        "kills_landing_inside_a_save": sum(bool(t.detail.get("in_save")) for t in in_save),
        "resumes_needed": sum(len(t.detail.get("resumes", [])) for t in results),
        "restarted_before_claim": sum(bool(t.detail.get("restarted")) for t in results),
        "reference_locked_seconds": round(runner.locked_seconds, 1),
        "disk_full_first_exits": sorted(t.detail.get("first_exit") for t in results if t.kind == "disk_full"),
        "concurrent_overlapping": sum(bool(t.detail.get("overlapped")) for t in concurrent),
        "concurrent_refused_with_pid": sum(bool(t.detail.get("refused_with_pid")) for t in concurrent),
        "tracebacks": tracebacks[:10],
        "traceback_count": len(tracebacks),
        "signal_exit_codes": sorted({(t.detail.get("signal"), t.detail.get("code")) for t in results
                                     if t.kind == "signal" and t.detail.get("signal")}),
        "overwrite_kills_put_back": sum(bool(t.detail.get("put_back")) for t in results),
        "skipped": skipped,
        "losses": [{"kind": t.kind, "why": t.why, **t.detail} for t in results if not t.survived],
    }


if __name__ == "__main__":
    sys.exit(main())
