"""The lean loss must equal the stock transformers loss, in value and gradient,
while never keeping [tokens x vocab] logits for backward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.errors import AutotuneError  # noqa: E402
from autotune.loss import (  # noqa: E402
    _ChunkedLinearCrossEntropy,
    compute_lean_loss,
    lean_cross_entropy,
    liger_available,
)

VOCAB = 5000
HIDDEN = 64
BATCH, SEQ = 3, 48
CHUNK_SIZES = [1, 7, 16, 10**6]  # 16 < number of label tokens, so several chunks run


def _tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(dtype)
    # Llama's init gives near-uniform logits; sharpen the head so the loss and
    # its gradient are far from trivial.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    model.train()
    return model


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Three rows: a text prompt, a prompt plus right padding, and all-speech."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    labels = input_ids.clone()
    labels[0, :10] = -100
    labels[1, :20] = -100
    labels[1, -8:] = -100
    attention_mask[1, -8:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _n_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def _stock_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return model(**batch, **kwargs).loss


def _hidden(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state.detach().requires_grad_(True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _tiny_model()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return _batch()


def test_batch_has_several_chunks(batch: dict[str, torch.Tensor]) -> None:
    assert _n_label_tokens(batch["labels"]) > max(c for c in CHUNK_SIZES if c < 10**6)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_loss_matches_stock_fp32(model, batch, chunk_size: int) -> None:
    with torch.no_grad():
        stock = _stock_loss(model, batch)
        lean, count = compute_lean_loss(model, batch, chunk_size=chunk_size)
    assert lean.dtype == torch.float32 and lean.dim() == 0
    assert count == _n_label_tokens(batch["labels"])
    assert lean.item() == pytest.approx(stock.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_hidden_and_head_grads_match_stock(model, batch, chunk_size: int) -> None:
    head = model.get_output_embeddings()
    hidden = _hidden(model, batch)
    weight = head.weight.detach().clone().requires_grad_(True)

    stock = ForCausalLMLoss(F.linear(hidden, weight), batch["labels"], VOCAB)
    g_stock = torch.autograd.grad(stock, (hidden, weight))
    lean = lean_cross_entropy(hidden, weight, batch["labels"], chunk_size=chunk_size)
    g_lean = torch.autograd.grad(lean, (hidden, weight))

    assert lean.item() == pytest.approx(stock.item(), rel=1e-5)
    assert _rel(g_lean[0], g_stock[0]) < 1e-5
    assert _rel(g_lean[1], g_stock[1]) < 1e-5


def test_float64_is_tight(batch) -> None:
    # Stock downcasts float64 logits to fp32, so the tight reference is a
    # float64 cross-entropy over the full logits.
    model64 = _tiny_model(torch.float64)
    hidden = _hidden(model64, batch)
    weight = model64.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    labels = batch["labels"]
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    ref = F.cross_entropy(F.linear(hidden, weight).reshape(-1, VOCAB), shifted.reshape(-1))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    for chunk_size in (1, 7, 10**6):
        lean = lean_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
        assert lean.dtype == torch.float64
        g_lean = torch.autograd.grad(lean, (hidden, weight))
        assert abs(lean.item() - ref.item()) <= 1e-12 * abs(ref.item())
        assert _rel(g_lean[0], g_ref[0]) < 1e-12
        assert _rel(g_lean[1], g_ref[1]) < 1e-12
    with torch.no_grad():
        stock = _stock_loss(model64, batch)
    assert lean.item() == pytest.approx(stock.item(), rel=1e-6)


def test_gradcheck_with_bias() -> None:
    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: _ChunkedLinearCrossEntropy.apply(h, w, b, y, 3), (h, w, b)
    )


def test_bias_matches_stock(batch) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    bias = torch.randn(VOCAB, requires_grad=True)
    stock = ForCausalLMLoss(F.linear(hidden, weight, bias), batch["labels"], VOCAB)
    lean = lean_cross_entropy(hidden, weight, batch["labels"], chunk_size=7, lm_head_bias=bias)
    g_stock = torch.autograd.grad(stock, (hidden, weight, bias))
    g_lean = torch.autograd.grad(lean, (hidden, weight, bias))
    assert lean.item() == pytest.approx(stock.item(), rel=1e-5)
    for a, b in zip(g_lean, g_stock):
        assert _rel(a, b) < 1e-5


def _lora_model(gradient_checkpointing: bool):
    base = _tiny_model()
    if gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # the transformers 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        base.enable_input_require_grads()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        init_lora_weights=False,  # random B, so the LoRA A gradients are not all zero
    )
    peft_model = get_peft_model(base, config)
    peft_model.train()
    return peft_model


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_grads_match_stock(batch, gradient_checkpointing: bool) -> None:
    peft_model = _lora_model(gradient_checkpointing)
    _stock_loss(peft_model, batch).backward()
    stock = _lora_grads(peft_model)
    loss, _ = compute_lean_loss(peft_model, batch, chunk_size=16)
    loss.backward()
    lean = _lora_grads(peft_model)
    assert stock.keys() == lean.keys() and len(stock) == 2 * 2 * 2  # A,B x q,v x 2 layers
    assert all("lora_" in name for name in stock)
    for name in stock:
        assert stock[name].abs().sum() > 0, name
        assert _rel(lean[name], stock[name]) < 1e-5, name


def test_full_model_grads_match_stock(batch) -> None:
    # Head trainable (tied to the embedding): every parameter's gradient matches.
    m = _tiny_model()
    _stock_loss(m, batch).backward()
    stock = _lora_grads(m)
    loss, _ = compute_lean_loss(m, batch, chunk_size=7)
    loss.backward()
    lean = _lora_grads(m)
    assert "lm_head.weight" in stock or "model.embed_tokens.weight" in stock
    for name in stock:
        assert _rel(lean[name], stock[name]) < 1e-5, name


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_matches_transformers(model, batch, as_tensor: bool) -> None:
    n = 3 * _n_label_tokens(batch["labels"])  # e.g. three accumulated micro-batches
    num_items = torch.tensor(n) if as_tensor else n
    with torch.no_grad():
        stock = _stock_loss(model, batch, num_items_in_batch=num_items)
        lean, _ = compute_lean_loss(model, batch, chunk_size=16, num_items_in_batch=num_items)
        mean, _ = compute_lean_loss(model, batch, chunk_size=16)
    assert lean.item() == pytest.approx(stock.item(), rel=1e-5)
    assert lean.item() == pytest.approx(mean.item() / 3, rel=1e-5)


def test_num_items_splits_like_one_big_batch(model, batch) -> None:
    total = _n_label_tokens(batch["labels"])
    with torch.no_grad():
        whole, _ = compute_lean_loss(model, batch)
        parts = [
            compute_lean_loss(
                model, {k: v[rows] for k, v in batch.items()}, num_items_in_batch=total
            )[0]
            for rows in (slice(0, 1), slice(1, 3))
        ]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.parametrize("num_items", [None, 5])
def test_all_ignored_gives_zero_and_backward_works(model, batch, num_items) -> None:
    hidden = _hidden(model, batch)
    labels = torch.full_like(batch["labels"], -100)
    loss = lean_cross_entropy(hidden, model.lm_head.weight, labels, num_items_in_batch=num_items)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert loss.grad_fn is not None
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0

    only_last = torch.full_like(batch["labels"], -100)
    only_last[:, 0] = 7  # a label at position 0 is never predicted
    full, count = compute_lean_loss(model, {**batch, "labels": only_last})
    assert count == 0 and full.item() == 0.0
    full.backward()
    model.zero_grad(set_to_none=True)


def test_ignored_positions_never_reach_the_head(model, batch) -> None:
    # Poison the rows whose shifted label is -100: any use of them in the head
    # would make the loss or the gradient nan.
    hidden = _hidden(model, batch).detach().clone()
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    hidden[shifted == -100] = float("nan")
    hidden.requires_grad_(True)
    loss = lean_cross_entropy(hidden, model.lm_head.weight.detach(), batch["labels"], chunk_size=7)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(hidden.grad).all()
    assert hidden.grad[shifted == -100].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_stock(batch, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.2).to(dtype).requires_grad_(True)
    stock = ForCausalLMLoss(F.linear(hidden, weight), batch["labels"], VOCAB)
    lean = lean_cross_entropy(hidden, weight, batch["labels"], chunk_size=16)
    assert lean.dtype == torch.float32
    assert lean.item() == pytest.approx(stock.item(), rel=1e-3)
    g_stock = torch.autograd.grad(stock, (hidden, weight))
    g_lean = torch.autograd.grad(lean, (hidden, weight))
    for a, b in zip(g_lean, g_stock):
        assert a.dtype == dtype
        assert _rel(a, b) < 2e-2


def test_autocast_matches_stock(batch) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = ForCausalLMLoss(F.linear(hidden, weight), batch["labels"], VOCAB)
        lean = lean_cross_entropy(hidden, weight, batch["labels"], chunk_size=16)
    assert lean.item() == pytest.approx(stock.item(), rel=1e-3)
    g_stock = torch.autograd.grad(stock, (hidden, weight))
    g_lean = torch.autograd.grad(lean, (hidden, weight))
    for a, b in zip(g_lean, g_stock):
        assert _rel(a, b) < 2e-2


def _saved_numels(fn) -> list[int]:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_no_full_logits_saved_for_backward(model, batch) -> None:
    tokens = BATCH * SEQ
    assert _n_label_tokens(batch["labels"]) > HIDDEN  # so the head weight is below the bound
    hidden = _hidden(model, batch)
    weight = model.lm_head.weight

    lean = _saved_numels(lambda: lean_cross_entropy(hidden, weight, batch["labels"], chunk_size=16))
    assert lean and max(lean) < tokens * VOCAB
    # Nothing vocab-sized per token either: the largest is the (shared) head weight.
    assert max(lean) == weight.numel()

    stock = _saved_numels(lambda: ForCausalLMLoss(F.linear(hidden, weight), batch["labels"], VOCAB))
    assert max(stock) >= tokens * VOCAB

    whole_lean = _saved_numels(lambda: compute_lean_loss(model, batch))
    whole_stock = _saved_numels(lambda: _stock_loss(model, batch))
    assert max(whole_lean) < tokens * VOCAB
    assert max(whole_stock) >= tokens * VOCAB


def test_liger_is_opt_in_and_guarded(model, batch) -> None:
    if not liger_available():
        hidden = _hidden(model, batch)
        with pytest.raises(AutotuneError):
            lean_cross_entropy(hidden, model.lm_head.weight, batch["labels"], use_liger=True)
    # CPU tensors never take the liger path, whatever is installed.
    hidden = _hidden(model, batch)
    a = lean_cross_entropy(hidden, model.lm_head.weight, batch["labels"], use_liger=None)
    b = lean_cross_entropy(hidden, model.lm_head.weight, batch["labels"], use_liger=False)
    assert a.item() == b.item()


def test_lora_on_the_head_is_refused(batch) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    peft_model = get_peft_model(_tiny_model(), config)
    with pytest.raises(AutotuneError, match="plain linear output head"):
        compute_lean_loss(peft_model, batch)


def test_modules_to_save_head_is_used(batch) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(_tiny_model(), config)
    with torch.no_grad():
        for p in peft_model.base_model.model.lm_head.modules_to_save.parameters():
            p.mul_(1.5)  # make the trainable copy differ from the original
        stock = _stock_loss(peft_model, batch)
        lean, _ = compute_lean_loss(peft_model, batch)
    assert lean.item() == pytest.approx(stock.item(), rel=1e-5)


def test_bad_arguments(model, batch) -> None:
    hidden = _hidden(model, batch)
    with pytest.raises(ValueError):
        lean_cross_entropy(hidden, model.lm_head.weight, batch["labels"], chunk_size=0)
    with pytest.raises(ValueError):
        lean_cross_entropy(hidden, model.lm_head.weight, batch["labels"][:, :-1])
    with pytest.raises(AutotuneError):
        compute_lean_loss(model, {"input_ids": batch["input_ids"]})


def test_wrapped_models_go_through_the_wrapper_forward(model, batch) -> None:
    # The call goes through the wrapper (DDP's gradient sync lives in its
    # forward), with the head bypassed only during the call.
    head = model.get_output_embeddings()
    plain, _ = compute_lean_loss(model, batch)
    wrapped, _ = compute_lean_loss(torch.nn.DataParallel(model), batch)
    assert torch.allclose(plain, wrapped)
    assert model.get_output_embeddings() is head


@pytest.mark.parametrize(
    "dtype, chunks_allowed",
    # fp32: the logits buffer is also the gradient buffer (one chunk). bf16: plus
    # the gradient cast to bf16 for the matmul (half a chunk) while both exist.
    [(torch.float32, 1.25), (torch.bfloat16, 1.75)],
)
def test_chunked_loss_holds_one_chunk_of_logits_at_a_time(dtype, chunks_allowed):
    # A name left bound to the previous chunk's logits kept two [chunk x vocab]
    # fp32 buffers alive at the next allocation: +1.5 GiB at Llasa's 4096 x 193,800.
    from bench.memory import PeakTracker

    torch.manual_seed(0)
    vocab, hidden, chunk, rows = 20_000, 8, 64, 256  # four chunks
    h = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.1).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    chunk_fp32_bytes = chunk * vocab * 4
    with PeakTracker() as tracker:
        loss = _ChunkedLinearCrossEntropy.apply(h, w, None, targets, chunk)
    assert torch.isfinite(loss)
    assert tracker.peak_bytes >= chunk_fp32_bytes  # it did see a chunk's logits
    assert tracker.peak_bytes < chunks_allowed * chunk_fp32_bytes, tracker.peak_bytes / chunk_fp32_bytes
