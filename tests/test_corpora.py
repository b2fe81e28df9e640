"""Corpus readers (autotune/corpora.py): each layout in its real shape, read through
`load_dataset` with the tiny random XCodec2, and named in `--check-data`.

The audio is written here with soundfile (0.5 s tones, 22,050 Hz like most
corpora; MP3 for Common Voice, FLAC/OGG where a layout allows any extension).
One codec cache serves the whole module: clips with the same bytes are encoded
once, which keeps these tests fast on a busy CPU.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune.data import find_layout, load_dataset  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402

JSUT_LINES = {
    "BASIC5000_0001": "水をマレーシアから買わなくてはならないのです。",
    "BASIC5000_0002": "木曜日、停戦会談は、何の進展もないまま終了しました。",
}
VOICEACTRESS = "また、東寺のように、五大明王と呼ばれる、主要な明王の中央に配されることも多い。"
CV_HEADER = ("client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents"
             "\tvariant\tlocale\tsegment")
CLIENT_A = "3f9a" * 16
CLIENT_B = "b07c" * 16
CODES_PER_CLIP = 25   # 0.5 s at 50 codes per second


# ----------------------------------------------------------------- helpers ---

def tone(path: Path, sr: int = 22_050) -> Path:
    """0.5 s in the format the suffix names (wav, flac, ogg, mp3), its pitch chosen by the
    file's place in its corpus (the last folders and its name, not the test's own folder):
    clips of one corpus differ (copies are a case of their own), and the same place in
    another test gives the same bytes, so the module's codec cache encodes it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(sr // 2) / sr
    place = "/".join(part for part in path.parts[-4:] if not part.startswith(("test_", "pytest-")))
    hz = 200 + 10 * (zlib.crc32(place.encode()) % 60)
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), sr)
    return path


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture(scope="module")
def tiny_codec():
    from autotune.codec import build_tiny_codec

    return build_tiny_codec()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Where `--check-data` runs would go; their codec cache, runs/.codec-cache, is this module's."""
    return tmp_path_factory.mktemp("shared") / "runs"


@pytest.fixture(scope="module")
def cache(runs) -> Path:
    return runs / ".codec-cache"


@pytest.fixture
def load(tiny_codec, cache):
    def run(data, **kw):
        kw.setdefault("max_length", 2048)
        kw.setdefault("val_fraction", 0.1)
        kw.setdefault("split_seed", 42)
        return load_dataset(data, codec_loader=lambda: tiny_codec, cache_dir=cache, progress=False, **kw)
    return run


def samples(report) -> list:
    return sorted(report.train + report.val, key=lambda s: s.source)


def errors_of(load, data, **kw) -> AutotuneError:
    with pytest.raises(AutotuneError) as info:
        load(data, **kw)
    return info.value


def jsut_subcorpus(folder: Path, lines: dict[str, str], ext: str = ".wav") -> Path:
    write(folder / "transcript_utf8.txt", "".join(f"{k}:{v}\n" for k, v in lines.items()))
    for i, clip in enumerate(lines):
        tone(folder / "wav" / f"{clip}{ext}")
    return folder


def jvs_corpus(root: Path) -> Path:
    """jvs_ver1/jvsNNN/<subset>/transcripts_utf8.txt + wav24kHz16bit/, as shipped."""
    subsets = {("jvs001", "parallel100"): {"VOICEACTRESS100_001": VOICEACTRESS},
               ("jvs001", "nonpara30"): {"BASIC5000_0025": JSUT_LINES["BASIC5000_0001"]},
               ("jvs002", "parallel100"): {"VOICEACTRESS100_001": VOICEACTRESS}}
    for (speaker, subset), lines in subsets.items():
        folder = root / speaker / subset
        write(folder / "transcripts_utf8.txt", "".join(f"{k}:{v}\n" for k, v in lines.items()))
        for clip in lines:
            tone(folder / "wav24kHz16bit" / f"{clip}.wav", sr=24_000)
    write(root / "README.txt", "JVS corpus\n")
    return root


def common_voice(folder: Path, files=("validated.tsv",)) -> Path:
    rows = [(CLIENT_A, "common_voice_ja_1.mp3", "今日は\"いい\"天気ですね。"),
            (CLIENT_B, "common_voice_ja_2.mp3", "駅まで歩いて十分です。"),
            (CLIENT_A, "common_voice_ja_3.mp3", "Hello, \"world\" — it's me.")]
    for i, (_, name, _) in enumerate(rows):
        tone(folder / "clips" / name)
    for name in files:
        chosen = rows if name in ("validated.tsv", "train.tsv") else rows[:1]
        write(folder / name, CV_HEADER + "\n" + "".join(
            f"{client}\t{clip}\t{i}abc\t{text}\t\t2\t0\t\t\t\t\tja\t\n" for i, (client, clip, text) in enumerate(chosen)))
    return folder


# ---------------------------------------------------------------- layouts ---

def test_jsut_subcorpus_its_transcript_file_and_the_corpus_root(tmp_path, load):
    root = tmp_path / "jsut_ver1.1"
    basic = jsut_subcorpus(root / "basic5000", JSUT_LINES)
    jsut_subcorpus(root / "voiceactress100", {"VOICEACTRESS100_001": VOICEACTRESS})
    write(root / "README.md", "JSUT\n")
    one = load(basic)
    assert one.layout == "jsut"
    got = samples(one)
    assert [s.text for s in got] == list(JSUT_LINES.values())
    assert [s.audio for s in got] == [basic / "wav" / f"{k}.wav" for k in JSUT_LINES]
    assert [s.source for s in got] == [f"{basic / 'transcript_utf8.txt'}:{n}" for n in (1, 2)]
    assert all(s.speaker is None and len(s.codes) == CODES_PER_CLIP for s in got)
    by_file = load(basic / "transcript_utf8.txt")
    assert by_file.layout == "jsut" and [s.text for s in samples(by_file)] == list(JSUT_LINES.values())
    whole = load(root)
    assert whole.layout == "jsut"
    assert sorted(s.text for s in samples(whole)) == sorted([*JSUT_LINES.values(), VOICEACTRESS])


def test_jvs_root_speaker_folder_and_subset_name_the_speaker(tmp_path, load):
    root = jvs_corpus(tmp_path / "jvs_ver1")
    report = load(root)
    assert report.layout == "jvs"
    got = samples(report)
    assert [(s.speaker, s.audio.parent.parent.name) for s in got] == [
        ("jvs001", "nonpara30"), ("jvs001", "parallel100"), ("jvs002", "parallel100")]
    assert [s.text for s in got] == [JSUT_LINES["BASIC5000_0001"], VOICEACTRESS, VOICEACTRESS]
    assert all(len(s.codes) == CODES_PER_CLIP for s in got)  # 24 kHz resampled to 16 kHz
    speaker = load(root / "jvs001")
    assert speaker.layout == "jvs" and {s.speaker for s in samples(speaker)} == {"jvs001"}
    assert len(samples(speaker)) == 2
    subset = load(root / "jvs002" / "parallel100")
    assert subset.layout == "jvs" and [s.speaker for s in samples(subset)] == ["jvs002"]
    assert find_layout(root / "jvs002" / "parallel100" / "transcripts_utf8.txt")[0] == "jvs"


def test_common_voice_validated_tsv_with_mp3_clips_and_client_ids(tmp_path, load):
    # soundfile reads MP3 with libsndfile >= 1.1; the real corpus ships MP3 only.
    cv = common_voice(tmp_path / "cv-corpus-17.0" / "ja", files=("validated.tsv", "train.tsv", "dev.tsv", "test.tsv"))
    write(cv / "validated_sentences.tsv", "sentence_id\tsentence\n1\tx\n")
    report = load(cv)
    assert report.layout == "common-voice"
    assert report.val_source == "split"  # validated.tsv holds dev.tsv's clips too: our own split
    got = samples(report)
    assert [s.text for s in got] == ["今日は\"いい\"天気ですね。", "駅まで歩いて十分です。", "Hello, \"world\" — it's me."]
    # A client_id is a 64-digit hash: its first 8 digits name the speaker (prompts, `--speaker`).
    assert [s.speaker for s in got] == [CLIENT_A[:8], CLIENT_B[:8], CLIENT_A[:8]]
    assert report.speaker_ids == {CLIENT_A[:8]: CLIENT_A, CLIENT_B[:8]: CLIENT_B}
    assert [s.audio.name for s in got] == [f"common_voice_ja_{n}.mp3" for n in (1, 2, 3)]
    assert all(len(s.codes) == CODES_PER_CLIP for s in got)
    assert [s.source for s in got] == [f"{cv / 'validated.tsv'}:{n}" for n in (2, 3, 4)]
    assert load(cv / "validated.tsv").layout == "common-voice"


def test_common_voice_without_validated_tsv_uses_train_and_dev(tmp_path, load):
    cv = common_voice(tmp_path / "cv", files=("train.tsv", "dev.tsv"))
    report = load(cv)
    assert (report.layout, report.val_source) == ("common-voice", "file")
    # This dev.tsv names a clip train.tsv has too: validation keeps it, training leaves its copy out.
    assert (len(report.train), len(report.val)) == (2, 1)
    assert report.val[0].source == f"{cv / 'dev.tsv'}:2"
    assert [(d["source"], d["duplicate_of"]) for d in report.duplicates] == [(f"{cv / 'train.tsv'}:2",
                                                                             f"{cv / 'dev.tsv'}:2")]


def test_common_voice_rows_are_checked_by_position(tmp_path, load):
    cv = common_voice(tmp_path / "cv")
    with (cv / "validated.tsv").open("a", encoding="utf-8") as handle:
        handle.write(f"{CLIENT_A}\tmissing.mp3\t9\tどこ？\n{CLIENT_A}\tonly-two-columns\n{CLIENT_B}\t\t9\tno path\n")
    err = errors_of(load, cv)
    p = cv / "validated.tsv"
    assert err.details == [f"{p}:5: audio file `{cv / 'clips' / 'missing.mp3'}` is missing",
                           f"{p}:6: expected 13 tab-separated columns, found 2",
                           f"{p}:7: empty `path`"]
    write(p, "client_id\tfile\ttext\nx\ty\tz\n")
    assert errors_of(load, cv).details == [f"{p}:1: no `path` and `sentence` columns in the first line, as Common "
                                           "Voice's .tsv files have (found client_id, file, text): check the file"]


@pytest.mark.parametrize("column", ["transcription", "text", "sentence"])
def test_audiofolder_metadata_csv_is_real_csv(tmp_path, load, column):
    folder = tmp_path / "my_dataset"
    tone(folder / "data" / "a.wav")
    tone(folder / "b.flac")
    tone(folder / "c.wav")
    write(folder / "metadata.csv",
          f"file_name,{column},speaker\r\n"
          "data/a.wav,\"Hello, world: a comma, and \"\"quotes\"\"\",alice\r\n"
          "b.flac,\"a transcript\nover two lines\",bob\r\n"
          "c.wav,こんにちは、世界,alice\r\n")
    report = load(folder)
    assert report.layout == "audiofolder"
    got = samples(report)
    meta = folder / "metadata.csv"
    assert [(s.source, s.text, s.speaker) for s in got] == [
        (f"{meta}:2", 'Hello, world: a comma, and "quotes"', "alice"),
        (f"{meta}:3", "a transcript\nover two lines", "bob"),
        (f"{meta}:5", "こんにちは、世界", "alice"),   # the record above spans lines 3-4
    ]
    assert [s.audio for s in got] == [folder / "data" / "a.wav", folder / "b.flac", folder / "c.wav"]
    assert load(meta).layout == "audiofolder"


def test_audiofolder_metadata_jsonl(tmp_path, load):
    folder = tmp_path / "hf"
    tone(folder / "a.wav")
    tone(folder / "b.ogg")
    write(folder / "metadata.jsonl", "\n".join(json.dumps(item, ensure_ascii=False) for item in [
        {"file_name": "a.wav", "transcription": "一つ目"},
        {"file_name": "b.ogg", "sentence": "second", "speaker": "s2"},
    ]) + "\n")
    report = load(folder)
    assert report.layout == "audiofolder"
    assert [(s.text, s.speaker, s.audio.name) for s in samples(report)] == [("一つ目", None, "a.wav"),
                                                                            ("second", "s2", "b.ogg")]
    with (folder / "metadata.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"file_name": "a.wav"}\n{"transcription": "no audio"}\n')
    err = errors_of(load, folder / "metadata.jsonl")
    assert err.details == [f"{folder / 'metadata.jsonl'}:3: missing `transcription` (or `text`)",
                           f"{folder / 'metadata.jsonl'}:4: missing `file_name`"]


def test_audiofolder_with_split_folders(tmp_path, load):
    folder = tmp_path / "hf"
    for split, text in (("train", "学習用"), ("validation", "検証用"), ("test", "評価用")):
        tone(folder / split / "a.wav")
        write(folder / split / "metadata.csv", f"file_name,transcription\na.wav,{text}\n")
    report = load(folder)
    assert (report.layout, report.val_source) == ("audiofolder", "file")
    assert [s.text for s in report.train] == ["学習用"] and [s.text for s in report.val] == ["検証用"]
    assert report.val[0].audio == folder / "validation" / "a.wav"   # test/ stays held out


def test_ljspeech_and_audiofolder_share_a_name_and_are_told_apart(tmp_path, load):
    lj = tmp_path / "LJSpeech-1.1"
    tone(lj / "wavs" / "LJ001-0001.wav")
    write(lj / "metadata.csv", "LJ001-0001|Printing, in 1480|Printing, in fourteen eighty\n")
    hf = tmp_path / "hf"
    tone(hf / "LJ001-0001.wav")
    write(hf / "metadata.csv", "file_name,transcription\nLJ001-0001.wav,\"Printing, in 1480\"\n")
    assert [load(d).layout for d in (lj, hf)] == ["ljspeech", "audiofolder"]
    assert samples(load(lj))[0].text == "Printing, in 1480"   # LJSpeech's column 2, the text as read
    assert samples(load(lj, ljspeech_column="normalized"))[0].text == "Printing, in fourteen eighty"
    assert samples(load(hf))[0].text == "Printing, in 1480"


def test_ljspeech_clips_in_any_format_soundfile_reads(tmp_path, load):
    lj = tmp_path / "lj"
    tone(lj / "wavs" / "a.flac")
    tone(lj / "wavs" / "b.ogg")
    tone(lj / "wavs" / "c.wav")
    tone(lj / "wavs" / "c.mp3")     # ID.wav is preferred when there are several
    tone(lj / "wavs" / "d.wav")
    (lj / "wavs" / "._a.flac").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    write(lj / "metadata.csv", "a|flac clip\nb|ogg clip\nc|wav clip\nd.wav|an id written with its extension\n")
    report = load(lj)
    assert report.layout == "ljspeech"
    assert [s.audio.name for s in samples(report)] == ["a.flac", "b.ogg", "c.wav", "d.wav"]
    assert all(len(s.codes) == CODES_PER_CLIP for s in samples(report))


def test_esd_list_paths_resolve_as_style_bert_vits2_writes_them(tmp_path, load):
    model = tmp_path / "Data" / "mymodel"
    tone(model / "wavs" / "a.wav")
    tone(model / "raw" / "only_raw.wav")
    tone(model / "wavs" / "c.wav")
    tone(model / "wavs" / "d.wav")
    tone(model / "e.wav")
    lines = [
        "a.wav|spk1|JP|ファイル名だけ。",                              # bare name -> wavs/
        "only_raw.wav|spk1|JP|raw にだけある。",                         # bare name -> raw/
        "Data/mymodel/wavs/c.wav|spk2|JP|リポジトリからの相対パス。",     # SBV2's own relative path
        "C:\\Users\\me\\sbv2\\Data\\mymodel\\wavs\\d.wav|spk2|EN|a | inside the text",  # from Windows
        f"{model / 'e.wav'}|spk3|ZH|absolute, inside the folder",
    ]
    write(model / "esd.list", "\n".join(lines) + "\n")
    report = load(model)
    assert report.layout == "esd-list"
    got = samples(report)
    assert [s.audio for s in got] == [model / "wavs" / "a.wav", model / "raw" / "only_raw.wav",
                                      model / "wavs" / "c.wav", model / "wavs" / "d.wav", model / "e.wav"]
    assert [s.speaker for s in got] == ["spk1", "spk1", "spk2", "spk2", "spk3"]
    assert [s.text for s in got] == ["ファイル名だけ。", "raw にだけある。", "リポジトリからの相対パス。",
                                     "a | inside the text", "absolute, inside the folder"]
    assert load(model / "esd.list").layout == "esd-list"
    write(model / "esd.list", "gone.wav|spk1|JP|どこにもない\nno columns\n")
    err = errors_of(load, model)
    assert err.details == [
        f"{model / 'esd.list'}:1: audio file `{model / 'gone.wav'}` is missing "
        "(nor is `gone.wav` in wavs/, raw/ or beside the list)",
        f"{model / 'esd.list'}:2: expected `path|speaker|language|text`",
    ]


def test_preprocessed_train_and_val_lists(tmp_path, load):
    model = tmp_path / "model"
    tone(model / "wavs" / "a.wav")
    tone(model / "wavs" / "b.wav")
    write(model / "train.list", "Data/model/wavs/a.wav|spk|JP|こんにちは。|_ k o N n i ch i w a . _|0 0 1 1 0 0 0 0 0 0 0 0|1 4 4 2 1\n")
    write(model / "val.list", "Data/model/wavs/b.wav|spk|JP|さようなら。|_ s a y o o n a r a . _|0 0 1 1 0 0 0 0 0 0 0 0|1 4 4 2 1\n")
    report = load(model)
    assert (report.layout, report.val_source) == ("esd-list", "file")
    assert [s.text for s in report.train] == ["こんにちは。"] and [s.text for s in report.val] == ["さようなら。"]


def test_audio_files_with_same_named_txt_or_lab(tmp_path, load):
    folder = tmp_path / "clips"
    tone(folder / "a.wav")
    write(folder / "a.txt", "一行目\n二行目\n")
    tone(folder / "sub" / "b.flac")
    write(folder / "sub" / "b.lab", "a plain transcript, as Montreal Forced Aligner reads it\n")
    write(folder / "README.txt", "not a transcript of any clip\n")
    (folder / "._a.wav").write_bytes(b"\x00\x05\x16\x07")
    report = load(folder)
    assert report.layout == "audio+txt"
    assert [(s.text, s.audio, s.source) for s in samples(report)] == [
        ("一行目 二行目", folder / "a.wav", f"{folder / 'a.txt'}:1"),
        ("a plain transcript, as Montreal Forced Aligner reads it", folder / "sub" / "b.flac",
         f"{folder / 'sub' / 'b.lab'}:1"),
    ]
    tone(folder / "c.wav")
    tone(folder / "d.wav")
    write(folder / "d.lab", "0 3125000 silB\n3125000 4000000 k\n4000000 5000000 a\n")  # HTK phoneme timings
    err = errors_of(load, folder)
    assert err.details == [
        f"{folder / 'c.wav'}: no transcript: add `c.txt` beside it, or remove the clip",
        f"{folder / 'd.lab'}:1: is a phoneme label file (`start end phoneme` lines), not a transcript: "
        "put the sentence in a .txt of the same name",
    ]


# ------------------------------------------------ llasa-trainer's raw layout ---

LLASA_TRAINER_LINES = {"file001": "こんにちは、今日はいい天気ですね。", "file002": "ありがとう: ございます。"}


def llasa_trainer(folder: Path, lines: list[str]) -> Path:
    """audio/ (wav, and an mp3 as `--ext .mp3` allows) beside text.txt, as its README lays it out."""
    tone(folder / "audio" / "file001.wav")
    tone(folder / "audio" / "file002.mp3")
    write(folder / "text.txt", "".join(line + "\n" for line in lines))
    return folder


@pytest.mark.parametrize("lines, how", [
    ([f"{k}:{v}" for k, v in LLASA_TRAINER_LINES.items()], "`:` between ID, then text"),
    ([f"{k}\t{v}" for k, v in LLASA_TRAINER_LINES.items()], "a tab between ID, then text"),
    ([f"{v}\t{k}" for k, v in LLASA_TRAINER_LINES.items()], "a tab between text, then ID"),   # --file_index 1
    ([f"{v}:{k}" for k, v in LLASA_TRAINER_LINES.items()], "`:` between text, then ID"),
])
def test_llasa_trainers_audio_and_text_txt_read_with_no_edits(tmp_path, load, lines, how):
    folder = llasa_trainer(tmp_path / "dataset", lines)
    report = load(folder)
    assert report.layout == "llasa-trainer"
    assert {s.audio.name: s.text for s in samples(report)} == {"file001.wav": LLASA_TRAINER_LINES["file001"],
                                                               "file002.mp3": LLASA_TRAINER_LINES["file002"]}
    text_txt = folder / "text.txt"
    assert f"`{text_txt}` read as llasa-trainer's text.txt: {how} (2 of the first 2 lines name a clip in audio/ so)" \
        in report.notes
    assert load(text_txt).layout == "llasa-trainer"


def test_llasa_trainer_lines_that_do_not_fit_are_listed(tmp_path, load):
    folder = llasa_trainer(tmp_path / "dataset", ["file001:一つ目。", "file002:二つ目。", "no separator here",
                                                  "file003:音声がない。"])
    err = errors_of(load, folder)
    text_txt = folder / "text.txt"
    assert err.details == [f"{text_txt}:3: expected `ID:text`",
                           f"{text_txt}:4: audio file `{folder / 'audio' / 'file003.wav'}` is missing"]
    write(text_txt, "what:ever\n")
    assert errors_of(load, folder).details[0].startswith(f"{text_txt}: no line names a clip in `{folder / 'audio'}`")


# ---------------------------------------------------- Style-Bert-VITS2 root ---

def test_a_style_bert_vits2_install_root_points_to_a_models_folder(tmp_path):
    install = tmp_path / "Style-Bert-VITS2"
    for name in ("amitaro", "jvnv"):
        write(install / "Data" / name / "esd.list", f"{name}_0.wav|{name}|JP|こんにちは。\n")
        (install / "Data" / name / "raw").mkdir()
    write(install / "app.py", "")
    (install / "model_assets").mkdir()
    for data, where in ((install, "a Style-Bert-VITS2 install"), (install / "Data", "Style-Bert-VITS2's Data/ folder")):
        with pytest.raises(AutotuneError) as info:
            find_layout(data)
        assert str(info.value) == (f"`{data}` looks like {where}, not one data set: pass one model's folder, e.g. "
                                   f"`--data {install / 'Data' / 'amitaro'}` (its esd.list and audio); models here: "
                                   "amitaro, jvnv")
    assert find_layout(install / "Data" / "amitaro")[0] == "esd-list"


# ------------------------------------------------------ unreadable folders ---

def _jsut_without_transcript(d: Path) -> None:
    tone(d / "wav" / "BASIC5000_0001.wav")


@pytest.mark.parametrize("build, message", [
    (_jsut_without_transcript, "looks like JSUT (wav/ found) but transcript_utf8.txt is missing"),
    (lambda d: write(d / "transcript_utf8.txt", "A:b\n"),
     "looks like JSUT (transcript_utf8.txt found) but wav/ is missing: put the audio in"),
    (lambda d: tone(d / "clips" / "x.mp3"), "looks like Common Voice (clips/ found) but validated.tsv (or train.tsv)"),
    (lambda d: write(d / "validated.tsv", CV_HEADER + "\n"),
     "looks like Common Voice (validated.tsv found) but clips/ is missing"),
    (lambda d: tone(d / "wavs" / "x.wav"), "looks like LJSpeech or Style-Bert-VITS2 (wavs/ found) but metadata.csv"),
    (lambda d: write(d / "metadata.csv", "a|b\n"), "looks like LJSpeech (metadata.csv found) but wavs/ is missing"),
    (lambda d: (d / "jvs001" / "parallel100").mkdir(parents=True), "looks like JVS (jvs001/ found)"),
    (lambda d: (tone(d / "a.wav"), tone(d / "b.flac")), "holds 2 audio files (e.g. `"),
    (lambda d: write(d / "notes.md", "x"), "holds no train.jsonl, no .jsonl file and no metadata.csv, nor another"),
])
def test_a_folder_we_cannot_read_names_the_closest_layout(tmp_path, build, message):
    folder = tmp_path / "data"
    folder.mkdir()
    build(folder)
    with pytest.raises(AutotuneError) as info:
        find_layout(folder)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and not info.value.details


def test_a_lone_txt_without_audio_beside_it_is_refused(tmp_path):
    write(tmp_path / "notes.txt", "A:b\n")
    with pytest.raises(AutotuneError, match="no wav/, wav24kHz16bit/ or audio/ folder is beside it"):
        find_layout(tmp_path / "notes.txt")


# ----------------------------------------------- Shift_JIS hint round trip ---

def _ljspeech_sjis(d: Path) -> Path:
    tone(d / "wavs" / "a.wav")
    return write(d / "metadata.csv", "a|こんにちは、世界。\n", "cp932")


def _esd_sjis(d: Path) -> Path:
    tone(d / "wavs" / "a.wav")
    return write(d / "esd.list", "a.wav|話者|JP|こんにちは、世界。\n", "cp932")


def _jsut_sjis(d: Path) -> Path:
    tone(d / "wav" / "a.wav")
    return write(d / "transcript_utf8.txt", "a:こんにちは、世界。\n", "cp932")


def _audiofolder_sjis(d: Path) -> Path:
    tone(d / "a.wav")
    return write(d / "metadata.csv", "file_name,transcription\na.wav,こんにちは、世界。\n", "cp932")


@pytest.mark.skipif(shutil.which("iconv") is None, reason="needs iconv")
@pytest.mark.parametrize("build, layout", [(_ljspeech_sjis, "ljspeech"), (_esd_sjis, "esd-list"),
                                           (_jsut_sjis, "jsut"), (_audiofolder_sjis, "audiofolder")])
def test_the_shift_jis_hint_gives_a_file_that_reads(tmp_path, load, build, layout):
    folder = tmp_path / "my data"    # a space: the command must quote it
    original = build(folder)
    err = errors_of(load, folder)
    assert len(err.details) == 1 and f"{original}: looks like Shift_JIS (CP932) text, not UTF-8" in err.details[0]
    command = re.search(r"`(iconv [^`]+)`", err.details[0]).group(1)
    data_arg = shlex.split(re.search(r"`--data ([^`]+)`", err.details[0]).group(1))
    assert len(data_arg) == 1 and Path(data_arg[0]).parent == original.parent
    subprocess.run(command, shell=True, check=True)
    report = load(data_arg[0])
    assert report.layout == layout
    assert [s.text for s in samples(report)] == ["こんにちは、世界。"]


@pytest.mark.skipif(shutil.which("iconv") is None or shutil.which("find") is None, reason="needs iconv and find")
def test_the_hint_for_shift_jis_clip_transcripts_converts_them_in_place(tmp_path, load):
    folder = tmp_path / "clips"
    tone(folder / "a.wav")
    write(folder / "a.txt", "こんにちは。\n", "cp932")
    tone(folder / "sub" / "b.wav")
    write(folder / "sub" / "b.lab", "さようなら。\n", "cp932")
    tone(folder / "c.wav")
    write(folder / "c.txt", "もう UTF-8 です。\n")
    err = errors_of(load, folder)
    # One problem for the folder, not one per file, with one command that converts them all.
    assert err.details == [f"{folder / 'a.txt'}: 2 transcripts look like Shift_JIS (CP932) text, not UTF-8 (this "
                           f"one first): {err.details[0].split('(this one first): ', 1)[1]}"]
    subprocess.run(re.search(r"`(find [^`]+)`", err.details[0]).group(1), shell=True, check=True)
    report = load(folder)
    assert [s.text for s in samples(report)] == ["こんにちは。", "もう UTF-8 です。", "さようなら。"]


# --------------------------------------------------- --check-data end to end ---

def check_data_json(capsys, data: Path, runs: Path) -> dict:
    import train

    code = train.main(["--data", str(data), "--check-data", "--json", "--model", "tiny", "--codec", "tiny",
                       "--output-dir", str(runs / "r1")])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.mark.parametrize("corpus, layout, count", [
    (lambda d: jsut_subcorpus(d, JSUT_LINES), "jsut", 2),
    (lambda d: common_voice(d), "common-voice", 3),
    (lambda d: _esd_sjis(d).write_text("a.wav|話者|JP|こんにちは、世界。\n", encoding="utf-8"), "esd-list", 1),
])
def test_check_data_names_the_layout(tmp_path, capsys, runs, corpus, layout, count):
    data = tmp_path / "corpus"
    corpus(data)
    out = check_data_json(capsys, data, runs)
    assert out["layout"] == layout
    assert out["train_samples"] + out["val_samples"] == count
    assert out["audio_seconds"] == count * 0.5


# -------------------------------------------- to a trained adapter, unedited ---

def esd_list(folder: Path) -> Path:
    """Style-Bert-VITS2's layout: esd.list naming clips in wavs/ by bare name, two speakers."""
    lines = [("a.wav", "あおい", "こんにちは、世界。"), ("b.wav", "あおい", "今日はいい天気ですね。"),
             ("c.wav", "そら", "駅まで歩いて十分です。")]
    for name, _, _ in lines:
        tone(folder / "wavs" / name)
    write(folder / "esd.list", "".join(f"{name}|{speaker}|JP|{text}\n" for name, speaker, text in lines))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("corpus, layout", [
    (lambda d: jsut_subcorpus(d, {**JSUT_LINES, "BASIC5000_0003": "駅まで歩いて十分です。"}), "jsut"),
    (common_voice, "common-voice"),
    (esd_list, "esd-list"),
])
def test_a_new_user_with_their_corpus_reaches_a_trained_adapter(tmp_path, corpus, layout):
    """The first hour: the folder as the corpus ships it, `--codec tiny`, no file edited."""
    import train

    data = corpus(tmp_path / "corpus")
    out = tmp_path / "runs" / "voice"
    code = train.main(["--data", str(data), "--model", "tiny", "--codec", "tiny", "--auto", "--output-dir", str(out),
                       "--set", "training.max_steps=2", "--set", "samples.max_new_tokens=8"])
    assert code == 0
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2 and summary["adapter_saved"]
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"({layout} layout)" in card and "synthesize.py --adapter" in card
