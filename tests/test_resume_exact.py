"""A run stopped while it speaks its samples resumes to exactly the uninterrupted run (issue #22):
speaking and scoring run under their own random state, so loading the codec or a scorer, or
sampling speech, never moves the generators training draws from (LoRA dropout, data order)."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.tiny_runs import DATA, run_train as train

ARGS = ["--data", str(DATA), "--model", "tiny", "--codec", "tiny", "--set", "samples.num_texts=1",
        "--set", "samples.max_new_tokens=12", "--set", "training.logging_steps=1", "--set", "training.max_steps=6",
        "--set", "training.eval_steps=2", "--set", "training.save_steps=2", "--set", "training.report_to=none",
        "--set", "lora.lora_dropout=0.3", "--set", "scores.asr_model=none", "--set", "scores.speaker_model=none",
        "--set", "training.use_early_stopping=false"]


def eval_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}


def test_the_sample_callback_leaves_every_generator_as_it_was():
    from autotune.training.samples import own_random_state

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with own_random_state():
        torch.manual_seed(99)          # what building a tiny codec or scorer does
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.slow
def test_a_stop_while_speaking_samples_resumes_exactly(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert train(*ARGS, "--output-dir", str(whole)) == 0

    from autotune.training import samples

    real = samples.generate_codes
    sent = []

    def speak_then_stop(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)   # a preemption while the first sample is spoken
        return real(*args, **kwargs)

    monkeypatch.setattr(samples, "generate_codes", speak_then_stop)
    stopped = tmp_path / "stopped"
    assert train(*ARGS, "--output-dir", str(stopped)) == 143
    assert sent and (stopped / "checkpoint-2").is_dir() and not (stopped / "checkpoint-4").exists()
    monkeypatch.undo()
    assert train(*ARGS, "--output-dir", str(stopped), "--resume") == 0

    assert eval_losses(stopped) == eval_losses(whole)
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(stopped / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
