"""Per-iteration learning-rate schedule: linear warm-up then half-cycle cosine (MAE; paper Appendix A)."""

from __future__ import annotations

import math

import torch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch (epoch + step / steps_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer, epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float
) -> float:
    """Set every param group's lr (times its `lr_scale`, used by layer-wise decay) and return the base lr."""
    value = lr_at(epoch, lr, min_lr, warmup_epochs, epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value
