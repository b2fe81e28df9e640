"""Base model and tokenizer, precision, 4-bit weights and LoRA; strict checkpoint loading.

Builders take plain values, not the whole config, so the dry run can rebuild
any rung of its ladder. Checkpoints load strictly (`strict_from_pretrained`):
a weight the model expects but the files lack is an error, not random noise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from autotune.errors import AutotuneError
from autotune.llasa import TINY, build_tiny_model, build_tiny_tokenizer


# --------------------------------------------------------------------------- strict loading


class BenignKey(NamedTuple):
    """A weight name `from_pretrained` may report without the loaded model being wrong."""

    kind: str  # "missing" (the model has it, the checkpoint not) or "unexpected" (the other way round)
    pattern: str  # searched (re.search) in the weight name
    applies: Callable[[Any], bool]  # given the model's config
    why: str


#: The one list of weight-name differences that do not make a loaded model wrong.
#: `strict_from_pretrained` refuses every other missing, unexpected or wrongly
#: shaped weight, because transformers fills those with random values and goes on.
BENIGN_WEIGHT_KEYS: tuple[BenignKey, ...] = (
    BenignKey("unexpected", r"(^|\.)rotary_emb\.(original_)?inv_freq$", lambda config: True,
              "RoPE frequencies are a buffer computed from the config at build time; older transformers "
              "versions saved them in checkpoints, newer ones neither save nor load them"),
    BenignKey("unexpected", r"(^|\.)position_ids$", lambda config: True,
              "an `arange` buffer that transformers now builds itself; older versions saved it"),
    BenignKey("missing", r"^lm_head\.weight$", lambda config: bool(getattr(config, "tie_word_embeddings", False)),
              "with `tie_word_embeddings` (Llasa-1B) the output head is the input embedding matrix, "
              "so a checkpoint stores it once, as `model.embed_tokens.weight`"),
)


def _benign(kind: str, name: str, config: Any) -> bool:
    return any(b.kind == kind and b.applies(config) and re.search(b.pattern, name) for b in BENIGN_WEIGHT_KEYS)


def describe_weight_problems(missing: set[str] | list[str], unexpected: set[str] | list[str],
                             mismatched: list[tuple[str, Any, Any]] = ()) -> str:
    """'2 weights missing (e.g. `a`, `b`); 1 unexpected (`c`)' for one-line errors; '' when all match."""

    def examples(names: list[str]) -> str:
        shown = ", ".join(f"`{n}`" for n in names[:2])
        return f"e.g. {shown}" if len(names) > 2 else shown

    parts = []
    if missing:
        parts.append(f"{len(missing)} weight{'s' if len(missing) != 1 else ''} missing ({examples(sorted(missing))})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({examples(sorted(unexpected))})")
    if mismatched:
        rows = sorted(mismatched, key=lambda row: row[0])
        shown = ", ".join(f"`{n}` {list(ckpt)} in the checkpoint vs {list(model)} in the model" for n, ckpt, model in rows[:2])
        parts.append(f"{len(rows)} with the wrong shape ({'e.g. ' if len(rows) > 2 else ''}{shown})")
    return "; ".join(parts)


class _DropLoadReport(logging.Filter):
    """transformers logs a table of unmatched weights; `strict_from_pretrained` raises one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    log = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def strict_from_pretrained(model_class: Any, source: str, *, label: str, fix: str, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(source, **kwargs)`, refusing a checkpoint whose weights do not all fit.

    transformers initialises missing and wrongly shaped weights at random, prints a
    table and carries on, so a renamed or truncated checkpoint would train on noise.
    Here any difference outside `BENIGN_WEIGHT_KEYS` is one `AutotuneError` that
    names `label` (the checkpoint as the user gave it), how many weights differ with
    examples, and `fix`. Loading errors themselves propagate unchanged.
    """
    with _quiet_load_report():
        # Mismatched shapes are reported, not raised, so that they join the one error below.
        model, info = model_class.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    config = model.config
    missing = {k for k in info.get("missing_keys", ()) if not _benign("missing", k, config)}
    unexpected = {k for k in info.get("unexpected_keys", ()) if not _benign("unexpected", k, config)}
    mismatched = list(info.get("mismatched_keys", ()))
    problems = describe_weight_problems(missing, unexpected, mismatched)
    if problems:
        raise AutotuneError(f"the checkpoint `{label}` does not fit {type(model).__name__} ({problems}), so those "
                            f"weights would be random: {fix}")
    return model


# --------------------------------------------------------------------------- base model and tokenizer


def _missing_model(name: str, exc: BaseException) -> AutotuneError:
    reason = " ".join(str(exc).split())[:160]
    local = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not local.exists():
        return AutotuneError(f"cannot load the model `{name}`: no such folder; pass a folder holding a Llasa "
                             "checkpoint (config.json, *.safetensors, tokenizer files), a hub id such as "
                             "`HKUSTAudio/Llasa-1B`, or `--model tiny` for the offline demo")
    if local.exists():
        return AutotuneError(f"cannot load the model from `{name}` ({reason}): the folder must hold config.json, "
                             "the weights (*.safetensors) and the tokenizer files of a Llasa checkpoint")
    return AutotuneError(f"cannot load the model `{name}` ({reason}): check the id, download it once "
                         "(`hf download HKUSTAudio/Llasa-1B`) or pass a local folder with `--model PATH`; "
                         "`--model tiny` runs the offline demo")


def load_tokenizer(name: str, *, trust_remote_code: bool = False, local_only: bool = False):
    if name == TINY:
        return build_tiny_tokenizer()
    from autotune import replica

    if replica.is_replica(name):
        return replica.build_llasa_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors here
        raise _missing_model(name, exc) from None


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


_BASE_MODEL_FIX = ("download it again (`hf download HKUSTAudio/Llasa-1B`) or pass the folder of an intact Llasa "
                   "checkpoint with `--model PATH`; `--model tiny` runs the offline demo")


def load_base_model(name: str, *, precision: str, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                    load_in_4bit: bool = False, device: str = "cpu"):
    """The frozen base in the plan's precision. fp16 mixed precision keeps fp32
    master weights for what trains, but the frozen base can sit in half."""
    dtype = torch_dtype(precision)
    if name == TINY:
        if load_in_4bit:
            raise AutotuneError("`model.load_in_4bit` needs a real checkpoint on a CUDA GPU, not `--model tiny`")
        return build_tiny_model(dtype=dtype if precision != "fp32" else None).to(device)
    from autotune import replica

    if replica.is_replica(name):
        if load_in_4bit:
            raise AutotuneError(f"`model.load_in_4bit` needs a real checkpoint, not the random `{name}`: "
                                "`--set model.load_in_4bit=false`")
        return replica.build_random_llasa(name, dtype=dtype, device=device, attn_implementation=attn_implementation)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                              "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = strict_from_pretrained(AutoModelForCausalLM, name, label=name, fix=_BASE_MODEL_FIX, **kwargs)
    except AutotuneError:
        raise
    except Exception as exc:
        if load_in_4bit and Path(name).expanduser().exists():
            reason = " ".join(str(exc).split())[:160]
            raise AutotuneError(f"cannot load `{name}` with 4-bit weights ({reason}): update bitsandbytes "
                                "(`pip install -U bitsandbytes`), or `--set model.load_in_4bit=false`") from None
        raise _missing_model(name, exc) from None
    return model if load_in_4bit else model.to(device)


def four_bit_config(compute_dtype):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise AutotuneError("4-bit weights need bitsandbytes: `pip install bitsandbytes`, "
                            "or turn them off with `--set model.load_in_4bit=false`")
    from transformers import BitsAndBytesConfig

    # bitsandbytes >= 0.46 also runs NF4 on the CPU (slowly): fine for tests and
    # small checks; a version without a CPU backend fails at load, reported below.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def apply_lora(model, *, r: int, lora_alpha: int, lora_dropout: float, target_modules: list[str], bias: str = "none",
               gradient_checkpointing: bool = False, quantized: bool = False):
    """Wrap with PEFT LoRA. Checkpointing with PEFT needs input grads and the
    non-reentrant variant, or the frozen embeddings cut the graph."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in target_modules if m not in present]
    if unknown:
        raise AutotuneError(f"`lora.target_modules` names {', '.join(unknown)}, which this model does not have; "
                            "Llama layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    if quantized:
        # Not PEFT's prepare_model_for_kbit_training: it upcasts every
        # non-quantized weight to fp32, and Llasa's is mostly the 193,800-row
        # embedding tied to the head (+1.1 GiB for Llasa-3B, plus a half-size
        # copy at each head matmul under autocast), with fp32 norms turning the
        # residual stream fp32. The frozen rest stays in the compute dtype, as
        # without 4-bit; LoRA's own weights are fp32 either way.
        for param in model.parameters():
            param.requires_grad = False
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
                        bias=bias, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    set_gradient_checkpointing(model, gradient_checkpointing)
    return model


def set_gradient_checkpointing(model, enabled: bool) -> None:
    if enabled:
        model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
        if getattr(base, name, False):
            base.gradient_checkpointing_disable()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = False
