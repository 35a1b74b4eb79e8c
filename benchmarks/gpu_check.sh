#!/usr/bin/env bash
# GPU readiness check (issue "GPU readiness"): ONE command, under 10 minutes on one lent GPU, driven by
# benchmarks/gpu_check.py. Sections (each reported even when an earlier one fails): machine (capability, arch list,
# default amp), sample seeding vs the CUDA RNG, torchrun + main_pretrain.py with one rank (NCCL; bf16, fp16,
# --compile; losses finite and falling), fp32 CPU parity of one step, SIGTERM mid-epoch -> checkpoint ->
# --resume auto, peak memory of ViT-B DeepMIM at batch 128 (+/- --grad_ckpt, 16 GB cap) vs util/memory.py's
# estimate, img/s and MFU (spec sheet and measured matmul peak, +/- torch.compile), tests/test_host_syncs.py.
#
#   bash benchmarks/gpu_check.sh                       # writes $OUT/gpu_check.json (or ./gpu_check.json), prints a table
#   LIMIT=900 bash benchmarks/gpu_check.sh             # another hard limit in seconds (default 570)
#   bash benchmarks/gpu_check.sh --sections memory     # extra flags go to gpu_check.py
#   EXTRA=1 bash benchmarks/gpu_check.sh               # then the longer benchmark tables (targets, profile, data)
#
# Dry run of every section's code path on a CPU (what tests/test_gpu_check.py runs):
#   python benchmarks/gpu_check.py --device cpu --tiny
# Paste the printed table into benchmarks/RESULTS.md; the JSON holds every number.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-570}
OUTPUT=${OUTPUT:-${OUT:-.}/gpu_check.json}
export PYTHONWARNINGS=ignore::DeprecationWarning

echo "== $(date -u +%FT%TZ)  $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'torchvision', torchvision.__version__, 'timm', timm.__version__)"

# The sections share a budget 40 s under the hard limit (a section that would not fit is skipped and reported);
# the hard limit SIGTERMs, then SIGKILLs 15 s later. The JSON is rewritten after every section.
timeout --kill-after=15 "$LIMIT" python benchmarks/gpu_check.py --output "$OUTPUT" --time_budget $((LIMIT - 40)) "$@"
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu_check: hit the ${LIMIT} s limit; finished sections are in $OUTPUT"
fi

if [ "${EXTRA:-0}" = "1" ]; then
    BATCH=${BATCH:-128}
    echo "== extra: per target (HOG, CLIP and DINO teachers with random weights: same cost)"
    python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 10 --warmup 3 \
        --model deepmim_vit_base_patch16 --target hog clip dino --hybrid --adamw fused
    echo "== extra: profile of one DeepMIM step"
    python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 3 --warmup 3 \
        --model deepmim_vit_base_patch16 --adamw fused --profile
    echo "== extra: data: CPU pipeline per worker, and nvJPEG decode + crop-resize on the GPU"
    python benchmarks/bench_data.py --num_images 512 --repeats 2 --psnr_images 50 --gpu_decode
fi
exit "$status"
