"""Padding-free batches: attention must not cross samples, and training runs packed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autotune.batches import PackedCollator, build_examples, make_collator
from autotune.reading import _Errors, read_jsonl
from autotune.llasa import PromptBuilder, build_tiny_model, build_tiny_tokenizer
from autotune.loss import compute_lean_loss

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
        inside = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    assert torch.allclose(inside[start:start + length], alone, atol=1e-4)
    # No padding at all: every position is a real token.
    assert packed["input_ids"].numel() == sum(len(e["input_ids"]) for e in ex)


def test_packed_and_padded_batches_give_the_same_loss():
    builder, ex = examples(4)
    model = build_tiny_model()
    packed, _ = compute_lean_loss(model, make_collator(builder.tokens.pad, True)(ex))
    padded, _ = compute_lean_loss(model, make_collator(builder.tokens.pad, False)(ex))
    assert torch.allclose(packed, padded, rtol=1e-5)


def test_training_with_packing(tmp_path: Path):
    from train import main

    out = tmp_path / "out"
    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--auto", "--output-dir", str(out),
                 "--set", "data.packing=true", "--set", "training.max_steps=3", "--set", "training.eval_steps=3",
                 "--set", "training.save_steps=3", "--set", "samples.num_texts=0"]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_eval_loss"] > 0
    assert summary["dry_run"]["attempts"][0]["tokens_per_second"] > 0
