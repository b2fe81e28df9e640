"""Padding-free batches: attention must not cross samples, a packed row attends as padded rows
do (the official `<|eot_id|>` rule included), and training runs packed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autotune.batches import (LlasaCollator, PackedCollator, TokenBudgetCollator, build_examples, make_collator,
                              with_4d_mask)
from autotune.llasa import PromptBuilder, build_tiny_model, build_tiny_tokenizer
from autotune.loss import compute_lean_loss
from autotune.reading import _Errors, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def examples(n: int = 3):
    builder = PromptBuilder(build_tiny_tokenizer())
    samples = read_jsonl(ROOT / "examples" / "tiny" / "train.jsonl", _Errors(5))[:n]
    return builder, build_examples(samples, builder)


def test_packed_rows_do_not_attend_across_samples():
    builder, ex = examples()
    model = build_tiny_model().eval()
    packed = PackedCollator()(ex)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    start = len(ex[0]["input_ids"])
    length = len(ex[1]["input_ids"])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ex[1]["input_ids"]]), use_cache=False).logits[0]
        # as given (transformers finds the samples from the position ids), and with our 4-D mask
        found = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        ours = model(**with_4d_mask({k: packed[k] for k in ("input_ids", "position_ids", "sequence_ids", "key_mask")}),
                     use_cache=False).logits[0]
    assert torch.allclose(found[start:start + length], alone, atol=1e-4)
    assert torch.allclose(ours[start:start + length], alone, atol=1e-4)
    # No padding at all: every position is a real token.
    assert packed["input_ids"].numel() == sum(len(e["input_ids"]) for e in ex)


@pytest.mark.parametrize("bucket", [pytest.param(None, marks=pytest.mark.slow), 256])
def test_a_packed_row_attends_as_padded_rows_do_with_the_eot_rule(bucket):
    """Token for token the same attention, so packing (a speed choice the tuner makes) never
    changes what the model learns."""
    builder, ex = examples(3)
    hidden = builder.tokens.hidden_from_attention
    assert hidden, "the tiny tokenizer has <|eot_id|>: the rule is exercised"
    model = build_tiny_model().eval()
    padded = LlasaCollator(builder.tokens.pad, hidden_ids=hidden)(ex)
    packed = PackedCollator(hidden, bucket_tokens=bucket, pad_id=builder.tokens.pad)(ex)
    if bucket:
        assert packed["input_ids"].shape[1] % bucket == 0
    real = packed["sequence_ids"] >= 0
    eot = torch.isin(packed["input_ids"], torch.tensor(hidden)) & real
    assert torch.equal(packed["key_mask"] == 0, eot) and int(eot.sum()) > 0
    model_keys = ("input_ids", "attention_mask", "position_ids", "sequence_ids", "key_mask")
    with torch.no_grad():
        rows = model(**with_4d_mask({k: v for k, v in padded.items() if k in model_keys}), use_cache=False).logits
        row = model(**with_4d_mask({k: v for k, v in packed.items() if k in model_keys}), use_cache=False).logits[0]
    start = 0
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        assert torch.allclose(row[start:start + n], rows[i, :n], atol=1e-5), i
        start += n
    assert torch.isfinite(row).all(), "the bucket's padding has a row of its own to attend: no NaN"
    assert padded["num_labels"] == packed["num_labels"] and padded["num_tokens"] == packed["num_tokens"]


def test_packed_and_padded_batches_give_the_same_loss():
    builder, ex = examples(4)
    model = build_tiny_model()
    packed, _ = compute_lean_loss(model, make_collator(builder.tokens.pad, True)(ex))
    padded, _ = compute_lean_loss(model, make_collator(builder.tokens.pad, False)(ex))
    assert torch.allclose(packed, padded, rtol=1e-5)


def test_a_token_budget_packs_a_steps_samples_into_few_rows():
    builder, ex = examples(8)
    rows = PackedCollator(bucket_tokens=256, pad_id=builder.tokens.pad)
    longest = max(len(e["input_ids"]) for e in ex)
    step = TokenBudgetCollator(rows, 2 * rows.width([longest]))
    batch = step(ex)
    parts = batch["micro_batches"]
    assert all(p["input_ids"].shape[0] == 1 and p["input_ids"].shape[1] <= step.budget for p in parts)
    assert sum(int((p["sequence_ids"] >= 0).sum()) for p in parts) == sum(len(e["input_ids"]) for e in ex)
    assert len(parts) < len(ex)
    # Each row is as full as the budget allows: the next row's first sample would not have fitted.
    lengths = [len(e["input_ids"]) for e in ex]
    groups = step.split(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(ex)))
    for group, after in zip(groups, groups[1:]):
        assert rows.cost([lengths[i] for i in group]) <= step.budget
        assert rows.cost([lengths[i] for i in group + after[:1]]) > step.budget


@pytest.mark.slow
def test_training_with_packing(tmp_path: Path):
    from train import main

    out = tmp_path / "out"
    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--auto", "--output-dir", str(out),
                 "--set", "data.packing=true", "--set", "training.max_steps=3", "--set", "training.eval_steps=3",
                 "--set", "training.save_steps=3", "--set", "samples.num_texts=0"]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_eval_loss"] > 0
    assert summary["dry_run"]["attempts"][0]["tokens_per_second"] > 0
    assert summary["plan"]["settings"]["data.packing"] is True
