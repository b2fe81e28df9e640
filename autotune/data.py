"""Llasa data: find the layout, read, check and encode audio, drop copies, measure, split.

Accepted layouts for `--data DIR` (or one transcript file of them): JSONL
(train.jsonl [+ val.jsonl], or a single .jsonl), LJSpeech, JSUT, JVS, Common
Voice, Hugging Face audiofolder, Style-Bert-VITS2 `*.list`, llasa-trainer's
audio/ + text.txt, and a folder of audio files with same-named .txt/.lab
transcripts. `autotune.layouts` detects them (its docstring gives the rules and
their order) and `autotune.corpora` reads all but JSONL.
A JSONL line is `{"text": ..., "code"|"codes": [int, ...]}` or `{"text": ..., "audio": "rel/path.wav"}`,
with an optional `speaker`.

Reads are bounded and stay inside the data folder (see `autotune.reading`). Every problem
a user can fix comes in one list: transcripts, encodings, and the audio, which is hashed and
decoded (bounded, `autotune.codec_cache`) before the codec sees it. A clip whose speech
cannot fit `max_length` is never encoded; a copy of a clip (the same audio bytes, or the
same codes) is kept once and listed (`DataReport.duplicates`), so no copy is in both train
and validation. `autotune.batches` turns the samples into training sequences.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autotune.errors import AutotuneError
from autotune.llasa import CODES_PER_SECOND, HOP_LENGTH, SAMPLING_RATE
from autotune.reading import MAX_CODES, Errors, Sample, clip_text


@dataclass
class DataReport:
    train: list[Sample]
    val: list[Sample]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    layout: str = ""
    val_source: str = ""            # "file", "split", "recorded" (split.json) or "eval_data_dir"
    token_count_exact: bool = True
    encoded: int = 0
    from_cache: int = 0
    speaker_conditioning: bool = False   # prompts name their speaker (see `conditioned_on_speakers`)
    duplicates: list[dict[str, Any]] = field(default_factory=list)   # copies left out: {source, duplicate_of, ...}
    notes: list[str] = field(default_factory=list)   # how the data was read, for the console and --check-data
    codec_problem: str | None = None     # --check-data without a usable codec: why (lengths come from decoding)
    speaker_ids: dict[str, str] = field(default_factory=dict)   # short alias -> the data's long hash id
    text_normalization: dict[str, Any] = field(default_factory=dict)   # see `normalization_effect`
    new_samples: int = 0            # with a recorded split: samples that were not in it (they train)

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
            "audio_seconds": round(sum(s.code_count for s in kept) / CODES_PER_SECOND, 2),
            "max_tokens": int(lengths.max()),
            "token_percentiles": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)},
            "longest": {"source": longest.source, "tokens": longest.num_tokens} if longest else None,
            "speakers": self.speakers(),
            "speaker_ids": self.speaker_ids,
            "token_count_exact": self.token_count_exact,
            "token_count_note": None if self.token_count_exact else (
                "the model's tokenizer was not available: prompt lengths are conservative estimates "
                "(UTF-8 bytes of the text + 64 template tokens), never below the real count"),
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "text_normalization": self.text_normalization,
            "codec_problem": self.codec_problem,
            "new_samples": self.new_samples,
            "notes": self.notes,
        }


def speaker_seconds(samples: list[Sample]) -> dict[str, float]:
    """{speaker: seconds of audio}, most audio first; empty when the data names no speakers."""
    seconds: dict[str, float] = {}
    for s in samples:
        if s.speaker is not None and s.code_count:
            seconds[s.speaker] = seconds.get(s.speaker, 0.0) + s.code_count / CODES_PER_SECOND
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
    """The `autotune.layouts.Layout` of a folder or file; see that module for the rules."""
    from autotune.layouts import detect

    try:
        return detect(data)
    except (OSError, ValueError) as exc:  # e.g. a name over the file system's 255-byte limit, a NUL
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AutotuneError(f"cannot use data path `{clip_text(str(data))}` ({reason}): "
                            "pass the folder holding train.jsonl, a single .jsonl, or metadata.csv + wavs/") from None


def _read(reading, parts) -> list[Sample]:
    from autotune.corpora import read_part

    return [sample for part in parts for sample in read_part(part, reading)]


def _read_validation(eval_data: str | Path, like) -> list[Sample]:
    """`--val` (a folder or file of any layout, all of it validation), read with `like`'s
    errors and notes; its own folder is the one its paths must stay inside."""
    from autotune.corpora import Reading

    path = Path(eval_data)
    try:
        exists = path.exists()
    except OSError as exc:
        raise AutotuneError(f"cannot use validation data `{clip_text(str(path))}` ({exc.strerror or exc}): "
                            "check `--val` or `eval_data_dir`") from None
    if not exists:
        raise AutotuneError(f"validation data `{path}` does not exist: check `--val` or `eval_data_dir`")
    found = _find_layout(path)
    reading = Reading(like.errors, path if path.is_dir() else path.parent, like.allow_outside_paths,
                      like.ljspeech_column, like.notes)
    return _read(reading, found.train + ([found.val] if found.val else []))


# ------------------------------------------------------------------- audio ---

def _prepare_audio(report: DataReport, samples: list[Sample], errors: Errors, *, codec_loader, cache_dir,
                   max_length: int, progress: bool, codec_optional: bool) -> set[int]:
    """Hash, check and (when nothing else is wrong) encode every sample's audio; its problems
    join `errors` by the data line that names the file. Returns the ids of samples whose
    audio holds more speech than `max_length` tokens: those are listed as skipped, never
    encoded. Without a usable codec (`codec_optional`, --check-data) the files are still
    decoded, so the counts are exact; `report.codec_problem` says why there was no codec."""
    from autotune.codec import CodecLoadError
    from autotune.codec_cache import encode_files

    need = [s for s in samples if s.codes is None]
    if not need:
        return set()
    if codec_loader is None or cache_dir is None:   # a caller's mistake, not the user's
        if not errors.count:
            raise AutotuneError("the data needs audio encoding but no codec was given")
        return set()
    codec = None
    try:
        codec = codec_loader()
    except AutotuneError as exc:
        report.codec_problem, codec_error = exc.one_line(), exc
    # Past this many codes no prompt fits: such audio is never decoded further, nor encoded.
    cap_codes = min(max_length, MAX_CODES)
    cap_seconds = (cap_codes + 1) * HOP_LENGTH / SAMPLING_RATE
    paths = [s.audio for s in need]

    def run(encode: bool):
        return encode_files(paths, codec, cache_dir, progress=progress, max_seconds=cap_seconds,
                            encode=encode, collect_problems=True)
    try:
        result = run(encode=codec is not None and not errors.count)
    except CodecLoadError as exc:
        report.codec_problem, codec_error, codec = exc.one_line(), exc, None
        result = run(encode=False)
    report.encoded, report.from_cache = result.encoded, result.from_cache
    by_path: dict[Path, list[Sample]] = {}
    for s in need:
        by_path.setdefault(s.audio, []).append(s)
    for path, message in result.failed.items():
        lines = by_path[path]
        more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
        errors.add(lines[0].source, f"audio file `{path}`: {message.removeprefix(f'{path}: ')}{more}")
    too_long: set[int] = set()
    for s in need:
        clip = result.clips.get(s.audio)
        if clip is not None:
            s.audio_sha256, s.num_codes = clip.sha256, clip.num_codes
            if s.audio in result:
                s.codes = np.asarray(result[s.audio], dtype=np.int32)
        elif s.audio in result.too_long:
            too_long.add(id(s))
            report.skipped.append({
                "source": s.source, "tokens": None, "max_length": max_length,
                "seconds_at_least": round(result.too_long[s.audio], 2),
                "reason": f"audio `{s.audio}` decodes to more than the {cap_codes / CODES_PER_SECOND:,.1f} s of "
                          f"speech max_length {max_length} tokens hold: cut it into utterances"})
    if report.codec_problem is not None:
        if errors.count:
            errors.add("codec", report.codec_problem)
        elif not codec_optional:
            raise codec_error
        else:
            report.notes.append(f"codec: {report.codec_problem} (the data was checked without it: the audio was "
                                "decoded, so the lengths are exact; training needs it)")
    return too_long


# -------------------------------------------------------------- duplicates ---

def content_key(sample: Sample) -> str:
    """What makes two samples the same clip: the audio file's bytes, or the codes."""
    if sample.audio_sha256 is not None:
        return "audio:" + sample.audio_sha256
    if sample.codes is not None:
        return "codes:" + hashlib.sha256(np.asarray(sample.codes, dtype="<i4").tobytes()).hexdigest()
    return "source:" + sample.source   # audio not read (a problem was listed): unique


def sample_key(sample: Sample) -> str:
    """A short id of a sample's clip for the split record (split.json)."""
    return hashlib.sha256(content_key(sample).encode()).hexdigest()[:16]


def drop_duplicates(train: list[Sample], val: list[Sample],
                    duplicates: list[dict[str, Any]]) -> tuple[list[Sample], list[Sample]]:
    """Keep one sample per clip. Validation's are kept first (a validation file is the user's
    choice), then each first one in reading order; every copy left out is listed. So no copy
    is in both train and validation, and none is trained twice."""
    first: dict[str, Sample] = {}

    def keep(sample: Sample) -> bool:
        key = content_key(sample)
        original = first.setdefault(key, sample)
        if original is sample:
            return True
        same_text = original.text == sample.text
        duplicates.append({"source": sample.source, "duplicate_of": original.source,
                           "audio": str(sample.audio) if sample.audio else None, "same_text": same_text,
                           "reason": f"a copy of {original.source} (same {'audio' if sample.audio else 'codes'}"
                                     f"{'' if same_text else ', another transcript'})"})
        return False

    val = [s for s in val if keep(s)]
    return [s for s in train if keep(s)], val


# ---------------------------------------------------------------- speakers ---

_HASH_ID = re.compile(r"[0-9a-fA-F]{32,}")
SPEAKER_ALIAS_DIGITS = 8


def shorten_speaker_ids(samples: list[Sample]) -> dict[str, str]:
    """Speakers named by a long hash (Common Voice's `client_id`: 64 or more hex digits) are
    renamed to their first `SPEAKER_ALIAS_DIGITS` digits, or as many more as keep them apart
    (and apart from the other names): the name prompts carry and `--speaker` takes. Returns
    {alias: full id}."""
    ids = sorted({s.speaker for s in samples if s.speaker and _HASH_ID.fullmatch(s.speaker)})
    if not ids:
        return {}
    others = {s.speaker for s in samples if s.speaker} - set(ids)
    digits = SPEAKER_ALIAS_DIGITS
    while len({i[:digits] for i in ids}) < len(ids) or others & {i[:digits] for i in ids}:
        digits += 2
    aliases = {i: i[:digits] for i in ids}
    for s in samples:
        if s.speaker in aliases:
            s.speaker = aliases[s.speaker]
    return {alias: full for full, alias in aliases.items()}


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


def split_as_recorded(samples: list[Sample], recorded: dict[str, Any]) -> tuple[list[Sample], list[Sample], int]:
    """The split a run started with (`split_record`, its split.json), on the data as it is now:
    the recorded validation samples in validation, every other sample in training. -> (train,
    val, how many samples were not in the record). A recorded sample that is gone is an error:
    the run cannot go on as it began."""
    keys = {sample_key(s): s for s in samples}
    val_keys = recorded.get("val_keys")
    if not isinstance(val_keys, list):   # a record from before keys: by `path:line`
        by_source = {s.source: s for s in samples}
        val_sources = [v for v in recorded.get("val", []) if isinstance(v, str)]
        gone = [v for v in val_sources if v not in by_source]
        val_keys = [sample_key(by_source[v]) for v in val_sources if v in by_source]
    else:
        sources = recorded.get("val") if isinstance(recorded.get("val"), list) else []
        gone = [sources[i] if i < len(sources) else k for i, k in enumerate(val_keys) if k not in keys]
    train_keys = recorded.get("train_keys") if isinstance(recorded.get("train_keys"), list) else None
    gone_train = [k for k in train_keys or [] if k not in keys]
    if gone or gone_train:
        parts = ([f"{len(gone)} validation sample{'s' if len(gone) > 1 else ''} (e.g. {gone[0]})"] if gone else []) \
            + ([f"{len(gone_train)} training sample{'s' if len(gone_train) > 1 else ''}"] if gone_train else [])
        raise AutotuneError(f"the data no longer holds {' and '.join(parts)} of the split the run started with "
                            "(split.json): put them back to resume, or start a new `--output-dir`")
    wanted = set(val_keys)
    val = [s for s in samples if sample_key(s) in wanted]
    train = [s for s in samples if sample_key(s) not in wanted]
    known = set(train_keys) if train_keys is not None else None
    new = (sum(sample_key(s) not in known for s in train) if known is not None
           else max(0, len(train) - int(recorded.get("train_count") or 0)))
    return train, val, new


# ---------------------------------------------------------------- lengths ---

def measure(samples: list[Sample], prompt_builder=None, text_normalization: str = "none") -> None:
    """Fill `num_tokens` = prompt + speech codes + END. Without a tokenizer, a
    conservative estimate (UTF-8 bytes of the normalised text + template upper bound)."""
    from autotune.llasa import ESTIMATED_TEMPLATE_TOKENS, estimate_text_tokens
    from autotune.textnorm import normalize

    if prompt_builder is None:
        for s in samples:
            text = normalize(s.text, text_normalization)
            s.num_tokens = ESTIMATED_TEMPLATE_TOKENS + estimate_text_tokens(text) + s.code_count + 1
        return
    # The ids are kept: the dry run and the training build their examples without tokenizing again.
    lengths = prompt_builder.keep_text_ids([s.text for s in samples])
    for s, n in zip(samples, lengths):
        s.num_tokens = prompt_builder.overhead_for(s.prompt_speaker) + n + s.code_count + 1


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


# ------------------------------------------------------------ normalisation ---

def normalization_effect(samples: list[Sample], mode: str, examples: int = 2) -> dict[str, Any]:
    """What `data.text_normalization` does to these transcripts: how many it changes, and
    the first `examples` of them (before -> after)."""
    from autotune.textnorm import normalize

    changed, shown = 0, []
    for s in samples:
        after = normalize(s.text, mode)
        if after != s.text:
            changed += 1
            if len(shown) < examples:
                shown.append({"source": s.source, "before": clip_text(s.text, 80), "after": clip_text(after, 80)})
    return {"mode": mode, "changed": changed, "transcripts": len(samples), "examples": shown}


def _normalization_note(effect: dict[str, Any]) -> str:
    head = f"text normalisation `{effect['mode']}`"
    if effect["mode"] == "none":
        return f"{head}: transcripts are used as written"
    shown = "; ".join(f"`{e['before']}` -> `{e['after']}`" for e in effect["examples"])
    return (f"{head}: changes {effect['changed']} of {effect['transcripts']} transcripts"
            + (f", e.g. {shown}" if shown else ""))


# --------------------------------------------------------------- pipeline ---

def load_dataset(data: str | Path, *, max_length: int, val_fraction: float, split_seed: int,
                 eval_data: str | Path | None = None, prompt_builder=None,
                 codec_loader: Callable[[], Any] | None = None, cache_dir: Path | None = None,
                 max_errors_shown: int = 50, progress: bool = True,
                 allow_outside_paths: bool = False, text_normalization: str = "none",
                 ljspeech_column: str = "raw", codec_optional: bool = False,
                 recorded_split: dict[str, Any] | None = None) -> DataReport:
    """Read, validate, check and encode audio, drop copies, measure, skip over-long samples, split.

    Paths must lie inside the folder given (a file's own folder for a file) unless
    `allow_outside_paths`. Every problem is raised at once, in one `AutotuneError`.
    `codec_optional` (--check-data): without a usable codec the data is still checked in
    full and `DataReport.codec_problem` says why. `recorded_split` (a run's split.json, on
    `--resume`): validation is what it was, new samples train (`DataReport.new_samples`).
    """
    from autotune.corpora import Reading
    from autotune.layouts import HINTS

    data = Path(data)
    found = _find_layout(data)
    errors = Errors(max_errors_shown)
    reading = Reading(errors, data if data.is_dir() else data.parent, allow_outside_paths, ljspeech_column)
    train = _read(reading, found.train)
    val: list[Sample] = []
    val_source = ""
    if eval_data is not None:
        val, val_source = _read_validation(eval_data, reading), "eval_data_dir"
    elif found.val is not None:
        val, val_source = _read(reading, [found.val]), "file"

    report = DataReport(train=train, val=val, layout=found.name, val_source=val_source,
                        token_count_exact=prompt_builder is not None, notes=reading.notes)
    too_long = _prepare_audio(report, train + val, errors, codec_loader=codec_loader, cache_dir=cache_dir,
                              max_length=max_length, progress=progress, codec_optional=codec_optional)
    errors.raise_if_any()
    train, val = drop_duplicates([s for s in train if id(s) not in too_long],
                                 [s for s in val if id(s) not in too_long], report.duplicates)
    if report.duplicates:
        first = report.duplicates[0]
        report.notes.append(f"{len(report.duplicates)} duplicate clip{'s' if len(report.duplicates) > 1 else ''} "
                            f"left out, each kept once (e.g. {first['source']} is {first['reason']})")
    report.speaker_ids = shorten_speaker_ids(train + val)
    if report.speaker_ids:
        report.notes.append(f"speakers named by a long id are called by its first {len(next(iter(report.speaker_ids)))} "
                            "digits (in prompts and `--speaker`; `speaker_ids` in --json maps them back)")
    report.text_normalization = normalization_effect(train + val, text_normalization)
    report.notes.append(_normalization_note(report.text_normalization))

    # Whether prompts name the speaker is decided before lengths are counted: the name is prompt.
    report.speaker_conditioning = conditioned_on_speakers(speaker_seconds(train + val))
    for sample in train + val:
        sample.prompt_speaker = sample.speaker if report.speaker_conditioning else None
    for part in (train, val):
        measure(part, prompt_builder, text_normalization)
    report.train = drop_too_long(train, max_length, report.skipped)
    report.val = drop_too_long(val, max_length, report.skipped)
    hint = HINTS.get(found.train[0].kind, HINTS["jsonl"])
    if not report.train and not report.val:
        if report.skipped:
            raise AutotuneError(f"every sample is longer than max_length {max_length} tokens "
                                f"({len(report.skipped)} skipped): raise `--set data.max_length=...` or split long clips")
        raise AutotuneError(f"`{data}` holds no samples: {hint}")
    if not val_source and recorded_split is not None:
        report.train, report.val, report.new_samples = split_as_recorded(report.train, recorded_split)
        report.val_source = "recorded"
        report.notes.append(f"validation is the {len(report.val)} samples split.json recorded; "
                            f"{report.new_samples} sample{'s' if report.new_samples != 1 else ''} new since then "
                            "train")
    elif not val_source:
        report.train, report.val = split(report.train, val_fraction, split_seed)
        report.val_source = "split"
    if not report.train:
        if train:
            raise AutotuneError("no training samples are left after skipping over-long ones: "
                                f"raise `--set data.max_length=...` (now {max_length})")
        names = ", ".join(f"`{part.path}`" for part in found.train)
        raise AutotuneError(f"the training data {names} holds no samples (only the validation set has some): {hint}")
    return report


def split_record(report: DataReport) -> dict[str, Any]:
    """Which samples went where, saved in the output folder (split.json). The keys name each
    clip by its content (`sample_key`), so `split_as_recorded` finds them again when lines
    moved or the data grew."""
    return {"val_source": report.val_source, "val": [s.source for s in report.val],
            "val_keys": [sample_key(s) for s in report.val], "train_keys": [sample_key(s) for s in report.train],
            "train_count": len(report.train), "skipped": report.skipped, "duplicates": report.duplicates}
