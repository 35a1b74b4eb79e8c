"""Detection runs (main_detection.py): the step's loss, the loaders, the COCO evaluation, the demo figure, and
`execute` (resume, then train or --eval).

Training is `util.iteration.IterationRun` (the loop segmentation uses, on `util.training.train_epoch`: accumulation
under no_sync, collective NaN and bad-image checks, mid-interval checkpoints, graceful stops) with the benchmark's
warm-up + step schedule. The step is torchvision's Mask R-CNN in training mode under autocast: its five losses (RPN
objectness and box, RoI classification and box, mask), summed with weight 1 as torchvision and detectron2 do, and each
logged (`loss_classifier`, `loss_box_reg`, `loss_mask`, `loss_objectness`, `loss_rpn_box_reg`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from detection import demo
from detection.data import CocoDetection, SkipUnreadable, collate_eval, collate_train, read_image
from detection.evaluation import METRICS, evaluate_detector
from detection.model import images_to_model
from util import distributed, iteration
from util.datasets import RobustSeededDataset, ignore_stop_signals
from util.iteration import IterationRun, IterationSampler
from util.training import StepLoss, autocast_context

logger = logging.getLogger(__name__)


def make_step_loss(model: nn.Module, device: torch.device, amp: str) -> StepLoss:
    """step_loss(images uint8 (N, 3, S, S), targets) -> (sum of the five losses, {name: loss}); `model` may be the
    DDP wrapper."""

    def step_loss(images: Tensor, targets: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
                   for t in targets]
        with autocast_context(device, amp):
            losses = model(images_to_model(images, device), targets)
        losses = {name.removeprefix("loss_"): value.float() for name, value in losses.items()}
        return sum(losses.values()), losses

    return step_loss


def build_loaders(args: argparse.Namespace, train: CocoDetection | None, val: CocoDetection
                  ) -> tuple[DataLoader | None, DataLoader]:
    """Train (None under --eval): `IterationSampler` over RobustSeededDataset (augmentation drawn from (seed, data
    epoch, index), unreadable images replaced and counted). Val: this rank's exact shard (image i on rank i % world),
    one image per step (detectron2's test batch), unreadable images skipped and counted."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith("cuda"),
                  worker_init_fn=ignore_stop_signals, persistent_workers=args.num_workers > 0)  # val: no re-fork
    train_loader = None
    if train is not None:
        robust = RobustSeededDataset(train, args.seed)
        sampler = IterationSampler(robust, args.batch_size, num_replicas=world, rank=rank, seed=args.seed)
        train_loader = DataLoader(robust, sampler=sampler, batch_size=args.batch_size, drop_last=False,
                                  collate_fn=collate_train,
                                  generator=torch.Generator().manual_seed(args.seed), **common)
    shard = Subset(SkipUnreadable(val), range(rank, len(val), world))
    val_loader = DataLoader(shard, batch_size=1, shuffle=False, collate_fn=collate_eval, **common)
    return train_loader, val_loader


class Evaluation:
    """The validation pass of a run (`__call__` -> metrics; a collective under DDP): the bare model in eval mode,
    COCO box and mask AP, the results files with `results_dir`."""

    def __init__(self, args: argparse.Namespace, model: nn.Module, loader: DataLoader, val: CocoDetection):
        self.args, self.model, self.loader, self.val = args, model, loader, val

    def __call__(self, results_dir: str | None = None) -> dict[str, Any]:
        index = self.val.index
        try:
            stats = evaluate_detector(self.model, self.loader, torch.device(self.args.device), index.coco,
                                      index.cat_ids, self.args.amp, results_dir)
        finally:
            self.model.train()
        # flat numbers for log.txt and TensorBoard (bbox_AP, segm_AP, ...), the nested ones for eval_<time>.json
        return {**{f"{t}_{m}": stats[t][m] for t in ("bbox", "segm") for m in METRICS}, **stats}


def demo_figure(args: argparse.Namespace, model: nn.Module, val: CocoDetection, metrics: dict[str, Any],
                count: int = 3) -> Path | None:
    """Detections on the first validation images (rank 0) -> output_dir/detections.png."""
    if not distributed.is_main_process() or not args.output_dir:
        return None
    model.eval()
    device = torch.device(args.device)
    images = [read_image(val.index.path(i)) for i in val.ids[:count]]
    with torch.no_grad():
        predictions = [{k: v.cpu() for k, v in p.items()} for p in model(images_to_model(images, device))]
    model.train()
    path = Path(args.output_dir) / "detections.png"
    demo.save_figure(path, images, predictions, title=f"validation AP box {metrics['bbox']['AP']:.1f}, "
                                                      f"AP mask {metrics['segm']['AP']:.1f}")
    logger.info("figure: %s", path)
    return path


def report(metrics: dict[str, Any], what: str) -> None:
    if distributed.is_main_process():
        box, mask = metrics["bbox"], metrics["segm"]
        print(f"{what}: AP box {box['AP']:.2f} (AP50 {box['AP50']:.2f}, AP75 {box['AP75']:.2f})  AP mask "
              f"{mask['AP']:.2f} (AP50 {mask['AP50']:.2f}, AP75 {mask['AP75']:.2f})  on {metrics['images']} val "
              f"images", flush=True)


def execute(args: argparse.Namespace, run: IterationRun, evaluation: Evaluation, resume_state: dict[str, Any] | None,
            val: CocoDetection) -> dict[str, Any]:
    """Resume if asked, then train (or --eval: metrics, results_{bbox,segm}.json and eval_<time>.json in
    --output_dir); the demo draws its figure (`util.iteration.execute`). Ends the process group; returns the
    metrics."""
    def record(metrics: dict[str, Any]) -> dict[str, Any]:
        return {k: metrics[k] for k in ("bbox", "segm", "images", "skipped_images")}

    return iteration.execute(args, run, resume_state, lambda: evaluation(args.output_dir), record, report,
                             "detection", lambda metrics: demo_figure(args, run.bare, val, metrics))
