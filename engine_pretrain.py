"""One epoch of DeepMIM pre-training: autocast, gradient accumulation, grad scaling, per-iteration lr schedule.

The step never waits for the device: losses stay on the device and are read only every `print_freq` steps, when
they are also checked for non-finite values (the step that first went bad is named).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from analysis.visualize import reconstruction_panels
from util import lr_sched
from util.datasets import normalize_on_device
from util.misc import MetricLogger, SmoothedValue
from util.training import (
    NonFiniteGuard,
    NonFiniteLossError,
    accumulation_context,
    autocast_context,
    check_bad_images,
)

__all__ = ["NonFiniteLossError", "TargetsFn", "autocast_context", "compute_targets", "reconstructions",
           "train_one_epoch"]

logger = logging.getLogger(__name__)

# targets_fn(imgs, noise) -> None (pixel targets), (N, L, C), or {block: (N, L, C)}
TargetsFn = Callable[[Tensor, Tensor], Any]


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
    on_update: Callable[[int, int, Callable[[], None]], None] | None = None,
) -> dict[str, float]:
    """Train for one epoch; returns the epoch's average of every logged value (loss, loss_b<k>, lr) and the
    number of unreadable images skipped (`bad_images`).

    start_step: steps of this epoch already done (mid-epoch resume; the loader yields only the remaining ones).
    on_update(epoch, steps_done, ensure_finite): called after every optimizer update except the epoch's last
    (mid-epoch checkpoints and graceful stops live there); it must call ensure_finite() before saving weights.
    """
    model.train(True)
    raw_model = model.module if hasattr(model, "module") else model
    metric_logger = MetricLogger(mean_over_ranks=True)  # logged losses: the mean over ranks
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    guard = NonFiniteGuard(epoch)
    steps = start_step + len(data_loader)  # type: ignore[arg-type]
    accum_iter = args.accum_iter
    bad_images = 0
    optimizer.zero_grad(set_to_none=True)

    batches = metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]")
    for step, (samples, _, bad) in enumerate(batches, start=start_step):
        bad_images += int(bad.sum())  # a host tensor from the loader: no device sync
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(
                optimizer, step / steps + epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs
            )
        imgs = normalize_on_device(samples, device)
        noise = raw_model.make_noise(imgs.shape[0], device)  # one mask for every decoder and the generator
        targets = compute_targets(targets_fn, imgs, noise)
        update = (step + 1) % accum_iter == 0
        # DDP: no gradient all-reduce on accumulation steps (forward and backward inside no_sync).
        with accumulation_context(model, sync=update):
            with autocast_context(device, args.amp):
                loss, losses, _, _ = model(imgs, args.mask_ratio, noise=noise, targets=targets)
            scaler.scale(loss / accum_iter).backward()

        guard.add(step, loss, losses)
        if update:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if on_update is not None and step + 1 < steps:
                on_update(epoch, step + 1, guard.check)

        metric_logger.update(loss=loss.detach(), **{f"loss_b{b}": v.detach() for b, v in losses.items()}, lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            guard.check()  # collective: every rank stops together, within one logging interval
            check_bad_images(bad_images, args.max_bad_images, epoch)
            metric_logger.reduce_over_ranks()
            if log_writer is not None:
                epoch_1000x = int((step / steps + epoch) * 1000)  # MAE's x-axis: aligns runs of any batch size
                for name, meter in metric_logger.meters.items():
                    log_writer.add_scalar(f"train/{name}", meter.value, epoch_1000x)

    guard.check()
    stats = {**metric_logger.averages(), "bad_images": bad_images}
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite epoch average at epoch {epoch}: {stats}")
    logger.info("Averaged stats: %s", metric_logger)
    return stats



@torch.no_grad()
def reconstructions(model: nn.Module, dataset: Any, targets_fn: TargetsFn | None, mask_ratio: float,
                    num_images: int = 8) -> dict:
    """Panels (original, masked, every decoder, DeepMIM+ targets) for the first images with a fixed mask."""
    device = next(model.parameters()).device
    samples = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
    imgs = normalize_on_device(samples, device)
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    hybrid = compute_targets(targets_fn, imgs, noise)  # None for pixel targets, {block: target} for DeepMIM+
    return reconstruction_panels(model, imgs, noise, mask_ratio, hybrid_targets=hybrid)
