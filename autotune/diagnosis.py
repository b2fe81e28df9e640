"""The tuning guide's troubleshooting section, read against a run's own curves:
overfitting, eval loss not improving, an unstable or NaN loss, each with ready-to-paste
`--set` remedies. Pure: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from autotune.config import Config


@dataclass
class Finding:
    kind: str
    message: str
    remedies: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "set": " ".join(self.remedies)}


def diagnose(log_history: list[dict[str, Any]], config: Config, min_evals: int = 3) -> list[Finding]:
    """The guide's troubleshooting section, applied to the logged curves."""
    t, lora = config.training, config.lora
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and math.isfinite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    findings: list[Finding] = []
    if len(evals) >= min_evals:
        tail = evals[-min_evals:]
        best = min(e for _, e in evals)
        eval_rising = all(b[1] > a[1] for a, b in zip(tail, tail[1:]))
        train_tail = [loss for step, loss in train if step >= tail[0][0]]
        train_falling = len(train_tail) >= 2 and train_tail[-1] < train_tail[0]
        if eval_rising and train_falling:
            findings.append(Finding(
                "overfitting", f"train loss falls while eval loss rose over the last {min_evals} evaluations "
                f"({tail[0][1]:.4f} -> {tail[-1][1]:.4f})",
                [f"--set lora.lora_dropout={max(0.1, lora.lora_dropout)}",
                 f"--set training.weight_decay={max(0.05, t.weight_decay)}",
                 "--set training.use_early_stopping=true",
                 f"--set training.num_train_epochs={max(1, int(t.num_train_epochs // 2))}",
                 f"--set training.learning_rate={t.learning_rate / 2:g}"]))
        elif evals[0][1] - best < max(t.early_stopping_threshold, 1e-3):
            findings.append(Finding(
                "eval_not_improving", f"eval loss did not improve ({evals[0][1]:.4f} at first, best {best:.4f})",
                [f"--set lora.r={min(lora.r * 2, 128)}", f"--set lora.lora_alpha={min(lora.lora_alpha * 2, 256)}",
                 "--set lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                 f"--set training.learning_rate={min(t.learning_rate * 2, 1e-4) if t.learning_rate < 1e-4 else 5e-5:g}"]))
    if len(train) >= 6:
        losses = [loss for _, loss in train[1:]]  # the first logged step is before any update
        diffs = [b - a for a, b in zip(losses, losses[1:])]
        flips = sum(1 for a, b in zip(diffs, diffs[1:]) if a * b < 0)
        swing = max(losses) - min(losses)
        level = sum(losses) / len(losses)
        jumps = any(d > 0.5 * max(level, 1e-8) for d in diffs)
        if (flips >= 0.7 * (len(diffs) - 1) and swing > 0.2 * level) or jumps:
            findings.append(Finding(
                "unstable", f"the training loss oscillates ({flips} direction changes in {len(losses)} logs, "
                f"range {min(losses):.3f}..{max(losses):.3f})",
                [f"--set training.learning_rate={t.learning_rate / 5:g}", "--set training.max_grad_norm=0.5",
                 f"--set training.warmup_ratio={max(0.1, t.warmup_ratio)}",
                 f"--set training.gradient_accumulation_steps={t.gradient_accumulation_steps * 2}"]))
    if any(not math.isfinite(h.get("loss", 0.0)) for h in log_history):
        findings.append(Finding("nan", "the loss became NaN or infinite",
                                [f"--set training.learning_rate={t.learning_rate / 10:g}", "--set training.max_grad_norm=0.5",
                                 "--set training.warmup_ratio=0.1"]))
    return findings
