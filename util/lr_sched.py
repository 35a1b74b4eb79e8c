"""Per-iteration learning-rate schedules: linear warm-up then half-cycle cosine over epochs (MAE; paper Appendix A),
linear warm-up then polynomial decay over iterations (mmseg's `poly` policy, the released segmentation recipe), and
linear warm-up then step decay over iterations (detectron2's multi-step schedule, the ViT detection benchmark)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch (epoch + step / steps_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def poly_lr_at(iteration: int, lr: float, max_iters: int, power: float = 1.0, min_lr: float = 0.0,
               warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> float:
    """Learning rate of update `iteration` (0-based: the updates done before it), mmcv's `PolyLrUpdaterHook` with
    `warmup='linear'` and `by_epoch=False` as the released config sets it (power 1.0, min_lr 0, 1500 warm-up
    iterations from ratio 1e-6): poly = (lr - min_lr) (1 - iteration / max_iters)^power + min_lr, and during warm-up
    poly x (1 - k) with k = (1 - iteration / warmup_iters)(1 - warmup_ratio).

    Per parameter group mmcv applies this to the group's own initial lr (lr x its layer-decay scale); with
    min_lr 0 that is this value x the scale, what `set_lr` does."""
    value = (lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr
    if iteration < warmup_iters:
        value *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return value


def step_lr_at(iteration: int, lr: float, milestones: Sequence[int], gamma: float = 0.1, warmup_iters: int = 0,
               warmup_factor: float = 0.001) -> float:
    """Learning rate of update `iteration` (0-based), detectron2's `WarmupParamScheduler(MultiStepParamScheduler)` as
    the benchmark's configs set it: lr x gamma^(milestones passed), and during warm-up that value x the linear ramp
    warmup_factor + (1 - warmup_factor) x iteration / warmup_iters."""
    value = lr * gamma ** sum(iteration >= m for m in milestones)
    if iteration < warmup_iters:
        value *= warmup_factor + (1 - warmup_factor) * iteration / warmup_iters
    return value


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every param group's lr to `value` times its `lr_scale` (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer, epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float
) -> float:
    """Set every param group's lr (times its `lr_scale`, used by layer-wise decay) and return the base lr."""
    value = lr_at(epoch, lr, min_lr, warmup_epochs, epochs)
    set_lr(optimizer, value)
    return value
