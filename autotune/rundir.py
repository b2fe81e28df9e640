"""The run folder: its file names, its marker and lock, and writes that never leave half a file.

A folder is ours once it holds `MARKER` (written when a run claims it). It is "a run"
once training has started (`RUN_CONFIG` exists). `--overwrite` replaces only a folder
that is ours, or an empty one: the old run is moved aside and deleted once the new
run has started training, and put back if the new one fails before that.

One process per run folder: `claim` takes an exclusive `fcntl` lock on `LOCK` inside
it and writes its PID there; a second run, `--resume` or sweep trial finds the lock
held and stops with that PID. The kernel drops the lock when the holder dies, so a
stale lock never blocks.

No torch import here: the command lines and the sweep use this module.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from autotune.errors import AutotuneError

# The names of what a run folder holds: every module that reads or writes one imports it from here.
MARKER = ".llasa-autotune"            # this folder belongs to llasa-autotune
LOCK = ".lock"                        # held (fcntl) by the process using the folder
RUN_CONFIG = "run_config.yaml"        # the config training started with: the folder is "a run"
RUN_REQUEST = "run_request.json"      # what the command line gave besides the config (the data path)
RESOLVED_CONFIG = "resolved_config.yaml"
RUN_SUMMARY = "run_summary.json"
AUTOTUNE_RECORD = "autotune.json"     # the dry run's attempts and plan
SPLIT_RECORD = "split.json"
REPORT = "report.html"
SAMPLES_DIR = "samples"
MERGED_DIR = "merged"
FAILED_RECORD = "failed.json"         # a sweep trial that failed
SWEEP_RECORD = "sweep.json"           # a sweep's trials and ranking: the folder is a sweep
REPLACED_PREFIX = ".replaced-"        # an old run moved aside by --overwrite
CHECKPOINT_PREFIX = "checkpoint-"     # checkpoint-N: the state after optimizer step N

CHECKPOINT_HEADROOM_BYTES = 512 * 1024 ** 2


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """N of a `checkpoint-N` folder; None for any other name."""
    name = Path(path).name
    suffix = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def samples_dir(output_dir: Path, step: int) -> Path:
    return output_dir / SAMPLES_DIR / f"step-{step}"


# ------------------------------------------------------------ atomic writes ---

def path_text(value: str | os.PathLike[str]) -> str:
    """A path as printable, encodable text: bytes that are not UTF-8 (which Python holds
    as surrogate escapes) become `\\xff` escapes, never a UnicodeEncodeError."""
    text = os.fspath(value)
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def json_safe(value: Any) -> Any:
    """`value` with every string made encodable (see `path_text`)."""
    if isinstance(value, str):
        return path_text(value) if not value.isascii() else value
    if isinstance(value, Path):
        return path_text(value)
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_bytes(path: Path, data: bytes) -> None:
    """Atomic: the old file or the whole new one, never half. A full or read-only disk
    is one line (`AutotuneError`), with nothing left behind."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8", "backslashreplace"))


def write_json(path: Path, payload: Any, *, allow_nan: bool = True) -> None:
    write_text(path, json.dumps(json_safe(payload), indent=2, ensure_ascii=False, default=str, allow_nan=allow_nan))


def _file_mode() -> int:
    """The mode `open()` would give a new file under this process's umask (mkstemp's
    temporary files are 0600, which would leave the run's files unreadable to others)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` for a writer that wants a file name (soundfile,
    safetensors); it becomes `path` when the block ends without error."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and is_storage_error(exc):
            raise storage_error(exc, path) from None
        raise


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_storage_error(exc: BaseException) -> bool:
    """The disk is full, over quota or read-only (by errno, or in words for writers
    such as safetensors and torch's zip writer that lose the errno)."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "Read-only file system",
                                   "StorageFull"))


# `atomic_path`'s temporary name: `.` + the file's name + mkstemp's 8 random characters + `.tmp`.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def clear_temporaries(folder: Path) -> list[Path]:
    """Temporary files a write left when the storage failed under it (a read-only remount can keep
    even the clean-up from deleting them): gone when the folder is next claimed. Checkpoints are
    not walked (their own staging is `checkpoints.clean_staging`'s)."""
    removed = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(("checkpoint-", ".tmp-checkpoint-", REPLACED_PREFIX))]
        for name in files:
            if _TEMPORARY.match(name):
                try:
                    os.unlink(os.path.join(here, name))
                    removed.append(Path(here) / name)
                except OSError:
                    pass
    return removed


def write_failure(exc: BaseException | None) -> str | None:
    """What made a write fail, in words, when it is the storage's doing (full, over quota,
    read-only, not writable) anywhere in the exception's chain; None for any other error."""
    seen = 0
    while exc is not None and seen < 6:
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied: the folder is not writable"
        if is_storage_error(exc):
            return "the file system is read-only" if ("Read-only" in str(exc) or isinstance(exc, OSError)
                                                      and exc.errno == errno.EROFS) else "the disk is full"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def storage_error(exc: BaseException, path: Path) -> AutotuneError:
    if isinstance(exc, OSError) and exc.errno == errno.EROFS or "Read-only" in str(exc):
        what = "the file system is read-only"
    elif isinstance(exc, OSError) and exc.errno not in STORAGE_ERRNOS and not is_storage_error(exc):
        what = exc.strerror or str(exc)
    else:
        what = "the disk is full"
    return AutotuneError(f"cannot write `{path_text(path)}`: {what}; nothing half-written was left; free space "
                         "(or choose a writable `--output-dir`) and run again (`--resume` continues from the "
                         "newest checkpoint)")


# ------------------------------------------------------------- the folder ---

RUN, SWEEP = "run", "sweep"           # the two kinds of folder this tool writes


def mark_ours(folder: Path, kind: str = RUN) -> None:
    """Make `folder` ours, of `kind`, before anything else is written there (a sweep's
    dry-run folder, a trial's console.log)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        write_json(folder / MARKER, {"tool": "llasa-autotune", "kind": kind,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def is_ours(folder: Path) -> bool:
    """Only the marker makes a folder ours: a file that merely has a run's name
    (`run_config.yaml`, `sweep.json`) in someone else's folder does not."""
    try:
        return (folder / MARKER).is_file()
    except OSError:
        return False


def _marker(folder: Path) -> dict[str, Any] | None:
    from autotune.files import read_user_json

    try:
        record = read_user_json(folder / MARKER, what="marker", limit_bytes=64 * 1024)
    except AutotuneError:
        return None
    return record if isinstance(record, dict) else None


def has_trained(folder: Path) -> bool:
    """A run here took its first training step (its marker says so)."""
    return "trained_from" in (_marker(folder) or {})


def kind_of(folder: Path) -> str:
    """"run" or "sweep", as the marker records it (a marker without a kind, from an earlier
    version, is a sweep when the folder holds sweep.json)."""
    kind = (_marker(folder) or {}).get("kind")
    if kind in (RUN, SWEEP):
        return kind
    return SWEEP if (folder / SWEEP_RECORD).is_file() else RUN


def has_started(folder: Path) -> bool:
    """Training started here: there is something to resume (a run's run_config.yaml, a sweep's sweep.json)."""
    return (folder / RUN_CONFIG).is_file() or (folder / SWEEP_RECORD).is_file()


def finished_run(folder: Path) -> dict[str, Any] | None:
    """The summary of the run in `folder` when it ended (its run_summary.json, written at the end,
    says it was not stopped on a signal), else None."""
    from autotune.files import read_user_json

    if not (folder / RUN_SUMMARY).is_file():
        return None
    try:
        summary = read_user_json(folder / RUN_SUMMARY, what="run summary")
    except AutotuneError:
        return None
    if not isinstance(summary, dict) or summary.get("interrupted"):
        return None
    return summary


def listing(folder: Path) -> list[Path]:
    """What is in `folder`, our own bookkeeping files left out."""
    return [p for p in folder.iterdir() if p.name not in (MARKER, LOCK)]


def _open_lock(folder: Path, flags: int) -> int:
    """The lock file's descriptor, never through a link: a `.lock` that is a symlink would
    have its target truncated and overwritten with our PID."""
    try:
        return os.open(folder / LOCK, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AutotuneError(f"`{path_text(folder / LOCK)}` is a symbolic link, not this tool's lock file: remove "
                                "it (nothing of yours is in it) or choose another `--output-dir`") from None
        raise


def holder_of(folder: Path) -> int | None:
    """The PID holding `folder`'s lock, or None when it is free (or not ours)."""
    if not (folder / LOCK).is_file() or (folder / LOCK).is_symlink():
        return None
    import fcntl

    try:
        fd = _open_lock(folder, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, AutotuneError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0) or -1
            except (OSError, ValueError):
                return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def busy_error(folder: Path, pid: int) -> AutotuneError:
    who = f"process {pid}" if pid > 0 else "another process"
    return AutotuneError(f"`{path_text(folder)}` is in use by {who} (a run, `--resume` or sweep trial writing there): "
                         "wait for it to finish or stop it, or choose another `--output-dir`")


def _what(kind: str) -> str:
    return "a sweep" if kind == SWEEP else "a single run"


def nested_problem(output: Path, inputs: dict[str, Path]) -> str | None:
    """Why the output folder and an input may not be where they are, or None: the run writes
    only into its own folder and reads the user's files only, so neither may hold the other.
    `inputs` maps a flag (`--data`) to its path; a file's folder is what counts for data."""
    from autotune.files import is_within

    out = output.resolve() if output.exists() else Path(os.path.abspath(output))
    for flag, path in inputs.items():
        try:
            folder = path if path.is_dir() else path.parent
        except OSError:
            continue
        if is_within(path, out):
            return (f"`{flag} {path_text(path)}` is inside `--output-dir {path_text(output)}`, which the run writes "
                    "(and `--overwrite` replaces): keep your files outside the run's folder, e.g. move them and "
                    "pass the new path")
        if flag in ("--data", "--val") and is_within(out, folder):
            return (f"`--output-dir {path_text(output)}` is inside the data folder `{path_text(folder)}`: a run "
                    "writes checkpoints, samples and WAVs there, and the next run would read them as data; "
                    "choose an `--output-dir` outside it")
    return None


def left_aside(folder: Path) -> list[Path]:
    """Old runs an `--overwrite` moved aside (`.replaced-<name>-<pid>-<time>`) whose process is gone:
    a kill between the move and the new run's first step left them there."""
    target = folder.resolve() if folder.exists() else Path(os.path.abspath(folder))
    found = []
    try:
        candidates = sorted(target.parent.glob(f"{REPLACED_PREFIX}{target.name}-*"))
    except OSError:
        return []
    for path in candidates:
        pid = path.name.removeprefix(f"{REPLACED_PREFIX}{target.name}-").split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue   # its --overwrite is still running
        if path.is_dir() and not path.is_symlink():
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RunFolder:
    """The output folder of one run or sweep (`kind`), held by this process from `claim` until it exits."""

    def __init__(self, path: Path, kind: str = RUN):
        self.path = Path(path)
        self.kind = kind
        self._lock_fd: int | None = None
        self.replaced: Path | None = None    # the old run moved aside by --overwrite
        self.put_back: list[str] = []        # what `recover_left_aside` did, for the console

    # -- deciding, without changing anything --------------------------------

    def check(self, *, resume: bool | str, overwrite: bool, dry_run: bool = False) -> str:
        """What using the folder would do: "new", "reuse" (ours, nothing trained yet),
        "resume" or "replace". Raises the one-line error when it may not be used.
        `resume` is True for `--resume` and "checkpoint" for `--resume CHECKPOINT`."""
        out = self.path
        try:
            if out.is_symlink() and not out.exists():
                raise AutotuneError(f"`--output-dir {path_text(out)}` is a broken symbolic link: fix it or pass a folder")
            if out.exists() and not out.is_dir():
                raise AutotuneError(f"`--output-dir {path_text(out)}` is a file: pass a folder")
            entries = listing(out) if out.is_dir() else []
        except OSError as exc:   # a name too long, a folder we may not list
            raise AutotuneError(f"cannot use `--output-dir {path_text(out)}` ({exc.strerror or exc}): "
                                "choose another folder") from None
        if out.is_dir():
            pid = holder_of(out)
            if pid is not None and pid != os.getpid():
                raise busy_error(out, pid)
            if (out / LOCK).is_symlink():
                raise AutotuneError(f"`{path_text(out / LOCK)}` is a symbolic link, not this tool's lock file: "
                                    "remove it (nothing of yours is in it) or choose another `--output-dir`")
        ours = is_ours(out)
        kind = kind_of(out) if ours else None
        if resume == "checkpoint":
            # `--resume CHECKPOINT` may start a new folder from another run's checkpoint.
            resume = ours and kind == self.kind and has_started(out)
            if not resume and entries and not ours:
                raise AutotuneError(f"`{path_text(out)}` already holds files that are not a run of this tool: "
                                    "choose an empty or new `--output-dir`")
            if not resume and ours and kind != self.kind:
                raise AutotuneError(f"`{path_text(out)}` holds {_what(kind)}, not {_what(self.kind)}: choose "
                                    "another `--output-dir`")
            if not resume:
                return "reuse" if entries else "new"
        if resume:
            if not ours:
                raise AutotuneError(f"`--resume`: `{path_text(out)}` holds no run of this tool to resume; pass the "
                                    "run's `--output-dir` or a checkpoint path")
            if kind != self.kind:
                how = ("continue it with its `--sweep` flags and `--resume`" if kind == SWEEP else
                       "continue it without `--sweep`")
                raise AutotuneError(f"`--resume`: `{path_text(out)}` holds {_what(kind)}, not {_what(self.kind)}: "
                                    f"{how}, or choose another `--output-dir`")
            return "resume"
        if not entries:
            return "new"
        if ours and not has_started(out) and kind == self.kind:
            return "reuse"      # a start that failed or was stopped before training: nothing to lose
        if dry_run and ours and kind == self.kind == RUN:
            return "reuse"      # a dry run only rewrites autotune.json
        if not ours:
            raise AutotuneError(f"`{'--overwrite` refuses to replace `' if overwrite else ''}{path_text(out)}` "
                                f"{'' if overwrite else 'already '}holds files that are not a run of this tool "
                                "(no .llasa-autotune marker): choose an empty or new `--output-dir`")
        if not overwrite:
            raise AutotuneError(f"`{path_text(out)}` already holds {_what(kind)}: add `--resume` to continue it, "
                                "`--overwrite` to replace it, or choose another `--output-dir`")
        return "replace"

    # -- taking it -------------------------------------------------------------

    def claim(self, action: str) -> None:
        """Create (or move the old run aside and create) the folder, lock it and mark it ours."""
        out = self.path
        if action == "replace":
            self._lock(out)            # no live run may be moved
            target = out.resolve()     # a symlinked --output-dir: replace what it points to
            aside = target.with_name(f"{REPLACED_PREFIX}{target.name}-{os.getpid()}-{int(time.time())}")
            try:
                os.rename(target, aside)
            except OSError as exc:
                raise AutotuneError(f"cannot move the old run `{path_text(out)}` aside ({exc.strerror or exc}): "
                                    "choose another `--output-dir`") from None
            self._unlock()
            self.replaced = aside
            target.mkdir()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock(out)
            mark_ours(out, self.kind)
        except OSError as exc:
            self.restore()
            raise AutotuneError(f"cannot write to `{path_text(out)}` ({exc.strerror or exc}): "
                                "choose a writable `--output-dir`") from None
        except AutotuneError:
            self.restore()
            raise
        free = shutil.disk_usage(out).free
        if free < CHECKPOINT_HEADROOM_BYTES:
            self.restore()
            raise AutotuneError(f"only {free / 2**20:.0f} MiB free under `{path_text(out)}`: a checkpoint needs at "
                                f"least {CHECKPOINT_HEADROOM_BYTES / 2**20:.0f} MiB; free space or choose another "
                                "`--output-dir`")
        if action == "reuse":
            self.clear_unstarted()
        else:
            clear_temporaries(out)

    def recover_left_aside(self) -> list[str]:
        """Old runs a killed `--overwrite` left in `.replaced-*` beside the folder: put back when the
        folder holds no started run (nothing is lost by that), else named with how to restore them.
        Returns one line per old run, for the console."""
        lines = []
        for aside in left_aside(self.path):
            target = self.path.resolve() if self.path.exists() else self.path
            if target.exists():
                # The new run it made way for never trained (only the marker and what preparation
                # wrote), or the folder is empty: putting the old run back loses nothing.
                unstarted = is_ours(target) and not has_trained(target) and holder_of(target) in (None, os.getpid())
                free = unstarted or (not is_ours(target) and not listing(target))
            else:
                free = True
            if free:
                try:
                    if target.exists():
                        shutil.rmtree(target)
                    os.rename(aside, target)
                    lines.append(f"put back `{path_text(target)}`: an earlier `--overwrite` had moved it aside to "
                                 f"`{path_text(aside.name)}` and was stopped before its new run trained")
                    continue
                except OSError:
                    pass
            lines.append(f"`{path_text(aside)}` holds an older run that an interrupted `--overwrite` moved aside; "
                         f"keep it with `mv {shlex.quote(str(aside))} <new name>`, or delete it with "
                         f"`rm -r {shlex.quote(str(aside))}`")
        return lines

    def clear_unstarted(self) -> None:
        """A folder whose start failed holds only what the preparation wrote: start clean."""
        for entry in listing(self.path):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def training_started(self) -> None:
        """The new run trains: the run it replaced can go now, and the marker says it trained (what a
        sweep that replaced another waits for before letting the old one go)."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None
        record = _marker(self.path)
        if record is not None and "trained_from" not in record:
            write_json(self.path / MARKER, {**record, "trained_from": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def restore(self) -> None:
        """The new run failed before training: put the old run back where it was."""
        if self.replaced is None:
            return
        target = self.path.resolve() if self.path.exists() else self.path
        try:
            if target.exists():
                shutil.rmtree(target)
            os.rename(self.replaced, target)
            self.replaced = None
        except OSError:
            pass   # it stays in `.replaced-*`: the next start in this folder puts it back or names it

    def release(self) -> None:
        self._unlock()

    def _lock(self, folder: Path) -> None:
        import fcntl

        fd = _open_lock(folder, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or 0) or -1
            except (OSError, ValueError):
                pid = -1
            os.close(fd)
            raise busy_error(folder, pid) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AutotuneError(f"`{path_text(folder / LOCK)}` is not a regular file: remove it or choose another "
                                "`--output-dir`")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._unlock()
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # closing drops the flock
            self._lock_fd = None
