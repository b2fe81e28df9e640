"""The codes cache: audio files encoded once, their XCodec2 codes kept as JSON.

A file's entry is keyed by the sha256 of its bytes and the codec's identity, so a second
run encodes nothing, an edited file is encoded again, and codes of different codecs never
mix. Entries are checked when read (a bad one is encoded again) and written atomically; a
cache that cannot be written is bypassed with one warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autotune.audio import _AudioDecodeError, _decode_audio, _reason
from autotune.codec import Codec, CodecLoadError
from autotune.errors import AutotuneError
from autotune.llasa import HOP_LENGTH, NUM_SPEECH_TOKENS


class EncodedFiles(dict[Path, list[int]]):
    """`encode_files`' result: path -> codes, plus how the codes were obtained.

    Attributes:
        encoded: files run through the codec in this call.
        from_cache: files whose codes were read from the cache.
        warnings: one line per cache problem met (invalid entries, a cache that
            cannot be written); encoding went on regardless.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0
        self.from_cache = 0
        self.warnings: list[str] = []


class _CacheUse:
    """What went wrong with the cache during one `encode_files` call, for its warnings."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.invalid: list[str] = []  # "entry: why", re-encoded
        self.unwritten = 0
        self.write_error: str | None = None
        self.writable = True

    def warnings(self) -> list[str]:
        out = []
        if self.invalid:
            many = len(self.invalid) > 1
            out.append(f"{len(self.invalid)} codec cache entr{'ies' if many else 'y'} in `{self.folder}` "
                       f"{'were' if many else 'was'} invalid and encoded again ({'e.g. ' if many else ''}"
                       f"{self.invalid[0]})")
        if self.unwritten:
            out.append(f"could not write to the codec cache `{self.folder}` ({self.write_error}): "
                       f"{self.unwritten} file{'s' if self.unwritten != 1 else ''} encoded but not cached, so "
                       "encoded again next run; make the folder writable, free disk space, or use another "
                       "`--output-dir`")
        return out


def encode_files(
    paths: Sequence[str | os.PathLike[str]],
    codec: Codec,
    cache_dir: str | os.PathLike[str],
    progress: bool = True,
) -> EncodedFiles:
    """Encode audio files to codes, caching each file's codes as JSON in `cache_dir`.

    A file's cache key is the sha256 of its bytes together with
    `codec.codec_id`, so a second run encodes nothing, an edited file is
    encoded again, and codes of different codecs never mix. Cache files are
    written atomically (temporary file, then `os.replace`), so an interrupted
    run leaves no half-written entry. Keys of the result are the paths as
    given (as `Path`); the result's `encoded` and `from_cache` attributes
    count the two ways codes were obtained.

    The cache is a convenience, never a reason to fail: an entry that is not
    valid (see `_cache_problem`) is encoded again, and a cache that cannot be
    written (read-only, full disk, an entry path taken by a folder) is
    bypassed. Either way one warning line per kind goes to stderr and into the
    result's `warnings`.

    Every file is tried before any error is raised, and what did succeed is
    cached, so fixing the listed files and running again only encodes those.
    A codec that fails to load (`CodecLoadError`) stops everything at once,
    before anything is written.

    Raises:
        AutotuneError: one or more files are missing, unreadable or too short;
            its `details` hold one "path: what is wrong" per file.
    """
    from rich.progress import Progress

    cache = _CacheUse(Path(cache_dir))
    try:
        cache.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        cache.writable, cache.write_error = False, exc.strerror or _reason(exc)
    result = EncodedFiles()
    problems: list[str] = []
    unique = list(dict.fromkeys(Path(p) for p in paths))

    with Progress(*_progress_columns(), disable=not progress, transient=False) as bar:
        task = bar.add_task("encoding audio", total=len(unique), encoded=0, encode_seconds=0.0)
        for path in unique:
            started = time.monotonic()
            try:
                codes, was_cached = _encode_one(path, codec, cache)
            except CodecLoadError:
                raise
            except AutotuneError as exc:
                problems.append(str(exc))  # already "path: what is wrong"
            else:
                result[path] = codes
                if was_cached:
                    result.from_cache += 1
                else:
                    result.encoded += 1
                    fields = bar.tasks[task].fields
                    bar.update(task, encoded=fields["encoded"] + 1,
                               encode_seconds=fields["encode_seconds"] + time.monotonic() - started)
            bar.advance(task)

    result.warnings = cache.warnings()
    for line in result.warnings:
        sys.stderr.write(f"warning: {line}\n")
    if problems:
        noun = "file" if len(problems) == 1 else "files"
        raise AutotuneError(
            f"{len(problems)} of {len(unique)} audio {noun} could not be encoded; "
            "fix or remove them from the data set and run again",
            details=problems,
        )
    return result


def _progress_columns() -> tuple[Any, ...]:
    """Bar, count, elapsed time and an ETA that shows from the first encoded file on.

    rich's own TimeRemainingColumn waits for a speed estimate over several
    updates, and cached files (done at once) would make its rate meaningless;
    this one divides the time spent encoding by the files encoded so far.
    """
    from datetime import timedelta

    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class EncodeEtaColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            encoded, seconds = task.fields.get("encoded", 0), task.fields.get("encode_seconds", 0.0)
            if task.finished or not encoded:
                return Text("")
            left = timedelta(seconds=round(seconds / encoded * (task.remaining or 0)))
            return Text(f"about {left} left, {encoded / max(seconds, 1e-9):.1f} files/s", style="progress.remaining")

    return (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        EncodeEtaColumn(),
    )


def _encode_one(path: Path, codec: Codec, cache: _CacheUse) -> tuple[list[int], bool]:
    """Codes of one file and whether they came from the cache."""
    if not path.is_file():
        raise AutotuneError(f"{path}: audio file is missing")
    try:
        # One read serves both the hash and the decoding, so they see the same bytes.
        data = path.read_bytes()
    except OSError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({_reason(exc)})") from exc

    audio_hash = hashlib.sha256(data).hexdigest()
    key = hashlib.sha256(f"{codec.codec_id}\0{audio_hash}".encode()).hexdigest()
    entry = cache.folder / f"{key}.json"
    cached, problem = _read_cache(entry, codec.codec_id, audio_hash)
    if cached is not None:
        return cached, True
    if problem:
        cache.invalid.append(f"`{entry.name}` for {path}: {problem}")

    try:
        wave = _decode_audio(io.BytesIO(data))
    except _AudioDecodeError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({exc})") from exc
    try:
        codes = codec.encode(wave)
    except CodecLoadError:
        raise
    except AutotuneError as exc:
        raise AutotuneError(f"{path}: {exc}") from exc
    if cache.writable:
        payload = {"codec_id": codec.codec_id, "audio_sha256": audio_hash, "num_samples": int(wave.size),
                   "codes": codes}
        try:
            _write_json_atomic(entry, payload)
        except OSError as exc:
            cache.unwritten += 1
            cache.write_error = cache.write_error or exc.strerror or _reason(exc)
            # A folder squatting on one entry's name spoils that entry only; anything
            # else (read-only, disk full) would fail the same way for every file.
            cache.writable = isinstance(exc, IsADirectoryError)
    else:
        cache.unwritten += 1
    return codes, False


def _read_cache(entry: Path, codec_id: str, audio_hash: str) -> tuple[list[int] | None, str | None]:
    """The cached codes, else None and why the entry is unusable (None when there is no entry)."""
    try:
        text = entry.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) yet
        return None, None
    except IsADirectoryError:
        return None, "a folder, not a file"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({getattr(exc, 'strerror', None) or _reason(exc)})"
    try:
        payload = json.loads(text)
    except ValueError:
        return None, "not valid JSON"
    problem = _cache_problem(payload, codec_id, audio_hash)
    return (None, problem) if problem else (payload["codes"], None)


def _cache_problem(payload: Any, codec_id: str, audio_hash: str) -> str | None:
    """Why a parsed cache entry cannot be trusted, or None when it can.

    The codes must be a non-empty list of ints in 0..65535 whose length is
    `Codec.num_codes(num_samples)`, i.e. `(num_samples + 1) // 320`.
    """
    if not isinstance(payload, dict):
        return "not a JSON object"
    if payload.get("codec_id") != codec_id or payload.get("audio_sha256") != audio_hash:
        return "written for another codec or audio"
    codes, num_samples = payload.get("codes"), payload.get("num_samples")
    if not isinstance(codes, list) or not codes:
        return "no list of codes"
    if not all(type(c) is int for c in codes):  # bools and floats are not codes
        return "codes that are not integers"
    out_of_range = next((c for c in codes if not 0 <= c < NUM_SPEECH_TOKENS), None)
    if out_of_range is not None:
        return f"code {out_of_range} outside 0..{NUM_SPEECH_TOKENS - 1}"
    if type(num_samples) is not int or num_samples < 0:
        return "no valid `num_samples`"
    expected = (num_samples + 1) // HOP_LENGTH
    if len(codes) != expected:
        return f"{len(codes)} codes for {num_samples} samples, not {expected}"
    return None


def _write_json_atomic(target: Path, payload: dict[str, Any]) -> None:
    """Write JSON to `target` via a temporary file; on any failure the temporary file is removed."""
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
