"""One epoch of DeepMIM pre-training: the masking noise every decoder shares (drawn by the run's masking strategy,
paper Tab. 12), the reconstruction targets, and the summed decoder losses (Eq. 2), run by
`util.training.train_epoch` (autocast, gradient accumulation, grad scaling, per-iteration lr schedule); plus the
reconstruction panels logged during training.

The step never waits for the device: losses stay on the device and are read only every `print_freq` steps, when
they are also checked for non-finite values (the step that first went bad is named).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from analysis.visualize import reconstruction_panels
from util.datasets import normalize_on_device
from util.training import NonFiniteLossError, OnUpdate, autocast_context, train_epoch

__all__ = ["MaskNoiseFn", "NonFiniteLossError", "TargetsFn", "autocast_context", "compute_targets",
           "reconstructions", "train_one_epoch"]

logger = logging.getLogger(__name__)

# targets_fn(imgs, noise) -> None (pixel targets), (N, L, C), or {block: (N, L, C)}
TargetsFn = Callable[[Tensor, Tensor], Any]
# mask_noise_fn(imgs[, uniform]) -> (N, L) masking noise, the smallest kept (a `targets.masking.MaskStrategy`)
MaskNoiseFn = Callable[..., Tensor]


def compute_targets(targets_fn: TargetsFn | None, imgs: Tensor, noise: Tensor) -> Any:
    """Every reconstruction target (HOG, teacher features, the DeepMIM+ blend of Eq. 1) is computed here, in float32
    with autocast off, whatever region the caller is in: frozen teachers and the generator open their own autocast
    for their forward pass, and their outputs are cast back to float32. None (pixel targets) lets the model compute
    them, also in float32 (`MaskedAutoencoderDeepMIM.pixel_targets`)."""
    if targets_fn is None:
        return None
    with torch.autocast(imgs.device.type, enabled=False):
        targets = targets_fn(imgs.float(), noise)
    if isinstance(targets, Tensor):
        return targets.float()
    return {block: target.float() for block, target in targets.items()}


def train_one_epoch(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: Any,
    targets_fn: TargetsFn | None = None,
    log_writer: Any = None,
    start_step: int = 0,
    on_update: OnUpdate | None = None,
    mask_noise_fn: MaskNoiseFn | None = None,
) -> dict[str, float]:
    """Train for one epoch (`util.training.train_epoch`); returns the epoch's average of every logged value (loss,
    loss_b<k>, lr) and the number of unreadable images skipped (`bad_images`).

    Each step draws one masking noise that every decoder and the DeepMIM-dagger generator share (`mask_noise_fn`,
    the run's masking strategy; None: the model's uniform noise, MAE's random masking), computes the targets
    (`compute_targets`) and sums the decoders' losses (Eq. 2, in the model's forward).
    """
    raw_model = model.module if hasattr(model, "module") else model

    def step_loss(samples: Tensor, _labels: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        imgs = normalize_on_device(samples, device)
        # one mask for every decoder and the generator
        noise = raw_model.make_noise(imgs.shape[0], device) if mask_noise_fn is None else mask_noise_fn(imgs)
        targets = compute_targets(targets_fn, imgs, noise)
        with autocast_context(device, args.amp):
            loss, losses, _, _ = model(imgs, args.mask_ratio, noise=noise, targets=targets)
        return loss, losses

    return train_epoch(model, data_loader, optimizer, scaler, epoch, args, step_loss, log_writer=log_writer,
                       start_step=start_step, on_update=on_update)


@torch.no_grad()
def reconstructions(model: nn.Module, dataset: Any, targets_fn: TargetsFn | None, mask_ratio: float,
                    num_images: int = 8, mask_noise_fn: MaskNoiseFn | None = None) -> dict:
    """Panels (original, masked, every decoder, DeepMIM+ targets) for the first images with a fixed mask: uniform
    numbers from a generator seeded by 0, turned into noise by the run's masking strategy (`mask_noise_fn`)."""
    device = next(model.parameters()).device
    samples = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
    imgs = normalize_on_device(samples, device)
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    if mask_noise_fn is not None:
        noise = mask_noise_fn(imgs, noise)
    hybrid = compute_targets(targets_fn, imgs, noise)  # None for pixel targets, {block: target} for DeepMIM+
    return reconstruction_panels(model, imgs, noise, mask_ratio, hybrid_targets=hybrid)
