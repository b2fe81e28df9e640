"""Llasa's token layout and prompt, and the tiny offline stand-ins.

Llasa = Llama-3 text vocabulary + 8 special tokens + 65,536 speech tokens
`<|s_0|>`..`<|s_65535|>`. Ids are always read from the tokenizer; speech codes
map to ids by offset from `<|s_0|>`, never by tokenizing 65k strings.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from autotune.errors import AutotuneError

# Llasa's facts, each defined here once.
TINY = "tiny"                             # the offline demo model and codec (random weights)
DEFAULT_MODEL = "HKUSTAudio/Llasa-1B"
DEFAULT_CODEC = "HKUSTAudio/xcodec2-hf"   # XCodec2 in transformers' format
NUM_SPEECH_TOKENS = 65536                 # XCodec2's one codebook: speech codes 0..65535
MAX_CODE = NUM_SPEECH_TOKENS - 1
SAMPLING_RATE = 16_000                    # XCodec2 hears and speaks 16 kHz mono
HOP_LENGTH = 320                          # samples per code
CODES_PER_SECOND = SAMPLING_RATE // HOP_LENGTH   # 50
IGNORE_INDEX = -100  # the label of a position the loss skips (PyTorch cross-entropy's and HF's default)
LLASA_SPECIALS = [
    "<|TEXT_GENERATION_START|>", "<|TEXT_GENERATION_END|>",
    "<|TEXT_UNDERSTANDING_START|>", "<|TEXT_UNDERSTANDING_END|>",
    "<|SPEECH_GENERATION_START|>", "<|SPEECH_GENERATION_END|>",
    "<|SPEECH_UNDERSTANDING_START|>", "<|SPEECH_UNDERSTANDING_END|>",
]
USER_PREFIX = "Convert the text to speech:"
_MARK = "\u2063TEXT\u2063"  # invisible separator: never in a real transcript
_SPEAKER_MARK = "\u2063SPEAKER\u2063"
# The date Llama 3.x's chat template writes when it cannot read the clock; ours always writes it.
TEMPLATE_DATE = "26 Jul 2024"
# Llasa was trained on sequences of at most 2,048 positions: prompt plus speech.
MAX_POSITIONS = 2048

# The tiny stand-in tokenizer's template (`build_tiny_tokenizer`): Llama 3's turns without the
# system block of Llama 3.2's. Only the tiny random model, trained on nothing, uses it: a real
# tokenizer without a template of its own is refused (`PromptBuilder`), never given this one.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def speech_token(code: int) -> str:
    return f"<|s_{code}|>"


@dataclass(frozen=True)
class LlasaTokens:
    """The ids the pipeline needs, read from a tokenizer."""

    speech_offset: int          # id of <|s_0|>
    speech_start: int           # <|SPEECH_GENERATION_START|>
    speech_end: int             # <|SPEECH_GENERATION_END|>
    text_start: int             # <|TEXT_UNDERSTANDING_START|>
    text_end: int               # <|TEXT_UNDERSTANDING_END|>
    pad: int
    eos: int | None = None      # `<|eot_id|>`: the official recipe's pad, hidden from attention

    @property
    def hidden_from_attention(self) -> tuple[int, ...]:
        """Ids the official recipe masks out of attention (`input_ids != pad`, pad = eos)."""
        return (self.eos,) if self.eos is not None else ()

    def code_to_id(self, code: int) -> int:
        return self.speech_offset + code

    def is_speech_id(self, token_id: int) -> bool:
        return self.speech_offset <= token_id < self.speech_offset + NUM_SPEECH_TOKENS

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "LlasaTokens":
        unk = getattr(tokenizer, "unk_token_id", None)
        names = LLASA_SPECIALS + [speech_token(0), speech_token(NUM_SPEECH_TOKENS - 1)]
        ids = {}
        missing = []
        for name in names:
            token_id = tokenizer.convert_tokens_to_ids(name)
            if token_id is None or (unk is not None and token_id == unk):
                missing.append(name)
            ids[name] = token_id
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise AutotuneError(f"the tokenizer lacks Llasa's tokens ({shown}): this is not a Llasa model; "
                                "use `HKUSTAudio/Llasa-1B` (or -3B, -8B), a local copy of it, or `--model tiny`")
        first, last = ids[speech_token(0)], ids[speech_token(NUM_SPEECH_TOKENS - 1)]
        if last - first != NUM_SPEECH_TOKENS - 1:
            raise AutotuneError(f"the tokenizer's speech tokens are not contiguous (<|s_0|>={first}, "
                                f"<|s_65535|>={last}): codes cannot be mapped by offset; use an unmodified Llasa tokenizer")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else ids["<|SPEECH_GENERATION_END|>"]
        return cls(speech_offset=first, speech_start=ids["<|SPEECH_GENERATION_START|>"],
                   speech_end=ids["<|SPEECH_GENERATION_END|>"], text_start=ids["<|TEXT_UNDERSTANDING_START|>"],
                   text_end=ids["<|TEXT_UNDERSTANDING_END|>"], pad=pad, eos=tokenizer.eos_token_id)


def chat_messages(text: str, reference_text: str | None = None, reference_ids: str = "",
                  speaker: str | None = None) -> list[dict[str, str]]:
    """Llasa's chat: user asks for speech, assistant starts with SPEECH_GENERATION_START.

    With a reference clip (voice cloning) its transcript precedes the text with
    nothing in between (the model card's `prompt_text + target_text`) and its
    speech tokens follow SPEECH_GENERATION_START, as in Llasa's own inference code.
    With a speaker the assistant turn opens with `Speaker {name}`, as the official
    multi-speaker recipe does (LLaSA_training, finetune/online_finetune/
    tts_online_dataset_genshin.py: assistant content f"Speaker {speaker}", the
    speech sequence from SPEECH_GENERATION_START appended after it).
    """
    full = f"{reference_text}{text}" if reference_text else text
    opening = speaker_opening(speaker)
    return [
        {"role": "user", "content": f"{USER_PREFIX}<|TEXT_UNDERSTANDING_START|>{full}<|TEXT_UNDERSTANDING_END|>"},
        {"role": "assistant", "content": f"{opening}<|SPEECH_GENERATION_START|>{reference_ids}"},
    ]


def speaker_opening(speaker: str | None) -> str:
    return f"Speaker {speaker}" if speaker else ""


class PromptBuilder:
    """Prompt ids for a transcript, from the tokenizer's chat template.

    A tokenizer without a chat template is refused (`AutotuneError`): the prompt must be
    the one the model was trained with, and no template is a safe guess. The
    template is rendered once around a marker; the transcript is tokenized on
    its own between two special tokens, so `prefix + tokens(text) + suffix` equals
    the full template's tokenization (a test checks this) at a fraction of the cost.
    A speaker changes only the suffix (the assistant turn's opening), which is
    tokenized once per speaker. Every transcript is normalised first (`text_normalization`,
    see `autotune.textnorm`): training, the token counts, the samples and synthesis all build
    their prompts here, so they all see the same text.
    """

    def __init__(self, tokenizer: Any, text_normalization: str = "none"):
        from autotune.textnorm import normalize

        self.tokenizer = tokenizer
        self.text_normalization = text_normalization
        normalize("", text_normalization)   # an unknown choice fails here, not at the first text
        self._normalize = lambda text: normalize(text, text_normalization)
        self.tokens = LlasaTokens.from_tokenizer(tokenizer)
        self._kept_ids: dict[str, array] = {}
        if not getattr(tokenizer, "chat_template", None):
            # Guessing one would train on a prompt the model never saw: Llasa-1B and -3B were
            # trained with Llama 3.2's template (46 prompt tokens with its system block), a
            # template without that block gives 21, and Llasa-8B descends from Llama 3.1.
            name = getattr(tokenizer, "name_or_path", "") or "the model"
            raise AutotuneError(f"the tokenizer of `{name}` has no chat template, and Llasa's prompt is the chat "
                                "template the model was trained with: put the model's own `chat_template.jinja` "
                                "(or a `tokenizer_config.json` holding `chat_template`) back into its folder from "
                                "the original download (`hf download <its hub id>`)")
        messages = chat_messages(_MARK)
        messages[1]["content"] = _SPEAKER_MARK + messages[1]["content"]
        # Llama 3.x's template writes today's date into the system block: a prompt would change at
        # midnight, and a run resumed the next day would train on other tokens than it began with.
        # The template's own date for when it cannot read the clock fixes it, for training and
        # synthesis alike (a template without a date ignores it).
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True,
                                                 date_string=TEMPLATE_DATE)
        before, _, after = rendered.partition(_MARK)
        self.prefix_ids: list[int] = tokenizer(before, add_special_tokens=False)["input_ids"]
        self._suffix_template = after
        self._suffixes: dict[str | None, list[int]] = {}
        self.suffix_ids: list[int] = self.suffix_for(None)

    def suffix_for(self, speaker: str | None) -> list[int]:
        """The ids after the transcript, up to and including SPEECH_GENERATION_START."""
        ids = self._suffixes.get(speaker)
        if ids is None:
            # The whole suffix is tokenized as one string, as the template's full rendering would be.
            text = self._suffix_template.replace(_SPEAKER_MARK, speaker_opening(speaker))
            ids = self._suffixes[speaker] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def normalized(self, texts: list[str]) -> list[str]:
        """The transcripts as the prompts hold them."""
        if self.text_normalization == "none":
            return list(texts)
        return [self._normalize(t) for t in texts]

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """The transcripts' token ids; those `keep_text_ids` kept are not tokenized again."""
        if not texts:
            return []
        kept = self._kept_ids
        missing = [t for t in dict.fromkeys(texts) if t not in kept]
        fresh = dict(zip(missing, self.tokenizer(self.normalized(missing), add_special_tokens=False)["input_ids"])) \
            if missing else {}
        return [list(kept[t]) if t in kept else fresh[t] for t in texts]

    def text_lengths(self, texts: list[str]) -> list[int]:
        """`[len(ids) for ids in text_ids(texts)]`, without building the id lists.

        A fast tokenizer whose Rust backend has no truncation or padding of its
        own is asked directly: the same encoding `__call__` runs, at about half
        the cost for short transcripts (no BatchEncoding, no Python lists)."""
        if not texts:
            return []
        backend = self._plain_backend()
        if backend is None:
            return [len(ids) for ids in self.text_ids(texts)]
        return [len(e) for e in backend.encode_batch(self.normalized(texts), add_special_tokens=False)]

    def keep_text_ids(self, texts: list[str]) -> list[int]:
        """Tokenize a dataset's transcripts once: their lengths now, their ids kept (4 bytes a token)
        for the examples built later (the dry run's and the training's). Only the data is kept,
        never what a server or a synthesis asks for."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._kept_ids]
        if missing:
            backend = self._plain_backend()
            normalized = self.normalized(missing)
            encoded = ([e.ids for e in backend.encode_batch(normalized, add_special_tokens=False)] if backend is not None
                       else self.tokenizer(normalized, add_special_tokens=False)["input_ids"])
            for text, ids in zip(missing, encoded):
                self._kept_ids[text] = array("i", ids)
        return [len(self._kept_ids[t]) for t in texts]

    def _plain_backend(self):
        """The fast tokenizer's Rust backend, where it encodes exactly as `__call__` does."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        return backend

    def prompt_ids(self, text: str, speaker: str | None = None) -> list[int]:
        return self.prefix_ids + self.text_ids([text])[0] + self.suffix_for(speaker)

    @property
    def overhead(self) -> int:
        """Prompt tokens around the transcript (no speaker)."""
        return self.overhead_for(None)

    def overhead_for(self, speaker: str | None) -> int:
        return len(self.prefix_ids) + len(self.suffix_for(speaker))


# An upper bound on the template's tokens around the transcript for a Llama-3
# tokenizer we cannot read (its system preamble with dates included).
ESTIMATED_TEMPLATE_TOKENS = 64


def estimate_text_tokens(text: str) -> int:
    """Conservative token count without the tokenizer: byte-level BPE never
    produces more tokens than the text has UTF-8 bytes."""
    return len(text.encode("utf-8"))


# ------------------------------------------------------------ tiny model ---

TINY_TEXT_VOCAB = 512  # bytes + chat specials + reserved fillers, like Llama-3's reserved range
TINY_SEED = 0


@lru_cache(maxsize=2)
def build_tiny_tokenizer(text_vocab: int = TINY_TEXT_VOCAB):
    """An offline tokenizer with Llasa's layout: text vocabulary, then the 8
    specials, then `<|s_0|>`..`<|s_65535|>`. Byte-level, so any UTF-8 text
    (Japanese included) round-trips. It is a stand-in: it is not Llama-3's BPE.
    `text_vocab=128256` gives the released ids (`<|s_0|>` = 128264) for benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    chat_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "<|finetune_right_pad_id|>"]
    text_tokens = byte_chars + chat_specials
    text_tokens += [f"<|reserved_special_token_{i}|>" for i in range(text_vocab - len(text_tokens))]
    all_tokens = text_tokens + LLASA_SPECIALS + [speech_token(i) for i in range(NUM_SPEECH_TOKENS)]
    vocab = {token: i for i, token in enumerate(all_tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", name_or_path=TINY)
    # Registered as special so the template's markers are never split into bytes.
    tokenizer.add_special_tokens({"additional_special_tokens": chat_specials[2:4] + LLASA_SPECIALS})
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def tiny_model_config(vocab_size: int):
    from transformers import LlamaConfig

    tok = build_tiny_tokenizer()
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)


def build_tiny_model(dtype=None):
    """A tiny random Llama with Llasa's token layout, built from a fixed seed so an
    adapter trained on it loads onto it again. It produces no meaningful speech."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_model_config(len(build_tiny_tokenizer()))
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY
    model.name_or_path = TINY
    if dtype is not None:
        model = model.to(dtype)
    return model
