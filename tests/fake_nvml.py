"""A fake NVML: the `pynvml` functions the probe uses, answering for fake cards.

Fake the hardware, not the library: the cards come from real fingerprints
(`shared/fixtures/gpus.json`), and every failure is raised as the real
`pynvml` exception class (`pynvml.NVMLError(code)` builds the subclass, e.g.
`NVMLError_NotSupported`), so `except nvml.NVMLError` behaves as on a machine.

The fake is strict where NVML is: calls before `nvmlInit` (or after the last
`nvmlShutdown`) fail with "Uninitialized", an empty MIG slot answers
"Not Found", and a MIG slice handle only answers name, memory and uuid.

    nvml = FakeNvml.from_fixture()                 # every fixture card, MIG off
    nvml = FakeNvml([fixture_gpu("NVIDIA H200", not_supported=("nvmlDeviceGetMemoryInfo",))])
    nvml = FakeNvml([mig_a100()])                  # an A100 split into MIG slices
    nvml = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
"""

from __future__ import annotations

import json
import uuid as uuid_lib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pynvml

MIB = 2**20

# Where the shared fingerprints live beside the repository; the copy in
# tests/fixtures keeps the tests running where ../shared is not checked out.
SHARED_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gpus.json"
LOCAL_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpus.json"

# What an idle card reports as used (driver and context reserve), so that
# free_bytes differs from total_bytes as on a real card.
IDLE_USED_BYTES = 512 * MIB

# Read off a real H200 (see the fixture's "about").
DRIVER_VERSION = "580.159.04"
CUDA_DRIVER_VERSION = 13000

_UUID_NAMESPACE = uuid_lib.UUID("6f1c7a52-3a43-4f0e-9d55-2f3f0c1e8a10")


def nvml_error(code: int) -> pynvml.NVMLError:
    """The real pynvml exception for an NVML return code (a subclass of `NVMLError`)."""
    return pynvml.NVMLError(code)


def fixture_path() -> Path:
    """The shared fixture when it is checked out beside the repository, else the local copy."""
    return SHARED_FIXTURE if SHARED_FIXTURE.is_file() else LOCAL_FIXTURE


@lru_cache(maxsize=1)
def fixture_rows() -> tuple[dict[str, Any], ...]:
    """The fixture's GPU rows: `name`, `total_bytes`, `cc` as NVML reports them."""
    rows = json.loads(fixture_path().read_text(encoding="utf-8"))["gpus"]
    assert rows, f"no GPUs in {fixture_path()}"
    return tuple(rows)


def fake_uuid(prefix: str, seed: str) -> str:
    """A stable uuid in NVML's format (`GPU-xxxxxxxx-xxxx-...`) derived from `seed`."""
    return f"{prefix}-{uuid_lib.uuid5(_UUID_NAMESPACE, seed)}"


@dataclass
class FakeMigSlice:
    """One MIG device (a compute instance) of a card in MIG mode."""

    name: str
    total_bytes: int
    uuid: str
    free_bytes: int | None = None
    """`None`: total minus the idle reserve."""


@dataclass
class FakeGpu:
    """One physical card and how NVML answers for it."""

    name: str
    total_bytes: int
    cc: tuple[int, int]
    uuid: str
    free_bytes: int | None = None
    """`None`: total minus the idle reserve."""
    mig_mode: tuple[int, int] | None = None
    """(current, pending) as `nvmlDeviceGetMigMode` returns; `None`: card has no MIG."""
    mig_slices: list[FakeMigSlice | None] = field(default_factory=list)
    """MIG devices by MIG index; `None` is an empty slot (NVML answers "Not Found")."""
    max_mig_devices: int = 7
    """What `nvmlDeviceGetMaxMigDeviceCount` answers on a MIG-capable card (A100: 7)."""
    not_supported: tuple[str, ...] = ()
    """NVML function names that raise `NVMLError_NotSupported` for this card."""
    failures: dict[str, int] = field(default_factory=dict)
    """NVML function name -> NVML error code it raises for this card."""


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle: a card, or one MIG slice of it."""

    gpu_index: int
    mig_index: int | None = None


@dataclass(frozen=True)
class FakeMemory:
    """What `nvmlDeviceGetMemoryInfo` returns (`c_nvmlMemory_t`)."""

    total: int
    free: int
    used: int


def _is_mig_capable(name: str) -> bool:
    return any(model in name for model in ("A100", "A30", "H100", "H200", "B200"))


def fixture_gpu(name: str, index: int = 0, **changes: Any) -> FakeGpu:
    """The fixture card called `name`, as NVML would report it at `index`.

    MIG-capable cards report MIG off (`[0, 0]`, as the real H200 did); others
    report MIG as not supported. `changes` override any `FakeGpu` field.
    """
    for row in fixture_rows():
        if row["name"] == name:
            values: dict[str, Any] = {
                "name": row["name"],
                "total_bytes": int(row["total_bytes"]),
                "cc": (int(row["cc"][0]), int(row["cc"][1])),
                "uuid": fake_uuid("GPU", f"{index}:{row['name']}"),
                "mig_mode": (0, 0) if _is_mig_capable(row["name"]) else None,
            }
            values.update(changes)
            return FakeGpu(**values)
    raise KeyError(f"{name!r} is not in {fixture_path()}")


def fixture_gpus() -> list[FakeGpu]:
    """Every fixture card, in fixture order, MIG off."""
    return [fixture_gpu(row["name"], index) for index, row in enumerate(fixture_rows())]


# Sizes nvidia-smi reports for MIG devices of an A100-SXM4-40GB.
A100_40GB_MIG_PROFILES = {
    "1g.5gb": 4864 * MIB,
    "2g.10gb": 9856 * MIB,
    "3g.20gb": 19968 * MIB,
}


def mig_a100(
    index: int = 0,
    profiles: tuple[str | None, ...] = ("3g.20gb", None, "2g.10gb", "1g.5gb"),
) -> FakeGpu:
    """The fixture A100-SXM4-40GB in MIG mode, split into `profiles` (`None`: empty slot)."""
    name = "NVIDIA A100-SXM4-40GB"
    slices: list[FakeMigSlice | None] = [
        None
        if profile is None
        else FakeMigSlice(
            name=f"{name} MIG {profile}",
            total_bytes=A100_40GB_MIG_PROFILES[profile],
            uuid=fake_uuid("MIG", f"{index}:{slot}:{profile}"),
        )
        for slot, profile in enumerate(profiles)
    ]
    return fixture_gpu(name, index, mig_mode=(1, 1), mig_slices=slices)


class FakeNvml:
    """Stands in for the `pynvml` module: same function names, same exceptions."""

    # The real classes, so code under test catches exactly what it would catch.
    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver_version: str = DRIVER_VERSION,
        cuda_driver_version: int = CUDA_DRIVER_VERSION,
        init_error: int | None = None,
        failures: dict[str, int] | None = None,
        legacy_bytes: bool = False,
    ):
        """`init_error`: NVML code `nvmlInit` raises. `failures`: system-level
        function name -> code. `legacy_bytes`: strings come back as bytes, as
        in old pynvml releases."""
        self.gpus = gpus
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.init_error = init_error
        self.failures = dict(failures or {})
        self.legacy_bytes = legacy_bytes
        self.init_calls = 0
        self.shutdown_calls = 0
        self.handles_issued = 0
        self._refcount = 0

    @classmethod
    def from_fixture(cls, **kwargs: Any) -> "FakeNvml":
        """A machine with every fixture card."""
        return cls(fixture_gpus(), **kwargs)

    @property
    def initialized(self) -> bool:
        """Whether NVML is initialised (more `nvmlInit` than `nvmlShutdown` calls)."""
        return self._refcount > 0

    # -- plumbing -----------------------------------------------------------

    def _check(self, func_name: str, gpu: FakeGpu | None = None) -> None:
        if not self.initialized:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        if func_name in self.failures:
            raise nvml_error(self.failures[func_name])
        if gpu is not None:
            if func_name in gpu.not_supported:
                raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if func_name in gpu.failures:
                raise nvml_error(gpu.failures[func_name])

    def _gpu(self, func_name: str, handle: FakeHandle, *, mig_ok: bool) -> FakeGpu:
        if not isinstance(handle, FakeHandle) or not 0 <= handle.gpu_index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.gpu_index]
        self._check(func_name, gpu)
        if handle.mig_index is not None and not mig_ok:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _slice(self, gpu: FakeGpu, handle: FakeHandle) -> FakeMigSlice | None:
        if handle.mig_index is None:
            return None
        mig_slice = gpu.mig_slices[handle.mig_index]
        assert mig_slice is not None  # handles are only issued for filled slots
        return mig_slice

    def _str(self, value: str) -> str | bytes:
        return value.encode() if self.legacy_bytes else value

    # -- the pynvml API -------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        if not self.initialized:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        self._refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._check("nvmlSystemGetDriverVersion")
        return self._str(self.driver_version)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check("nvmlSystemGetCudaDriverVersion")
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._check("nvmlDeviceGetHandleByIndex", self.gpus[index])
        self.handles_issued += 1
        return FakeHandle(index)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        gpu = self._gpu("nvmlDeviceGetName", handle, mig_ok=True)
        mig_slice = self._slice(gpu, handle)
        return self._str(mig_slice.name if mig_slice else gpu.name)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        gpu = self._gpu("nvmlDeviceGetUUID", handle, mig_ok=True)
        mig_slice = self._slice(gpu, handle)
        return self._str(mig_slice.uuid if mig_slice else gpu.uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: Any = None) -> FakeMemory:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle, mig_ok=True)
        mig_slice = self._slice(gpu, handle)
        total = mig_slice.total_bytes if mig_slice else gpu.total_bytes
        free = mig_slice.free_bytes if mig_slice else gpu.free_bytes
        if free is None:
            free = total - IDLE_USED_BYTES
        return FakeMemory(total=total, free=free, used=total - free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeHandle) -> tuple[int, int]:
        gpu = self._gpu("nvmlDeviceGetCudaComputeCapability", handle, mig_ok=False)
        return gpu.cc

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu("nvmlDeviceGetMigMode", handle, mig_ok=False)
        if gpu.mig_mode is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return list(gpu.mig_mode)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetMaxMigDeviceCount", handle, mig_ok=False)
        if gpu.mig_mode is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return max(gpu.max_mig_devices, len(gpu.mig_slices))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        gpu = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle, mig_ok=False)
        if gpu.mig_mode is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < max(gpu.max_mig_devices, len(gpu.mig_slices)):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        empty = (
            gpu.mig_mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE
            or index >= len(gpu.mig_slices)
            or gpu.mig_slices[index] is None
        )
        if empty:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        self.handles_issued += 1
        return FakeHandle(handle.gpu_index, index)
