"""Run folders for the speaking tests, made in seconds: a real PEFT LoRA adapter on the tiny
model (random, non-zero weights, so it changes what the model says) and the records a training
run leaves beside it. What `train.py` itself writes is covered by test_synthesize.py's trained run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(folder: Path, *, r: int = 4, targets: tuple[str, ...] = ALL_PROJECTIONS, seed: int = 0) -> Path:
    """A LoRA adapter folder for the tiny model: 2 layers x len(targets) modules x (A, B) tensors."""
    import torch
    from peft import LoraConfig, get_peft_model

    from autotune.llasa import build_tiny_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(build_tiny_model(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                              init_lora_weights=False))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    return folder


def make_run(folder: Path, *, normalization: str | None = "none", speakers: dict[str, float] | None = None,
             state: str = "finished", steps: int = 4, checkpoints: tuple[int, ...] = (), codec: Any = "tiny",
             scores: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A run folder as training leaves it: marker, configs, summary, the adapter, checkpoints."""
    import yaml

    make_adapter(folder, seed=seed)
    for i, step in enumerate(checkpoints):
        make_adapter(folder / f"checkpoint-{step}", seed=seed + 1 + i)
    (folder / ".llasa-autotune").write_text("{}", encoding="utf-8")
    data: dict[str, Any] = {"codec": codec}
    if normalization is not None:
        data["text_normalization"] = normalization
    config = {"model": {"name_or_path": "tiny"}, "data": data,
              "scores": {"asr_model": "tiny", "speaker_model": "tiny"}}
    (folder / "run_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if state in ("finished", "interrupted"):
        summary = {"steps": steps, "max_steps": steps if state == "finished" else steps * 2,
                   "best_eval_loss": 9.5, "interrupted": "SIGINT" if state == "interrupted" else None,
                   "adapter_saved": state == "finished", "speakers": speakers or {"demo": 60.0},
                   "speaker_conditioning": bool(speakers and len(speakers) > 1),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "scores": scores}
        (folder / "run_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def write_tone(path: Path, seconds: float = 1.0, frequency: float = 220.0, subtype: str = "PCM_16",
               poison: float | None = None) -> Path:
    import numpy as np
    import soundfile as sf

    t = np.arange(int(16000 * seconds), dtype=np.float32) / 16000
    wave = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    if poison is not None:
        wave[len(wave) // 2] = poison
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, 16000, subtype=subtype)
    return path
