#!/usr/bin/env bash
# One-shot GPU checks for the "Memory and speed" targets, for a session that is
# lent a GPU (see README's Measured section). Writes JSON files to $OUT (or ./gpu-out).
# Expected ~5-7 minutes on an H100/H200; every step stops by DEADLINE seconds
# (default 540) so that what finished comes back. The device image has torch,
# transformers, peft and accelerate; carry pydantic (and bitsandbytes for the 4-bit
# row) as wheels in .whl/ and install them first, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
OUT=$(realpath -m "${OUT:-gpu-out}")   # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.." || exit 1
DEADLINE=${DEADLINE:-540}
[[ $DEADLINE =~ ^[0-9]+$ ]] || { echo "DEADLINE must be whole seconds, got '$DEADLINE'" >&2; exit 2; }
DEADLINE=$((10#$DEADLINE))   # "090" is ninety, not octal
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# step NAME MAX_SECONDS command...: stdout to $OUT/NAME.stdout (bench/memory.py's JSON),
# stderr to $OUT/NAME.log, cut at MAX_SECONDS or at the deadline, whichever comes first.
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - SECONDS ))
    if (( left < 30 )); then echo "== $name skipped: deadline"; return; fi
    (( limit > left - 10 )) && limit=$(( left - 10 ))   # room for timeout's -k
    echo "== $name (up to ${limit}s)"
    # -k: bench/autotune.py saves and goes on to its next timed run on SIGTERM; KILL ends it.
    timeout -k 10 "$limit" "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.log"
    echo "$name rc=$? at ${SECONDS}s"
}

# The CPU-side estimate of the same shapes, to set beside what the card measures.
step estimate-b16 60 python3 bench/memory.py --estimate --json --model-shape llasa-1b --batch 16
step estimate-b1 60 python3 bench/memory.py --estimate --json --batch 1
# Lean vs stock loss: throughput at equal batch (target: lean >= stock) and peak
# memory at batch 16 x 2048 (target: <= 1/4 of stock, whose 75.9 GiB is on record).
step memory-b4 120 python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 4
step memory-b4-chunk4096 60 python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 4 --modes lean \
    --chunk-size 4096   # the lean loss's old chunk: does 1,024 cost speed?
step memory-b16 90 python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 16 --modes lean
# Llasa-1B trains at ~2048 tokens in 8 GiB; Llasa-3B in 12 GiB.
step target-1b-8gib 120 python3 bench/autotune.py --json --out "$OUT/target-1b-8gib.json" --shape llasa-1b --limits 8 --steps 5 --samples 64 \
    --fixed-seconds 29 --only-ours
step target-3b-12gib 150 python3 bench/autotune.py --json --out "$OUT/target-3b-12gib.json" --shape llasa-3b --limits 12 --steps 5 --samples 64 \
    --fixed-seconds 29 --only-ours
# Packed vs padded non-padding tokens/s on the realistic mix (target: >= 1.5x the padded stock Trainer).
step packing 180 python3 bench/autotune.py --json --out "$OUT/packing.json" --shape llasa-1b --limits 0 --steps 30 --no-afbs --packing
# Llasa-3B with 4-bit weights in 8 GiB (needs bitsandbytes).
if python3 -c "import bitsandbytes" 2>/dev/null; then
    step target-3b-4bit-8gib 180 python3 bench/autotune.py --json --out "$OUT/target-3b-4bit-8gib.json" --shape llasa-3b --limits 8 --steps 5 --samples 64 \
        --fixed-seconds 29 --only-ours --set model.load_in_4bit=true
else
    echo "== target-3b-4bit-8gib skipped: no bitsandbytes"
fi
echo "done at ${SECONDS}s"
