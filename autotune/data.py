"""Llasa data: find the layout, read, encode audio, measure, split.

Accepted layouts for `--data DIR` (or one transcript file of them): JSONL
(train.jsonl [+ val.jsonl], or a single .jsonl), LJSpeech, JSUT, JVS, Common
Voice, Hugging Face audiofolder, Style-Bert-VITS2 `*.list`, and a folder of
audio files with same-named .txt/.lab transcripts. `autotune.corpora` detects
them (its docstring gives the rules and their order) and reads all but JSONL.
A JSONL line is `{"text": ..., "code"|"codes": [int, ...]}` or `{"text": ..., "audio": "rel/path.wav"}`,
with an optional `speaker`.

Reads are bounded and stay inside the data folder (see `autotune.reading`);
`autotune.batches` turns the samples into training sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autotune.errors import AutotuneError
from autotune.llasa import CODES_PER_SECOND
from autotune.reading import Sample, _clip, _Errors


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


# ----------------------------------------------------------------- reading ---

def find_layout(data: Path) -> tuple[str, list[Path], Path | None]:
    """-> (layout, training files, validation file or None). For a folder of audio
    with .txt transcripts the "file" is the folder itself."""
    found = _find_layout(data)
    return found.name, [part.path for part in found.train], found.val.path if found.val else None


def _find_layout(data: Path):
    """The `autotune.corpora.Layout` of a folder or file; see that module for the rules."""
    from autotune.corpora import detect

    try:
        return detect(data)
    except (OSError, ValueError) as exc:  # e.g. a name over the file system's 255-byte limit, a NUL
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AutotuneError(f"cannot use data path `{_clip(str(data))}` ({reason}): "
                            "pass the folder holding train.jsonl, a single .jsonl, or metadata.csv + wavs/") from None


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

def measure(samples: list[Sample], prompt_builder=None, text_normalization: str = "none") -> None:
    """Fill `num_tokens` = prompt + speech codes + END. Without a tokenizer, a
    conservative estimate (UTF-8 bytes of the normalised text + template upper bound)."""
    from autotune.llasa import ESTIMATED_TEMPLATE_TOKENS, estimate_text_tokens
    from autotune.textnorm import normalize

    if prompt_builder is None:
        for s in samples:
            text = normalize(s.text, text_normalization)
            s.num_tokens = ESTIMATED_TEMPLATE_TOKENS + estimate_text_tokens(text) + len(s.codes) + 1
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
                 allow_outside_paths: bool = False, text_normalization: str = "none") -> DataReport:
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
        from autotune.codec_cache import encode_files

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
        measure(part, prompt_builder, text_normalization)
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


