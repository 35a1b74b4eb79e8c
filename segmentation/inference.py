"""Sliding-window inference and the evaluation of a whole set (mmseg's `slide` test mode, single scale).

Windows of crop x crop (512) every `stride` pixels (341), the last row / column aligned to the image's edge; the
logits of overlapping windows are summed and divided by the number of windows covering each pixel, then resized
(bilinear) back to the annotation's size and arg-maxed. An image smaller than one window is padded (bottom / right,
0 after normalisation) to the window and its logits cropped back: the backbone's position embedding is fixed at the
window size. Under DDP each rank evaluates its own images (DistributedSampler's padding is skipped) and the per-class
areas are summed over ranks, so any number of ranks gives the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from segmentation.heads import upsample
from segmentation.metrics import class_areas, class_table, metrics_from_areas
from util import distributed
from util.misc import MetricLogger
from util.training import autocast_context

logger = logging.getLogger(__name__)

Predict = Callable[[Tensor], Tensor]  # (n, 3, crop, crop) -> logits (n, K, crop, crop)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's window origins along one axis of `size` >= crop pixels: every `stride`, the last one ending at the
    edge."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


@torch.no_grad()
def slide_inference(predict: Predict, image: Tensor, num_classes: int, crop: int, stride: int,
                    windows_per_batch: int = 8) -> Tensor:
    """Logits (1, K, H, W) of a normalised image (1, 3, H, W): overlapping windows' logits averaged."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    big_h, big_w = padded.shape[-2:]
    boxes = [(y, x) for y in window_starts(big_h, crop, stride) for x in window_starts(big_w, crop, stride)]
    logits = image.new_zeros((1, num_classes, big_h, big_w), dtype=torch.float32)
    count = image.new_zeros((1, 1, big_h, big_w), dtype=torch.float32)
    for i in range(0, len(boxes), windows_per_batch):
        chunk = boxes[i:i + windows_per_batch]
        crops = torch.cat([padded[..., y:y + crop, x:x + crop] for y, x in chunk])
        out = predict(crops).float()
        for (y, x), window in zip(chunk, out):
            logits[0, :, y:y + crop, x:x + crop] += window
            count[..., y:y + crop, x:x + crop] += 1
    return (logits / count)[..., :height, :width]


def save_label_png(pred: Tensor, path: Path, reduce_zero: bool) -> None:
    """A prediction as a PNG of the dataset's own label values (class k saved as k + 1 under reduce-zero-label)."""
    values = pred.to(torch.int64).cpu().numpy() + (1 if reduce_zero else 0)
    Image.fromarray(values.astype(np.uint8)).save(path)


@torch.no_grad()
def evaluate(predict: Predict, loader: Iterable, device: torch.device, num_classes: int, crop: int, stride: int,
             amp: str = "none", num_samples: int | None = None, names: Sequence[str] | None = None,
             save_dir: str | None = None, stems: Callable[[int], str] | None = None,
             reduce_zero: bool = True) -> dict[str, object]:
    """mIoU / mAcc / aAcc (percent) and per-class IoU / Acc over the loader's images (items: normalised image
    (1, 3, h, w), label (1, H, W) at the annotation's size, index). A collective under DDP (sums the areas).

    num_samples: count only this rank's first `num_samples` images (the rest is DistributedSampler padding).
    save_dir: also write <stem>.png per image (`stems(index)`), the dataset's label values at the annotation's size.
    """
    areas = torch.zeros(4, num_classes, dtype=torch.int64, device=device)
    remaining = math.inf if num_samples is None else num_samples
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    images_done = 0
    for image, label, index in MetricLogger().log_every(loader, 50, "Test:"):
        if remaining <= 0:
            break
        remaining -= 1
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = slide_inference(predict, image, num_classes, crop, stride)
        pred = upsample(logits, label.shape[-2:]).argmax(dim=1)
        areas += class_areas(pred, label, num_classes)
        images_done += 1
        if save_dir:
            save_label_png(pred[0], Path(save_dir) / f"{stems(int(index[0]))}.png", reduce_zero)
    counts = torch.tensor([images_done], device=device)
    if distributed.is_dist():
        dist.all_reduce(areas)
        dist.all_reduce(counts)
    metrics = metrics_from_areas(areas.cpu())
    metrics["images"] = int(counts.item())
    logger.info("per-class results (%d images):\n%s", metrics["images"],
                class_table(metrics, names or [f"class_{k}" for k in range(num_classes)]))
    return metrics
