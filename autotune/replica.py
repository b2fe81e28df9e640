"""Offline, exact replicas of Llasa's tokenizer, and random-weight Llasa models.

Llasa's released tokenizer is Llama-3.2-1B-Instruct's (Llama 3's 128,000 BPE
tokens, 256 control tokens, the Llama 3.2 chat template) with 8 task tokens and
65,536 speech tokens `<|s_0|>`..`<|s_65535|>` appended by `tokenizer.add_tokens`
(zhenye234/LLaSA_training `train_tts.py`). Hugging Face's hub cannot always be
reached, but PyPI's `llama-models` wheel ships Llama 3's `tokenizer.model`, so
the same tokenizer is rebuilt here, id for id, with transformers' tiktoken
converter. A real checkpoint's own tokenizer always wins: the replica serves the
`llasa-*-random` models (benchmarks, GPU checks) and offline length checks.

API for the wiring:
    is_replica(name)                    -> bool, for `--model llasa-1b-random` / `llasa-3b-random`
    replica_available()                 -> bool, whether `build_llasa_tokenizer` can work here (cheap)
    build_llasa_tokenizer()             -> PreTrainedTokenizerFast (cached; shared, do not mutate)
    llasa_config(name)                  -> LlamaConfig of the released model, weights aside
    build_random_llasa(name, dtype=None, device="cpu", attn_implementation="sdpa") -> LlamaForCausalLM
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError
from autotune.llasa import LLASA_SPECIALS, NUM_SPEECH_TOKENS, speech_token

REPLICA_SEED = 0
LLASA_VOCAB_SIZE = 193800
LLAMA3_BPE_TOKENS = 128000
INSTALL_HINT = 'pip install "llasa-autotune[replica]"'

# sha256 of Llama 3's tokenizer.model: the hub's LFS id of meta-llama's
# `original/tokenizer.model`, identical for Llama 3, 3.1 and 3.2.
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"

# Llama 3's pre-tokenizer regex, as `pat_str` in llama-models' llama3/tokenizer.py.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Ids 128000..128255 as Hugging Face's Llama 3.1/3.2 tokenizers name them
# (transformers' convert_llama_weights_to_hf.py, "3.1" list). llama-models' own
# tokenizer names 128005 `<|step_id|>` and 128011 `<|image|>`; Llasa's tokenizer
# descends from the Hugging Face one, so its names are used.
LLAMA32_CONTROL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"      # Llama-3.2-*-Instruct's eos; Llasa's training sets pad = eos
# `train_tts.py` loads the tokenizer with model_max_length=2048 and padding_side="right" before saving it.
LLASA_MODEL_MAX_LENGTH = 2048

# The chat template of meta-llama/Llama-3.2-1B-Instruct and -3B-Instruct (tokenizer_config.json),
# byte for byte: llama.cpp's models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja, written from
# the hub's tokenizer_config.json by its scripts/get_chat_template.py (its Llama-3.1 copy hashes to
# the sha256 of the official 3.1 template). sha256 5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4.
LLAMA32_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class ReplicaSpec:
    """The released model a `*-random` name stands for, and the Llama it was trained from."""

    released: str
    base: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


# Shapes of meta-llama/Llama-3.2-{1B,3B}-Instruct's config.json (HKUSTAudio/Llasa-{1B,3B} keep them and
# only widen the vocabulary); llama-models' sku_list.arch_args_{1b,3b} give the same numbers (a test checks).
REPLICA_MODELS: dict[str, ReplicaSpec] = {
    "llasa-1b-random": ReplicaSpec(released="HKUSTAudio/Llasa-1B", base="meta-llama/Llama-3.2-1B-Instruct",
                                   hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8),
    "llasa-3b-random": ReplicaSpec(released="HKUSTAudio/Llasa-3B", base="meta-llama/Llama-3.2-3B-Instruct",
                                   hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8),
}


def is_replica(name: str) -> bool:
    return name in REPLICA_MODELS


def _spec(name: str) -> ReplicaSpec:
    if name not in REPLICA_MODELS:
        raise AutotuneError(f"`{name}` is not a random-weight Llasa replica; use one of "
                            f"{', '.join(f'`{n}`' for n in REPLICA_MODELS)}")
    return REPLICA_MODELS[name]


# ------------------------------------------------------------ tokenizer ---

def _llama3_tokenizer_file() -> Path | None:
    # find_spec does not run the package: llama-models is only a data source here.
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    return None


def replica_available() -> bool:
    """Whether the replica tokenizer can be built here, without building it."""
    return _llama3_tokenizer_file() is not None and importlib.util.find_spec("tiktoken") is not None


def llama3_tokenizer_file() -> Path:
    """Llama 3's `tokenizer.model` from the installed `llama-models`, checked byte for byte."""
    path = _llama3_tokenizer_file()
    if path is None or importlib.util.find_spec("tiktoken") is None:
        raise AutotuneError("the offline Llasa tokenizer needs Llama 3's tokenizer.model from the `llama-models` "
                            f"package and `tiktoken`: `{INSTALL_HINT}`, or pass a real Llasa checkpoint "
                            "(`--model HKUSTAudio/Llasa-1B` or a local folder)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LLAMA3_TOKENIZER_SHA256:
        raise AutotuneError(f"`{path}` is not Llama 3's tokenizer.model (sha256 {digest[:12]}..., expected "
                            f"{LLAMA3_TOKENIZER_SHA256[:12]}...): reinstall it with `pip install --force-reinstall "
                            "llama-models==0.3.0`")
    return path


@lru_cache(maxsize=1)
def build_llasa_tokenizer():
    """Llasa's tokenizer, rebuilt offline: 193,800 tokens at the released ids, the
    Llama 3.2 chat template, bos `<|begin_of_text|>`, eos = pad = `<|eot_id|>`.

    Cached for the process (4 s to build on two idle cores, then free): callers
    share one object, so they must not change it."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(llama3_tokenizer_file()), pattern=LLAMA3_PATTERN).converted()
    if backend.get_vocab_size() != LLAMA3_BPE_TOKENS:
        raise AutotuneError(f"Llama 3's tokenizer.model gave {backend.get_vocab_size()} BPE tokens, not "
                            f"{LLAMA3_BPE_TOKENS}: reinstall it with `pip install --force-reinstall llama-models==0.3.0`")
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA32_CONTROL_TOKENS])
    # Added as `train_tts.py`'s `add_tokens` adds them: plain (not special) tokens, so that
    # `decode(..., skip_special_tokens=True)` keeps `<|s_N|>`, which Llasa's inference code parses.
    backend.add_tokens([AddedToken(t, normalized=True, special=False)
                        for t in LLASA_SPECIALS + [speech_token(i) for i in range(NUM_SPEECH_TOKENS)]])
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Llama 3's tokenizer.json: byte-level offsets, then `<|begin_of_text|>` before each sequence.
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                                      special_tokens=[(BOS_TOKEN, bos_id)]),
    ])
    # No name_or_path here: with one, transformers asks the hub whether it is a Mistral model.
    # clean_up_tokenization_spaces is True in Llama 3.2's config, but transformers 5 ignores it
    # for BPE tokenizers (with a warning); False decodes the same without the warning.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        model_max_length=LLASA_MODEL_MAX_LENGTH, padding_side="right", clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = LLAMA32_CHAT_TEMPLATE
    if len(tokenizer) != LLASA_VOCAB_SIZE:  # a tokenizers/transformers change, not a user error
        raise RuntimeError(f"the replica tokenizer has {len(tokenizer)} tokens, not {LLASA_VOCAB_SIZE}")
    return tokenizer


# ---------------------------------------------------------------- model ---

def llasa_config(name: str):
    """The released model's config.json as a LlamaConfig: Llama 3.2's, vocabulary 193,800."""
    from transformers import LlamaConfig

    spec = _spec(name)
    return LlamaConfig.from_dict({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": LLASA_VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.hidden_size // spec.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],  # the Instruct models' end ids; Llasa stops on its own END
    })


def build_random_llasa(name: str, dtype: Any = None, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Llasa's architecture with random weights from a fixed seed, built in place on
    `device` in `dtype` (float32 when None): on a GPU, no host copy of the
    weights. The same seed gives the same weights on the same kind of device."""
    import torch
    from transformers import AutoModelForCausalLM

    config = llasa_config(name)
    target = torch.device(device)
    forked = [target.index if target.index is not None else torch.cuda.current_device()] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), target:
        torch.manual_seed(REPLICA_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32,
                                                 attn_implementation=attn_implementation)
    model.config.name_or_path = name
    model.name_or_path = name
    return model
