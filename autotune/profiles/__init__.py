"""Built-in hardware profiles: load `profiles/*.yaml`, match the GPUs, explain why.

`match_profile` and `adapt_to_hardware` are pure functions of their inputs, so
tests drive them with fake GPUs. No torch here: `probe.py` imports this module.
"""

from __future__ import annotations

import dataclasses

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autotune.config import EIGHT_BIT_OPTIMIZERS, Resolved, precision_of, resolve_config, validate
from autotune.errors import AutotuneError
from autotune.hardware import GpuInfo

PROFILES_DIR = Path(__file__).resolve().parent   # the built-in *.yaml ship inside the package
GIB = 1024 ** 3


class MatchRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=list, description="Regular expressions tried against the NVML name.")
    min_vram_gib: float | None = Field(None, ge=0, description="Smallest memory of this tier when no name matches; omit to match by name only.")
    cpu: bool = Field(False, description="This profile is for machines without a GPU.")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    title: str
    match: MatchRule
    settings: dict[str, Any] = Field(default_factory=dict, description="Config values, same sections as a user config.")
    source: str = ""


def load_profiles(directory: Path = PROFILES_DIR) -> list[Profile]:
    """Every `*.yaml` in `directory`, validated (schema and settings)."""
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise AutotuneError(f"no profiles found in `{directory}`: reinstall the package or restore `autotune/profiles/`")
    profiles = []
    for path in paths:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError(f"must hold a mapping (`name:`, `title:`, `match:`, `settings:`), got a {type(raw).__name__}")
            profile = Profile.model_validate({**raw, "source": str(path)})
            for pattern in profile.match.names:
                re.compile(pattern)
        except (OSError, ValueError, yaml.YAMLError, ValidationError, re.error) as exc:
            raise AutotuneError(f"profile `{path}` is invalid: {' '.join(str(exc).split())[:300]}") from None
        try:
            validate(profile.settings)
        except AutotuneError as exc:
            raise AutotuneError(f"profile `{path}` has invalid settings: {exc.one_line()}") from None
        profiles.append(profile)
    return profiles


@dataclass
class Match:
    profile: Profile
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def match_profile(gpus: list[GpuInfo], profiles: list[Profile]) -> Match:
    """Name rules first, then the VRAM tier. Several GPUs: the smallest decides."""
    if not gpus:
        cpu = next((p for p in profiles if p.match.cpu), None)
        if cpu is None:
            raise AutotuneError("no CPU profile is installed: restore `autotune/profiles/cpu.yaml`")
        return Match(cpu, [f"no GPU visible: profile `{cpu.name}` (fp32, small LoRA)"])

    warnings: list[str] = []
    names = sorted({g.name or "unknown" for g in gpus})
    if len(names) > 1:
        warnings.append(f"mixed GPU models ({', '.join(names)}): planning for the smallest, the others idle part of their memory")
    decider = min(gpus, key=lambda g: g.total_bytes if g.total_bytes is not None else 0)
    who = decider.name or "unknown GPU"
    many = f" (smallest of {len(gpus)} GPUs)" if len(gpus) > 1 else ""

    gpu_profiles = [p for p in profiles if not p.match.cpu]
    for profile in gpu_profiles:
        if any(re.search(pattern, who, re.IGNORECASE) for pattern in profile.match.names):
            if decider.is_mig_slice or "laptop" in who.lower():
                # A slice has a fraction of the card's memory, and a laptop part shares
                # the desktop card's name with less memory: decide by memory.
                break
            return Match(profile, [f"`{who}`{many} matches profile `{profile.name}` ({profile.title}) by name"], warnings)

    tiers = sorted((p for p in gpu_profiles if p.match.min_vram_gib is not None),
                   key=lambda p: p.match.min_vram_gib, reverse=True)
    if not tiers:
        raise AutotuneError("no profile has `match.min_vram_gib`: restore the built-in `autotune/profiles/`")
    if decider.total_bytes is None:
        smallest = tiers[-1]
        warnings.append(f"`{who}` did not report its memory: using the smallest tier `{smallest.name}`")
        return Match(smallest, [f"`{who}`{many}: memory unknown, smallest tier `{smallest.name}`"], warnings)
    gib = decider.total_bytes / GIB
    for profile in tiers:
        if gib >= profile.match.min_vram_gib:
            kind = "MIG slice " if decider.is_mig_slice else ""
            reason = (f"{kind}`{who}`{many} is not named by any profile: nearest tier by memory "
                      f"({gib:.1f} GiB) is `{profile.name}` ({profile.title})")
            if profile is tiers[-1] and gib < 7.5:
                warnings.append(f"`{who}` has only {gib:.1f} GiB, below the smallest tier (8 GB): "
                                "the dry run will shrink the plan, and may need `--set model.load_in_4bit=true`")
            return Match(profile, [reason], warnings)
    raise AssertionError("unreachable: the smallest tier has min_vram_gib 0")


def precision_for(cc: tuple[int, int] | None) -> str:
    """bf16 only where the hardware has it (CC >= 8.0); fp16 on 7.x; fp32 otherwise.

    `torch.cuda.is_bf16_supported()` is not used: it reports emulation as support.
    """
    if cc is None:
        return "fp32"
    if cc >= (8, 0):
        return "bf16"
    if cc >= (7, 0):
        return "fp16"
    return "fp32"


def runnable_precisions(cc: tuple[int, int] | None) -> list[str]:
    """What a machine of this compute capability can train in: its own precision and the wider ones."""
    return {"bf16": ["bf16", "fp16", "fp32"], "fp16": ["fp16", "fp32"], "fp32": ["fp32"]}[precision_for(cc)]


def lowest_cc(gpus: list[GpuInfo]) -> tuple[int, int] | None:
    """The compute capability every GPU of the run has (None: no GPU, or one unknown)."""
    ccs = [g.cc for g in gpus]
    return None if not gpus or any(c is None for c in ccs) else min(ccs)


def bitsandbytes_installed() -> bool:
    # find_spec, not import: importing bitsandbytes imports torch (seconds).
    return importlib.util.find_spec("bitsandbytes") is not None


def adapt_to_hardware(settings: dict[str, Any], gpus: list[GpuInfo], *, bnb_available: bool | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """The hardware wins over the table: precision from CC, optimizer from what runs."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in settings.items()}
    training = out.setdefault("training", {})
    reasons: list[str] = []
    cc = lowest_cc(gpus)
    want = precision_of(bool(training.get("bf16")), bool(training.get("fp16")))
    have = precision_for(cc)
    if want != have:
        why = ("no GPU" if not gpus else "compute capability unknown" if cc is None
               else f"compute capability {cc[0]}.{cc[1]}")
        reasons.append(f"precision {have} instead of the table's {want}: {why} "
                       f"({'bf16 needs >= 8.0' if want == 'bf16' else 'bf16 available on >= 8.0' if have == 'bf16' else 'mixed precision needs a GPU >= 7.0'})")
    elif gpus:
        reasons.append(f"precision {have} (compute capability {cc[0]}.{cc[1]})" if cc else f"precision {have}")
    training["bf16"], training["fp16"] = have == "bf16", have == "fp16"

    # Fused AdamW runs on the CPU too (torch >= 2.4), and its device-side skip keeps the NaN guard
    # from waiting for the device every step.
    optim = training.get("optim")
    if optim in EIGHT_BIT_OPTIMIZERS:
        bnb = bitsandbytes_installed() if bnb_available is None else bnb_available
        if not gpus or not bnb:
            why = "no GPU" if not gpus else "bitsandbytes is not installed (`pip install bitsandbytes`)"
            training["optim"] = "adamw_torch"
            reasons.append(f"optimizer adamw_torch instead of {optim}: {why}")
        else:
            reasons.append(f"optimizer {optim}: for LoRA it saves little, since the optimizer only holds the adapter's state")
    return out, reasons


@dataclass
class Recommendation:
    gpus: list[GpuInfo]
    profile: Profile
    resolved: Resolved
    reasons: list[str]
    warnings: list[str]

    @property
    def config(self):
        return self.resolved.config

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": [g.to_dict() for g in self.gpus],
            "profile": {"name": self.profile.name, "title": self.profile.title},
            "config": self.config.to_dict(),
            "pinned": sorted(self.resolved.pinned),
            "reasons": self.reasons,
            "warnings": self.warnings,
        }


def capped_gpus(gpus: list[GpuInfo], limit_gib: float | None) -> list[GpuInfo]:
    """The GPUs as a memory cap makes them: cards larger than the cap become unnamed cards
    of the cap's size (matched by memory tier). `gpus` itself when the cap changes nothing."""
    if not limit_gib or not gpus:
        return gpus
    cap = int(limit_gib * GIB)
    if all(g.total_bytes is not None and g.total_bytes <= cap for g in gpus):
        return gpus
    return [g if g.total_bytes is not None and g.total_bytes <= cap else
            dataclasses.replace(g, name=f"card capped at {limit_gib:g} GiB", total_bytes=cap,
                                free_bytes=None if g.free_bytes is None else min(g.free_bytes, cap))
            for g in gpus]


def recommend(gpus: list[GpuInfo], *, user_yaml: dict[str, Any] | None = None, sets: list[str] | None = None,
              profiles: list[Profile] | None = None, bnb_available: bool | None = None) -> Recommendation:
    """GpuInfo -> Profile -> Config: the table's values, adapted to the hardware, under the user's keys."""
    profiles = profiles if profiles is not None else load_profiles()
    match = match_profile(gpus, profiles)
    settings, hw_reasons = adapt_to_hardware(match.profile.settings, gpus, bnb_available=bnb_available)
    resolved = resolve_config(settings, user_yaml, sets)
    capped = capped_gpus(gpus, resolved.config.autotune.vram_limit_gib)
    if capped is not gpus:
        # `--vram-limit` stands in for a smaller card: plan with that card's profile.
        match = match_profile(capped, profiles)
        match.reasons.insert(0, f"`autotune.vram_limit_gib` {resolved.config.autotune.vram_limit_gib:g}: "
                                "planning as for a card of that size")
        settings, hw_reasons = adapt_to_hardware(match.profile.settings, capped, bnb_available=bnb_available)
        resolved = resolve_config(settings, user_yaml, sets)
    reasons = match.reasons + hw_reasons
    warnings = list(match.warnings) + list(resolved.notes)
    training = resolved.config.training
    for key in sorted(resolved.pinned):
        reasons.append(f"`{key}` pinned by you")
    if "training.optim" in resolved.pinned and training.optim in EIGHT_BIT_OPTIMIZERS:
        # The table's 8-bit optimizer falls back above; a pinned one is kept, so say it cannot run here.
        bnb = bitsandbytes_installed() if bnb_available is None else bnb_available
        if not gpus or not bnb:
            why = "there is no GPU" if not gpus else "bitsandbytes is not installed (`pip install bitsandbytes`)"
            warnings.append(f"`training.optim` is pinned to {training.optim} but {why}, so training would fail: "
                            "use `--set training.optim=adamw_torch`")
    if training.bf16 and gpus and any(g.cc is not None and g.cc < (8, 0) for g in gpus):
        warnings.append("`training.bf16` is set but this GPU has no native bf16 (compute capability < 8.0): it will be slow or fail")
    return Recommendation(gpus, match.profile, resolved, reasons, warnings)
