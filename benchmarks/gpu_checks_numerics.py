"""benchmarks/gpu_check.py's sections on numbers and data (issue 23): bf16 and fp16 loss and gradient against fp32 on
the same ViT-B batch, and the training loader's images/s against the training step's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gpu_check_common import Context, check
from gpu_checks_training import ieee_fp32
from PIL import Image

import models_deepmim

LOSS_RTOL = 1e-2  # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding, far less on a mean over many tokens
GRAD_RTOL = 0.1  # the whole gradient vector, relative L2 distance
FP16_LOSS_SCALE = 2.0**10  # fp16 gradients are taken of a scaled loss, as the GradScaler does


def loss_and_grad(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, amp: str) -> tuple[float, Any]:
    """(loss, flattened gradient) of one training forward and backward under `amp` ('none': float32)."""
    from util.training import autocast_context

    model.zero_grad(set_to_none=True)
    with autocast_context(imgs.device, amp):
        loss = model(imgs, 0.75, noise=noise)[0]
    scale = FP16_LOSS_SCALE if amp == "fp16" else 1.0
    (loss.float() * scale).backward()
    grad = torch.cat([p.grad.double().flatten() / scale for p in model.parameters() if p.grad is not None])
    return float(loss), grad


def section_precision(ctx: Context) -> dict[str, Any]:
    """bf16 and fp16 autocast against fp32 (TF32 off) at ViT-B size on the same batch, weights and mask: relative
    error of the loss and of the whole gradient."""
    from util.datasets import normalize_on_device

    torch.manual_seed(0)
    model = models_deepmim.create_model(ctx.sizes["precision_model"], norm_pix_loss=True,
                                        **ctx.sizes["precision_kwargs"]).to(ctx.device)
    size, batch = model.patch_embed.img_size[0], ctx.sizes["precision_batch"]
    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    imgs = normalize_on_device(samples, ctx.device)
    noise = torch.rand(batch, model.num_patches, generator=generator).to(ctx.device)
    with ieee_fp32(ctx.device):
        loss32, grad32 = loss_and_grad(model, imgs, noise, "none")
    result: dict[str, Any] = {"model": ctx.sizes["precision_model"], "batch": batch, "loss_fp32": loss32}
    for amp in ("bf16", "fp16"):
        loss, grad = loss_and_grad(model, imgs, noise, amp)
        finite = bool(torch.isfinite(grad).all())
        rel_loss = abs(loss - loss32) / abs(loss32)
        rel_grad = float((grad - grad32).norm() / grad32.norm()) if finite else float("inf")
        result[amp] = {"loss": loss, "rel_err_loss": rel_loss, "rel_err_grad": rel_grad, "grad_finite": finite}
        check(rel_loss <= LOSS_RTOL, result, f"{amp}: loss differs from fp32 by {rel_loss:.2e} (> {LOSS_RTOL})")
        check(rel_grad <= GRAD_RTOL, result, f"{amp}: gradient differs from fp32 by {rel_grad:.2e} (> {GRAD_RTOL})")
    return result


def write_photo_folder(root: Path, num_images: int, size: tuple[int, int]) -> Path:
    """An ImageFolder of ImageNet-sized JPEGs (q90): scikit-image's photographs resized to about `size`."""
    from util.datasets import demo_photos

    photos = demo_photos()
    folder = root / "class0"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        photo = photos[i % len(photos)].resize((size[0] + i % 7, size[1]), Image.BICUBIC)
        array = np.asarray(photo)
        Image.fromarray(array[:, ::-1] if i % 2 else array).save(folder / f"img{i}.jpg", quality=90)
    return root


def step_images_per_s(ctx: Context, batch: int, input_size: int, steps: int) -> float:
    """Images/s of pre-training steps (engine_pretrain's step, fused AdamW) of the precision section's model (ViT-B
    DeepMIM on a GPU) at `input_size`."""
    from gpu_checks_hardware import release_cuda, train_steps

    from util import amp as amp_util

    amp = amp_util.default_amp(str(ctx.device)) if ctx.cuda else "none"
    model = models_deepmim.create_model(ctx.sizes["precision_model"], norm_pix_loss=True,
                                        **ctx.sizes["precision_kwargs"]).to(ctx.device)
    train_steps(model, ctx.device, amp, batch, input_size, steps=2)  # warm-up: allocator, cuDNN autotuning
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    start = time.perf_counter()
    train_steps(model, ctx.device, amp, batch, input_size, steps=steps)
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
    rate = steps * batch / (time.perf_counter() - start)
    del model
    release_cuda(ctx.device)
    return rate


def section_loader(ctx: Context) -> dict[str, Any]:
    """The training loader (main_pretrain's dataset and loader, default worker count on this machine) in images/s on
    ImageNet-sized JPEGs, against the images/s of the training step it feeds: below 1, the GPU waits for data."""
    import main_pretrain
    from util.datasets import default_num_workers

    sizes = ctx.sizes
    folder = write_photo_folder(ctx.work / "photos", sizes["loader_images"], sizes["loader_image_size"])
    workers = default_num_workers() if ctx.cuda else 0
    args = main_pretrain.parse_args(["--data_path", str(folder), "--input_size", str(sizes["mem_input"]),
                                     "--batch_size", str(sizes["loader_batch"]), "--num_workers", str(workers),
                                     "--device", ctx.device.type, "--norm_pix_loss"])
    args.device = ctx.device.type
    loader = main_pretrain.build_loader(main_pretrain.build_dataset(args), args)
    passes, images = 0, 0
    start = None
    for epoch in range(sizes["loader_passes"] + 1):  # the first pass starts the workers: not timed
        loader.sampler.set_epoch(epoch)
        if epoch == 1:
            start = time.perf_counter()
        for samples, _, _ in loader:
            images += len(samples) if epoch else 0
        passes += bool(epoch)
    loader_rate = images / (time.perf_counter() - start)
    step_rate = step_images_per_s(ctx, sizes["loader_batch"], sizes["mem_input"], sizes["loader_steps"])
    result = {"workers": workers, "loader_images_per_s": loader_rate, "step_images_per_s": step_rate,
              "loader_over_step": loader_rate / step_rate, "image_size": list(sizes["loader_image_size"]),
              "input_size": sizes["mem_input"], "batch": sizes["loader_batch"]}
    check(images == passes * (sizes["loader_images"] // sizes["loader_batch"]) * sizes["loader_batch"], result,
          f"the loader gave {images} images in {passes} passes")
    if result["loader_over_step"] < 1:
        result["note"] = "the loader is slower than the step on this machine: the GPU would wait for data"
    return result
