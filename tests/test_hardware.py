"""The NVML probe and what-if cards, on fake hardware built from real fingerprints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

from autotune.errors import AutotuneError
from autotune.hardware import GIB, GpuInfo, ProbeResult, known_cc, probe, what_if_gpu
from tests.fake_nvml import (
    A100_40GB_MIG_PROFILES,
    IDLE_USED_BYTES,
    FakeNvml,
    fake_uuid,
    fixture_gpu,
    fixture_gpus,
    fixture_rows,
    mig_a100,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# CUDA and NVML agree on numbering only in PCI bus order; tests about other
# things pin it so the order warning does not get in the way.
PCI_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def run(nvml: FakeNvml, visible: str | None = None, **env: str) -> ProbeResult:
    """Probe the fake machine with `CUDA_VISIBLE_DEVICES=visible` (unset when None)."""
    environment = {**PCI_ORDER, **env}
    if visible is not None:
        environment["CUDA_VISIBLE_DEVICES"] = visible
    result = probe(env=environment, nvml=nvml)
    # Whatever happened, NVML must be left shut down.
    assert not nvml.initialized
    return result


def two_cards() -> FakeNvml:
    return FakeNvml([fixture_gpu("NVIDIA H200", 0), fixture_gpu("NVIDIA GeForce RTX 4090", 1)])


# ---------------------------------------------------------------------------
# Reading the cards
# ---------------------------------------------------------------------------


def test_every_fixture_gpu_reads_back_exactly() -> None:
    rows = fixture_rows()
    assert any(row["name"] == "NVIDIA H200" for row in rows)
    nvml = FakeNvml.from_fixture()

    result = run(nvml)

    assert result.reason is None
    assert result.warnings == []
    assert len(result.gpus) == len(rows)
    for index, (gpu, row) in enumerate(zip(result.gpus, rows)):
        assert gpu.index == index
        assert gpu.name == row["name"]
        assert gpu.total_bytes == row["total_bytes"]
        assert gpu.free_bytes == row["total_bytes"] - IDLE_USED_BYTES
        assert gpu.cc == tuple(row["cc"])
        assert gpu.uuid == nvml.gpus[index].uuid
        assert gpu.is_mig_slice is False
        assert gpu.driver_version == "580.159.04"
        assert gpu.cuda_driver_version == "13.0"
    assert nvml.init_calls == nvml.shutdown_calls == 1
    assert nvml.handles_issued == len(rows)


def test_mig_mode_is_false_on_mig_capable_cards_and_none_elsewhere() -> None:
    result = run(FakeNvml.from_fixture())
    by_name = {gpu.name: gpu for gpu in result.gpus}
    assert by_name["NVIDIA H200"].mig_mode is False
    assert by_name["NVIDIA A100-SXM4-80GB"].mig_mode is False
    assert by_name["NVIDIA GeForce RTX 3090"].mig_mode is None
    assert by_name["Tesla V100-SXM2-16GB"].mig_mode is None


def test_h200_fingerprint_in_gib() -> None:
    gpu = run(FakeNvml([fixture_gpu("NVIDIA H200")])).gpus[0]
    assert gpu.total_gib == pytest.approx(140.4, abs=0.05)
    assert GpuInfo(0, None, None, None, None).total_gib is None


def test_bytes_from_old_pynvml_are_decoded() -> None:
    gpu = run(FakeNvml([fixture_gpu("NVIDIA H200")], legacy_bytes=True)).gpus[0]
    assert gpu.name == "NVIDIA H200"
    assert gpu.uuid is not None and gpu.uuid.startswith("GPU-")
    assert gpu.driver_version == "580.159.04"


@pytest.mark.parametrize(
    ("func_name", "unknown"),
    [
        ("nvmlDeviceGetName", {"name"}),
        ("nvmlDeviceGetMemoryInfo", {"total_bytes", "free_bytes"}),
        ("nvmlDeviceGetCudaComputeCapability", {"cc"}),
        ("nvmlDeviceGetUUID", {"uuid"}),
        ("nvmlDeviceGetMigMode", {"mig_mode"}),
    ],
)
def test_not_supported_field_becomes_none_and_the_rest_still_reads(
    func_name: str, unknown: set[str]
) -> None:
    nvml = FakeNvml(
        [
            fixture_gpu("NVIDIA H100 80GB HBM3", 0, not_supported=(func_name,)),
            fixture_gpu("NVIDIA H200", 1),
        ]
    )
    expected = run(FakeNvml([fixture_gpu("NVIDIA H100 80GB HBM3", 0)])).gpus[0].to_dict()

    result = run(nvml)

    assert result.warnings == []  # "not supported" is a normal answer
    degraded = result.gpus[0].to_dict()
    for name, value in expected.items():
        assert degraded[name] == (None if name in unknown else value), name
    assert result.gpus[1].name == "NVIDIA H200"
    assert result.gpus[1].total_bytes == 150754820096


def test_other_nvml_error_leaves_field_unknown_with_a_warning() -> None:
    nvml = FakeNvml(
        [fixture_gpu("NVIDIA H200", failures={"nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_UNKNOWN})]
    )
    result = run(nvml)
    gpu = result.gpus[0]
    assert (gpu.name, gpu.cc, gpu.total_bytes, gpu.free_bytes) == ("NVIDIA H200", (9, 0), None, None)
    assert result.warnings == [
        "GPU 0: NVML `nvmlDeviceGetMemoryInfo` failed (Unknown Error); left unknown"
    ]


def test_driver_versions_unsupported_become_none() -> None:
    nvml = FakeNvml(
        [fixture_gpu("NVIDIA H200")],
        failures={
            "nvmlSystemGetDriverVersion": pynvml.NVML_ERROR_NOT_SUPPORTED,
            "nvmlSystemGetCudaDriverVersion": pynvml.NVML_ERROR_NOT_SUPPORTED,
        },
    )
    gpu = run(nvml).gpus[0]
    assert (gpu.driver_version, gpu.cuda_driver_version) == (None, None)
    assert gpu.total_bytes == 150754820096


def test_cuda_driver_version_minor_is_read() -> None:
    gpu = run(FakeNvml([fixture_gpu("NVIDIA H200")], cuda_driver_version=12040)).gpus[0]
    assert gpu.cuda_driver_version == "12.4"


def test_unreadable_card_keeps_its_place() -> None:
    nvml = FakeNvml(
        [
            fixture_gpu(
                "NVIDIA H200",
                0,
                failures={"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_NO_PERMISSION},
            ),
            fixture_gpu("NVIDIA GeForce RTX 4090", 1),
        ]
    )
    result = run(nvml, "1")
    assert [gpu.name for gpu in result.gpus] == ["NVIDIA GeForce RTX 4090"]
    result = run(nvml)
    assert [(gpu.index, gpu.name) for gpu in result.gpus] == [(0, None), (1, "NVIDIA GeForce RTX 4090")]
    assert result.warnings == [
        "GPU 0: NVML `nvmlDeviceGetHandleByIndex` failed (Insufficient Permissions); left unknown"
    ]


# ---------------------------------------------------------------------------
# No GPU
# ---------------------------------------------------------------------------


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    result = probe(env={})
    assert result.gpus == []
    assert result.reason is not None
    assert result.reason.startswith("NVML not available: cannot import `pynvml`")
    assert "pip install nvidia-ml-py" in result.reason


def test_driver_not_loaded() -> None:
    nvml = FakeNvml(fixture_gpus(), init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    result = run(nvml)
    assert result.gpus == []
    assert result.reason == "no NVIDIA driver loaded (NVML: Driver Not Loaded)"
    assert nvml.shutdown_calls == 0  # nothing to shut down after a failed init


def test_nvml_library_missing() -> None:
    result = run(FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert result.gpus == []
    assert result.reason == (
        "NVML not available: NVML Shared Library Not Found (is an NVIDIA driver installed?)"
    )


def test_no_gpu_at_all() -> None:
    result = run(FakeNvml([]))
    assert (result.gpus, result.reason) == ([], "NVML sees no GPU")


def test_shutdown_even_when_counting_fails() -> None:
    nvml = FakeNvml(fixture_gpus(), failures={"nvmlDeviceGetCount": pynvml.NVML_ERROR_GPU_IS_LOST})
    result = run(nvml)
    assert result.gpus == []
    assert result.reason == "NVML could not count the GPUs (GPU is lost)"
    assert nvml.shutdown_calls == 1


def test_probe_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    result = probe(nvml=two_cards())
    assert [gpu.name for gpu in result.gpus] == ["NVIDIA GeForce RTX 4090"]


# ---------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES
# ---------------------------------------------------------------------------


def test_unset_shows_every_gpu() -> None:
    assert [gpu.index for gpu in run(two_cards()).gpus] == [0, 1]


def test_indexes_give_cuda_order() -> None:
    result = run(two_cards(), "1,0")
    assert [(gpu.index, gpu.name) for gpu in result.gpus] == [
        (1, "NVIDIA GeForce RTX 4090"),
        (0, "NVIDIA H200"),
    ]
    assert result.warnings == []


def test_indexes_are_read_like_strtoul() -> None:
    assert [gpu.index for gpu in run(two_cards(), " 1 , 0gpu").gpus] == [1, 0]


@pytest.mark.parametrize(
    ("visible", "reason"),
    [
        ("", "CUDA_VISIBLE_DEVICES is empty, so CUDA sees no GPU"),
        ("  ", "CUDA_VISIBLE_DEVICES is empty, so CUDA sees no GPU"),
        ("-1", "CUDA_VISIBLE_DEVICES=-1 hides every GPU"),
        ("-1,0", "CUDA_VISIBLE_DEVICES=-1,0 hides every GPU"),
        ("NoDevFiles", "CUDA_VISIBLE_DEVICES=NoDevFiles hides every GPU"),
    ],
)
def test_hiding_every_gpu(visible: str, reason: str) -> None:
    nvml = two_cards()
    result = run(nvml, visible)
    assert (result.gpus, result.reason, result.warnings) == ([], reason, [])
    assert nvml.init_calls == 0  # decided without touching NVML


@pytest.mark.parametrize(
    ("visible", "indexes", "warning"),
    [
        ("1,7,0", [1], "CUDA_VISIBLE_DEVICES entry `7` names GPU 7, but NVML sees 2 GPU(s)"),
        ("0,-1,1", [0], "CUDA_VISIBLE_DEVICES entry `-1` is negative"),
        (
            "0,abc,1",
            [0],
            "CUDA_VISIBLE_DEVICES entry `abc` is not a GPU index "
            "(a list that starts with an index takes only indexes)",
        ),
        ("0,,1", [0], "CUDA_VISIBLE_DEVICES entry `` is not a GPU index"),
    ],
)
def test_invalid_entry_ends_the_list_with_a_warning(
    visible: str, indexes: list[int], warning: str
) -> None:
    result = run(two_cards(), visible)
    assert [gpu.index for gpu in result.gpus] == indexes
    assert result.reason is None
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith(warning)
    assert result.warnings[0].endswith("; CUDA ignores it and every entry after it")


def test_invalid_first_entry_leaves_no_gpu_with_a_reason() -> None:
    result = run(two_cards(), "5,0")
    assert result.gpus == []
    assert result.reason == "CUDA_VISIBLE_DEVICES=5,0 selects no GPU"
    assert result.warnings == [
        "CUDA_VISIBLE_DEVICES entry `5` names GPU 5, but NVML sees 2 GPU(s); "
        "CUDA ignores it and every entry after it"
    ]


def test_a_gpu_named_twice_hides_every_gpu() -> None:
    result = run(two_cards(), "0,1,0")
    assert result.gpus == []
    assert result.reason == "CUDA_VISIBLE_DEVICES=0,1,0 names a GPU twice, so CUDA sees no GPU"
    assert result.warnings == ["CUDA_VISIBLE_DEVICES names `0` twice, which hides every GPU from CUDA"]


def test_full_uuids_select_in_order() -> None:
    nvml = FakeNvml.from_fixture()
    wanted = [nvml.gpus[4], nvml.gpus[0]]
    result = run(nvml, ",".join(gpu.uuid for gpu in wanted))
    assert [gpu.name for gpu in result.gpus] == [gpu.name for gpu in wanted]
    assert [gpu.uuid for gpu in result.gpus] == [gpu.uuid for gpu in wanted]
    assert result.warnings == []


def three_uuid_cards() -> FakeNvml:
    return FakeNvml(
        [
            fixture_gpu("NVIDIA H200", 0, uuid="GPU-aaaa1111-0000-0000-0000-000000000000"),
            fixture_gpu("NVIDIA H200", 1, uuid="GPU-aaaa2222-0000-0000-0000-000000000000"),
            fixture_gpu("NVIDIA H200", 2, uuid="GPU-bbbb3333-0000-0000-0000-000000000000"),
        ]
    )


def test_uuid_prefix_selects_the_one_card_it_matches() -> None:
    result = run(three_uuid_cards(), "GPU-b,GPU-aaaa2")
    assert [gpu.index for gpu in result.gpus] == [2, 1]
    assert result.warnings == []


def test_ambiguous_uuid_prefix_ends_the_list() -> None:
    result = run(three_uuid_cards(), "GPU-bbbb,GPU-aaaa,GPU-aaaa1")
    assert [gpu.index for gpu in result.gpus] == [2]
    assert result.warnings == [
        "CUDA_VISIBLE_DEVICES entry `GPU-aaaa` matches 2 GPUs; give more of the uuid; "
        "CUDA ignores it and every entry after it"
    ]


def test_unknown_uuid_and_mixed_kinds_end_the_list() -> None:
    result = run(three_uuid_cards(), "GPU-aaaa1,0")
    assert [gpu.index for gpu in result.gpus] == [0]
    assert result.warnings[0].startswith("CUDA_VISIBLE_DEVICES entry `0` is not a `GPU-` uuid")

    result = run(three_uuid_cards(), "GPU-cccc")
    assert (result.gpus, result.reason) == ([], "CUDA_VISIBLE_DEVICES=GPU-cccc selects no GPU")
    assert result.warnings[0].startswith("CUDA_VISIBLE_DEVICES entry `GPU-cccc` matches no GPU uuid")


def test_mixed_cards_warn_that_cuda_numbers_them_differently() -> None:
    expected = (
        "the GPUs differ and CUDA numbers them fastest first, not in this (PCI bus) order; "
        "set CUDA_DEVICE_ORDER=PCI_BUS_ID so CUDA's numbering matches"
    )
    assert probe(env={}, nvml=two_cards()).warnings == [expected]
    assert probe(env={"CUDA_VISIBLE_DEVICES": "1,0"}, nvml=two_cards()).warnings == [expected]
    assert run(two_cards()).warnings == []  # CUDA_DEVICE_ORDER=PCI_BUS_ID
    same_cards = FakeNvml([fixture_gpu("NVIDIA H200", 0), fixture_gpu("NVIDIA H200", 1)])
    assert probe(env={}, nvml=same_cards).warnings == []


# ---------------------------------------------------------------------------
# MIG
# ---------------------------------------------------------------------------


def mig_machine() -> FakeNvml:
    """GPU 0: an H100 with MIG off; GPU 1: an A100-40GB split into three slices."""
    return FakeNvml([fixture_gpu("NVIDIA H100 80GB HBM3", 0), mig_a100(1)])


def test_mig_card_is_described_by_its_slices() -> None:
    nvml = mig_machine()
    result = run(nvml)

    whole, *slices = result.gpus
    assert (whole.name, whole.is_mig_slice, whole.mig_mode) == ("NVIDIA H100 80GB HBM3", False, False)
    assert [gpu.name for gpu in slices] == [
        "NVIDIA A100-SXM4-40GB MIG 3g.20gb",
        "NVIDIA A100-SXM4-40GB MIG 2g.10gb",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
    ]
    assert [gpu.total_bytes for gpu in slices] == [
        A100_40GB_MIG_PROFILES["3g.20gb"],
        A100_40GB_MIG_PROFILES["2g.10gb"],
        A100_40GB_MIG_PROFILES["1g.5gb"],
    ]
    assert [gpu.uuid for gpu in slices] == [s.uuid for s in nvml.gpus[1].mig_slices if s]
    for gpu in slices:
        assert gpu.is_mig_slice and gpu.mig_mode is True
        assert gpu.index == 1
        assert gpu.cc == (8, 0)  # the card's, since a slice handle does not answer it
        assert gpu.free_bytes == gpu.total_bytes - IDLE_USED_BYTES
    assert result.warnings == [
        "CUDA gives a process only one MIG slice; pick the one to use with "
        "CUDA_VISIBLE_DEVICES=MIG-<uuid> (uuids as listed here)"
    ]


def test_mig_uuid_selects_that_slice() -> None:
    nvml = mig_machine()
    one_g = nvml.gpus[1].mig_slices[3]
    assert one_g is not None

    for visible in (one_g.uuid, one_g.uuid[:12]):
        result = run(nvml, visible)
        assert [gpu.name for gpu in result.gpus] == ["NVIDIA A100-SXM4-40GB MIG 1g.5gb"]
        assert result.gpus[0].total_bytes == 4864 * 2**20
        assert result.warnings == []


def test_index_of_a_mig_card_gives_its_slices() -> None:
    result = run(mig_machine(), "1")
    assert [gpu.is_mig_slice for gpu in result.gpus] == [True, True, True]


def test_unknown_mig_uuid_selects_nothing() -> None:
    result = run(mig_machine(), fake_uuid("MIG", "nowhere"))
    assert result.gpus == []
    assert "matches no MIG slice uuid" in result.warnings[0]


def test_mig_card_without_instances_is_unusable() -> None:
    result = run(FakeNvml([mig_a100(0, profiles=())]))
    assert result.gpus == []
    assert result.reason == "no GPU usable by CUDA (see the warnings)"
    assert result.warnings == [
        "GPU 0 (NVIDIA A100-SXM4-40GB) has MIG mode on but no MIG instance, so CUDA cannot "
        "use it; create one (`nvidia-smi mig -i 0 -cgi <profile> -C`) or turn MIG off "
        "(`nvidia-smi -i 0 -mig 0`)"
    ]


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def test_result_is_json_ready() -> None:
    result = run(mig_machine())
    data = json.loads(json.dumps(result.to_dict()))
    assert data["reason"] is None
    assert data["gpus"][0]["cc"] == [9, 0]
    assert data["gpus"][0]["total_bytes"] == 85520809984
    assert data["gpus"][1]["is_mig_slice"] is True
    assert data["warnings"] == result.warnings
    assert set(data["gpus"][0]) == {
        "index", "name", "total_bytes", "free_bytes", "cc", "uuid", "mig_mode",
        "is_mig_slice", "driver_version", "cuda_driver_version",
    }


def test_importing_hardware_does_not_import_torch_or_pynvml() -> None:
    code = (
        "import autotune.hardware, sys; "
        "heavy = sorted({'torch', 'transformers', 'pynvml'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr


# ---------------------------------------------------------------------------
# What-if cards
# ---------------------------------------------------------------------------


def test_what_if_gpu_with_explicit_cc() -> None:
    gpu = what_if_gpu("  My   Card ", "11.5", "8.6")
    assert gpu == GpuInfo(
        index=None, name="My Card", total_bytes=int(11.5 * GIB), free_bytes=None, cc=(8, 6)
    )


def test_what_if_gpu_guesses_cc_from_the_name() -> None:
    gpu = what_if_gpu("RTX 4090", 24, None)
    assert (gpu.cc, gpu.total_bytes, gpu.index) == ((8, 9), 24 * GIB, None)


@pytest.mark.parametrize(
    ("name", "cc"),
    [
        ("H100", (9, 0)),
        ("h200", (9, 0)),
        ("A100-80GB", (8, 0)),
        ("NVIDIA A10", (8, 6)),
        ("A10G", (8, 6)),
        ("L4", (8, 9)),
        ("L40S", (8, 9)),
        ("Tesla T4", (7, 5)),
        ("V100", (7, 0)),
        ("RTX 2080 Ti", (7, 5)),
        ("3060", (8, 6)),
        ("RTX 3090", (8, 6)),
        ("RTX A6000", (8, 6)),
    ],
)
def test_known_cc_table(name: str, cc: tuple[int, int]) -> None:
    assert known_cc(name) == cc


def test_known_cc_agrees_with_every_fixture_card() -> None:
    for row in fixture_rows():
        assert known_cc(row["name"]) == tuple(row["cc"]), row["name"]


@pytest.mark.parametrize("vram", ["abc", "", 0, -8, "nan", "inf", float("inf"), True, None])
def test_what_if_gpu_rejects_bad_vram(vram: object) -> None:
    with pytest.raises(AutotuneError) as caught:
        what_if_gpu("RTX 4090", vram, None)  # type: ignore[arg-type]
    assert str(caught.value) == f"`--vram` must be a positive number of GiB, got `{vram}`"


@pytest.mark.parametrize("cc", ["x", "8", "8.6.1", "8,6", "", "v8.6", "-8.6"])
def test_what_if_gpu_rejects_bad_cc(cc: str) -> None:
    with pytest.raises(AutotuneError) as caught:
        what_if_gpu("RTX 4090", 24, cc)
    assert str(caught.value) == f"`--cc` must look like MAJOR.MINOR (for example 8.6), got `{cc}`"


def test_what_if_gpu_asks_for_cc_when_the_name_is_unknown() -> None:
    with pytest.raises(AutotuneError) as caught:
        what_if_gpu("Mystery Accelerator", 16, None)
    assert str(caught.value) == (
        "cannot guess the compute capability of `Mystery Accelerator`; "
        "give it with `--cc` MAJOR.MINOR (for example `--cc 8.6`)"
    )


def test_what_if_gpu_needs_a_name() -> None:
    with pytest.raises(AutotuneError) as caught:
        what_if_gpu("  ", 16, "8.6")
    assert str(caught.value) == "a what-if GPU needs a name, for example `RTX 4090`"
