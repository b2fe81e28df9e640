"""A reader for each corpus layout `autotune.layouts` detects (its docstring gives the rules).

Audio. LJSpeech, JSUT, JVS and llasa-trainer's layout name clips by id: any extension
soundfile reads is found (ID.wav first). Common Voice's `path` is in clips/; audiofolder's
`file_name` is relative to its metadata file. A `*.list` path is tried as written
(relative to the list's folder), then by its file name in wavs/, raw/ and the list's own
folder: Style-Bert-VITS2 writes bare names, `Data/<model>/wavs/x.wav`, or absolute paths
from the machine (even Windows) that made the list. Every path, audio and transcript
alike, must stay inside the data folder unless `allow_outside_paths` (see
`autotune.reading`).

Transcripts. LJSpeech's second column, the text as read, is what trains (as the official
Llasa recipe and LJSpeech trainers use it); `ljspeech_column="normalized"` takes the third.
llasa-trainer's text.txt may put a tab or another separator between id and text, and
either first: the reader takes the separator and order that name the most clips in
audio/, and says so (`Reading.notes`). An audiofolder CSV record may span lines only
inside a quoted field whose lines do not read as rows of their own: a stray quote is an
error at its line, and the rows after it are still read.

Speakers: Common Voice `client_id`, the `*.list` speaker column, the JVS `jvsNNN`
folder, an audiofolder `speaker` column. Real JVS also has whisper10/ and falset10/
subsets; they are read like the others.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Callable, Iterator

from autotune.errors import AutotuneError
from autotune.layouts import AUDIO_EXTENSIONS, Part, id_audio_folder, jvs_speaker, scan_audio
from autotune.reading import (
    MAX_LINE_BYTES,
    MAX_TEXT_BYTES,
    Errors,
    Sample,
    check_audio_file,
    megabytes,
    open_transcript,
    other_encoding,
    outside_problem,
    read_jsonl,
    read_lines,
    text_problem,
)

LJSPEECH_COLUMNS = ("raw", "normalized")


@dataclass
class Reading:
    """Where samples are read from and what the readers found: problems (`errors`), and
    notes on how a file was read (e.g. llasa-trainer's separator)."""
    errors: Errors
    root: Path                       # the data folder every path must stay inside
    allow_outside_paths: bool = False
    ljspeech_column: str = "raw"     # LJSpeech's transcript: `raw` (column 2) or `normalized` (column 3)
    notes: list[str] = field(default_factory=list)

    def sample(self, where: str, text: str, audio: Path, speaker: str | None = None, text_name: str = "text",
               on_missing: str = "") -> Sample | None:
        problem = text_problem(text, text_name) or check_audio_file(audio, self.root, self.allow_outside_paths)
        if problem:
            self.errors.add(where, problem + (on_missing if problem.endswith("is missing") else ""))
            return None
        return Sample(text=text, source=where, audio=audio, speaker=speaker or None)

    def numbered_lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """(line number, line) for each UTF-8 line, blank ones too; other lines are reported."""
        for number, raw in read_lines(path, MAX_LINE_BYTES, self.errors, root=self.root,
                                      allow_outside_paths=self.allow_outside_paths):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.errors.add(f"{path}:{number}", f"not UTF-8 (byte {exc.start})")

    def lines(self, path: Path) -> Iterator[tuple[str, str]]:
        """(where, line) for each non-blank UTF-8 line; other lines are reported."""
        for number, line in self.numbered_lines(path):
            if line.strip():
                yield f"{path}:{number}", line


def read_part(part: Part, reading: Reading) -> list[Sample]:
    """The samples of one part; problems go to `reading.errors` by position."""
    if part.kind in ("jsonl", "audiofolder-jsonl"):
        return read_jsonl(part.path, reading.errors, root=reading.root, allow_outside_paths=reading.allow_outside_paths,
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

    def has(self, clip_id: str) -> bool:
        """Whether a clip of that id is in the folder (cheap: the folder is listed once)."""
        if self._names is None:
            self._names = self._index()
        return bool(clip_id) and clip_id in self._names

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


def read_ljspeech(path: Path, reading: Reading) -> list[Sample]:
    samples = []
    clips = _ClipFolder(path.parent / "wavs")
    for where, line in reading.lines(path):
        parts = line.split("|")
        if len(parts) < 2 or not parts[0].strip():
            reading.errors.add(where, "expected `id|text`")
            continue
        # The second column is the text as read; the third, where present, is normalised (numbers
        # spelled out). Llasa's recipe trains on the second, and synthesis speaks raw text.
        normalized = reading.ljspeech_column == "normalized" and len(parts) > 2 and parts[2].strip()
        transcript = parts[2] if normalized else parts[1]
        sample = reading.sample(where, transcript, clips.find(parts[0].strip()))
        if sample is not None:
            samples.append(sample)
    return samples


def read_id_text(path: Path, reading: Reading) -> list[Sample]:
    """JSUT and JVS: `ID:text` lines, audio in wav/ (JSUT) or wav24kHz16bit/ (JVS)."""
    folder = id_audio_folder(path.parent)
    if folder is None:
        reading.errors.add(str(path), "no wav/ or wav24kHz16bit/ folder beside this transcript")
        return []
    clips, speaker, samples = _ClipFolder(folder), jvs_speaker(path), []
    for where, line in reading.lines(path):
        clip_id, colon, text = line.partition(":")
        if not colon or not clip_id.strip():
            reading.errors.add(where, "expected `ID:text`")
            continue
        sample = reading.sample(where, text, clips.find(clip_id.strip()), speaker)
        if sample is not None:
            samples.append(sample)
    return samples


def read_common_voice(path: Path, reading: Reading) -> list[Sample]:
    """A Common Voice .tsv: a header naming `client_id`, `path`, `sentence`, ...; tabs
    only (Common Voice writes no quoting, and sentences may hold quote marks)."""
    lines = reading.lines(path)
    first = next(lines, None)
    if first is None:
        return []
    header = [name.strip() for name in first[1].split("\t")]
    if "path" not in header or "sentence" not in header:
        reading.errors.add(first[0], f"no `path` and `sentence` columns in the first line, as Common Voice's .tsv "
                                     f"files have (found {', '.join(header[:6])[:80]}): check the file")
        return []
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


def read_audiofolder_csv(path: Path, reading: Reading) -> list[Sample]:
    """Hugging Face audiofolder's metadata.csv: real CSV (a quoted field may hold commas and
    line breaks), a header with `file_name` and the transcript column."""
    header: list[str] | None = None
    samples = []
    for start, row in _csv_records(path, reading):
        if not any(field.strip() for field in row):
            continue
        where = f"{path}:{start}"
        if header is None:
            header = [name.strip() for name in row]
            text_name = next((name for name in _TEXT_COLUMNS if name in header), None)
            if "file_name" not in header or text_name is None:
                reading.errors.add(where, f"needs a header with `file_name` and `transcription` (or `text`, `sentence`) "
                                          f"columns, found {', '.join(header[:6])[:80]}: name the columns so")
                return []
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


MAX_RECORD_LINES = 20   # a transcript with more line breaks than this is not what a quote there means


def _csv_records(path: Path, reading: Reading) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each CSV record. A record spans lines only while a
    quoted field is open, and only while none of the lines it would take in reads as a row of
    its own (its `file_name` field naming an audio file): then the quote is a stray one,
    reported at its line, and that next line starts afresh. Rows are never eaten silently."""
    pending: list[tuple[int, str]] = []   # the lines of a record whose quoted field is still open
    file_col = None

    def stray(reason: str) -> None:
        reading.errors.add(f"{path}:{pending[0][0]}", f"a quoted field opened on this line {reason}: a stray `\"`? "
                                                      "close the quote, or write a quote inside a quoted field as `\"\"`")

    for number, line in reading.numbered_lines(path):
        if pending and file_col is not None and _reads_as_row(line, file_col, path.parent):
            stray(f"runs over its line end into line {number}, which reads as a row of its own")
            pending = []
        pending.append((number, line))
        text = "\n".join(line for _, line in pending)
        if _open_quote(text):
            if len(pending) > MAX_RECORD_LINES or len(text) > MAX_LINE_BYTES:
                stray(f"is still open after {len(pending)} lines ({megabytes(len(text.encode()))})")
                pending = []
            continue
        try:
            row = next(csv.reader(io.StringIO(text)), [])
        except csv.Error as exc:   # e.g. a field over the csv module's 128 KiB limit
            reading.errors.add(f"{path}:{pending[0][0]}", f"malformed CSV ({exc})")
            pending = []
            continue
        if file_col is None:
            header = [name.strip() for name in row]
            file_col = header.index("file_name") if "file_name" in header else None
        yield pending[0][0], row
        pending = []
    if pending:
        stray("never closes before the end of the file")


def _open_quote(text: str) -> bool:
    """Whether CSV `text` ends inside a quoted field."""
    try:
        for _ in csv.reader(io.StringIO(text), strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _reads_as_row(line: str, file_col: int, folder: Path) -> bool:
    """Whether a line alone is a metadata row: its `file_name` field names an audio file."""
    try:
        fields = next(csv.reader([line[:64 * 1024]]), [])
    except csv.Error:
        return False
    if len(fields) <= file_col:
        return False
    name = fields[file_col].strip()
    return bool(name) and (os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS or _lexists(folder / name))


def read_esd_list(path: Path, reading: Reading) -> list[Sample]:
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


def _list_audio(written: str, folder: Path, reading: Reading) -> tuple[Path, str]:
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
        if _lexists(candidate) and (reading.allow_outside_paths or outside_problem(candidate, reading.root) is None):
            return candidate, name
    return first if first is not None else folder / "wavs" / name, name


def read_audio_txt(folder: Path, reading: Reading) -> list[Sample]:
    """Audio files, each with a same-named .txt or .lab holding its transcript. The
    transcript's lines are joined with spaces. Transcripts in another encoding are one
    problem for the folder, with the command that converts them all."""
    samples = []
    encodings: dict[tuple[str, str], list[Path]] = {}
    for audio, transcript in scan_audio(folder):
        if transcript is None:
            reading.errors.add(str(audio), f"no transcript: add `{audio.with_suffix('.txt').name}` beside it, "
                                           "or remove the clip")
            continue
        where = f"{transcript}:1"
        raw = _read_transcript(transcript, reading, where)
        if raw is None:
            continue
        found = other_encoding(raw)
        if found is not None:
            encodings.setdefault(found, []).append(transcript)
            continue
        text = _transcript_text(transcript, raw, reading, where)
        if text is None:
            continue
        sample = reading.sample(where, text, audio)
        if sample is not None:
            samples.append(sample)
    for (name, iconv), paths in encodings.items():
        count = f"{len(paths)} transcripts look" if len(paths) > 1 else "a transcript looks"
        reading.errors.add(str(paths[0]), f"{count} like {name} text, not UTF-8 (this one first): "
                                          f"{_folder_fix(folder, iconv)}")
    return samples


_LABEL_LINE = re.compile(r"\d+(\.\d+)?\s+\d+(\.\d+)?\s+\S+")   # HTK/Julius `start end phoneme`


def _read_transcript(path: Path, reading: Reading, where: str) -> bytes | None:
    """A clip's transcript file, bounded, from inside the data folder; None when refused."""
    try:
        with open_transcript(path, reading.root, reading.allow_outside_paths) as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
            size = os.fstat(handle.fileno()).st_size
    except AutotuneError as exc:
        reading.errors.add(where, str(exc))
        return None
    if len(raw) > MAX_TEXT_BYTES:
        reading.errors.add(where, f"transcript is {megabytes(size)}, longer than the {MAX_TEXT_BYTES / 1e6:g} MB limit")
        return None
    return raw


def _transcript_text(path: Path, raw: bytes, reading: Reading, where: str) -> str | None:
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


def _folder_fix(folder: Path, iconv: str) -> str:
    """The remedy for per-clip transcripts in another encoding: convert them all in place;
    files already UTF-8 are left alone."""
    body = (f'for f; do iconv -f UTF-8 -t UTF-8 "$f" >/dev/null 2>&1 || '
            f'{{ iconv -f {iconv} -t UTF-8 "$f" > "$f.tmp" && mv "$f.tmp" "$f"; }}; done')
    return (f"convert the folder's transcripts in place, e.g. `find {shlex.quote(str(folder))} -type f "
            f"\\( -name '*.txt' -o -name '*.lab' \\) -exec sh -c {shlex.quote(body)} sh {{}} +`")


# llasa-trainer's create_dataset.py takes `--split_word` (`:` by default, a tab in its README's
# example) and `--file_index/--text_index` (the columns swapped): what we try, most usual first.
_SEPARATORS = {":": "`:`", "\t": "a tab", "|": "`|`", ",": "`,`", " ": "a space"}
_SNIFF_LINES = 200


def read_llasa_trainer(path: Path, reading: Reading) -> list[Sample]:
    """llasa-trainer's raw layout: text.txt of `file001:text` lines beside audio/. The separator
    and the column order are those under which the most ids (of the first `_SNIFF_LINES`
    lines) name a clip in audio/; how the file was read is a note."""
    clips = _ClipFolder(path.parent / "audio")
    # The first lines choose; their problems are the main pass's to list, once.
    sniff = Reading(Errors(cap=0), reading.root, reading.allow_outside_paths)
    first = [line for _, line in itertools.islice(sniff.lines(path), _SNIFF_LINES)]
    best, best_hits = None, 0
    for separator in _SEPARATORS:
        for id_first in (True, False):
            hits = sum(clips.has(_split_id_text(line, separator, id_first)[0]) for line in first)
            if hits > best_hits:
                best, best_hits = (separator, id_first), hits
    if best is None:
        if sniff.errors.count:
            for _ in reading.lines(path):   # the file's own problem (its encoding, its place) says why
                pass
        else:
            reading.errors.add(str(path), f"no line names a clip in `{clips.folder}` with `:`, a tab, `|`, `,` or "
                                          "a space between the id and the text, in either order: write "
                                          "`file001:text` lines for audio/file001.wav")
        return []
    separator, id_first = best
    order = "ID, then text" if id_first else "text, then ID"
    reading.notes.append(f"`{path}` read as llasa-trainer's text.txt: {_SEPARATORS[separator]} between "
                         f"{order} ({best_hits} of the first {len(first)} lines name a clip in audio/ so)")
    samples = []
    for where, line in reading.lines(path):
        clip_id, text = _split_id_text(line, separator, id_first)
        if not clip_id or text is None:
            expected = f"ID{separator}text" if id_first else f"text{separator}ID"
            reading.errors.add(where, f"expected `{expected}`".replace("\t", "<TAB>"))
            continue
        sample = reading.sample(where, text, clips.find(clip_id))
        if sample is not None:
            samples.append(sample)
    return samples


def _split_id_text(line: str, separator: str, id_first: bool) -> tuple[str, str | None]:
    """(id, text) of a line; the text keeps any separator inside it (the id is the field at
    its end the text is not)."""
    line = line.strip("\r\n") if separator.isspace() else line.strip()
    head, sep, tail = line.partition(separator) if id_first else line.rpartition(separator)
    if not sep:
        return "", None
    clip_id, text = (head, tail) if id_first else (tail, head)
    return clip_id.strip(), text.strip()


_READERS: dict[str, Callable[[Path, Reading], list[Sample]]] = {
    "ljspeech": read_ljspeech,
    "id-text": read_id_text,
    "common-voice": read_common_voice,
    "audiofolder-csv": read_audiofolder_csv,
    "esd-list": read_esd_list,
    "audio+txt": read_audio_txt,
    "llasa-trainer": read_llasa_trainer,
}
