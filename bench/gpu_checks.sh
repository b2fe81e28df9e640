#!/usr/bin/env bash
# One-shot checks of every speed and memory target, for a session that is lent a GPU: one call,
# one folder of JSON ($OUT, default ./gpu-out), then bench/targets.py's verdict per target in
# $OUT/targets.json. Commit what comes back under bench/results/ and give the machine back.
#
#   bench/gpu_checks.sh                          # a GPU: Llasa-1B/3B shapes, the whole card and caps
#   DEVICE=cpu OUT=/tmp/rehearsal bench/gpu_checks.sh   # the rehearsal CI runs: tiny shapes, a few
#                                                       # steps, every step end to end, every JSON
#
# It prints the planned seconds of each step first; each step is cut at its plan or at DEADLINE
# seconds from the start (default 540 on a GPU: an H100 call of 9 minutes leaves a minute for start-up
# and the copy back; 3600 for DEVICE=cpu), whichever comes first, the most important first. The memory estimates run
# on the CPU alongside the GPU steps. The device image has torch, transformers, peft and accelerate;
# carry the rest as wheels for its Python, made here with e.g.
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection rich markdown-it-py mdurl pygments \
#       nvidia-ml-py tiktoken regex llama-models bitsandbytes \
#       fastapi starlette uvicorn h11 click anyio sniffio soxr
# (`.whl/` is git-ignored: name it in the device call's `carry`); this script installs them.
#
# Targets (bench/targets.py reads them from the JSON):
#   whole card, the guide's effective batch: ours >= 35% MFU; plain padded loop as the ceiling
#   24/12/8 GiB caps: ours >= 2x the stock Trainer with the guide's profile (speedup_vs_stock_profile)
#   dry run + compilation <= 60 s (runs[].dry_run.seconds)
#   Llasa-1B at 2,048 tokens in 8 GiB, 3B in 12 GiB, 3B 4-bit in 8 GiB: no OOM, peak <= 90% of the cap
#   memory estimate within +-5% without checkpointing (batch 4 and 8), +-2% with (batch 16)
#   no host sync in a steady non-logging step; kernel launches per 1,000 tokens (syncs.json)
#   the speech server at 16 concurrent clients: batched >= 3x one request at a time (serve.json)
#
# CHECKS="syncs caps" runs only the named steps (default: all, in the order below). In the CPU
# rehearsal the script exits 1 if a step failed or a JSON is missing, so a script error is found
# before a GPU's minutes are spent on it.
set -u
OUT=$(realpath -m "${OUT:-gpu-out}")   # before the cd: a relative OUT is the caller's
cd "$(dirname "$0")/.." || exit 1
DEVICE=${DEVICE:-cuda}
# A GPU call is cut at 9 minutes; the CPU rehearsal runs every step to its end (an hour at most).
DEADLINE=${DEADLINE:-$([[ $DEVICE == cpu ]] && echo 3600 || echo 540)}
[[ $DEADLINE =~ ^[0-9]+$ ]] || { echo "DEADLINE must be whole seconds, got '$DEADLINE'" >&2; exit 2; }
DEADLINE=$((10#$DEADLINE))   # "090" is ninety, not octal
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
    ONE=llasa-1b; THREE=llasa-3b; MEM=(--device cuda --model-shape llasa-1b --lora-r 64 --warmup 1 --steps 2)
    EST=(--model-shape llasa-1b --lora-r 64); SEQ=2048
    WHOLE=(--warmup 5 --timed 15); CAPS=(--warmup 3 --timed 8); LIMITS=24,12,8
    FIT=(--samples 32 --warmup 1 --timed 2 --fixed-seconds 37)   # ~2,040 tokens with the prompt
    SYNCS=(--device cuda --shape llasa-1b --samples 64 --steps 8 --log-every 4 --recompiles 0)
    AUTO=(--device cuda); FOUR_BIT=(--set model.load_in_4bit=true)
    # Most important first; on an 80 GB card batch 8 and 16 run out of memory within seconds.
    PLAN=(memory-b4-nockpt:40 whole-card:120 caps:150 target-1b-8gib:35 target-3b-12gib:45 target-3b-4bit-8gib:60
          syncs:40 memory-b8-nockpt:25 memory-b16-ckpt:25 serve:120 afbs:90 sweep:240)
    SERVE=(--device cuda --model llasa-1b-random --codec tiny --clients 1,16 --max-new-tokens 200)
else
    echo "device cpu" > "$OUT/gpu.csv"
    # Tiny shapes and a few steps: the same scripts, flags and files, in minutes.
    ONE=tiny; THREE=tiny; MEM=(--device cpu --model-shape tiny --warmup 1 --steps 1)
    EST=(--model-shape tiny --seq 256); SEQ=256
    WHOLE=(--samples 24 --warmup 1 --timed 2); CAPS=(--samples 24 --warmup 1 --timed 2); LIMITS=8
    FIT=(--samples 12 --warmup 1 --timed 2 --fixed-seconds 10)   # the plumbing, not 2,048-token rows
    SYNCS=(--device cpu --shape tiny --layers 2 --precision fp32 --samples 24 --steps 4 --log-every 2 --warmup 1
           --recompiles 6)
    AUTO=(--device cpu); FOUR_BIT=()   # 4-bit weights need a real checkpoint on CUDA: the plain tiny run
    PLAN=(memory-b4-nockpt:150 whole-card:300 caps:300 target-1b-8gib:200 target-3b-12gib:200
          target-3b-4bit-8gib:200 syncs:300 memory-b8-nockpt:90 memory-b16-ckpt:90 serve:200 afbs:200 sweep:300)
    SERVE=(--device cpu --model tiny --codec tiny --clients 1,4 --requests-per-client 2 --max-new-tokens 16)
fi

planned() {   # planned seconds of a step
    local item
    for item in "${PLAN[@]}"; do [[ ${item%%:*} == "$1" ]] && { echo "${item##*:}"; return; }; done
    echo 60
}
selected() { [[ -z ${CHECKS:-} || " $CHECKS " == *" $1 "* ]]; }

total=0
echo "== plan ($DEVICE, deadline ${DEADLINE}s):"
for item in "${PLAN[@]}"; do
    if selected "${item%%:*}"; then
        printf '   %-22s %4ss\n' "${item%%:*}" "${item##*:}"
        total=$((total + ${item##*:}))
    fi
done
echo "   total                  ${total}s$( ((total > DEADLINE)) && echo ": the last steps will be cut")"

FAILED=()
# step NAME command...: stdout to $OUT/NAME.stdout, stderr to $OUT/NAME.log, cut at its planned
# seconds or at the deadline, whichever comes first.
step() {
    local name=$1; shift
    selected "$name" || return 0
    local limit left
    limit=$(planned "$name")
    left=$(( DEADLINE - SECONDS ))
    if (( left < 30 )); then echo "== $name skipped: deadline"; FAILED+=("$name(deadline)"); return; fi
    (( limit > left - 10 )) && limit=$(( left - 10 ))   # room for timeout's -k
    echo "== $name (up to ${limit}s)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.log"
    local rc=$?
    echo "$name rc=$rc at ${SECONDS}s"
    (( rc == 0 )) || FAILED+=("$name(rc=$rc)")
}

# The estimator's figures for the measured memory steps, on the CPU while the GPU works.
ESTIMATES=()
if selected memory-b4-nockpt || selected memory-b8-nockpt || selected memory-b16-ckpt; then
    python3 bench/memory.py --estimate --json "${EST[@]}" --batch 4 --no-checkpointing --modes stock \
        > "$OUT/estimate-b4-nockpt.json" 2> "$OUT/estimate-b4-nockpt.log" & ESTIMATES+=($!)
    python3 bench/memory.py --estimate --json "${EST[@]}" --batch 8 --no-checkpointing --modes stock \
        > "$OUT/estimate-b8-nockpt.json" 2> "$OUT/estimate-b8-nockpt.log" & ESTIMATES+=($!)
    python3 bench/memory.py --estimate --json "${EST[@]}" --batch 16 --modes stock \
        > "$OUT/estimate-b16-ckpt.json" 2> "$OUT/estimate-b16-ckpt.log" & ESTIMATES+=($!)
fi

# 1. The measured peak the estimator is held to first (batch 8 and 16 come after the rest: an 80 GB
#    card runs out of memory there).
step memory-b4-nockpt bash -c "python3 bench/memory.py --json ${MEM[*]} --seq $SEQ --batch 4 --no-checkpointing --modes stock > '$OUT/memory-b4-nockpt.json'"
# 2. The whole card: ours (dry run, plan, compile/Liger as measured), the guide's profile as it
#    is, and the plain padded loop as the ceiling.
step whole-card python3 bench/autotune.py "${AUTO[@]}" --out "$OUT/whole-card.json" --shape $ONE --limits 0 \
    --runs ours,stock,ceiling "${WHOLE[@]}"
# 3. Cards of 24, 12 and 8 GiB: ours against the guide's profile for such a card (one on a CPU, which has no cap).
step caps python3 bench/autotune.py "${AUTO[@]}" --out "$OUT/caps.json" --shape $ONE --limits $LIMITS \
    --runs ours,stock "${CAPS[@]}"
# 4. The memory targets at ~2,048 tokens per sample (37 s of speech and its transcript).
step target-1b-8gib python3 bench/autotune.py "${AUTO[@]}" --out "$OUT/target-1b-8gib.json" --shape $ONE \
    --limits 8 --runs ours "${FIT[@]}"
step target-3b-12gib python3 bench/autotune.py "${AUTO[@]}" --out "$OUT/target-3b-12gib.json" --shape $THREE \
    --limits 12 --runs ours "${FIT[@]}"
if [[ $DEVICE == cpu ]] || python3 -c "import bitsandbytes" 2>/dev/null; then
    step target-3b-4bit-8gib python3 bench/autotune.py "${AUTO[@]}" --out "$OUT/target-3b-4bit-8gib.json" \
        --shape $THREE --limits 8 --runs ours "${FIT[@]}" "${FOUR_BIT[@]}"
else
    echo "== target-3b-4bit-8gib skipped: no bitsandbytes"
fi
# 5. Host syncs and kernel launches of a steady step, through the real pipeline.
step syncs python3 bench/syncs.py "${SYNCS[@]}" --out "$OUT/syncs.json"
# 6. The estimator's larger batches (stock loss; "oom" where the card is too small).
step memory-b8-nockpt bash -c "python3 bench/memory.py --json ${MEM[*]} --seq $SEQ --batch 8 --no-checkpointing --modes stock > '$OUT/memory-b8-nockpt.json'"
step memory-b16-ckpt bash -c "python3 bench/memory.py --json ${MEM[*]} --seq $SEQ --batch 16 --modes stock > '$OUT/memory-b16-ckpt.json'"
# 7. The speech server: batched requests against one at a time, at 1 and 16 clients.
if python3 -c "import fastapi, uvicorn" 2>/dev/null; then
    step serve python3 bench/serve.py "${SERVE[@]}" --out "$OUT/serve.json"
else
    echo "== serve skipped: no fastapi/uvicorn (carry their wheels)"
fi
# 8. Stock auto_find_batch_size (its final run only), then sweep trials per hour.
step afbs python3 bench/autotune.py "${AUTO[@]}" --out "$OUT/afbs.json" --shape $ONE --limits 0 --runs afbs \
    "${CAPS[@]}"
if [[ $DEVICE == cuda ]]; then
    step sweep python3 bench/sweep.py --out "$OUT/sweep.json" --shape llasa-1b --settings 1,auto,2 --trials 4 \
        --steps 20 --samples 200 --timeout 100
else
    step sweep python3 bench/sweep.py --out "$OUT/sweep.json" --device cpu --shape tiny --settings 1 --trials 2 \
        --steps 2 --samples 16 --timeout 250
fi

for pid in "${ESTIMATES[@]}"; do wait "$pid" || FAILED+=("estimate(pid $pid)"); done
python3 bench/targets.py "$OUT" > "$OUT/targets.json"
echo "targets: $OUT/targets.json; done at ${SECONDS}s"
if [[ $DEVICE == cpu ]]; then
    python3 bench/targets.py "$OUT" --require-files > /dev/null || FAILED+=("missing JSON")
    if (( ${#FAILED[@]} )); then echo "rehearsal failed: ${FAILED[*]}" >&2; exit 1; fi
fi
