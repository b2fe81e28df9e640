"""Memory-lean causal-LM loss for Llasa's 193,800-token output layer.

The stock loss in `LlamaForCausalLM` builds the logits for every position
([batch x seq x 193,800], then an fp32 copy and an fp32 log-softmax kept for
backward). At batch 16 x seq 2048 that alone is tens of GiB. Two facts make
almost all of it avoidable:

* Llasa trains on speech tokens only; the text prompt is labelled -100, so
  those positions never need logits at all. We select the labelled rows
  before the head.
* The loss needs only one number per row (logsumexp minus the target logit).
  The selected rows go through the head in chunks; each chunk's logits are
  dropped as soon as its logsumexp and its gradient are known (the gradient
  is computed in forward, so the head's matmuls run no more often than stock).

`lean_cross_entropy` is numerically the stock `ForCausalLMLoss` (same shift,
same -100 rule, logits computed in the head's dtype and upcast to fp32 before
the softmax, mean over labelled tokens or sum / `num_items_in_batch`).
`compute_lean_loss` is what the trainer's `compute_loss` calls.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from autotune.errors import AutotuneError
from autotune.llasa import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "compute_lean_loss",
    "lean_cross_entropy",
    "liger_available",
]


def liger_available() -> bool:
    """True only when `liger_kernel` imports and a CUDA device is usable."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (  # noqa: F401
            LigerFusedLinearCrossEntropyLoss,
        )
    except Exception:  # a broken install (e.g. triton mismatch) must not break training
        return False
    return True


def _accum_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Stock upcasts logits to fp32; float64 is kept as float64 so tests can check
    # the maths tightly (stock would *downcast* it to fp32 there).
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(h @ W.T + b, y), never holding [rows x vocab].

    The gradients are computed chunk by chunk in forward, while each chunk's
    logits are at hand (as liger-kernel does): the head's matmuls then run
    exactly as often as in the stock loss (forward + one backward matmul),
    where recomputing the logits in backward would add a third. Saved for
    backward: the gradient wrt the hidden rows ([rows x hidden], the size of the
    rows themselves) and, only when the head trains, wrt its weight and bias.
    Backward just scales them by the incoming gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # [n, H], every row labelled
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V] or None
        targets: torch.Tensor,  # [n] int64
        chunk_size: int,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        device_type = hidden.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        head_dtype = _head_dtype(weight, autocast_on, torch.get_autocast_dtype(device_type))
        acc = _accum_dtype(weight.dtype)
        n = hidden.shape[0]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate the weight/bias gradient across chunks in fp32 so that a
        # bf16 head does not lose precision chunk after chunk. Only paid when
        # the head is trained; with LoRA it is frozen and this is skipped.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden[start:stop]
            logits = _chunk_logits(h, weight, bias, acc)
            target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
            # In-place max-shifted logsumexp: torch.logsumexp would allocate
            # another [chunk x vocab] fp32 temporary.
            row_max = logits.amax(dim=1, keepdim=True)
            # Keep the shift finite so an all -inf row gives -inf, not nan.
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            probs = logits.sub_(row_max).exp_()
            # Drop every name of the [chunk x vocab] buffer as soon as it is
            # done with: a name still bound when the next chunk's logits are
            # allocated would hold two chunks at once (+1.5 GiB at 4096 x 193,800).
            del logits
            sums = probs.sum(dim=1)
            chunk_lse = sums.log() + row_max.squeeze(1)
            total += (chunk_lse - target_logit).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                del probs
                continue
            # d(lse - z_y)/dz = softmax - onehot(y), built in place.
            grad = probs.div_(sums[:, None])
            del probs
            rows = torch.arange(stop - start, device=hidden.device)
            grad[rows, targets[start:stop]] -= 1
            # Stock casts the fp32 logits gradient back to the logits dtype
            # before the linear's backward; do the same.
            grad_lp = grad.to(head_dtype)
            del grad
            if grad_h is not None:
                grad_h[start:stop] = (grad_lp @ weight.to(head_dtype)).to(hidden.dtype)
            if grad_w is not None:
                grad_w.add_((grad_lp.t() @ h.to(head_dtype)).to(acc))
            if grad_b is not None:
                grad_b.add_(grad_lp.sum(dim=0).to(acc))
            del grad_lp
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total.to(grad_w.dtype)).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_total.to(grad_b.dtype)).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None


def _head_dtype(
    weight: torch.Tensor, autocast_on: bool, autocast_dtype: torch.dtype
) -> torch.dtype:
    # Under autocast a linear runs in the autocast dtype (as the stock lm_head would).
    if autocast_on and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return autocast_dtype
    return weight.dtype


def _chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype
) -> torch.Tensor:
    """One chunk's logits: computed like the stock lm_head (head dtype), then upcast."""
    if h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(weight.dtype)
    return F.linear(h, weight, bias).to(acc)


def _select_labelled(
    hidden_states: torch.Tensor, labels: torch.Tensor, ignore_index: int,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `hidden_states` whose *shifted* label is not ignored, and those labels.

    `positions` (flat indices the collator computed on the host, `batches.host_counts`)
    spare the device a `nonzero`, which would make the host wait for it every step."""
    if labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match hidden states "
            f"{tuple(hidden_states.shape)} (expected labels of shape hidden.shape[:-1])"
        )
    # Same shift as transformers' ForCausalLMLoss: position t predicts label t+1,
    # and the last position of each row has nothing to predict.
    labels = labels.to(hidden_states.device)
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_labels = shifted.reshape(-1)
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if positions is None:
        keep = (flat_labels != ignore_index).nonzero().squeeze(1)
    else:
        keep = positions.to(hidden_states.device, non_blocking=True)
    # index_select's backward scatters into a hidden-sized zero tensor, which
    # is cheap next to anything vocab-sized.
    return flat_hidden.index_select(0, keep), flat_labels.index_select(0, keep)


def _liger_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """Sum of token losses with liger-kernel's fused linear cross-entropy.

    The module call `LigerFusedLinearCrossEntropyLoss(...)(lin_weight, _input,
    target, bias)` has kept this argument order in every liger release; the
    reduction keyword has not always been honoured, so ask for the default
    mean over rows that are all labelled and multiply back.
    """
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(
        weight, hidden.to(weight.dtype).contiguous(), targets, bias
    )
    if not isinstance(out, torch.Tensor):  # newer releases may wrap extra outputs
        out = out.loss if hasattr(out, "loss") else out[0]
    return out.float() * hidden.shape[0]


def _lean_loss_and_count(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    lm_head_bias: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
    use_liger: bool | None,
    ignore_index: int,
    label_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, targets = _select_labelled(hidden_states, labels, ignore_index, label_positions)
    count = int(targets.shape[0])
    acc = _accum_dtype(lm_head_weight.dtype)
    if count == 0:
        # Stock gives nan (0/0) here; a zero that is still wired to the
        # hidden states keeps backward (and DDP's all-reduce) working.
        total = hidden.to(acc).sum()
    else:
        on_cuda = hidden.is_cuda and lm_head_weight.is_cuda
        if use_liger and not (on_cuda and liger_available()):
            raise AutotuneError(
                "use_liger=True needs liger-kernel and CUDA tensors",
                details=["install it with `pip install liger-kernel` or pass use_liger=None"],
            )
        if use_liger is not False and on_cuda and liger_available():
            total = _liger_sum(hidden, lm_head_weight, lm_head_bias, targets)
        else:
            total = _ChunkedLinearCrossEntropy.apply(
                hidden, lm_head_weight, lm_head_bias, targets, chunk_size
            )
    if num_items_in_batch is None:
        return total / max(count, 1), count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, count


def lean_cross_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    use_liger: bool | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Causal-LM loss equal to `LlamaForCausalLM(..., labels=labels).loss`.

    hidden_states: [..., seq, H] last hidden states (after the final norm).
    lm_head_weight: [V, H]; lm_head_bias: [V] or None.
    labels: [..., seq], unshifted, `ignore_index` where no loss is wanted.
    Returns a 0-dim loss: the mean over labelled tokens, or their sum divided
    by `num_items_in_batch` when given (transformers' gradient-accumulation
    convention). The result is float32 (float64 for float64 weights). With no
    labelled token it is 0 and still backpropagates (to zeros).
    use_liger: None uses liger-kernel when it is installed and the tensors
    are on CUDA; False never; True requires it.
    """
    loss, _ = _lean_loss_and_count(
        hidden_states,
        lm_head_weight,
        labels,
        chunk_size=chunk_size,
        lm_head_bias=lm_head_bias,
        num_items_in_batch=num_items_in_batch,
        use_liger=use_liger,
        ignore_index=ignore_index,
    )
    return loss


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers `*ForCausalLM` under a PEFT wrapper (or the model itself)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class _HiddenPassthrough(nn.Module):
    """Stands in for the output head: the model then returns its hidden states."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def _resolve_head(base: nn.Module) -> nn.Linear:
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is nn.Linear:
        return head
    # PEFT's modules_to_save wraps a trainable copy of the head; pick the copy
    # the wrapper's forward would use.
    original = getattr(head, "original_module", None)
    copies = getattr(head, "modules_to_save", None)
    if isinstance(original, nn.Module) and isinstance(copies, nn.ModuleDict):
        active = list(getattr(head, "active_adapters", []) or [])
        chosen = original
        if not getattr(head, "disable_adapters", False) and active and active[0] in copies:
            chosen = copies[active[0]]
        if type(chosen) is nn.Linear:
            return chosen
    raise AutotuneError(
        f"the lean loss needs a plain linear output head, found {type(head).__name__}",
        details=[
            "remove lm_head from the LoRA target modules, or turn the lean loss off",
        ],
    )


def compute_lean_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    chunk_size: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
    use_liger: bool | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the model with its head bypassed, then the lean loss; returns
    (loss, number of labelled tokens).

    `model` is a `*ForCausalLM` (Llama), optionally PEFT-wrapped and optionally
    inside DDP. The call goes through the outermost wrapper's forward, so DDP's
    gradient synchronisation, LoRA, gradient checkpointing and the
    `enable_input_require_grads` hooks all stay in the graph; only the output
    head is swapped for a pass-through for the duration of the call, so the
    "logits" that come back are the final hidden states.
    """
    if "labels" not in inputs:
        raise AutotuneError("compute_lean_loss needs `labels` in the batch")
    base = _unwrap_causal_lm(model)
    if not hasattr(base, "set_output_embeddings"):
        raise AutotuneError(f"cannot bypass the output head of {type(base).__name__}")
    head = _resolve_head(base)
    forward_kwargs: dict[str, Any] = {"use_cache": False}
    for key in ("input_ids", "inputs_embeds", "attention_mask", "position_ids"):
        if inputs.get(key) is not None:
            forward_kwargs[key] = inputs[key]
    original = base.get_output_embeddings()
    base.set_output_embeddings(_HiddenPassthrough())
    try:
        outputs = model(**forward_kwargs)
    finally:
        base.set_output_embeddings(original)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.logits
    return _lean_loss_and_count(
        hidden,
        head.weight,
        inputs["labels"],
        chunk_size=chunk_size,
        lm_head_bias=head.bias,
        num_items_in_batch=num_items_in_batch,
        use_liger=use_liger,
        ignore_index=IGNORE_INDEX,
        label_positions=inputs.get("label_positions"),
    )
