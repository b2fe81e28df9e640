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


class LlasaCollator:
    """Right-pads to a multiple of 8; padding is masked in labels and attention.

    `hidden_ids` are also masked out of attention where they occur: the official recipe
    (LLaSA_training finetune_offline_lora.py) sets pad = eos = `<|eot_id|>` and masks
    `input_ids != pad`, so the `<|eot_id|>` closing the system and user turns is never
    attended to, in Llasa's pretraining (train_tts.py) as in its fine-tuning."""

    def __init__(self, pad_id: int, multiple_of: int = 8, hidden_ids: tuple[int, ...] = ()):
        self.pad_id = pad_id
        self.multiple_of = multiple_of
        self.hidden_ids = tuple(hidden_ids)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = int(math.ceil(longest / self.multiple_of) * self.multiple_of)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            length = len(f["input_ids"])
            input_ids[i, :length] = torch.as_tensor(f["input_ids"])
            labels[i, :length] = torch.as_tensor(f["labels"])
            attention[i, :length] = 1
        if self.hidden_ids:
            attention[torch.isin(input_ids, torch.tensor(self.hidden_ids))] = 0
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class PackedCollator:
    """Padding-free batches: concatenates samples into one row with position ids
    restarting at each sample. transformers builds a block-diagonal mask from
    the position ids when there is no attention mask and no cache (training with
    `use_cache=False`), so attention does not cross samples; a test checks it."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.inner([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features], return_tensors="pt")


def make_collator(pad_id: int, packing: bool, hidden_ids: tuple[int, ...] = ()):
    """Padded rows (multiple of 8), or padding-free packed rows with `data.packing` (which
    carry no attention mask, so `hidden_ids` stay visible there: packing is ours, not the recipe's)."""
    return PackedCollator() if packing else LlasaCollator(pad_id, hidden_ids=hidden_ids)



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
