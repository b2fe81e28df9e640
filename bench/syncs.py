#!/usr/bin/env python3
"""What a training step asks of the device: host syncs and kernel launches per step, through
the real pipeline (`autotune.pipeline.run`, as `train.py` runs it). Prints one JSON object.

    python bench/syncs.py --out syncs-cpu.json                     # CPU: tiny width, Llasa-1B's 16 layers
    python bench/syncs.py --layers 2 --precision fp32 --steps 4    # the plumbing in a minute (CI's rehearsal)
    python bench/syncs.py --device cuda --shape llasa-1b --out syncs-h100.json

The plan is the tuning guide's A100/H100-80 setting (micro-batch 4, accumulation 2, LoRA r64
on all seven projections, no checkpointing, fused AdamW, the lean loss), unless `--set`
changes it; the data is bench/autotune.py's realistic length mix (log-normal around 5 s).
`autotune.launches.StepProbe` watches from each step's start to the next one's (the step,
then its logging and the next batch's arrival) and counts host syncs by kind and where they
come from, and kernel launches. A step "logs" when it logs, saves or evaluates: those read
values back on purpose. Steady figures leave out the first `--warmup` steps.

`mask_variants` measures one forward and backward of the same micro-batch three ways: with the
2-D padding mask transformers turns into a 4-D one itself, as one packed row with position ids
and no mask, and with the 4-D mask the trainer builds (`batches.attention_4d`). `recompiles`
(with `--recompiles N`) compiles the model (aot_eager on a CPU) and trains N micro-batches of the
length mix padded to the compile buckets, counting dynamo's recompiles.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# bench/autotune.py by its path: its module name would be the `autotune` package's.
_spec = importlib.util.spec_from_file_location("bench_autotune", ROOT / "bench" / "autotune.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
write_dataset = _bench.write_dataset

# The tuning guide's A100 / H100 (80 GB) profile, pinned so every machine measures the same plan.
GUIDE = ["training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2", "lora.r=64",
         "lora.lora_alpha=128", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "training.gradient_checkpointing=false", "training.lean_loss=true",
         "training.optim=adamw_torch_fused", "training.dataloader_pin_memory=true"]


def tiny_deep_model(folder: Path, layers: int) -> Path:
    """The tiny model's width with `layers` layers (Llasa-1B has 16): a step issues the kernels of
    Llasa-1B's depth for little arithmetic. Saved as a folder `--model` loads."""
    import torch
    from transformers import LlamaForCausalLM

    from autotune.llasa import build_tiny_tokenizer, tiny_model_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_model_config(len(tokenizer))
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class _HostLoader:
    """The base DataLoader under accelerate's wrapper, its iteration the host's own work (the
    sampler, the collator, an epoch's new order); accelerate's copy to the device stays outside."""

    def __init__(self, loader: Any, probe: Any):
        self.loader, self.probe = loader, probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        with self.probe.host_work():
            inner = iter(self.loader)
        while True:
            with self.probe.host_work():
                try:
                    batch = next(inner)
                except StopIteration:
                    return
            yield batch


class ProbeSteps:
    """A TrainerCallback-shaped recorder: per optimizer step, the probe's counts from the step's
    start to the next one's, the non-padding tokens it trained, and whether it logged."""

    def __init__(self, trainer: Any, probe: Any):
        self.trainer = trainer
        self.probe = probe
        self.steps: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._tokens = 0

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class _Probe(TrainerCallback):
            def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
                # On the CPU every tensor is the "device's" unless marked: the data pipeline's own
                # tensors (a sampler's permutation, an epoch's new order) are host memory on a GPU too.
                if getattr(train_dataloader, "base_dataloader", None) is not None:
                    train_dataloader.base_dataloader = _HostLoader(train_dataloader.base_dataloader, recorder.probe)
                dataset = getattr(train_dataloader, "dataset", None)
                if hasattr(dataset, "set_epoch"):
                    set_epoch = dataset.set_epoch

                    def host_set_epoch(epoch: int) -> None:
                        with recorder.probe.host_work():
                            set_epoch(epoch)

                    dataset.set_epoch = host_set_epoch

            def on_step_begin(self, args, state, control, **kwargs):
                recorder.close()
                recorder.probe.reset()
                recorder._tokens = recorder.trainer.tokens_seen
                recorder._open = {"step": state.global_step + 1}
                recorder.probe.start()

            def on_step_end(self, args, state, control, **kwargs):
                if recorder._open is not None:
                    recorder._open["tokens"] = recorder.trainer.tokens_seen - recorder._tokens
                    recorder._open["logs"] = bool(control.should_log or control.should_save or control.should_evaluate
                                                  or state.global_step >= state.max_steps)

            def on_train_end(self, args, state, control, **kwargs):
                recorder.close()

        return _Probe()

    def close(self) -> None:
        self.probe.stop()
        if self._open is not None and "tokens" in self._open:
            self.steps.append({**self._open, **self.probe.snapshot()})
        self._open = None


def probe_pipeline(argv: list[str], device: str) -> list[dict[str, Any]]:
    """Run `train.py argv` in this process with a probe on every optimizer step."""
    from autotune import pipeline
    from autotune.launches import StepProbe
    from autotune.request import parse_request
    from autotune.training import trainer as T

    probe = StepProbe(device)
    recorders: list[ProbeSteps] = []
    real = T.build_trainer

    def build(*args: Any, **kwargs: Any):
        trainer = real(*args, **kwargs)
        if kwargs.get("sequential"):
            return trainer   # the dry run's own trainers: not the training
        trainer.data_collator = probe.host_collator(trainer.data_collator)
        recorder = ProbeSteps(trainer, probe)
        trainer.add_callback(recorder.callback())
        recorders.append(recorder)
        return trainer

    T.build_trainer = build
    try:
        code = pipeline.run(parse_request(argv))
    finally:
        T.build_trainer = real
        probe.stop()
    if code != 0:
        raise SystemExit(f"train.py exited with {code}")
    return [s for r in recorders for s in r.steps]


def steady(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    later = [s for s in steps if s["step"] > warmup]
    quiet = [s for s in later if not s["logs"]]
    tokens = sum(s["tokens"] for s in quiet)
    kinds: dict[str, int] = {}
    for s in quiet:
        for k, v in s["by_kind"].items():
            kinds[k] = kinds.get(k, 0) + v
    return {"non_logging_steps": len(quiet), "syncs_per_non_logging_step_max": max((s["syncs"] for s in quiet), default=None),
            "syncs_by_kind": kinds,
            "launches_per_step_median": statistics.median(s["launches"] for s in quiet) if quiet else None,
            "tokens_per_step_median": statistics.median(s["tokens"] for s in quiet) if quiet else None,
            "launches_per_1000_tokens": round(1000 * sum(s["launches"] for s in quiet) / tokens, 1) if tokens else None}


def length_mix(n: int, seed: int = 1) -> list[int]:
    """Speech codes per sample: bench/autotune.py's mix (log-normal around 5 s, 1-20 s, 50 a second)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return (np.clip(rng.lognormal(np.log(5.0), 0.6, n), 1.0, 20.0) * 50).astype(int).tolist()


def mix_examples(n: int, seed: int = 1) -> tuple[Any, list[dict[str, list[int]]]]:
    import numpy as np

    from autotune.batches import build_examples
    from autotune.llasa import PromptBuilder, build_tiny_tokenizer
    from autotune.reading import Sample

    builder = PromptBuilder(build_tiny_tokenizer())
    rng = np.random.default_rng(seed)
    samples = [Sample(text=f"text {i}", source=f"s:{i}", codes=rng.integers(0, 65536, k).astype(np.int32))
               for i, k in enumerate(length_mix(n, seed))]
    return builder, build_examples(samples, builder)


def count_recompiles(micro_batches: int, *, micro_batch_size: int = 4, accumulation: int = 2, seed: int = 1,
                     packed: bool = True) -> dict[str, Any]:
    """Compile the tiny model (static shapes: `dynamic=False`, what CUDA graphs need) and train
    `micro_batches` micro-batches of the length mix, split by a token budget and padded to the
    compile buckets as a compiled plan's are. Every compile goes through a counting backend."""
    import torch

    from autotune.batches import BUCKET_TOKENS, TokenBudgetCollator, make_collator, with_4d_mask
    from autotune.llasa import build_tiny_model
    from autotune.loss import compute_lean_loss

    builder, examples = mix_examples(micro_batches * micro_batch_size * accumulation, seed)
    rows = make_collator(builder.tokens.pad, packed, builder.tokens.hidden_from_attention, compiled=True)
    budget = micro_batch_size * rows.width([max(len(e["input_ids"]) for e in examples)])
    step = TokenBudgetCollator(rows, budget)
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)][:1])
        return graph.forward

    torch._dynamo.reset()
    model = build_tiny_model()
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    shapes, trained = set(), 0
    per_step = micro_batch_size * accumulation
    for start in range(0, len(examples), per_step):
        for part in step(examples[start:start + per_step])["micro_batches"]:
            if trained == micro_batches:
                break
            shapes.add(tuple(part["input_ids"].shape))
            inputs = with_4d_mask({k: v for k, v in part.items() if k not in ("num_tokens", "num_labels")})
            loss, _ = compute_lean_loss(compiled, inputs)
            loss.backward()
            trained += 1
    torch._dynamo.reset()
    widest = budget if packed else max(len(e["input_ids"]) for e in examples)
    return {"micro_batches": trained, "packed": packed, "bucket_tokens": BUCKET_TOKENS, "budget_tokens": budget,
            "buckets": -(-widest // BUCKET_TOKENS), "distinct_shapes": len(shapes), "compiles": len(compiles)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "llasa-1b"],
                    help="tiny: the tiny model's width at --layers layers (default); llasa-1b: the random replica")
    ap.add_argument("--layers", type=int, default=16, help="the tiny shape's layers (default 16, Llasa-1B's)")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the steady figures (default 2)")
    ap.add_argument("--log-every", type=int, default=5, help="logging_steps (default 5)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="changes to the guide's plan, e.g. data.packing=true")
    ap.add_argument("--recompiles", type=int, default=50, metavar="N",
                    help="micro-batches of the length mix for the compiled-shapes count (0: skip; default 50)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-syncs-"))
    data = write_dataset(tmp / "data", args.samples)
    model = (str(tiny_deep_model(tmp / "model", args.layers)) if args.shape == "tiny" else "llasa-1b-random")
    sets = [*GUIDE, f"training.bf16={str(args.precision == 'bf16').lower()}", "training.fp16=false",
            *args.sets]
    train_argv = ["--data", str(data), "--model", model, "--codec", "tiny", "--output-dir", str(tmp / "run"),
                  "--set", "samples.num_texts=0", "--set", "training.eval_strategy=no",
                  "--set", "training.report_to=none", "--set", "training.save_strategy=no",
                  "--set", "training.dataloader_num_workers=0", "--set", f"training.max_steps={args.steps}",
                  "--set", f"training.logging_steps={args.log_every}"]
    for s in sets:
        train_argv += ["--set", s]
    steps = probe_pipeline(train_argv, "cuda:0" if args.device == "cuda" else "cpu")
    report = {"command": "python bench/syncs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": platform.node(), "device": args.device, "shape": args.shape,
              "layers": args.layers if args.shape == "tiny" else None, "plan_sets": sets,
              "steady": steady(steps, args.warmup), "steps": steps,
              "recompiles": count_recompiles(args.recompiles) if args.recompiles else None,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
