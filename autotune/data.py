"""Llasa data: read, validate, split, encode audio, build training samples.

Accepted layouts for `--data DIR`:
  (a) DIR/train.jsonl [+ DIR/val.jsonl]
  (b) DIR holding a single JSONL file (e.g. all_data.jsonl), or the file itself
  (c) LJSpeech style: DIR/metadata.csv (`id|text` or `id|text|normalized`) + DIR/wavs/
A JSONL line is `{"text": ..., "code"|"codes": [int, ...]}` or `{"text": ..., "audio": "rel/path.wav"}`,
with an optional `speaker`.
"""

from __future__ import annotations

import json
import math
import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autotune.errors import AutotuneError

MAX_CODE = 65535
CODES_PER_SECOND = 50


@dataclass
class Sample:
    text: str
    source: str                     # "path:line", for messages and the split record
    codes: np.ndarray | None = None  # int32 speech codes; None until audio is encoded
    audio: Path | None = None
    speaker: str | None = None
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
            "token_count_exact": self.token_count_exact,
            "token_count_note": None if self.token_count_exact else (
                "the model's tokenizer was not available: prompt lengths are conservative estimates "
                "(UTF-8 bytes of the text + 64 template tokens), never below the real count"),
            "skipped": self.skipped,
        }


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
    """-> (layout, training files, validation file or None)."""
    try:
        return _find_layout(data)
    except OSError as exc:  # e.g. a name over the file system's 255-byte limit
        raise AutotuneError(f"cannot use data path `{_clip(str(data))}` ({exc.strerror or exc}): "
                            "pass the folder holding train.jsonl, a single .jsonl, or metadata.csv + wavs/") from None


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _find_layout(data: Path) -> tuple[str, list[Path], Path | None]:
    if not data.exists():
        raise AutotuneError(f"data path `{data}` does not exist: pass the folder holding train.jsonl, "
                            "a single .jsonl, or metadata.csv + wavs/")
    if data.is_file():
        if data.suffix.lower() in (".jsonl", ".json"):
            return "jsonl", [data], None
        if data.name == "metadata.csv":
            return "ljspeech", [data], None
        raise AutotuneError(f"`{data}` is not a .jsonl file or metadata.csv: pass the data folder instead")
    if (data / "train.jsonl").is_file():
        val = data / "val.jsonl"
        return "train+val" if val.is_file() else "train", [data / "train.jsonl"], val if val.is_file() else None
    if (data / "metadata.csv").is_file():
        return "ljspeech", [data / "metadata.csv"], None
    files = sorted(p for p in data.glob("*.jsonl") if p.is_file())
    if len(files) == 1:
        return "single-jsonl", files, None
    if not files:
        raise AutotuneError(f"`{data}` holds no train.jsonl, no .jsonl file and no metadata.csv: "
                            "see README for the accepted layouts")
    names = ", ".join(p.name for p in files[:5])
    raise AutotuneError(f"`{data}` holds several .jsonl files ({names}) and no train.jsonl: "
                        "name the training file train.jsonl (and validation val.jsonl), or pass one file")


def _require_utf8(path: Path, raw: bytes) -> None:
    """A whole file in another encoding is one error, not one per line. UTF-16 (Windows
    "Unicode") is told by its byte-order mark or its NUL bytes; Shift_JIS (CP932), common
    for Japanese transcripts, when the file is not UTF-8 but decodes as CP932. Anything
    else returns, for the line-by-line checks to list."""
    head = raw[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(b"\x00") > len(head) // 4:
        name, iconv = "UTF-16", "UTF-16"
    else:
        try:
            raw.decode("utf-8")
            return
        except UnicodeDecodeError:
            pass
        if any(not line.isascii() and _is_utf8(line) for line in raw.split(b"\n")):
            return   # UTF-8 with some bad lines: those are listed one by one
        try:
            text = raw.decode("cp932")
        except UnicodeDecodeError:
            return
        # CP932 decodes almost any bytes (accented Latin-1 pairs become kanji): real
        # Japanese text has kana, and no private-use characters (what 0xFF becomes).
        if any("\ue000" <= ch <= "\uf8ff" for ch in text) or not any("\u3040" <= ch <= "\u30ff" for ch in text):
            return
        name, iconv = "Shift_JIS (CP932)", "CP932"
    raise AutotuneError(f"`{path}` looks like {name} text, not UTF-8: convert it, e.g. "
                        f"`iconv -f {iconv} -t UTF-8 {shlex.quote(str(path))} > utf8{path.suffix}`, "
                        "and use the converted file")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_jsonl(path: Path, errors: _Errors) -> list[Sample]:
    samples: list[Sample] = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AutotuneError(f"cannot read `{path}` ({exc.strerror or exc}): check permissions") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a BOM from Windows editors is not part of the JSON
    _require_utf8(path, raw)
    for number, line in enumerate(raw.split(b"\n"), start=1):
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
        sample = _parse_item(item, where, path.parent, errors, check_bools=b"true" in line or b"false" in line)
        if sample is not None:
            samples.append(sample)
    return samples


def _parse_item(item: Any, where: str, base: Path, errors: _Errors, check_bools: bool) -> Sample | None:
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
    if not text.strip():
        errors.add(where, "empty `text`")
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
            errors.add(where, f"`text` is not valid Unicode (unpaired surrogate {ascii(text[exc.start])} "
                              f"at character {exc.start})")
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
    problem = check_audio_file(path)
    if problem:
        errors.add(where, problem)
        return None
    return Sample(text=text, source=where, audio=path, speaker=None if speaker is None else str(speaker))


def _parse_codes(value: Any, key: str, where: str, errors: _Errors, check_bools: bool) -> np.ndarray | None:
    if not isinstance(value, list):
        errors.add(where, f"`{key}` must be a list of integers, got {type(value).__name__}")
        return None
    if not value:
        errors.add(where, f"`{key}` is empty")
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


def check_audio_file(path: Path) -> str | None:
    """A cheap header read; the codec reads the samples later."""
    try:
        if not path.is_file():
            return f"audio file `{path}` is missing"
    except OSError as exc:  # e.g. a name over the file system's 255-byte limit
        return f"audio path `{_clip(str(path))}` is unusable ({exc.strerror or exc})"
    try:
        import soundfile

        info = soundfile.info(str(path))
    except Exception as exc:  # soundfile raises its own LibsndfileError and RuntimeError
        reason = " ".join(str(exc).split()).replace(f"Error opening {str(path)!r}: ", "")  # the path is said once
        return f"audio file `{path}` is unreadable ({reason[:80]})"
    if info.frames <= 0:
        return f"audio file `{path}` is empty"
    return None


def read_ljspeech(path: Path, errors: _Errors) -> list[Sample]:
    samples = []
    wavs = path.parent / "wavs"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AutotuneError(f"cannot read `{path}` ({exc.strerror or exc}): check permissions") from None
    _require_utf8(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AutotuneError(f"cannot read `{path}` as UTF-8 ({exc}): save metadata.csv as UTF-8") from None
    # Split on "\n" only: `splitlines` would also break a transcript at U+2028,
    # U+0085 or a form feed and shift every later line number.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip():
            errors.add(where, "expected `id|text`")
            continue
        # LJSpeech's third column is the normalised transcript (numbers spelled out).
        transcript = parts[2] if len(parts) > 2 and parts[2].strip() else parts[1]
        if not transcript.strip():
            errors.add(where, "empty text")
            continue
        audio = wavs / f"{parts[0].strip()}.wav"
        problem = check_audio_file(audio)
        if problem:
            errors.add(where, problem)
            continue
        samples.append(Sample(text=transcript, source=where, audio=audio))
    return samples


def read_any(path: Path, errors: _Errors) -> list[Sample]:
    if path.is_dir():
        _, files, val = find_layout(path)
        out = []
        for f in files + ([val] if val else []):
            out += read_any(f, errors)
        return out
    if path.name == "metadata.csv":
        return read_ljspeech(path, errors)
    return read_jsonl(path, errors)


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
    overhead = prompt_builder.overhead
    for s, n in zip(samples, lengths):
        s.num_tokens = overhead + n + len(s.codes) + 1


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
                 max_errors_shown: int = 50, progress: bool = True) -> DataReport:
    """Read, validate, encode audio, measure, skip over-long samples, split."""
    data = Path(data)
    layout, files, val_file = find_layout(data)
    errors = _Errors(max_errors_shown)
    train: list[Sample] = []
    for f in files:
        train += read_any(f, errors)
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
        val = read_any(eval_path, errors)
        val_source = "eval_data_dir"
    elif val_file is not None:
        val = read_jsonl(val_file, errors)
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
    Labels are -100 over the prompt; the loss covers the speech ids and END."""
    tokens = prompt_builder.tokens
    ids = text_ids if text_ids is not None else prompt_builder.text_ids([sample.text])[0]
    prompt = prompt_builder.prefix_ids + ids + prompt_builder.suffix_ids
    speech = (sample.codes.astype(np.int64) + tokens.speech_offset).tolist() + [tokens.speech_end]
    return {"input_ids": prompt + speech, "labels": [-100] * len(prompt) + speech}


def build_examples(samples: list[Sample], prompt_builder) -> list[dict[str, list[int]]]:
    text_ids = prompt_builder.text_ids([s.text for s in samples])
    return [build_example(s, prompt_builder, ids) for s, ids in zip(samples, text_ids)]


class LlasaCollator:
    """Right-pads to a multiple of 8; padding is masked in labels and attention."""

    def __init__(self, pad_id: int, multiple_of: int = 8):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = int(math.ceil(longest / self.multiple_of) * self.multiple_of)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[i, :length] = torch.as_tensor(f["input_ids"])
            labels[i, :length] = torch.as_tensor(f["labels"])
            attention[i, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class PackedCollator:
    """Padding-free batches: concatenates samples into one row with position ids
    restarting at each sample. transformers builds a block-diagonal mask from
    the position ids when there is no attention mask and no cache (training with
    `use_cache=False`), so attention does not cross samples; a test checks it."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features], return_tensors="pt")


def make_collator(pad_id: int, packing: bool):
    """Padded rows (multiple of 8), or padding-free packed rows with `data.packing`."""
    return PackedCollator() if packing else LlasaCollator(pad_id)
