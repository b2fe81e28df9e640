#!/usr/bin/env python3
"""Auto-tuner benchmark: ours (dry run + plan + lean loss + length grouping)
against the stock HF Trainer with the guide's profile, and stock
`auto_find_batch_size`, on a random-initialised Llasa-shaped model and a
realistic TTS length mix. Prints one JSON object.

    python bench/autotune.py --json                          # GPU: Llasa-1B shape, full card + 24/12/8 GiB
    python bench/autotune.py --shape tiny --device cpu --steps 3 --limits 0 --json   # smoke test

Lengths: durations log-normal, median 5 s, clipped to 1-20 s, 50 codes per
second, plus the transcript (about 14 characters per second).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "llasa-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
    "llasa-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8),
}
WORDS = "the a voice speech model train data clear slow bright morning station coffee light river quiet".split()


def realistic_samples(n: int, seed: int = 0, fixed_seconds: float | None = None):
    from autotune.reading import Sample
    import numpy as np

    rng = random.Random(seed)
    samples = []
    for i in range(n):
        seconds = fixed_seconds or min(20.0, max(1.0, math.exp(rng.gauss(math.log(5.0), 0.6))))
        codes = np.array([rng.randrange(65536) for _ in range(int(seconds * 50))], dtype=np.int32)
        text = " ".join(rng.choice(WORDS) for _ in range(max(1, int(seconds * 14 / 5))))
        samples.append(Sample(text=text, source=f"bench:{i}", codes=codes))
    return samples


def build_model_folder(shape: str, folder: Path, text_vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from autotune.llasa import build_tiny_tokenizer

    tok = build_tiny_tokenizer(text_vocab)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype="bfloat16", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llasa-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per timed training run")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--limits", default="0,24,12,8", help="GiB caps to stand in for smaller cards; 0 = whole card")
    ap.add_argument("--no-afbs", action="store_true", help="skip stock auto_find_batch_size")
    ap.add_argument("--packing", action="store_true", help="also time ours with padding-free packed rows")
    ap.add_argument("--fixed-seconds", type=float,
                    help="every sample this long (29 s is about 2,000 tokens with the byte-level bench tokenizer) instead of the realistic mix")
    ap.add_argument("--only-ours", action="store_true", help="skip the stock baselines (memory-target checks)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config for every run, e.g. model.load_in_4bit=true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console

    from autotune import run as R
    from autotune.data import DataReport, measure
    from autotune.dryrun import Plan
    from autotune.hardware import probe, what_if_gpu
    from autotune.llasa import PromptBuilder
    from autotune.profiles import recommend

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    started = time.perf_counter()
    console = Console(stderr=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-autotune-"))
    text_vocab = 512 if args.shape == "tiny" else 128256
    model_dir = build_model_folder(args.shape, tmp / "model", text_vocab)
    from autotune.model import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    builder = PromptBuilder(tokenizer)
    samples = realistic_samples(args.samples, fixed_seconds=args.fixed_seconds)
    measure(samples, builder)
    val = samples[:8]
    data = DataReport(train=samples[8:], val=val, layout="bench", val_source="bench")
    lengths = sorted(s.num_tokens for s in samples)
    real = probe().gpus[:1] if cuda else []
    total_gib = real[0].total_bytes / 2**30 if real else 0.0
    report = {"gpu": real[0].to_dict() if real else None, "shape": args.shape, "steps": args.steps,
              "data": {"samples": len(samples), "median_tokens": lengths[len(lengths) // 2], "max_tokens": lengths[-1]},
              "runs": []}

    def run_config(limit: float):
        gpus = real
        if limit and real:
            gpus = [what_if_gpu(f"{real[0].name} capped", limit, f"{real[0].cc[0]}.{real[0].cc[1]}")]
        sets = [f"model.name_or_path={model_dir}", "training.eval_strategy=no", "training.report_to=none",
                f"training.max_steps={args.steps}", "training.save_steps=100000", "samples.num_texts=0",
                "training.logging_steps=5", *args.sets]
        if limit:
            sets.append(f"autotune.vram_limit_gib={limit}")
        return recommend(gpus, sets=sets)

    def timed_train(label, rec, plan, limit, *, lean: bool, grouped: bool, packing: bool = False):
        import dataclasses

        plan = dataclasses.replace(plan, lean_loss=lean)
        config = plan.apply(rec.config)
        config.training.lean_loss = lean
        config.training.group_by_length = grouped
        config.data.packing = packing
        out = tmp / f"{label}-{limit}"
        ctx = R.Context(SimpleNamespace(json=True, resume=None, merge=False), console, out)
        out.mkdir(parents=True, exist_ok=True)
        device = R.device_for(ctx)
        R.apply_vram_limit(config, device)
        free()
        from autotune.batches import ExampleDataset, build_examples, make_collator

        train_set = ExampleDataset(build_examples([s for s in data.train if s.num_tokens <= config.data.max_length], builder))
        t0 = time.perf_counter()
        outcome = R._train_once(ctx, config, plan, train_set, None, make_collator(builder.tokens.pad, packing), tokenizer,
                                None, device, val_texts=[])
        seconds = time.perf_counter() - t0
        entry = {"run": label, "limit_gib": limit or round(total_gib, 1), "plan": plan.label(),
                 "effective_batch_size": plan.effective_batch_size, "seconds": round(seconds, 1)}
        if outcome.oom_error:
            entry.update(oom=True, error=outcome.oom_error[:160])
        else:
            entry.update(oom=False, nonpad_tokens_per_second=round(outcome.throughput.overall() or 0, 1),
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                         final_loss=outcome.trainer.state.log_history[-1].get("train_loss"))
        del outcome
        free()
        return entry

    for limit in [float(x) for x in args.limits.split(",")]:
        rec = run_config(limit)
        ctx = R.Context(SimpleNamespace(json=False, check_data=False), console, tmp / f"dry-{limit}")
        (tmp / f"dry-{limit}").mkdir(parents=True, exist_ok=True)
        start = Plan.from_config(rec.config)
        t0 = time.perf_counter()
        try:
            dry = R.dry_run(ctx, rec, data, builder, start)
            dry_entry = {"run": "ours-dry-run", "limit_gib": limit or round(total_gib, 1), "profile": rec.profile.name,
                         "seconds": round(time.perf_counter() - t0, 1), "attempts": len(dry.attempts),
                         "attempts_oom": sum(1 for a in dry.attempts if not a.ok),
                         "plan": dry.plan.label(), "reason": dry.reason}
            report["runs"].append(dry_entry)
            report["runs"].append(timed_train("ours", rec, dry.plan, limit, lean=dry.plan.lean_loss, grouped=True))
            if args.packing:
                report["runs"].append(timed_train("ours-packed", rec, dry.plan, limit, lean=dry.plan.lean_loss,
                                                  grouped=False, packing=True))
        except Exception as exc:  # record and go on: the benchmark reports, it does not stop
            report["runs"].append({"run": "ours", "limit_gib": limit, "error": f"{type(exc).__name__}: {exc}"[:300]})
        free()
        if args.only_ours:
            continue
        stock_plan = Plan.from_config(rec.config)
        report["runs"].append(timed_train("stock-profile", rec, stock_plan, limit, lean=False, grouped=False)
                              | {"profile": rec.profile.name})
        if limit == 0 and not args.no_afbs:
            report["runs"].append(auto_find_batch_size(rec, stock_plan, data, builder, tokenizer, tmp, console, args.steps))
    report["runs_over_limit"] = [r["run"] for r in report["runs"] if r.get("peak_gib") and r.get("limit_gib")
                                 and r["peak_gib"] > r["limit_gib"]]
    ours = {r["limit_gib"]: r for r in report["runs"] if r["run"] == "ours" and "nonpad_tokens_per_second" in r}
    stock = {r["limit_gib"]: r for r in report["runs"] if r["run"] == "stock-profile" and "nonpad_tokens_per_second" in r}
    packed = {r["limit_gib"]: r for r in report["runs"] if r["run"] == "ours-packed" and "nonpad_tokens_per_second" in r}
    report["packed_speedup_vs_stock_profile"] = {
        str(k): round(packed[k]["nonpad_tokens_per_second"] / stock[k]["nonpad_tokens_per_second"], 3)
        for k in packed if k in stock}
    report["speedup_vs_stock_profile"] = {str(k): round(ours[k]["nonpad_tokens_per_second"] / stock[k]["nonpad_tokens_per_second"], 3)
                                          for k in ours if k in stock}
    report["training_ooms_ours"] = sum(1 for r in report["runs"] if r["run"] == "ours" and r.get("oom"))
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def auto_find_batch_size(rec, plan, data, builder, tokenizer, tmp, console, steps):
    """Stock HF `auto_find_batch_size`, starting from 64, with the profile's other settings."""
    import torch

    from autotune import trainer as T
    from autotune.batches import ExampleDataset, LlasaCollator, build_examples
    from autotune.model import apply_lora, load_base_model

    config = plan.apply(rec.config)
    config.training.lean_loss = False
    config.training.group_by_length = False
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    free()
    base = load_base_model(config.model.name_or_path, precision=plan.precision, device=device)
    model = apply_lora(base, r=plan.lora_r, lora_alpha=plan.lora_alpha, lora_dropout=0.05,
                       target_modules=list(plan.lora_target_modules), gradient_checkpointing=plan.gradient_checkpointing)
    args = T.training_arguments(config, tmp / "afbs", has_eval=False, use_cpu=device == "cpu", notes=[])
    args.auto_find_batch_size = True
    args.per_device_train_batch_size = 64
    train_set = ExampleDataset(build_examples(data.train, builder))
    trainer = T.LlasaTrainer(model=model, args=args, train_dataset=train_set, data_collator=LlasaCollator(builder.tokens.pad),
                             lean_loss=False)
    throughput = T.ThroughputCallback(trainer, 1)
    trainer.add_callback(throughput)
    t0 = time.perf_counter()
    entry = {"run": "stock-auto-find-batch-size", "start_batch": 64}
    try:
        trainer.train()
        entry.update(oom=False, chosen_batch=trainer._train_batch_size, seconds=round(time.perf_counter() - t0, 1),
                     nonpad_tokens_per_second=round(throughput.overall() or 0, 1),
                     peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
                     effective_batch_size=trainer._train_batch_size * args.gradient_accumulation_steps)
    except Exception as exc:
        entry.update(error=f"{type(exc).__name__}: {exc}"[:200])
    del trainer, model, base
    free()
    return entry


if __name__ == "__main__":
    raise SystemExit(main())
