"""Tests of autotune.replica: the offline Llasa tokenizer and the random-weight Llasa shapes.

The references are outside this project: Meta's own Llama 3 tokenizer
(`llama_models.llama3.tokenizer`, tiktoken) for text ids, Meta's architecture
numbers (`llama_models.sku_list`), digests of the official Hugging Face files,
and the official Llasa training recipe (zhenye234/LLaSA_training), rewritten
below from its steps, for the prompt, labels and attention of a sample.
"""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune import replica  # noqa: E402
from autotune.batches import LlasaCollator, build_example  # noqa: E402
from autotune.reading import Sample  # noqa: E402
from autotune.errors import AutotuneError  # noqa: E402
from autotune.llasa import LLASA_SPECIALS, TEMPLATE_DATE, LlasaTokens, PromptBuilder  # noqa: E402

JAPANESE = "こんにちは、今日はいい天気ですね。東京駅から新幹線で大阪まで二時間半。"
TEXTS = [
    JAPANESE,
    "The quick brown fox jumps over the lazy dog. Isn't it?",
    "今日はGPUでLlasaを fine-tune します（LoRA r=16）。",
    "電話番号は 090-1234-5678、価格は ¥12,345,678 です。3.14159",
    "絵文字も😀👍🏽🇯🇵 そのまま！",
    "  leading spaces, a tab\tand\na newline  ",
    ("長い文章のテストです。" * 20) + " And a long English tail, " * 10,
]


@pytest.fixture(scope="module")
def tok():
    if not replica.replica_available():
        pytest.skip('needs `pip install "llasa-autotune[replica]"` (llama-models, tiktoken)')
    return replica.build_llasa_tokenizer()


@pytest.fixture(scope="module")
def meta_tokenizer():
    pytest.importorskip("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(replica.llama3_tokenizer_file())


# --------------------------------------------------------- vocabulary ---

def test_the_vocabulary_has_the_released_size_and_ids(tok):
    assert len(tok) == 193800
    ids = tok.convert_tokens_to_ids
    assert [ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                             "<|python_tag|>", "<|reserved_special_token_247|>")] == [
        128000, 128001, 128004, 128006, 128007, 128008, 128009, 128010, 128255]
    assert [ids(t) for t in LLASA_SPECIALS] == list(range(128256, 128264))
    assert ids("<|SPEECH_GENERATION_END|>") == 128261
    assert (ids("<|s_0|>"), ids("<|s_65535|>")) == (128264, 193799)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>")


def test_the_control_tokens_match_the_official_llama3_table(tok):
    # sha256 over "<id>\t<content>" lines of ids 128000..128255, as another project computed it
    # from meta-llama's own tokenizer.json (Llama 3.1; 3.2's table is the same).
    lines = "\n".join(f"{i}\t{tok.convert_ids_to_tokens(i)}" for i in range(128000, 128256))
    assert hashlib.sha256(lines.encode()).hexdigest() == \
        "ebbf6dbf38ef61c1554ba8101087efde62220b2dc3a5b1f2f8aa24b10a8dd973"


def test_llasa_tokens_read_from_the_replica(tok):
    tokens = LlasaTokens.from_tokenizer(tok)
    assert tokens.speech_offset == 128264
    assert tokens.speech_end == 128261
    assert (tokens.speech_start, tokens.text_start, tokens.text_end, tokens.pad) == (128260, 128258, 128259, 128009)


# ----------------------------------------------------------- text ids ---

REFERENCE_TEXTS = TEXTS + [
    "", " ", "   x", "\n\n\n", "a\r\nb", "x" * 3000, " " * 50 + "end", "1234567890 12 123 1234",
    "don't I'm we'll they're you've she'd it's", "ｶﾀｶﾅ（半角）と Ｆｕｌｌｗｉｄｔｈ",
    "def f(x):\n    return x ** 2  # comment\n", "Ünïcödé ñ ß ø Ω ж 中文 한국어 العربية हिन्दी",
]


@pytest.mark.parametrize("text", REFERENCE_TEXTS)
def test_text_ids_match_metas_llama3_tokenizer(tok, meta_tokenizer, text):
    assert tok.encode(text, add_special_tokens=False) == meta_tokenizer.encode(text, bos=False, eos=False)


def test_control_tokens_in_text_match_metas_tokenizer(tok, meta_tokenizer):
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert tok.encode(text, add_special_tokens=False) == \
        meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")


def test_bos_is_added_as_llama3_does(tok):
    # Published fixture made with Hugging Face's tokenizer of Llama-3.2-1B (auto-BOS included).
    assert tok("Hello world, I am a")["input_ids"] == [128000, 9906, 1917, 11, 358, 1097, 264]


def test_japanese_round_trips_and_speech_tokens_survive_skip_special(tok):
    ids = tok.encode(JAPANESE)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == JAPANESE
    # Llasa's inference decodes with skip_special_tokens=True and parses `<|s_N|>` back.
    assert tok.decode([128000, 128264 + 7, 128264 + 65535, 128261], skip_special_tokens=True) == \
        "<|s_7|><|s_65535|><|SPEECH_GENERATION_END|>"


# ------------------------------------------------------- chat template ---

def test_the_chat_template_is_llama32s(tok):
    assert hashlib.sha256(tok.chat_template.encode()).hexdigest() == \
        "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4"


def test_the_template_renders_the_system_header_with_todays_date(tok):
    messages = [{"role": "user", "content": "hi"}]
    before = datetime.now().strftime("%d %b %Y")
    rendered = tok.apply_chat_template(messages, tokenize=False)
    after = datetime.now().strftime("%d %b %Y")
    headers = {f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
               f"December 2023\nToday Date: {day}\n\n<|eot_id|>" for day in (before, after)}
    assert any(rendered.startswith(h) for h in headers), rendered[:160]
    assert rendered.endswith("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    fixed = tok.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024\n\n<|eot_id|>" in fixed


# ---------------------------------------- golden: the official recipe ---

CODES = [0, 1, 65535, 4242, 12, 65534, 30000, 7]
SPEECH_BASE = 128256 + 8  # the recipe's `len(tokenizer)` after adding the 8 task tokens to Llama 3.2's


def official_example(tokenizer, text: str, codes: list[int]) -> dict[str, list[int]]:
    """One training row as LLaSA_training builds it: data_instruction/get_memmap_from_token.py
    makes `text ids + speech ids`, finetune/offline_finetune/finetune_offline_lora.py puts them
    into the chat template (pad = eos = <|eot_id|>). Written from their steps."""
    ids_of = tokenizer.convert_tokens_to_ids
    text_start, speech_start = ids_of("<|TEXT_UNDERSTANDING_START|>"), ids_of("<|SPEECH_GENERATION_START|>")
    # 1. the transcript between its markers, no BOS
    text_ids = tokenizer.encode(f"<|TEXT_UNDERSTANDING_START|>{text}<|TEXT_UNDERSTANDING_END|>",
                                add_special_tokens=False)
    # 2. the speech: codes offset by the base vocabulary, between START and END
    speech = [speech_start] + [code + SPEECH_BASE for code in codes] + [ids_of("<|SPEECH_GENERATION_END|>")]
    # 3. the chat template with both placeholders, no generation prompt (return_dict=False: the
    #    recipe ran on transformers 4, whose default was a plain list)
    chat = [{"role": "user", "content": "Convert the text to speech:<|TEXT_UNDERSTANDING_START|>"},
            {"role": "assistant", "content": "<|SPEECH_GENERATION_START|>"}]
    # (The recipe's rows carry the date of the day it ran; ours carry the template's fixed date, so
    # the recipe is run here as on that day: every other id must match.)
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False, date_string=TEMPLATE_DATE)
    # 4. each placeholder replaced by its sequence
    i = ids.index(text_start)
    ids = ids[:i] + text_ids + ids[i + 1:]
    i = ids.index(speech_start)
    ids = ids[:i] + speech + ids[i + 1:]
    # 5. labels from SPEECH_GENERATION_START on; padding (= every <|eot_id|>) out of labels and attention
    pad = tokenizer.pad_token_id
    labels = [-100] * len(ids)
    start = ids.index(speech_start)
    labels[start:] = ids[start:]
    labels = [-100 if t == pad else label for t, label in zip(ids, labels)]
    return {"input_ids": ids, "labels": labels, "attention_mask": [int(t != pad) for t in ids]}


def both_examples(tokenizer, text: str):
    """Ours and the official row, both with the template's fixed date (`llasa.TEMPLATE_DATE`)."""
    builder = PromptBuilder(tokenizer)
    ours = build_example(Sample(text=text, source="t", codes=np.array(CODES, dtype=np.int32)), builder)
    return ours, official_example(tokenizer, text, CODES)


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_ids_match_the_official_recipe(tok, text):
    ours, official = both_examples(tok, text)
    # The official row ends with the assistant turn's <|eot_id|>, which is its padding id:
    # out of attention and labels, it is padding in all but name.
    assert official["input_ids"][-1] == tok.pad_token_id and official["attention_mask"][-1] == 0
    assert ours["input_ids"] == official["input_ids"][:-1]


@pytest.mark.parametrize("text", TEXTS)
def test_labels_match_the_official_recipe(tok, text):
    ours, official = both_examples(tok, text)
    start = official["input_ids"].index(tok.convert_tokens_to_ids("<|SPEECH_GENERATION_START|>"))
    assert official["labels"][start] == official["input_ids"][start]  # the recipe trains on SPEECH_GENERATION_START
    assert ours["labels"] == official["labels"][:-1]


def test_attention_matches_the_official_recipe(tok):
    """The official mask is `ids != pad` with pad = <|eot_id|>: it also hides the <|eot_id|>
    closing the system and the user turns, and so does ours."""
    from autotune.llasa import LlasaTokens

    ours, official = both_examples(tok, TEXTS[0])
    batch = LlasaCollator(tok.pad_token_id, hidden_ids=LlasaTokens.from_tokenizer(tok).hidden_from_attention)([ours])
    attention = batch["attention_mask"][0, :len(ours["input_ids"])].tolist()
    assert attention == official["attention_mask"][:-1]


# ---------------------------------------------------------------- models ---

def test_replica_names():
    assert replica.is_replica("llasa-1b-random") and replica.is_replica("llasa-3b-random")
    assert not replica.is_replica("HKUSTAudio/Llasa-1B") and not replica.is_replica("tiny")
    with pytest.raises(AutotuneError, match="llasa-1b-random"):
        replica.llasa_config("llasa-8b-random")


@pytest.mark.parametrize("name,meta_args", [("llasa-1b-random", "arch_args_1b"), ("llasa-3b-random", "arch_args_3b")])
def test_config_has_metas_llama32_shapes_and_llasas_vocabulary(name, meta_args):
    sku_list = pytest.importorskip("llama_models.sku_list")
    meta = getattr(sku_list, meta_args)()
    config = replica.llasa_config(name)
    # Meta's feed-forward width rule (multiple_of rounding of 8/3 * dim * multiplier).
    ffn = int(meta["ffn_dim_multiplier"] * int(8 * meta["dim"] / 3))
    ffn = meta["multiple_of"] * ((ffn + meta["multiple_of"] - 1) // meta["multiple_of"])
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.rms_norm_eps) == (
        meta["dim"], meta["n_layers"], meta["n_heads"], meta["n_kv_heads"], ffn, meta["norm_eps"])
    assert config.rope_parameters["rope_theta"] == meta["rope_theta"]
    assert config.vocab_size == 193800 and config.tie_word_embeddings
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.max_position_embeddings == 131072
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 32.0


def test_llasa_1b_has_about_1_37b_parameters_tied():
    torch = pytest.importorskip("torch")
    model = replica.build_random_llasa("llasa-1b-random", device="meta")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 1.37
    assert model.model.embed_tokens.weight.shape == (193800, 2048)
    assert model.dtype == torch.float32 and model.name_or_path == "llasa-1b-random"


# -------------------------------------------------------------- errors ---

def test_without_llama_models_the_error_says_what_to_install(monkeypatch):
    real_find_spec = replica.importlib.util.find_spec
    monkeypatch.setattr(replica.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_models" else real_find_spec(name, *a))
    assert not replica.replica_available()
    with pytest.raises(AutotuneError, match=r'pip install "llasa-autotune\[replica\]"'):
        replica.build_llasa_tokenizer.__wrapped__()


def test_a_changed_tokenizer_model_is_refused(monkeypatch, tmp_path):
    if not replica.replica_available():
        pytest.skip("needs tiktoken")
    fake = tmp_path / "tokenizer.model"
    fake.write_text("SGVsbG8= 0\n")
    monkeypatch.setattr(replica, "_llama3_tokenizer_file", lambda: fake)
    with pytest.raises(AutotuneError, match="is not Llama 3's tokenizer.model"):
        replica.llama3_tokenizer_file()


# ---------------------------------------------------------------- slow ---

@pytest.mark.slow
def test_random_llasa_1b_is_seeded_and_runs_a_prompt(tok):
    torch = pytest.importorskip("torch")
    first = replica.build_random_llasa("llasa-1b-random", dtype=torch.bfloat16)
    probe = first.model.layers[0].self_attn.q_proj.weight[:4, :8].clone()
    ids = torch.tensor([build_example(Sample(text=JAPANESE, source="t", codes=np.array(CODES, dtype=np.int32)),
                                      PromptBuilder(tok))["input_ids"]])
    with torch.no_grad():
        logits = first(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 193800) and torch.isfinite(logits).all()
    del first, logits
    second = replica.build_random_llasa("llasa-1b-random", dtype=torch.bfloat16)
    assert torch.equal(second.model.layers[0].self_attn.q_proj.weight[:4, :8], probe)
