"""Speaking with a Llasa model: the generation prompt, the model card's sampling, and the
codes it says. Used by the samples during training and by `synthesize.py`.

`generate_codes` turns a transcript into XCodec2 codes: Llasa's prompt (as training builds
it), temperature 0.8, top_p 1 and no repetition penalty by default, and never more than
Llasa's 2,048 positions in all; the new tokens up to SPEECH_GENERATION_END, speech ids only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SpeechItem:
    """One text to speak and how: the prompt's parts and this row's own sampling.

    `top_k` None is the model's generation default (transformers' 50 unless the model's
    generation_config says otherwise), which the model card's `generate(do_sample=True, ...)` call
    applies too. `seed` None draws a seed from torch's global generator."""

    text: str
    reference_text: str | None = None
    reference_codes: tuple[int, ...] | None = None
    speaker: str | None = None
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Spoken:
    """What one row said: `codes` (0..65535), `dropped` non-speech ids, `generated` new tokens
    before END, the row's token `budget` and its prompt length."""

    codes: list[int]
    dropped: int
    generated: int
    budget: int
    prompt_tokens: int

    @property
    def ended(self) -> bool:
        """The model said SPEECH_GENERATION_END before its budget ran out."""
        return self.generated < self.budget


def item_prompt_ids(builder: PromptBuilder, item: SpeechItem) -> list[int]:
    if not item.text or not item.text.strip():
        raise AutotuneError("the text to speak is empty")
    return prompt_ids(builder, item.text, reference_text=item.reference_text, reference_codes=item.reference_codes,
                      speaker=item.speaker)


def generate_batch(model: Any, tokenizer: Any, items: Sequence[SpeechItem], *, text_normalization: str = "none",
                   should_stop: Callable[[], bool] | None = None,
                   on_token: Callable[[int, int], None] | None = None) -> list[Spoken]:
    """Speak several texts in one `generate` call, each row with its own sampling.

    Rows are left-padded under an attention mask, so each row's logits are its own prompt's.
    Sampling happens in `_RowSampler`, with one `torch.Generator` per row seeded by that row's
    seed: a row's draws never depend on the other rows, and a text spoken in a batch gives the
    codes it gives alone with the same seed (up to the last bits of floating-point sums, which
    batch shapes can change on some kernels). `generate` itself runs greedy over the sampler's
    one-hot scores, so transformers keeps the cache, the padding and the stopping. A row stops
    at its own END or budget (prompt plus speech never pass 2,048 positions).
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    if not items:
        return []
    builder = prompt_builder_for(tokenizer, text_normalization)
    tokens = builder.tokens
    rows = [item_prompt_ids(builder, item) for item in items]
    budgets = [new_token_budget(len(ids), item.max_new_tokens) for ids, item in zip(rows, items)]
    width = max(len(ids) for ids in rows)
    device = _model_device(model)
    pads = [width - len(ids) for ids in rows]
    input_ids = torch.tensor([[tokens.pad] * pad + ids for pad, ids in zip(pads, rows)], dtype=torch.long,
                             device=device)
    attention_mask = torch.tensor([[0] * pad + [1] * len(ids) for pad, ids in zip(pads, rows)], dtype=torch.long,
                                  device=device)
    default_top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
    sampler = _RowSampler(items, pads, width, budgets, tokens.speech_end, device,
                          50 if default_top_k is None else int(default_top_k))
    most = max(budgets)

    class _Watch(StoppingCriteria):
        # Called once per generated token, on the host: the progress line and the signal check.
        def __call__(self, input_ids, scores, **kwargs):
            if on_token is not None:
                on_token(input_ids.shape[1] - width, most)
            stop = bool(should_stop and should_stop())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    kwargs: dict[str, Any] = dict(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, temperature=None, top_p=None,
        top_k=None, repetition_penalty=1.0, max_new_tokens=most + 1, eos_token_id=tokens.speech_end,
        pad_token_id=tokens.pad, use_cache=True, logits_processor=LogitsProcessorList([sampler]))
    if on_token is not None or should_stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Watch()])
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(**kwargs)
    finally:
        if was_training:
            model.train()
    sequences = output.sequences if hasattr(output, "sequences") else output
    spoken = []
    for row, (ids, budget) in enumerate(zip(rows, budgets)):
        codes, dropped, generated = codes_from_new_ids(sequences[row, width:].tolist()[:budget], tokens)
        spoken.append(Spoken(codes, dropped, generated, budget, len(ids)))
    return spoken


class _RowSampler:
    """A logits processor that samples each row with its own generator and settings, then
    leaves only the drawn token finite, so greedy `generate` takes exactly that token.

    Per row, in the order transformers' sampling applies them: repetition penalty over the
    row's own tokens (padding left out), temperature, top-k, top-p, then one draw. A row past
    its budget is given END (which `generate` then pads). The drawn token is set to +inf in the
    scores, so greedy decoding's argmax picks it whatever the other scores are."""

    def __init__(self, items: Sequence[SpeechItem], pads: list[int], width: int, budgets: list[int], end_id: int,
                 device: Any, default_top_k: int):
        import torch

        self.items, self.pads, self.width, self.budgets, self.end_id = list(items), pads, width, budgets, end_id
        self.default_top_k = default_top_k
        self.generators = []
        for item in items:
            seed = item.seed if item.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
            self.generators.append(torch.Generator(device=device).manual_seed(int(seed)))

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.width
        # transformers hands over a float32 copy of the logits: work in it (a half-precision one is widened).
        logits = scores if scores.dtype == torch.float32 else scores.float()
        chosen = torch.full((scores.shape[0],), self.end_id, dtype=torch.long, device=scores.device)
        live = [row for row in range(len(self.items)) if step < self.budgets[row]]   # the rest get END
        for row in live:
            penalty = self.items[row].repetition_penalty
            if penalty != 1.0:
                seen = input_ids[row, self.pads[row]:]
                previous = logits[row].gather(0, seen)
                logits[row].scatter_(0, seen, torch.where(previous < 0, previous * penalty, previous / penalty))
        groups: dict[tuple[float, int, float], list[int]] = {}
        for row in live:
            item = self.items[row]
            top_k = self.default_top_k if item.top_k is None else int(item.top_k)
            groups.setdefault((float(item.temperature), top_k, float(item.top_p)), []).append(row)
        for (temperature, top_k, top_p), rows in groups.items():
            # One batched top-k / softmax per group of rows that share their settings; one draw per row.
            values = logits[rows] / temperature
            indices = None
            if 0 < top_k < values.shape[1]:
                values, indices = torch.topk(values, top_k, dim=1)
            elif top_p < 1.0:
                values, indices = torch.sort(values, dim=1, descending=True)
            probs = torch.softmax(values, dim=1)
            if top_p < 1.0:
                # The smallest prefix whose mass reaches top_p (the most likely token always stays).
                before = torch.cumsum(probs, dim=1) - probs
                probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
            for i, row in enumerate(rows):
                pick = torch.multinomial(probs[i], 1, generator=self.generators[row])[0]
                chosen[row] = pick if indices is None else indices[i, pick]
        # The drawn token alone at +inf: greedy's argmax takes exactly it (no pass over the rest).
        scores.scatter_(1, chosen[:, None], float("inf"))
        return scores


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
