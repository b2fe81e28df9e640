"""Llasa data: read, validate, split, encode audio, build training samples.

Accepted layouts for `--data DIR` (or one transcript file of them): JSONL
(train.jsonl [+ val.jsonl], or a single .jsonl), LJSpeech, JSUT, JVS, Common
Voice, Hugging Face audiofolder, Style-Bert-VITS2 `*.list`, and a folder of
audio files with same-named .txt/.lab transcripts. `autotune.corpora` detects
them (its docstring gives the rules and their order) and reads all but JSONL.
A JSONL line is `{"text": ..., "code"|"codes": [int, ...]}` or `{"text": ..., "audio": "rel/path.wav"}`,
with an optional `speaker`.

Reads are bounded: files are read a line at a time, and a line, a `text` or a
code list over its limit is one error by position, never parsed whole. Audio
must stay inside the data folder (its resolved path, so a symlink that leads
out counts as outside) unless `allow_outside_paths`, and must be a regular file.
"""

from __future__ import annotations

import codecs
import errno
import json
import math
import os
import random
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from autotune.errors import AutotuneError
from autotune.llasa import IGNORE_INDEX

MAX_CODE = 65535
CODES_PER_SECOND = 50

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
    speaker: str | None = None       # as the data names it
    prompt_speaker: str | None = None  # the name its prompt carries: the speaker, when the set is conditioned on them
    num_tokens: int = 0             # prompt + speech + END, filled by `measure`


@dataclass
class DataReport:
    train: list[Sample]
    val: list[Sample]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    layout: str = ""
    val_source: str = ""            # "file", "split" or "eval_data_dir"
    token_count_exact: bool = True
    encoded: int = 0
    from_cache: int = 0
    speaker_conditioning: bool = False   # prompts name their speaker (see `conditioned_on_speakers`)

    def speakers(self) -> dict[str, float]:
        """{speaker: seconds}, as the data names them (also when there is only one)."""
        return speaker_seconds(self.train + self.val)

    def summary(self) -> dict[str, Any]:
        kept = self.train + self.val
        lengths = np.array([s.num_tokens for s in kept]) if kept else np.zeros(1)
        longest = max(kept, key=lambda s: s.num_tokens) if kept else None
        return {
            "layout": self.layout,
            "train_samples": len(self.train),
            "val_samples": len(self.val),
            "val_source": self.val_source,
            "audio_seconds": round(sum(len(s.codes) for s in kept) / CODES_PER_SECOND, 2),
            "max_tokens": int(lengths.max()),
            "token_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)},
            "longest": {"source": longest.source, "tokens": longest.num_tokens} if longest else None,
            "speakers": self.speakers(),
            "token_count_exact": self.token_count_exact,
            "token_count_note": None if self.token_count_exact else (
                "the model's tokenizer was not available: prompt lengths are conservative estimates "
                "(UTF-8 bytes of the text + 64 template tokens), never below the real count"),
            "skipped": self.skipped,
        }


def speaker_seconds(samples: list[Sample]) -> dict[str, float]:
    """{speaker: seconds of audio}, most audio first; empty when the data names no speakers."""
    seconds: dict[str, float] = {}
    for s in samples:
        if s.speaker is not None and s.codes is not None:
            seconds[s.speaker] = seconds.get(s.speaker, 0.0) + len(s.codes) / CODES_PER_SECOND
    return {name: round(value, 2) for name, value in sorted(seconds.items(), key=lambda kv: (-kv[1], kv[0]))}


MAX_NAMED_SPEAKERS = 64


def conditioned_on_speakers(seconds: dict[str, float]) -> bool:
    """Prompts name the speaker (`Speaker NAME`) for 2 to `MAX_NAMED_SPEAKERS` speakers. One
    voice needs no name (and is then spoken without `--speaker`); thousands of Common Voice
    `client_id`s are no voices a user would pick by name."""
    return 2 <= len(seconds) <= MAX_NAMED_SPEAKERS


class _Errors:
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
            raise AutotuneError(f"{self.count} malformed line{'s' if self.count > 1 else ''} in the data{more}; "
                                "fix them or remove them", details=self.items)


# ----------------------------------------------------------------- reading ---

def find_layout(data: Path) -> tuple[str, list[Path], Path | None]:
    """-> (layout, training files, validation file or None). For a folder of audio
    with .txt transcripts the "file" is the folder itself."""
    found = _find_layout(data)
    return found.name, [part.path for part in found.train], found.val.path if found.val else None


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _find_layout(data: Path):
    """The `autotune.corpora.Layout` of a folder or file; see that module for the rules."""
    from autotune.corpora import detect

    try:
        return detect(data)
    except (OSError, ValueError) as exc:  # e.g. a name over the file system's 255-byte limit, a NUL
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AutotuneError(f"cannot use data path `{_clip(str(data))}` ({reason}): "
                            "pass the folder holding train.jsonl, a single .jsonl, or metadata.csv + wavs/") from None


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


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


def open_regular(path: Path, what: str = "data") -> IO[bytes]:
    """Open a file for reading, refusing anything but a regular file. O_NONBLOCK makes
    opening a FIFO return at once (a plain open waits for a writer forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise AutotuneError(f"{what} file `{path}` does not exist: check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AutotuneError(f"{what} file `{path}` is a symlink loop: point it at a real file") from None
        raise AutotuneError(f"cannot read `{path}` ({exc.strerror or exc}): check permissions") from None
    kind = special_file_kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise AutotuneError(f"{what} file `{path}` is {kind}, not a regular file: pass the file itself")
    return os.fdopen(fd, "rb")


_SNIFF_BYTES = 1 << 20   # the encoding is judged on the first MiB: enough lines, never the whole file


def read_lines(path: Path, limit_bytes: int, errors: _Errors, *, limit_note: str = "") -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line end) for each line of `path`, one line in
    memory at a time. A line over `limit_bytes` is one error by position and is skipped
    in chunks, never held whole: a 200 MB line must not become a 200 MB string, let alone
    a JSON object. A UTF-8 byte-order mark is dropped; a file in another encoding is one
    error (`_require_utf8`)."""
    with open_regular(path) as handle:
        _require_utf8(path, handle.read(_SNIFF_BYTES))
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
                errors.add(f"{path}:{number}", f"line is {_mb(size)}, longer than the {limit_bytes / 1e6:g} MB "
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


def _require_utf8(path: Path, raw: bytes, fix: Callable[[str], str] | None = None) -> None:
    """A whole file in another encoding is one error, not one per line. UTF-16 (Windows
    "Unicode") is told by its byte-order mark or its NUL bytes; Shift_JIS (CP932), common
    for Japanese transcripts, when the file is not UTF-8 but decodes as CP932. Anything
    else returns, for the line-by-line checks to list. `raw` is the start of the file
    (a character cut at its end is fine); `fix(iconv_name)` words the remedy, by default
    a converted copy beside the file (`converted_name`) passed as `--data`."""
    head = raw[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(b"\x00") > len(head) // 4:
        name, iconv = "UTF-16", "UTF-16"
    else:
        if _is_utf8(raw):
            return
        if any(not line.isascii() and _is_utf8(line) for line in raw.split(b"\n")):
            return   # UTF-8 with some bad lines: those are listed one by one
        try:
            text = codecs.getincrementaldecoder("cp932")().decode(raw)
        except UnicodeDecodeError:
            return
        # CP932 decodes almost any bytes (accented Latin-1 pairs become kanji): real
        # Japanese text has kana, and no private-use characters (what 0xFF becomes).
        if any("\ue000" <= ch <= "\uf8ff" for ch in text) or not any("\u3040" <= ch <= "\u30ff" for ch in text):
            return
        name, iconv = "Shift_JIS (CP932)", "CP932"
    if fix is None:
        target = shlex.quote(str(converted_name(path)))
        remedy = (f"convert it, e.g. `iconv -f {iconv} -t UTF-8 {shlex.quote(str(path))} > {target}`, "
                  f"then pass the converted file: `--data {target}` (or `--val`)")
    else:
        remedy = fix(iconv)
    raise AutotuneError(f"`{path}` looks like {name} text, not UTF-8: {remedy}")


def _is_utf8(data: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data)  # not final: a cut last character is fine
    except UnicodeDecodeError:
        return False
    return True


def read_jsonl(path: Path, errors: _Errors, *, root: Path | None = None, allow_outside_paths: bool = False,
               aliases: bool = False) -> list[Sample]:
    """`aliases`: Hugging Face audiofolder's metadata.jsonl, where `file_name` is the
    audio and `transcription` (or `sentence`) the text."""
    samples: list[Sample] = []
    root = path.parent if root is None else root
    note = f" of a JSON line (up to {MAX_TEXT_BYTES / 1e6:g} MB of `text` and {MAX_CODES:,} codes)"
    for number, line in read_lines(path, MAX_JSON_LINE_BYTES, errors, limit_note=note):
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


def _audiofolder_item(item: dict, where: str, errors: _Errors) -> dict | None:
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


def _parse_item(item: Any, where: str, base: Path, errors: _Errors, check_bools: bool, *,
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
            return f"{name} is {_mb(size)}, longer than the {MAX_TEXT_BYTES / 1e6:g} MB limit"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
            return (f"{name} is not valid Unicode (unpaired surrogate {ascii(text[exc.start])} "
                    f"at character {exc.start})")
    return None


def _parse_codes(value: Any, key: str, where: str, errors: _Errors, check_bools: bool) -> np.ndarray | None:
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


OUTSIDE_FIX = "move the audio inside the data folder or set `--set data.allow_outside_paths=true`"


def check_audio_file(path: Path, root: Path | None = None, allow_outside_paths: bool = False) -> str | None:
    """What is wrong with an audio path, or None. In order: it must lie inside `root`
    (by its resolved path, so a symlink leading out counts as outside) unless
    `allow_outside_paths`; it must be a regular file (a folder, FIFO, device or
    symlink loop is said as such, and is never opened); then a cheap header read
    (the codec reads the samples later) for its format and length."""
    try:
        if root is not None and not allow_outside_paths:
            problem = _outside_problem(path, root)
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
        return f"audio path `{_clip(str(path))}` is unusable ({exc.strerror or exc})"
    except ValueError:  # os functions refuse a NUL byte
        return f"audio path `{_clip(ascii(str(path)))}` holds a NUL character"
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
    seconds = info.frames / max(info.samplerate, 1)
    if seconds > MAX_CODES / CODES_PER_SECOND:
        return (f"audio file `{path}` is {seconds / 60:,.0f} min long, longer than the "
                f"{MAX_CODES // CODES_PER_SECOND:,} s limit of one sample: cut it into utterances")
    return None


def _outside_problem(path: Path, root: Path) -> str | None:
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
        return None
    lexical = os.path.normpath(os.path.abspath(path))
    if lexical == base or lexical.startswith(base.rstrip(os.sep) + os.sep):
        return f"audio file `{path}` links to `{real}`, outside the data folder `{root}`: {OUTSIDE_FIX}"
    return f"audio path `{path}` is outside the data folder `{root}`: {OUTSIDE_FIX}"


def read_any(path: Path, errors: _Errors, *, root: Path | None = None,
             allow_outside_paths: bool = False) -> list[Sample]:
    """Every sample of a folder or file of any layout, validation part included."""
    from autotune.corpora import read_part

    found = _find_layout(path)
    root = root if root is not None else path if path.is_dir() else path.parent
    out: list[Sample] = []
    for part in found.train + ([found.val] if found.val else []):
        out += read_part(part, errors, root=root, allow_outside_paths=allow_outside_paths)
    return out


# -------------------------------------------------------------- splitting ---

def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` reproducibly: the same data and seed give the same split."""
    if len(samples) < 2:
        return list(samples), []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    val_idx = set(order[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


# ---------------------------------------------------------------- lengths ---

def measure(samples: list[Sample], prompt_builder=None) -> None:
    """Fill `num_tokens` = prompt + speech codes + END. Without a tokenizer, a
    conservative estimate (UTF-8 bytes + template upper bound)."""
    from autotune.llasa import ESTIMATED_TEMPLATE_TOKENS, estimate_text_tokens

    if prompt_builder is None:
        for s in samples:
            s.num_tokens = ESTIMATED_TEMPLATE_TOKENS + estimate_text_tokens(s.text) + len(s.codes) + 1
        return
    texts = [s.text for s in samples]
    # Counting needs no id lists; `text_lengths` skips building them where the tokenizer allows.
    lengths = prompt_builder.text_lengths(texts)
    for s, n in zip(samples, lengths):
        s.num_tokens = prompt_builder.overhead_for(s.prompt_speaker) + n + len(s.codes) + 1


def drop_too_long(samples: list[Sample], max_length: int, skipped: list[dict[str, Any]]) -> list[Sample]:
    """Never truncate: a cut utterance teaches the model to stop mid-word."""
    kept = []
    for s in samples:
        if s.num_tokens > max_length:
            skipped.append({"source": s.source, "tokens": s.num_tokens, "max_length": max_length,
                            "reason": f"{s.num_tokens} tokens > max_length {max_length}"})
        else:
            kept.append(s)
    return kept


# --------------------------------------------------------------- pipeline ---

def load_dataset(data: str | Path, *, max_length: int, val_fraction: float, split_seed: int,
                 eval_data: str | Path | None = None, prompt_builder=None,
                 codec_loader: Callable[[], Any] | None = None, cache_dir: Path | None = None,
                 max_errors_shown: int = 50, progress: bool = True,
                 allow_outside_paths: bool = False) -> DataReport:
    """Read, validate, encode audio, measure, skip over-long samples, split.
    Audio must lie inside the folder given (a file's own folder for a file) unless
    `allow_outside_paths`."""
    from autotune.corpora import read_part

    data = Path(data)
    found = _find_layout(data)
    layout, files = found.name, [part.path for part in found.train]
    errors = _Errors(max_errors_shown)
    root = data if data.is_dir() else data.parent
    train: list[Sample] = []
    for part in found.train:
        train += read_part(part, errors, root=root, allow_outside_paths=allow_outside_paths)
    val: list[Sample] = []
    val_source = ""
    if eval_data is not None:
        eval_path = Path(eval_data)
        try:
            exists = eval_path.exists()
        except OSError as exc:
            raise AutotuneError(f"cannot use validation data `{_clip(str(eval_path))}` ({exc.strerror or exc}): "
                                "check `--val` or `eval_data_dir`") from None
        if not exists:
            raise AutotuneError(f"validation data `{eval_path}` does not exist: check `--val` or `eval_data_dir`")
        val = read_any(eval_path, errors, allow_outside_paths=allow_outside_paths)
        val_source = "eval_data_dir"
    elif found.val is not None:
        val = read_part(found.val, errors, root=root, allow_outside_paths=allow_outside_paths)
        val_source = "file"
    errors.raise_if_any()

    report = DataReport(train=train, val=val, layout=layout, val_source=val_source,
                        token_count_exact=prompt_builder is not None)
    need_audio = [s for s in train + val if s.codes is None]
    if need_audio:
        if codec_loader is None or cache_dir is None:
            raise AutotuneError("the data needs audio encoding but no codec was given")
        from autotune.codec import encode_files

        codec = codec_loader()
        try:
            encoded = encode_files([s.audio for s in need_audio], codec, cache_dir, progress=progress)
        except AutotuneError as exc:
            raise _with_line_sources(exc, need_audio) from None
        codes_by_path, report.encoded, report.from_cache = encoded, encoded.encoded, encoded.from_cache
        for s in need_audio:
            s.codes = np.asarray(codes_by_path[s.audio], dtype=np.int32)

    # Whether prompts name the speaker is decided before lengths are counted: the name is prompt.
    report.speaker_conditioning = conditioned_on_speakers(speaker_seconds(train + val))
    for sample in train + val:
        sample.prompt_speaker = sample.speaker if report.speaker_conditioning else None
    for part in (train, val):
        measure(part, prompt_builder)
    report.train = drop_too_long(train, max_length, report.skipped)
    report.val = drop_too_long(val, max_length, report.skipped)
    if not report.train and not report.val:
        if report.skipped:
            raise AutotuneError(f"every sample is longer than max_length {max_length} tokens "
                                f"({len(report.skipped)} skipped): raise `--set data.max_length=...` or split long clips")
        raise AutotuneError(f"`{data}` holds no samples: add lines of {{\"text\": ..., \"code\": [...]}}")
    if not val_source:
        report.train, report.val = split(report.train, val_fraction, split_seed)
        report.val_source = "split"
    if not report.train:
        if train:
            raise AutotuneError("no training samples are left after skipping over-long ones: "
                                f"raise `--set data.max_length=...` (now {max_length})")
        names = ", ".join(f"`{f}`" for f in files)
        raise AutotuneError(f"the training data {names} holds no samples (only the validation set has some): "
                            "add lines of {\"text\": ..., \"code\": [...]}")
    return report


def _with_line_sources(exc: AutotuneError, samples: list[Sample]) -> AutotuneError:
    """The codec reports `audio path: problem`; name the data lines that use the file."""
    sources: dict[str, list[str]] = {}
    for s in samples:
        sources.setdefault(str(s.audio), []).append(s.source)
    details = []
    for detail in exc.details:
        path, sep, problem = detail.partition(": ")
        lines = sources.get(path)
        if sep and lines:
            more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
            detail = f"{lines[0]}: audio file `{path}`: {problem}{more}"
        details.append(detail)
    return AutotuneError(str(exc), details=details)


def split_record(report: DataReport) -> dict[str, Any]:
    """Which samples went where, saved in the output folder."""
    return {"val_source": report.val_source, "val": [s.source for s in report.val],
            "train_count": len(report.train), "skipped": report.skipped}


# ---------------------------------------------------------------- samples ---

def build_example(sample: Sample, prompt_builder, text_ids: list[int] | None = None) -> dict[str, list[int]]:
    """input_ids = prompt (ends with SPEECH_GENERATION_START) + speech ids + END.

    As the official recipe (LLaSA_training finetune_offline_lora.py): labels are
    -100 before SPEECH_GENERATION_START and the ids themselves from it on, so the
    loss covers SPEECH_GENERATION_START, the speech ids and END. A sample with a
    speaker opens the assistant turn with `Speaker {name}` (see `llasa.chat_messages`)."""
    tokens = prompt_builder.tokens
    ids = text_ids if text_ids is not None else prompt_builder.text_ids([sample.text])[0]
    prompt = prompt_builder.prefix_ids + ids + prompt_builder.suffix_for(sample.prompt_speaker)
    speech = (sample.codes.astype(np.int64) + tokens.speech_offset).tolist() + [tokens.speech_end]
    return {"input_ids": prompt + speech, "labels": [IGNORE_INDEX] * (len(prompt) - 1) + [prompt[-1]] + speech}


def build_examples(samples: list[Sample], prompt_builder) -> list[dict[str, list[int]]]:
    text_ids = prompt_builder.text_ids([s.text for s in samples])
    return [build_example(s, prompt_builder, ids) for s, ids in zip(samples, text_ids)]


class LlasaCollator:
    """Right-pads to a multiple of 8; padding is masked in labels and attention.

    `hidden_ids` are also masked out of attention where they occur: the official recipe
    (LLaSA_training finetune_offline_lora.py) sets pad = eos = `<|eot_id|>` and masks
    `input_ids != pad`, so the `<|eot_id|>` closing the system and user turns is never
    attended to, in Llasa's pretraining (train_tts.py) as in its fine-tuning."""

    def __init__(self, pad_id: int, multiple_of: int = 8, hidden_ids: tuple[int, ...] = ()):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.hidden_ids = tuple(hidden_ids)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = int(math.ceil(longest / self.multiple_of) * self.multiple_of)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[i, :length] = torch.as_tensor(f["input_ids"])
            labels[i, :length] = torch.as_tensor(f["labels"])
            attention[i, :length] = 1
        if self.hidden_ids:
            attention[torch.isin(input_ids, torch.tensor(self.hidden_ids))] = 0
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class PackedCollator:
    """Padding-free batches: concatenates samples into one row with position ids
    restarting at each sample. transformers builds a block-diagonal mask from
    the position ids when there is no attention mask and no cache (training with
    `use_cache=False`), so attention does not cross samples; a test checks it."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features], return_tensors="pt")


def make_collator(pad_id: int, packing: bool, hidden_ids: tuple[int, ...] = ()):
    """Padded rows (multiple of 8), or padding-free packed rows with `data.packing` (which
    carry no attention mask, so `hidden_ids` stay visible there: packing is ours, not the recipe's)."""
    return PackedCollator() if packing else LlasaCollator(pad_id, hidden_ids=hidden_ids)
