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


# Padded widths when the step is compiled: a few buckets bound the recompiles (one per
# bucket and micro-batch size) where every width would be a new graph.
COMPILE_BUCKETS = (128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def bucket_width(longest: int, multiple_of: int, buckets: tuple[int, ...] | None) -> int:
    if buckets:
        for width in buckets:
            if width >= longest:
                return width
    return int(math.ceil(longest / multiple_of) * multiple_of)


class LlasaCollator:
    """Right-pads to a multiple of 8 (or to the next of `buckets`); padding is masked in
    labels and attention.

    `hidden_ids` are also masked out of attention where they occur: the official recipe
    (LLaSA_training finetune_offline_lora.py) sets pad = eos = `<|eot_id|>` and masks
    `input_ids != pad`, so the `<|eot_id|>` closing the system and user turns is never
    attended to, in Llasa's pretraining (train_tts.py) as in its fine-tuning."""

    def __init__(self, pad_id: int, multiple_of: int = 8, hidden_ids: tuple[int, ...] = (),
                 buckets: tuple[int, ...] | None = None):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.hidden_ids = tuple(hidden_ids)
        self.buckets = buckets

    def width(self, lengths: list[int]) -> int:
        return bucket_width(max(lengths), self.multiple_of, self.buckets)

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
    """Padding-free batches: concatenates samples into one row with position ids
    restarting at each sample. transformers builds a block-diagonal mask from
    the position ids when there is no attention mask and no cache (training with
    `use_cache=False`), so attention does not cross samples; a test checks it."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features], return_tensors="pt")
        return {**batch, **host_counts(batch["labels"], batch["input_ids"].numel())}


class TokenBudgetCollator:
    """One optimizer step's samples, split into micro-batches by tokens, not by count.

    The dry run measures a plan's micro-batch of `micro_batch_size` rows of the longest
    sample; that many padded tokens (`budget`) is what memory holds. Here the step's N
    samples, sorted by length, fill each micro-batch up to that budget, so short rows share
    a micro-batch and a step makes fewer, fuller calls. The step still sees exactly N
    samples, and the loss is still summed over their labelled tokens and divided by their
    count (`num_labels`), so nothing about the optimisation changes but the split."""

    def __init__(self, rows: LlasaCollator, budget_tokens: int):
        self.rows = rows
        self.budget = int(budget_tokens)

    def split(self, lengths: list[int]) -> list[list[int]]:
        """Indices of each micro-batch: sorted by length, each at most `budget` padded tokens
        (a single row longer than the budget goes alone: the dry run measured the longest)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        groups: list[list[int]] = []
        for index in order:
            if groups:
                trial = groups[-1] + [index]
                if len(trial) * self.rows.width([lengths[i] for i in trial]) <= self.budget:
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
    """Padded rows (a multiple of 8, or a few fixed widths when the step is compiled), or
    padding-free packed rows with `data.packing` (which carry no attention mask, so
    `hidden_ids` stay visible there: packing is ours, not the recipe's)."""
    if packing:
        return PackedCollator()
    return LlasaCollator(pad_id, hidden_ids=hidden_ids, buckets=COMPILE_BUCKETS if compiled else None)


class ExampleDataset(torch.utils.data.Dataset):
    """Pre-built examples; `lengths` feeds the length-grouped sampler without a pass over the data."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples
        self.lengths = [len(e["input_ids"]) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class EpochLengthGroupedSampler(torch.utils.data.Sampler):
    """HF's length grouping with its own generator seeded by (seed, epoch).

    HF's `LengthGroupedSampler` draws its permutation from the global torch RNG
    when an epoch starts, which a resumed run has in a different state: a resume
    into a later epoch would see another data order. Seeding per epoch makes the
    order a function of the epoch alone (the Trainer calls `set_epoch`)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
