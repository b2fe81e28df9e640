"""Reading transcript files safely: one sample, its checks, and bounded reads.

A file is read a line at a time; a line, a `text` or a code list over its limit is one
error by position and never parsed whole. Audio and transcripts alike must stay inside
the data folder (by resolved path, so a symlink that leads out counts as outside) unless
`allow_outside_paths`, and only regular files are opened: a folder, FIFO, device or
symlink loop is named as what it is. Problems are collected (`Errors`), a file in
another encoding among them, and raised together, one per line.
"""

from __future__ import annotations

import codecs
import errno
import json
import math
import os
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from autotune.errors import AutotuneError
from autotune.files import open_regular, special_file_kind
from autotune.llasa import CODES_PER_SECOND, MAX_CODE


# Limits far above any real sample (Llasa reads 2,048 tokens) that keep a broken
# file from growing into gigabytes of strings and lists.
MAX_TEXT_BYTES = 1_000_000        # one transcript, UTF-8


MAX_CODES = 100_000               # one sample's speech codes: 2,000 s at 50 codes/s


# A JSON line holds a text (up to 2x longer as `\uXXXX` escapes) and its codes (up to 7 bytes each).
MAX_JSON_LINE_BYTES = 4_000_000


MAX_LINE_BYTES = MAX_TEXT_BYTES   # a line of a transcript file (csv, tsv, list, txt)


@dataclass
class Sample:
    text: str
    source: str                     # "path:line", for messages and the split record
    codes: np.ndarray | None = None  # int32 speech codes; None until audio is encoded
    audio: Path | None = None
    speaker: str | None = None       # as the data names it (a long hash id: its short alias)
    prompt_speaker: str | None = None  # the name its prompt carries: the speaker, when the set is conditioned on them
    num_tokens: int = 0             # prompt + speech + END, filled by `measure`
    num_codes: int | None = None    # speech codes its audio decodes to, known before (or without) the codec
    audio_sha256: str | None = None  # of the audio file's bytes: what makes two clips the same

    @property
    def code_count(self) -> int:
        """How many speech codes the sample has: its codes, or what its audio will encode to."""
        return len(self.codes) if self.codes is not None else int(self.num_codes or 0)


class Errors:
    """Collects `path:line: problem` messages; raises them together at the end."""

    def __init__(self, cap: int):
        self.cap = cap
        self.items: list[str] = []
        self.count = 0

    def add(self, where: str, problem: str) -> None:
        self.count += 1
        if len(self.items) < self.cap:
            self.items.append(f"{where}: {problem}")

    def raise_if_any(self) -> None:
        if self.count:
            more = f" (first {len(self.items)} shown)" if self.count > len(self.items) else ""
            plural = "s" if self.count > 1 else ""
            # "path:12: ..." is a line; a whole file (its encoding, its place) or the codec is not.
            lines = all(_LINE_PLACE.search(item.split(": ", 1)[0]) for item in self.items)
            what = f"malformed line{plural}" if lines else f"problem{plural}"
            raise AutotuneError(f"{self.count} {what} in the data{more}; fix {'them' if plural else 'it'} or remove "
                                f"{'them' if plural else 'it'}", details=self.items)


_LINE_PLACE = re.compile(r":\d+$")
_Errors = Errors   # tests/test_packing.py's old name for it


def clip_text(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters for a message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


_SNIFF_BYTES = 1 << 20   # the encoding is judged on the first MiB: enough lines, never the whole file


def open_transcript(path: Path, root: Path | None, allow_outside_paths: bool = False) -> IO[bytes]:
    """A transcript file (a list, a table, a clip's .txt) opened for reading: inside the data
    folder `root` unless `allow_outside_paths` (the rule audio follows), and a regular file.
    Raises `AutotuneError`, one line, for anything else."""
    if root is not None and not allow_outside_paths:
        problem = outside_problem(path, root, "transcript file")
        if problem:
            raise AutotuneError(problem)
    return open_regular(path, "transcript")


def read_lines(path: Path, limit_bytes: int, errors: Errors, *, limit_note: str = "", root: Path | None = None,
               allow_outside_paths: bool = False) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line end) for each line of `path`, one line in
    memory at a time. A line over `limit_bytes` is one error by position and is skipped
    in chunks, never held whole: a 200 MB line must not become a 200 MB string, let alone
    a JSON object. A UTF-8 byte-order mark is dropped. A file outside `root`, not a regular
    file, or in another encoding (`encoding_problem`) is one error and yields nothing, so
    the other files' problems are still listed with it."""
    try:
        handle = open_transcript(path, root, allow_outside_paths)
    except AutotuneError as exc:
        errors.add(str(path), str(exc))
        return
    with handle:
        problem = encoding_problem(path, handle.read(_SNIFF_BYTES))
        if problem:
            errors.add(str(path), problem)
            return
        handle.seek(0)
        number = 0
        while True:
            line = handle.readline(limit_bytes + 1)
            if not line:
                return
            number += 1
            if line.endswith(b"\n"):
                line = line[:-1]
            elif len(line) > limit_bytes:
                size = len(line) + _skip_rest_of_line(handle)
                errors.add(f"{path}:{number}", f"line is {megabytes(size)}, longer than the {limit_bytes / 1e6:g} MB "
                                               f"limit{limit_note}")
                continue
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM from Windows editors is not data
            yield number, line.removesuffix(b"\r")


def _skip_rest_of_line(handle: IO[bytes]) -> int:
    skipped = 0
    while True:
        chunk = handle.readline(1 << 20)
        if not chunk:
            return skipped
        if chunk.endswith(b"\n"):
            return skipped + len(chunk) - 1
        skipped += len(chunk)


def converted_name(path: Path) -> Path:
    """Where the encoding hint puts the UTF-8 copy: beside the original (so relative
    audio paths still resolve), same suffix (so its layout is still recognised)."""
    return path.with_name(f"{path.stem}.utf8{path.suffix}")


def other_encoding(raw: bytes) -> tuple[str, str] | None:
    """(name, iconv name) of the encoding a whole file is in when it is not UTF-8, else None.
    UTF-16 (Windows "Unicode") is told by its byte-order mark or its NUL bytes; Shift_JIS
    (CP932), common for Japanese transcripts, when the file is not UTF-8 but decodes as CP932.
    Anything else is None, for the line-by-line checks to list. `raw` is the start of the file
    (a character cut at its end is fine)."""
    head = raw[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(b"\x00") > len(head) // 4:
        return "UTF-16", "UTF-16"
    if _is_utf8(raw):
        return None
    if any(not line.isascii() and _is_utf8(line) for line in raw.split(b"\n")):
        return None   # UTF-8 with some bad lines: those are listed one by one
    try:
        text = codecs.getincrementaldecoder("cp932")().decode(raw)
    except UnicodeDecodeError:
        return None
    # CP932 decodes almost any bytes (accented Latin-1 pairs become kanji): real
    # Japanese text has kana, and no private-use characters (what 0xFF becomes).
    if any("\ue000" <= ch <= "\uf8ff" for ch in text) or not any("\u3040" <= ch <= "\u30ff" for ch in text):
        return None
    return "Shift_JIS (CP932)", "CP932"


def encoding_problem(path: Path, raw: bytes) -> str | None:
    """A whole file in another encoding (`other_encoding`) as one problem (said of `path`), not one per line,
    with the remedy: a converted copy beside the file (`converted_name`) passed as `--data`."""
    found = other_encoding(raw)
    if found is None:
        return None
    name, iconv = found
    target = shlex.quote(str(converted_name(path)))
    return (f"looks like {name} text, not UTF-8: convert it, e.g. `iconv -f {iconv} -t UTF-8 "
            f"{shlex.quote(str(path))} > {target}`, then pass the converted file: `--data {target}` (or `--val`)")


def _is_utf8(data: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data)  # not final: a cut last character is fine
    except UnicodeDecodeError:
        return False
    return True


def read_jsonl(path: Path, errors: Errors, *, root: Path | None = None, allow_outside_paths: bool = False,
               aliases: bool = False) -> list[Sample]:
    """`aliases`: Hugging Face audiofolder's metadata.jsonl, where `file_name` is the
    audio and `transcription` (or `sentence`) the text."""
    samples: list[Sample] = []
    root = path.parent if root is None else root
    note = f" of a JSON line (up to {MAX_TEXT_BYTES / 1e6:g} MB of `text` and {MAX_CODES:,} codes)"
    for number, line in read_lines(path, MAX_JSON_LINE_BYTES, errors, limit_note=note, root=root,
                                   allow_outside_paths=allow_outside_paths):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            text_line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.add(where, f"not UTF-8 (byte {exc.start})")
            continue
        try:
            item = json.loads(text_line)
        except json.JSONDecodeError as exc:
            errors.add(where, f"invalid JSON ({exc.msg})")
            continue
        except RecursionError:
            errors.add(where, "invalid JSON (too deeply nested)")
            continue
        except ValueError:  # an integer of over 4,300 digits (Python's int/str conversion limit)
            errors.add(where, "invalid JSON (a number is too long)")
            continue
        if aliases and isinstance(item, dict):
            item = _audiofolder_item(item, where, errors)
            if item is None:
                continue
        sample = _parse_item(item, where, path.parent, errors, check_bools=b"true" in line or b"false" in line,
                             root=root, allow_outside_paths=allow_outside_paths)
        if sample is not None:
            samples.append(sample)
    return samples


def _audiofolder_item(item: dict, where: str, errors: Errors) -> dict | None:
    item = dict(item)
    if "text" not in item:
        key = next((k for k in ("transcription", "sentence") if k in item), None)
        if key is None:
            errors.add(where, "missing `transcription` (or `text`)")
            return None
        item["text"] = item.pop(key)
    if "audio" not in item and "code" not in item and "codes" not in item:
        if "file_name" not in item:
            errors.add(where, "missing `file_name`")
            return None
        item["audio"] = item.pop("file_name")
    return item


def _parse_item(item: Any, where: str, base: Path, errors: Errors, check_bools: bool, *,
                root: Path | None = None, allow_outside_paths: bool = False) -> Sample | None:
    if not isinstance(item, dict):
        errors.add(where, f"expected a JSON object, got {type(item).__name__}")
        return None
    text = item.get("text")
    if text is None:
        errors.add(where, "missing `text`")
        return None
    if not isinstance(text, str):
        errors.add(where, f"`text` must be a string, got {type(text).__name__}")
        return None
    problem = text_problem(text, "`text`")
    if problem:
        errors.add(where, problem)
        return None
    speaker = item.get("speaker")
    if speaker is not None and not isinstance(speaker, (str, int)):
        errors.add(where, f"`speaker` must be a string, got {type(speaker).__name__}")
        return None
    key = "code" if "code" in item else "codes" if "codes" in item else None
    if key is not None:
        codes = _parse_codes(item[key], key, where, errors, check_bools)
        if codes is None:
            return None
        return Sample(text=text, source=where, codes=codes, speaker=None if speaker is None else str(speaker))
    audio = item.get("audio")
    if audio is None:
        errors.add(where, "missing speech codes: give `code` (or `codes`) as a list of integers, or `audio` as a path")
        return None
    if not isinstance(audio, str) or not audio.strip():
        errors.add(where, "`audio` must be a non-empty path string")
        return None
    path = (base / audio)
    problem = check_audio_file(path, root=base if root is None else root, allow_outside_paths=allow_outside_paths)
    if problem:
        errors.add(where, problem)
        return None
    return Sample(text=text, source=where, audio=path, speaker=None if speaker is None else str(speaker))


def text_problem(text: str, name: str = "text") -> str | None:
    """What is wrong with a transcript, or None: empty, over `MAX_TEXT_BYTES`, or holding
    an unpaired surrogate (which no tokenizer can encode)."""
    if not text.strip():
        return f"empty {name}"
    if len(text) > MAX_TEXT_BYTES // 4:  # cheap first: only a long text can be over the byte limit
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_TEXT_BYTES:
            return f"{name} is {megabytes(size)}, longer than the {MAX_TEXT_BYTES / 1e6:g} MB limit"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
            return (f"{name} is not valid Unicode (unpaired surrogate {ascii(text[exc.start])} "
                    f"at character {exc.start})")
    return None


def _parse_codes(value: Any, key: str, where: str, errors: Errors, check_bools: bool) -> np.ndarray | None:
    if not isinstance(value, list):
        errors.add(where, f"`{key}` must be a list of integers, got {type(value).__name__}")
        return None
    if not value:
        errors.add(where, f"`{key}` is empty")
        return None
    if len(value) > MAX_CODES:
        errors.add(where, f"`{key}` holds {len(value):,} codes, more than the {MAX_CODES:,} limit "
                          f"({MAX_CODES // CODES_PER_SECOND:,} s of speech)")
        return None
    # The fast path: numpy decides "all ints" for the common case in C.
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        arr = np.asarray(value, dtype=object)
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or (check_bools and any(isinstance(v, bool) for v in value)):
        bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, int)), _NONE)
        if bad is _NONE:  # only big ints that overflow int64 get here (a JSON null is found above)
            bad = next(v for v in value if not 0 <= v <= MAX_CODE)
            errors.add(where, f"`{key}` value {_short(bad)} is out of range 0..{MAX_CODE}")
        else:
            errors.add(where, f"`{key}` must hold integers, found {_short(bad)}")
        return None
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > MAX_CODE:
        errors.add(where, f"`{key}` value {low if low < 0 else high} is out of range 0..{MAX_CODE}")
        return None
    return arr.astype(np.int32)


_NONE = object()


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 30 else text[:27] + "..."


OUTSIDE_FIX = "move the {} inside the data folder or set `--set data.allow_outside_paths=true`"


def check_audio_file(path: Path, root: Path | None = None, allow_outside_paths: bool = False) -> str | None:
    """What is wrong with an audio path, or None. In order: it must lie inside `root`
    (by its resolved path, so a symlink leading out counts as outside) unless
    `allow_outside_paths`; it must be a regular file (a folder, FIFO, device or
    symlink loop is said as such, and is never opened); then a cheap header read for its
    format. Its length is judged later from what decodes (`autotune.codec_cache`), as a
    header may say more or less than the file holds."""
    try:
        if root is not None and not allow_outside_paths:
            problem = outside_problem(path, root)
            if problem:
                return problem
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(path):
                return f"audio file `{path}` is a symlink to a missing file (`{os.readlink(path)}`)"
            return f"audio file `{path}` is missing"
    except OSError as exc:  # e.g. a name over the file system's 255-byte limit
        if exc.errno == errno.ELOOP:
            return f"audio file `{path}` is a symlink loop"
        return f"audio path `{clip_text(str(path))}` is unusable ({exc.strerror or exc})"
    except ValueError:  # os functions refuse a NUL byte
        return f"audio path `{clip_text(ascii(str(path)))}` holds a NUL character"
    kind = special_file_kind(mode)
    if kind:
        return f"audio file `{path}` is {kind}, not an audio file"
    try:
        import soundfile

        # Bytes, not str: soundfile encodes a str path strictly, and a folder name
        # that is not UTF-8 reaches us as surrogate escapes.
        info = soundfile.info(os.fsencode(path))
    except Exception as exc:  # soundfile raises its own LibsndfileError and RuntimeError
        reason = " ".join(str(exc).split()).replace(f"Error opening {os.fsencode(path)!r}: ", "")  # said once
        return f"audio file `{path}` is unreadable ({reason[:80]})"
    if info.frames <= 0:
        return f"audio file `{path}` is empty"
    return None


def outside_problem(path: Path, root: Path, what: str = "audio file") -> str | None:
    """Why `path` is not inside the data folder `root` (by resolved path), or None. `what`
    names the file: "audio file" or "transcript file"."""
    base = _resolved_folder(os.fspath(root))
    real = os.path.realpath(path)
    if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
        return None
    fix = OUTSIDE_FIX.format(what.removesuffix(" file"))
    lexical = os.path.normpath(os.path.abspath(path))
    if lexical == base or lexical.startswith(base.rstrip(os.sep) + os.sep):
        return f"{what} `{path}` links to `{real}`, outside the data folder `{root}`: {fix}"
    return f"{what.removesuffix(' file')} path `{path}` is outside the data folder `{root}`: {fix}"


@lru_cache(maxsize=16)
def _resolved_folder(root: str) -> str:
    # Resolved once per data folder, not once per clip: 200,000 lines paid for it twice each.
    return os.path.realpath(root)
