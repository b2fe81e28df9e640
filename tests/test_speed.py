"""A fast step, checked on the CPU: nothing in a training step waits for the device (but at
logging steps), token-budget micro-batches train exactly what fixed ones do in fewer calls,
and a compiled step gives the same loss with recompiles bounded by the padding buckets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autotune.batches import BUCKET_TOKENS, LlasaCollator, TokenBudgetCollator, build_examples, host_counts
from autotune.llasa import PromptBuilder, build_tiny_model, build_tiny_tokenizer
from autotune.reading import Sample
from tests.tiny_runs import TINY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "examples" / "tiny"
FAST = ["--data", str(DATA), *TINY,
        "--set", "training.eval_strategy=no", "--set", "training.report_to=none"]


def train(*argv: str) -> int:
    from train import main

    return main([*FAST, *argv])


def test_a_training_step_waits_for_the_device_only_at_logging_steps(tmp_path):
    """bench/syncs.py's probe over the real pipeline: no read of a device value, no data-dependent
    shape, no blocking host-to-device copy in a step that does not log (the CPU stands in for the
    device: a collated batch is host memory). Steps that log read the loss and the NaN guard's
    verdicts, on purpose."""
    from bench.syncs import probe_pipeline

    steps = probe_pipeline([*FAST, "--output-dir", str(tmp_path / "run"), "--set", "training.max_steps=6",
                            "--set", "training.logging_steps=3", "--set", "training.save_steps=6",
                            "--set", "training.optim=adamw_torch_fused",
                            # as a GPU profile has it (the CPU profile turns pinning off)
                            "--set", "training.dataloader_pin_memory=true",
                            "--set", "training.per_device_train_batch_size=2",
                            "--set", "training.gradient_accumulation_steps=2"], "cpu")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    # Step 1 builds the optimizer; steps 3 and 6 log (and 6 saves).
    quiet = {s["step"]: s["sites"] for s in steps if s["step"] in (2, 4, 5)}
    assert not any(s["logs"] for s in steps if s["step"] in (2, 4, 5))
    assert quiet == {2: {}, 4: {}, 5: {}}
    assert all(s["launches"] > 100 for s in steps), "the probe sees the step's kernels"
    assert any(s["by_kind"].get("item") for s in steps if s["step"] in (3, 6)), \
        "the check itself must see the logging steps' reads"


@pytest.mark.slow
def test_a_nan_step_is_skipped_on_the_device_and_rolled_back_after_patience(tmp_path, monkeypatch):
    """The fused optimizer's device-side skip: a NaN step moves no weight, and `nan_patience`
    of them in a row still roll back, found at the next logging step."""
    from autotune.training import trainer as T

    real = T.LlasaTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step + 1 in (3, 4) and self.args.learning_rate > 3e-3:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(T.LlasaTrainer, "compute_loss", compute_loss)
    out = tmp_path / "run"
    assert train("--output-dir", str(out), "--set", "training.max_steps=6", "--set", "training.logging_steps=2",
                 "--set", "training.save_steps=2", "--set", "training.nan_patience=2", "--set",
                 "training.learning_rate=5e-3", "--set", "training.optim=adamw_torch_fused") == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["nonfinite_steps_skipped"][:2] == [3, 4]
    [rollback] = summary["nan_rollbacks"]
    assert rollback["resumed_from"].endswith("checkpoint-2") and rollback["learning_rate"] == 2.5e-3
    assert summary["steps"] == 6


def samples(lengths: list[int]) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(text=f"text {i}", source=f"s:{i}", codes=rng.integers(0, 65536, n).astype(np.int32))
            for i, n in enumerate(lengths)]


def test_token_budget_micro_batches_fill_to_the_budget_and_keep_every_sample():
    builder = PromptBuilder(build_tiny_tokenizer())
    examples = build_examples(samples([300, 40, 35, 60, 30, 45, 50, 38]), builder)
    rows = LlasaCollator(builder.tokens.pad)
    longest = max(len(e["input_ids"]) for e in examples)
    collator = TokenBudgetCollator(rows, 2 * rows.width([longest]))   # a plan of micro-batch 2
    batch = collator(examples)
    parts = batch["micro_batches"]
    assert len(parts) < len(examples) // 2, "short rows share a micro-batch"
    assert sum(p["input_ids"].shape[0] for p in parts) == len(examples)
    assert all(p["input_ids"].numel() <= collator.budget or p["input_ids"].shape[0] == 1 for p in parts)
    assert batch["num_labels"] == sum(int((e["labels"][i + 1] != -100)) for e in examples
                                      for i in range(len(e["labels"]) - 1))


def test_host_counts_are_the_labelled_positions_the_loss_would_find():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    counts = host_counts(labels, attention_tokens=7)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    assert counts["label_positions"].tolist() == (shifted != -100).nonzero().squeeze(1).tolist() == [1, 2, 5]
    assert counts["num_labels"] == 3 and counts["num_tokens"] == 7


@pytest.mark.slow
def test_token_budget_steps_train_what_fixed_micro_batches_do(tmp_path):
    """The same samples per step and the same loss normalisation: the adapters agree."""
    from safetensors.torch import load_file

    common = ["--set", "training.max_steps=3", "--set", "training.save_steps=3", "--set", "training.logging_steps=1",
              "--set", "training.per_device_train_batch_size=2", "--set", "training.gradient_accumulation_steps=4",
              "--set", "training.learning_rate=5e-3", "--set", "lora.lora_dropout=0"]
    a, b = tmp_path / "budget", tmp_path / "fixed"
    assert train("--output-dir", str(a), *common) == 0
    assert train("--output-dir", str(b), *common, "--set", "data.token_budget=false") == 0
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        assert torch.allclose(x[key], y[key], atol=2e-5), key
    loss = lambda run: [h["loss"] for h in json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
                        ["log_history"] if "loss" in h]
    assert loss(a) == pytest.approx(loss(b), abs=1e-4)


@pytest.mark.slow
def test_a_compiled_step_gives_the_same_loss_on_packed_bucketed_rows():
    from autotune.batches import TokenBudgetCollator, make_collator, with_4d_mask
    from autotune.loss import compute_lean_loss
    from bench.syncs import mix_examples

    torch._dynamo.reset()
    builder, examples = mix_examples(16)
    rows = make_collator(builder.tokens.pad, True, builder.tokens.hidden_from_attention, compiled=True)
    step = TokenBudgetCollator(rows, 4 * rows.width([max(len(e["input_ids"]) for e in examples)]))
    model = build_tiny_model()
    compiled = torch.compile(model, backend="aot_eager")
    for start in (0, 8):
        for part in step(examples[start:start + 8])["micro_batches"]:
            assert part["input_ids"].shape[1] % BUCKET_TOKENS == 0
            inputs = with_4d_mask({k: v for k, v in part.items() if k not in ("num_tokens", "num_labels")})
            eager_loss, _ = compute_lean_loss(model, inputs)
            compiled_loss, _ = compute_lean_loss(compiled, inputs)
            assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_recompiles_over_50_micro_batches_of_a_realistic_mix_stay_within_the_buckets():
    """Static shapes (what CUDA graphs need): one compile per distinct shape, and packed rows padded
    to multiples of BUCKET_TOKENS have at most budget / BUCKET_TOKENS of them, however long the run."""
    from bench.syncs import count_recompiles

    counted = count_recompiles(50)
    assert counted["micro_batches"] == 50
    assert counted["compiles"] == counted["distinct_shapes"] <= counted["buckets"]


def test_steady_tokens_per_second_leaves_out_the_warm_up_and_counts_the_final_restart(monkeypatch):
    # Logs every 5 steps; the first 10 steps are slow (compilation), then 100 tokens per
    # step at 10 steps/s. HF's auto_find_batch_size restarts training after an OOM: the
    # failed attempt's steps count for nothing.
    from types import SimpleNamespace

    from autotune.training import callbacks

    clock = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock["now"])
    trainer = SimpleNamespace(tokens_seen=0)
    cb = callbacks.ThroughputCallback(trainer, processes=1)

    def log_after(step, seconds, tokens):
        clock["now"] += seconds
        trainer.tokens_seen += tokens
        cb.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": 1.0})

    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    log_after(5, 60.0, 500)            # an attempt that ran out of memory: thrown away
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    log_after(5, 30.0, 500)            # warm-up
    log_after(10, 10.0, 500)           # warm-up
    for step in range(15, 65, 5):
        log_after(step, 0.5, 500)
    rate, steps = cb.steady(warmup_steps=10)
    assert steps == 50
    assert rate == pytest.approx(1000.0)
    assert cb.overall() == pytest.approx(6000 / 45.0)   # this restart only, warm-up included
    assert cb.steady(warmup_steps=100) == (None, 0)


@pytest.mark.slow
def test_the_benchmark_reports_steady_timed_steps_on_the_cpu(tmp_path):
    # The documented CPU smoke path of bench/autotune.py, shortened: the real pipeline, the
    # warm-up left out, exactly the timed steps counted; auto_find starts small on a CPU.
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "autotune.py"), "--shape", "tiny", "--device", "cpu",
                           "--limits", "0", "--samples", "40", "--warmup", "2", "--timed", "4",
                           "--runs", "ours,afbs,ceiling", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == []
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"ours", "stock-auto-find-batch-size", "plain-padded-loop"}
    for r in runs.values():
        assert r["timed_steps"] == 4 and r["nonpad_tokens_per_second"] > 0
        assert r["mfu"] is None   # no dense-bf16 peak for a CPU
    assert runs["stock-auto-find-batch-size"]["start_batch"] == 4
    assert runs["ours"]["dry_run"]["attempts"] >= 1


def test_the_length_grouped_order_is_a_function_of_the_epoch_and_accelerate_sets_it():
    """A resumed run's data order must not depend on the global RNG: the dataset draws each epoch's
    length-grouped order from (seed, epoch), and accelerate's dataloader hands it the epoch."""
    from accelerate import Accelerator

    from autotune.batches import ExampleDataset, LengthGroupedOrder

    rng = np.random.default_rng(0)
    examples = ExampleDataset([{"input_ids": [0] * int(n), "labels": [0] * int(n)} for n in rng.integers(5, 400, 64)])
    order = LengthGroupedOrder(examples, group=8, seed=3)
    first = list(order.order)
    torch.manual_seed(123)   # the global RNG changes nothing
    order.set_epoch(0)
    assert order.order == first and sorted(first) == list(range(64))
    order.set_epoch(1)
    second = list(order.order)
    assert second != first
    again = LengthGroupedOrder(examples, group=8, seed=3)
    again.set_epoch(1)
    assert again.order == second
    # grouped: steps of 8 hold similar lengths (less padding than the data's own order)
    lengths = examples.lengths

    def padding(indices):
        steps = [[lengths[i] for i in indices[k:k + 8]] for k in range(0, 64, 8)]
        return sum(max(s) * len(s) - sum(s) for s in steps)

    assert padding(second) < padding(list(range(64)))
    loader = Accelerator(cpu=True).prepare(torch.utils.data.DataLoader(order, batch_size=8, collate_fn=lambda f: f))
    loader.set_epoch(1)
    assert [len(e["input_ids"]) for batch in loader for e in batch] == [lengths[i] for i in second]
