#!/usr/bin/env python
"""Stock vs lean (chunked, speech-only) loss: agreement, peak memory, speed.

    python bench/memory.py --device cpu --json
    python bench/memory.py --device cuda --json                    # Llasa-1B and -3B shapes
    python bench/memory.py --device cuda --model-shape llasa-3b --batch 16

Always runs a correctness check on a tiny random Llama with LoRA (fp32):
`loss_rel_diff` and `grad_rel_diff` compare the lean loss and the
concatenated LoRA gradients against the stock transformers loss.

Then, per model shape, a random-initialised model (bf16 on CUDA, fp32 on CPU)
with LoRA on all seven projections and non-reentrant gradient checkpointing
runs a few forward+backward steps in each mode; 10% of every row is a -100
prompt. Peak memory is `torch.cuda.max_memory_allocated` (CUDA only; weights
included). A mode that runs out of memory is reported as "oom".

`--estimate` needs no GPU: the same models and batches are built from fake
tensors (shapes and dtypes, no data, no arithmetic) and a dispatch hook adds
up every live tensor storage, which gives the peak of what the CUDA caching
allocator would report as allocated (weights included, allocator rounding and
the CUDA context not). Against the H200 (batch 16 x 2048, Llasa-1B shape,
checkpointing) it gave 75.88 GiB for stock where the card measured 75.9.
`--load-in-4bit` (with `--estimate`) stands in a packed NF4 layer for every
projection: 4 bits per weight plus its scales, dequantized to bf16 for the
duration of each matmul, as bitsandbytes' `matmul_4bit` does.

Standalone on purpose: from the project it imports only `autotune.loss`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from autotune.loss import compute_lean_loss, liger_available  # noqa: E402

LLASA_VOCAB = 193_800
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, vocab_size=5000,
    ),
    "llasa-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=8192, vocab_size=LLASA_VOCAB,
    ),
    "llasa-3b": dict(
        hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, intermediate_size=8192, vocab_size=LLASA_VOCAB,
    ),
}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_FRACTION = 0.10
GIB = 2**30


class PeakTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created while active, and their peak.

    A storage counts from the op that creates it until its Python object dies
    (PyTorch keeps one Python object per storage, so views share it). Works on
    real and on fake tensors alike; tensors made before entering are not
    counted unless passed to `add`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._bytes:
            return
        nbytes = int(storage.nbytes())
        self._bytes[key] = nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._release(key))

    def _release(self, key: int) -> None:
        self.current_bytes -= self._bytes.pop(key, 0)
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


def build_model(
    shape: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    lora_r: int,
    targets: list[str],
    checkpointing: bool,
    seq: int,
    random_lora_b: bool = False,
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        **SHAPES[shape],
        tie_word_embeddings=True,
        max_position_embeddings=max(seq, 2048),
        use_cache=False,
        attn_implementation="sdpa",
    )
    # Build directly on the device: a 3B model initialised on the host takes minutes.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        # Frozen embeddings would otherwise give checkpointed blocks inputs
        # with no grad, and the LoRA gradients would silently vanish.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=2 * lora_r,
        lora_dropout=0.0,
        target_modules=targets,
        # A zero B (the default) makes every LoRA A gradient zero, which would
        # make the gradient comparison of the correctness check half empty.
        init_lora_weights=not random_lora_b,
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


def make_batch(
    batch: int, seq: int, vocab: int, device: torch.device, *, pad_last_row: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : max(1, int(seq * PROMPT_FRACTION))] = -100
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last_row:
        labels[-1, -pad_last_row:] = -100
        attention_mask[-1, -pad_last_row:] = 0
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, chunk_size: int,
    use_liger: bool | None,
) -> float:
    """One forward+backward; only a float escapes so no graph or logits outlive it."""
    if mode == "stock":
        loss = model(**batch).loss
    else:
        loss, _ = compute_lean_loss(model, batch, chunk_size=chunk_size, use_liger=use_liger)
    loss.backward()
    return float(loss.detach())


def _lora_grad_vector(model: torch.nn.Module) -> torch.Tensor:
    grads = [
        p.grad.detach().double().flatten()
        for _, p in sorted(model.named_parameters())
        if p.requires_grad and p.grad is not None
    ]
    return torch.cat(grads)


def correctness_check(device: torch.device, use_liger: bool | None) -> dict[str, Any]:
    chunk_size = 16  # smaller than the label count, so the chunk loop really loops
    model = build_model(
        "tiny", device, torch.float32, lora_r=4, targets=["q_proj", "v_proj"],
        checkpointing=True, seq=64, random_lora_b=True,
    )
    batch = make_batch(3, 64, SHAPES["tiny"]["vocab_size"], device, pad_last_row=9)
    results: dict[str, tuple[float, torch.Tensor]] = {}
    for mode in ("stock", "lean"):
        model.zero_grad(set_to_none=True)
        loss = step(model, batch, mode, chunk_size, use_liger)
        results[mode] = (loss, _lora_grad_vector(model))
    (stock_loss, stock_grad), (lean_loss, lean_grad) = results["stock"], results["lean"]
    return {
        "loss_rel_diff": abs(lean_loss - stock_loss) / abs(stock_loss),
        "grad_rel_diff": float((lean_grad - stock_grad).norm() / stock_grad.norm()),
        "check": {
            "model": "tiny", "dtype": "float32", "chunk_size": chunk_size,
            "stock_loss": stock_loss, "lean_loss": lean_loss,
            "lora_grad_numel": int(stock_grad.numel()),
        },
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, *, chunk_size: int,
    use_liger: bool | None, warmup: int, steps: int,
) -> dict[str, Any]:
    device = batch["input_ids"].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    for _ in range(warmup):
        step(model, batch, mode, chunk_size, use_liger)
        model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(model, batch, mode, chunk_size, use_liger)
        model.zero_grad(set_to_none=True)
    _sync(device)
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "tokens_per_s": round(batch["input_ids"].numel() * steps / elapsed, 1),
        "step_s": round(elapsed / steps, 4),
        "loss": loss,
        "peak_gib": None,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result["peak_gib"] = round(peak / GIB, 3)
        result["peak_above_weights_gib"] = round((peak - resident) / GIB, 3)
    return result


def _guarded(device: torch.device, fn: Callable[[], Any]) -> Any:
    result: Any = "oom"
    try:
        result = fn()
    except torch.OutOfMemoryError:
        pass
    # Freed outside the except block: the traceback pins the failed frames' tensors.
    _free(device)
    return result


def bench_shape(shape: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq = args.seq
    entry: dict[str, Any] = {
        "batch": args.batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."),
        "lora_r": args.lora_r, "chunk_size": args.chunk_size,
        "gradient_checkpointing": True, "vocab": SHAPES[shape]["vocab_size"],
    }
    model = _guarded(
        device,
        lambda: build_model(
            shape, device, dtype, lora_r=args.lora_r, targets=ALL_PROJECTIONS,
            checkpointing=True, seq=seq,
        ),
    )
    if model == "oom":
        entry["stock"] = entry["lean"] = "oom"
        return entry
    batch = make_batch(args.batch, seq, SHAPES[shape]["vocab_size"], device)
    entry["label_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    if device.type == "cuda":
        entry["weights_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
    for mode in args.modes:
        entry[mode] = _guarded(
            device,
            lambda: measure(
                model, batch, mode, chunk_size=args.chunk_size, use_liger=args.use_liger,
                warmup=args.warmup, steps=args.steps,
            ),
        )
        model.zero_grad(set_to_none=True)
    stock, lean = entry.get("stock"), entry.get("lean")
    if isinstance(stock, dict) and isinstance(lean, dict):
        entry["lean_speedup"] = round(lean["tokens_per_s"] / stock["tokens_per_s"], 3)
        if stock["peak_gib"] is not None:
            entry["peak_saved_gib"] = round(stock["peak_gib"] - lean["peak_gib"], 3)
    del model, batch
    _free(device)
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object on one line")
    p.add_argument(
        "--model-shape", action="append", choices=sorted(SHAPES), dest="shapes",
        help="repeatable; default: tiny on cpu, llasa-1b and llasa-3b on cuda",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default: 2048 on cuda, 256 on cpu")
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--modes", nargs="+", choices=["stock", "lean"], default=["stock", "lean"],
    )
    p.add_argument(
        "--liger", choices=["auto", "on", "off"], default="auto",
        help="lean mode's use of liger-kernel (auto: when installed and on CUDA)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.shapes = args.shapes or (["tiny"] if args.device == "cpu" else ["llasa-1b", "llasa-3b"])
    args.seq = args.seq or (2048 if args.device == "cuda" else 256)
    args.use_liger = {"auto": None, "on": True, "off": False}[args.liger]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    uses_liger = device.type == "cuda" and args.use_liger is not False and liger_available()
    report: dict[str, Any] = {
        "device": args.device,
        "device_name": device_name,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
        },
        "liger_available": liger_available(),
        "lean_uses_liger": uses_liger,
    }
    started = time.perf_counter()
    report.update(correctness_check(device, args.use_liger))
    _free(device)
    report["measurements"] = {shape: bench_shape(shape, device, args) for shape in args.shapes}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
