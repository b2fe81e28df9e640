"""`--merge` writes a merged model that loads with plain transformers."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_merge_writes_a_loadable_model_equal_to_base_plus_adapter(tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from autotune.llasa import build_tiny_model
    from train import main

    out = tmp_path / "out"
    assert main(["--data", str(ROOT / "examples" / "tiny"), "--model", "tiny", "--output-dir", str(out), "--merge",
                 "--set", "training.max_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=2",
                 "--set", "samples.num_texts=0", "--set", "training.learning_rate=1e-2"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapted = PeftModel.from_pretrained(build_tiny_model(), str(out)).eval()
    ids = torch.tensor([[256, 258, 84, 82, 520, 600, 700]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
    assert (out / "merged" / "tokenizer_config.json").is_file()
