"""COCO evaluation of the detector (paper Tab. 3: AP box / AP mask, single-scale testing), through pycocotools.

Each rank predicts a disjoint shard of the validation images (image i goes to rank i % world: no padding, no
duplicates); the detections are gathered from every rank, ordered by image id (each image's detections in the
model's order), written as the standard COCO results files (`results_bbox.json`, `results_segm.json`: boxes
[x, y, w, h] in the original image, masks as RLE thresholded at 0.5 as torchvision's reference does, category ids of
the dataset's own file) and scored by `pycocotools.cocoeval.COCOeval` against the annotation file. The metrics are
exactly what pycocotools gives on those files, on any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from detection.model import images_to_model
from util import distributed
from util.misc import MetricLogger
from util.training import autocast_context

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5
Results = dict[str, list[dict[str, Any]]]  # iou type -> COCO result entries


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """(N, H, W) bool -> COCO RLEs with `counts` as text (JSON-ready)."""
    if not len(masks):
        return []
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_results(prediction: dict[str, Tensor], image_id: int, cat_ids: Sequence[int]) -> Results:
    """One image's detections (torchvision's output, original image coordinates) -> COCO result entries."""
    boxes = prediction["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].float().cpu().tolist()
    cats = [cat_ids[int(k) - 1] for k in prediction["labels"].cpu()]
    out: Results = {"bbox": [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                             for b, c, s in zip(xywh, cats, scores)], "segm": []}
    if "masks" in prediction:
        rles = encode_masks(prediction["masks"][:, 0].cpu() > MASK_THRESHOLD)
        out["segm"] = [{"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                       for r, c, s in zip(rles, cats, scores)]
    return out


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, cat_ids: Sequence[int],
            amp: str = "none") -> tuple[Results, list[int]]:
    """This rank's detections over `loader` (batches of `detection.data.collate_eval`) and the image ids done."""
    model.eval()
    results: Results = {t: [] for t in IOU_TYPES}
    done: list[int] = []
    for images, targets in MetricLogger().log_every(loader, 50, "Test:"):
        if not images:
            continue
        with autocast_context(device, amp):
            outputs = model(images_to_model(images, device))
        for output, target in zip(outputs, targets):
            for iou_type, entries in coco_results(output, target["image_id"], cat_ids).items():
                results[iou_type] += entries
            done.append(target["image_id"])
    return results, done


def gather_results(results: Results, done: list[int]) -> tuple[Results, list[int]]:
    """Every rank's detections, ordered by image id (stable: each image keeps its detections' order)."""
    if distributed.is_dist():
        parts: list[Any] = [None] * distributed.get_world_size()
        dist.all_gather_object(parts, (results, done))
        results = {t: [e for part, _ in parts for e in part[t]] for t in IOU_TYPES}
        done = [i for _, ids in parts for i in ids]
    return {t: sorted(entries, key=lambda e: e["image_id"]) for t, entries in results.items()}, sorted(done)


def coco_metrics(coco_gt: COCO, entries: list[dict[str, Any]], iou_type: str) -> tuple[dict[str, float], str]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl in percent (-1, pycocotools' value, where the ground truth has no
    object of that size) and its printed summary; all 0 without detections (which pycocotools' loadRes cannot
    read)."""
    if not entries:
        return {m: 0.0 for m in METRICS}, f"{iou_type}: no detections"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(entries)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {m: 100 * float(v) if v >= 0 else -1.0 for m, v in zip(METRICS, evaluator.stats[:6])}, out.getvalue()


def write_results(results: Results, output_dir: str | Path) -> list[Path]:
    """`results_bbox.json` and `results_segm.json` in `output_dir` (COCO result format)."""
    paths = []
    for iou_type, entries in results.items():
        path = Path(output_dir) / f"results_{iou_type}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries))
        paths.append(path)
    return paths


def evaluate_detector(model: nn.Module, loader: Iterable, device: torch.device, coco_gt: COCO,
                      cat_ids: Sequence[int], amp: str = "none", results_dir: str | Path | None = None
                      ) -> dict[str, Any]:
    """Predict this rank's shard, gather, score (rank 0) and share the metrics: {'bbox': {AP..APl}, 'segm': {...},
    'images': evaluated, 'skipped_images': unreadable}. A collective when distributed; run it on the bare model.
    With `results_dir`, rank 0 writes the results files there."""
    results, done = gather_results(*predict(model, loader, device, cat_ids, amp))
    stats: list[Any] = [None]
    if distributed.is_main_process():
        if results_dir is not None:
            for path in write_results(results, results_dir):
                logger.info("COCO results: %s", path)
        record: dict[str, Any] = {"images": len(done), "skipped_images": len(coco_gt.imgs) - len(done)}
        for iou_type in IOU_TYPES:
            record[iou_type], summary = coco_metrics(coco_gt, results[iou_type], iou_type)
            logger.info("COCO %s evaluation:\n%s", iou_type, summary)
        stats = [record]
    if distributed.is_dist():
        dist.broadcast_object_list(stats, src=0)
    return stats[0]
