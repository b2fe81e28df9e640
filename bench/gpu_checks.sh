#!/usr/bin/env bash
# One-shot GPU checks for the "Memory and speed" targets, for a session that is
# lent a GPU (see README's Measured section). Writes JSON files to $OUT (or ./gpu-out).
# Needs ~6-8 minutes on an H100/H200. The device image has torch, transformers,
# peft and accelerate; carry pydantic (and bitsandbytes for the 4-bit rows) as
# wheels in .whl/ and install them first, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() { local name=$1; shift; echo "== $name"; timeout 240 python3 "$@" --json --out "$OUT/$name.json" > /dev/null 2> "$OUT/$name.log"; echo "rc=$?"; }

# The CPU-side estimate of the same shapes, to set beside what the card measures.
python3 bench/memory.py --estimate --json --model-shape llasa-1b --batch 16 > "$OUT/estimate-b16.json" 2> "$OUT/estimate-b16.log"; echo "estimate b16 rc=$?"
python3 bench/memory.py --estimate --json --batch 1 > "$OUT/estimate-b1.json" 2> "$OUT/estimate-b1.log"; echo "estimate b1 rc=$?"
# Lean vs stock loss: peak memory at batch 16 x 2048 (target: <= 1/4 of stock) and
# throughput at equal batch (target: lean >= stock).
python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 4 > "$OUT/memory-b4.json" 2> "$OUT/memory-b4.log"; echo "memory b4 rc=$?"
python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 16 --modes lean > "$OUT/memory-b16.json" 2> "$OUT/memory-b16.log"; echo "memory b16 rc=$?"
# Llasa-1B trains at ~2048 tokens in 8 GiB; Llasa-3B in 12 GiB.
run target-1b-8gib bench/autotune.py --shape llasa-1b --limits 8 --steps 5 --samples 64 --fixed-seconds 29 --only-ours
run target-3b-12gib bench/autotune.py --shape llasa-3b --limits 12 --steps 5 --samples 64 --fixed-seconds 29 --only-ours
# Llasa-3B with 4-bit weights in 8 GiB (needs bitsandbytes).
python3 -c "import bitsandbytes" 2>/dev/null && run target-3b-4bit-8gib bench/autotune.py --shape llasa-3b --limits 8 \
    --steps 5 --samples 64 --fixed-seconds 29 --only-ours --set model.load_in_4bit=true
# Packed vs padded non-padding tokens/s on the realistic mix (target: >= 1.5x the padded stock Trainer).
run packing bench/autotune.py --shape llasa-1b --limits 0 --steps 30 --no-afbs --packing
