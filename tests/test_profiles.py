"""Profile matching and hardware adaptation, driven by real GPU fingerprints.

The fingerprints are what NVML reported on real cards (`shared/fixtures/gpus.json`,
with a copy in `tests/fixtures/`); no GPU is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autotune.errors import AutotuneError  # noqa: E402
from autotune.hardware import GpuInfo  # noqa: E402
from autotune.profiles import (  # noqa: E402
    adapt_to_hardware,
    load_profiles,
    match_profile,
    precision_for,
    recommend,
)

GIB = 2**30
MIB = 2**20
SHARED_FIXTURE = REPO.parent / "shared" / "fixtures" / "gpus.json"
LOCAL_FIXTURE = REPO / "tests" / "fixtures" / "gpus.json"


def fixture_rows() -> list[dict]:
    path = SHARED_FIXTURE if SHARED_FIXTURE.is_file() else LOCAL_FIXTURE
    rows = json.loads(path.read_text(encoding="utf-8"))["gpus"]
    assert len(rows) >= 9, f"expected the nine fingerprints in {path}"
    return rows


FIXTURE = {row["name"]: row for row in fixture_rows()}


def fixture_gpu(name: str, index: int = 0) -> GpuInfo:
    row = FIXTURE[name]
    return GpuInfo(index=index, name=row["name"], total_bytes=int(row["total_bytes"]),
                   free_bytes=int(row["total_bytes"]) - 512 * MIB, cc=(row["cc"][0], row["cc"][1]))


def card(name: str, total_bytes: int | None, cc: tuple[int, int] | None, **extra) -> GpuInfo:
    return GpuInfo(index=0, name=name, total_bytes=total_bytes, free_bytes=None, cc=cc, **extra)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def by_name(profiles, name):
    return next(p for p in profiles if p.name == name)


# The tuning guide's "GPU別の推奨設定", transcribed by hand: the profiles must hold exactly these.
GUIDE = {
    "a100-80gb": {
        "training": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "bf16": True,
                     "gradient_checkpointing": False, "optim": "adamw_torch_fused", "dataloader_num_workers": 8},
        "lora": {"r": 64, "lora_alpha": 128},
    },
    "a100-40gb": {
        "training": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "bf16": True,
                     "gradient_checkpointing": True, "optim": "adamw_torch_fused", "dataloader_num_workers": 4},
        "lora": {"r": 32, "lora_alpha": 64},
    },
    "rtx4090": {
        "training": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "bf16": True,
                     "gradient_checkpointing": True, "optim": "adamw_torch_fused", "dataloader_num_workers": 4},
        "lora": {"r": 32, "lora_alpha": 64},
    },
    "rtx3090": {
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "bf16": True,
                     "gradient_checkpointing": True, "optim": "adamw_torch", "dataloader_num_workers": 2},
        "lora": {"r": 16, "lora_alpha": 32},
    },
    "v100-16gb": {
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "fp16": True,
                     "gradient_checkpointing": True, "optim": "adamw_8bit", "dataloader_num_workers": 2},
        "lora": {"r": 16, "lora_alpha": 32},
    },
    "rtx3060-2080ti": {
        "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16, "fp16": True,
                     "gradient_checkpointing": True, "optim": "adamw_8bit", "dataloader_num_workers": 0,
                     "load_best_model_at_end": False},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    },
}

# Each fixture card: (profile, how it matched, precision after adaptation).
FIXTURE_EXPECTED = {
    "NVIDIA H200": ("a100-80gb", "memory", "bf16"),
    "NVIDIA H100 80GB HBM3": ("a100-80gb", "name", "bf16"),
    "NVIDIA A100-SXM4-80GB": ("a100-80gb", "name", "bf16"),
    "NVIDIA A100-SXM4-40GB": ("a100-40gb", "name", "bf16"),
    "NVIDIA GeForce RTX 4090": ("rtx4090", "name", "bf16"),
    "NVIDIA GeForce RTX 3090": ("rtx3090", "name", "bf16"),
    "Tesla V100-SXM2-16GB": ("v100-16gb", "name", "fp16"),
    "NVIDIA GeForce RTX 3060": ("rtx3060-2080ti", "name", "bf16"),
    "NVIDIA GeForce RTX 2080 Ti": ("rtx3060-2080ti", "name", "fp16"),
}


def test_every_fixture_card_has_an_expectation():
    assert set(FIXTURE) == set(FIXTURE_EXPECTED)


def test_the_six_guide_profiles_and_cpu_are_installed(profiles):
    assert {p.name for p in profiles} == set(GUIDE) | {"cpu"}


@pytest.mark.parametrize("profile_name", sorted(GUIDE))
def test_profile_settings_are_exactly_the_guide(profiles, profile_name):
    assert by_name(profiles, profile_name).settings == GUIDE[profile_name]


@pytest.mark.parametrize("gpu_name", sorted(FIXTURE_EXPECTED))
def test_fixture_card_matches_its_profile(profiles, gpu_name):
    expected_profile, how, _ = FIXTURE_EXPECTED[gpu_name]
    match = match_profile([fixture_gpu(gpu_name)], profiles)
    assert match.profile.name == expected_profile
    assert match.warnings == []
    (reason,) = match.reasons
    if how == "name":
        assert reason == f"`{gpu_name}` matches profile `{expected_profile}` ({match.profile.title}) by name"
    else:
        assert "is not named by any profile: nearest tier by memory" in reason
        assert f"`{expected_profile}` ({match.profile.title})" in reason
    # The matched profile carries the guide's values, untouched.
    assert match.profile.settings == GUIDE[expected_profile]


def test_h200_is_placed_by_memory_tier_with_its_size(profiles):
    match = match_profile([fixture_gpu("NVIDIA H200")], profiles)
    assert match.reasons == ["`NVIDIA H200` is not named by any profile: nearest tier by memory (140.4 GiB) "
                             "is `a100-80gb` (A100 / H100 (80GB VRAM))"]


@pytest.mark.parametrize("gpu_name", sorted(FIXTURE_EXPECTED))
def test_fixture_card_recommendation_keeps_guide_values_but_precision_from_cc(profiles, gpu_name):
    expected_profile, _, precision = FIXTURE_EXPECTED[gpu_name]
    rec = recommend([fixture_gpu(gpu_name)], profiles=profiles, bnb_available=True)
    cfg = rec.config
    assert rec.profile.name == expected_profile
    assert (cfg.training.bf16, cfg.training.fp16) == (precision == "bf16", precision == "fp16")
    table = GUIDE[expected_profile]
    for key, value in table["training"].items():
        if key not in ("bf16", "fp16"):
            assert getattr(cfg.training, key) == value, key
    for key, value in table["lora"].items():
        assert getattr(cfg.lora, key) == value, key
    assert rec.resolved.pinned == set()


# --------------------------------------------------------------- precision ---

@pytest.mark.parametrize("cc, precision", [
    (None, "fp32"), ((6, 1), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"),
    ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16"), ((12, 0), "bf16"),
])
def test_precision_from_compute_capability(cc, precision):
    assert precision_for(cc) == precision


def test_rtx3060_gets_bf16_though_the_guide_says_fp16_and_says_why(profiles):
    gpu = fixture_gpu("NVIDIA GeForce RTX 3060")
    settings, reasons = adapt_to_hardware(by_name(profiles, "rtx3060-2080ti").settings, [gpu], bnb_available=True)
    assert settings["training"]["bf16"] is True
    assert settings["training"]["fp16"] is False
    assert reasons[0] == ("precision bf16 instead of the table's fp16: compute capability 8.6 "
                          "(bf16 available on >= 8.0)")


@pytest.mark.parametrize("gpu_name", ["Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 2080 Ti"])
def test_volta_and_turing_keep_fp16(profiles, gpu_name):
    gpu = fixture_gpu(gpu_name)
    match = match_profile([gpu], profiles)
    settings, reasons = adapt_to_hardware(match.profile.settings, [gpu], bnb_available=True)
    assert (settings["training"]["bf16"], settings["training"]["fp16"]) == (False, True)
    cc = f"{gpu.cc[0]}.{gpu.cc[1]}"
    assert reasons[0] == f"precision fp16 (compute capability {cc})"


def test_cpu_gets_cpu_profile_in_fp32(profiles):
    match = match_profile([], profiles)
    assert match.profile.name == "cpu"
    assert match.reasons == ["no GPU visible: profile `cpu` (fp32, small LoRA)"]
    rec = recommend([], profiles=profiles)
    assert (rec.config.training.bf16, rec.config.training.fp16) == (False, False)
    assert rec.config.training.optim == "adamw_torch_fused"


def test_a_bf16_table_on_cpu_falls_to_fp32_with_a_reason():
    settings, reasons = adapt_to_hardware({"training": {"bf16": True}}, [])
    assert (settings["training"]["bf16"], settings["training"]["fp16"]) == (False, False)
    assert reasons == ["precision fp32 instead of the table's bf16: no GPU (bf16 needs >= 8.0)"]


def test_unknown_compute_capability_is_fp32_with_a_reason():
    gpu = card("NVIDIA Mystery", 24 * GIB, None)
    settings, reasons = adapt_to_hardware({"training": {"fp16": True}}, [gpu])
    assert (settings["training"]["bf16"], settings["training"]["fp16"]) == (False, False)
    assert reasons == ["precision fp32 instead of the table's fp16: compute capability unknown "
                       "(mixed precision needs a GPU >= 7.0)"]


def test_mixed_cards_take_the_lowest_compute_capability():
    gpus = [fixture_gpu("NVIDIA A100-SXM4-80GB", 0), fixture_gpu("Tesla V100-SXM2-16GB", 1)]
    settings, _ = adapt_to_hardware({"training": {"bf16": True}}, gpus)
    assert (settings["training"]["bf16"], settings["training"]["fp16"]) == (False, True)


def test_user_pinned_bf16_on_volta_is_kept_with_a_warning(profiles):
    rec = recommend([fixture_gpu("Tesla V100-SXM2-16GB")], sets=["training.bf16=true"],
                    profiles=profiles, bnb_available=True)
    assert (rec.config.training.bf16, rec.config.training.fp16) == (True, False)
    assert any("no native bf16" in w for w in rec.warnings)
    assert "`training.bf16` pinned by you" in rec.reasons


# --------------------------------------------------------------- optimizer ---

def test_fused_optimizer_stays_on_cpu():
    """torch's fused AdamW has a CPU kernel (torch >= 2.4): nothing to fall back from."""
    settings, reasons = adapt_to_hardware({"training": {"optim": "adamw_torch_fused"}}, [])
    assert settings["training"]["optim"] == "adamw_torch_fused"
    assert not any("optimizer" in r for r in reasons)


def test_fused_optimizer_stays_on_a_gpu(profiles):
    gpu = fixture_gpu("NVIDIA A100-SXM4-40GB")
    settings, _ = adapt_to_hardware(by_name(profiles, "a100-40gb").settings, [gpu])
    assert settings["training"]["optim"] == "adamw_torch_fused"


def test_eight_bit_falls_back_without_bitsandbytes(profiles):
    gpu = fixture_gpu("Tesla V100-SXM2-16GB")
    settings, reasons = adapt_to_hardware(by_name(profiles, "v100-16gb").settings, [gpu], bnb_available=False)
    assert settings["training"]["optim"] == "adamw_torch"
    assert ("optimizer adamw_torch instead of adamw_8bit: bitsandbytes is not installed "
            "(`pip install bitsandbytes`)") in reasons


def test_eight_bit_kept_with_bitsandbytes(profiles):
    gpu = fixture_gpu("NVIDIA GeForce RTX 2080 Ti")
    settings, reasons = adapt_to_hardware(by_name(profiles, "rtx3060-2080ti").settings, [gpu], bnb_available=True)
    assert settings["training"]["optim"] == "adamw_8bit"
    assert any(r.startswith("optimizer adamw_8bit: ") for r in reasons)


def test_eight_bit_falls_back_on_cpu_even_with_bitsandbytes():
    settings, reasons = adapt_to_hardware({"training": {"optim": "paged_adamw_8bit"}}, [], bnb_available=True)
    assert settings["training"]["optim"] == "adamw_torch"
    assert "optimizer adamw_torch instead of paged_adamw_8bit: no GPU" in reasons


def test_adapting_does_not_touch_the_profile(profiles):
    profile = by_name(profiles, "v100-16gb")
    before = json.dumps(profile.settings, sort_keys=True)
    adapt_to_hardware(profile.settings, [], bnb_available=False)
    assert json.dumps(profile.settings, sort_keys=True) == before


def test_pinned_eight_bit_is_kept_but_warned_when_it_cannot_run(profiles):
    gpu = fixture_gpu("NVIDIA GeForce RTX 3060")
    rec = recommend([gpu], sets=["training.optim=adamw_8bit"], profiles=profiles, bnb_available=False)
    assert rec.config.training.optim == "adamw_8bit"
    assert ("`training.optim` is pinned to adamw_8bit but bitsandbytes is not installed "
            "(`pip install bitsandbytes`), so training would fail: use `--set training.optim=adamw_torch`"
            ) in rec.warnings
    rec = recommend([gpu], sets=["training.optim=adamw_8bit"], profiles=profiles, bnb_available=True)
    assert not any("pinned to adamw_8bit" in w for w in rec.warnings)


# ---------------------------------------------------------- unnamed cards ---

@pytest.mark.parametrize("name, total_bytes, cc, profile_name, precision", [
    ("NVIDIA L4", 23034 * MIB, (8, 9), "rtx3090", "bf16"),
    ("Tesla T4", 15 * GIB, (7, 5), "v100-16gb", "fp16"),
    ("NVIDIA GeForce RTX 5090", 32 * 10**9, (12, 0), "rtx3090", "bf16"),
    ("NVIDIA B200", 180 * 10**9, (10, 0), "a100-80gb", "bf16"),
    ("NVIDIA H100 NVL", 95830 * MIB, (9, 0), "a100-80gb", "bf16"),
    ("NVIDIA RTX A6000", 48 * GIB, (8, 6), "a100-40gb", "bf16"),
])
def test_unnamed_cards_fall_into_their_memory_tier(profiles, name, total_bytes, cc, profile_name, precision):
    gpu = card(name, total_bytes, cc)
    match = match_profile([gpu], profiles)
    assert match.profile.name == profile_name
    assert match.warnings == []
    rec = recommend([gpu], profiles=profiles, bnb_available=True)
    assert (rec.config.training.bf16, rec.config.training.fp16) == (precision == "bf16", precision == "fp16")


def test_unnamed_card_reason_names_the_tier_and_the_memory(profiles):
    match = match_profile([card("Tesla T4", 15 * GIB, (7, 5))], profiles)
    assert match.reasons == ["`Tesla T4` is not named by any profile: nearest tier by memory (15.0 GiB) "
                             "is `v100-16gb` (V100 (16GB VRAM))"]


def test_unknown_24gb_card_gets_the_careful_3090_tier_not_4090(profiles):
    assert match_profile([card("NVIDIA L4", 23034 * MIB, (8, 9))], profiles).profile.name == "rtx3090"


def test_small_laptop_card_gets_smallest_tier_with_a_warning(profiles):
    gpu = card("NVIDIA GeForce RTX 4050 Laptop GPU", 6141 * MIB, (8, 9))
    match = match_profile([gpu], profiles)
    assert match.profile.name == "rtx3060-2080ti"
    assert match.warnings == [
        "`NVIDIA GeForce RTX 4050 Laptop GPU` has only 6.0 GiB, below the smallest tier (8 GB): "
        "the dry run will shrink the plan, and may need `--set model.load_in_4bit=true`"
    ]


def test_card_without_memory_reading_gets_the_smallest_tier_with_a_warning(profiles):
    match = match_profile([card("NVIDIA Mystery", None, (8, 0))], profiles)
    assert match.profile.name == "rtx3060-2080ti"
    assert match.warnings == ["`NVIDIA Mystery` did not report its memory: using the smallest tier `rtx3060-2080ti`"]


def test_mig_slice_is_placed_by_its_memory_not_the_cards_name(profiles):
    gpu = card("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40 * GIB, (8, 0), is_mig_slice=True, mig_mode=True)
    match = match_profile([gpu], profiles)
    assert match.profile.name == "a100-40gb"
    (reason,) = match.reasons
    assert reason.startswith("MIG slice `NVIDIA A100-SXM4-80GB MIG 3g.40gb` is not named by any profile: "
                             "nearest tier by memory (40.0 GiB) is `a100-40gb`")


def test_small_mig_slice_of_a_40gb_card_is_not_the_40gb_profile(profiles):
    gpu = card("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19968 * MIB, (8, 0), is_mig_slice=True, mig_mode=True)
    assert match_profile([gpu], profiles).profile.name == "v100-16gb"


# ------------------------------------------------------------ several GPUs ---

def test_several_identical_gpus_match_by_name_and_say_how_many(profiles):
    gpus = [fixture_gpu("NVIDIA GeForce RTX 4090", i) for i in range(4)]
    match = match_profile(gpus, profiles)
    assert match.profile.name == "rtx4090"
    assert match.warnings == []
    assert match.reasons == ["`NVIDIA GeForce RTX 4090` (smallest of 4 GPUs) matches profile `rtx4090` "
                             "(RTX 4090 (24GB VRAM)) by name"]


def test_mixed_gpus_the_smallest_decides_with_a_warning(profiles):
    gpus = [fixture_gpu("NVIDIA H100 80GB HBM3", 0), fixture_gpu("NVIDIA GeForce RTX 3090", 1),
            fixture_gpu("NVIDIA A100-SXM4-40GB", 2)]
    match = match_profile(gpus, profiles)
    assert match.profile.name == "rtx3090"
    assert match.warnings == [
        "mixed GPU models (NVIDIA A100-SXM4-40GB, NVIDIA GeForce RTX 3090, NVIDIA H100 80GB HBM3): "
        "planning for the smallest, the others idle part of their memory"
    ]
    assert match.reasons[0].startswith("`NVIDIA GeForce RTX 3090` (smallest of 3 GPUs) matches profile `rtx3090`")


def test_every_fixture_card_at_once_plans_for_the_2080ti(profiles):
    gpus = [fixture_gpu(name, i) for i, name in enumerate(FIXTURE)]
    rec = recommend(gpus, profiles=profiles, bnb_available=True)
    assert rec.profile.name == "rtx3060-2080ti"
    assert (rec.config.training.bf16, rec.config.training.fp16) == (False, True)
    assert any(w.startswith("mixed GPU models (") for w in rec.warnings)


def test_probe_through_fake_nvml_then_match(profiles):
    # End to end without a GPU: fake NVML -> probe -> GpuInfo -> profile.
    sys.path.insert(0, str(REPO / "tests"))
    import fake_nvml

    from autotune.hardware import probe

    result = probe(env={}, nvml=fake_nvml.FakeNvml([fake_nvml.fixture_gpu("NVIDIA H200")]))
    assert [g.name for g in result.gpus] == ["NVIDIA H200"]
    assert match_profile(result.gpus, profiles).profile.name == "a100-80gb"


# ------------------------------------------------------------------- other ---

def test_no_cpu_profile_is_a_clear_error(profiles):
    gpu_only = [p for p in profiles if not p.match.cpu]
    with pytest.raises(AutotuneError) as excinfo:
        match_profile([], gpu_only)
    assert str(excinfo.value) == "no CPU profile is installed: restore `autotune/profiles/cpu.yaml`"


def test_empty_profile_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AutotuneError) as excinfo:
        load_profiles(tmp_path)
    assert str(excinfo.value) == f"no profiles found in `{tmp_path}`: reinstall the package or restore `autotune/profiles/`"


def test_recommendation_json_shape(profiles):
    rec = recommend([fixture_gpu("NVIDIA GeForce RTX 4090")], sets=["lora.r=4"], profiles=profiles)
    data = rec.to_dict()
    assert set(data) == {"gpus", "profile", "config", "pinned", "reasons", "warnings"}
    assert data["profile"] == {"name": "rtx4090", "title": "RTX 4090 (24GB VRAM)"}
    assert data["gpus"][0]["cc"] == [8, 9]
    assert data["config"]["lora"]["r"] == 4
    assert data["pinned"] == ["lora.r"]
    json.dumps(data)


@pytest.mark.parametrize("cap, profile_name", [(24, "rtx3090"), (12, "rtx3060-2080ti"), (8, "rtx3060-2080ti"),
                                               (40, "a100-40gb")])
def test_a_memory_cap_plans_as_for_a_card_of_that_size(profiles, cap, profile_name):
    # The benchmark's "24, 12 and 8 GiB caps" stand in for smaller cards: the guide's
    # profile for such a card, with the real card's compute capability (bf16 on an H200).
    rec = recommend([fixture_gpu("NVIDIA H200")], profiles=profiles, bnb_available=True,
                    sets=[f"autotune.vram_limit_gib={cap}"])
    assert rec.profile.name == profile_name
    assert any("planning as for a card of that size" in r for r in rec.reasons)
    assert rec.config.training.bf16
    assert rec.config.autotune.vram_limit_gib == cap


def test_a_cap_above_the_card_changes_nothing(profiles):
    plain = recommend([fixture_gpu("NVIDIA GeForce RTX 4090")], profiles=profiles, bnb_available=True)
    capped = recommend([fixture_gpu("NVIDIA GeForce RTX 4090")], profiles=profiles, bnb_available=True,
                       sets=["autotune.vram_limit_gib=48"])
    assert capped.profile.name == plain.profile.name == "rtx4090"
    assert not any("planning as for" in r for r in capped.reasons)
