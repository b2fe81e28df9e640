"""Tests of autotune.scores: text metrics on known strings, and the real transformers
ASR pipeline and WavLM x-vector model on tiny random weights with synthetic audio."""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import metrics as M
from autotune import scores as S
from autotune.audio import write_wav
from autotune.errors import AutotuneError

SR = 16_000


def tone(seconds: float, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * noise).astype(np.float32)


def noise(seconds: float, seed: int = 1) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(("text", "expected"), [
    ("ＡＢＣ", "abc"),                                   # full-width Latin (NFKC), case-folded
    ("Hello, World!", "hello world"),
    ("今日はいい天気ですね。", "今日はいい天気ですね"),
    ("「はい」、そうです！", "はい そうです"),
    ("ｶﾀｶﾅ", "カタカナ"),                               # half-width katakana become full-width
    ("Don’t stop—now", "don't stop now"),               # a typographic apostrophe inside a word is kept
    ("'quoted'  words ", "quoted words"),              # quote marks are not
    ("１２３", "123"),
])
def test_normalise(text: str, expected: str) -> None:
    assert M.normalise(text) == expected


@pytest.mark.parametrize(("text", "cer"), [
    ("今日はいい天気ですね。", True),
    ("カタカナだけ", True),
    ("東京都", True),
    ("你好，世界", True),
    ("안녕하세요 여러분", True),
    ("สวัสดีครับ", True),
    ("The quick brown fox.", False),
    ("Ça va très bien", False),
    ("Привет, мир", False),
    ("ＡＢＣ 123", False),
])
def test_uses_cer_by_script(text: str, cer: bool) -> None:
    assert M.uses_cer(text) is cer


@pytest.mark.parametrize(("text", "language"), [
    ("今日はいい天気ですね", "ja"), ("東京へ行く", "ja"), ("你好世界", "zh"), ("안녕하세요", "ko"), ("Hello", None),
])
def test_asr_language_by_script(text: str, language: str | None) -> None:
    assert M.asr_language(text) == language


def test_error_rate_japanese_is_a_character_rate() -> None:
    reference = "今日はいい天気ですね。"
    assert M.error_rate(reference, "今日はいい天気ですね") == (0.0, "cer")
    assert M.error_rate(reference, "今日は　いい天気ですね！") == (0.0, "cer")  # spaces and punctuation do not count
    assert M.error_rate(reference, "今日は悪い天気ですね") == (pytest.approx(1 / 10), "cer")   # one substitution
    assert M.error_rate(reference, "今日はいい天気ね") == (pytest.approx(2 / 10), "cer")       # two deletions
    assert M.error_rate(reference, "今日はとてもいい天気ですね") == (pytest.approx(3 / 10), "cer")  # three insertions


def test_error_rate_english_is_a_word_rate() -> None:
    reference = "The cat sat on the mat."
    assert M.error_rate(reference, "the cat sat on the mat") == (0.0, "wer")
    assert M.error_rate(reference, "THE CAT SAT ON THE MAT!") == (0.0, "wer")
    assert M.error_rate(reference, "the cat sat on mat") == (pytest.approx(1 / 6), "wer")
    assert M.error_rate(reference, "the dog sat on the hat") == (pytest.approx(2 / 6), "wer")
    assert M.error_rate("hi", "hi there you") == (2.0, "wer")  # insertions can take it above 1
    assert M.error_rate("ＡＢＣ", "abc") == (0.0, "wer")


def test_error_rate_of_nothing_heard() -> None:
    assert M.error_rate("今日はいい天気ですね。", "") == (1.0, "cer")
    assert M.error_rate("The cat sat.", None) == (1.0, "wer")
    assert M.error_rate("。", "") == (0.0, "wer")  # nothing left to say after normalising
    assert M.error_rate("!!!", "words") == (1.0, "wer")


@lru_cache(maxsize=None)
def _naive_distance(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_naive_distance(a[1:], b) + 1, _naive_distance(a, b[1:]) + 1,
               _naive_distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_edit_distance_known_pairs() -> None:
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance("", "abc") == 3
    assert M.edit_distance("flaw", "lawn") == 2
    assert M.edit_distance(["a", "b"], ["a", "b"]) == 0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcあい", max_size=7), st.text(alphabet="abcあい", max_size=7))
def test_edit_distance_matches_the_definition(a: str, b: str) -> None:
    assert M.edit_distance(a, b) == _naive_distance(a, b) == M.edit_distance(b, a)


def test_cosine() -> None:
    assert M.cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)
    assert M.cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert M.cosine(np.array([1.0, -1.0]), np.array([-1.0, 1.0])) == pytest.approx(-1.0)
    assert M.cosine(np.zeros(3), np.ones(3)) == 0.0


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def scorer() -> S.Scorer:
    warnings: list[str] = []
    scorer = S.Scorer(S.TINY, S.TINY, device="cpu", warn=warnings.append)
    scorer.load()
    scorer.warnings = warnings  # type: ignore[attr-defined]
    return scorer


def test_tiny_asr_runs_the_real_pipeline(scorer: S.Scorer) -> None:
    from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

    assert isinstance(scorer.asr.pipe, AutomaticSpeechRecognitionPipeline)
    assert scorer.asr.is_whisper
    transcript = scorer.transcribe(tone(3.0), "hello there")
    assert isinstance(transcript, str)
    assert set(transcript) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert scorer.load_seconds["asr"] is not None and scorer.load_seconds["asr"] > 0


def test_whisper_is_told_the_language_and_decodes_greedily(scorer: S.Scorer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = scorer.asr.pipe.model
    calls: list[dict] = []
    real_generate = model.generate

    def recording_generate(*args, **kwargs):  # passes through to the real generate
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    scorer.transcribe(tone(2.0), "今日はいい天気ですね")
    scorer.transcribe(tone(2.0), "The weather is fine")
    assert calls[0]["language"] == "ja" and calls[0]["task"] == "transcribe" and calls[0]["num_beams"] == 1
    assert "language" not in calls[1] and calls[1]["num_beams"] == 1


def test_tiny_asr_transcribes_a_clip_longer_than_whispers_window(scorer: S.Scorer) -> None:
    transcript = scorer.transcribe(tone(31.0, freq=330.0), "a long sentence")
    assert isinstance(transcript, str) and set(transcript) <= set("abcdefghijklmnopqrstuvwxyz ")


def test_speaker_similarity_of_identical_and_different_clips(scorer: S.Scorer) -> None:
    a, b = tone(3.0), noise(3.0)
    ea = scorer.speaker_embedding(a)
    assert ea.ndim == 1 and ea.dtype == np.float32
    assert M.cosine(ea, scorer.speaker_embedding(a.copy())) == pytest.approx(1.0, abs=1e-5)
    # The feature extractor normalises each clip: loudness is not a voice.
    assert M.cosine(ea, scorer.speaker_embedding(0.5 * a)) == pytest.approx(1.0, abs=1e-4)
    different = M.cosine(ea, scorer.speaker_embedding(b))
    assert -1.0 <= different < 0.99


def test_score_files_end_to_end(scorer: S.Scorer, tmp_path: Path) -> None:
    step = tmp_path / "samples" / "step-10"
    reference = tmp_path / "data" / "speaker_a.wav"
    write_wav(step / "0.wav", tone(3.0))
    write_wav(step / "1.wav", noise(3.0))
    write_wav(reference, tone(3.0))
    samples = [
        {"text": "今日はいい天気ですね。", "wav": str(step / "0.wav"), "reference_wavs": [str(reference)]},
        {"text": "The weather is fine.", "wav": str(step / "1.wav"), "reference_wavs": [str(reference)]},
    ]
    result = scorer.score(samples)

    first, second = result["samples"]
    assert (first["metric"], second["metric"]) == ("cer", "wer")
    assert "wer" not in first and "cer" not in second
    for record, sample in zip(result["samples"], samples):
        assert record["text"] == sample["text"]
        assert isinstance(record["transcript"], str)
        value, metric = M.error_rate(sample["text"], record["transcript"])
        assert record[metric] == value
        assert "error" not in record
    # The same waveform as the reference (written to two files): the same voice.
    assert first["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert second["similarity"] < first["similarity"]
    assert result["mean_cer"] == first["cer"] and result["mean_wer"] == second["wer"]
    assert result["mean_error_rate"] == pytest.approx((first["cer"] + second["wer"]) / 2)
    assert result["mean_similarity"] == pytest.approx((first["similarity"] + second["similarity"]) / 2)
    assert result["counts"] == {"samples": 2, "cer": 1, "wer": 1, "similarity": 2, "failed": 0}
    assert result["seconds"] > 0 and result["asr_error"] is None and result["speaker_error"] is None

    path = S.write_scores(step, result)
    assert path == step / "scores.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    assert [s["wav"] for s in written["samples"]] == ["0.wav", "1.wav"]
    assert written["samples"][0]["reference_wavs"] == [str(reference)]  # outside the folder: kept as given
    assert written["mean_similarity"] == pytest.approx(result["mean_similarity"])
    assert sorted(p.name for p in step.iterdir()) == ["0.wav", "1.wav", "scores.json"]


def test_a_bad_sample_is_marked_and_the_others_are_scored(scorer: S.Scorer, tmp_path: Path) -> None:
    warnings: list[str] = []
    scorer.warn = warnings.append
    try:
        result = scorer.score([
            {"text": "missing file", "wav": str(tmp_path / "nope.wav"), "reference_wavs": []},
            {"text": "no audio", "wav": None},
            {"text": "too short to embed", "wav": tone(0.05), "reference_wavs": [tone(1.0)]},
            {"text": "fine", "wav": tone(1.0), "reference_wavs": [tone(1.0)]},
        ])
    finally:
        scorer.warn = scorer.warnings.append
    missing, silent, short, fine = result["samples"]
    assert "audio file is missing" in missing["error"] and missing["transcript"] is None
    assert "no audio" in silent["error"]
    assert short["error"].startswith("similarity:") and isinstance(short["transcript"], str)
    assert "error" not in fine and fine["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert result["counts"]["failed"] == 3 and result["counts"]["similarity"] == 1
    assert result["mean_similarity"] == fine["similarity"]
    assert len(warnings) == 1 and "3 of 4 samples" in warnings[0]


def test_none_skips_a_part_without_a_warning() -> None:
    warnings: list[str] = []
    scorer = S.Scorer(S.NONE, S.NONE, warn=warnings.append)
    result = scorer.score([{"text": "今日は", "wav": tone(1.0), "reference_wavs": [tone(1.0)]}])
    (record,) = result["samples"]
    assert record["metric"] == "cer" and record["cer"] is None and record["transcript"] is None
    assert record["similarity"] is None and "error" not in record
    assert result["mean_error_rate"] is None and result["mean_similarity"] is None
    assert scorer.load_seconds == {"asr": None, "speaker": None}
    assert warnings == []


def test_a_model_that_cannot_load_warns_once_and_the_rest_is_scored(tmp_path: Path) -> None:
    warnings: list[str] = []
    scorer = S.Scorer(str(tmp_path / "no-such-whisper"), S.TINY, warn=warnings.append)
    for _ in range(2):
        result = scorer.score([{"text": "hello", "wav": tone(1.0), "reference_wavs": [tone(1.0)]}])
        assert result["samples"][0]["transcript"] is None and result["samples"][0]["wer"] is None
        assert result["samples"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(warnings) == 1
    assert "no such folder" in warnings[0] and "scores.asr_model=none" in warnings[0]
    assert result["asr_error"] and result["speaker_error"] is None


def test_device_must_be_cpu_or_cuda() -> None:
    with pytest.raises(ValueError, match="device"):
        S.Scorer(device="tpu")


# --------------------------------------------------------------------------- loading real checkpoints


def test_saved_checkpoints_load_from_folders(scorer: S.Scorer, tmp_path: Path) -> None:
    asr_dir, speaker_dir = tmp_path / "whisper", tmp_path / "wavlm-sv"
    pipe = scorer.asr.pipe
    pipe.model.save_pretrained(asr_dir)
    pipe.tokenizer.save_pretrained(asr_dir)
    pipe.feature_extractor.save_pretrained(asr_dir)
    scorer.speaker.model.save_pretrained(speaker_dir)
    scorer.speaker.feature_extractor.save_pretrained(speaker_dir)

    asr = S.load_asr(str(asr_dir))
    speaker = S.load_speaker(str(speaker_dir))
    wave = tone(2.0, freq=300.0)
    assert asr.is_whisper and asr.transcribe(wave, "今日は") == scorer.transcribe(wave, "今日は")
    assert np.allclose(speaker.embed(wave), scorer.speaker_embedding(wave), atol=1e-5)


def test_a_checkpoint_without_a_speaker_head_is_refused(scorer: S.Scorer, tmp_path: Path) -> None:
    from transformers import WavLMModel

    folder = tmp_path / "wavlm-base"
    WavLMModel(scorer.speaker.model.config).save_pretrained(folder)
    scorer.speaker.feature_extractor.save_pretrained(folder)
    with pytest.raises(AutotuneError, match="not a speaker-verification"):
        S.load_speaker(str(folder))


def test_an_uncached_hub_id_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (the suite's HF_HUB_OFFLINE), an id that is not cached is refused in one line
    naming the download and the way around it, without asking transformers."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    warnings: list[str] = []
    scorer = S.Scorer("nobody/not-an-asr-model", "nobody/not-a-speaker-model", warn=warnings.append)
    started = time.perf_counter()
    scorer.load()
    assert time.perf_counter() - started < 3
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "`hf download nobody/not-an-asr-model`" in warnings[0] and "scores.asr_model=none" in warnings[0]
    assert "`hf download nobody/not-a-speaker-model`" in warnings[1] and "scores.speaker_model=none" in warnings[1]
    assert all("is not downloaded, and HF_HUB_OFFLINE is set" in w for w in warnings)
    assert not any("huggingface-cli" in w for w in warnings)


def test_a_load_error_is_cut_between_words_never_inside_a_url(tmp_path: Path) -> None:
    """transformers' own messages end in a long URL: the one line keeps it whole or leaves it out."""
    url = "https://huggingface.co/docs/transformers/installation#offline-mode"
    folder = tmp_path / "broken-whisper"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(AutotuneError) as info:
        S.load_asr(str(folder))
    message = info.value.one_line()
    assert "check that the folder holds the checkpoint" in message and "scores.asr_model=none" in message
    from autotune.loading import clip_words

    text = "We couldn't connect to 'http://127.0.0.1:9' to load the files; see " + url + " for offline mode"
    for limit in range(5, len(text) + 5):
        clipped = clip_words(text, limit)
        body = clipped.removesuffix("…").rstrip()
        assert text.startswith(body) and (body == text or body == "" or text[len(body)] == " "), clipped
        assert len(body) <= limit or body == text
        assert url in clipped or "https://" not in clipped
