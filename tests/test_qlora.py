"""4-bit NF4 base weights with LoRA on top (QLoRA), for real through bitsandbytes.

bitsandbytes >= 0.46 runs NF4 on the CPU too, so the whole path (quantized
load, frozen base kept in the compute dtype, LoRA on Linear4bit, lean loss, dry run, adapter save)
runs here; skipped where bitsandbytes is missing or has no CPU backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bnb_cpu_4bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        packed, state = quantize_4bit(torch.randn(64, 64), quant_type="nf4")
        return dequantize_4bit(packed, state).shape == (64, 64)
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _bnb_cpu_4bit(), reason="needs bitsandbytes with 4-bit support on this device")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from autotune.llasa import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    build_tiny_model().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_lora_sits_on_4bit_linear_layers(tiny_folder: Path):
    import bitsandbytes as bnb

    from autotune.model import apply_lora, load_base_model

    base = load_base_model(str(tiny_folder), precision="bf16", load_in_4bit=True)
    model = apply_lora(base, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], quantized=True,
                       gradient_checkpointing=True)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The frozen, non-quantized weights stay in the compute dtype: no fp32 copy
    # of the vocab-sized embedding (tied to the head), no fp32 norms.
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    # and gradients still reach the adapter through checkpointed 4-bit layers
    ids = torch.randint(0, 600, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A's is 0 while B is 0
    assert lora_b_grads and all(g is not None and g.abs().sum() > 0 for g in lora_b_grads)


@pytest.mark.slow
def test_training_with_4bit_weights_writes_an_adapter_for_the_full_precision_base(tmp_path: Path, tiny_folder: Path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from train import main

    out = tmp_path / "out"
    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", str(tiny_folder), "--auto",
                 "--output-dir", str(out), "--set", "model.load_in_4bit=true", "--set", "training.max_steps=2",
                 "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
                 "--set", "training.learning_rate=1e-2", "--set", "samples.num_texts=0"]) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["plan"]["settings"]["model.load_in_4bit"] is True
    assert summary["dry_run"]["attempts"][0]["plan"]["settings"]["model.load_in_4bit"] is True
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder), str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())
