"""How many sweep trials share one GPU, and the memory cap each one gets.

A child that shares its GPU with k-1 others is capped (`--vram-limit`) at 1/k of the card
less `CONTEXT_BYTES` each, so k caps and k CUDA contexts add up to the card, and it plans as
a card of that size. With `--trials-per-gpu auto` the count comes from the peak a dry run
measured (`trials_that_fit`), under `autotune.memory_fraction` of the cap, the dry run's own
rule; a resumed trial keeps the cap it ran with (`sharing_for_cap`)."""

from __future__ import annotations

import json
from pathlib import Path

from autotune.config_yaml import load_yaml_file
from autotune.errors import AutotuneError
from autotune.rundir import RUN_CONFIG


# What a process holds on its GPU outside PyTorch's allocator, which a memory cap does not
# limit: the CUDA context, cuBLAS's workspace, NCCL-free. A decision (0.5-0.6 GiB is usual on
# H100-class cards with CUDA 12), to be checked against `nvidia-smi` on a lent GPU.
CONTEXT_BYTES = 768 * 2**20


MAX_PER_GPU = 8


def card_bytes(gpu, limit_gib: float | None) -> int:
    """The memory a GPU offers the sweep: all of it, or the user's `--vram-limit`."""
    total = gpu.total_bytes or 0
    return min(total, int(limit_gib * 2**30)) if limit_gib else total


def share_bytes(card: int, k: int) -> int:
    """The cap of each of k children on a card: 1/k of it, less one context each."""
    return card if k <= 1 else (card - k * CONTEXT_BYTES) // k


def share_gib(card: int, k: int) -> float:
    """`share_bytes` as a `--vram-limit` value, rounded down to 0.01 GiB."""
    return int(share_bytes(card, k) * 100 / 2**30) / 100


def trials_that_fit(peak: int | None, card: int, fraction: float, most: int = MAX_PER_GPU) -> int:
    """How many children with this measured peak share a card: the most k (up to `most`)
    for which the peak stays under `fraction` of each one's cap, the dry run's own rule.
    1 without a measured peak (a dry run on a CPU)."""
    if not peak or not card:
        return 1
    k = 1
    while k < most and peak <= fraction * share_bytes(card, k + 1):
        k += 1
    return k


def sharing_for_cap(card: int, cap_gib: float | None) -> int:
    """How many children a recorded cap was one of (a resumed trial keeps its cap): the most
    k whose share still holds the cap; 1 without a cap."""
    if not cap_gib or not card:
        return 1
    k = 1
    while k < MAX_PER_GPU and share_gib(card, k + 1) >= cap_gib:
        k += 1
    return k


def recorded_cap(folder: Path) -> float | None:
    """The `autotune.vram_limit_gib` a stopped trial ran with (its run_config.yaml)."""
    try:
        value = (load_yaml_file(folder / RUN_CONFIG).get("autotune") or {}).get("vram_limit_gib")
    except (AutotuneError, OSError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def chosen_peak(record: Path) -> int | None:
    """The peak the dry run measured for the plan it chose (its autotune.json); None on a CPU."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        chosen = next((a for a in data.get("attempts", []) if a.get("ok") and a.get("plan") == data.get("plan")), None)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    peak = chosen.get("peak_bytes") if isinstance(chosen, dict) else None
    return peak if isinstance(peak, int) and peak > 0 else None
