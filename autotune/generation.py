"""Speaking with a Llasa model: the generation prompt, the model card's sampling, and the
codes it says. Used by the samples during training and by `synthesize.py`.

`generate_codes` turns a transcript into XCodec2 codes: Llasa's prompt (as training builds
it), temperature 0.8, top_p 1 and no repetition penalty by default, and never more than
Llasa's 2,048 positions in all; the new tokens up to SPEECH_GENERATION_END, speech ids only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from autotune.errors import AutotuneError
from autotune.llasa import MAX_POSITIONS, LlasaTokens, PromptBuilder


def prompt_ids(builder: PromptBuilder, text: str, *, reference_text: str | None = None,
               reference_codes: Sequence[int] | None = None, speaker: str | None = None) -> list[int]:
    """Llasa's generation prompt: the chat template (continued final message) ending
    with <|SPEECH_GENERATION_START|>, exactly as training builds it.

    With a reference clip (voice cloning) its transcript precedes the text directly,
    with nothing in between (the model card's `prompt_text + target_text`), and its
    speech ids follow SPEECH_GENERATION_START, as in `llasa.chat_messages`. The
    speech ids are added by offset rather than by tokenizing `<|s_N|>` strings,
    which gives the same ids as the template for Llasa's tokenizer and also works
    for tokenizers where the speech tokens are not registered as added tokens.
    """
    full = f"{reference_text}{text}" if reference_text else text
    ids = builder.prompt_ids(full, speaker=speaker)
    if reference_codes:
        ids = ids + [builder.tokens.code_to_id(int(c)) for c in reference_codes]
    return ids


def new_token_budget(prompt_length: int, max_new_tokens: int | None) -> int:
    """How many tokens may be generated: what was asked, and never past Llasa's
    2,048 trained positions (prompt included), as the model card's `max_length=2048`."""
    room = MAX_POSITIONS - prompt_length
    if room <= 0:
        raise AutotuneError(f"the prompt is {prompt_length} tokens and Llasa was trained on {MAX_POSITIONS} positions "
                            "in all: shorten the text (or the reference clip and its transcript)")
    return room if max_new_tokens is None else min(int(max_new_tokens), room)


def codes_from_new_ids(new_ids: Sequence[int], tokens: LlasaTokens) -> tuple[list[int], int, int]:
    """Post-process generated ids: keep those before <|SPEECH_GENERATION_END|>,
    map speech ids to codes by offset and drop everything else.

    Returns `(codes, dropped, generated)`: `generated` is the number of new tokens
    before END (END itself and anything after it are not counted), `dropped` how
    many of them were not speech tokens, so `generated == len(codes) + dropped`.
    """
    codes: list[int] = []
    dropped = 0
    generated = 0
    for token_id in new_ids:
        token_id = int(token_id)
        if token_id == tokens.speech_end:
            break
        generated += 1
        if tokens.is_speech_id(token_id):
            codes.append(token_id - tokens.speech_offset)
        else:
            dropped += 1
    return codes, dropped, generated


_BUILDERS: dict[tuple[int, str], PromptBuilder] = {}


def prompt_builder_for(tokenizer: Any, text_normalization: str = "none") -> PromptBuilder:
    """One `PromptBuilder` per tokenizer and normalisation (it renders the chat template once)."""
    key = (id(tokenizer), text_normalization)
    builder = _BUILDERS.get(key)
    if builder is None or builder.tokenizer is not tokenizer:
        if len(_BUILDERS) >= 8:
            _BUILDERS.clear()
        builder = _BUILDERS[key] = PromptBuilder(tokenizer, text_normalization)
    return builder


def _model_device(model: Any):
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def generate_codes(model: Any, tokenizer: Any, text: str, *, temperature: float = 0.8, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, max_new_tokens: int | None = None,
                   reference_text: str | None = None, reference_codes: Sequence[int] | None = None,
                   speaker: str | None = None, seed: int | None = None, text_normalization: str = "none",
                   should_stop: Callable[[], bool] | None = None,
                   on_token: Callable[[int, int], None] | None = None) -> tuple[list[int], int, int]:
    """Speak `text` with a Llasa model (plain or PEFT): sampled XCodec2 codes.

    Sampling is the model card's by default (temperature 0.8, top_p 1, no repetition
    penalty), and prompt plus new tokens never pass 2,048 positions (`new_token_budget`).
    Returns `(codes, dropped, generated)` as `codes_from_new_ids` describes; the
    codes (each in 0..65535) are only the new speech, never the reference clip's.
    With `seed` the sampling is reproducible and the caller's random state (CPU
    and the model's CUDA device) is left as it was; without it the global
    generator is used. The model is put in eval mode for the call and returned
    to train mode if it was training. `on_token(done, budget)` is called after each
    new token (a progress line); `should_stop()` true ends generation at the next token
    (a signal arrived), keeping what was generated so far. `text_normalization` is the run's
    (`autotune.textnorm`), applied to the text and the reference transcript alike.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    if not text or not text.strip():
        raise AutotuneError("the text to speak is empty")
    builder = prompt_builder_for(tokenizer, text_normalization)
    tokens = builder.tokens
    ids = prompt_ids(builder, text, reference_text=reference_text, reference_codes=reference_codes, speaker=speaker)
    budget = new_token_budget(len(ids), max_new_tokens)
    device = _model_device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)

    class _Watch(StoppingCriteria):
        # Called once per generated token, on the host: the progress line and the signal check.
        def __call__(self, input_ids, scores, **kwargs):
            if on_token is not None:
                on_token(input_ids.shape[1] - len(ids), budget)
            stop = bool(should_stop and should_stop())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=float(temperature),
                  top_p=float(top_p), repetition_penalty=float(repetition_penalty),
                  max_new_tokens=budget, eos_token_id=tokens.speech_end, pad_token_id=tokens.pad,
                  use_cache=True)
    if on_token is not None or should_stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Watch()])

    was_training = bool(getattr(model, "training", False))
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.no_grad():
            if seed is None:
                output = model.generate(**kwargs)
            else:
                with torch.random.fork_rng(devices=fork_devices):
                    torch.manual_seed(int(seed))
                    output = model.generate(**kwargs)
    finally:
        if was_training:
            model.train()
    sequence = output[0] if not hasattr(output, "sequences") else output.sequences[0]
    new_ids = sequence[len(ids):].tolist()
    return codes_from_new_ids(new_ids, tokens)
