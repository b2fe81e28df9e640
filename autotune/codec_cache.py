"""The codes cache: audio files encoded once, their XCodec2 codes kept as JSON.

A file's entry is keyed by the sha256 of its bytes and the codec's identity, so a second
run encodes nothing, an edited file is encoded again, and codes of different codecs never
mix. Entries are checked when read (a bad one is encoded again) and written atomically; a
cache that cannot be written is bypassed with one warning.

Before the codec sees a file it is hashed and decoded in bounded blocks: its length is what
decodes (a header may lie), a file longer than the cap stops decoding there and is set
aside (`EncodedFiles.too_long`), and NaN or infinite samples are a problem of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from autotune.audio import MAX_AUDIO_SECONDS, AudioDecodeError, AudioTooLong, decode_audio, first_line
from autotune.codec import Codec, CodecLoadError
from autotune.errors import AutotuneError
from autotune.files import open_regular
from autotune.llasa import HOP_LENGTH, NUM_SPEECH_TOKENS


@dataclass(frozen=True)
class Clip:
    """What a file is, known before (or without) the codec."""
    sha256: str          # of the file's bytes
    num_samples: int     # 16 kHz samples it decodes to

    @property
    def num_codes(self) -> int:
        """Codes it encodes to (`Codec.num_codes`)."""
        return (self.num_samples + 1) // HOP_LENGTH


class EncodedFiles(dict[Path, list[int]]):
    """`encode_files`' result: path -> codes, plus how the codes were obtained.

    Attributes:
        encoded: files run through the codec in this call.
        from_cache: files whose codes were read from the cache.
        warnings: one line per cache problem met (invalid entries, a cache that
            cannot be written); encoding went on regardless.
        clips: each file that decoded within the cap (or was cached): its hash and length.
        too_long: files that decode to more than the cap: seconds decoded when it stopped.
        problems: "path: what is wrong" per file (raised unless `collect_problems`).
        failed: the same, by path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0
        self.from_cache = 0
        self.warnings: list[str] = []
        self.clips: dict[Path, Clip] = {}
        self.too_long: dict[Path, float] = {}
        self.problems: list[str] = []
        self.failed: dict[Path, str] = {}


class _CacheUse:
    """The cache one `encode_files` call reads (none without a folder or the codec's id) and
    what went wrong with it, for its warnings."""

    def __init__(self, folder: Path | None, codec: Any | None) -> None:
        self.folder = folder if codec is not None else None
        self.codec = codec
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
    codec: Codec | Any | None,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool = True,
    *,
    max_seconds: float = MAX_AUDIO_SECONDS,
    encode: bool = True,
    collect_problems: bool = False,
) -> EncodedFiles:
    """Encode audio files to codes, caching each file's codes as JSON in `cache_dir`.

    Each file is hashed and decoded in blocks first (`autotune.audio.decode_audio`); one
    that decodes to more than `max_seconds` is never given to the codec: it goes to
    `too_long`. With `encode=False` (or no codec) files are only checked: hashed, looked
    up in the cache when the codec's id is known, and decoded, so `clips` says what each
    will encode to and `problems` what is wrong, without the codec's weights.

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

    encode = encode and codec is not None
    cache = _CacheUse(Path(cache_dir) if cache_dir is not None else None, codec)
    if cache.folder is not None and encode:
        try:
            cache.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            cache.writable, cache.write_error = False, exc.strerror or first_line(exc)
    else:
        cache.writable = False   # checking only: nothing is written
    result = EncodedFiles()
    problems = result.problems
    unique = list(dict.fromkeys(Path(p) for p in paths))

    with Progress(*_progress_columns(), disable=not progress, transient=False) as bar:
        task = bar.add_task("encoding audio" if encode else "reading audio", total=len(unique), encoded=0,
                            encode_seconds=0.0)
        for path in unique:
            started = time.monotonic()
            try:
                clip, codes, was_cached = _encode_one(path, codec if encode else None, cache, max_seconds)
            except CodecLoadError:
                raise
            except AudioTooLong as exc:
                result.too_long[path] = exc.seconds
            except AutotuneError as exc:
                problems.append(str(exc))  # already "path: what is wrong"
                result.failed[path] = str(exc)
            else:
                result.clips[path] = clip
                if codes is not None:
                    result[path] = codes
                if was_cached:
                    result.from_cache += 1
                elif codes is not None:
                    result.encoded += 1
                    fields = bar.tasks[task].fields
                    bar.update(task, encoded=fields["encoded"] + 1,
                               encode_seconds=fields["encode_seconds"] + time.monotonic() - started)
            bar.advance(task)

    result.warnings = cache.warnings()
    for line in result.warnings:
        sys.stderr.write(f"warning: {line}\n")
    if problems and not collect_problems:
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


def _encode_one(path: Path, codec: Codec | None, cache: _CacheUse,
                max_seconds: float) -> tuple[Clip, list[int] | None, bool]:
    """(what the file is, its codes or None when not encoding, whether they came from the
    cache). The file is read through one handle, hashed in chunks, then decoded in blocks:
    never whole in memory. Raises `AudioTooLong` past `max_seconds`."""
    if not path.is_file():
        raise AutotuneError(f"{path}: audio file is missing")
    try:
        with open_regular(path, "audio") as handle:
            before = os.fstat(handle.fileno())
            if _header_seconds(handle) > max_seconds:
                # Decoding (which stops at the cap) settles it before a long file is hashed whole;
                # should the header lie and the audio be short, it goes on as any other file.
                decode_audio(handle, max_seconds=max_seconds)
                handle.seek(0)
            audio_hash = _sha256(handle)
            if cache.folder is not None:
                entry = _entry(cache.folder, cache.codec.codec_id, audio_hash)
                cached, num_samples, problem = _read_cache(entry, cache.codec.codec_id, audio_hash)
                if cached is not None:
                    _check_length(num_samples, max_seconds)
                    return Clip(audio_hash, num_samples), (cached if codec is not None else None), True
                if problem:
                    cache.invalid.append(f"`{entry.name}` for {path}: {problem}")
            handle.seek(0)
            wave = decode_audio(handle, max_seconds=max_seconds)
            after = os.fstat(handle.fileno())
    except OSError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({first_line(exc)})") from exc
    except AudioDecodeError as exc:
        raise AutotuneError(f"{path}: cannot read audio ({exc})") from exc
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise AutotuneError(f"{path}: the file changed while it was read: run again once it is written")
    clip = Clip(audio_hash, int(wave.size))
    if codec is None:
        return clip, None, False
    try:
        codes = codec.encode(wave)
    except CodecLoadError:
        raise
    except AutotuneError as exc:
        raise AutotuneError(f"{path}: {exc}") from exc
    if cache.writable and cache.folder is not None:
        # Under the id of the weights the codes came from (a deferred codec learns it on loading).
        payload = {"codec_id": codec.codec_id, "audio_sha256": audio_hash, "num_samples": int(wave.size),
                   "codes": codes}
        try:
            _write_json_atomic(_entry(cache.folder, codec.codec_id, audio_hash), payload)
        except OSError as exc:
            cache.unwritten += 1
            cache.write_error = cache.write_error or exc.strerror or first_line(exc)
            # A folder squatting on one entry's name spoils that entry only; anything
            # else (read-only, disk full) would fail the same way for every file.
            cache.writable = isinstance(exc, IsADirectoryError)
    else:
        cache.unwritten += 1
    return clip, codes, False


def _entry(folder: Path, codec_id: str, audio_hash: str) -> Path:
    key = hashlib.sha256(f"{codec_id}\0{audio_hash}".encode()).hexdigest()
    return folder / f"{key}.json"


def _header_seconds(handle: IO[bytes]) -> float:
    """What the file's header says its length is (0 when it says nothing usable); at the start."""
    import soundfile

    try:
        info = soundfile.info(handle)
        return info.frames / info.samplerate if info.samplerate > 0 else 0.0
    except Exception:   # noqa: BLE001 - unreadable headers are decode_audio's to report
        return 0.0
    finally:
        handle.seek(0)


def _sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _check_length(num_samples: int, max_seconds: float) -> None:
    """A cached file is held to the same cap as a decoded one."""
    from autotune.llasa import SAMPLING_RATE

    if num_samples > max_seconds * SAMPLING_RATE:
        raise AudioTooLong(num_samples / SAMPLING_RATE, max_seconds)


def _read_cache(entry: Path, codec_id: str, audio_hash: str) -> tuple[list[int] | None, int, str | None]:
    """(the cached codes, the samples they encode), else None and why the entry is unusable
    (None when there is no entry)."""
    try:
        text = entry.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder) yet
        return None, 0, None
    except IsADirectoryError:
        return None, 0, "a folder, not a file"
    except (OSError, UnicodeDecodeError) as exc:
        return None, 0, f"unreadable ({getattr(exc, 'strerror', None) or first_line(exc)})"
    try:
        payload = json.loads(text)
    except ValueError:
        return None, 0, "not valid JSON"
    problem = _cache_problem(payload, codec_id, audio_hash)
    return (None, 0, problem) if problem else (payload["codes"], payload["num_samples"], None)


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
