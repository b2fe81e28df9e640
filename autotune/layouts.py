"""Which corpus layout a folder (or transcript file) is; `autotune.corpora` reads each one.

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
  8. text.txt (`file001:text`, any separator, either order)
     + audio/, as llasa-trainer's create_dataset.py reads it    [llasa-trainer]
  9. train/metadata.csv|jsonl [+ validation/, valid/ or dev/]   [audiofolder]
     jvsNNN/<subset>/transcripts_utf8.txt (the JVS root), or
     <subset>/transcripts_utf8.txt (one JVS speaker)            [jvs]
     <subcorpus>/transcript_utf8.txt + wav/ (the JSUT root)     [jsut]
 10. audio files with a same-named .txt or .lab, at any depth   [audio+txt]
Otherwise one error names the closest layout and what it lacks; a Style-Bert-VITS2
install (or its Data/ folder) is told to pass one model's folder, `Data/<name>`.

A file given as `--data` is read by its suffix, not its exact name, so a
converted copy such as `metadata.utf8.csv` (what the encoding hint writes) reads
as the original: .jsonl/.json (`metadata*.jsonl` as audiofolder), .csv
(audiofolder when its header has `file_name`, else LJSpeech with wavs/ beside
it), .tsv (Common Voice, clips/ beside it), .list (Style-Bert-VITS2) and .txt
(JSUT/JVS `ID:text` with wav/ or wav24kHz16bit/ beside it, llasa-trainer's with audio/).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import AutotuneError
from autotune.reading import open_transcript

# What libsndfile reads; the order is the preference when one id has several.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".oga", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf",
                    ".w64", ".rf64")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")
_HELP = "see README for the accepted layouts"

# What to add to a transcript file of each kind that holds no sample: its own line format.
HINTS = {
    "jsonl": 'add lines of {"text": ..., "code": [...]} (or "audio": "clip.wav")',
    "audiofolder-jsonl": 'add lines of {"file_name": "clip.wav", "transcription": ...}',
    "audiofolder-csv": "add `file_name,transcription` rows under its header",
    "ljspeech": "add `id|text` lines for the clips in wavs/",
    "id-text": "add `ID:text` lines for the clips beside it",
    "common-voice": "add rows (`client_id`, `path`, `sentence`, ...) under its header for the clips in clips/",
    "esd-list": "add `path|speaker|language|text` lines",
    "llasa-trainer": "add `file001:text` lines for the clips in audio/",
    "audio+txt": "add audio files, each with a same-named .txt transcript",
}


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
        if csv_header(path) is not None:
            return Layout("audiofolder", [Part(path, "audiofolder-csv")])
        _require_folder(path.parent / "wavs", "LJSpeech", path.name)
        return Layout("ljspeech", [Part(path, "ljspeech")])
    if suffix == ".tsv":
        _require_folder(path.parent / "clips", "Common Voice", path.name)
        return Layout("common-voice", [Part(path, "common-voice")])
    if suffix == ".list":
        return Layout("esd-list", [Part(path, "esd-list")])
    if suffix == ".txt":
        if id_audio_folder(path.parent) is None:
            if (path.parent / "audio").is_dir():
                return Layout("llasa-trainer", [Part(path, "llasa-trainer")])
            raise AutotuneError(f"`{path}` is not a .jsonl file or metadata.csv, and no wav/, wav24kHz16bit/ or "
                                "audio/ folder is beside it as for a JSUT, JVS or llasa-trainer transcript: pass the "
                                "data folder instead")
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
    if (d / "text.txt").exists() and (d / "audio").is_dir():
        return Layout("llasa-trainer", [Part(d / "text.txt", "llasa-trainer")])
    split = _audiofolder_splits(d)
    if split is not None:
        return split
    _refuse_style_bert_vits2_root(d)
    jvs = sorted(d.glob("jvs*/*/transcripts_utf8.txt")) or sorted(d.glob("*/transcripts_utf8.txt"))
    if jvs:
        return Layout("jvs", [Part(t, "id-text") for t in jvs])
    jsut = sorted(t for t in d.glob("*/transcript_utf8.txt") if (t.parent / "wav").is_dir())
    if jsut:
        return Layout("jsut", [Part(t, "id-text") for t in jsut])
    clips = scan_audio(d)
    if any(transcript for _, transcript in clips):
        return Layout("audio+txt", [Part(d, "audio+txt")])
    raise AutotuneError(_closest_layout(d, clips))


def _refuse_style_bert_vits2_root(d: Path) -> None:
    """Style-Bert-VITS2 keeps each model's data in `Data/<name>/` (esd.list, raw/ or wavs/):
    its install root, or its Data/ folder, is not one data set."""
    models = sorted(p.parent for p in d.glob("Data/*/esd.list")) or sorted(p.parent for p in d.glob("*/esd.list"))
    if not models:
        return
    where = "a Style-Bert-VITS2 install" if models[0].parent.name == "Data" and models[0].parent != d \
        else "Style-Bert-VITS2's Data/ folder"
    names = ", ".join(m.name for m in models[:5]) + (f" and {len(models) - 5} more" if len(models) > 5 else "")
    raise AutotuneError(f"`{d}` looks like {where}, not one data set: pass one model's folder, e.g. "
                        f"`--data {models[0]}` (its esd.list and audio); models here: {names}")


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
                                  ("raw", "Style-Bert-VITS2", "esd.list"),
                                  ("audio", "llasa-trainer's layout", "text.txt (`file001:text` lines)")):
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
            f"(JSUT, JVS, Common Voice, audiofolder, *.list, llasa-trainer's audio/ + text.txt, audio with .txt): "
            f"{_HELP}")


def id_audio_folder(d: Path) -> Path | None:
    """JSUT's wav/ or JVS's wav24kHz16bit/ beside a transcript."""
    return next((d / name for name in ("wav", "wav24kHz16bit") if (d / name).is_dir()), None)


def jvs_speaker(transcript: Path) -> str | None:
    """jvs001/parallel100/transcripts_utf8.txt -> "jvs001"."""
    speaker = transcript.parent.parent.name
    return speaker if re.fullmatch(r"jvs\d+", speaker) else None


def _is_jvs(transcript: Path) -> bool:
    return (transcript.name == "transcripts_utf8.txt" or (transcript.parent / "wav24kHz16bit").is_dir()
            or jvs_speaker(transcript) is not None)


def csv_header(path: Path) -> list[str] | None:
    """The audiofolder header (a first line naming `file_name`), or None. Only the first line
    is read, and only to tell the layout; the reader checks where the file lies."""
    with open_transcript(path, None) as handle:
        first = handle.readline(64 * 1024)
    try:
        header = next(csv.reader([first.decode("utf-8-sig", "replace")]), [])
    except csv.Error:
        return None
    header = [name.strip() for name in header]
    return header if "file_name" in header else None


def scan_audio(folder: Path) -> list[tuple[Path, Path | None]]:
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
