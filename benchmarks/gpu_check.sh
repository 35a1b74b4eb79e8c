#!/usr/bin/env bash
# GPU readiness check (issues "GPU readiness" and 23): ONE command, about 7 minutes on one lent GPU with 16 cores,
# driven by benchmarks/gpu_check.py (its docstring lists the sections). Each section is reported even when an
# earlier one fails; a section that would not fit in the time left is reported as skipped.
#
#   bash benchmarks/gpu_check.sh                       # writes $OUT/gpu_check.json (or ./gpu_check.json), prints a table
#   LIMIT=600 bash benchmarks/gpu_check.sh             # another hard limit in seconds (default 420)
#   bash benchmarks/gpu_check.sh --sections memory     # extra flags go to gpu_check.py
#   bash benchmarks/gpu_check.sh --dry-run             # every section's code path on the CPU, tiny sizes (the suite)
#   EXTRA=1 bash benchmarks/gpu_check.sh               # then the longer benchmark tables (targets, profile, data,
#                                                      # segmentation and detection steps)
#
# At the limit the check and everything it started (torchrun, training runs, loader workers) get SIGTERM, then
# SIGKILL 15 s later: no orphan keeps the GPU. Paste the printed table into benchmarks/RESULTS.md; the JSON holds
# every number.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-420}
OUTPUT=${OUTPUT:-${OUT:-.}/gpu_check.json}
PY=$(command -v python || command -v python3) || { echo "gpu_check: neither python nor python3 found"; exit 127; }
export PYTHONWARNINGS=ignore::DeprecationWarning

ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then ARGS+=(--device cpu --tiny); else ARGS+=("$arg"); fi
done

echo "== $(date -u +%FT%TZ)  $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"

# The check runs in its own session; at the limit it gets SIGTERM and stops every process it started, with their
# descendants (torchrun's workers live in sessions of their own); 15 s later whatever is left of the session gets
# SIGKILL. Sections share a budget 40 s under the limit (the JSON is rewritten after each).
kill_session() { pkill -KILL -s "$pid" 2>/dev/null || kill -KILL -- -"$pid" 2>/dev/null; }  # pkill: procps
setsid "$PY" benchmarks/gpu_check.py --output "$OUTPUT" --time_budget $((LIMIT - 40)) "${ARGS[@]}" &
pid=$!
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM  # the check ended first: no sleep outlives the script
    sleep "$LIMIT" >/dev/null 2>&1 &
    sleeper=$!
    wait "$sleeper"
    echo "gpu_check: hit the ${LIMIT} s limit; finished sections are in $OUTPUT"
    kill -TERM "$pid" 2>/dev/null  # the check stops what it started (torchrun's workers too), within 10 s
    sleep 15 >/dev/null 2>&1 &
    sleeper=$!
    wait "$sleeper"
    kill_session
) &
watchdog=$!
wait "$pid"
status=$?
kill "$watchdog" 2>/dev/null
wait "$watchdog" 2>/dev/null
kill_session  # anything of the check still alive (a child that outlived it)

if [ "${EXTRA:-0}" = "1" ]; then
    BATCH=${BATCH:-128}
    echo "== extra: per target (HOG; CLIP, DINO teachers and the VQ-KD tokenizer with random weights: same cost)"
    "$PY" benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 10 --warmup 3 \
        --model deepmim_vit_base_patch16 --target hog clip dino codebook --hybrid --adamw fused
    echo "== extra: profile of one DeepMIM step"
    "$PY" benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 3 --warmup 3 \
        --model deepmim_vit_base_patch16 --adamw fused --profile
    echo "== extra: data: the CPU pipeline per worker and through a DataLoader"
    "$PY" benchmarks/bench_data.py --num_images 512 --repeats 2 --psnr_images 50
    echo "== extra: ViT-B UperNet (512 px) and Mask R-CNN (1024 px), 2 images per GPU: img/s, MFU, peak memory"
    "$PY" benchmarks/bench_segmentation.py --device cuda --amp bf16 --steps 10 --warmup 3 --eval_images 5
    "$PY" benchmarks/bench_detection.py --device cuda --amp bf16 --steps 10 --warmup 3 --no_memory
fi
exit "$status"
