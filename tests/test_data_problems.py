"""What reading a data set must never do, each as a kind of failure (#22, #28): eat rows after a
stray quote, report a messy folder one problem per run, count copies as samples (or put one in
both train and validation), give one layout another's hint, change the validation split when
the data grows on `--resume`, name speakers by 64-digit hashes, or keep quiet about what the
text normalisation does.

Audio is real (soundfile writes it, `decode_audio` reads it). Where only lengths matter, the
data is read as `--check-data` reads it without a codec: decoded, never encoded, so no model
runs; where codes matter, JSONL lines carry them.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune.data import load_dataset, split_record  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402


NO_CODEC = "could not load the codec `offline/xcodec2` (not downloaded): `hf download offline/xcodec2`"


def no_codec():
    raise AutotuneError(NO_CODEC)


def load(data, **kw):
    """As `--check-data` reads a folder when the codec is not there: every clip decoded."""
    kw.setdefault("max_length", 2048)
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("split_seed", 42)
    kw.setdefault("codec_loader", no_codec)
    kw.setdefault("codec_optional", True)
    return load_dataset(data, progress=False, cache_dir=Path(data) / ".." / "cache", **kw)


def errors_of(data, **kw) -> AutotuneError:
    with pytest.raises(AutotuneError) as info:
        load(data, **kw)
    return info.value


def clip(path: Path, seconds: float = 0.2, sr: int = 16_000) -> Path:
    """A short tone with a little noise seeded by the file name: clips differ, unless copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    noise = np.random.default_rng(zlib.crc32(path.stem.encode())).standard_normal(t.size)
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * noise).astype(np.float32), sr, subtype="PCM_16")
    return path


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(path: Path, items: list[dict]) -> Path:
    return write(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def codes(seed: int, n: int = 30) -> list[int]:
    return [int(v) for v in np.random.default_rng(seed).integers(0, 65536, n)]


# ------------------------------------------------- a stray quote in a CSV ---

def audiofolder(folder: Path, texts: list[str]) -> Path:
    for i in range(len(texts)):
        clip(folder / f"c{i:02d}.wav")
    return write(folder / "metadata.csv", "file_name,transcription\n"
                 + "".join(f"c{i:02d}.wav,{text}\n" for i, text in enumerate(texts)))


def test_a_stray_quote_is_an_error_at_its_line_and_eats_no_row(tmp_path):
    texts = [f"row {i}" for i in range(40)]
    texts[2] = '"He said hi, and left'          # opens a quote that nothing closes
    texts[30] = ""                               # a later problem: still found, so nothing after was eaten
    meta = audiofolder(tmp_path / "hf", texts)
    err = errors_of(tmp_path / "hf")
    assert err.details == [
        f"{meta}:4: a quoted field opened on this line runs over its line end into line 5, which reads as a row "
        "of its own: a stray `\"`? close the quote, or write a quote inside a quoted field as `\"\"`",
        f"{meta}:32: empty `transcription`",
        f"codec: {NO_CODEC}",   # one line of the same report
    ]
    texts[2], texts[30] = "fixed", "fixed too"
    meta = audiofolder(tmp_path / "hf", texts)
    report = load(tmp_path / "hf")
    assert len(report.train) + len(report.val) == 40


def test_a_quote_that_never_closes_before_the_end_is_an_error(tmp_path):
    meta = audiofolder(tmp_path / "hf", ["fine", '"open to the end'])
    assert errors_of(tmp_path / "hf").details == [
        f"{meta}:3: a quoted field opened on this line never closes before the end of the file: a stray `\"`? "
        "close the quote, or write a quote inside a quoted field as `\"\"`", f"codec: {NO_CODEC}"]


def test_a_quoted_transcript_may_span_lines_where_that_is_clearly_meant(tmp_path):
    clip(tmp_path / "hf" / "a.wav")
    clip(tmp_path / "hf" / "b.wav")
    meta = write(tmp_path / "hf" / "metadata.csv",
                 'file_name,transcription\na.wav,"two lines,\nthe second with a comma"\nb.wav,"x ""quoted"" y"\n')
    report = load(tmp_path / "hf")
    assert sorted((s.source, s.text) for s in report.train + report.val) == [
        (f"{meta}:2", "two lines,\nthe second with a comma"), (f"{meta}:4", 'x "quoted" y')]


def test_a_quoted_field_over_many_lines_is_a_stray_quote(tmp_path):
    clip(tmp_path / "hf" / "a.wav")
    body = "\n".join(f"line {i}" for i in range(30))
    meta = write(tmp_path / "hf" / "metadata.csv", f'file_name,transcription\na.wav,"{body}"\n')
    assert errors_of(tmp_path / "hf").details[0].startswith(
        f"{meta}:2: a quoted field opened on this line is still open after 21 lines (0.0 MB)")


def test_a_transcript_over_the_csv_field_limit_is_one_line(tmp_path):
    clip(tmp_path / "hf" / "a.wav")
    clip(tmp_path / "hf" / "b.wav")
    meta = write(tmp_path / "hf" / "metadata.csv", f"file_name,transcription\na.wav,{'x' * 200_000}\nb.wav,fine\n")
    assert errors_of(tmp_path / "hf").details[0] == (f"{meta}:2: malformed CSV (field larger than field limit "
                                                     "(131072))")


# ------------------------------------------------- a messy folder, one pass ---

def test_a_messy_folder_reports_every_problem_at_once(tmp_path):
    """#28: the Shift_JIS file came first; only after fixing it were the empty transcript and
    the clip without one reported. A NaN clip and a missing clip come in the same list."""
    folder = tmp_path / "messy"
    clip(folder / "a.wav")
    write(folder / "a.txt", "こんにちは、世界。\n", "cp932")
    clip(folder / "b.wav")
    write(folder / "b.txt", "   \n")
    clip(folder / "c.wav")                        # no transcript
    clip(folder / "d.wav")
    write(folder / "d.txt", "正しい文です。\n")
    wave = np.full(1_600, 0.1, np.float32)
    wave[800] = np.nan
    sf.write(folder / "e.wav", wave, 16_000, subtype="FLOAT")
    write(folder / "e.txt", "壊れた音声。\n")
    err = errors_of(folder)
    assert str(err) == "5 problems in the data; fix them or remove them"
    assert [d.split(": ", 2)[:2] for d in err.details] == [
        [str(folder / "b.txt:1"), "empty text"],
        [str(folder / "c.wav"), "no transcript"],
        [str(folder / "a.txt"), "a transcript looks like Shift_JIS (CP932) text, not UTF-8 (this one first)"],
        [str(folder / "e.txt:1"), f"audio file `{folder / 'e.wav'}`"],
        ["codec", NO_CODEC.split(": ")[0]],
    ]
    assert "NaN or infinite" in err.details[3]


def test_a_codec_that_cannot_load_is_one_line_among_the_data_problems(tmp_path):
    jsonl(tmp_path / "d" / "train.jsonl", [{"text": "", "code": [1]}, {"text": "x", "audio": "a.wav"}])
    clip(tmp_path / "d" / "a.wav")
    err = errors_of(tmp_path / "d", codec_optional=False)
    assert err.details[0].endswith(":1: empty `text`")
    assert err.details[-1].startswith("codec: could not load the codec `offline/xcodec2`")


# ------------------------------------------------------------ duplicates ---

def test_copies_in_a_backup_folder_are_kept_once_and_listed(tmp_path):
    folder = tmp_path / "voice"
    for name, text in (("a", "一つ目。"), ("b", "二つ目。"), ("c", "三つ目。"), ("d", "四つ目。")):
        clip(folder / f"{name}.wav")
        write(folder / f"{name}.txt", text)
    for name in "abc":   # the user's backup: the same clips and transcripts again
        (folder / "backup").mkdir(exist_ok=True)
        (folder / "backup" / f"{name}.wav").write_bytes((folder / f"{name}.wav").read_bytes())
        (folder / "backup" / f"{name}.txt").write_bytes((folder / f"{name}.txt").read_bytes())
    for seed in range(8):   # whatever the split, no copy lands in train and validation both
        report = load(folder, split_seed=seed, val_fraction=0.5)
        kept = report.train + report.val
        assert sorted(s.audio.name for s in kept) == ["a.wav", "b.wav", "c.wav", "d.wav"]
        assert all(s.audio.parent == folder for s in kept)
    assert sorted((d["source"], d["duplicate_of"], d["same_text"]) for d in report.duplicates) == [
        (f"{folder / 'backup' / n}.txt:1", f"{folder / n}.txt:1", True) for n in "abc"]
    assert report.summary()["duplicates"] == report.duplicates
    assert any(note.startswith("3 duplicate clips left out, each kept once") for note in report.notes)


def test_a_copy_in_the_validation_file_is_left_out_of_training(tmp_path):
    data = tmp_path / "d"
    jsonl(data / "train.jsonl", [{"text": f"t{i}", "code": codes(i)} for i in range(4)])
    jsonl(data / "val.jsonl", [{"text": "the same clip, named otherwise", "code": codes(2)}])
    report = load(data)
    assert [s.text for s in report.val] == ["the same clip, named otherwise"]
    assert [s.text for s in report.train] == ["t0", "t1", "t3"]
    [copy] = report.duplicates
    assert copy["source"] == f"{data / 'train.jsonl'}:3" and copy["duplicate_of"] == f"{data / 'val.jsonl'}:1"
    assert copy["reason"].endswith("(same codes, another transcript)")


def test_the_same_sentence_by_two_speakers_is_no_duplicate(tmp_path):
    data = tmp_path / "d"
    jsonl(data / "train.jsonl", [{"text": "同じ文。", "code": codes(1), "speaker": "a"},
                                 {"text": "同じ文。", "code": codes(2), "speaker": "b"}])
    report = load(data)
    assert len(report.train + report.val) == 2 and report.duplicates == []


# ------------------------------------------------------------ each layout's hint ---

CV_HEADER = "client_id\tpath\tsentence_id\tsentence\tup_votes\tdown_votes\n"


@pytest.mark.parametrize("build, hint", [
    (lambda d: (write(d / "validated.tsv", ""), (d / "clips").mkdir()),
     "add rows (`client_id`, `path`, `sentence`, ...) under its header for the clips in clips/"),
    (lambda d: (write(d / "validated.tsv", CV_HEADER), (d / "clips").mkdir()),
     "add rows (`client_id`, `path`, `sentence`, ...) under its header for the clips in clips/"),
    (lambda d: (write(d / "metadata.csv", ""), (d / "wavs").mkdir()), "add `id|text` lines for the clips in wavs/"),
    (lambda d: write(d / "esd.list", "\n"), "add `path|speaker|language|text` lines"),
    (lambda d: (write(d / "transcript_utf8.txt", ""), (d / "wav").mkdir()), "add `ID:text` lines"),
    (lambda d: write(d / "train.jsonl", ""), 'add lines of {"text": ..., "code": [...]}'),
])
def test_an_empty_transcript_file_gets_its_own_layouts_hint(tmp_path, build, hint):
    data = tmp_path / "d"
    data.mkdir()
    build(data)
    message = str(errors_of(data))
    assert message.startswith(f"`{data}` holds no samples: {hint}")
    assert ("code" in hint) == ('"code"' in message)   # the JSONL hint only for JSONL


# ----------------------------------------------------- the split on --resume ---

def test_a_recorded_split_keeps_validation_when_the_data_grows(tmp_path):
    data = tmp_path / "d"
    items = [{"text": f"t{i}", "code": codes(i)} for i in range(4)]
    jsonl(data / "train.jsonl", items)
    first = load(data, val_fraction=0.5)
    record = json.loads(json.dumps(split_record(first)))   # as split.json holds it
    # Two lines are inserted at the top: every line number moves, and a fresh split would differ.
    jsonl(data / "train.jsonl", [{"text": "new a", "code": codes(10)}, {"text": "new b", "code": codes(11)}] + items)
    fresh = load(data, val_fraction=0.5)
    assert sorted(s.text for s in fresh.val) != sorted(s.text for s in first.val)
    resumed = load(data, val_fraction=0.5, recorded_split=record)
    assert sorted(s.text for s in resumed.val) == sorted(s.text for s in first.val)
    assert sorted(s.text for s in resumed.train) == sorted([s.text for s in first.train] + ["new a", "new b"])
    assert (resumed.val_source, resumed.new_samples) == ("recorded", 2)
    assert any("2 samples new since then train" in note for note in resumed.notes)


def test_a_recorded_split_whose_samples_are_gone_is_one_line(tmp_path):
    data = tmp_path / "d"
    items = [{"text": f"t{i}", "code": codes(i)} for i in range(4)]
    jsonl(data / "train.jsonl", items)
    first = load(data, val_fraction=0.5)
    record = split_record(first)
    gone = first.val[0]
    jsonl(data / "train.jsonl", [item for item in items if item["text"] != gone.text])
    with pytest.raises(AutotuneError) as info:
        load(data, val_fraction=0.5, recorded_split=record)
    assert str(info.value) == (f"the data no longer holds 1 validation sample (e.g. {gone.source}) of the split the "
                               "run started with (split.json): put them back to resume, or start a new `--output-dir`")
    assert not info.value.details


def test_a_split_record_from_before_keys_is_followed_by_source(tmp_path):
    data = tmp_path / "d"
    jsonl(data / "train.jsonl", [{"text": f"t{i}", "code": codes(i)} for i in range(4)])
    first = load(data, val_fraction=0.5)
    old = {"val_source": "split", "val": [s.source for s in first.val], "train_count": 2, "skipped": []}
    with (data / "train.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "appended", "code": codes(9)}) + "\n")
    resumed = load(data, val_fraction=0.5, recorded_split=old)
    assert [s.source for s in resumed.val] == [s.source for s in first.val]
    assert resumed.new_samples == 1


# ------------------------------------------------------------- speakers ---

def test_hash_speaker_ids_get_short_unique_aliases(tmp_path):
    a, b, c = "3f9a" * 16, "3f9a3f9a" + "0" * 56, "b07c" * 16   # a and b share their first 8 digits
    data = tmp_path / "d"
    jsonl(data / "train.jsonl", [{"text": f"t{i}", "code": codes(i), "speaker": who} for i, who in enumerate((a, b, c))])
    report = load(data)
    assert report.speaker_ids == {a[:10]: a, b[:10]: b, c[:10]: c}
    assert sorted(report.speakers()) == sorted([a[:10], b[:10], c[:10]])
    jsonl(data / "train.jsonl", [{"text": f"t{i}", "code": codes(i), "speaker": who} for i, who in enumerate((a, c))])
    assert load(data).speaker_ids == {a[:8]: a, c[:8]: c}


# ------------------------------------------------------ text normalisation ---

def test_the_normalisation_in_force_and_what_it_changes_are_reported(tmp_path):
    data = tmp_path / "d"
    texts = ["今日は　いい天気！", "ＡＢＣ１２３です", "そのまま。", "ｶﾀｶﾅ〜"]
    jsonl(data / "train.jsonl", [{"text": t, "code": codes(i)} for i, t in enumerate(texts)])
    report = load(data, text_normalization="llasa-trainer")
    effect = report.summary()["text_normalization"]
    assert (effect["mode"], effect["changed"], effect["transcripts"]) == ("llasa-trainer", 3, 4)
    assert [(e["before"], e["after"]) for e in effect["examples"]] == [("今日は　いい天気！", "今日はいい天気!"),
                                                                       ("ＡＢＣ１２３です", "ABC123です")]
    assert "text normalisation `llasa-trainer`: changes 3 of 4 transcripts, e.g. `今日は　いい天気！` -> " \
           "`今日はいい天気!`; `ＡＢＣ１２３です` -> `ABC123です`" in report.notes
    plain = load(data)
    assert plain.summary()["text_normalization"]["changed"] == 0
    assert "text normalisation `none`: transcripts are used as written" in plain.notes


# ----------------------------------------------- checked without the codec ---

def test_without_a_codec_the_lengths_come_from_decoding(tmp_path):
    folder = tmp_path / "voice"
    clip(folder / "one.wav", seconds=1.0)
    clip(folder / "two.wav", seconds=2.0, sr=22_050)
    write(folder / "one.txt", "一秒。")
    write(folder / "two.txt", "二秒。")
    report = load(folder)
    assert sorted(s.code_count for s in report.train + report.val) == [50, 100]
    assert all(s.codes is None for s in report.train + report.val)   # nothing was encoded
    assert report.summary()["audio_seconds"] == 3.0
    assert report.codec_problem.startswith("could not load the codec `offline/xcodec2`")
    assert any(note.startswith("codec: could not load the codec") for note in report.notes)
