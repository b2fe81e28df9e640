"""The one way a file the user names is read: a regular file only, never blocking, never more
than a cap.

A FIFO given as `--config` would block a plain `open()` forever; `/dev/zero` would fill memory;
a 300 MB one-line text file would become a 300 MB string before anything could refuse it.
`open_regular` opens without blocking (O_NONBLOCK) and refuses anything but a regular file,
naming what it is; `read_user_file` then reads at most `limit_bytes` (one byte more tells a
file over the cap, which is refused by its size before it is parsed).

No torch, no numpy: the config layer (`probe.py`'s path) reads its YAML through here.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO

from autotune.errors import AutotuneError

# Far above any real file of its kind, far below what would hurt a machine.
CONFIG_LIMIT_BYTES = 4_000_000        # a YAML config, a plan (autotune.json), a run's JSON records
TEXT_FILE_LIMIT_BYTES = 16_000_000    # `synthesize.py --text-file`


def special_file_kind(mode: int) -> str | None:
    """What a non-regular file is, for messages; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], what: str = "data") -> IO[bytes]:
    """Open a file for reading, refusing anything but a regular file. O_NONBLOCK makes
    opening a FIFO return at once (a plain open waits for a writer forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise AutotuneError(f"{what} file `{path}` does not exist: check the path") from None
    except ValueError:   # a NUL byte in the name
        raise AutotuneError(f"{what} file name {ascii(str(path))[:120]} holds a NUL character: check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AutotuneError(f"{what} file `{path}` is a symlink loop: point it at a real file") from None
        if exc.errno == errno.EISDIR:
            raise AutotuneError(f"{what} file `{path}` is a folder, not a regular file: pass the file itself") from None
        raise AutotuneError(f"cannot read {what} file `{path}` ({exc.strerror or exc}): check the path and "
                            "its permissions") from None
    kind = special_file_kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise AutotuneError(f"{what} file `{path}` is {kind}, not a regular file: pass the file itself")
    return os.fdopen(fd, "rb")


def read_user_file(path: str | os.PathLike[str], *, what: str, limit_bytes: int) -> bytes:
    """The bytes of a regular file of at most `limit_bytes`; anything else is one line."""
    with open_regular(path, what) as handle:
        try:
            data = handle.read(limit_bytes + 1)
        except OSError as exc:
            raise AutotuneError(f"cannot read {what} file `{path}` ({exc.strerror or exc}): check the file") from None
    if len(data) > limit_bytes:
        raise AutotuneError(f"{what} file `{path}` is larger than {limit_bytes / 1e6:g} MB, far more than such a file "
                            "holds: check that it is the right file")
    return data


def read_user_text(path: str | os.PathLike[str], *, what: str, limit_bytes: int) -> str:
    """`read_user_file` decoded as UTF-8 (a byte-order mark dropped); other bytes are one line."""
    data = read_user_file(path, what=what, limit_bytes=limit_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AutotuneError(f"{what} file `{path}` is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def read_user_json(path: str | os.PathLike[str], *, what: str, limit_bytes: int = CONFIG_LIMIT_BYTES):
    """A JSON file the user named (a plan, a run's record), bounded like every other."""
    import json

    text = read_user_text(path, what=what, limit_bytes=limit_bytes)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AutotuneError(f"{what} file `{path}` is not valid JSON ({' '.join(str(exc).split())[:120]})") from None


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether `path` is `folder` or lies under it, by resolved paths (links followed)."""
    base = os.path.realpath(folder)
    real = os.path.realpath(path)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a folder could not be made or written at `path`, or None, without creating anything:
    an existing non-folder on the way (a file named like it), or no write access to the nearest
    existing parent (`/proc/...`, a read-only mount)."""
    current = os.path.abspath(path)
    while True:
        if os.path.lexists(current):
            if not os.path.isdir(current):
                return f"`{current}` is not a folder"
            if not os.access(current, os.W_OK | os.X_OK):
                return f"`{current}` is not writable"
            return None
        parent = os.path.dirname(current)
        if parent == current:
            return f"`{path}` has no existing parent folder"
        current = parent
