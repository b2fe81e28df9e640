"""Corpus layouts: which one a folder (or transcript file) is, and a reader for each.

A folder, first match wins (the name in brackets is `DataReport.layout`):
  1. train.jsonl [+ val.jsonl]                                  [train | train+val]
  2. metadata.csv: a CSV header with `file_name`                [audiofolder]
                   else `id|text[|normalized]` lines + wavs/    [ljspeech]
  3. metadata.jsonl (`file_name`, `transcription`)              [audiofolder]
  4. transcript_utf8.txt (`ID:text`) + wav/                     [jsut]
     transcripts_utf8.txt + wav24kHz16bit/ (one JVS subset)     [jvs]
  5. validated.tsv, else train.tsv [+ dev.tsv]; + clips/        [common-voice]
  6. esd.list, else train.list [+ val.list], else one *.list    [esd-list]
  7. one *.jsonl                                                [single-jsonl]
  8. train/metadata.csv|jsonl [+ validation/, valid/ or dev/]   [audiofolder]
     jvsNNN/<subset>/transcripts_utf8.txt (the JVS root), or
     <subset>/transcripts_utf8.txt (one JVS speaker)            [jvs]
     <subcorpus>/transcript_utf8.txt + wav/ (the JSUT root)     [jsut]
  9. audio files with a same-named .txt or .lab, at any depth   [audio+txt]
Otherwise one error names the closest layout and what it lacks.

A file given as `--data` is read by its suffix, not its exact name, so a
converted copy such as `metadata.utf8.csv` (what the encoding hint writes) reads
as the original: .jsonl/.json (`metadata*.jsonl` as audiofolder), .csv
(audiofolder when its header has `file_name`, else LJSpeech with wavs/ beside
it), .tsv (Common Voice, clips/ beside it), .list (Style-Bert-VITS2) and .txt
(JSUT/JVS `ID:text`, wav/ or wav24kHz16bit/ beside it).

Audio. LJSpeech, JSUT and JVS name clips by id: any extension soundfile reads is
found (ID.wav first). Common Voice's `path` is in clips/; audiofolder's
`file_name` is relative to its metadata file. A `*.list` path is tried as
written (relative to the list's folder), then by its file name in wavs/, raw/
and the list's own folder: Style-Bert-VITS2 writes bare names,
`Data/<model>/wavs/x.wav`, or absolute paths from the machine (even Windows)
that made the list. Every path must stay inside the data folder unless
`allow_outside_paths` (see `autotune.data.check_audio_file`).

Speakers: Common Voice `client_id`, the `*.list` speaker column, the JVS
`jvsNNN` folder, an audiofolder `speaker` column. Real JVS also has whisper10/
and falset10/ subsets; they are read like the others.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Callable, Iterator

from autotune.reading import (
    MAX_LINE_BYTES,
    MAX_TEXT_BYTES,
    Sample,
    _Errors,
    _mb,
    _outside_problem,
    _require_utf8,
    check_audio_file,
    open_regular,
    read_jsonl,
    read_lines,
    text_problem,
)
from autotune.errors import AutotuneError

# What libsndfile reads; the order is the preference when one id has several.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".oga", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf",
                    ".w64", ".rf64")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")
_HELP = "see README for the accepted layouts"


@dataclass(frozen=True)
class Part:
    """One transcript file (for audio+txt, the folder) and the reader it needs."""
    path: Path
    kind: str


@dataclass
class Layout:
    name: str
    train: list[Part]
    val: Part | None = None


# ---------------------------------------------------------------- detection ---

def detect(data: Path) -> Layout:
    if not data.exists():
        raise AutotuneError(f"data path `{data}` does not exist: pass the folder holding train.jsonl, "
                            "a single .jsonl, metadata.csv + wavs/, or another corpus folder (see README)")
    return _detect_folder(data) if data.is_dir() else _detect_file(data)


def _detect_file(path: Path) -> Layout:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if path.name.lower().startswith("metadata"):
            return Layout("audiofolder", [Part(path, "audiofolder-jsonl")])
        return Layout("jsonl", [Part(path, "jsonl")])
    if suffix == ".csv":
        if _csv_header(path) is not None:
            return Layout("audiofolder", [Part(path, "audiofolder-csv")])
        _require_folder(path.parent / "wavs", "LJSpeech", path.name)
        return Layout("ljspeech", [Part(path, "ljspeech")])
    if suffix == ".tsv":
        _require_folder(path.parent / "clips", "Common Voice", path.name)
        return Layout("common-voice", [Part(path, "common-voice")])
    if suffix == ".list":
        return Layout("esd-list", [Part(path, "esd-list")])
    if suffix == ".txt":
        if _id_audio_folder(path.parent) is None:
            raise AutotuneError(f"`{path}` is not a .jsonl file or metadata.csv, and no wav/ or wav24kHz16bit/ "
                                "folder is beside it as for a JSUT or JVS transcript: pass the data folder instead")
        return Layout("jvs" if _is_jvs(path) else "jsut", [Part(path, "id-text")])
    raise AutotuneError(f"`{path}` is not a .jsonl file or metadata.csv, nor another transcript file we read "
                        "(.csv, .tsv, .list, .txt): pass the data folder instead")


def _detect_folder(d: Path) -> Layout:
    if (d / "train.jsonl").exists():
        train, val = Part(d / "train.jsonl", "jsonl"), d / "val.jsonl"
        return Layout("train+val", [train], Part(val, "jsonl")) if val.exists() else Layout("train", [train])
    if (d / "metadata.csv").exists():
        return _detect_file(d / "metadata.csv")
    if (d / "metadata.jsonl").exists():
        return _detect_file(d / "metadata.jsonl")
    if (d / "transcript_utf8.txt").exists():
        _require_folder(d / "wav", "JSUT", "transcript_utf8.txt")
        return Layout("jsut", [Part(d / "transcript_utf8.txt", "id-text")])
    if (d / "transcripts_utf8.txt").exists():
        _require_folder(d / "wav24kHz16bit", "JVS", "transcripts_utf8.txt")
        return Layout("jvs", [Part(d / "transcripts_utf8.txt", "id-text")])
    for name in ("validated.tsv", "train.tsv"):
        if (d / name).exists():
            _require_folder(d / "clips", "Common Voice", name)
            dev = d / "dev.tsv"
            # validated.tsv holds dev.tsv's clips too: with it, the split is ours.
            val = Part(dev, "common-voice") if name == "train.tsv" and dev.exists() else None
            return Layout("common-voice", [Part(d / name, "common-voice")], val)
    # Not only regular files: a FIFO named esd.list is then refused by name, not skipped.
    lists = {p.name: p for p in sorted(d.glob("*.list")) if not p.is_dir()}
    if lists:
        if "esd.list" in lists:
            return Layout("esd-list", [Part(lists["esd.list"], "esd-list")])
        if "train.list" in lists:
            val = Part(lists["val.list"], "esd-list") if "val.list" in lists else None
            return Layout("esd-list", [Part(lists["train.list"], "esd-list")], val)
        if len(lists) == 1:
            return Layout("esd-list", [Part(next(iter(lists.values())), "esd-list")])
        raise AutotuneError(f"`{d}` holds several .list files ({', '.join(list(lists)[:5])}) and no esd.list: "
                            "pass one of them with `--data`")
    files = sorted(p for p in d.glob("*.jsonl") if not p.is_dir())
    if len(files) == 1:
        return Layout("single-jsonl", [Part(files[0], "jsonl")])
    if files:
        names = ", ".join(p.name for p in files[:5])
        raise AutotuneError(f"`{d}` holds several .jsonl files ({names}) and no train.jsonl: "
                            "name the training file train.jsonl (and validation val.jsonl), or pass one file")
    split = _audiofolder_splits(d)
    if split is not None:
        return split
    jvs = sorted(d.glob("jvs*/*/transcripts_utf8.txt")) or sorted(d.glob("*/transcripts_utf8.txt"))
    if jvs:
        return Layout("jvs", [Part(t, "id-text") for t in jvs])
    jsut = sorted(t for t in d.glob("*/transcript_utf8.txt") if (t.parent / "wav").is_dir())
    if jsut:
        return Layout("jsut", [Part(t, "id-text") for t in jsut])
    clips = _scan_audio(d)
    if any(transcript for _, transcript in clips):
        return Layout("audio+txt", [Part(d, "audio+txt")])
    raise AutotuneError(_closest_layout(d, clips))


def _audiofolder_splits(d: Path) -> Layout | None:
    """audiofolder with split folders: train/metadata.csv (or .jsonl), validation from
    validation/, valid/ or dev/ (test/ stays held out)."""
    def metadata(folder: Path) -> Path | None:
        return next((folder / n for n in ("metadata.csv", "metadata.jsonl") if (folder / n).exists()), None)

    train = metadata(d / "train")
    if train is None:
        return None
    val = next((m for m in map(metadata, (d / "validation", d / "valid", d / "dev")) if m is not None), None)
    return Layout("audiofolder", _detect_file(train).train, _detect_file(val).train[0] if val else None)


def _require_folder(folder: Path, name: str, found: str) -> None:
    if not folder.is_dir():
        raise AutotuneError(f"`{folder.parent}` looks like {name} ({found} found) but {folder.name}/ is missing: "
                            f"put the audio in `{folder}`")


def _closest_layout(d: Path, clips: list[tuple[Path, Path | None]]) -> str:
    """One line naming the layout the folder most resembles and what it lacks."""
    for folder, name, missing in (("wav", "JSUT", "transcript_utf8.txt"),
                                  ("wav24kHz16bit", "JVS", "transcripts_utf8.txt"),
                                  ("clips", "Common Voice", "validated.tsv (or train.tsv)"),
                                  ("wavs", "LJSpeech or Style-Bert-VITS2", "metadata.csv (or esd.list)"),
                                  ("raw", "Style-Bert-VITS2", "esd.list")):
        if (d / folder).is_dir():
            return f"`{d}` looks like {name} ({folder}/ found) but {missing} is missing: add it, or {_HELP}"
    for name in ("dev.tsv", "test.tsv", "other.tsv", "invalidated.tsv"):
        if (d / name).exists():
            return (f"`{d}` looks like Common Voice ({name} found) but validated.tsv (or train.tsv) is missing: "
                    f"add it, or pass `{d / name}` with `--data`")
    speakers = sorted(p.name for p in d.glob("jvs[0-9]*") if p.is_dir())
    if speakers:
        return (f"`{d}` looks like JVS ({speakers[0]}/ found) but no {speakers[0]}/<subset>/transcripts_utf8.txt "
                f"is there: add the transcripts, or {_HELP}")
    if clips:
        example = clips[0][0]
        return (f"`{d}` holds {len(clips)} audio file{'s' if len(clips) > 1 else ''} (e.g. `{example}`) but no "
                f"same-named .txt or .lab transcript (`{example.with_suffix('.txt').name}`): add them, or {_HELP}")
    return (f"`{d}` holds no train.jsonl, no .jsonl file and no metadata.csv, nor another known layout "
            f"(JSUT, JVS, Common Voice, audiofolder, *.list, audio with .txt): {_HELP}")


def _id_audio_folder(d: Path) -> Path | None:
    return next((d / name for name in ("wav", "wav24kHz16bit") if (d / name).is_dir()), None)


def _jvs_speaker(transcript: Path) -> str | None:
    """jvs001/parallel100/transcripts_utf8.txt -> "jvs001"."""
    speaker = transcript.parent.parent.name
    return speaker if re.fullmatch(r"jvs\d+", speaker) else None


def _is_jvs(transcript: Path) -> bool:
    return (transcript.name == "transcripts_utf8.txt" or (transcript.parent / "wav24kHz16bit").is_dir()
            or _jvs_speaker(transcript) is not None)


# ------------------------------------------------------------------ readers ---

@dataclass
class _Reading:
    errors: _Errors
    root: Path
    allow_outside_paths: bool

    def sample(self, where: str, text: str, audio: Path, speaker: str | None = None, text_name: str = "text",
               on_missing: str = "") -> Sample | None:
        problem = text_problem(text, text_name) or check_audio_file(audio, self.root, self.allow_outside_paths)
        if problem:
            self.errors.add(where, problem + (on_missing if problem.endswith("is missing") else ""))
            return None
        return Sample(text=text, source=where, audio=audio, speaker=speaker or None)

    def lines(self, path: Path) -> Iterator[tuple[str, str]]:
        """(where, line) for each non-blank UTF-8 line; other lines are reported."""
        for number, raw in read_lines(path, MAX_LINE_BYTES, self.errors):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.errors.add(where, f"not UTF-8 (byte {exc.start})")
                continue
            if line.strip():
                yield where, line


def read_part(part: Part, errors: _Errors, *, root: Path, allow_outside_paths: bool = False) -> list[Sample]:
    """The samples of one part; problems go to `errors` by position. `root` is the data
    folder that audio must stay inside."""
    reading = _Reading(errors, root, allow_outside_paths)
    if part.kind in ("jsonl", "audiofolder-jsonl"):
        return read_jsonl(part.path, errors, root=root, allow_outside_paths=allow_outside_paths,
                          aliases=part.kind == "audiofolder-jsonl")
    return _READERS[part.kind](part.path, reading)


class _ClipFolder:
    """Clips named by id in one folder, with any extension soundfile reads (ID.wav
    first). The folder is listed once, not probed once per extension per line."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._names: dict[str, str] | None = None

    def find(self, clip_id: str) -> Path:
        if self._names is None:
            self._names = self._index()
        name = self._names.get(clip_id)
        if name is None and ("/" in clip_id or os.sep in clip_id):  # an id with a subfolder: probe
            name = next((clip_id + ext for ext in AUDIO_EXTENSIONS if _lexists(self.folder / (clip_id + ext))), None)
        # Not there: the message names the usual file.
        return self.folder / (name or f"{clip_id}.wav")

    def _index(self) -> dict[str, str]:
        try:
            names = sorted(entry.name for entry in os.scandir(self.folder))
        except OSError:
            return {}
        rank = {ext: i for i, ext in enumerate(AUDIO_EXTENSIONS)}
        best: dict[str, tuple[int, str]] = {}
        for name in names:
            stem, ext = os.path.splitext(name)
            order = rank.get(ext.lower())
            if order is None or name.startswith("."):   # ._x.wav: macOS metadata, not audio
                continue
            if stem not in best or order < best[stem][0]:
                best[stem] = (order, name)
            best[name] = (-1, name)   # an id written with its extension
        return {key: name for key, (_, name) in best.items()}


def _lexists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except ValueError:  # a NUL byte
        return False


def read_ljspeech(path: Path, reading: _Reading) -> list[Sample]:
    samples = []
    clips = _ClipFolder(path.parent / "wavs")
    for where, line in reading.lines(path):
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip():
            reading.errors.add(where, "expected `id|text`")
            continue
        # LJSpeech's third column is the normalised transcript (numbers spelled out).
        transcript = parts[2] if len(parts) > 2 and parts[2].strip() else parts[1]
        sample = reading.sample(where, transcript, clips.find(parts[0].strip()))
        if sample is not None:
            samples.append(sample)
    return samples


def read_id_text(path: Path, reading: _Reading) -> list[Sample]:
    """JSUT and JVS: `ID:text` lines, audio in wav/ (JSUT) or wav24kHz16bit/ (JVS)."""
    folder = _id_audio_folder(path.parent)
    if folder is None:
        reading.errors.add(str(path), "no wav/ or wav24kHz16bit/ folder beside this transcript")
        return []
    clips, speaker, samples = _ClipFolder(folder), _jvs_speaker(path), []
    for where, line in reading.lines(path):
        clip_id, colon, text = line.partition(":")
        if not colon or not clip_id.strip():
            reading.errors.add(where, "expected `ID:text`")
            continue
        sample = reading.sample(where, text, clips.find(clip_id.strip()), speaker)
        if sample is not None:
            samples.append(sample)
    return samples


def read_common_voice(path: Path, reading: _Reading) -> list[Sample]:
    """A Common Voice .tsv: a header naming `client_id`, `path`, `sentence`, ...; tabs
    only (Common Voice writes no quoting, and sentences may hold quote marks)."""
    lines = reading.lines(path)
    first = next(lines, None)
    if first is None:
        return []
    header = [name.strip() for name in first[1].split("\t")]
    if "path" not in header or "sentence" not in header:
        raise AutotuneError(f"`{path}` has no `path` and `sentence` columns in its first line, as Common Voice's "
                            f".tsv files have (found {', '.join(header[:6])[:80]}): check the file")
    path_col, text_col = header.index("path"), header.index("sentence")
    speaker_col = header.index("client_id") if "client_id" in header else None
    clips, samples = path.parent / "clips", []
    for where, line in lines:
        fields = line.split("\t")
        if len(fields) <= max(path_col, text_col):
            reading.errors.add(where, f"expected {len(header)} tab-separated columns, found {len(fields)}")
            continue
        name = fields[path_col].strip()
        if not name:
            reading.errors.add(where, "empty `path`")
            continue
        speaker = fields[speaker_col].strip() if speaker_col is not None and speaker_col < len(fields) else None
        sample = reading.sample(where, fields[text_col], clips / name, speaker, text_name="`sentence`")
        if sample is not None:
            samples.append(sample)
    return samples


_TEXT_COLUMNS = ("transcription", "text", "sentence")


def _csv_header(path: Path) -> list[str] | None:
    """The audiofolder header (a first line naming `file_name`), or None."""
    with open_regular(path) as handle:
        first = handle.readline(64 * 1024)
    try:
        header = next(csv.reader([first.decode("utf-8-sig", "replace")]), [])
    except csv.Error:
        return None
    header = [name.strip() for name in header]
    return header if "file_name" in header else None


def read_audiofolder_csv(path: Path, reading: _Reading) -> list[Sample]:
    """Hugging Face audiofolder's metadata.csv: real CSV (quoted fields may hold commas
    and line breaks), a header with `file_name` and the transcript column."""
    starts: list[int] = []   # line numbers of the record being parsed

    def feed() -> Iterator[str]:
        for number, raw in read_lines(path, MAX_LINE_BYTES, reading.errors):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reading.errors.add(f"{path}:{number}", f"not UTF-8 (byte {exc.start})")
                continue
            starts.append(number)
            yield line + "\n"

    rows = csv.reader(feed())
    header: list[str] | None = None
    samples = []
    while True:
        starts.clear()
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            reading.errors.add(f"{path}:{starts[0] if starts else 1}", f"malformed CSV ({exc})")
            continue
        if not any(field.strip() for field in row):
            continue
        where = f"{path}:{starts[0]}"
        if header is None:
            header = [name.strip() for name in row]
            text_name = next((name for name in _TEXT_COLUMNS if name in header), None)
            if "file_name" not in header or text_name is None:
                raise AutotuneError(f"`{path}` needs a header with `file_name` and `transcription` (or `text`, "
                                    f"`sentence`) columns, found {', '.join(header[:6])[:80]}: name the columns so")
            file_col, text_col = header.index("file_name"), header.index(text_name)
            speaker_col = next((header.index(n) for n in ("speaker", "speaker_id") if n in header), None)
            continue
        if len(row) <= max(file_col, text_col):
            reading.errors.add(where, f"expected {len(header)} columns, found {len(row)}")
            continue
        name = row[file_col].strip()
        if not name:
            reading.errors.add(where, "empty `file_name`")
            continue
        speaker = row[speaker_col].strip() if speaker_col is not None and speaker_col < len(row) else None
        sample = reading.sample(where, row[text_col], path.parent / name, speaker, text_name=f"`{text_name}`")
        if sample is not None:
            samples.append(sample)
    return samples


def read_esd_list(path: Path, reading: _Reading) -> list[Sample]:
    """Style-Bert-VITS2's esd.list, `path|speaker|language|text`; also its preprocessed
    train.list/val.list, which add `|phones|tones|word2ph` after the text."""
    samples = []
    for where, line in reading.lines(path):
        fields = line.split("|")
        if len(fields) == 7 and all(t.isdigit() for t in fields[5].split() + fields[6].split()):
            text = fields[3]
        elif len(fields) >= 4:
            text = line.split("|", 3)[3]  # a `|` inside the text stays
        else:
            reading.errors.add(where, "expected `path|speaker|language|text`")
            continue
        written = fields[0].strip()
        if not written:
            reading.errors.add(where, "empty audio path")
            continue
        audio, name = _list_audio(written, path.parent, reading)
        note = f" (nor is `{name}` in wavs/, raw/ or beside the list)"
        sample = reading.sample(where, text, audio, fields[1].strip(), on_missing=note)
        if sample is not None:
            samples.append(sample)
    return samples


def _list_audio(written: str, folder: Path, reading: _Reading) -> tuple[Path, str]:
    """The audio a `*.list` line means, and its file name. The path as written comes
    first, then its file name in wavs/, raw/ and the list's folder; a candidate outside
    the data folder counts only with `allow_outside_paths`. None found: the path as
    written, for `check_audio_file` to say what is wrong with it."""
    windows = PureWindowsPath(written)
    name = windows.name if "\\" in written else Path(written).name
    given = None if windows.drive else Path(written.replace("\\", "/"))
    first = None if given is None else given if given.is_absolute() else folder / given
    candidates = ([first] if first is not None else []) + [folder / "wavs" / name, folder / "raw" / name, folder / name]
    for candidate in candidates:
        if _lexists(candidate) and (reading.allow_outside_paths or _outside_problem(candidate, reading.root) is None):
            return candidate, name
    return first if first is not None else folder / "wavs" / name, name


_LABEL_LINE = re.compile(r"\d+(\.\d+)?\s+\d+(\.\d+)?\s+\S+")   # HTK/Julius `start end phoneme`


def read_audio_txt(folder: Path, reading: _Reading) -> list[Sample]:
    """Audio files, each with a same-named .txt or .lab holding its transcript. The
    transcript's lines are joined with spaces."""
    samples = []
    for audio, transcript in _scan_audio(folder):
        if transcript is None:
            reading.errors.add(str(audio), f"no transcript: add `{audio.with_suffix('.txt').name}` beside it, "
                                           "or remove the clip")
            continue
        where = f"{transcript}:1"
        text = _read_transcript(transcript, folder, reading, where)
        if text is None:
            continue
        sample = reading.sample(where, text, audio)
        if sample is not None:
            samples.append(sample)
    return samples


def _scan_audio(folder: Path) -> list[tuple[Path, Path | None]]:
    """(audio, its transcript or None) at any depth, in a stable order. Hidden files and
    folders are skipped (macOS leaves `._x.wav` beside each clip); linked folders are
    not followed."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in AUDIO_EXTENSIONS:
                continue
            transcript = next((stem + e for e in TRANSCRIPT_EXTENSIONS + tuple(e.upper() for e in TRANSCRIPT_EXTENSIONS)
                               if stem + e in names), None)
            found.append((Path(here) / name, Path(here) / transcript if transcript else None))
    return found


def _read_transcript(path: Path, folder: Path, reading: _Reading, where: str) -> str | None:
    try:
        with open_regular(path, "transcript") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
            size = os.fstat(handle.fileno()).st_size
    except AutotuneError as exc:
        reading.errors.add(where, str(exc))
        return None
    if len(raw) > MAX_TEXT_BYTES:
        reading.errors.add(where, f"transcript is {_mb(size)}, longer than the {MAX_TEXT_BYTES / 1e6:g} MB limit")
        return None
    _require_utf8(path, raw, fix=_folder_fix(folder))
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        reading.errors.add(where, f"not UTF-8 (byte {exc.start})")
        return None
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if path.suffix.lower() == ".lab" and lines and all(_LABEL_LINE.fullmatch(line) for line in lines):
        reading.errors.add(where, "is a phoneme label file (`start end phoneme` lines), not a transcript: "
                                  "put the sentence in a .txt of the same name")
        return None
    return " ".join(lines)


def _folder_fix(folder: Path) -> Callable[[str], str]:
    """The remedy for per-clip transcripts in another encoding: convert them all in
    place; files already UTF-8 are left alone."""
    def fix(iconv: str) -> str:
        body = (f'for f; do iconv -f UTF-8 -t UTF-8 "$f" >/dev/null 2>&1 || '
                f'{{ iconv -f {iconv} -t UTF-8 "$f" > "$f.tmp" && mv "$f.tmp" "$f"; }}; done')
        return (f"convert the folder's transcripts in place, e.g. `find {shlex.quote(str(folder))} -type f "
                f"\\( -name '*.txt' -o -name '*.lab' \\) -exec sh -c {shlex.quote(body)} sh {{}} +`")
    return fix


_READERS: dict[str, Callable[[Path, _Reading], list[Sample]]] = {
    "ljspeech": read_ljspeech,
    "id-text": read_id_text,
    "common-voice": read_common_voice,
    "audiofolder-csv": read_audiofolder_csv,
    "esd-list": read_esd_list,
    "audio+txt": read_audio_txt,
}
