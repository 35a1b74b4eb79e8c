"""Semantic segmentation benchmark (paper Tab. 4 setting): the ViT-B UperNet training step at 512x512 with 2 images
per GPU, sliding-window evaluation, and the estimated training memory per GPU.

The training step is main_segmentation's (`engine_segmentation.make_step_loss`: autocast forward, decode + 0.4 x
auxiliary cross-entropy in float32, backward, AdamW over the released layer-decay groups) on a synthetic normalised
batch; evaluation is `segmentation.inference.slide_inference` on an ADE20K-shaped image after the test resize
(512 x 683: two 512 windows at stride 341). FLOPs are counted, not modelled (torch.utils.flop_counter over one
forward + backward, or one window's forward); utilisation divides them by the best square-matmul rate measured in
the same run (`bench_pretrain.matmul_peak`). Memory is `util.memory`'s estimate: tensors saved for the backward
measured on this machine under the training autocast (loss included), weights, gradients, AdamW, DDP buckets, 10 %
fragmentation and 768 MiB of CUDA context; the GPU numbers are estimates, not measurements.

    python benchmarks/bench_segmentation.py --threads 1            # the numbers in RESULTS.md (2-core CPU)
    python benchmarks/bench_segmentation.py --device cuda --amp bf16 --steps 10   # one GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pretrain import AMP_DTYPES, matmul_peak, synchronize  # noqa: E402

from engine_segmentation import make_step_loss  # noqa: E402
from segmentation.inference import slide_inference  # noqa: E402
from segmentation.segmentor import create_segmentor, segmentation_loss  # noqa: E402
from util import memory  # noqa: E402
from util.layer_decay import param_groups_layer_decay  # noqa: E402

VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
GPUS = {"V100 16 GB, fp16": (16_945_512_448, "fp16"), "A100 80 GB, bf16": (85_100_000_000, "bf16"),
        "H100 80 GB, bf16": (85_000_000_000, "bf16")}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Segmentation benchmark", add_help=False)
    parser.add_argument("--batch_size", default=2, type=int, help="images per GPU (released: 2)")
    parser.add_argument("--input_size", default=512, type=int)
    parser.add_argument("--amp", default="bf16", choices=tuple(AMP_DTYPES), help="autocast of the timed step")
    parser.add_argument("--steps", default=3, type=int)
    parser.add_argument("--warmup", default=1, type=int)
    parser.add_argument("--eval_images", default=2, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default=None, type=int, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--no_memory", action="store_true", help="skip the memory estimate")
    return parser


class LossStep(nn.Module):
    """forward(images, labels) -> the training loss, so that the memory probe also counts what the loss saves
    (logits upsampled to 512 x 512 for both heads). Probes use 2 and 4 images: BatchNorm needs more than one value
    per channel on the 1 x 1 pooled map in training mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return segmentation_loss(self.model, self.model(images), labels)[0]


def batch(n: int, size: int, device: torch.device, classes: int = 150) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(n)
    return (torch.randn(n, 3, size, size, generator=g).to(device),
            torch.randint(0, classes, (n, size, size), generator=g).to(device))


def time_training(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    optimizer = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.9, depth=12, prefix="backbone.vit."),
                                  lr=5e-5, fused=True)
    step_loss = make_step_loss(model, model, device, args.amp)
    images, labels = batch(args.batch_size, args.input_size, device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        step_loss(images, labels)[0].backward()
    optimizer.zero_grad(set_to_none=True)
    timed = timed_steps(lambda: step_loss(images, labels)[0], optimizer, args, device)
    return dict(**timed, images_per_s=args.batch_size / timed["step_s"], flops=counter.get_total_flops())


def timed_steps(loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                device: torch.device) -> dict[str, float | None]:
    """Median wall and CPU seconds of `args.steps` training steps (forward, backward, optimizer step) after
    `args.warmup`, and the peak reserved GPU memory (GiB; None on the CPU)."""
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    return dict(step_s=statistics.median(times), step_cpu_s=statistics.median(cpu_times), peak_reserved_gib=peak)


def time_evaluation(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model.eval()
    image = torch.randn(1, 3, args.input_size, args.input_size * 4 // 3, device=device)  # 512 x 683: 2 windows
    with torch.no_grad(), FlopCounterMode(display=False) as counter, torch.autocast(device.type, AMP_DTYPES[
            args.amp], enabled=args.amp != "none"):
        slide_inference(model.predict, image, 150, args.input_size, 341)
    times = []
    with torch.no_grad(), torch.autocast(device.type, AMP_DTYPES[args.amp], enabled=args.amp != "none"):
        for _ in range(args.eval_images):
            synchronize(device)
            start = time.perf_counter()
            slide_inference(model.predict, image, 150, args.input_size, 341)
            synchronize(device)
            times.append(time.perf_counter() - start)
    per_image = statistics.median(times)
    return dict(eval_s=per_image, eval_images_per_s=1 / per_image, eval_flops=counter.get_total_flops())


def memory_rows(model: nn.Module, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """One estimate under bf16 autocast, applied to every GPU: fp16 saves the same bytes (2 per element) and
    autocast keeps the same ops in float32 under both."""
    estimate = memory.estimate_training_memory(
        LossStep(model), args.batch_size, amp="bf16", device=device, ddp=True, probe_batch=2,
        make_batch=lambda n: batch(n, args.input_size, device))
    return gpu_rows(estimate, GPUS)


def gpu_rows(estimate: memory.MemoryEstimate, gpus: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
    """Per GPU (name -> (bytes, autocast)): saved bytes per image, the total at the estimate's batch, whether it fits
    (90 %) and the largest batch up to 64 that does."""
    rows = []
    for gpu, (total, amp) in gpus.items():
        largest = max([n for n in range(1, 65) if memory.fits(estimate.with_batch(n), total)], default=0)
        rows.append(dict(gpu=gpu, amp=amp, per_image_gib=estimate.activations_per_image / 2**30,
                         total_gib=estimate.total / 2**30, fits=memory.fits(estimate, total), largest_batch=largest))
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cpu_start = time.process_time()
    model = create_segmentor(VIT_B, 150, img_size=args.input_size).to(device)
    peak = matmul_peak(device, AMP_DTYPES[args.amp], [1024, 2048])
    train = time_training(model, args, device)
    evaluation = time_evaluation(model, args, device)
    result = {**train, **evaluation, "peak_tflops": peak / 1e12,
              "mfu": train["flops"] / train["step_s"] / peak, "eval_mfu": evaluation["eval_flops"] /
              evaluation["eval_s"] / peak, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    result["cpu_s"] = time.process_time() - cpu_start
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, amp {args.amp}, ViT-B UperNet ({result['params_m']:.1f} M params), "
          f"{args.input_size} px, {args.batch_size} images per step")
    print(f"| training step | {train['step_s']:.2f} s ({train['step_cpu_s']:.2f} s CPU) | "
          f"{train['images_per_s']:.3f} img/s | "
          f"{train['flops'] / 1e12:.2f} TFLOP per step | MFU {100 * result['mfu']:.1f} % of "
          f"{result['peak_tflops']:.2f} TFLOP/s |")
    print(f"| sliding-window eval (512 x 683, 2 windows) | {evaluation['eval_s']:.2f} s | "
          f"{evaluation['eval_images_per_s']:.3f} img/s | {evaluation['eval_flops'] / 1e12:.2f} TFLOP per image | "
          f"MFU {100 * result['eval_mfu']:.1f} % |")
    if train["peak_reserved_gib"] is not None:
        print(f"peak reserved GPU memory of the training steps (one process, no DDP buckets): "
              f"{train['peak_reserved_gib']:.2f} GiB")
    if not args.no_memory:
        result["memory"] = memory_rows(model, args, device)
        print("\n| GPU, autocast (estimate) | saved per image, GiB | total per GPU at "
              f"{args.batch_size} / GPU with DDP, GiB | fits (90 %) | largest batch that fits |")
        for row in result["memory"]:
            print(f"| {row['gpu']} | {row['per_image_gib']:.2f} | {row['total_gib']:.2f} | "
                  f"{'yes' if row['fits'] else 'no'} | {row['largest_batch']} |")
    print(f"\nCPU time of this run: {time.process_time() - cpu_start:.0f} s")
    return result


if __name__ == "__main__":
    main(argparse.ArgumentParser("Segmentation benchmark", parents=[get_args_parser()]).parse_args())
