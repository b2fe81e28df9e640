"""What GPUs this process will get, read through NVML without importing torch.

`probe()` answers in well under a second because it only talks to NVML;
`import torch` alone takes seconds, so nothing here may import it (or
transformers), directly or through another module. `pynvml` itself is imported
inside `probe()`, so importing this module costs nothing on a machine without
a driver.

The probe degrades one field at a time: every NVML query is wrapped so that a
query the card does not support (GeForce cards and MIG, for example) leaves
that one field `None`. "No GPU" is a valid answer, with a `reason`.

It reports the devices CUDA would give this process: `CUDA_VISIBLE_DEVICES` is
applied with CUDA's own rules, and a card in MIG mode is described by its MIG
slices, since a CUDA process can only run on a slice of such a card.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from autotune.errors import AutotuneError

__all__ = ["GIB", "GpuInfo", "ProbeResult", "known_cc", "probe", "what_if_gpu"]

GIB = 2**30
"""Bytes in one GiB, the unit of every memory size shown to users."""

# NVML's value for "MIG mode on"; read from the module when it has it.
_MIG_ENABLED = 1

# Values that deliberately hide every GPU: CUDA stops at the first invalid
# entry, and these are the ones schedulers and users write on purpose.
_HIDE_ALL = frozenset({"-1", "NoDevFiles"})


@dataclass(frozen=True)
class GpuInfo:
    """One device as CUDA will see it: a whole card, or one MIG slice of a card.

    Any field NVML could not read is `None`; planners must treat `None` as
    "unknown", never as zero.
    """

    index: int | None
    """NVML index of the card (for a MIG slice, of its parent card); `None` for a what-if card."""
    name: str | None
    """NVML name, e.g. `NVIDIA H100 80GB HBM3` or `NVIDIA A100-SXM4-40GB MIG 1g.5gb`."""
    total_bytes: int | None
    """Memory of the device in bytes (of the slice, for a MIG slice)."""
    free_bytes: int | None
    """Memory not in use by anyone at probe time; `None` for a what-if card."""
    cc: tuple[int, int] | None
    """CUDA compute capability as (major, minor); a MIG slice has its card's."""
    uuid: str | None = None
    """`GPU-...` for a card, `MIG-...` for a slice: what `CUDA_VISIBLE_DEVICES` accepts."""
    mig_mode: bool | None = None
    """Whether MIG is on for the (parent) card; `None` where the card has no MIG."""
    is_mig_slice: bool = False
    """True when this device is one MIG slice, not a whole card."""
    driver_version: str | None = None
    """NVIDIA driver version, e.g. `580.159.04`."""
    cuda_driver_version: str | None = None
    """Newest CUDA version the driver supports, e.g. `13.0`."""

    @property
    def total_gib(self) -> float | None:
        """`total_bytes` in GiB, or `None` when unknown."""
        return None if self.total_bytes is None else self.total_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict, with `cc` as `[major, minor]`."""
        data = asdict(self)
        data["cc"] = None if self.cc is None else list(self.cc)
        return data


@dataclass
class ProbeResult:
    """The devices CUDA would give this process, in CUDA's order."""

    gpus: list[GpuInfo]
    reason: str | None
    """Why `gpus` is empty (`None` when there are GPUs)."""
    warnings: list[str] = field(default_factory=list)
    """Things the user may want to fix; the probe still answered."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the result."""
        return {
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "reason": self.reason,
            "warnings": list(self.warnings),
        }


def probe(env: Mapping[str, str] | None = None, nvml: Any = None) -> ProbeResult:
    """Read the GPUs this process would get from CUDA, through NVML.

    `env` defaults to `os.environ` (only `CUDA_VISIBLE_DEVICES` and
    `CUDA_DEVICE_ORDER` are read). `nvml` defaults to the `pynvml` module
    (package `nvidia-ml-py`); tests pass a fake with the same functions.
    Never raises for a missing driver or GPU: the result then has no GPUs and
    a `reason`.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")

    # Decided before NVML is touched: these hide every GPU whatever is installed.
    if visible is not None:
        if not visible.strip():
            return ProbeResult([], "CUDA_VISIBLE_DEVICES is empty, so CUDA sees no GPU")
        first = visible.split(",")[0].strip()
        if first in _HIDE_ALL:
            return ProbeResult([], f"CUDA_VISIBLE_DEVICES={visible} hides every GPU")

    if nvml is None:
        try:
            import pynvml as nvml  # lazy: keeps this module free to import without a driver
        except ImportError as exc:
            return ProbeResult(
                [],
                f"NVML not available: cannot import `pynvml` ({exc}); "
                "install it with `pip install nvidia-ml-py`",
            )

    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return ProbeResult([], _init_failure_reason(nvml, exc))
    try:
        return _probe_initialized(nvml, visible, env.get("CUDA_DEVICE_ORDER"))
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass  # the answer is already read; a failed shutdown must not hide it


def _init_failure_reason(nvml: Any, exc: BaseException) -> str:
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return f"no NVIDIA driver loaded (NVML: {exc})"
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return f"NVML not available: {exc} (is an NVIDIA driver installed?)"
    return f"NVML not available: {exc}"


# ---------------------------------------------------------------------------
# Reading the cards
# ---------------------------------------------------------------------------


class _Reader:
    """Runs NVML queries so that a failing query costs one field, not the probe."""

    def __init__(self, nvml: Any, warnings: list[str]):
        self._nvml = nvml
        self.warnings = warnings
        self._not_supported = getattr(nvml, "NVMLError_NotSupported", ())

    def call(self, where: str, func_name: str, *args: Any, expected: tuple[type, ...] = ()) -> Any:
        """`nvml.<func_name>(*args)`, or `None` when NVML cannot answer.

        "Not supported" is a normal answer (GeForce cards have no MIG, MIG
        slices lack some queries) and stays silent, as do the `expected`
        errors; any other NVML error is worth a warning.
        """
        func = getattr(self._nvml, func_name, None)
        if func is None:
            # An older pynvml without this binding: same outcome as an unsupported query.
            return None
        try:
            return func(*args)
        except self._nvml.NVMLError as exc:
            if not isinstance(exc, (self._not_supported, *expected)):
                self.warnings.append(f"{where}: NVML `{func_name}` failed ({exc}); left unknown")
            return None


@dataclass
class _Card:
    """One physical card and the devices CUDA would make of it."""

    index: int
    uuid: str | None
    devices: list[GpuInfo]
    """The card itself, or its MIG slices when MIG is on (possibly none)."""


def _probe_initialized(nvml: Any, visible: str | None, device_order: str | None) -> ProbeResult:
    warnings: list[str] = []
    reader = _Reader(nvml, warnings)
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return ProbeResult([], f"NVML could not count the GPUs ({exc})", warnings)
    if count == 0:
        return ProbeResult([], "NVML sees no GPU", warnings)

    driver_version = _text(reader.call("driver", "nvmlSystemGetDriverVersion"))
    cuda_driver_version = _cuda_version(reader.call("driver", "nvmlSystemGetCudaDriverVersion"))
    cards = [
        _read_card(nvml, reader, index, driver_version, cuda_driver_version)
        for index in range(count)
    ]

    if visible is None:
        gpus = [device for card in cards for device in card.devices]
        reason = None
    else:
        gpus, reason = _select_visible(visible, cards, warnings)

    if not gpus and reason is None:
        reason = "no GPU usable by CUDA (see the warnings)"
    _warn_about_order(gpus, visible, device_order, warnings)
    if sum(gpu.is_mig_slice for gpu in gpus) > 1:
        warnings.append(
            "CUDA gives a process only one MIG slice; pick the one to use with "
            "CUDA_VISIBLE_DEVICES=MIG-<uuid> (uuids as listed here)"
        )
    return ProbeResult(gpus, reason if not gpus else None, warnings)


def _read_card(
    nvml: Any,
    reader: _Reader,
    index: int,
    driver_version: str | None,
    cuda_driver_version: str | None,
) -> _Card:
    where = f"GPU {index}"
    handle = reader.call(where, "nvmlDeviceGetHandleByIndex", index)
    if handle is None:
        # Kept as an all-unknown device so that CUDA indexes still line up.
        unknown = GpuInfo(index, None, None, None, None, driver_version=driver_version,
                          cuda_driver_version=cuda_driver_version)
        return _Card(index, None, [unknown])

    name = _text(reader.call(where, "nvmlDeviceGetName", handle))
    total_bytes, free_bytes = _memory(reader.call(where, "nvmlDeviceGetMemoryInfo", handle))
    cc = _capability(reader.call(where, "nvmlDeviceGetCudaComputeCapability", handle))
    uuid = _text(reader.call(where, "nvmlDeviceGetUUID", handle))
    mig_modes = reader.call(where, "nvmlDeviceGetMigMode", handle)
    mig_mode = None if mig_modes is None else mig_modes[0] == getattr(
        nvml, "NVML_DEVICE_MIG_ENABLE", _MIG_ENABLED
    )

    if not mig_mode:
        card = GpuInfo(index, name, total_bytes, free_bytes, cc, uuid, mig_mode,
                       driver_version=driver_version, cuda_driver_version=cuda_driver_version)
        return _Card(index, uuid, [card])

    slices = _read_mig_slices(nvml, reader, index, handle, cc, driver_version, cuda_driver_version)
    if not slices:
        reader.warnings.append(
            f"GPU {index} ({name or 'unknown'}) has MIG mode on but no MIG instance, so CUDA "
            f"cannot use it; create one (`nvidia-smi mig -i {index} -cgi <profile> -C`) "
            f"or turn MIG off (`nvidia-smi -i {index} -mig 0`)"
        )
    return _Card(index, uuid, slices)


def _read_mig_slices(
    nvml: Any,
    reader: _Reader,
    index: int,
    handle: Any,
    cc: tuple[int, int] | None,
    driver_version: str | None,
    cuda_driver_version: str | None,
) -> list[GpuInfo]:
    where = f"GPU {index}"
    max_count = reader.call(where, "nvmlDeviceGetMaxMigDeviceCount", handle) or 0
    # An unpopulated MIG slot answers "not found": that is the normal empty slot.
    empty_slot = (nvml.NVMLError_NotFound,) if hasattr(nvml, "NVMLError_NotFound") else ()
    slices = []
    for mig_index in range(int(max_count)):
        mig_handle = reader.call(
            where, "nvmlDeviceGetMigDeviceHandleByIndex", handle, mig_index, expected=empty_slot
        )
        if mig_handle is None:
            continue
        slice_where = f"GPU {index} MIG slice {mig_index}"
        total_bytes, free_bytes = _memory(
            reader.call(slice_where, "nvmlDeviceGetMemoryInfo", mig_handle)
        )
        slices.append(
            GpuInfo(
                index=index,
                name=_text(reader.call(slice_where, "nvmlDeviceGetName", mig_handle)),
                total_bytes=total_bytes,
                free_bytes=free_bytes,
                # Same silicon as the card; not every driver answers this on a slice handle.
                cc=cc,
                uuid=_text(reader.call(slice_where, "nvmlDeviceGetUUID", mig_handle)),
                mig_mode=True,
                is_mig_slice=True,
                driver_version=driver_version,
                cuda_driver_version=cuda_driver_version,
            )
        )
    return slices


def _text(value: Any) -> str | None:
    # Older pynvml versions return bytes for every string.
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _memory(info: Any) -> tuple[int | None, int | None]:
    if info is None:
        return None, None
    return int(info.total), int(info.free)


def _capability(value: Any) -> tuple[int, int] | None:
    try:
        major, minor = value
        return int(major), int(minor)
    except (TypeError, ValueError):
        return None


def _cuda_version(value: Any) -> str | None:
    # NVML encodes CUDA 12.4 as 12040.
    if value is None:
        return None
    value = int(value)
    return f"{value // 1000}.{value % 1000 // 10}"


# ---------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES
# ---------------------------------------------------------------------------


def _select_visible(
    visible: str, cards: list[_Card], warnings: list[str]
) -> tuple[list[GpuInfo], str | None]:
    """Apply `CUDA_VISIBLE_DEVICES` as CUDA does (and as torch mirrors it).

    The list is read in order; the kind of the first entry (index, `GPU-`
    uuid, `MIG-` uuid) sets the kind of the list, and the first entry that is
    invalid or of another kind ends it. A device named twice hides every GPU.
    """
    entries = [entry.strip() for entry in visible.split(",")]
    kind = next((prefix for prefix in ("GPU-", "MIG-") if entries[0].startswith(prefix)), "")
    chosen: list[GpuInfo] = []
    seen: set[object] = set()
    for position, entry in enumerate(entries):
        target, devices, problem = _resolve(entry, kind, cards)
        if problem is not None:
            warnings.append(
                f"CUDA_VISIBLE_DEVICES entry `{entry}` {problem}; CUDA ignores it "
                "and every entry after it"
            )
            if position == 0:
                return [], f"CUDA_VISIBLE_DEVICES={visible} selects no GPU"
            break
        if target in seen:
            warnings.append(
                f"CUDA_VISIBLE_DEVICES names `{entry}` twice, which hides every GPU from CUDA"
            )
            return [], f"CUDA_VISIBLE_DEVICES={visible} names a GPU twice, so CUDA sees no GPU"
        seen.add(target)
        chosen.extend(devices)
    return chosen, None


def _resolve(
    entry: str, kind: str, cards: list[_Card]
) -> tuple[object, list[GpuInfo], str | None]:
    """(identity of what `entry` names, its devices, why it is invalid or None)."""
    if kind == "":
        # CUDA reads indexes like strtoul: the leading digits count, so `1gpu` is 1.
        match = re.match(r"[+-]?\d+", entry)
        if match is None:
            return None, [], (
                "is not a GPU index (a list that starts with an index takes only indexes)"
            )
        number = int(match.group())
        if number < 0:
            return None, [], "is negative"
        if number >= len(cards):
            return None, [], f"names GPU {number}, but NVML sees {len(cards)} GPU(s)"
        return ("card", number), cards[number].devices, None

    if not entry.startswith(kind):
        return None, [], f"is not a `{kind}` uuid (a list that starts with one takes only those)"

    if kind == "GPU-":
        found = [card for card in cards if card.uuid and card.uuid.startswith(entry)]
        if len(found) > 1:
            return None, [], f"matches {len(found)} GPUs; give more of the uuid"
        if not found:
            return None, [], "matches no GPU uuid"
        return ("card", found[0].index), found[0].devices, None

    slices = [
        device
        for card in cards
        for device in card.devices
        if device.is_mig_slice and device.uuid and device.uuid.startswith(entry)
    ]
    if len(slices) > 1:
        return None, [], f"matches {len(slices)} MIG slices; give more of the uuid"
    if not slices:
        return None, [], "matches no MIG slice uuid"
    return ("slice", slices[0].uuid), slices, None


def _warn_about_order(
    gpus: list[GpuInfo], visible: str | None, device_order: str | None, warnings: list[str]
) -> None:
    # NVML numbers cards by PCI bus; CUDA numbers them fastest first unless told
    # otherwise, so with mixed cards "GPU 0" can mean two different cards.
    kinds = {(gpu.name, gpu.cc) for gpu in gpus if not gpu.is_mig_slice}
    if len(kinds) > 1 and (device_order or "FASTEST_FIRST") != "PCI_BUS_ID":
        uses_indexes = visible is None or not visible.strip().startswith(("GPU-", "MIG-"))
        if uses_indexes:
            warnings.append(
                "the GPUs differ and CUDA numbers them fastest first, not in this (PCI bus) "
                "order; set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA's numbering matches"
            )


# ---------------------------------------------------------------------------
# What-if cards
# ---------------------------------------------------------------------------

# Compute capability by card family, matched against the normalised name;
# first match wins, so specific patterns come before general ones.
_KNOWN_CC: tuple[tuple[str, tuple[int, int]], ...] = (
    (r"\bgh200\b", (9, 0)),
    (r"\bh(100|200|800)\b", (9, 0)),
    (r"\bb(100|200)\b", (10, 0)),
    (r"\ba(100|800|30)\b", (8, 0)),
    (r"\ba(10g?|40|6000)\b", (8, 6)),
    (r"\bl40s?\b", (8, 9)),
    (r"\bl4\b", (8, 9)),
    (r"\b6000 ada\b", (8, 9)),
    (r"\bt4\b", (7, 5)),
    (r"\bv100\b", (7, 0)),
    (r"\bp100\b", (6, 0)),
    (r"\b50[6-9]0\b", (12, 0)),
    (r"\b40[6-9]0\b", (8, 9)),
    (r"\b30[5-9]0\b", (8, 6)),
    (r"\b20[6-8]0\b", (7, 5)),
)


def known_cc(name: str) -> tuple[int, int] | None:
    """The compute capability of a well-known card, from its name, or `None`.

    Accepts NVML names (`NVIDIA GeForce RTX 3090`) and short ones (`3090`,
    `a100-80gb`). `A10` is not `A100`, and `L4` is not `L40`.
    """
    normalised = " ".join(re.sub(r"[-_/]", " ", name.lower()).split())
    for pattern, cc in _KNOWN_CC:
        if re.search(pattern, normalised):
            return cc
    return None


def what_if_gpu(name: str, vram_gib: float | str, cc: str | None) -> GpuInfo:
    """Describe a card you do not own, for planning.

    `vram_gib` is its memory in GiB (a number, or the text of a `--vram`
    flag); `cc` its compute capability as `MAJOR.MINOR`, or `None` to look it
    up from the name. Raises `AutotuneError` on a bad value. The result has no
    `index`, and `free_bytes` is `None` because nothing was measured.
    """
    clean_name = " ".join(str(name).split())
    if not clean_name:
        raise AutotuneError("a what-if GPU needs a name, for example `RTX 4090`")
    problems: list[str] = []
    total_bytes = capability = None
    try:
        total_bytes = int(round(_parse_vram_gib(vram_gib) * GIB))
    except AutotuneError as exc:
        problems.append(str(exc))
    if cc is not None:
        try:
            capability = parse_cc(cc)
        except AutotuneError as exc:
            problems.append(str(exc))
    if problems:   # both at once, not one per attempt
        raise AutotuneError("; ".join(problems))
    if cc is None:
        guessed = known_cc(clean_name)
        if guessed is None:
            raise AutotuneError(
                f"cannot guess the compute capability of `{clean_name}`; "
                "give it with `--cc` MAJOR.MINOR (for example `--cc 8.6`)"
            )
        capability = guessed
    return GpuInfo(
        index=None, name=clean_name, total_bytes=total_bytes, free_bytes=None, cc=capability
    )


MAX_WHAT_IF_GIB = 2**20
"""Largest `--vram` accepted (1 PiB): anything above is a typo, not a card."""


def _parse_vram_gib(value: float | str) -> float:
    problem = AutotuneError(f"`--vram` must be a positive number of GiB, got `{value}`")
    if isinstance(value, bool):
        raise problem
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise problem from None
    if not math.isfinite(number) or number <= 0:
        raise problem
    if number > MAX_WHAT_IF_GIB:  # also keeps `number * GIB` finite (1e300 GiB overflowed it)
        raise AutotuneError(f"`--vram` must be at most {MAX_WHAT_IF_GIB} GiB, got `{value}`")
    if round(number * GIB) < 1:  # 1e-10 GiB is not even a byte
        raise problem
    return number


def parse_cc(value: str) -> tuple[int, int]:
    # ASCII digits only (`\d` also takes e.g. Arabic-Indic digits), and no 30-digit versions.
    match = re.fullmatch(r"([0-9]{1,3})\.([0-9]{1,3})", str(value).strip())
    if match is None:
        raise AutotuneError(
            f"`--cc` must look like MAJOR.MINOR (for example 8.6), got `{value}`"
        )
    return int(match.group(1)), int(match.group(2))
