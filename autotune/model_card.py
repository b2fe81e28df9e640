"""The adapter's README.md: a model card a person (or the Hugging Face Hub) can read.

PEFT writes an empty template there; this replaces it with what the run knows: the base
model, the data (hours, speakers), the plan, the results and how to use the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autotune.rundir import path_text, write_text


def model_card(summary: dict[str, Any], config: dict[str, Any], data: dict[str, Any], output_dir: Path) -> str:
    base = (config.get("model") or {}).get("name_or_path", "?")
    lora = config.get("lora") or {}
    training = config.get("training") or {}
    plan = summary.get("plan") or {}
    speakers = summary.get("speakers") or {}
    hours = (data.get("audio_seconds") or 0) / 3600
    out = path_text(output_dir)

    def fmt(value: Any, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    precision = "bf16" if training.get("bf16") else "fp16" if training.get("fp16") else "fp32"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "pipeline_tag: text-to-speech",
        "tags: [llasa, lora, text-to-speech, llasa-autotune]",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
        f"A LoRA fine-tune of the Llasa text-to-speech model `{base}`, trained with llasa-autotune.",
        "Speech is decoded with the XCodec2 codec "
        f"`{(config.get('data') or {}).get('codec', 'HKUSTAudio/xcodec2-hf')}` (16 kHz, 50 tokens per second).",
        "",
        "## Data",
        "",
        f"- {data.get('train_samples', '?')} training and {data.get('val_samples', '?')} validation samples, "
        f"{hours:.2f} hours of audio ({data.get('layout', '?')} layout)",
    ]
    if speakers:
        shown = ", ".join(f"{name} ({seconds / 60:.1f} min)" for name, seconds in list(speakers.items())[:20])
        more = f" and {len(speakers) - 20} more" if len(speakers) > 20 else ""
        conditioned = ("each prompt names its speaker (`Speaker NAME`)" if summary.get("speaker_conditioning")
                       else "one voice: prompts name no speaker")
        lines.append(f"- speakers: {shown}{more}; {conditioned}")
    lines += [
        "",
        "## Training",
        "",
        f"- steps: {summary.get('steps')} of {summary.get('max_steps')}, learning rate {training.get('learning_rate')}, "
        f"{training.get('lr_scheduler_type')} schedule",
        f"- batch: {plan.get('per_device_train_batch_size')} x {plan.get('gradient_accumulation_steps')}"
        + (f" x {plan.get('processes')} processes" if (plan.get("processes") or 1) > 1 else "")
        + f" = {plan.get('effective_batch_size')} samples per step, {precision}",
        f"- LoRA: r {lora.get('r')}, alpha {lora.get('lora_alpha')}, dropout {lora.get('lora_dropout')}, "
        f"on {', '.join(lora.get('target_modules') or [])}",
        f"- hardware: {', '.join(g.get('name', '?') for g in summary.get('gpus') or []) or 'CPU'} "
        f"(profile {(summary.get('profile') or {}).get('name', '?')})",
        "",
        "## Results",
        "",
        f"- final train loss {fmt(summary.get('final_train_loss'))}, final eval loss "
        f"{fmt(summary.get('final_eval_loss'))}, best eval loss {fmt(summary.get('best_eval_loss'))}",
    ]
    scores = summary.get("scores") or {}
    if scores.get("best") or scores.get("latest"):
        lines.append(f"- scores: {json.dumps(scores.get('best') or scores.get('latest'), ensure_ascii=False)}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{out}")',
        "```",
        "",
        "Speak a text with it:",
        "",
        "```bash",
        f'python synthesize.py --adapter {out} --text "こんにちは、今日はいい天気ですね。" -o hello.wav'
        + (f" --speaker {next(iter(speakers))}" if speakers and summary.get("speaker_conditioning") else ""),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: Path, summary: dict[str, Any], config: dict[str, Any], data: dict[str, Any]) -> None:
    write_text(output_dir / "README.md", model_card(summary, config, data, output_dir))
