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
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

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
    real and on fake tensors alike. A tensor made before entering counts only
    once an op returns it or a view of it (an in-place op, a slice), or when
    passed to `add`.
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
    emulate_4bit: bool = False,
    attention: str = "sdpa",
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        **SHAPES[shape],
        tie_word_embeddings=True,
        max_position_embeddings=max(seq, 2048),
        use_cache=False,
        attn_implementation=attention,
    )
    # Build directly on the device: a 3B model initialised on the host takes minutes.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    if emulate_4bit:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, EmulatedNF4Linear(child))
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


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T where W lives packed; the full weight exists only during each matmul."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(packed, scales)  # references only, as bitsandbytes keeps
        ctx.shape = shape
        return x @ _dequantized(packed, shape, x.dtype).t()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        packed, _ = ctx.saved_tensors
        return grad_out @ _dequantized(packed, ctx.shape, grad_out.dtype), None, None, None


def _dequantized(packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    # The memory of bitsandbytes' dequantize_4bit (a full weight in the compute
    # dtype), not its values: this layer is for memory estimates only.
    return torch.zeros(shape, dtype=dtype, device=packed.device)


class EmulatedNF4Linear(torch.nn.Linear):
    """Memory stand-in for a bitsandbytes NF4 `Linear4bit` with double quantisation:
    4 bits per weight, one 8-bit scale per 64 weights and one fp32 scale per 256
    of those. Subclasses `nn.Linear` so PEFT puts LoRA on it like on any linear.
    Its outputs are zeros: use it to estimate memory (`--estimate`), never to train."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        numel = self.in_features * self.out_features
        device = linear.weight.device
        self.weight = torch.nn.Parameter(
            torch.empty(numel // 2, 1, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.register_parameter("bias", None)
        self.register_buffer("scales", torch.empty(numel // 64, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_of_scales", torch.empty(-(-numel // (64 * 256)), dtype=torch.float32, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self.weight, self.scales, (self.out_features, self.in_features))


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


# transformers' own SDPA attention under a name its mask builder does not know, so the model hands
# it no mask at all (`create_causal_mask` returns None for such names): causal attention, keys
# and values shared by their query groups. It is what SDPA gets on a GPU for rows without
# padding, where transformers reads the all-ones mask back and drops it; fake tensors cannot be
# read back, so through plain "sdpa" they would take the masked path instead (a 4-D mask, an
# additive copy of it saved in every layer, keys and values repeated to every head: +1.25 GiB at
# 4 x 2,048 on Llasa-1B that no GPU allocates).
UNMASKED_SDPA = "sdpa_without_mask"
AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)


def backward_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, chunk_size: int,
    use_liger: bool | None,
) -> torch.Tensor:
    """One forward+backward; returns the detached loss, so no graph or logits outlive it."""
    if mode == "stock":
        loss = model(**batch).loss
    else:
        loss, _ = compute_lean_loss(model, batch, chunk_size=chunk_size, use_liger=use_liger)
    loss.backward()
    return loss.detach()


def phases(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, chunk_size: int,
    use_liger: bool | None, current: Callable[[], int], peak: Callable[[], int], reset_peak: Callable[[], None],
) -> dict[str, float]:
    """One forward+backward measured in parts, in GiB above what was live before it: what the
    forward leaves for the backward (`forward_live`), the forward's peak, and the whole step's
    peak. The same on a GPU (the allocator's figures) and in `--estimate` (the tracker's), so
    that where an estimate misses shows which part it misses."""
    before = current()
    reset_peak()
    if mode == "stock":
        loss = model(**batch).loss
    else:
        loss, _ = compute_lean_loss(model, batch, chunk_size=chunk_size, use_liger=use_liger)
    forward_live, forward_peak = current() - before, peak() - before
    loss.backward()
    del loss
    step_peak = peak() - before
    return {"forward_live_gib": round(forward_live / GIB, 3), "forward_peak_gib": round(forward_peak / GIB, 3),
            "step_peak_gib": round(step_peak / GIB, 3),
            "bytes": {"forward_live": forward_live, "forward_peak": forward_peak, "step_peak": step_peak}}


def step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, chunk_size: int,
    use_liger: bool | None,
) -> float:
    return float(backward_step(model, batch, mode, chunk_size, use_liger))


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
        _sync(device)
        result["phases"] = phases(model, batch, mode, chunk_size, use_liger,
                                  lambda: torch.cuda.memory_allocated(device),
                                  lambda: torch.cuda.max_memory_allocated(device),
                                  lambda: torch.cuda.reset_peak_memory_stats(device))
        model.zero_grad(set_to_none=True)
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


@contextlib.contextmanager
def fake_tensors(labelled_rows: int, flat_label_numel: int) -> Iterator[PeakTracker]:
    """Fake bf16 tensors on the CPU device, with their live bytes tracked.

    The lean loss's one data-dependent op, the `nonzero` that picks labelled
    rows, has no size without data; it is answered with the count taken from
    the real batch (and refuses any other `nonzero`, so a new one cannot slip
    through with a wrong size).
    """
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    nonzero = torch.ops.aten.nonzero.default
    previous = fake_impls.op_implementations_dict.get(nonzero)

    def labelled_rows_nonzero(fake_mode: Any, func: Any, arg: torch.Tensor) -> torch.Tensor:
        if arg.dim() != 1 or arg.numel() != flat_label_numel:
            raise RuntimeError(f"--estimate met an unexpected nonzero over shape {tuple(arg.shape)}")
        meta = torch.empty((labelled_rows, 1), dtype=torch.long, device="meta")
        return FakeTensor(fake_mode, meta, arg.fake_device)

    original_apply = torch.nn.Module._apply

    def apply_in_place(module: torch.nn.Module, fn: Callable, recurse: bool = True) -> torch.nn.Module:
        # `Module._apply` always swaps fake parameters, which fails on tensors the
        # fake mode holds weak references to; `.data =` keeps them (and ties) intact.
        if recurse:
            for child in module.children():
                child._apply(fn)
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    with torch.no_grad():
                        converted = fn(tensor)
                    if converted is not tensor:
                        tensor.data = converted
        return module

    default_dtype = torch.get_default_dtype()
    torch.nn.Module._apply = apply_in_place  # type: ignore[method-assign]
    fake_impls.op_implementations_dict[nonzero] = labelled_rows_nonzero
    # Modules are created in bf16 directly: fake parameters cannot be swapped
    # to another dtype afterwards.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), PeakTracker() as tracker:
            yield tracker
    finally:
        torch.set_default_dtype(default_dtype)
        torch.nn.Module._apply = original_apply  # type: ignore[method-assign]
        if previous is None:
            fake_impls.op_implementations_dict.pop(nonzero, None)
        else:
            fake_impls.op_implementations_dict[nonzero] = previous


def estimate_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak allocated bytes of one forward+backward per mode, from fake tensors."""
    vocab = SHAPES[shape]["vocab_size"]
    real = make_batch(args.batch, args.seq, vocab, torch.device("cpu"))
    real_labels, masks_nothing = real["labels"], bool(real["attention_mask"].all())
    attention = UNMASKED_SDPA if masks_nothing else "sdpa"
    labelled_rows = int((real_labels[:, 1:] != -100).sum())
    entry: dict[str, Any] = {
        "batch": args.batch, "seq": args.seq, "dtype": "bfloat16", "lora_r": args.lora_r,
        "lora_targets": args.lora_targets, "chunk_size": args.chunk_size,
        "gradient_checkpointing": args.checkpointing, "vocab": vocab, "label_tokens": labelled_rows,
        "weights_4bit": args.load_in_4bit, "estimate": True,
    }
    for mode in args.modes:
        # A fresh fake model per mode: nothing of one mode's step outlives it.
        with fake_tensors(labelled_rows, real_labels.numel()) as tracker:
            model = build_model(
                shape, torch.device("cpu"), torch.bfloat16, lora_r=args.lora_r,
                targets=args.lora_targets, checkpointing=args.checkpointing, seq=args.seq,
                emulate_4bit=args.load_in_4bit, attention=attention,
            )
            batch = make_batch(args.batch, args.seq, vocab, torch.device("cpu"))
            if masks_nothing:
                del batch["attention_mask"]   # transformers drops it on a GPU (see UNMASKED_SDPA)
            resident = tracker.current_bytes
            tracker.reset_peak()
            parts = phases(model, batch, mode, args.chunk_size, False, lambda: tracker.current_bytes,
                           lambda: tracker.peak_bytes, tracker.reset_peak)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            # AdamW keeps two fp32 moments per trainable (LoRA) parameter; present
            # from the first optimizer step on, so in every later step's peak.
            adamw_bytes = 8 * trainable
            entry["weights_gib"] = round(resident / GIB, 3)
            entry[mode] = {
                "peak_bytes": tracker.peak_bytes,
                "peak_gib": round(tracker.peak_bytes / GIB, 3),
                "peak_above_weights_gib": round((tracker.peak_bytes - resident) / GIB, 3),
                "adamw_state_gib": round(adamw_bytes / GIB, 3),
                "peak_with_adamw_gib": round((tracker.peak_bytes + adamw_bytes) / GIB, 3),
                "tokens_per_s": None,
                "phases": parts,
            }
            del model, batch
    stock, lean = entry.get("stock"), entry.get("lean")
    if isinstance(stock, dict) and isinstance(lean, dict):
        entry["peak_saved_gib"] = round(stock["peak_gib"] - lean["peak_gib"], 3)
        entry["lean_peak_fraction"] = round(lean["peak_gib"] / stock["peak_gib"], 3)
    return entry


def bench_shape(shape: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq = args.seq
    entry: dict[str, Any] = {
        "batch": args.batch, "seq": seq, "dtype": str(dtype).removeprefix("torch."),
        "lora_r": args.lora_r, "chunk_size": args.chunk_size,
        "gradient_checkpointing": args.checkpointing, "vocab": SHAPES[shape]["vocab_size"],
    }
    model = _guarded(
        device,
        lambda: build_model(
            shape, device, dtype, lora_r=args.lora_r, targets=args.lora_targets,
            checkpointing=args.checkpointing, seq=seq,
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
    p.add_argument(
        "--estimate", action="store_true",
        help="no GPU needed: estimate each mode's peak GPU memory from fake tensors "
        "(bf16, Llasa shapes, 2048 tokens by default); no tokens/s",
    )
    p.add_argument(
        "--load-in-4bit", action="store_true",
        help="with --estimate: NF4 stand-ins for every projection (4 bits per weight + scales)",
    )
    p.add_argument(
        "--lora-targets", nargs="+", choices=ALL_PROJECTIONS, default=ALL_PROJECTIONS,
        help="LoRA target modules (default: all seven projections)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on one line")
    p.add_argument(
        "--model-shape", action="append", choices=sorted(SHAPES), dest="shapes",
        help="repeatable; default: tiny on cpu, llasa-1b and llasa-3b on cuda",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="without gradient checkpointing (the tuner's fastest rungs); default: with")
    p.add_argument("--seq", type=int, default=None, help="default: 2048 on cuda, 256 on cpu")
    p.add_argument("--chunk-size", type=int, default=1024, help="the lean loss's (the product's default)")
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
    if args.estimate and args.device == "cuda":
        p.error("--estimate runs on the CPU from fake tensors; drop --device cuda to estimate, or --estimate to measure")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.estimate and args.liger == "on":
        p.error("--estimate models the chunked lean loss, not liger-kernel's; drop --liger on")
    if args.load_in_4bit and not args.estimate:
        p.error("--load-in-4bit is an estimate-only stand-in; add --estimate")
    full_size = args.device == "cuda" or args.estimate
    args.shapes = args.shapes or (["llasa-1b", "llasa-3b"] if full_size else ["tiny"])
    args.seq = args.seq or (2048 if full_size else 256)
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
        "device": "estimate (fake tensors, no GPU)" if args.estimate else args.device,
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
    if args.estimate:
        report["estimates"] = {shape: estimate_shape(shape, args) for shape in args.shapes}
    else:
        report["measurements"] = {shape: bench_shape(shape, device, args) for shape in args.shapes}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
