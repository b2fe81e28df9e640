"""run_summary.json: what a run was (profile, GPUs, plan, dry run), what it measured (losses,
the best metric and checkpoint, tokens/s, peak memory, scores) and what happened (recoveries,
rollbacks, a stop, changes accepted on resume), from the finished trainer and the run's records."""

from __future__ import annotations

import math
import time
from typing import Any

from autotune.rundir import checkpoint_step


def run_summary(rec, dry, data, result, findings, *, keeper, plan_from: str | None,
                resume_changes: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """run_summary.json: what the run was, what it measured and what happened."""
    import torch

    trainer = result.outcome.trainer
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    interrupted = trainer.interrupt.requested if result.outcome.interrupted else None
    metric = (trainer.args.metric_for_best_model or "eval_loss").removeprefix("eval_")
    by_loss = metric in ("loss", "eval_loss")
    return {
        "profile": {"name": rec.profile.name, "title": rec.profile.title},
        "gpus": [g.to_dict() for g in rec.gpus],
        "plan": result.plan.to_dict(),
        "dry_run": dry.to_dict() if dry else None,
        "plan_from": str(plan_from) if plan_from else None,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "best_eval_loss": trainer.state.best_metric if by_loss else (min(eval_losses) if eval_losses else None),
        "metric_for_best_model": "eval_loss" if by_loss else metric,
        "best_metric": _finite_or_none(trainer.state.best_metric),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_checkpoint_refused": trainer.best_refused,
        "stopped_early_at": trainer.early.stopped_early_at,
        "tokens_per_second": trainer.throughput.overall(),
        **dict(zip(("steady_tokens_per_second", "steady_timed_steps"), trainer.throughput.steady())),
        "throughput_marks": trainer.throughput.marks_since_start(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "wall_seconds": round(result.wall_seconds, 2),
        "oom_recoveries": result.recoveries,
        "interrupted": interrupted,
        "nan_rollbacks": result.nan_rollbacks,
        "nonfinite_steps_skipped": result.nonfinite_steps,
        "checkpoints_refused": trainer.refused_saves,
        "diagnosis": [f.to_dict() for f in findings],
        "resume_changes": resume_changes,
        "speakers": data.speakers(),
        "speaker_conditioning": data.speaker_conditioning,
        "scores": keeper.summary(adapter_step(trainer)) if keeper is not None else None,
        "notes": notes,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def adapter_step(trainer) -> int:
    """The step of the adapter the run saves: the best checkpoint's when it is loaded at the end."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        return checkpoint_step(best) or int(trainer.state.global_step)
    return int(trainer.state.global_step)


def _finite_or_none(value: Any) -> Any:
    # An evaluation that could not be scored counts as +-inf; JSON holds no infinity.
    return value if not isinstance(value, float) or math.isfinite(value) else None
