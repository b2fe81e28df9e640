"""The adapter's model card in words (issue 28): the batch line from the plan as the run records
it, the scores as a person reads them, and the rates written one way, as percentages."""

from __future__ import annotations

from pathlib import Path

from autotune.model_card import batch_line, model_card

PLAN = {"settings": {"training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 2,
                     "training.bf16": True, "training.fp16": False, "training.gradient_checkpointing": False,
                     "lora.r": 16},
        "processes": 1, "effective_batch_size": 8, "precision": "bf16", "label": "batch 4x2, ..."}
CONFIG = {"model": {"name_or_path": "HKUSTAudio/Llasa-1B"}, "data": {"codec": "HKUSTAudio/xcodec2-hf",
                                                                    "text_normalization": "none"},
          "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
          "training": {"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "bf16": True,
                       "gradient_checkpointing": False}}
DATA = {"train_samples": 90, "val_samples": 10, "audio_seconds": 5400.0, "layout": "ljspeech"}


def summary(**scores) -> dict:
    return {"steps": 400, "max_steps": 400, "plan": PLAN, "final_train_loss": 3.2, "final_eval_loss": 3.4,
            "best_eval_loss": 3.3, "gpus": [{"name": "NVIDIA GeForce RTX 4090"}], "profile": {"name": "rtx4090"},
            "speakers": {"alice": 3000.0, "bob": 2400.0}, "speaker_conditioning": True,
            "scores": scores or None}


def test_the_batch_line_multiplies_what_the_plan_recorded() -> None:
    assert batch_line(PLAN) == "micro-batch 4 x accumulation 2 = 8 samples per optimizer step"
    two = {**PLAN, "processes": 2, "effective_batch_size": 16}
    assert batch_line(two) == "micro-batch 4 x accumulation 2 x 2 processes = 16 samples per optimizer step"
    assert batch_line({"effective_batch_size": 8}) == "8 samples per optimizer step"


def test_the_card_says_the_plan_and_the_scores_in_words(tmp_path: Path) -> None:
    card = model_card(summary(asr_model="openai/whisper-large-v3-turbo", speaker_model="microsoft/wavlm-base-plus-sv",
                              evaluations=4,
                              adapter={"step": 400, "mean_cer": 0.125, "mean_wer": None, "mean_error_rate": 0.125,
                                       "mean_similarity": 0.91},
                              best={"step": 300, "by": "cer", "mean_cer": 1.0, "mean_wer": None,
                                    "mean_error_rate": 1.0, "mean_similarity": 0.5}),
                      CONFIG, DATA, tmp_path)
    assert ("- batch: micro-batch 4 x accumulation 2 = 8 samples per optimizer step, bf16, gradient checkpointing off"
            in card)
    assert "- scores of this adapter (step 400): CER 12.5 %, speaker similarity 0.910" in card
    assert "- best scores (step 300, by cer): CER 100.0 %, speaker similarity 0.500" in card
    assert "1.5 hours of audio (ljspeech layout)" in card and "- transcripts: as written" in card
    assert "None" not in card and "{" not in card and "mean_cer" not in card


def test_a_run_without_scores_says_why(tmp_path: Path) -> None:
    card = model_card(summary(asr_model="openai/whisper-large-v3-turbo", speaker_model="none", evaluations=1,
                              adapter={"step": 2, "mean_cer": None, "mean_wer": None, "mean_error_rate": None,
                                       "mean_similarity": None},
                              asr_error="the ASR model `openai/whisper-large-v3-turbo` is not downloaded"),
                      {**CONFIG, "data": {"text_normalization": "llasa-trainer"}}, DATA, tmp_path)
    assert "- scores: not measured (the ASR model `openai/whisper-large-v3-turbo` is not downloaded)" in card
    assert "normalised as `llasa-trainer`" in card
    assert "None" not in card and "{" not in card
