"""`bench/memory.py --estimate`: peak GPU memory from fake tensors, no GPU.

The estimate must track what real tensors allocate (checked on the tiny
shape, where real tensors are cheap), and on the Llasa shapes it checks the
Memory-and-speed targets ahead of a GPU run: the lean loss's peak at batch
16 x 2048 is at most a quarter of stock, Llasa-1B at 2048 tokens fits 8 GiB,
Llasa-3B 12 GiB, and Llasa-3B with 4-bit weights 8 GiB (with the tuner's 0.9
safety margin and AdamW's state for the adapter).
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import memory as bench_memory  # noqa: E402

GIB = 2**30
MEMORY_FRACTION = 0.9  # autotune.memory_fraction's default


def _args(shape: str, *, batch: int, seq: int = 2048, load_in_4bit: bool = False,
          modes: tuple[str, ...] = ("stock", "lean"), checkpointing: bool = True) -> Namespace:
    return bench_memory.parse_args(
        ["--estimate", "--model-shape", shape, "--batch", str(batch), "--seq", str(seq), "--modes", *modes]
        + (["--load-in-4bit"] if load_in_4bit else []) + ([] if checkpointing else ["--no-checkpointing"])
    )


@pytest.mark.parametrize("mode", ["stock", "lean"])
def test_fake_estimate_equals_real_tensors_on_the_tiny_shape(mode):
    args = _args("tiny", batch=3, seq=64, modes=(mode,))
    estimate = bench_memory.estimate_shape("tiny", args)[mode]

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as the estimate builds its modules
    try:
        with bench_memory.PeakTracker() as tracker:
            model = bench_memory.build_model(
                "tiny", torch.device("cpu"), torch.bfloat16, lora_r=args.lora_r,
                targets=args.lora_targets, checkpointing=True, seq=64,
            )
            batch = bench_memory.make_batch(3, 64, bench_memory.SHAPES["tiny"]["vocab_size"], torch.device("cpu"))
            resident = tracker.current_bytes
            tracker.reset_peak()
            loss = bench_memory.backward_step(model, batch, mode, args.chunk_size, False)
    finally:
        torch.set_default_dtype(default_dtype)
    assert torch.isfinite(loss)
    assert tracker.peak_bytes > resident > 0
    assert estimate["peak_bytes"] == pytest.approx(tracker.peak_bytes, rel=0.01)


@pytest.mark.parametrize("padded", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["no-padding", "padded"])
def test_each_phase_of_the_estimate_is_what_real_tensors_hold(padded, monkeypatch):
    """Forward-live, forward-peak and step-peak bytes, fake against real, where the attention's
    path matters (a long row next to a small vocabulary): without padding transformers reads the
    all-ones mask back and drops it (causal SDPA, keys shared by query groups), which fake tensors
    cannot read, so the estimate must take that path itself; with padding both build the mask."""
    args = _args("tiny", batch=4, seq=512, modes=("stock",), checkpointing=False)
    pad = 9 if padded else 0
    real_batch = bench_memory.make_batch(4, 512, bench_memory.SHAPES["tiny"]["vocab_size"], torch.device("cpu"),
                                         pad_last_row=pad)
    original = bench_memory.make_batch
    monkeypatch.setattr(bench_memory, "make_batch", lambda *a, **k: original(*a, **{**k, "pad_last_row": pad}))
    estimate = bench_memory.estimate_shape("tiny", args)["stock"]["phases"]["bytes"]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with bench_memory.PeakTracker() as tracker:
            model = bench_memory.build_model("tiny", torch.device("cpu"), torch.bfloat16, lora_r=args.lora_r,
                                             targets=args.lora_targets, checkpointing=False, seq=512)
            real = bench_memory.phases(model, real_batch, "stock", args.chunk_size, False,
                                       lambda: tracker.current_bytes, lambda: tracker.peak_bytes, tracker.reset_peak)
    finally:
        torch.set_default_dtype(default_dtype)
    for phase in ("forward_live", "forward_peak", "step_peak"):
        assert estimate[phase] == pytest.approx(real["bytes"][phase], rel=1e-3), phase


@pytest.mark.slow
def test_lean_peak_is_at_most_a_quarter_of_stock_at_batch_16():
    entry = bench_memory.estimate_shape("llasa-1b", _args("llasa-1b", batch=16))
    # The stock loss keeps at least the fp32 logits of every position: a floor
    # from first principles that shows the fake model really was Llasa-sized.
    fp32_logits_gib = 16 * 2048 * bench_memory.LLASA_VOCAB * 4 / GIB
    assert entry["stock"]["peak_gib"] > entry["weights_gib"] + fp32_logits_gib
    assert entry["lean"]["peak_gib"] <= 0.25 * entry["stock"]["peak_gib"]


@pytest.mark.parametrize(
    "shape, load_in_4bit, card_gib",
    [pytest.param("llasa-1b", False, 8, marks=pytest.mark.slow), pytest.param("llasa-3b", False, 12, marks=pytest.mark.slow),
     pytest.param("llasa-3b", True, 8, marks=pytest.mark.slow)],
    ids=["1b-in-8gib", "3b-in-12gib", "3b-4bit-in-8gib"],
)
def test_targets_fit_with_the_lean_loss_where_stock_does_not(shape, load_in_4bit, card_gib):
    entry = bench_memory.estimate_shape(shape, _args(shape, batch=1, load_in_4bit=load_in_4bit))
    budget_gib = MEMORY_FRACTION * card_gib
    assert entry["lean"]["peak_with_adamw_gib"] <= budget_gib
    if not load_in_4bit:
        # The guide's own profiles run out of memory here (DESIGN.md's H200 emulation).
        assert entry["stock"]["peak_with_adamw_gib"] > budget_gib


@pytest.mark.slow
def test_four_bit_stand_in_holds_half_a_byte_per_projection_weight():
    full = bench_memory.estimate_shape("llasa-1b", _args("llasa-1b", batch=1, modes=("lean",)))
    packed = bench_memory.estimate_shape("llasa-1b", _args("llasa-1b", batch=1, load_in_4bit=True, modes=("lean",)))
    shape = bench_memory.SHAPES["llasa-1b"]
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = hidden * shape["num_key_value_heads"] // shape["num_attention_heads"]
    projection_weights = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    # bf16 (2 bytes) becomes 4 bits + an 8-bit scale per 64 + an fp32 scale per 16,384.
    saved_gib = projection_weights * (2 - 0.5 - 1 / 64 - 4 / 16384) / GIB
    assert full["weights_gib"] - packed["weights_gib"] == pytest.approx(saved_gib, rel=0.01)


def test_estimate_flags_are_checked(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_memory.parse_args(["--load-in-4bit"])
    assert exc.value.code == 2
    assert "--estimate" in capsys.readouterr().err


# DESIGN.md's H200 peaks (random-init Llasa-1B, LoRA r64 on all seven projections, bf16, 2,048
# tokens a row, a plain loop with AdamW), held out from the estimator: nothing was fitted to them.
DESIGN_PEAKS = [
    pytest.param(16, True, 76.3, 0.02, id="b16-ckpt-76.3", marks=pytest.mark.slow),
    pytest.param(4, False, 37.9, 0.05, id="b4-nockpt-37.9", marks=[pytest.mark.slow, pytest.mark.xfail(
        strict=True, reason="+6.3%: what no-checkpointing activations hold on a GPU waits for bench/gpu_checks.sh's "
                            "measured phases (memory-b4-nockpt.json against estimate-b4-nockpt.json)")]),
    pytest.param(8, False, 72.6, 0.05, id="b8-nockpt-72.6", marks=[pytest.mark.slow, pytest.mark.xfail(
        strict=True, reason="+6.8%: as batch 4")]),
]


@pytest.mark.parametrize("batch, checkpointing, measured_gib, band", DESIGN_PEAKS)
def test_the_estimate_lands_on_the_measured_h200_peaks(batch, checkpointing, measured_gib, band):
    args = bench_memory.parse_args(["--estimate", "--model-shape", "llasa-1b", "--batch", str(batch), "--lora-r", "64",
                                    "--modes", "stock"] + ([] if checkpointing else ["--no-checkpointing"]))
    estimate = bench_memory.estimate_shape("llasa-1b", args)["stock"]["peak_with_adamw_gib"]
    assert estimate == pytest.approx(measured_gib, rel=band)
