"""Bounded reads: over-long lines, texts and code lists are refused by position before
they are parsed; audio must stay inside the data folder and be a regular file; a
data folder whose name is not UTF-8 still works and prints safely."""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune.data import load_dataset  # noqa: E402
from autotune.reading import MAX_CODES, MAX_JSON_LINE_BYTES, MAX_TEXT_BYTES  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402

OUTSIDE_FIX = "move the audio inside the data folder or set `--set data.allow_outside_paths=true`"
TRANSCRIPT_FIX = "move the transcript inside the data folder or set `--set data.allow_outside_paths=true`"
GOOD = json.dumps({"text": "fine", "code": [1, 2, 3]})


def tone(path: Path, sr: int = 22_050, seconds: float = 0.5, hz: float = 220) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(os.fsencode(path), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def load(data, **kw):
    kw.setdefault("max_length", 2048)
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("split_seed", 42)
    kw.setdefault("progress", False)
    return load_dataset(data, **kw)


def errors_of(data, **kw) -> AutotuneError:
    with pytest.raises(AutotuneError) as info:
        load(data, **kw)
    return info.value


@pytest.fixture(scope="module")
def tiny_codec():
    from autotune.codec import build_tiny_codec

    return build_tiny_codec()


@pytest.fixture
def with_codec(tiny_codec, tmp_path):
    return {"codec_loader": lambda: tiny_codec, "cache_dir": tmp_path / "cache"}


@contextmanager
def deadline(seconds: int):
    """A hang (e.g. opening a FIFO that nobody writes) fails the test instead of the suite."""
    def fail(*_):
        raise TimeoutError(f"took over {seconds} s: something blocked")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def measured():
    """Wall time and the peak of Python allocations (numpy's included) inside the block."""
    result = {}
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        result["peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()


def write_with_huge_line(path: Path, before: bytes, size: int, after: bytes, lines_after: list[bytes]) -> None:
    """`before` + `size` bytes of filler + `after` as line 2, written in chunks (the test
    itself must not hold it whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = "あ".encode() * (1 << 18)  # 768 KiB of a 3-byte character
    with path.open("wb") as handle:
        handle.write(lines_after[0] + b"\n" + before)
        left = size
        while left > 0:
            handle.write(chunk[:left])
            left -= len(chunk)
        handle.write(after + b"\n" + b"\n".join(lines_after[1:]) + b"\n")


# ------------------------------------------------------------ long lines ---

def test_a_50_mb_text_field_is_refused_by_position_fast_and_in_bounded_memory(tmp_path):
    path = tmp_path / "train.jsonl"
    write_with_huge_line(path, b'{"text": "', 50 * 1024 * 1024, b'", "code": [1, 2]}', [GOOD.encode(), GOOD.encode()])
    with measured() as cost:
        err = errors_of(tmp_path)
    size = path.stat().st_size - 2 * (len(GOOD) + 1) - 1
    assert err.details == [f"{path}:2: line is {size / 1e6:.1f} MB, longer than the 4 MB limit of a JSON line "
                           f"(up to 1 MB of `text` and 100,000 codes)"]
    # Before the limit, a 20 MB text took 140 s and 3.9 GB under `--check-data`.
    assert cost["seconds"] < 2, cost
    assert cost["peak_mb"] < 3 * MAX_JSON_LINE_BYTES / 1e6, cost   # a few line buffers, never the 52 MB line


def test_a_long_transcript_line_is_refused_without_being_decoded(tmp_path):
    (tmp_path / "wavs").mkdir()
    tone(tmp_path / "wavs" / "a.wav")
    path = tmp_path / "metadata.csv"
    write_with_huge_line(path, b"b|", 20_000_000, b"", [b"a|fine"])
    with measured() as cost:
        err = errors_of(tmp_path)
    assert err.details == [f"{path}:2: line is 20.0 MB, longer than the 1 MB limit"]
    assert cost["seconds"] < 2 and cost["peak_mb"] < 3 * MAX_TEXT_BYTES / 1e6 + 2, cost


def test_a_file_that_is_one_huge_line_without_a_newline(tmp_path):
    path = tmp_path / "train.jsonl"
    with path.open("wb") as handle:
        handle.write(b"[" * (30 * 1024 * 1024))
    with measured() as cost:
        err = errors_of(tmp_path)
    assert err.details == [f"{path}:1: line is 31.5 MB, longer than the 4 MB limit of a JSON line "
                           "(up to 1 MB of `text` and 100,000 codes)"]
    assert cost["seconds"] < 2 and cost["peak_mb"] < 3 * MAX_JSON_LINE_BYTES / 1e6, cost


def test_text_and_codes_over_their_limits_inside_a_short_enough_line(tmp_path):
    over_text = "x" * (MAX_TEXT_BYTES + 1)
    at_text = "y" * MAX_TEXT_BYTES
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([
        GOOD,
        json.dumps({"text": over_text, "code": [1]}),
        json.dumps({"text": "many codes", "code": [7] * (MAX_CODES + 1)}),
        json.dumps({"text": "いい" * 200_000, "code": [1]}),     # 1.2 MB of UTF-8 in 0.4 M characters
    ]) + "\n", encoding="utf-8")
    err = errors_of(tmp_path)
    assert err.details == [
        f"{path}:2: `text` is 1.0 MB, longer than the 1 MB limit",
        f"{path}:3: `code` holds 100,001 codes, more than the 100,000 limit (2,000 s of speech)",
        f"{path}:4: `text` is 1.2 MB, longer than the 1 MB limit",
    ]
    # At the limits a sample is read, then skipped as longer than max_length, like any long sample.
    path.write_text("\n".join([GOOD, json.dumps({"text": at_text, "code": [1]}),
                               json.dumps({"text": "many codes", "code": [7] * MAX_CODES})]) + "\n", encoding="utf-8")
    report = load(tmp_path)
    assert sorted(s["source"] for s in report.skipped) == [f"{path}:2", f"{path}:3"]


# ------------------------------------------------- audio judged by decoding ---

class SpyCodec:
    """The tiny codec, noting the length of every waveform it is asked to encode."""

    def __init__(self, codec):
        self.codec, self.codec_id, self.sizes = codec, codec.codec_id, []

    def encode(self, wave):
        self.sizes.append(len(wave))
        return self.codec.encode(wave)


def sparse_wav(path: Path, size_bytes: int, sr: int, channels: int) -> Path:
    """A WAV of `size_bytes` whose samples are a hole in the file (zeros, no disk space):
    its header says what the size holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(os.fsencode(path), "w", sr, channels, subtype="PCM_16") as handle:
        handle.write(np.zeros((sr, channels), np.int16))
    with path.open("r+b") as handle:
        handle.truncate(size_bytes)
        head = handle.read(64)
        data_at = head.index(b"data")
        handle.seek(4)
        handle.write(struct.pack("<I", size_bytes - 8))
        handle.seek(data_at + 4)
        handle.write(struct.pack("<I", size_bytes - data_at - 8))
    return path


def test_audio_longer_than_max_length_holds_is_skipped_and_the_codec_never_sees_it(tmp_path, tiny_codec):
    # 30 minutes, under the 2,000 s one-sample limit a header check allowed: the codec was asked
    # for all of it (64.8 GB with the real XCodec2). Speech past max_length (2,048 codes, 41 s) can
    # never train, so decoding stops there and the sample is skipped and listed.
    tone(tmp_path / "wavs" / "long.wav", sr=8_000, seconds=1_800)
    tone(tmp_path / "wavs" / "ok.wav")
    (tmp_path / "metadata.csv").write_text("long|a whole audiobook chapter\nok|short\n", encoding="utf-8")
    spy = SpyCodec(tiny_codec)
    with measured() as cost:
        report = load(tmp_path, codec_loader=lambda: spy, cache_dir=tmp_path / "cache")
    assert spy.sizes == [8_000]   # only ok.wav: 0.5 s at 16 kHz
    assert [s.audio.name for s in report.train + report.val] == ["ok.wav"]
    [skipped] = report.skipped
    assert skipped["source"] == f"{tmp_path / 'metadata.csv'}:1" and skipped["max_length"] == 2048
    assert skipped["reason"] == (f"audio `{tmp_path / 'wavs' / 'long.wav'}` decodes to more than the 41.0 s of "
                                 "speech max_length 2048 tokens hold: cut it into utterances")
    assert 41 < skipped["seconds_at_least"] < 60   # decoding stopped one block past the cap
    assert cost["peak_mb"] < 40   # never 30 minutes of samples


def test_a_sparse_2_gib_six_channel_wav_is_read_in_bounded_memory_and_time(tmp_path, tiny_codec):
    """#22's hostile file: a 2 GiB hole whose header holds 1,864 s of 96 kHz, 6-channel audio
    (it passed 7 GB through --check-data). Decoding stops at the cap before the file is hashed."""
    sparse_wav(tmp_path / "wavs" / "big.wav", 2 << 30, sr=96_000, channels=6)
    tone(tmp_path / "wavs" / "ok.wav")
    (tmp_path / "metadata.csv").write_text("big|hostile\nok|fine\n", encoding="utf-8")
    spy = SpyCodec(tiny_codec)
    with deadline(60), measured() as cost:
        report = load(tmp_path, codec_loader=lambda: spy, cache_dir=tmp_path / "cache")
    assert [item["source"] for item in report.skipped] == [f"{tmp_path / 'metadata.csv'}:1"]
    assert spy.sizes == [8_000]
    assert cost["peak_mb"] < 64, cost   # 65,536-frame blocks, never the file


def test_non_finite_samples_are_a_problem_of_the_line_that_names_the_clip(tmp_path, with_codec):
    t = np.arange(8_000) / 16_000
    for name, bad in (("nan", np.nan), ("inf", np.inf), ("minus_inf", -np.inf)):
        wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        wave[4_000] = bad
        (tmp_path / "wavs").mkdir(exist_ok=True)
        sf.write(tmp_path / "wavs" / f"{name}.wav", wave, 16_000, subtype="FLOAT")
    tone(tmp_path / "wavs" / "ok.wav")
    (tmp_path / "metadata.csv").write_text("ok|fine\nnan|a\ninf|b\nminus_inf|c\n", encoding="utf-8")
    err = errors_of(tmp_path, **with_codec)
    meta, wavs = tmp_path / "metadata.csv", tmp_path / "wavs"
    assert err.details == [f"{meta}:{n}: audio file `{wavs / name}.wav`: cannot read audio (a sample is NaN or "
                           "infinite at 0.250 s: export the clip again)" for n, name in
                           ((2, "nan"), (3, "inf"), (4, "minus_inf"))]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1   # ok.wav's: a broken clip is never cached


def test_a_wav_header_that_lies_about_its_length_counts_what_decodes(tmp_path, with_codec):
    """A data chunk that claims 10 s in a file that holds 1 s: the sample is what decodes."""
    path = tone(tmp_path / "wavs" / "liar.wav", sr=16_000, seconds=1.0)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"data")
    raw[at + 4:at + 8] = struct.pack("<I", 10 * 16_000 * 2)
    path.write_bytes(bytes(raw))
    (tmp_path / "metadata.csv").write_text("liar|one second\n", encoding="utf-8")
    report = load(tmp_path, **with_codec)
    [sample] = report.train + report.val
    assert len(sample.codes) == 50 == sample.num_codes
    [entry] = (tmp_path / "cache").glob("*.json")
    assert json.loads(entry.read_text())["num_samples"] == 16_000


# ------------------------------------------------------------ audio paths ---

@pytest.fixture
def sf_calls(monkeypatch):
    """Every path soundfile.info is asked to open (the real call still runs)."""
    import soundfile

    calls: list[str] = []
    real = soundfile.info

    def recording(file, *args, **kwargs):
        calls.append(os.fsdecode(file) if isinstance(file, (str, bytes)) else repr(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(soundfile, "info", recording)
    return calls


def _outside_cases(data: Path, outside_wav: Path) -> list[tuple[Path, str, str]]:
    """(file to write, its content, the audio path the error names) per layout."""
    return [
        (data / "train.jsonl", json.dumps({"text": "x", "audio": "../outside.wav"}) + "\n", str(data / "../outside.wav")),
        (data / "train.jsonl", json.dumps({"text": "x", "audio": "/etc/shadow"}) + "\n", "/etc/shadow"),
        (data / "metadata.csv", "../../etc/shadow|x\n", str(data / "wavs" / "../../etc/shadow.wav")),
        (data / "validated.tsv", "client_id\tpath\tsentence\nc\t../../outside.wav\tx\n",
         str(data / "clips" / "../../outside.wav")),
        (data / "esd.list", "/etc/shadow|spk|JP|x\n", "/etc/shadow"),
        (data / "metadata.jsonl", json.dumps({"file_name": str(outside_wav), "transcription": "x"}) + "\n",
         str(outside_wav)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_audio_outside_the_data_folder_is_refused_and_never_opened(tmp_path, sf_calls, case):
    data = tmp_path / "data"
    outside_wav = tone(tmp_path / "outside.wav")
    for folder in ("wavs", "clips"):
        (data / folder).mkdir(parents=True, exist_ok=True)
    path, content, named = _outside_cases(data, outside_wav)[case]
    path.write_text(content, encoding="utf-8")
    err = errors_of(data)
    line = 2 if path.suffix == ".tsv" else 1
    assert err.details == [f"{path}:{line}: audio path `{named}` is outside the data folder `{data}`: {OUTSIDE_FIX}"]
    assert sf_calls == []   # refused before any open: /etc/shadow is never read


def test_allow_outside_paths_reads_audio_outside(tmp_path, with_codec):
    data = tmp_path / "data"
    tone(tmp_path / "outside.wav")
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"text": "x", "audio": "../outside.wav"}) + "\n", encoding="utf-8")
    report = load(data, allow_outside_paths=True, **with_codec)
    assert len(report.train[0].codes) == 25


def test_a_symlink_is_judged_by_where_it_leads(tmp_path, sf_calls, with_codec):
    data = tmp_path / "data"
    outside = tone(tmp_path / "elsewhere" / "clip.wav", hz=330)   # another clip, not a copy
    tone(data / "wavs" / "real.wav")
    (data / "wavs" / "in.wav").symlink_to(data / "wavs" / "real.wav")   # inside -> inside: fine
    (data / "wavs" / "out.wav").symlink_to(outside)                     # inside -> outside: refused
    (data / "metadata.csv").write_text("in|inside\nout|outside\n", encoding="utf-8")
    err = errors_of(data, **with_codec)
    link = data / "wavs" / "out.wav"
    assert err.details == [f"{data / 'metadata.csv'}:2: audio file `{link}` links to `{outside}`, "
                           f"outside the data folder `{data}`: {OUTSIDE_FIX}"]
    assert str(outside) not in sf_calls and str(link) not in sf_calls
    report = load(data, allow_outside_paths=True, **with_codec)
    assert sorted(s.audio.name for s in report.train + report.val) == ["in.wav", "out.wav"]
    # A linked data folder is fine: the folder is resolved too.
    (tmp_path / "data-link").symlink_to(data)
    (data / "metadata.csv").write_text("in|inside\n", encoding="utf-8")
    assert load(tmp_path / "data-link", **with_codec).train[0].audio == tmp_path / "data-link" / "wavs" / "in.wav"


SECRET = "the contents of a private file"


def _linked_transcripts(data: Path, outside: Path) -> list[tuple[Path, str]]:
    """(transcript path inside the data folder, what the outside file holds) per layout: each
    transcript a symlink that leads out of the data folder."""
    return [
        (data / "train.jsonl", json.dumps({"text": SECRET, "code": [1, 2, 3]}) + "\n"),
        (data / "metadata.csv", f"a|{SECRET}\n"),                                   # LJSpeech (wavs/)
        (data / "metadata.jsonl", json.dumps({"file_name": "a.wav", "transcription": SECRET}) + "\n"),
        (data / "validated.tsv", f"client_id\tpath\tsentence\nc\ta.wav\t{SECRET}\n"),   # clips/
        (data / "esd.list", f"a.wav|spk|JP|{SECRET}\n"),
        (data / "transcript_utf8.txt", f"a:{SECRET}\n"),                             # JSUT (wav/)
        (data / "text.txt", f"a:{SECRET}\n"),                                        # llasa-trainer (audio/)
        (data / "a.txt", SECRET + "\n"),                                              # beside a.wav
    ]


@pytest.mark.parametrize("case", range(8))
def test_a_transcript_that_links_out_of_the_data_folder_is_refused_and_never_read(tmp_path, case):
    data, outside = tmp_path / "data", tmp_path / "private"
    link, content = _linked_transcripts(data, outside)[case]
    if link.name == "a.txt":
        tone(data / "a.wav")
    else:
        for folder in ("wavs", "clips", "wav", "audio"):
            tone(data / folder / "a.wav")
    target = outside / link.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
    link.symlink_to(target)
    err = errors_of(data)
    where = f"{link}:1" if link.name == "a.txt" else str(link)
    assert err.details == [f"{where}: transcript file `{link}` links to `{target}`, outside the data folder "
                           f"`{data}`: {TRANSCRIPT_FIX}"]
    assert SECRET not in err.one_line()


def test_allow_outside_paths_reads_a_linked_transcript(tmp_path):
    data, target = tmp_path / "data", tmp_path / "shared" / "train.jsonl"
    target.parent.mkdir()
    target.write_text(json.dumps({"text": "shared", "code": [1, 2, 3]}) + "\n", encoding="utf-8")
    data.mkdir()
    (data / "train.jsonl").symlink_to(target)
    report = load(data, allow_outside_paths=True)
    assert [s.text for s in report.train + report.val] == ["shared"]


def test_only_regular_files_are_read_as_audio(tmp_path, sf_calls):
    data = tmp_path / "data"
    wavs = data / "wavs"
    (wavs / "folder.wav").mkdir(parents=True)
    os.mkfifo(wavs / "fifo.wav")
    (wavs / "loop1.wav").symlink_to(wavs / "loop2.wav")
    (wavs / "loop2.wav").symlink_to(wavs / "loop1.wav")
    (wavs / "dangling.wav").symlink_to(wavs / "nowhere.wav")
    (wavs / "null.wav").symlink_to("/dev/null")
    (data / "metadata.csv").write_text("folder|a\nfifo|b\nloop1|c\ndangling|d\nnull|e\n", encoding="utf-8")
    meta = data / "metadata.csv"
    with deadline(20):
        err = errors_of(data, allow_outside_paths=True)   # so that /dev/null gets as far as its type
    assert err.details == [
        f"{meta}:1: audio file `{wavs / 'folder.wav'}` is a folder, not an audio file",
        f"{meta}:2: audio file `{wavs / 'fifo.wav'}` is a FIFO (named pipe), not an audio file",
        f"{meta}:3: audio file `{wavs / 'loop1.wav'}` is a symlink loop",
        f"{meta}:4: audio file `{wavs / 'dangling.wav'}` is a symlink to a missing file (`{wavs / 'nowhere.wav'}`)",
        f"{meta}:5: audio file `{wavs / 'null.wav'}` is a device file, not an audio file",
    ]
    assert sf_calls == []


@pytest.mark.parametrize("name", ["train.jsonl", "metadata.csv", "esd.list"])
def test_a_fifo_as_the_transcript_file_is_refused_without_hanging(tmp_path, name):
    (tmp_path / "wavs").mkdir()
    os.mkfifo(tmp_path / name)
    with deadline(20):
        for data in (tmp_path, tmp_path / name):
            err = errors_of(data)
            assert f"`{tmp_path / name}` is a FIFO (named pipe), not a regular file" in err.one_line()


# ------------------------------------------------------ undecodable names ---

def test_a_data_folder_whose_name_is_not_utf8(tmp_path, with_codec):
    data = tmp_path / os.fsdecode(b"corpus-\xff\xfe")
    tone(data / "wav" / "A_0001.wav")
    (data / "transcript_utf8.txt").write_text("A_0001:水をマレーシアから買わなくてはならないのです。\n"
                                              "A_0002:この音声はありません。\n", encoding="utf-8")
    err = errors_of(data, **with_codec)
    [detail] = err.details
    assert "\udcff" in detail and detail.endswith("A_0002.wav` is missing")
    printable = err.one_line().encode("utf-8", "backslashreplace").decode("utf-8")
    assert "corpus-\\udcff\\udcfe" in printable
    (data / "transcript_utf8.txt").write_text("A_0001:水をマレーシアから買わなくてはならないのです。\n", encoding="utf-8")
    report = load(data, **with_codec)
    [sample] = report.train + report.val
    assert isinstance(sample.source, str) and sample.source.startswith(str(data))
    assert os.fsencode(sample.source).startswith(os.fsencode(str(tmp_path)) + b"/corpus-\xff\xfe/")
    assert len(sample.codes) == 25
    json.dumps(report.summary())   # the --json report can be written
