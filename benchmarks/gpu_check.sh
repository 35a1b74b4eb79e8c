#!/usr/bin/env bash
# One prepared GPU check (issue 6): the benchmark table for ViT-B DeepMIM, DeepMIM-dagger and MAE at bf16 on one
# NVIDIA GPU, then the torch.compile gain and GPU JPEG decoding. About 5 minutes on an H100; paste the output into
# benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh            # batch 128 per GPU (the paper's 4096 = 32 x 128)
#   BATCH=256 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${BATCH:-128}
export PYTHONWARNINGS=ignore::DeprecationWarning

echo "== $(date -u +%FT%TZ)  $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"

echo "== step: DeepMIM, DeepMIM-dagger, MAE (ViT-B/16, bf16, fused AdamW, fused attention)"
python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 20 --warmup 5 \
    --model deepmim_vit_base_patch16 mae_vit_base_patch16 --hybrid --adamw fused --attn sdpa

echo "== step: the same with torch.compile (compile time excluded)"
python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 20 --warmup 5 \
    --model deepmim_vit_base_patch16 mae_vit_base_patch16 --adamw fused --attn sdpa --compile

echo "== step: per target (HOG, CLIP and DINO teachers with random weights: same cost)"
python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 10 --warmup 3 \
    --model deepmim_vit_base_patch16 --target hog clip dino --adamw fused

echo "== step: profile of one DeepMIM step"
python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch_size "$BATCH" --steps 3 --warmup 3 \
    --model deepmim_vit_base_patch16 --adamw fused --profile

echo "== data: CPU pipeline per worker, and nvJPEG decode + crop-resize on the GPU"
python benchmarks/bench_data.py --num_images 512 --repeats 2 --psnr_images 50 --gpu_decode

echo "== machine: GPU, capability, kernels of this torch build, and util/amp.py's decisions (issue: cluster path)"
python - <<'PY'
import torch
from util import amp
cap = amp.cuda_capability("cuda")
print("gpu", torch.cuda.get_device_name(0), "capability %d.%d" % cap, "torch", torch.__version__,
      "cuda", torch.version.cuda, "arch_list", torch.cuda.get_arch_list())
print("default_amp('cuda') =", amp.default_amp("cuda"), " autocast_dtype_for('cuda') =", amp.autocast_dtype_for("cuda"),
      " is_bf16_supported() =", torch.cuda.is_bf16_supported())
try:
    amp.check_cuda_arch("cuda")
    print("check_cuda_arch('cuda'): ok")
except RuntimeError as err:
    print("check_cuda_arch('cuda'): FAILS:", err)
PY
