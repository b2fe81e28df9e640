#!/usr/bin/env bash
# One-shot GPU checks for the speed and memory targets (issue "Speed"), for a session that is
# lent a GPU. Writes JSON files to $OUT (or ./gpu-out); run it once with a timeout that leaves
# room for a rerun, commit what comes back under bench/results/, then give the machine back.
#
# Every step stops by DEADLINE seconds (default 540) so that what finished comes back; the
# most important come first. The device image has torch, transformers, peft and accelerate;
# carry the rest as wheels for its Python, made here with e.g.
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection rich markdown-it-py mdurl pygments \
#       nvidia-ml-py tiktoken regex llama-models bitsandbytes
# (`.whl/` is git-ignored: name it in the device call's `carry`); this script installs them.
#
# Targets (issue "Speed"):
#   whole card, the guide's effective batch: ours >= 35% MFU; plain padded loop as the ceiling
#   24/12/8 GiB caps: ours >= 2x the stock Trainer with the guide's profile (speedup_vs_stock_profile)
#   dry run + compilation <= 60 s (runs[].dry_run.seconds)
#   Llasa-1B at 2,048 tokens in 8 GiB, 3B in 12 GiB, 3B 4-bit in 8 GiB: no OOM, peak <= 90% of the cap
#   memory estimate within +-5% (estimates are made on the CPU: bench/results/memory-estimates.json)
#   sweep: >= 2x the trials per hour of one trial at a time, on the whole card (sweep.json speedup)
#
# CHECKS="sweep caps" runs only the named steps (default: all, in the order below).
set -u
OUT=$(realpath -m "${OUT:-gpu-out}")   # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.." || exit 1
DEADLINE=${DEADLINE:-540}
[[ $DEADLINE =~ ^[0-9]+$ ]] || { echo "DEADLINE must be whole seconds, got '$DEADLINE'" >&2; exit 2; }
DEADLINE=$((10#$DEADLINE))   # "090" is ninety, not octal
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1

# step NAME MAX_SECONDS command...: stdout to $OUT/NAME.stdout, stderr to $OUT/NAME.log,
# cut at MAX_SECONDS or at the deadline, whichever comes first.
step() {
    local name=$1 limit=$2; shift 2
    if [[ -n ${CHECKS:-} && " $CHECKS " != *" $name "* ]]; then return; fi
    local left=$(( DEADLINE - SECONDS ))
    if (( left < 30 )); then echo "== $name skipped: deadline"; return; fi
    (( limit > left - 10 )) && limit=$(( left - 10 ))   # room for timeout's -k
    echo "== $name (up to ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.log"
    echo "$name rc=$? at ${SECONDS}s"
}

# 1. The whole card: ours (dry run, plan, compile/Liger as measured), the guide's profile as
#    it is, and the plain padded loop (4 x 2,048, no checkpointing) as the ceiling; 10 warm-up
#    and 50 timed steps each.
step whole-card 200 python3 bench/autotune.py --out "$OUT/whole-card.json" --shape llasa-1b --limits 0 --runs ours,stock,ceiling
# 2. Cards of 24, 12 and 8 GiB: ours against the guide's profile for such a card.
step caps 200 python3 bench/autotune.py --out "$OUT/caps.json" --shape llasa-1b --limits 24,12,8 --runs ours,stock
# 3. The memory targets at ~2,048 tokens per sample (40 s of speech).
step target-1b-8gib 60 python3 bench/autotune.py --out "$OUT/target-1b-8gib.json" --shape llasa-1b --limits 8 \
    --samples 64 --fixed-seconds 40 --runs ours --warmup 2 --timed 4
step target-3b-12gib 90 python3 bench/autotune.py --out "$OUT/target-3b-12gib.json" --shape llasa-3b --limits 12 \
    --samples 64 --fixed-seconds 40 --runs ours --warmup 2 --timed 4
# 4. Measured peaks for the estimator's rungs (stock and lean, with and without checkpointing).
step memory-b4-nockpt 60 python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 4 --lora-r 64 \
    --no-checkpointing
step memory-b16 60 python3 bench/memory.py --device cuda --json --model-shape llasa-1b --batch 16 --lora-r 64
# 5. Stock auto_find_batch_size from 64 (its final run only), and 3B in 4 bits in 8 GiB.
step afbs 120 python3 bench/autotune.py --out "$OUT/afbs.json" --shape llasa-1b --limits 0 --runs afbs
if python3 -c "import bitsandbytes" 2>/dev/null; then
    step target-3b-4bit-8gib 120 python3 bench/autotune.py --out "$OUT/target-3b-4bit-8gib.json" --shape llasa-3b \
        --limits 8 --samples 64 --fixed-seconds 40 --runs ours --warmup 2 --timed 4 --set model.load_in_4bit=true
else
    echo "== target-3b-4bit-8gib skipped: no bitsandbytes"
fi
# 6. Sweep trials per hour: four short trials one at a time, as the measured peak allows, and two
#    at a time (bench/sweep.py; a one-trial warm-up sweep first, left out).
step sweep 300 python3 bench/sweep.py --out "$OUT/sweep.json" --shape llasa-1b --settings 1,auto,2 --trials 4 \
    --steps 20 --samples 200 --timeout 140
echo "done at ${SECONDS}s"
