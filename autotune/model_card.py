"""The adapter's README.md: a model card a person (or the Hugging Face Hub) can read.

PEFT writes an empty template there; this replaces it with what the run knows, in words:
the base model, the data (duration, speakers), the plan, the results and how to use the
adapter. Rates read as percentages and similarity as a cosine, as everywhere else
(`report.scores_in_words`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.describe import scores_in_words
from autotune.rundir import path_text, write_text


def batch_line(plan: dict[str, Any]) -> str:
    """`micro-batch 4 x accumulation 2 (x 2 processes) = 8 samples per optimizer step`, from a
    plan as run_summary.json records it (`Plan.to_dict`: the values under `settings`)."""
    settings = plan.get("settings") or {}
    micro = settings.get("training.per_device_train_batch_size")
    accumulation = settings.get("training.gradient_accumulation_steps")
    processes = plan.get("processes") or 1
    effective = plan.get("effective_batch_size")
    if micro is None or accumulation is None:
        return f"{effective} samples per optimizer step" if effective is not None else "not recorded"
    shown = f"micro-batch {micro} x accumulation {accumulation}"
    if processes > 1:
        shown += f" x {processes} processes"
    return f"{shown} = {effective if effective is not None else micro * accumulation * processes} samples per optimizer step"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes"


def _results_in_words(scores: dict[str, Any]) -> list[str]:
    """The scores of the saved adapter's evaluation, and the best, in words; or why there are none."""
    if not scores:
        return []
    lines = []
    adapter, best = scores.get("adapter"), scores.get("best")
    if adapter and scores_in_words(adapter) != "not scored":
        lines.append(f"- scores of this adapter (step {adapter.get('step')}): {scores_in_words(adapter)}")
    if best and (not adapter or best.get("step") != adapter.get("step")):
        by = {"error_rate": "error rate"}.get(best.get("by"), best.get("by"))
        lines.append(f"- best scores (step {best.get('step')}{f', by {by}' if by else ''}): {scores_in_words(best)}")
    if lines:
        lines.append(f"- measured by ASR `{scores.get('asr_model')}` (error rate: lower is better) and speaker "
                     f"model `{scores.get('speaker_model')}` (similarity to real clips: higher is better), "
                     f"on the texts spoken at {scores.get('evaluations')} evaluation(s)")
        return lines
    why = "; ".join(e for e in (scores.get("asr_error"), scores.get("speaker_error")) if e)
    return [f"- scores: not measured{f' ({why})' if why else ''}"]


def model_card(summary: dict[str, Any], config: dict[str, Any], data: dict[str, Any], output_dir: Path) -> str:
    base = (config.get("model") or {}).get("name_or_path", "?")
    lora = config.get("lora") or {}
    training = config.get("training") or {}
    plan = summary.get("plan") or {}
    speakers = summary.get("speakers") or {}
    audio_seconds = float(data.get("audio_seconds") or 0)
    out = path_text(output_dir)

    def fmt(value: Any, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    precision = plan.get("precision") or ("bf16" if training.get("bf16") else "fp16" if training.get("fp16")
                                          else "fp32")
    normalization = (config.get("data") or {}).get("text_normalization") or "none"
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
        f"{_duration(audio_seconds)} of audio ({data.get('layout', '?')} layout)",
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
        f"- batch: {batch_line(plan)}, {precision}, gradient checkpointing "
        f"{'on' if training.get('gradient_checkpointing') else 'off'}",
        "- transcripts: " + ("as written" if normalization == "none" else
                             f"normalised as `{normalization}` before training (`data.text_normalization`); "
                             "`synthesize.py --adapter` normalises what it speaks the same way"),
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
    lines += _results_in_words(summary.get("scores") or {})
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
