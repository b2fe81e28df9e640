"""Base model and tokenizer, precision, 4-bit weights and LoRA.

Builders take plain values, not the whole config, so the dry run can rebuild
any rung of its ladder. Checkpoints load strictly (`loading.strict_from_pretrained`):
a weight the model expects but the files lack is an error, not random noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError
from autotune.loading import strict_from_pretrained
from autotune.llasa import TINY, build_tiny_model, build_tiny_tokenizer


# --------------------------------------------------------------------------- strict loading


# --------------------------------------------------------------------------- base model and tokenizer


def _missing_model(name: str, exc: BaseException) -> AutotuneError:
    from autotune.loading import clip_words

    reason = clip_words(str(exc), 160)
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

    from autotune.loading import settle_hub

    if not Path(name).expanduser().exists():
        settle_hub()   # an unreachable hub is decided in seconds, once, not after a minute of retries
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
