"""The guide's troubleshooting section applied to logged curves."""

from __future__ import annotations

from autotune.config import resolve_config
from autotune.diagnosis import diagnose


def config():
    return resolve_config({}, sets=["training.learning_rate=1e-4", "lora.lora_dropout=0.05"]).config


def history(train, evals):
    out = [{"step": i + 1, "loss": v} for i, v in enumerate(train)]
    out += [{"step": step, "eval_loss": v} for step, v in evals]
    return out


def test_overfitting_is_found_with_the_guide_remedies():
    h = history([3.0, 2.5, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6, 0.5, 0.4],
                [(2, 2.0), (4, 1.9), (6, 2.0), (8, 2.2), (10, 2.5)])
    [finding] = [f for f in diagnose(h, config()) if f.kind == "overfitting"]
    text = finding.to_dict()["set"]
    assert "--set lora.lora_dropout=0.1" in text
    assert "--set training.weight_decay=0.05" in text
    assert "--set training.use_early_stopping=true" in text


def test_eval_loss_not_improving():
    h = history([2.0, 2.0, 2.0, 2.0, 2.0, 2.0], [(2, 2.0), (4, 2.0), (6, 2.0)])
    kinds = [f.kind for f in diagnose(h, config())]
    assert kinds == ["eval_not_improving"]
    remedy = diagnose(h, config())[0].to_dict()["set"]
    assert "--set lora.r=32" in remedy and "target_modules" in remedy


def test_unstable_loss():
    h = history([3.0, 1.0, 3.2, 0.9, 3.1, 1.1, 3.3, 1.0, 3.0], [])
    [finding] = diagnose(h, config())
    assert finding.kind == "unstable"
    assert "--set training.max_grad_norm=0.5" in finding.to_dict()["set"]
    assert "--set training.learning_rate=2e-05" in finding.to_dict()["set"]


def test_a_healthy_run_has_no_findings():
    h = history([3.0, 2.6, 2.3, 2.1, 1.9, 1.8, 1.7, 1.65], [(2, 2.5), (4, 2.2), (6, 2.0), (8, 1.9)])
    assert diagnose(h, config()) == []
