"""The speaking engine: batched generation that keeps each row's own sampling, one base model
with adapters switched by PEFT, and the audio formats the server answers with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from tests.speech_runs import make_run

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny():
    from autotune.llasa import build_tiny_model, build_tiny_tokenizer

    return build_tiny_model().eval(), build_tiny_tokenizer()


def test_a_row_speaks_the_same_alone_and_in_a_batch_with_its_own_settings(tiny):
    from autotune.generation import SpeechItem, generate_batch

    model, tokenizer = tiny
    items = [
        SpeechItem("こんにちは", seed=1, max_new_tokens=16),
        SpeechItem("a much longer text than the others, to pad the rest", seed=2, max_new_tokens=6,
                   repetition_penalty=1.3),
        SpeechItem("abc", seed=3, max_new_tokens=12, top_p=0.8, temperature=1.2),
        SpeechItem("今日は", seed=4, max_new_tokens=10, top_k=0),
        SpeechItem("voice", seed=5, max_new_tokens=8, reference_text="ref", reference_codes=(1, 2, 3, 4)),
    ]
    alone = [generate_batch(model, tokenizer, [item])[0] for item in items]
    together = generate_batch(model, tokenizer, items)
    for one, many, item in zip(alone, together, items):
        assert one.codes == many.codes and one.generated == many.generated
        assert many.generated == item.max_new_tokens == many.budget, "each row stops at its own budget"
    assert len({tuple(s.codes) for s in together}) == len(items)


def test_a_seed_is_reproducible_and_leaves_the_global_generator_alone(tiny):
    import torch

    from autotune.generation import SpeechItem, generate_batch

    model, tokenizer = tiny
    state = torch.get_rng_state()
    first = generate_batch(model, tokenizer, [SpeechItem("hello", seed=9, max_new_tokens=16)])[0]
    assert torch.equal(torch.get_rng_state(), state)
    again = generate_batch(model, tokenizer, [SpeechItem("hello", seed=9, max_new_tokens=16)])[0]
    other = generate_batch(model, tokenizer, [SpeechItem("hello", seed=10, max_new_tokens=16)])[0]
    assert first.codes == again.codes and first.codes != other.codes


@pytest.mark.slow
def test_rows_never_pass_2048_positions(tiny):
    from autotune.generation import SpeechItem, generate_batch
    from autotune.llasa import MAX_POSITIONS

    model, tokenizer = tiny
    long_text = "x" * 1960   # the byte-level tiny tokenizer: 1,960 tokens, leaving about 20
    spoken = generate_batch(model, tokenizer, [SpeechItem(long_text, seed=0), SpeechItem("hi", seed=0,
                                                                                         max_new_tokens=5)])
    assert spoken[0].prompt_tokens + spoken[0].budget == MAX_POSITIONS
    assert spoken[0].generated <= spoken[0].budget and spoken[1].generated == 5


def test_one_base_model_with_adapters_switched_not_reloaded(tmp_path):
    from autotune.generation import SpeechItem
    from autotune.voice import Voice

    first = make_run(tmp_path / "a", seed=1)
    second = make_run(tmp_path / "b", seed=2)
    voice = Voice("tiny", codec_id="tiny", device="cpu", max_adapters=2)
    item = [SpeechItem("こんにちは", seed=4, max_new_tokens=20)]
    a = voice.adapter(first)
    base = voice.model.get_base_model()
    said_a = voice.speak(a, item)[0].spoken.codes
    b = voice.adapter(second)
    said_b = voice.speak(b, item)[0].spoken.codes
    again_a = voice.speak(voice.adapter(first), item)[0].spoken.codes
    assert voice.model.get_base_model() is base, "the base model stays; adapters come and go"
    assert said_a == again_a and said_a != said_b
    assert sorted(voice.model.peft_config) == sorted([a.peft_name, b.peft_name])
    third = make_run(tmp_path / "c", seed=3)
    c = voice.adapter(third)
    assert sorted(voice.model.peft_config) == sorted([a.peft_name, c.peft_name]), "b, used least recently, went"
    assert voice.speak(voice.adapter(second), item)[0].spoken.codes == said_b, "reloaded, it says the same"
    assert voice.model.get_base_model() is base


def test_a_changed_adapter_file_is_loaded_again(tmp_path):
    import os

    from autotune.voice import Voice

    run = make_run(tmp_path / "a", seed=1)
    voice = Voice("tiny", codec_id="tiny", device="cpu")
    before = voice.adapter(run)
    make_run(tmp_path / "a", seed=7)          # training saved a new adapter over it
    weights = run / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10_000_000))
    after = voice.adapter(run)
    assert after.peft_name != before.peft_name and before.peft_name not in voice.model.peft_config


def test_audio_formats_carry_the_same_samples():
    from autotune.voice import FORMATS, PCM_SAMPLING_RATE, encode_audio

    t = np.arange(16000, dtype=np.float32) / 16000
    wave = 0.4 * np.sin(2 * np.pi * 330 * t).astype(np.float32)
    wav, _ = sf.read(io.BytesIO(encode_audio(wave, "wav")), dtype="int16")
    flac, rate = sf.read(io.BytesIO(encode_audio(wave, "flac")), dtype="int16")
    assert rate == 16000 and np.array_equal(wav, flac)
    pcm = np.frombuffer(encode_audio(wave, "pcm"), dtype="<i2")
    assert pcm.size == PCM_SAMPLING_RATE
    assert abs(np.abs(pcm).max() / 32767 - 0.4) < 0.02
    for name in ("mp3", "opus"):
        info = sf.info(io.BytesIO(encode_audio(wave, name)))
        assert info.frames > 0
    assert set(FORMATS) == {"wav", "flac", "pcm", "mp3", "opus"}
