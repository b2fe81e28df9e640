"""Checkpoints in the run folder: written whole, found, and room for them.

A save goes into `.tmp-checkpoint-N`, its manifest last (`checkpoint_checks.write_manifest`),
and is renamed into place once complete (`publish_checkpoint`), after its bytes reached the
disk: a kill or power cut leaves the old state or the whole new checkpoint, never half of
one. `scan_checkpoints` finds the newest checkpoint that verifies; `clean_staging` removes
what a kill cut short. A full disk during a save is one line (`disk_full_message`).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from autotune import checkpoint_checks as C
from autotune.rundir import CHECKPOINT_PREFIX




STAGING_PREFIX = ".tmp-"     # `.tmp-checkpoint-N`: a save in progress, never resumed from


REPLACED_PREFIX = ".old-"    # `.old-checkpoint-N`: a same-step checkpoint being replaced


def staging_dir(final: Path) -> Path:
    return final.with_name(STAGING_PREFIX + final.name)


def publish_checkpoint(staging: Path, final: Path) -> None:
    """Make a fully written `staging` folder the checkpoint `final` in one rename,
    after its bytes reached the disk: a kill or power cut leaves either the old
    state or the whole new checkpoint, never half of one."""
    _fsync_tree(staging)
    replaced = None
    if final.exists():
        replaced = final.with_name(REPLACED_PREFIX + final.name)
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


def clean_staging(output_dir: Path) -> list[Path]:
    """Remove the leftovers of saves a kill interrupted; returns what was removed."""
    removed = []
    for prefix in (STAGING_PREFIX, REPLACED_PREFIX):
        for path in sorted(output_dir.glob(prefix + CHECKPOINT_PREFIX + "*")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def checkpoint_problem(path: Path) -> str | None:
    """Why `--resume` cannot continue from `path`, or None when it verifies: its
    manifest (sizes, hashes) and the structure of its states, before any model
    exists (`checkpoints.verify_checkpoint`; the trainer adds the model's shapes)."""
    return C.verify_checkpoint(path)


def scan_checkpoints(output_dir: Path, expected: C.Expected | None = None,
                     below_step: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest `checkpoint-N` that verifies, and the newer ones skipped with why."""
    return C.newest_verified_checkpoint(output_dir, expected, below_step)


def is_disk_full(exc: BaseException | None, free_bytes: int | None) -> bool:
    """ENOSPC/EDQUOT by errno, on the error or what it was raised from; torch's zip writer
    and safetensors only say it in words ("file write failed", "basic_ios::clear: iostream
    error" chained to "unexpected pos"), which count with almost nothing left free."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        low = free_bytes is not None and free_bytes < 64 * 2**20
        if low and any(words in text for words in ("file write failed", "iostream error", "unexpected pos")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_message(what: str, output_dir: Path, free: int | None, previous: Path | None) -> str:
    room = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
    kept = (f"the previous checkpoint `{previous.name}` is intact; free space, then resume with `--resume`"
            if previous is not None else "no earlier checkpoint was saved; free space and start again")
    return f"disk full while saving {what} under `{output_dir}` ({room}): {kept}"


def checkpoint_bytes(trainable_numel: int, param_bytes: int, optim: str) -> int:
    """About what one checkpoint takes: the adapter, the optimizer's two moments, a little more."""
    moment_bytes = 1 if "8bit" in optim else 0 if optim == "sgd" else 4
    return trainable_numel * (param_bytes + 2 * moment_bytes) + 2**20


def require_room_for_checkpoints(output_dir: Path, model: torch.nn.Module, optim: str) -> None:
    """Once the adapter exists its checkpoint size is known: fail now rather than at the first save."""
    from autotune.errors import AutotuneError

    trainable = [p for p in model.parameters() if p.requires_grad]
    size = checkpoint_bytes(sum(p.numel() for p in trainable), trainable[0].element_size() if trainable else 4, optim)
    problem = room_problem(free_bytes(output_dir), size, output_dir)
    if problem:
        raise AutotuneError(problem)


def room_problem(free: int | None, one_checkpoint_bytes: int, output_dir: Path) -> str | None:
    """A save writes the new checkpoint before the oldest is rotated away: room for two, to be safe."""
    needed = 2 * one_checkpoint_bytes
    if free is None or free >= needed:
        return None
    return (f"only {free / 2**20:.0f} MiB free under `{output_dir}`: each checkpoint takes about "
            f"{one_checkpoint_bytes / 2**20:.0f} MiB (adapter and optimizer state) and a save needs room for "
            f"{needed / 2**20:.0f} MiB; free space or choose another `--output-dir`")


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (see `checkpoint_checks`)."""
    return scan_checkpoints(output_dir)[0]
