"""Tests of autotune.data: layouts, validation messages, splitting, audio, Llasa samples.

Real code throughout: the tiny byte-level tokenizer with Llasa's layout, the tiny
random XCodec2 on WAV files written here, and small tokenizers built offline with
`tokenizers` where another tokenizer is the point.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune.audio import write_wav  # noqa: E402
from autotune.batches import LlasaCollator, build_example, build_examples
from autotune.data import drop_too_long, find_layout, load_dataset, measure, split, split_record
from autotune.llasa import MAX_CODE
from autotune.reading import Sample
from autotune.errors import AutotuneError  # noqa: E402
from autotune.llasa import (  # noqa: E402
    ESTIMATED_TEMPLATE_TOKENS,
    LLAMA3_CHAT_TEMPLATE,
    LLASA_SPECIALS,
    NUM_SPEECH_TOKENS,
    LlasaTokens,
    PromptBuilder,
    build_tiny_tokenizer,
    chat_messages,
    speech_token,
)

JAPANESE = "こんにちは、今日はいい天気ですね。　全角スペースも「記号」も残る😀"
TEXTS = [
    "Hello world.",
    JAPANESE,
    "  leading and trailing spaces  ",
    "東京駅から新幹線で大阪まで二時間半。",
    "Numbers 1234 and symbols <|> & \"quotes\".",
    "改行なし、タブ\tあり",
    "ｶﾀｶﾅ（半角）と Ｆｕｌｌｗｉｄｔｈ",
]


# ----------------------------------------------------------------- helpers ---

def codes(n: int, seed: int | str = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(MAX_CODE + 1) for _ in range(n)]


def line(text: str = "hello", n: int = 20, seed: int | str = 0, key: str = "code", **extra) -> str:
    return json.dumps({"text": text, key: codes(n, seed), **extra}, ensure_ascii=False)


def write_lines(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8"))
    return path


def dataset(folder: Path, count: int, name: str = "train.jsonl", n: int = 20, prefix: str = "s") -> Path:
    # Each sample its own clip (its own codes): copies are a case of their own (see the duplicate tests).
    return write_lines(folder / name, [line(f"{prefix}{i} {JAPANESE}", n=n, seed=f"{prefix}{i}") for i in range(count)])


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


def chirp(seconds: float, sr: int = 16_000, seed: int = 0) -> np.ndarray:
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def builder(tok):
    return PromptBuilder(tok)


@pytest.fixture(scope="module")
def tiny_codec():
    from autotune.codec import build_tiny_codec

    return build_tiny_codec()


@pytest.fixture
def codec_loader(tiny_codec):
    calls = []

    def loader():
        calls.append(1)
        return tiny_codec

    loader.calls = calls
    return loader


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------- layouts ---

def test_train_jsonl_alone_is_split_10_percent(tmp_path):
    dataset(tmp_path, 50)
    report = load(tmp_path)
    assert report.layout == "train"
    assert report.val_source == "split"
    assert (len(report.train), len(report.val)) == (45, 5)
    assert all(len(s.codes) == 20 and s.codes.dtype == np.int32 for s in report.train + report.val)


def test_train_and_val_jsonl(tmp_path):
    dataset(tmp_path, 12)
    dataset(tmp_path, 3, name="val.jsonl", prefix="v")
    report = load(tmp_path)
    assert report.layout == "train+val"
    assert report.val_source == "file"
    assert (len(report.train), len(report.val)) == (12, 3)
    assert all(s.text.startswith("v") for s in report.val)
    assert all(s.source.startswith(str(tmp_path / "val.jsonl") + ":") for s in report.val)


def test_single_jsonl_in_a_folder_and_the_file_itself(tmp_path):
    path = dataset(tmp_path, 20, name="all_data.jsonl")
    by_folder = load(tmp_path)
    by_file = load(path)
    assert by_folder.layout == "single-jsonl"
    assert by_file.layout == "jsonl"
    for report in (by_folder, by_file):
        assert (len(report.train), len(report.val)) == (18, 2)
    assert split_record(by_folder) == split_record(by_file)


def test_layout_errors_say_what_to_do(tmp_path):
    with pytest.raises(AutotuneError, match="does not exist"):
        find_layout(tmp_path / "nope")
    with pytest.raises(AutotuneError, match="no train.jsonl, no .jsonl file and no metadata.csv"):
        find_layout(tmp_path)
    dataset(tmp_path, 2, name="a.jsonl")
    dataset(tmp_path, 2, name="b.jsonl")
    with pytest.raises(AutotuneError, match=r"several .jsonl files \(a.jsonl, b.jsonl\).*train.jsonl"):
        find_layout(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AutotuneError, match="not a .jsonl file or metadata.csv"):
        find_layout(tmp_path / "notes.txt")


def test_codes_alias_and_speaker(tmp_path):
    write_lines(tmp_path / "train.jsonl", [
        line("with code", n=5, seed=1),
        line("with codes", n=7, seed=2, key="codes", speaker="alice"),
        line("int speaker", n=3, seed=3, speaker=7),
    ])
    report = load(tmp_path, val_fraction=0.01)
    by_text = {s.text: s for s in report.train + report.val}
    assert by_text["with codes"].codes.tolist() == codes(7, 2)
    assert by_text["with codes"].speaker == "alice"
    assert by_text["with code"].codes.tolist() == codes(5, 1)
    assert by_text["with code"].speaker is None
    assert by_text["int speaker"].speaker == "7"


def test_codes_at_both_ends_of_the_range_are_kept(tmp_path):
    write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "edge", "code": [0, MAX_CODE, 0]})])
    report = load(tmp_path)
    assert report.train[0].codes.tolist() == [0, MAX_CODE, 0]


def test_japanese_and_non_ascii_text_is_kept_byte_exact(tmp_path, builder, tok):
    texts = [JAPANESE, "  前後の空白  ", "e\u0301 (NFD) vs \u00e9 (NFC)", "\u3000全角で始まる", "emoji 👩‍👩‍👧 end "]
    lines = [line(t, n=4, seed=i) for i, t in enumerate(texts)]
    lines.append(json.dumps({"text": "escaped \u65e5\u672c", "code": [1]}, ensure_ascii=True))
    write_lines(tmp_path / "train.jsonl", lines)
    report = load(tmp_path, eval_data=write_lines(tmp_path / "v" / "val.jsonl", [line("v", n=2)]),
                  prompt_builder=builder)
    got = {s.source: s.text for s in report.train}
    for number, text in enumerate(texts + ["escaped 日本"], start=1):
        kept = got[f"{tmp_path / 'train.jsonl'}:{number}"]
        assert kept.encode("utf-8") == text.encode("utf-8")
    # ...and the prompt carries those exact bytes (the tiny tokenizer is byte-level).
    example = build_example(report.train[0], builder)
    start = len(builder.prefix_ids)
    text_ids = example["input_ids"][start:start + len(builder.text_ids([texts[0]])[0])]
    assert tok.decode(text_ids).encode("utf-8") == texts[0].encode("utf-8")


# -------------------------------------------------------------- validation ---

def test_every_malformed_line_is_reported_with_path_line_and_problem(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all")
    write_wav(tmp_path / "ok.wav", chirp(0.2))
    lines = [
        line("good", n=3),                                          # 1
        '{"text": "broken", "code": [1, 2',                         # 2
        '["not", "an", "object"]',                                  # 3
        json.dumps({"code": [1, 2]}),                               # 4
        json.dumps({"text": "", "code": [1]}),                      # 5
        json.dumps({"text": "  \t ", "code": [1]}),                 # 6
        json.dumps({"text": 5, "code": [1]}),                       # 7
        json.dumps({"text": "no codes"}),                           # 8
        json.dumps({"text": "x", "code": "1 2 3"}),                 # 9
        json.dumps({"text": "x", "code": []}),                      # 10
        json.dumps({"text": "x", "code": [1, 2.5, 3]}),             # 11
        json.dumps({"text": "x", "code": [1, "2"]}),                # 12
        json.dumps({"text": "x", "code": [1, True]}),               # 13
        json.dumps({"text": "x", "code": [1, None]}),               # 14
        json.dumps({"text": "x", "code": [1, [2]]}),                # 15
        json.dumps({"text": "x", "code": [1, -1]}),                 # 16
        json.dumps({"text": "x", "codes": [65536]}),                # 17
        json.dumps({"text": "x", "code": [1, 2**70]}),              # 18
        json.dumps({"text": "x", "audio": "missing.wav"}),          # 19
        json.dumps({"text": "x", "audio": "junk.wav"}),             # 20
        json.dumps({"text": "x", "audio": ""}),                     # 21
        '{"text": "lone \\ud800 surrogate", "code": [1]}',          # 22
        json.dumps({"text": "x", "code": [1], "speaker": [1]}),     # 23
        json.dumps({"text": "fine audio", "audio": "ok.wav"}),      # 24
    ]
    path = write_lines(tmp_path / "train.jsonl", lines)
    with path.open("ab") as handle:
        handle.write(b'{"text": "\xff\xfe", "code": [1]}\n')      # 25
    err = errors_of(tmp_path)
    p = str(path)
    assert err.details == [
        f"{p}:2: invalid JSON (Expecting ',' delimiter)",
        f"{p}:3: expected a JSON object, got list",
        f"{p}:4: missing `text`",
        f"{p}:5: empty `text`",
        f"{p}:6: empty `text`",
        f"{p}:7: `text` must be a string, got int",
        f"{p}:8: missing speech codes: give `code` (or `codes`) as a list of integers, or `audio` as a path",
        f"{p}:9: `code` must be a list of integers, got str",
        f"{p}:10: `code` is empty",
        f"{p}:11: `code` must hold integers, found 2.5",
        f"{p}:12: `code` must hold integers, found \"2\"",
        f"{p}:13: `code` must hold integers, found true",
        f"{p}:14: `code` must hold integers, found null",
        f"{p}:15: `code` must hold integers, found [2]",
        f"{p}:16: `code` value -1 is out of range 0..65535",
        f"{p}:17: `codes` value 65536 is out of range 0..65535",
        f"{p}:18: `code` value {2**70} is out of range 0..65535",
        f"{p}:19: audio file `{tmp_path / 'missing.wav'}` is missing",
        err.details[18],  # libsndfile's wording varies by version; checked below
        f"{p}:21: `audio` must be a non-empty path string",
        f"{p}:22: `text` is not valid Unicode (unpaired surrogate '\\ud800' at character 5)",
        f"{p}:23: `speaker` must be a string, got list",
        f"{p}:25: not UTF-8 (byte 10)",
    ]
    assert err.details[18].startswith(f"{p}:20: audio file `{tmp_path / 'junk.wav'}` is unreadable (")
    assert "Error opening" not in err.details[18]  # libsndfile's reason, not the path a second time
    assert str(err).startswith("23 malformed lines in the data; fix them or remove them")
    one = err.one_line()
    assert "\n" not in one and f"{p}:2: invalid JSON" in one and f"{p}:25: not UTF-8" in one


def test_errors_in_train_and_val_files_are_reported_together(tmp_path):
    write_lines(tmp_path / "train.jsonl", [line("a"), "{oops"])
    write_lines(tmp_path / "val.jsonl", [json.dumps({"text": "b"}), line("c")])
    err = errors_of(tmp_path)
    assert err.details == [
        f"{tmp_path / 'train.jsonl'}:2: invalid JSON (Expecting property name enclosed in double quotes)",
        f"{tmp_path / 'val.jsonl'}:1: missing speech codes: give `code` (or `codes`) as a list of integers, "
        "or `audio` as a path",
    ]


def test_errors_are_capped_but_all_counted(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [line("ok")] + ["{bad"] * 60)
    err = errors_of(tmp_path, max_errors_shown=5)
    assert str(err) == "60 malformed lines in the data (first 5 shown); fix them or remove them"
    assert err.details == [f"{path}:{n}: invalid JSON (Expecting property name enclosed in double quotes)"
                           for n in range(2, 7)]
    assert len(errors_of(tmp_path).details) == 50  # the default cap


def test_a_single_error_is_singular(tmp_path):
    write_lines(tmp_path / "train.jsonl", [line("ok"), "{bad"])
    assert str(errors_of(tmp_path)) == "1 malformed line in the data; fix it or remove it"


def test_bom_crlf_and_blank_lines_keep_line_numbers(tmp_path):
    lines = [line("first", n=3), "", line("third\u3000です", n=4), "   ", '{"text": "bad"']
    path = write_lines(tmp_path / "train.jsonl", lines, newline="\r\n", bom=True)
    err = errors_of(tmp_path)
    assert err.details == [f"{path}:5: invalid JSON (Expecting ',' delimiter)"]
    write_lines(tmp_path / "train.jsonl", lines[:4], newline="\r\n", bom=True)
    report = load(tmp_path, val_fraction=0.01)
    got = sorted((s.source, s.text) for s in report.train + report.val)
    assert got == [(f"{path}:1", "first"), (f"{path}:3", "third\u3000です")]


def test_file_without_final_newline(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(line("a") + "\n" + line("b", seed=1), encoding="utf-8")
    report = load(tmp_path, val_fraction=0.01)
    assert sorted(s.text for s in report.train + report.val) == ["a", "b"]


# ------------------------------------------------------------ max length ---

def test_over_long_samples_are_skipped_listed_and_never_truncated(tmp_path, builder):
    overhead = builder.overhead
    # Exact count with the tiny byte-level tokenizer: prompt + len(text bytes) + codes + END.
    lengths = {"fits": 100, "exact": 120, "one over": 121, "way over": 400}
    lines = []
    for text, total in lengths.items():
        n_codes = total - overhead - len(text.encode()) - 1
        lines.append(line(text, n=n_codes, seed=len(lines)))
    path = write_lines(tmp_path / "train.jsonl", lines)
    report = load(tmp_path, max_length=120, prompt_builder=builder, val_fraction=0.01)
    kept = {s.text: s for s in report.train + report.val}
    assert set(kept) == {"fits", "exact"}
    assert kept["exact"].num_tokens == 120
    assert len(build_example(kept["exact"], builder)["input_ids"]) == 120
    for s in kept.values():  # not cut: every code of the line is still there
        assert len(s.codes) == lengths[s.text] - overhead - len(s.text) - 1
    assert report.skipped == [
        {"source": f"{path}:3", "tokens": 121, "max_length": 120, "reason": "121 tokens > max_length 120"},
        {"source": f"{path}:4", "tokens": 400, "max_length": 120, "reason": "400 tokens > max_length 120"},
    ]
    summary = report.summary()
    assert summary["skipped"] == report.skipped
    assert summary["max_tokens"] == 120
    assert summary["audio_seconds"] == round(sum(len(s.codes) for s in kept.values()) / 50, 2)  # kept only
    record = split_record(report)
    assert record["skipped"] == report.skipped
    assert record["train_count"] + len(record["val"]) == 2


def test_estimate_without_tokenizer_is_conservative(tmp_path, builder):
    dataset(tmp_path, 10)
    exact = load(tmp_path, prompt_builder=builder)
    estimated = load(tmp_path)
    assert exact.token_count_exact and not estimated.token_count_exact
    by_source = {s.source: s.num_tokens for s in exact.train + exact.val}
    for s in estimated.train + estimated.val:
        assert s.num_tokens == ESTIMATED_TEMPLATE_TOKENS + len(s.text.encode()) + len(s.codes) + 1
        assert s.num_tokens >= by_source[s.source]
    assert estimated.summary()["token_count_note"] and "estimate" in estimated.summary()["token_count_note"]
    assert exact.summary()["token_count_note"] is None


def test_measure_and_drop_too_long_directly(builder):
    samples = [Sample(text=t, source=f"x:{i}", codes=np.arange(10, dtype=np.int32)) for i, t in enumerate(TEXTS)]
    measure(samples, builder)
    for s in samples:
        assert s.num_tokens == len(builder.prompt_ids(s.text)) + 10 + 1
    skipped: list[dict] = []
    limit = sorted(s.num_tokens for s in samples)[3]
    kept = drop_too_long(samples, limit, skipped)
    assert [s.source for s in kept] == [s.source for s in samples if s.num_tokens <= limit]
    assert [d["source"] for d in skipped] == [s.source for s in samples if s.num_tokens > limit]


def test_text_lengths_equal_text_ids(builder):
    assert builder.text_lengths(TEXTS) == [len(ids) for ids in builder.text_ids(TEXTS)]
    assert builder.text_lengths([]) == []


def test_a_datasets_transcripts_are_tokenized_once(tok, monkeypatch):
    """#23: measuring the data keeps the ids; the dry run's and the training's examples reuse
    them, equal to a fresh tokenization, and text nobody kept is still tokenized."""
    from autotune.batches import build_examples

    builder, fresh = PromptBuilder(tok, "nfkc"), PromptBuilder(tok, "nfkc")
    samples = [Sample(text=t, source=f"s{i}", codes=np.arange(5 + i, dtype=np.int32)) for i, t in enumerate(TEXTS + TEXTS[:2])]
    measure(samples, builder)
    assert [s.num_tokens for s in samples] == [fresh.overhead + len(fresh.text_ids([s.text])[0]) + len(s.codes) + 1
                                                for s in samples]

    expected = build_examples(samples, fresh)
    calls = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: (calls.append(a), real(self, *a, **k))[1])
    twice = [build_examples(samples, builder) for _ in range(2)]
    assert calls == []                                            # built twice, tokenized never
    assert twice[0] == twice[1] == expected
    assert builder.text_ids(["not in the data"]) == fresh.text_ids(["not in the data"]) and len(calls) == 2


# ------------------------------------------------------------ empty data ---

def test_empty_dataset_is_an_error(tmp_path):
    write_lines(tmp_path / "train.jsonl", ["", "   "])
    with pytest.raises(AutotuneError, match="holds no samples"):
        load(tmp_path)
    (tmp_path / "train.jsonl").write_bytes(b"")
    with pytest.raises(AutotuneError, match="holds no samples"):
        load(tmp_path)


def test_empty_after_skipping_is_an_error(tmp_path):
    dataset(tmp_path, 5, n=300)
    err = errors_of(tmp_path, max_length=100)
    assert "every sample is longer than max_length 100 tokens (5 skipped)" in str(err)
    assert "data.max_length" in str(err)


def test_only_validation_left_after_skipping_is_an_error(tmp_path):
    dataset(tmp_path, 3, n=400)
    dataset(tmp_path, 2, name="val.jsonl", n=5)
    with pytest.raises(AutotuneError, match="no training samples are left after skipping over-long ones"):
        load(tmp_path, max_length=300)


def test_empty_train_file_with_a_val_file_names_the_train_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n", encoding="utf-8")
    dataset(tmp_path, 2, name="val.jsonl")
    err = errors_of(tmp_path)
    assert "train.jsonl" in str(err) and "holds no samples" in str(err)
    assert "skipping" not in str(err)


# ------------------------------------------------------------------ split ---

def test_split_is_reproducible_and_holds_out_ten_percent(tmp_path):
    dataset(tmp_path, 100)
    first, second = load(tmp_path), load(tmp_path)
    assert split_record(first) == split_record(second)
    assert len(first.val) == 10 and len(first.train) == 90
    assert first.summary() == second.summary()
    sources = {s.source for s in first.train} | {s.source for s in first.val}
    assert len(sources) == 100
    assert not {s.source for s in first.train} & {s.source for s in first.val}
    other = load(tmp_path, split_seed=7)
    assert {s.source for s in other.val} != {s.source for s in first.val}
    record = split_record(first)
    assert {k: v for k, v in record.items() if not k.endswith("_keys")} == {
        "val_source": "split", "val": [s.source for s in first.val], "train_count": 90, "skipped": [],
        "duplicates": []}
    assert len(record["val_keys"]) == 10 and len(set(record["train_keys"]) | set(record["val_keys"])) == 100
    json.dumps(record)  # written as split.json


def test_split_function_edges():
    samples = [Sample(text=str(i), source=f"f:{i}") for i in range(21)]
    train, val = split(samples, 0.1, 42)
    assert len(val) == 2 and len(train) == 19
    held = {s.source for s in val}
    assert [s.source for s in train] == [s.source for s in samples if s.source not in held]  # input order kept
    assert split(samples, 0.1, 42) == (train, val)
    one = samples[:1]
    assert split(one, 0.1, 42) == (one, [])
    two_train, two_val = split(samples[:2], 0.1, 42)
    assert len(two_train) == 1 and len(two_val) == 1  # at least one held out, never all


def test_val_override_with_a_file_or_a_folder(tmp_path):
    data = tmp_path / "data"
    dataset(data, 10)
    dataset(data, 4, name="val.jsonl", prefix="ignored")
    val_file = dataset(tmp_path / "held", 3, name="mine.jsonl", prefix="held")
    for eval_data in (val_file, val_file.parent):
        report = load(data, eval_data=eval_data)
        assert report.val_source == "eval_data_dir"
        assert len(report.train) == 10
        assert sorted(s.text.split()[0] for s in report.val) == ["held0", "held1", "held2"]
        assert split_record(report)["val_source"] == "eval_data_dir"
    with pytest.raises(AutotuneError, match="does not exist.*--val"):
        load(data, eval_data=tmp_path / "missing.jsonl")


def test_val_override_errors_are_reported_with_their_path(tmp_path):
    dataset(tmp_path / "data", 5)
    bad = write_lines(tmp_path / "val.jsonl", [line("ok"), json.dumps({"text": "x", "code": [99999]})])
    err = errors_of(tmp_path / "data", eval_data=bad)
    assert err.details == [f"{bad}:2: `code` value 99999 is out of range 0..65535"]


# ------------------------------------------------------------------ audio ---

def test_audio_lines_are_encoded_relative_to_the_file_and_cached(tmp_path, codec_loader):
    data = tmp_path / "data"
    write_wav(data / "clips" / "one.wav", chirp(1.0, seed=1))
    write_wav(data / "clips" / "two.wav", chirp(2.0, seed=2))
    jsonl = write_lines(data / "sub" / "lines.jsonl", [
        json.dumps({"text": "一秒", "audio": "../clips/one.wav"}, ensure_ascii=False),
        json.dumps({"text": "two seconds", "audio": "../clips/two.wav", "speaker": "b"}),
        line("precomputed", n=7),
    ])
    cache = tmp_path / "runs" / ".codec-cache"
    before = tree(data)
    # `../clips` leaves the file's folder (the data folder of `--data FILE`): allowed only on request.
    report = load(jsonl, codec_loader=codec_loader, cache_dir=cache, val_fraction=0.01, allow_outside_paths=True)
    by_text = {s.text: s for s in report.train + report.val}
    assert len(by_text["一秒"].codes) == 50
    assert len(by_text["two seconds"].codes) == 100
    assert len(by_text["precomputed"].codes) == 7
    assert all(int(c.min()) >= 0 and int(c.max()) <= MAX_CODE for c in (s.codes for s in by_text.values()))
    assert (report.encoded, report.from_cache) == (2, 0)
    assert report.summary()["audio_seconds"] == round((50 + 100 + 7) / 50, 2)
    assert len(list(cache.glob("*.json"))) == 2
    assert tree(data) == before  # nothing written into the data folder

    again = load(jsonl, codec_loader=codec_loader, cache_dir=cache, val_fraction=0.01, allow_outside_paths=True)
    assert (again.encoded, again.from_cache) == (0, 2)
    assert {s.text: s.codes.tolist() for s in again.train + again.val} == \
           {t: s.codes.tolist() for t, s in by_text.items()}


def test_ljspeech_folder_is_encoded(tmp_path, codec_loader):
    data = tmp_path / "LJSpeech"
    write_wav(data / "wavs" / "LJ001-0001.wav", chirp(1.0, seed=3))
    # LJSpeech itself is 22,050 Hz: resampled to 16 kHz, one second is still 50 codes.
    sf.write(str(data / "wavs" / "LJ001-0002.wav"), chirp(2.0, sr=22_050, seed=4), 22_050, subtype="PCM_16")
    write_wav(data / "wavs" / "ja_0003.wav", chirp(1.0, seed=5))
    (data / "metadata.csv").write_bytes(
        "\ufeffLJ001-0001|Printing, in 1480|Printing, in fourteen eighty\r\n"
        "LJ001-0002|two seconds of audio\r\n"
        f"ja_0003|{JAPANESE}|\r\n".encode("utf-8"))
    cache = tmp_path / "runs" / ".codec-cache"
    report = load(data, codec_loader=codec_loader, cache_dir=cache, val_fraction=0.01)
    assert report.layout == "ljspeech"
    by_source = {s.source.rsplit(":", 1)[1]: s for s in report.train + report.val}
    # Column 2, the text as read, as Llasa's recipe and every LJSpeech trainer train on it.
    assert by_source["1"].text == "Printing, in 1480"
    assert by_source["2"].text == "two seconds of audio"
    assert by_source["3"].text == JAPANESE
    assert [len(by_source[k].codes) for k in "123"] == [50, 100, 50]
    assert (report.encoded, report.from_cache) == (3, 0)
    again = load(data / "metadata.csv", codec_loader=codec_loader, cache_dir=cache, ljspeech_column="normalized")
    assert again.from_cache == 3
    normalized = {s.source.rsplit(":", 1)[1]: s.text for s in again.train + again.val}
    # The normalised column where it has text; an empty one falls back to column 2.
    assert (normalized["1"], normalized["3"]) == ("Printing, in fourteen eighty", JAPANESE)


def test_ljspeech_errors_and_line_numbers(tmp_path):
    data = tmp_path / "lj"
    write_wav(data / "wavs" / "a.wav", chirp(0.5))
    (data / "metadata.csv").write_text(
        "a|fine\u2028still the same line\n"  # U+2028 inside a transcript is not a line break
        "no pipe here\n"
        "|no id\n"
        "a|   \n"
        "missing|text\n", encoding="utf-8")
    err = errors_of(data)
    m = data / "metadata.csv"
    assert err.details == [
        f"{m}:2: expected `id|text`",
        f"{m}:3: expected `id|text`",
        f"{m}:4: empty text",
        f"{m}:5: audio file `{data / 'wavs' / 'missing.wav'}` is missing",
    ]


def test_audio_without_a_codec_is_an_error(tmp_path):
    write_wav(tmp_path / "a.wav", chirp(0.5))
    write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "x", "audio": "a.wav"})])
    with pytest.raises(AutotuneError, match="needs audio encoding but no codec"):
        load(tmp_path)


def test_audio_the_codec_cannot_encode_names_the_data_line(tmp_path, codec_loader):
    write_wav(tmp_path / "short.wav", np.zeros(100, dtype=np.float32))  # readable, but under one code
    path = write_lines(tmp_path / "train.jsonl", [line("ok"), json.dumps({"text": "x", "audio": "short.wav"})])
    err = errors_of(tmp_path, codec_loader=codec_loader, cache_dir=tmp_path / "cache")
    assert len(err.details) == 1
    assert err.details[0].startswith(f"{path}:2: audio file `{tmp_path / 'short.wav'}`: audio is too short")


def test_codec_cache_lives_next_to_the_runs_not_in_the_data(tmp_path):
    from autotune.pipeline import codec_cache_dir

    ctx = SimpleNamespace(output_dir=tmp_path / "runs" / "20250101-000000", codec_cache=None)
    assert codec_cache_dir(ctx) == tmp_path / "runs" / ".codec-cache"


# --------------------------------------------------------- Llasa samples ---

def test_llasa_tokens_are_read_from_the_tokenizer(tok):
    tokens = LlasaTokens.from_tokenizer(tok)
    assert tokens.speech_offset == tok.convert_tokens_to_ids("<|s_0|>")
    assert tok.convert_ids_to_tokens(tokens.code_to_id(MAX_CODE)) == "<|s_65535|>"
    assert tok.convert_ids_to_tokens(tokens.code_to_id(12345)) == "<|s_12345|>"
    assert tokens.speech_start == tok.convert_tokens_to_ids("<|SPEECH_GENERATION_START|>")
    assert tokens.speech_end == tok.convert_tokens_to_ids("<|SPEECH_GENERATION_END|>")
    assert tokens.pad == tok.pad_token_id
    assert tokens.is_speech_id(tokens.speech_offset) and not tokens.is_speech_id(tokens.speech_end)


def test_build_example_labels_from_speech_generation_start_as_the_official_recipe(builder, tok):
    tokens = builder.tokens
    sample = Sample(text=JAPANESE, source="x:1", codes=np.array([0, 7, MAX_CODE, 42], dtype=np.int32))
    ex = build_example(sample, builder)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    start = ids.index(tokens.speech_start)
    prompt = ids[:start + 1]
    assert prompt == builder.prompt_ids(JAPANESE)
    assert prompt[-1] == tokens.speech_start
    # LLaSA_training labels from SPEECH_GENERATION_START on: everything before it is -100.
    assert labels[:start] == [-100] * start
    assert labels[start] == tokens.speech_start
    assert ids[start + 1] == tokens.speech_offset + 0
    assert labels[start + 1] == ids[start + 1]
    assert ids[start + 1:] == [tokens.speech_offset + c for c in (0, 7, MAX_CODE, 42)] + [tokens.speech_end]
    assert labels[start + 1:] == ids[start + 1:]  # speech ids and END are all labelled
    assert labels[-1] == tokens.speech_end
    assert tok.convert_ids_to_tokens(ids[start + 1:]) == ["<|s_0|>", "<|s_7|>", "<|s_65535|>", "<|s_42|>",
                                                          "<|SPEECH_GENERATION_END|>"]
    rendered = tok.decode(prompt)
    assert rendered == tok.apply_chat_template(chat_messages(JAPANESE), tokenize=False, continue_final_message=True)
    assert f"Convert the text to speech:<|TEXT_UNDERSTANDING_START|>{JAPANESE}<|TEXT_UNDERSTANDING_END|>" in rendered
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<|SPEECH_GENERATION_START|>")
    measure([sample], builder)
    assert sample.num_tokens == len(ids)


def _template_ids(tok, text: str) -> list[int]:
    out = tok.apply_chat_template(chat_messages(text), tokenize=True, continue_final_message=True)
    if not isinstance(out, list):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    return list(out)


@pytest.mark.parametrize("text", TEXTS + ["a<|eot_id|>b", "末尾の改行\n", " "])
def test_prompt_builder_equals_the_full_chat_template(builder, tok, text):
    assert builder.prompt_ids(text) == _template_ids(tok, text)


def _bpe_llasa_tokenizer(system_preamble: bool):
    """A Llama-3-like byte-level BPE *with merges* (trained here on a few lines),
    Llasa's specials and 65,536 speech tokens, and a chat template with a system
    preamble like Llama-3.2's: the prompt builder must still match the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=chat,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    base.train_from_iterator(TEXTS * 20 + ["Convert the text to speech:", "system user assistant"] * 20, trainer)
    vocab = base.get_vocab()
    merges = json.loads(base.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    for name in LLASA_SPECIALS + [speech_token(i) for i in range(NUM_SPEECH_TOKENS)]:
        vocab[name] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.add_special_tokens({"additional_special_tokens": chat[2:] + LLASA_SPECIALS})
    template = LLAMA3_CHAT_TEMPLATE
    if system_preamble:
        template = template.replace(
            "{{ bos_token }}",
            "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n<|eot_id|>")
    tokenizer.chat_template = template
    return tokenizer


def test_prompt_builder_matches_a_bpe_tokenizer_with_merges_and_a_system_preamble():
    tokenizer = _bpe_llasa_tokenizer(system_preamble=True)
    builder = PromptBuilder(tokenizer)
    assert builder.tokens.pad == tokenizer.eos_token_id  # no pad token: falls back to eos
    for text in TEXTS + ["Convert the text", "speech: speech:"]:
        assert builder.prompt_ids(text) == _template_ids(tokenizer, text), text
    assert builder.text_lengths(TEXTS) == [len(i) for i in builder.text_ids(TEXTS)]
    assert builder.overhead < ESTIMATED_TEMPLATE_TOKENS
    assert any(len(builder.text_ids([t])[0]) < len(t.encode()) for t in TEXTS)  # the merges are real


def _plain_llama_like_tokenizer(with_unk: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    specials = ["<|begin_of_text|>", "<|eot_id|>"] + (["<unk>"] if with_unk else [])
    vocab = {t: i for i, t in enumerate(chars + specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>" if with_unk else None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    kwargs = {"unk_token": "<unk>"} if with_unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   **kwargs)


@pytest.mark.parametrize("with_unk", [False, True])
def test_a_tokenizer_without_llasa_tokens_is_a_clear_error(with_unk):
    tokenizer = _plain_llama_like_tokenizer(with_unk)
    with pytest.raises(AutotuneError) as info:
        PromptBuilder(tokenizer)
    message = str(info.value)
    assert "lacks Llasa's tokens" in message
    assert "<|TEXT_GENERATION_START|>, <|TEXT_GENERATION_END|>, <|TEXT_UNDERSTANDING_START|>, " \
           "<|TEXT_UNDERSTANDING_END|> and 6 more" in message
    assert "HKUSTAudio/Llasa-1B" in message and "--model tiny" in message


def test_missing_speech_tokens_are_named():
    tokenizer = _plain_llama_like_tokenizer(False)
    tokenizer.add_special_tokens({"additional_special_tokens": LLASA_SPECIALS})
    with pytest.raises(AutotuneError, match=r"lacks Llasa's tokens \(<\|s_0\|>, <\|s_65535\|>\)"):
        LlasaTokens.from_tokenizer(tokenizer)


class _FakeTokenizer:
    """Only what LlasaTokens reads, to reach the checks a real tokenizer rarely triggers."""

    def __init__(self, ids: dict[str, int], pad=None, eos=None, unk=None):
        self.ids, self.pad_token_id, self.eos_token_id, self.unk_token_id = ids, pad, eos, unk

    def convert_tokens_to_ids(self, name):
        return self.ids.get(name, self.unk_token_id)


def _fake_ids(s65535_offset: int = NUM_SPEECH_TOKENS - 1) -> dict[str, int]:
    ids = {name: 1000 + i for i, name in enumerate(LLASA_SPECIALS)}
    ids[speech_token(0)] = 2000
    ids[speech_token(NUM_SPEECH_TOKENS - 1)] = 2000 + s65535_offset
    return ids


def test_non_contiguous_speech_tokens_are_an_error():
    with pytest.raises(AutotuneError, match="not contiguous"):
        LlasaTokens.from_tokenizer(_FakeTokenizer(_fake_ids(NUM_SPEECH_TOKENS + 5)))


def test_unknown_tokens_that_map_to_unk_count_as_missing():
    ids = _fake_ids()
    del ids["<|SPEECH_GENERATION_END|>"]
    with pytest.raises(AutotuneError, match=r"\(<\|SPEECH_GENERATION_END\|>\)"):
        LlasaTokens.from_tokenizer(_FakeTokenizer(ids, unk=0))


def test_pad_falls_back_to_eos_then_speech_end():
    assert LlasaTokens.from_tokenizer(_FakeTokenizer(_fake_ids(), eos=5)).pad == 5
    assert LlasaTokens.from_tokenizer(_FakeTokenizer(_fake_ids())).pad == 1000 + 5  # SPEECH_GENERATION_END


# --------------------------------------------------------------- collator ---

def test_collator_pads_to_a_multiple_of_8_and_masks_padding(builder):
    import torch

    samples = [Sample(text=t, source=f"x:{i}", codes=np.arange(3 + 5 * i, dtype=np.int32))
               for i, t in enumerate(["a", "日本語", "a longer transcript"])]
    features = build_examples(samples, builder)
    lengths = [len(f["input_ids"]) for f in features]
    batch = LlasaCollator(builder.tokens.pad)(features)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8
    assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == batch["attention_mask"].shape
    for row, (f, n) in enumerate(zip(features, lengths)):
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["labels"][row, :n].tolist() == f["labels"]
        assert batch["attention_mask"][row, :n].tolist() == [1] * n
        assert batch["input_ids"][row, n:].tolist() == [builder.tokens.pad] * (width - n)
        assert batch["labels"][row, n:].tolist() == [-100] * (width - n)
        assert batch["attention_mask"][row, n:].tolist() == [0] * (width - n)


def test_collator_exact_multiple_adds_no_padding():
    import torch

    features = [{"input_ids": list(range(16)), "labels": [-100] * 8 + list(range(8, 16))}]
    batch = LlasaCollator(pad_id=0)(features)
    assert batch["input_ids"].shape == (1, 16)
    assert torch.equal(batch["attention_mask"], torch.ones(1, 16, dtype=torch.long))
    assert LlasaCollator(pad_id=0, multiple_of=64)(features)["input_ids"].shape == (1, 64)


def test_length_grouped_batching_works_on_built_examples(builder):
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = random.Random(0)
    samples = [Sample(text=f"t{i}", source=f"x:{i}", codes=np.zeros(rng.choice([10, 200]), dtype=np.int32))
               for i in range(64)]
    examples = build_examples(samples, builder)
    sampler = LengthGroupedSampler(8, dataset=examples, generator=torch.Generator().manual_seed(0))
    order = list(sampler)
    assert sorted(order) == list(range(64))

    def padding(indices):
        rows = [[len(examples[i]["input_ids"]) for i in indices[k:k + 8]] for k in range(0, 64, 8)]
        return sum(max(r) * len(r) - sum(r) for r in rows)

    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(order) < padding(shuffled) / 2


def test_packed_collator_restarts_positions_per_sample(builder):
    from autotune.batches import PackedCollator

    samples = [Sample(text=t, source="x", codes=np.arange(4, dtype=np.int32)) for t in ("ab", "日本")]
    features = build_examples(samples, builder)
    batch = PackedCollator()(features)
    n0, n1 = (len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (1, n0 + n1)
    assert batch["position_ids"][0].tolist() == list(range(n0)) + list(range(n1))
    assert batch["labels"][0, n0].item() == -100  # no loss across the boundary


@pytest.mark.parametrize("encoding, words", [
    ("utf-16", "looks like UTF-16 text, not UTF-8"),
    ("utf-16-le", "looks like UTF-16 text, not UTF-8"),   # no byte-order mark
    ("cp932", "looks like Shift_JIS (CP932) text, not UTF-8"),
])
def test_a_file_in_another_encoding_is_one_error_with_the_fix(tmp_path, encoding, words):
    lines = [line(f"こんにちは、世界 {i}", seed=i) for i in range(5)]
    (tmp_path / "train.jsonl").write_bytes("\n".join(lines).encode(encoding))
    err = errors_of(tmp_path)
    assert str(err) == "1 problem in the data; fix it or remove it"
    assert err.details[0].startswith(f"{tmp_path / 'train.jsonl'}: {words}: convert it, e.g. `iconv -f")
    assert len(err.details) == 1   # one for the file, none per line
    # the fix it gives works
    fixed = (tmp_path / "train.jsonl").read_bytes().decode(encoding)
    (tmp_path / "train.jsonl").write_text(fixed, encoding="utf-8")
    assert len(load(tmp_path).train) + len(load(tmp_path).val) == 5


def test_shift_jis_metadata_csv_is_one_error(tmp_path):
    (tmp_path / "wavs").mkdir()
    (tmp_path / "metadata.csv").write_bytes("a|こんにちは\nb|さようなら\n".encode("cp932"))
    err = errors_of(tmp_path)
    assert err.details == [f"{tmp_path / 'metadata.csv'}: looks like Shift_JIS (CP932) text, not UTF-8: convert it, "
                           f"e.g. `iconv -f CP932 -t UTF-8 {tmp_path / 'metadata.csv'} > "
                           f"{tmp_path / 'metadata.utf8.csv'}`, then pass the converted file: "
                           f"`--data {tmp_path / 'metadata.utf8.csv'}` (or `--val`)"]


def test_a_utf8_file_with_one_bad_line_lists_that_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [line("こんにちは"), line("世界")])
    with path.open("ab") as handle:
        handle.write("{\"text\": \"".encode() + "日本".encode("cp932") + b'", "code": [1]}\n')
    err = errors_of(tmp_path)
    assert err.details == [f"{path}:3: not UTF-8 (byte 10)"]


@pytest.mark.parametrize("text", ["Informação", "São Paulo", "Élève éternel", "Première étape"])
def test_latin1_text_is_not_taken_for_shift_jis(tmp_path, text):
    path = tmp_path / "train.jsonl"
    path.write_bytes((json.dumps({"text": text, "code": [1, 2]}, ensure_ascii=False) + "\n").encode("latin-1"))
    err = errors_of(tmp_path)
    assert "Shift_JIS" not in str(err) and err.details and "not UTF-8" in err.details[0]
