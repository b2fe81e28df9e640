"""From samples to batches: Llasa's training sequence for a sample, the dataset the Trainer
iterates, its length-grouped order, and the collators that pad or pack rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from autotune.llasa import IGNORE_INDEX
from autotune.reading import Sample


def build_example(sample: Sample, prompt_builder, text_ids: list[int] | None = None) -> dict[str, list[int]]:
    """input_ids = prompt (ends with SPEECH_GENERATION_START) + speech ids + END.

    As the official recipe (LLaSA_training finetune_offline_lora.py): labels are
    -100 before SPEECH_GENERATION_START and the ids themselves from it on, so the
    loss covers SPEECH_GENERATION_START, the speech ids and END. A sample with a
    speaker opens the assistant turn with `Speaker {name}` (see `llasa.chat_messages`)."""
    tokens = prompt_builder.tokens
    ids = text_ids if text_ids is not None else prompt_builder.text_ids([sample.text])[0]
    prompt = prompt_builder.prefix_ids + ids + prompt_builder.suffix_for(sample.prompt_speaker)
    speech = (sample.codes.astype(np.int64) + tokens.speech_offset).tolist() + [tokens.speech_end]
    return {"input_ids": prompt + speech, "labels": [IGNORE_INDEX] * (len(prompt) - 1) + [prompt[-1]] + speech}


def build_examples(samples: list[Sample], prompt_builder) -> list[dict[str, list[int]]]:
    text_ids = prompt_builder.text_ids([s.text for s in samples])
    return [build_example(s, prompt_builder, ids) for s, ids in zip(samples, text_ids)]


def host_counts(labels: torch.Tensor, attention_tokens: int) -> dict[str, Any]:
    """What the step needs to know about a batch without asking the device: its real tokens,
    its labelled tokens, and where the labelled positions are (the flat index of each
    position whose *next* label is not ignored, the shift causal-LM losses use). Computed
    on the host, with the batch: the lean loss never calls `nonzero` on the device."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    positions = (shifted.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return {"num_tokens": int(attention_tokens), "num_labels": int(positions.numel()), "label_positions": positions}


# A compiled step pads each micro-batch's length up to a multiple of this, so the graph sees a
# few shapes (a bucket each) where every length would be a new one.
BUCKET_TOKENS = 256


def bucket_width(longest: int, multiple_of: int, bucket_tokens: int | None = None) -> int:
    step = bucket_tokens or multiple_of
    return int(math.ceil(longest / step) * step)


class LlasaCollator:
    """Right-pads to a multiple of 8 (or of `bucket_tokens`); padding is masked in labels and
    attention.

    `hidden_ids` are also masked out of attention where they occur: the official recipe
    (LLaSA_training finetune_offline_lora.py) sets pad = eos = `<|eot_id|>` and masks
    `input_ids != pad`, so the `<|eot_id|>` closing the system and user turns is never
    attended to, in Llasa's pretraining (train_tts.py) as in its fine-tuning.

    The 2-D mask says which keys each row may attend to; the trainer turns it into the 4-D
    causal mask itself (`attention_4d`), so the model never reads it back."""

    packed = False

    def __init__(self, pad_id: int, multiple_of: int = 8, hidden_ids: tuple[int, ...] = (),
                 bucket_tokens: int | None = None):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.hidden_ids = tuple(hidden_ids)
        self.bucket_tokens = bucket_tokens

    def width(self, lengths: list[int]) -> int:
        return bucket_width(max(lengths), self.multiple_of, self.bucket_tokens)

    def cost(self, lengths: list[int]) -> int:
        """Tokens a micro-batch of rows this long holds, padding included."""
        return len(lengths) * self.width(lengths)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = self.width([len(f["input_ids"]) for f in features])
        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[i, :length] = torch.as_tensor(f["input_ids"])
            labels[i, :length] = torch.as_tensor(f["labels"])
            attention[i, :length] = 1
        real = int(attention.sum())
        if self.hidden_ids:
            attention[torch.isin(input_ids, torch.tensor(self.hidden_ids))] = 0
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, **host_counts(labels, real)}


class PackedCollator:
    """Padding-free batches: the samples concatenated into one row, position ids restarting at
    each sample, `sequence_ids` naming each token's sample and `key_mask` the keys it may see,
    from which the trainer builds a block-diagonal causal mask (`with_4d_mask`): attention never
    crosses samples, and inside its own sample a token attends to what it would in a padded row,
    `hidden_ids` (the official `<|eot_id|>` rule) included. With `bucket_tokens` the row is
    padded up to a multiple of it (a compiled step's few shapes); that padding is a block of its
    own, out of every loss.

    No `attention_mask`: given to a model as it is, a packed batch still keeps to its samples
    (transformers finds them from the position ids), only without the `<|eot_id|>` rule."""

    packed = True

    def __init__(self, hidden_ids: tuple[int, ...] = (), bucket_tokens: int | None = None, pad_id: int = 0):
        self.hidden_ids = tuple(hidden_ids)
        self.bucket_tokens = bucket_tokens
        self.pad_id = pad_id

    def width(self, lengths: list[int]) -> int:
        """The packed row of one sample this long (a token budget is this times the rows)."""
        return bucket_width(max(lengths), 1, self.bucket_tokens)

    def cost(self, lengths: list[int]) -> int:
        return bucket_width(sum(lengths), 1, self.bucket_tokens)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(f["input_ids"]) for f in features]
        real = sum(lengths)
        width = self.cost(lengths)
        input_ids = torch.full((1, width), self.pad_id, dtype=torch.long)
        labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((1, width), dtype=torch.long)
        sequences = torch.full((1, width), -1, dtype=torch.long)   # -1: the bucket's padding
        start = 0
        for i, f in enumerate(features):
            stop = start + lengths[i]
            input_ids[0, start:stop] = torch.as_tensor(f["input_ids"])
            labels[0, start:stop] = torch.as_tensor(f["labels"])
            labels[0, start] = IGNORE_INDEX   # nothing predicts a sample's first token
            positions[0, start:stop] = torch.arange(lengths[i])
            sequences[0, start:stop] = i
            start = stop
        positions[0, start:] = torch.arange(width - start)
        # Keys each token may attend to (inside its own block): the padding's own tokens stay
        # visible to each other, so no row of the mask is empty (an empty row gives NaN).
        keys = torch.ones((1, width), dtype=torch.long)
        if self.hidden_ids:
            keys[torch.isin(input_ids, torch.tensor(self.hidden_ids)) & (sequences >= 0)] = 0
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "sequence_ids": sequences,
                "key_mask": keys, **host_counts(labels, real)}


def attention_4d(attention_mask: torch.Tensor | None, sequence_ids: torch.Tensor | None, length: int,
                 device: Any, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The causal mask transformers would build from a 2-D `attention_mask` (keys each row may
    attend to), made on the device from what is there: [batch, 1, query, key], True where a
    query attends a key (`additive_dtype`: 0 there and the dtype's minimum elsewhere, what an
    eager attention adds to its scores). `sequence_ids` (packed rows) also keep each token
    inside its own sample. Given a 4-D mask, transformers uses it as it is and never reads the
    2-D one back to decide whether a mask is needed at all, which makes the host wait."""
    position = torch.arange(length, device=device)
    allowed = (position[None, :] <= position[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if sequence_ids is not None:
        sequence_ids = sequence_ids.to(device)
        allowed = allowed & (sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :])
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=device).masked_fill_(
        ~allowed, torch.finfo(additive_dtype).min)


def with_4d_mask(inputs: dict[str, Any], additive_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A batch as the model takes it, with the 4-D mask built on the device (`attention_4d`)
    from the padded rows' 2-D `attention_mask`, or from a packed row's `sequence_ids` and
    `key_mask`, which are consumed."""
    inputs = dict(inputs)
    sequences = inputs.pop("sequence_ids", None)
    keys = inputs.pop("key_mask", None)
    mask = inputs.get("attention_mask") if sequences is None else keys
    ids = inputs["input_ids"]
    if mask is not None or sequences is not None:
        inputs["attention_mask"] = attention_4d(mask, sequences, ids.shape[-1], ids.device, additive_dtype)
    return inputs


def without_mask_parts(inputs: dict[str, Any]) -> dict[str, Any]:
    """A batch for an attention that takes no 4-D mask (flash attention): the padded rows' 2-D
    mask as it is, a packed row found from its position ids."""
    return {k: v for k, v in inputs.items() if k not in ("sequence_ids", "key_mask")}


class TokenBudgetCollator:
    """One optimizer step's samples, split into micro-batches: by tokens (`budget_tokens`), or
    by count (`micro_batch_size` rows each, in the order given) when there is no budget.

    The dry run measures a plan's micro-batch of `micro_batch_size` rows of the longest
    sample; that many padded tokens (`budget`) is what memory holds. Here the step's N
    samples, sorted by length, fill each micro-batch up to that budget (padded rows, or one
    packed row), so short rows share a micro-batch and a step makes fewer, fuller calls. The
    step still sees exactly N samples, and the loss is still summed over their labelled
    tokens and divided by their count (`num_labels`), so nothing about the optimisation
    changes but the split."""

    def __init__(self, rows: LlasaCollator | PackedCollator, budget_tokens: int | None,
                 micro_batch_size: int | None = None):
        if budget_tokens is None and not micro_batch_size:
            raise ValueError("a token budget or a micro-batch size")
        self.rows = rows
        self.budget = int(budget_tokens) if budget_tokens is not None else None
        self.micro_batch_size = micro_batch_size

    def split(self, lengths: list[int]) -> list[list[int]]:
        """Indices of each micro-batch. With a budget: sorted by length, each at most `budget`
        tokens (a single row longer than the budget goes alone: the dry run measured the
        longest). Without: `micro_batch_size` at a time."""
        if self.budget is None:
            size = int(self.micro_batch_size or 1)
            return [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        groups: list[list[int]] = []
        for index in order:
            if groups:
                trial = groups[-1] + [index]
                if self.rows.cost([lengths[i] for i in trial]) <= self.budget:
                    groups[-1] = trial
                    continue
            groups.append([index])
        return groups

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        groups = self.split([len(f["input_ids"]) for f in features])
        parts = [self.rows([features[i] for i in group]) for group in groups]
        return {"micro_batches": parts, "num_labels": sum(p["num_labels"] for p in parts),
                "num_tokens": sum(p["num_tokens"] for p in parts)}


def make_collator(pad_id: int, packing: bool, hidden_ids: tuple[int, ...] = (), *, compiled: bool = False):
    """Padded rows (a multiple of 8, or of `BUCKET_TOKENS` when the step is compiled), or
    padding-free packed rows with `data.packing`; both hide `hidden_ids` from attention."""
    bucket = BUCKET_TOKENS if compiled else None
    if packing:
        return PackedCollator(hidden_ids, bucket_tokens=bucket, pad_id=pad_id)
    return LlasaCollator(pad_id, hidden_ids=hidden_ids, bucket_tokens=bucket)


class ExampleDataset(torch.utils.data.Dataset):
    """Pre-built examples; `lengths` feeds the length-grouped sampler without a pass over the data."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class LengthGroupedOrder(torch.utils.data.Dataset):
    """`dataset` in HF's length-grouped order, drawn from its own generator seeded by
    (seed, epoch): samples of similar length share a step (little padding), and the order is a
    function of the epoch alone, so a run resumed into a later epoch sees the data it would
    have. The Trainer reads it in sequence; accelerate's dataloader calls `set_epoch` on a
    dataset that has it at the start of each epoch."""

    def __init__(self, dataset: ExampleDataset, group: int, seed: int):
        self.dataset = dataset
        self.group = group
        self.seed = seed
        self.lengths = dataset.lengths
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        self.epoch = epoch
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        self.order = get_length_grouped_indices(self.lengths, self.group, generator=generator)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.dataset[self.order[index]]
