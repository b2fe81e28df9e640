#!/usr/bin/env python3
"""Training speed in steady state: ours (`train.py --auto`) against the stock settings
of the guide's profile, stock `auto_find_batch_size`, and a plain padded loop as the
ceiling, on a random-weight Llasa and a realistic TTS length mix. Prints one JSON object.

    python bench/autotune.py --json                       # GPU: Llasa-1B, whole card + 24/12/8 GiB caps
    python bench/autotune.py --shape tiny --device cpu --limits 0 --json     # CPU smoke (about a minute)

Every timed run trains `--warmup` steps (default 10, left out: compilation, the
allocator, the first batches) and then `--timed` steps (default 50), logging every gcd of the two;
its figure is the non-padding tokens per second between the log that ends the
warm-up and the last (from run_summary's `throughput_marks`; the device is synced at
logs). `mfu` = 6 x parameters x tokens/s / the card's dense bf16 peak, from
PEAK_TFLOPS by name (null on a CPU or an unknown card).

A cap (`--limits 24`) caps the process's memory and plans with the profile of a
card of that size, as `train.py --vram-limit 24` does. The runs go through the real
pipeline (`autotune.pipeline.run`), so the dry run, the plan, token-budget
micro-batches, compilation and Liger are the product's own.

Lengths: durations log-normal, median 5 s, clipped to 1-20 s, 50 codes per second,
plus the transcript (about 14 characters per second).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"tiny": "tiny", "llasa-1b": "llasa-1b-random", "llasa-3b": "llasa-3b-random"}
WORDS = "the a voice speech model train data clear slow bright morning station coffee light river quiet".split()

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity), by a name fragment;
# the first match wins, so the more specific names come first.
PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0),
    ("L4", 121.0), ("RTX 6000 Ada", 364.2), ("RTX A6000", 154.8), ("RTX 4090", 165.2), ("RTX 4080", 97.5),
    ("RTX 3090", 71.0), ("RTX 3080", 59.5), ("RTX 3060", 25.4),
]


def peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment.lower() in name.lower()), None)


def mfu(params: int, tokens_per_second: float | None, peak: float | None) -> float | None:
    if not tokens_per_second or not peak:
        return None
    return round(6 * params * tokens_per_second / (peak * 1e12), 4)


def write_dataset(folder: Path, n: int, seed: int = 0, fixed_seconds: float | None = None) -> Path:
    """`n` JSONL lines of {"text", "code"} with the realistic length mix (or all `fixed_seconds` long)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n):
            seconds = fixed_seconds or min(20.0, max(1.0, math.exp(rng.gauss(math.log(5.0), 0.6))))
            codes = [rng.randrange(65536) for _ in range(int(seconds * 50))]
            text = " ".join(rng.choice(WORDS) for _ in range(max(1, int(seconds * 14 / 5))))
            f.write(json.dumps({"text": text, "code": codes}) + "\n")
    return folder


def log_every(args) -> int:
    """A log (the device synced, a time and a token count taken) where the warm-up ends and at the
    last step: the steady figure then spans exactly the timed steps."""
    return math.gcd(args.warmup, args.timed) or 1


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_argument(shape: str, sets: list[str], tmp: Path) -> str:
    """The random replica by name; saved to a folder first when the weights are to load in
    4 bits (bitsandbytes quantises at load time, from files)."""
    name = SHAPES[shape]
    if shape == "tiny" or not any(s.replace(" ", "") == "model.load_in_4bit=true" for s in sets):
        return name
    import torch

    from autotune.replica import build_llasa_tokenizer, build_random_llasa

    folder = tmp / f"{shape}-weights"
    model = build_random_llasa(name, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(folder)
    build_llasa_tokenizer().save_pretrained(folder)
    del model
    free()
    return str(folder)


def pipeline_run(label: str, args, data: Path, model: str, tmp: Path, limit: float, extra: list[str]) -> dict:
    """One `train.py` run in this process; its run_summary.json, condensed."""
    from autotune import pipeline
    from autotune.request import parse_request
    from autotune.training.callbacks import steady_rate

    out = tmp / f"{label}-{limit:g}"
    steps = args.warmup + args.timed
    argv = ["--data", str(data), "--model", model, "--codec", "tiny", "--output-dir", str(out), "--json",
            "--set", "samples.num_texts=0", "--set", "training.eval_strategy=no", "--set", "training.report_to=none",
            "--set", "training.save_strategy=no", "--set", f"training.max_steps={steps}",
            "--set", f"training.logging_steps={log_every(args)}", *extra]
    for s in args.sets:
        argv += ["--set", s]
    if limit:
        argv += ["--vram-limit", str(limit)]
    free()
    started = time.perf_counter()
    entry: dict = {"run": label, "limit_gib": limit or None}
    try:
        code = pipeline.run(parse_request(argv))
    except Exception as exc:  # record and go on: the benchmark reports, it does not stop
        return entry | {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        free()
    entry["seconds"] = round(time.perf_counter() - started, 1)
    summary_path = out / "run_summary.json"
    if code != 0 or not summary_path.exists():
        return entry | {"error": f"exit code {code}"}
    s = json.loads(summary_path.read_text())
    plan = s["plan"]
    entry.update(profile=s["profile"]["name"], plan=plan.get("label") or plan,
                 effective_batch_size=plan.get("effective_batch_size"),
                 tokens_per_second_with_warmup=_round(s["tokens_per_second"]),
                 peak_gib=round(s["peak_gpu_bytes"] / 2**30, 2) if s.get("peak_gpu_bytes") else None,
                 oom_recoveries=s.get("oom_recoveries"), final_loss=s.get("final_train_loss"))
    rate, timed = steady_rate(s.get("throughput_marks") or [], args.warmup)
    entry.update(nonpad_tokens_per_second=_round(rate), timed_steps=timed)
    if s.get("dry_run"):
        dry = s["dry_run"]
        chosen = next((a for a in dry["attempts"] if a["ok"] and a["plan"] == dry["plan"]), None)
        entry["dry_run"] = {"seconds": dry["seconds"], "attempts": len(dry["attempts"]),
                            "attempts_oom": sum(1 for a in dry["attempts"] if not a["ok"]),
                            "compile_seconds": chosen["overhead_seconds"] if chosen else None,
                            "reason": dry["reason"]}
    return entry


def _round(x):
    return round(x, 1) if isinstance(x, (int, float)) else None


def plain_loop(model_name: str, args, device: str) -> dict:
    """The ceiling: a hand-written loop, batch 4 x 2,048 of real tokens (no padding), no
    checkpointing, bf16 (fp32 on a CPU), LoRA r64 on all seven projections, HF's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model

    from autotune.model import load_base_model

    free()
    cuda = device.startswith("cuda")
    rows, length = (4, 2048) if cuda else (2, 128)
    base = load_base_model(model_name, precision="bf16" if cuda else "fp32", device=device)
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (rows, length), generator=generator).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.timed):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    entry = {"run": "plain-padded-loop", "batch": f"{rows} x {length}", "timed_steps": args.timed,
             "nonpad_tokens_per_second": round(rows * length * args.timed / seconds, 1),
             "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    return entry   # the model and optimizer go with this frame; the next run frees them


def auto_find_batch_size(model_name: str, data: Path, args, device: str, tmp: Path) -> dict:
    """Stock HF `auto_find_batch_size` from `--afbs-start`, stock loss, no length grouping;
    the throughput callback counts its final, successful run only."""
    import torch

    from autotune.batches import ExampleDataset, LlasaCollator, build_examples
    from autotune.data import load_dataset
    from autotune.hardware import probe
    from autotune.llasa import PromptBuilder
    from autotune.model import apply_lora, load_base_model, load_tokenizer
    from autotune.profiles import recommend
    from autotune.training.trainer import build_trainer

    free()
    steps = args.warmup + args.timed
    rec = recommend(probe().gpus[:1], sets=[f"model.name_or_path={json.dumps(model_name)}", "training.eval_strategy=no",
                                            "training.report_to=none", "training.save_strategy=no",
                                            f"training.max_steps={steps}", f"training.logging_steps={log_every(args)}",
                                            "training.lean_loss=false", "training.group_by_length=false",
                                            "data.token_budget=false",
                                            f"training.per_device_train_batch_size={args.afbs_start}",
                                            "training.gradient_accumulation_steps=1", *args.sets])
    config = rec.config
    tokenizer = load_tokenizer(model_name)
    builder = PromptBuilder(tokenizer)
    loaded = load_dataset(data, prompt_builder=builder, max_length=config.data.max_length,
                          val_fraction=config.data.val_fraction, split_seed=config.data.split_seed, progress=False)
    samples = loaded.train + loaded.val   # nothing is evaluated: train on all of it, as the other runs nearly do
    base = load_base_model(model_name, precision=config.precision, device=device)
    lora = config.lora
    model = apply_lora(base, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                       target_modules=list(lora.target_modules), gradient_checkpointing=config.training.gradient_checkpointing)
    trainer = build_trainer(config, model, train_set=ExampleDataset(build_examples(samples, builder)), val_set=None,
                            collator=LlasaCollator(builder.tokens.pad), output_dir=tmp / "afbs",
                            use_cpu=not device.startswith("cuda"), progress=False)
    # No accumulation: the Trainer's dataloader batch (a whole step) is the micro-batch, and
    # auto_find_batch_size halves it on each out-of-memory error as it does stock.
    trainer.args.auto_find_batch_size = True
    entry = {"run": "stock-auto-find-batch-size", "start_batch": args.afbs_start, "profile": rec.profile.name}
    started = time.perf_counter()
    try:
        trainer.train()
        rate, timed = trainer.throughput.steady(args.warmup)
        entry.update(chosen_batch=trainer.state.train_batch_size, seconds=round(time.perf_counter() - started, 1),
                     nonpad_tokens_per_second=_round(rate), timed_steps=timed,
                     effective_batch_size=trainer.state.train_batch_size,
                     peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None)
    except Exception as exc:
        entry.update(error=f"{type(exc).__name__}: {exc}"[:300])
    del trainer, model, base
    free()
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llasa-1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of every figure (default 10)")
    ap.add_argument("--timed", type=int, default=50, help="steps timed after the warm-up (default 50)")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--limits", default="0,24,12,8", help="GiB caps to stand in for smaller cards; 0 = whole card")
    ap.add_argument("--runs", default="ours,stock,afbs,ceiling",
                    help="which runs, comma-separated: ours, packed (ours with packed rows), stock (the guide's "
                         "profile as it is), afbs (stock auto_find_batch_size; whole card only), ceiling (the "
                         "plain padded loop; whole card only). Default: ours,stock,afbs,ceiling")
    ap.add_argument("--afbs-start", type=int, help="auto_find_batch_size's first batch (default 64 on a GPU, 4 on a CPU)")
    ap.add_argument("--fixed-seconds", type=float,
                    help="every sample this long (40 s is about 2,048 tokens) instead of the realistic mix")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config for every run, e.g. model.load_in_4bit=true")
    ap.add_argument("--json", action="store_true", help="(the output is always JSON; kept for old command lines)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.timed < 2:
        ap.error("--warmup must be >= 0 and --timed >= 2")
    runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not runs or runs - {"ours", "packed", "stock", "afbs", "ceiling"}:
        ap.error(f"--runs takes ours, packed, stock, afbs and ceiling, got {args.runs!r}")

    import torch

    from autotune.hardware import probe
    from autotune.replica import llasa_config

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; use --device cpu --shape tiny for the smoke run"}))
        return 2
    if args.afbs_start is None:
        args.afbs_start = 64 if cuda else 4
    device = "cuda:0" if cuda else "cpu"
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-autotune-"))
    data = write_dataset(tmp / "data", args.samples, fixed_seconds=args.fixed_seconds)
    model = model_argument(args.shape, args.sets, tmp)
    if args.shape == "tiny":
        from autotune.llasa import build_tiny_model

        params = sum(p.numel() for p in build_tiny_model().parameters())
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(llasa_config(SHAPES[args.shape])).parameters())
    gpu = probe().gpus[0] if cuda else None
    peak = peak_tflops(gpu.name) if gpu else None
    report = {"gpu": gpu.to_dict() if gpu else None, "device": device, "shape": args.shape, "params": params,
              "peak_bf16_tflops": peak, "warmup_steps": args.warmup, "timed_steps": args.timed,
              "data": {"samples": args.samples, "fixed_seconds": args.fixed_seconds}, "runs": []}

    def add(entry):
        entry["mfu"] = mfu(params, entry.get("nonpad_tokens_per_second"), peak)
        report["runs"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)

    for limit in [float(x) for x in args.limits.split(",")]:
        if "ours" in runs:
            add(pipeline_run("ours", args, data, model, tmp, limit, ["--auto"]))
        if "packed" in runs:
            add(pipeline_run("ours-packed", args, data, model, tmp, limit, ["--auto", "--set", "data.packing=true"]))
        if "stock" in runs:
            # The guide's profile as it is: its batch and accumulation, HF's loss, no grouping, fixed micro-batches.
            add(pipeline_run("stock-profile", args, data, model, tmp, limit,
                             ["--set", "training.lean_loss=false", "--set", "training.group_by_length=false",
                              "--set", "data.token_budget=false"]))
        if limit == 0 and "afbs" in runs:
            add(auto_find_batch_size(model, data, args, device, tmp))
        if limit == 0 and "ceiling" in runs:
            add(plain_loop(model, args, device))
    done = report["runs"]

    def by_limit(name):
        return {r["limit_gib"]: r for r in done if r["run"] == name and r.get("nonpad_tokens_per_second")}

    ours, stock = by_limit("ours"), by_limit("stock-profile")
    report["speedup_vs_stock_profile"] = {str(k or "whole"): round(ours[k]["nonpad_tokens_per_second"]
                                                                   / stock[k]["nonpad_tokens_per_second"], 3)
                                          for k in ours if k in stock}
    report["runs_over_limit"] = [f"{r['run']}@{r['limit_gib']}" for r in done
                                 if r.get("peak_gib") and r.get("limit_gib") and r["peak_gib"] > 0.9 * r["limit_gib"]]
    report["errors"] = [f"{r['run']}@{r['limit_gib']}: {r['error']}" for r in done if r.get("error")]
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
