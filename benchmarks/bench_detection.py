"""Detection benchmark (paper Tab. 3 setting): the ViT-B Mask R-CNN training step (windowed attention, multi-block
pyramid, v2 heads) and its estimated training memory per GPU at 1024x1024, 2 images per GPU (batch 16 on 8 GPUs).

The step is main_detection's (`engine_detection.make_step_loss`: autocast forward of torchvision's Mask R-CNN in
training mode, the five losses summed, backward, AdamW over `detection.model.param_groups`) on synthetic images with
COCO's mean of 7 objects per image (random boxes, their masks). FLOPs are counted, not modelled
(torch.utils.flop_counter over one forward + backward, plus the attention products, which it cannot see in
the fused CPU kernels: `attention_flops`); utilisation divides them by the best square-matmul rate
measured in the same run (`bench_pretrain.matmul_peak`). Memory is `util.memory`'s estimate at --memory_size: tensors
saved for the backward measured on this machine under bf16 autocast (fp16 saves the same bytes; the per-image /
fixed split is measured at two smaller sizes, see `memory_estimate`), weights, gradients, AdamW, DDP buckets, 10 %
fragmentation and 768 MiB of CUDA context; the GPU rows are estimates, not measurements (the saved tensors of CPU
kernels, e.g. attention, can differ from the CUDA kernels').

    python benchmarks/bench_detection.py --threads 1 --input_size 512 --batch_size 1 --no_memory  # RESULTS.md (CPU)
    python benchmarks/bench_detection.py --threads 1 --no_timing     # memory per GPU at 1024 px (~15 GB of RAM)
    python benchmarks/bench_detection.py --device cuda --amp bf16 --input_size 1024 --steps 10 --no_memory  # a GPU
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pretrain import AMP_DTYPES, matmul_peak  # noqa: E402
from bench_segmentation import gpu_rows, timed_steps  # noqa: E402

from detection.backbone import create_detection_backbone  # noqa: E402
from detection.model import build_maskrcnn, param_groups  # noqa: E402
from engine_detection import make_step_loss  # noqa: E402
from util import memory  # noqa: E402

VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
GPUS = {"V100 32 GB, fp16": (34_089_926_656, "fp16"), "A100 80 GB, bf16": (85_100_000_000, "bf16"),
        "H100 80 GB, bf16": (85_000_000_000, "bf16")}
OBJECTS = 7  # COCO train2017: 860k instances on 117k images


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Detection benchmark", add_help=False)
    parser.add_argument("--batch_size", default=2, type=int, help="images per GPU (16 on 8 GPUs)")
    parser.add_argument("--input_size", default=1024, type=int, help="side of the timed step's images")
    parser.add_argument("--memory_size", default=1024, type=int, help="side of the images of the memory estimate")
    parser.add_argument("--memory_batch", default=2, type=int, help="images per GPU of the memory estimate")
    parser.add_argument("--split_sizes", default=[512, 768], type=int, nargs=2,
                        help="sizes at which the per-image / fixed split of the saved bytes is measured")
    parser.add_argument("--amp", default="bf16", choices=tuple(AMP_DTYPES), help="autocast of the timed step")
    parser.add_argument("--steps", default=2, type=int)
    parser.add_argument("--warmup", default=1, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=None, type=int, help="torch threads (2 on the shared 2-core CPU)")
    parser.add_argument("--no_memory", action="store_true", help="skip the memory estimate")
    parser.add_argument("--no_timing", action="store_true",
                        help="only the memory estimate (on a CPU with little RAM, run it apart from the timing)")
    return parser


def detector(size: int, device: torch.device) -> nn.Module:
    """ViT-B Mask R-CNN at `size` (80 COCO classes)."""
    torch.manual_seed(0)
    return build_maskrcnn(create_detection_backbone(VIT_B, size), 80, size).to(device)


def batch(n: int, size: int, device: torch.device) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """uint8 images (n, 3, size, size) and targets of OBJECTS random boxes each, masks filling their boxes."""
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(n):
        corner = torch.rand(OBJECTS, 2, generator=g) * size * 0.7
        extent = (torch.rand(OBJECTS, 2, generator=g) * 0.25 + 0.05) * size
        boxes = torch.cat([corner, corner + extent], 1).round()
        masks = torch.zeros(OBJECTS, size, size, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        labels = torch.randint(1, 81, (OBJECTS,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images.to(device), targets


class LossStep(nn.Module):
    """forward(images, targets) -> the summed training loss (the memory probe counts the whole step)."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.step_loss = model, make_step_loss(model, device, "none")

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        return self.step_loss(images, targets)[0]


def attention_flops(model: nn.Module) -> int:
    """FLOPs of one image's attention products (QK^T and AV: 4 x tokens^2 x width per window, padded windows
    computed in full), forward + backward (x 3). torch's flop counter does not see inside the fused attention
    kernels of the CPU, so they are added by this formula."""
    vit = model.backbone.body.vit
    height, width = vit.patch_embed.grid_size
    total = 0
    for block in vit.blocks:
        w = block.attn.window
        windows, area = (math.ceil(height / w) * math.ceil(width / w), w * w) if w else (1, height * width)
        total += 4 * area**2 * vit.embed_dim * windows
    return 3 * total


def time_training(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, 0.75), lr=1e-4, fused=device.type == "cuda")
    step_loss = make_step_loss(model, device, args.amp)
    images, targets = batch(args.batch_size, args.input_size, device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        step_loss(images, targets)[0].backward()
    optimizer.zero_grad(set_to_none=True)
    timed = timed_steps(lambda: step_loss(images, targets)[0], optimizer, args, device)
    attention = attention_flops(model) * args.batch_size
    return dict(**timed, images_per_s=args.batch_size / timed["step_s"], flops=counter.get_total_flops() + attention,
                attention_flops=attention)


def saved_bytes(size: int, images: int, device: torch.device) -> int:
    """Bytes autograd saves in one bf16-autocast training forward (loss included) of `images` at `size` px."""
    return memory.measure_saved_bytes(LossStep(detector(size, device), device), batch(images, size, device), "bf16")[0]


def memory_estimate(args: argparse.Namespace, device: torch.device) -> memory.MemoryEstimate:
    """util.memory's estimate at --memory_size, --memory_batch images per GPU, under DDP.

    The estimator's two probes (1 and 2 images) at 1024 px need more RAM than this machine has, so the split is
    measured apart: one image's saved bytes at --memory_size; the batch-independent part (autocast's weight copies,
    and the global blocks' relative position biases, which grow with tokens^2) measured with 1 and 2 images at the
    two --split_sizes and extrapolated as a + b x tokens^2; per image = one image's bytes - that part."""
    tokens = {size: (size // VIT_B["patch_size"]) ** 2 for size in (*args.split_sizes, args.memory_size)}
    model = detector(args.memory_size, device)  # first: the largest probe, while the process is small
    one = memory.measure_saved_bytes(LossStep(model, device), batch(1, args.memory_size, device), "bf16")[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights, grads = memory.tensor_bytes([*model.parameters(), *model.buffers()]), memory.tensor_bytes(trainable)
    optimizer = 2 * sum(p.numel() * 4 for p in trainable)  # AdamW: two float32 moments
    del model, trainable
    fixed = {}
    for size in args.split_sizes:
        single, double = saved_bytes(size, 1, device), saved_bytes(size, 2, device)
        fixed[size] = 2 * single - double
        print(f"saved at {size} px: {single / 2**30:.3f} GiB (1 image), {double / 2**30:.3f} GiB (2): fixed "
              f"{fixed[size] / 2**30:.3f} GiB", flush=True)
    (s1, f1), (s2, f2) = fixed.items()
    slope = (f2 - f1) / (tokens[s2] ** 2 - tokens[s1] ** 2)
    fixed_bytes = int(f1 + slope * (tokens[args.memory_size] ** 2 - tokens[s1] ** 2))
    print(f"saved at {args.memory_size} px: {one / 2**30:.3f} GiB (1 image), of which fixed (extrapolated) "
          f"{fixed_bytes / 2**30:.3f} GiB", flush=True)
    return memory.MemoryEstimate(
        batch_size=args.memory_batch, grad_ckpt=False, activations_per_image=one - fixed_bytes,
        fixed_activations=fixed_bytes, recompute_per_image=0, weights=weights, grads=grads, optimizer=optimizer,
        ddp_buckets=grads, reserve=memory.DEFAULT_RESERVE)


def timing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The timed training step at --input_size, its counted FLOPs and utilisation, printed as a table row."""
    model = detector(args.input_size, device)
    peak = matmul_peak(device, AMP_DTYPES[args.amp], [1024, 2048])
    result = {**time_training(model, args, device), "peak_tflops": peak / 1e12,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    result["mfu"] = result["flops"] / result["step_s"] / peak
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, amp {args.amp}, ViT-B Mask R-CNN ({result['params_m']:.1f} M "
          f"params), {args.input_size} px, {args.batch_size} images per step")
    print(f"| training step | {result['step_s']:.2f} s ({result['step_cpu_s']:.2f} s CPU) | "
          f"{result['images_per_s']:.3f} img/s | {result['flops'] / 1e12:.2f} TFLOP per step (attention "
          f"{result['attention_flops'] / 1e12:.2f}) | MFU "
          f"{100 * result['mfu']:.1f} % of {result['peak_tflops']:.2f} TFLOP/s |")
    if result["peak_reserved_gib"] is not None:
        print(f"peak reserved GPU memory of the timed steps: {result['peak_reserved_gib']:.2f} GiB")
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu_start = time.process_time()
    estimate = None if args.no_memory else memory_estimate(args, device)  # first: its probes need the most RAM
    result = {} if args.no_timing else timing(args, device)
    if estimate is not None:
        result["memory"] = gpu_rows(estimate, GPUS)
        print(f"\n| GPU, autocast (estimate) | saved per image at {args.memory_size} px, GiB | total per GPU at "
              f"{args.memory_batch} / GPU with DDP, GiB | fits (90 %) | largest batch that fits |")
        for row in result["memory"]:
            print(f"| {row['gpu']} | {row['per_image_gib']:.2f} | {row['total_gib']:.2f} | "
                  f"{'yes' if row['fits'] else 'no'} | {row['largest_batch']} |")
    result["cpu_s"] = time.process_time() - cpu_start
    print(f"\nCPU time of this run: {result['cpu_s']:.0f} s")
    return result


if __name__ == "__main__":
    main(argparse.ArgumentParser("Detection benchmark", parents=[get_args_parser()]).parse_args())
