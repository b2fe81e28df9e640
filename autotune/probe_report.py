"""The probe's report: gather (GPUs -> profile -> config) and show it. No torch here."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from autotune.config import load_yaml_file
from autotune.errors import AutotuneError
from autotune.hardware import GpuInfo, ProbeResult, parse_cc, probe, what_if_gpu
from autotune.profiles import Recommendation, recommend


MAX_WHAT_IF_COUNT = 1024


@dataclass
class Report:
    probe: ProbeResult
    recommendation: Recommendation
    what_if: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = self.recommendation.to_dict()
        out["what_if"] = self.what_if
        out["no_gpu_reason"] = self.probe.reason
        out["warnings"] = list(self.probe.warnings) + out["warnings"]
        return out


def gather(args: argparse.Namespace) -> Report:
    """Probe (or imagine) the GPUs and recommend a config under the user's keys."""
    what_if = any(getattr(args, name, None) is not None for name in ("gpu", "vram", "cc"))
    if what_if:
        if args.vram is None:
            problems = ["what-if mode needs `--vram GIB` (and optionally `--gpu NAME --cc X.Y`), "
                        "e.g. `--gpu 'RTX 4090' --vram 24`"]
            if args.cc is not None:
                try:
                    parse_cc(args.cc)
                except AutotuneError as exc:   # say both at once, not one per attempt
                    problems.append(str(exc))
            raise AutotuneError("; ".join(problems))
        count = getattr(args, "count", 1)
        if count is None or count < 1:
            raise AutotuneError(f"`--count` must be at least 1, got `{count}`")
        if count > MAX_WHAT_IF_COUNT:  # `[gpu] * 10**9` alone would take 8 GB
            raise AutotuneError(f"`--count` must be at most {MAX_WHAT_IF_COUNT}, got `{count}`")
        gpu = what_if_gpu(args.gpu or "what-if GPU", args.vram, args.cc)
        result = ProbeResult(gpus=[gpu] * count, reason=None, warnings=[])
    else:
        if getattr(args, "count", 1) != 1:
            raise AutotuneError("`--count` only applies in what-if mode: add `--vram GIB` (and `--gpu NAME`)")
        result = probe()
    user_yaml = load_yaml_file(args.config) if getattr(args, "config", None) else None
    rec = recommend(result.gpus, user_yaml=user_yaml, sets=getattr(args, "sets", None))
    return Report(result, rec, what_if)


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024 ** 3:.1f}"


def gpu_table(gpus: list[GpuInfo], title: str = "GPUs"):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("#", "name", "total GiB", "free GiB", "CC", "driver / CUDA"):
        table.add_column(column)
    for i, gpu in enumerate(gpus):
        cc = f"{gpu.cc[0]}.{gpu.cc[1]}" if gpu.cc else "?"
        name = (gpu.name or "?") + (" (MIG slice)" if gpu.is_mig_slice else "")
        table.add_row(str(gpu.index if gpu.index is not None else i), name, _gib(gpu.total_bytes),
                      _gib(gpu.free_bytes), cc, f"{gpu.driver_version or '?'} / {gpu.cuda_driver_version or '?'}")
    return table


def settings_table(rec: Recommendation, title: str = "Recommended settings"):
    from rich.table import Table

    cfg = rec.config
    t, lora = cfg.training, cfg.lora
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    processes = max(1, len(rec.gpus))
    effective = t.per_device_train_batch_size * t.gradient_accumulation_steps * processes
    pinned = rec.resolved.pinned

    def mark(value: str, *keys: str) -> str:
        return value + (" (pinned)" if any(k in pinned for k in keys) else "")

    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("setting", style="bold")
    table.add_column("value")
    table.add_row("profile", f"{rec.profile.name} ({rec.profile.title})")
    table.add_row("precision", mark(precision, "training.bf16", "training.fp16"))
    table.add_row("optimizer", mark(t.optim, "training.optim"))
    table.add_row("batch", mark(f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation"
                                + (f" x {processes} GPUs" if processes > 1 else "") + f" = {effective} effective",
                                "training.per_device_train_batch_size", "training.gradient_accumulation_steps"))
    table.add_row("LoRA", mark(f"r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout}", "lora.r", "lora.lora_alpha"))
    table.add_row("LoRA targets", mark(", ".join(lora.target_modules), "lora.target_modules"))
    table.add_row("gradient checkpointing", mark("on" if t.gradient_checkpointing else "off", "training.gradient_checkpointing"))
    table.add_row("lean loss", mark("on" if t.lean_loss else "off", "training.lean_loss"))
    table.add_row("data workers", mark(str(t.dataloader_num_workers), "training.dataloader_num_workers"))
    return table


def render(report: Report, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    rec = report.recommendation
    if report.recommendation.gpus:
        console.print(gpu_table(rec.gpus, "GPUs (what-if)" if report.what_if else "GPUs"))
    else:
        console.print(f"[bold]No GPU[/bold]: {report.probe.reason or 'none visible'}")
    console.print(settings_table(rec))
    console.print("[bold]Why[/bold]")
    for reason in rec.reasons:
        console.print(f"  - {reason}")
    for warning in list(report.probe.warnings) + rec.warnings:
        console.print(f"  [yellow]! {warning}[/yellow]")
