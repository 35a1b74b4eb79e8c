"""mmseg's mIoU protocol: per-class areas summed over the whole set, then IoU, accuracy and their means.

Per image (pixels labelled 255 count for nothing): intersect = pixels of class k in both prediction and label,
pred = pixels predicted k, label = pixels labelled k; union = pred + label - intersect. Over the set: IoU_k =
intersect_k / union_k (NaN when k is in neither prediction nor label), Acc_k = intersect_k / label_k (NaN when k has
no labelled pixel), aAcc = sum intersect / sum label; mIoU and mAcc are the means over the non-NaN classes. All in
percent. Areas add over images and ranks, so any split of the set gives the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from segmentation.transforms import IGNORE_INDEX

logger = logging.getLogger(__name__)


def class_areas(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(4, K) int64: intersect, union, pred and label areas of one prediction / label pair (any equal shapes)."""
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    hit = pred[pred == label]
    intersect = torch.bincount(hit, minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


def metrics_from_areas(areas: Tensor) -> dict[str, object]:
    """{"mIoU", "mAcc", "aAcc"} in percent and per-class "IoU" / "Acc" lists (NaN -> None) from summed (4, K)
    areas."""
    intersect, union, _, label = areas.double()
    iou = intersect / union  # 0 / 0 -> NaN: the class is in neither prediction nor label
    acc = intersect / label
    a_acc = float(intersect.sum() / label.sum()) if label.sum() > 0 else math.nan

    def nanmean(x: Tensor) -> float:
        x = x[~torch.isnan(x)]
        return float(x.mean()) * 100 if len(x) else math.nan

    return {"mIoU": nanmean(iou), "mAcc": nanmean(acc), "aAcc": a_acc * 100,
            "IoU": [None if math.isnan(v) else v * 100 for v in iou.tolist()],
            "Acc": [None if math.isnan(v) else v * 100 for v in acc.tolist()]}


def class_table(metrics: dict[str, object], names: Sequence[str]) -> str:
    """The per-class IoU / Acc table mmseg prints after an evaluation, then the summary line."""
    width = max(12, max(len(n) for n in names))
    lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(names, metrics["IoU"], metrics["Acc"]):  # type: ignore[arg-type]
        lines.append(f"{name:<{width}}  {_pct(iou)}  {_pct(acc)}")
    lines.append(f"{'Summary':<{width}}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
                 f"aAcc {metrics['aAcc']:.2f}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else "   nan"
