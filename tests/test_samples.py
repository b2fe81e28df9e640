"""Audio samples: generation with the tiny model, the id post-processing, and the
callback inside a real (tiny, CPU) training run through `train.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from autotune.llasa import NUM_SPEECH_TOKENS, LlasaTokens, build_tiny_model, build_tiny_tokenizer
from autotune.generation import codes_from_new_ids, generate_codes, prompt_ids
from autotune.training.samples import SampleCallback

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tiny"
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def tokens(tokenizer) -> LlasaTokens:
    return LlasaTokens.from_tokenizer(tokenizer)


# ------------------------------------------------------- post-processing ---

def test_codes_from_new_ids_keeps_speech_up_to_end_and_counts_the_rest(tokens):
    s = tokens.code_to_id
    text_id = 65  # a byte token
    ids = [s(5), text_id, s(0), s(NUM_SPEECH_TOKENS - 1), tokens.speech_start, tokens.pad, s(7),
           tokens.speech_end, s(9), text_id]
    codes, dropped, generated = codes_from_new_ids(ids, tokens)
    assert codes == [5, 0, NUM_SPEECH_TOKENS - 1, 7]
    assert dropped == 3  # the text byte, SPEECH_GENERATION_START and the pad before END
    assert generated == 7 == len(codes) + dropped  # END and what follows it are not counted


def test_codes_from_new_ids_edges(tokens):
    just_below = tokens.speech_offset - 1  # the last Llasa special token
    just_above = tokens.speech_offset + NUM_SPEECH_TOKENS
    assert codes_from_new_ids([just_below, just_above], tokens) == ([], 2, 2)
    assert codes_from_new_ids([], tokens) == ([], 0, 0)
    assert codes_from_new_ids([tokens.speech_end], tokens) == ([], 0, 0)
    # No END (the budget ran out): everything counts.
    ids = [tokens.code_to_id(c) for c in (1, 2, 3)]
    assert codes_from_new_ids(torch.tensor(ids), tokens) == ([1, 2, 3], 0, 3)


# ------------------------------------------------------------- generation ---

def test_generate_codes_with_the_tiny_model(tokenizer, tiny_model):
    model = tiny_model
    model.train()
    rng_before = torch.get_rng_state()
    codes, dropped, generated = generate_codes(model, tokenizer, "こんにちは", max_new_tokens=24, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "a seeded call leaves the global generator alone"
    assert model.training, "train mode is restored"
    assert 0 < generated <= 24
    assert generated == len(codes) + dropped
    assert all(isinstance(c, int) and 0 <= c < NUM_SPEECH_TOKENS for c in codes)
    again = generate_codes(model, tokenizer, "こんにちは", max_new_tokens=24, seed=0)
    assert again == (codes, dropped, generated), "same seed, same speech"
    model.eval()
    generate_codes(model, tokenizer, "hello", max_new_tokens=4, seed=1)
    assert not model.training, "eval mode stays eval"


def test_generate_codes_with_a_peft_model_whose_cache_is_off(tokenizer):
    from autotune.model import apply_lora

    model = apply_lora(build_tiny_model(), r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                       gradient_checkpointing=True)
    assert model.get_base_model().config.use_cache is False
    model.train()
    codes, dropped, generated = generate_codes(model, tokenizer, "テスト", max_new_tokens=16, seed=3,
                                               reference_text="参考", reference_codes=[1, 2, 3])
    assert model.training
    assert generated == len(codes) + dropped and 0 < generated <= 16
    assert all(0 <= c < NUM_SPEECH_TOKENS for c in codes)


def test_generate_codes_drops_text_tokens_a_model_prefers(tokenizer, tokens, tiny_model):
    """A tiny model whose output layer only allows one text token, one speech token
    and never END: drops are counted, the speech token becomes its code."""
    model = tiny_model
    vocab = model.config.vocab_size
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-100.0)
        head.bias[65] = 5.0                            # a text byte
        head.bias[tokens.code_to_id(10)] = 5.0         # <|s_10|>
    tied = model.lm_head
    model.lm_head = head
    try:
        codes, dropped, generated = generate_codes(model, tokenizer, "abc", max_new_tokens=20, seed=0)
    finally:
        model.lm_head = tied
    assert generated == 20
    assert dropped > 0 and codes, (codes, dropped)
    assert set(codes) == {10}
    assert len(codes) + dropped == 20


class _StubModel(torch.nn.Module):
    """Records generate()'s arguments and answers with fixed new ids."""

    def __init__(self, new_ids: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.new_ids = new_ids
        self.kwargs = None

    def generate(self, **kwargs):
        self.kwargs = kwargs
        prompt = kwargs["input_ids"]
        new = torch.tensor([self.new_ids], dtype=torch.long)
        return torch.cat([prompt, new], dim=1)


def test_generate_codes_prompt_and_generate_arguments(tokenizer, tokens):
    s = tokens.code_to_id
    stub = _StubModel([s(4), 70, s(8), tokens.speech_end, s(1)])
    codes, dropped, generated = generate_codes(stub, tokenizer, "本文", temperature=0.7, top_p=0.9,
                                               repetition_penalty=1.1, max_new_tokens=12,
                                               reference_text="参照", reference_codes=[11, 12])
    assert (codes, dropped, generated) == ([4, 8], 1, 3), "the reference clip's codes are not returned"
    kw = stub.kwargs
    assert kw["do_sample"] is True and kw["use_cache"] is True
    assert kw["eos_token_id"] == tokens.speech_end and kw["pad_token_id"] == tokens.pad
    assert (kw["temperature"], kw["top_p"], kw["repetition_penalty"], kw["max_new_tokens"]) == (0.7, 0.9, 1.1, 12)
    ids = kw["input_ids"][0].tolist()
    assert ids[-3:] == [tokens.speech_start, s(11), s(12)], "reference speech follows SPEECH_GENERATION_START"
    text = tokenizer.decode(ids)
    # The model card joins them with nothing in between: `prompt_text + target_text`.
    assert "<|TEXT_UNDERSTANDING_START|>参照本文<|TEXT_UNDERSTANDING_END|>" in text
    assert kw["attention_mask"].shape == kw["input_ids"].shape


def test_generation_defaults_are_the_model_cards_and_never_pass_2048_positions(tokenizer, tokens):
    from autotune.errors import AutotuneError
    from autotune.llasa import MAX_POSITIONS

    stub = _StubModel([tokens.speech_end])
    generate_codes(stub, tokenizer, "本文")
    kw = stub.kwargs
    assert (kw["temperature"], kw["top_p"], kw["repetition_penalty"]) == (0.8, 1.0, 1.0)
    prompt = kw["input_ids"].shape[1]
    assert prompt + kw["max_new_tokens"] == MAX_POSITIONS          # asked for nothing: all the room left
    generate_codes(stub, tokenizer, "本文", max_new_tokens=5000)
    assert prompt + stub.kwargs["max_new_tokens"] == MAX_POSITIONS  # asked for more than fits: capped
    generate_codes(stub, tokenizer, "本文", max_new_tokens=7)
    assert stub.kwargs["max_new_tokens"] == 7
    with pytest.raises(AutotuneError, match="2048 positions"):
        generate_codes(stub, tokenizer, "本文", reference_text="参照", reference_codes=[1] * MAX_POSITIONS)


def test_speaker_prompt_is_the_official_multi_speaker_form(tokenizer, tokens):
    from autotune.llasa import PromptBuilder

    stub = _StubModel([tokens.speech_end])
    generate_codes(stub, tokenizer, "本文", speaker="alice")
    text = tokenizer.decode(stub.kwargs["input_ids"][0].tolist())
    # LLaSA_training's online multi-speaker dataset: the assistant turn is `Speaker {name}`, then the speech.
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSpeaker alice<|SPEECH_GENERATION_START|>")
    builder = PromptBuilder(tokenizer)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>本文<|TEXT_UNDERSTANDING_END|>"},
         {"role": "assistant", "content": "Speaker alice"}], tokenize=True, continue_final_message=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert builder.prompt_ids("本文", speaker="alice") == full + [tokens.speech_start]


def test_generation_stops_at_the_next_token_on_a_signal(tokenizer, tiny_model):
    calls = []
    stop_after = 3

    def on_token(done, budget):
        calls.append(done)

    codes, dropped, generated = generate_codes(tiny_model, tokenizer, "本文", max_new_tokens=200, seed=0,
                                               should_stop=lambda: len(calls) >= stop_after, on_token=on_token)
    assert calls[:3] == [1, 2, 3] and generated <= stop_after


def test_prompt_without_reference_matches_the_chat_template(tokenizer):
    from autotune.llasa import PromptBuilder, chat_messages

    builder = PromptBuilder(tokenizer)
    expected = tokenizer.apply_chat_template(chat_messages("今日は"), tokenize=True, continue_final_message=True)
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert prompt_ids(builder, "今日は") == list(expected)


# ------------------------------------------------------- in a training run ---

def _train(out: Path, *extra: str) -> int:
    from train import main

    return main(["--data", str(DATA), "--model", "tiny", "--output-dir", str(out),
                 "--set", "training.max_steps=4", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
                 "--set", "samples.max_new_tokens=30", "--set", "samples.num_texts=1", *extra])


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # PEFT asks the hub about the base model at each save unless told it is offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_training_writes_wav_samples_and_tensorboard_audio(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--codec", "tiny") == 0
    for step in (2, 4):
        wavs = sorted((out / "samples" / f"step-{step}").glob("*.wav"))
        assert [w.name for w in wavs] == ["0.wav"]
        info = sf.info(str(wavs[0]))
        assert (info.samplerate, info.channels) == (16000, 1)
        record = json.loads((out / "samples" / f"step-{step}" / "codes.json").read_text(encoding="utf-8"))
        sample = record["samples"][0]
        assert record["decoded"] is True and record["step"] == step
        assert info.frames == len(sample["codes"]) * 320
        assert sample["generated_tokens"] == len(sample["codes"]) + sample["dropped_ids"] <= 30
        audio, _ = sf.read(str(wavs[0]))
        assert np.isfinite(audio).all()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs"), size_guidance={"audio": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert tags["audio"] == ["samples/0"]
    assert [(a.step, a.sample_rate) for a in acc.Audio("samples/0")] == [(2, 16000.0), (4, 16000.0)]
    assert {"samples/generated_tokens", "samples/dropped_ids"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("samples/generated_tokens")] == [2, 4]


def test_codec_failure_warns_once_and_training_goes_on(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--codec", "/nonexistent", "--set", "training.max_steps=2", "--set", "training.eval_steps=1",
                  "--set", "samples.max_new_tokens=10") == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert printed.count("could not load the codec") == 1
    assert (out / "adapter_model.safetensors").is_file(), "the run finished"
    for step in (1, 2):
        folder = out / "samples" / f"step-{step}"
        assert not list(folder.glob("*.wav"))
        record = json.loads((folder / "codes.json").read_text(encoding="utf-8"))
        assert record["decoded"] is False
        sample = record["samples"][0]
        assert 0 < sample["generated_tokens"] <= 10
        assert sample["generated_tokens"] == len(sample["codes"]) + sample["dropped_ids"]
        assert all(0 <= c < NUM_SPEECH_TOKENS for c in sample["codes"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs"), size_guidance={"audio": 0, "scalars": 0})
    acc.Reload()
    assert acc.Tags()["audio"] == []
    assert [e.step for e in acc.Scalars("samples/generated_tokens")] == [1, 2]


def test_every_n_steps_without_tensorboard(tmp_path, tokens):
    from types import SimpleNamespace

    s = tokens.code_to_id
    stub = _StubModel([s(1), s(2), s(3), tokens.speech_end])
    callback = SampleCallback(output_dir=tmp_path, tokenizer=build_tiny_tokenizer(), texts=["一"], codec_id="tiny",
                              every_n_steps=3)
    args = SimpleNamespace(seed=0, eval_strategy="steps")
    for step in range(1, 8):
        state = SimpleNamespace(global_step=step, max_steps=7, is_world_process_zero=True)
        control = SimpleNamespace(should_training_stop=False)
        callback.on_step_end(args, state, control, model=stub)
        callback.on_evaluate(args, state, control, model=stub)  # evaluations do not sample with every_n_steps
    assert sorted(p.name for p in tmp_path.joinpath("samples").iterdir()) == ["step-3", "step-6"]
    assert sf.info(str(tmp_path / "samples" / "step-6" / "0.wav")).frames == 3 * 320


def test_with_evaluation_off_the_final_step_is_sampled(tmp_path, tokens):
    from types import SimpleNamespace

    stub = _StubModel([tokens.code_to_id(4), tokens.speech_end])
    callback = SampleCallback(output_dir=tmp_path, tokenizer=build_tiny_tokenizer(), texts=["一"], codec_id="tiny")
    args = SimpleNamespace(seed=0, eval_strategy="no")
    for step in range(1, 5):
        state = SimpleNamespace(global_step=step, max_steps=4, is_world_process_zero=True)
        callback.on_step_end(args, state, SimpleNamespace(should_training_stop=False), model=stub)
    assert sorted(p.name for p in tmp_path.joinpath("samples").iterdir()) == ["step-4"]


def test_no_callback_without_texts_or_with_zero_texts():
    from types import SimpleNamespace

    from autotune.config import Config
    from autotune.training.samples import maybe_add_sample_callback

    added = []
    trainer = SimpleNamespace(add_callback=added.append, callback_handler=SimpleNamespace(callbacks=[]))
    config = Config()
    maybe_add_sample_callback(trainer, config, "out", build_tiny_tokenizer(), [], None)
    config.samples.num_texts = 0
    maybe_add_sample_callback(trainer, config, "out", build_tiny_tokenizer(), _val("a"), None)
    assert added == []
    config.samples.num_texts = 2
    maybe_add_sample_callback(trainer, config, "out", build_tiny_tokenizer(), _val("a", "b", "c"), None)
    assert len(added) == 1 and isinstance(added[0], SampleCallback)
    assert [p.text for p in added[0].texts] == ["a", "b"] and all(p.speaker is None for p in added[0].texts)


def _val(*texts, speakers=None, codes=10):
    from autotune.reading import Sample

    speakers = speakers or [None] * len(texts)
    return [Sample(text=t, source=f"v:{i}", codes=np.zeros(codes, dtype=np.int32), speaker=sp, prompt_speaker=sp)
            for i, (t, sp) in enumerate(zip(texts, speakers))]


def test_every_speaker_is_sampled_with_its_own_text_and_generation_is_capped_by_the_data():
    from autotune.config import Config
    from autotune.training.samples import auto_max_new_tokens, choose_prompts

    config = Config()
    val = _val("a1", "b1", "a2", speakers=["alice", "bob", "alice"], codes=40)
    train = _val("c1", speakers=["carol"], codes=100)
    prompts, note = choose_prompts(config.samples, val, train)
    # every speaker, most audio first (carol 100 codes, alice 80, bob 40), each with its own first text
    assert [(p.speaker, p.text) for p in prompts] == [("carol", "c1"), ("alice", "a1"), ("bob", "b1")]
    assert note is None
    config.samples.texts = ["hello"]
    assert [(p.speaker, p.text) for p in choose_prompts(config.samples, val, train)[0]] == [
        ("carol", "hello"), ("alice", "hello"), ("bob", "hello")]
    many = _val(*[f"t{i}" for i in range(12)], speakers=[f"s{i:02d}" for i in range(12)])
    prompts, note = choose_prompts(Config().samples, many)
    assert len(prompts) == 8 and "12 speakers" in note
    assert auto_max_new_tokens(val) == 60          # 1.5 x the longest validation sample (40 codes)
    assert auto_max_new_tokens([], train) == 150   # no validation: the training samples


def test_reference_clip_problems_are_one_line_errors(tmp_path):
    from types import SimpleNamespace

    from autotune.config import Config
    from autotune.errors import AutotuneError
    from autotune.training.samples import maybe_add_sample_callback

    trainer = SimpleNamespace(add_callback=lambda cb: None, callback_handler=SimpleNamespace(callbacks=[]))
    config = Config()
    config.samples.reference_audio = str(tmp_path / "missing.wav")
    config.samples.reference_text = "こんにちは"
    with pytest.raises(AutotuneError, match="missing"):
        maybe_add_sample_callback(trainer, config, tmp_path, build_tiny_tokenizer(), _val("a"), None)
    clip = tmp_path / "ref.wav"
    sf.write(str(clip), np.zeros(3200, dtype=np.float32), 16000)
    config.samples.reference_audio = str(clip)
    config.samples.reference_text = None
    with pytest.raises(AutotuneError, match="reference_text"):
        maybe_add_sample_callback(trainer, config, tmp_path, build_tiny_tokenizer(), _val("a"), None)


def test_callback_loads_codec_and_reference_once_on_the_main_process_only(tmp_path, monkeypatch, tiny_model):
    from types import SimpleNamespace

    import autotune.codec as codec_module
    from autotune.training.samples import _Reference

    loads = []
    real_load = codec_module.load_codec

    def counting_load(codec_id, device="cpu"):
        loads.append(codec_id)
        codec = real_load(codec_id, device)
        encode = codec.encode
        codec.encode = lambda wave: loads.append("encode") or encode(wave)
        return codec

    monkeypatch.setattr(codec_module, "load_codec", counting_load)
    clip = tmp_path / "ref.wav"
    t = np.arange(8000, dtype=np.float32) / 16000
    sf.write(str(clip), 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    model = tiny_model
    callback = SampleCallback(output_dir=tmp_path, tokenizer=build_tiny_tokenizer(), texts=["一", "二"],
                              codec_id="tiny", max_new_tokens=6, reference=_Reference(str(clip), "参照"))
    args = SimpleNamespace(seed=7, eval_strategy="steps")
    other_rank = SimpleNamespace(global_step=1, max_steps=10, is_world_process_zero=False)
    callback.on_evaluate(args, other_rank, SimpleNamespace(should_training_stop=False), model=model)
    assert not (tmp_path / "samples").exists() and loads == []
    for step in (2, 4, 4):  # the repeated step is not sampled twice
        state = SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=True)
        callback.on_evaluate(args, state, SimpleNamespace(should_training_stop=False), model=model)
    assert loads == ["tiny", "encode"]
    assert len(callback.reference.codes) == 25  # 0.5 s at 50 codes per second
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-2", "step-4"]
    record = json.loads((tmp_path / "samples" / "step-4" / "codes.json").read_text(encoding="utf-8"))
    assert record["reference_audio"] == str(clip)
    assert [s["wav"] for s in record["samples"]] == ["0.wav", "1.wav"]


def test_a_failing_sample_is_a_warning_not_the_end_of_training(tmp_path):
    import io
    from types import SimpleNamespace

    from rich.console import Console

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kwargs):
            raise RuntimeError("boom")

    out = io.StringIO()
    callback = SampleCallback(output_dir=tmp_path, tokenizer=build_tiny_tokenizer(), texts=["一"], codec_id="tiny",
                              console=Console(file=out, width=400), every_n_steps=2)
    state = SimpleNamespace(global_step=2, max_steps=10, is_world_process_zero=True)
    callback.on_step_end(SimpleNamespace(seed=0, eval_strategy="no"), state,
                         SimpleNamespace(should_training_stop=False), model=Broken())
    assert "text 0 at step 2 failed (RuntimeError: boom)" in out.getvalue()
    record = json.loads((tmp_path / "samples" / "step-2" / "codes.json").read_text(encoding="utf-8"))
    assert record["samples"] == [{"index": 0, "text": "一", "speaker": None, "error": "RuntimeError: boom"}]
