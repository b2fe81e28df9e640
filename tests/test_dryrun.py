"""The back-off ladder, with out-of-memory faked by raising the real exception type."""

from __future__ import annotations

import pytest
import torch

from autotune.errors import AutotuneError
from autotune.memory import is_oom
from autotune.plan import COMPILE_MODE, Plan, faster_candidates, next_rung
from autotune.tuning.ladder import Measurement, search

GIB = 2 ** 30

# Short names for the plan's dotted config keys, to keep the tests readable.
KEYS = {"per_device_train_batch_size": "training.per_device_train_batch_size",
        "gradient_accumulation_steps": "training.gradient_accumulation_steps",
        "gradient_checkpointing": "training.gradient_checkpointing", "lean_loss": "training.lean_loss",
        "optim": "training.optim", "lora_r": "lora.r", "lora_alpha": "lora.lora_alpha",
        "load_in_4bit": "model.load_in_4bit", "max_length": "data.max_length",
        "torch_compile": "training.torch_compile", "use_liger_kernel": "training.use_liger_kernel",
        "packing": "data.packing"}


def plan(precision: str = "bf16", **changes) -> Plan:
    values = {"training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 2,
              "training.bf16": precision == "bf16", "training.fp16": precision == "fp16",
              "training.gradient_checkpointing": False, "training.lean_loss": False,
              "training.optim": "adamw_torch_fused", "lora.r": 64, "lora.lora_alpha": 128,
              "lora.target_modules": ["q_proj", "v_proj"], "model.load_in_4bit": False, "data.max_length": 2048,
              "training.torch_compile": False, "training.use_liger_kernel": False, "data.packing": False,
              COMPILE_MODE: None}
    values.update({KEYS[name]: value for name, value in changes.items()})
    return Plan.of(values)


def get(p: Plan, name: str):
    return p[KEYS[name]]


class FakeGpu:
    """Peak memory as a function of the plan; over the card's memory raises the real OOM."""

    def __init__(self, total_gib: float):
        self.total = total_gib * GIB
        self.tried: list[Plan] = []

    def peak(self, p: Plan) -> float:
        per_row = (1.0 if get(p, "gradient_checkpointing") else 4.0) + (1.0 if get(p, "lean_loss") else 6.0)
        weights = 1.0 if get(p, "load_in_4bit") else 3.0
        return (weights + per_row * get(p, "per_device_train_batch_size") * get(p, "max_length") / 2048 + get(p, "lora_r") / 64) * GIB

    def __call__(self, p: Plan) -> Measurement:
        self.tried.append(p)
        peak = self.peak(p)
        if peak > self.total:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {peak / GIB:.2f} GiB")
        speed = 1000 * get(p, "per_device_train_batch_size") ** 0.3 * (0.7 if get(p, "gradient_checkpointing") else 1.0)
        return Measurement(int(peak), speed, 0.1)


def no_free():
    pass


def test_exact_rungs_tried_and_constant_effective_batch():
    gpu = FakeGpu(total_gib=10)
    result = search(plan(), gpu, pinned=set(), time_plans=False, free=no_free)
    labels = [(get(a.plan, "per_device_train_batch_size"), get(a.plan, "gradient_accumulation_steps"),
               get(a.plan, "gradient_checkpointing"), get(a.plan, "lean_loss")) for a in result.attempts]
    assert labels == [(4, 2, False, False), (2, 4, False, False), (1, 8, False, False), (1, 8, True, False),
                      (1, 8, True, True)]
    assert [a.ok for a in result.attempts] == [False, False, False, False, True]
    assert {a.plan.effective_batch_size for a in result.attempts} == {8}
    assert result.plan == plan(per_device_train_batch_size=1, gradient_accumulation_steps=8,
                               gradient_checkpointing=True, lean_loss=True)
    assert "OutOfMemoryError" in result.attempts[0].error


def test_pinned_keys_are_never_moved():
    gpu = FakeGpu(total_gib=12)
    pinned = {"training.per_device_train_batch_size", "training.gradient_checkpointing"}
    result = search(plan(), gpu, pinned=pinned, time_plans=False, free=no_free,
                    ctx={"cuda": True, "bitsandbytes": True})
    assert all(get(a.plan, "per_device_train_batch_size") == 4 for a in result.attempts)
    assert all(not get(a.plan, "gradient_checkpointing") for a in result.attempts)
    # lean loss, then 8-bit optimizer, then smaller ranks, then 4-bit weights, then shorter samples
    assert [a.why for a in result.attempts][:4] == ["starting plan (profile < your config < --set)", "lean loss",
                                                     "8-bit optimizer", "smaller LoRA rank"]
    assert result.attempts[-1].ok


def test_nothing_fits_names_what_was_tried_and_pinned_keys():
    gpu = FakeGpu(total_gib=2)
    with pytest.raises(AutotuneError) as err:
        search(plan(), gpu, pinned={"model.load_in_4bit", "data.max_length"}, time_plans=False, free=no_free)
    text = err.value.one_line()
    assert "no plan fits this GPU after" in text
    assert "`model.load_in_4bit`" in text and "`data.max_length`" in text
    assert "4-bit weights" in text and "shorter `data.max_length`" in text
    assert len(gpu.tried) < 20  # bounded


def test_attempts_are_bounded():
    gpu = FakeGpu(total_gib=0.5)
    with pytest.raises(AutotuneError):
        search(plan(), gpu, pinned=set(), max_attempts=3, time_plans=False, free=no_free)
    assert len(gpu.tried) == 3


def test_errors_that_are_not_oom_are_raised_not_retried():
    calls = []

    def broken(p):
        calls.append(p)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        search(plan(), broken, pinned=set(), free=no_free)
    assert len(calls) == 1

    def typo(p):
        calls.append(p)
        raise KeyError("input_ids")

    with pytest.raises(KeyError):
        search(plan(), typo, pinned=set(), free=no_free)
    assert len(calls) == 2


def test_oom_detection_by_type_then_message():
    assert is_oom(torch.OutOfMemoryError("x"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_oom(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_oom(ValueError("out of memory"))  # not a runtime error from the allocator


def test_memory_freed_outside_the_handler():
    # free() must run after the except block: by then no traceback holds the frame.
    seen = []

    def measure(p):
        if get(p, "per_device_train_batch_size") > 2:
            big = torch.zeros(10)  # noqa: F841 - a tensor the failed step holds
            raise torch.OutOfMemoryError("CUDA out of memory")
        return Measurement(GIB, 1.0, 0.1)

    import sys

    def free():
        seen.append(sys.exc_info()[0])

    search(plan(), measure, pinned=set(), time_plans=False, free=free)
    assert seen == [None]


def test_safety_margin_rejects_a_plan_that_fits_the_card_but_not_the_budget():
    gpu = FakeGpu(total_gib=40)
    budget = int(0.9 * 20 * GIB)
    start = plan(per_device_train_batch_size=2, gradient_accumulation_steps=4)  # 24 GiB: fits 40, not 18
    result = search(start, gpu, pinned=set(), time_plans=False, free=no_free, budget_bytes=budget)
    assert not result.attempts[0].ok and "safety margin" in result.attempts[0].error
    assert result.attempts[-1].peak_bytes <= budget


def test_time_plans_picks_the_fastest_that_fits():
    gpu = FakeGpu(total_gib=80)
    start = plan(gradient_checkpointing=True, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    result = search(start, gpu, pinned=set(), time_plans=True, free=no_free)
    assert get(result.plan, "gradient_checkpointing") is False
    assert get(result.plan, "per_device_train_batch_size") > 2
    assert result.plan.effective_batch_size == 8
    assert "fastest that fits" in result.reason


def test_ladder_rungs_are_pure_functions():
    assert get(next_rung(plan(per_device_train_batch_size=3, gradient_accumulation_steps=4), set())[1],
               "per_device_train_batch_size") == 2  # 12 = 2 x 6: the largest smaller divisor keeps the effective batch
    lowest = plan(per_device_train_batch_size=1, gradient_accumulation_steps=8, gradient_checkpointing=True,
                  lean_loss=True, optim="adamw_8bit", lora_r=4, load_in_4bit=True, max_length=512)
    assert next_rung(lowest, set(), {"cuda": True, "bitsandbytes": True}) is None
    assert [name for name, _ in faster_candidates(plan(gradient_checkpointing=True), set())] == \
        ["checkpointing off", "larger micro-batch", "packed rows"]
    assert faster_candidates(plan(), {"training.per_device_train_batch_size", "training.gradient_checkpointing",
                                      "data.packing"}) == []


def test_plan_apply_round_trips_through_the_config():
    from autotune.config import resolve_config

    config = resolve_config({}).config
    p = plan(per_device_train_batch_size=2, gradient_accumulation_steps=4, precision="fp16")
    applied = p.apply(config)
    assert Plan.from_config(applied) == p
    assert applied.training.fp16 and not applied.training.bf16
    assert Plan.from_record(p.to_dict()) == p
    # A plan recorded by an earlier version, with flat names, still reads.
    old = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "processes": 1, "precision": "fp16",
           "gradient_checkpointing": False, "lean_loss": False, "optim": "adamw_torch_fused", "lora_r": 64,
           "lora_alpha": 128, "lora_target_modules": ["q_proj", "v_proj"], "load_in_4bit": False, "max_length": 2048}
    assert Plan.from_record(old) == p


def test_shorter_max_length_always_drops_the_longest_samples():
    from autotune.plan import RUNGS

    _shorter = dict((name, step) for name, _, step in RUNGS)["shorter max length (skips longer samples)"]

    p = plan(max_length=2048)
    assert get(_shorter(p, {"longest_tokens": 1400}), "max_length") == 1024
    assert get(_shorter(p, {"longest_tokens": 700}), "max_length") == 699   # halving alone would drop nothing
    assert _shorter(p, {"longest_tokens": 400}) is None             # below the shortest useful length


def test_compile_and_liger_are_tried_where_they_run_and_compile_time_counts_against_the_run():
    from autotune.tuning.ladder import Attempt, run_time

    candidates = faster_candidates(plan(), set(), {"compile": True, "liger": True})
    assert [name for name, _ in candidates][-2:] == ["liger on", "compile on"]
    assert get(candidates[-1][1], "packing"), "a compiled step packs its rows: few shapes"
    assert not get(faster_candidates(plan(), {"data.packing"}, {"compile": True})[-1][1], "packing")
    assert [n for n, _ in faster_candidates(plan(), set(), {})] == ["larger micro-batch", "packed rows"]
    assert faster_candidates(plan(), {"training.torch_compile"}, {"compile": True})[-1][0] != "compile on"
    eager = Attempt(plan(), "x", True, tokens_per_second=1000.0, overhead_seconds=1.0)
    compiled = Attempt(plan(torch_compile=True), "x", True, tokens_per_second=1500.0, overhead_seconds=60.0)
    # a short run: 60 s of compiling costs more than it saves; a long one: it pays.
    assert run_time(compiled, 30_000) > run_time(eager, 30_000)
    assert run_time(compiled, 3_000_000) < run_time(eager, 3_000_000)

    class Speeds:
        def __call__(self, p):
            if get(p, "torch_compile"):
                return Measurement(GIB, 1500.0, 1.0, overhead_seconds=60.0)
            return Measurement(GIB, 1000.0, 1.0, overhead_seconds=1.0)

    start = plan(per_device_train_batch_size=8, gradient_accumulation_steps=1)
    short = search(start, Speeds(), pinned=set(), ctx={"compile": True, "run_tokens": 30_000}, free=no_free)
    long = search(start, Speeds(), pinned=set(), ctx={"compile": True, "run_tokens": 3_000_000}, free=no_free)
    assert not get(short.plan, "torch_compile") and get(long.plan, "torch_compile")


def test_a_plan_is_applied_as_set_would_be_and_its_values_are_validated():
    from autotune.config import resolve_config

    config = resolve_config({}).config
    assert plan(lora_r=16).apply(config).lora.r == 16
    with pytest.raises(AutotuneError) as caught:
        plan(lora_r=0).apply(config)   # the schema's own check, as for `--set lora.r=0`
    assert any("`lora.r`" in d for d in caught.value.details)


def test_cuda_graphs_are_offered_once_a_compiled_step_packs_its_rows():
    """reduce-overhead replays one recorded graph per shape: only for packed rows (a few bucketed
    shapes), and only on CUDA."""
    def names(p, ctx):
        return [n for n, _ in faster_candidates(p, set(), ctx)]

    packed_compiled = plan(torch_compile=True, packing=True)
    assert "CUDA graphs" in names(packed_compiled, {"cuda_graphs": True})
    assert "CUDA graphs" not in names(plan(torch_compile=True), {"cuda_graphs": True})   # padded rows: many shapes
    assert "CUDA graphs" not in names(packed_compiled, {})                            # no CUDA here
    graphs = dict(faster_candidates(packed_compiled, set(), {"cuda_graphs": True}))["CUDA graphs"]
    assert graphs[COMPILE_MODE] == "reduce-overhead" and "compiled (reduce-overhead)" in graphs.label()
    pinned = [n for n, _ in faster_candidates(packed_compiled, {COMPILE_MODE}, {"cuda_graphs": True})]
    assert "CUDA graphs" not in pinned
