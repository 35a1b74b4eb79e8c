"""Semantic segmentation runs (main_segmentation.py): the step's loss, the loaders, the evaluation with its per-class
table and PNG predictions, the demo figure, and `execute` (resume, then train or --eval).

Training is `util.iteration.IterationRun`: the released 160k-update poly schedule on `util.training.train_epoch`
(accumulation under no_sync, collective NaN and bad-image checks, mid-interval checkpoints, graceful stops), so
segmentation and detection share one loop. The step is the released EncoderDecoder's: forward under autocast,
decode + 0.4 x auxiliary cross-entropy in float32.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from segmentation import demo, inference
from segmentation.data import Indexed, SegmentationFolder
from segmentation.heads import upsample
from segmentation.segmentor import Segmentor, segmentation_loss
from util import distributed, iteration
from util.cls_data import real_samples_on_rank
from util.datasets import RobustSeededDataset, ignore_stop_signals
from util.iteration import IterationRun, IterationSampler
from util.training import StepLoss, autocast_context

logger = logging.getLogger(__name__)


def make_step_loss(model: nn.Module, bare: Segmentor, device: torch.device, amp: str) -> StepLoss:
    """step_loss(images, labels) -> (decode + aux_weight x aux, {"decode": ..., "aux": ...}); `model` may be the DDP
    wrapper of `bare`."""

    def step_loss(images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast_context(device, amp):
            outputs = model(images)
        return segmentation_loss(bare, outputs, labels)

    return step_loss


def build_loaders(args: argparse.Namespace, train: SegmentationFolder, val: SegmentationFolder
                  ) -> tuple[DataLoader, DataLoader, int | None]:
    """Train: `IterationSampler` over RobustSeededDataset (augmentation drawn from (seed, data epoch, index),
    unreadable images replaced and counted); val: one image per batch (sizes differ), sharded exactly under DDP.
    Returns (train loader, val loader, this rank's real val count or None)."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    robust = RobustSeededDataset(train, args.seed)
    sampler = IterationSampler(robust, args.batch_size, num_replicas=world, rank=rank, seed=args.seed)
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith("cuda"),
                  worker_init_fn=ignore_stop_signals, persistent_workers=args.num_workers > 0)  # val: no re-fork
    train_loader = DataLoader(robust, sampler=sampler, batch_size=args.batch_size, drop_last=False,
                              generator=torch.Generator().manual_seed(args.seed), **common)
    num_real = None
    if world > 1:
        val_sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False)
        num_real = real_samples_on_rank(val_sampler)
    else:
        val_sampler = SequentialSampler(val)
    val_loader = DataLoader(Indexed(val), sampler=val_sampler, batch_size=1, **common)
    return train_loader, val_loader, num_real


class Evaluation:
    """The validation pass of a run (`__call__` -> metrics; a collective under DDP): slide inference of the bare
    model in eval mode, the per-class table in the log, PNGs with --save_predictions."""

    def __init__(self, args: argparse.Namespace, model: Segmentor, loader: DataLoader, num_real: int | None,
                 names: list[str]):
        self.args, self.model, self.loader, self.num_real, self.names = args, model, loader, num_real, names

    def __call__(self, save_dir: str | None = None) -> dict[str, Any]:
        args, dataset = self.args, self.loader.dataset.dataset
        self.model.eval()
        try:
            return inference.evaluate(
                self.model.predict, self.loader, torch.device(args.device), args.num_classes, args.input_size,
                args.slide_stride, args.amp, self.num_real, self.names, save_dir, dataset.stem, args.reduce_zero_label)
        finally:
            self.model.train()


def demo_figure(args: argparse.Namespace, model: Segmentor, val: SegmentationFolder, metrics: dict[str, Any],
                count: int = 4) -> Path | None:
    """Image / ground truth / prediction of the first validation images (rank 0) -> output_dir/segmentation.png."""
    if not distributed.is_main_process() or not args.output_dir:
        return None
    model.eval()
    device = torch.device(args.device)
    images, labels, preds = [], [], []
    with torch.no_grad():
        for index in range(min(count, len(val))):
            raw, label = val.read(index)
            image, _ = val.transform(raw, label)
            logits = inference.slide_inference(model.predict, image[None].to(device), args.num_classes,
                                               args.input_size, args.slide_stride)
            preds.append(upsample(logits, label.shape[-2:]).argmax(1)[0].cpu())
            images.append(raw)
            labels.append(label)
    path = Path(args.output_dir) / "segmentation.png"
    demo.save_figure(path, images, labels, preds, args.num_classes,
                     title=f"validation mIoU {metrics['mIoU']:.1f} %, aAcc {metrics['aAcc']:.1f} %")
    logger.info("figure: %s", path)
    return path


def report(metrics: dict[str, Any], what: str) -> None:
    if distributed.is_main_process():
        print(f"{what}: mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}  on "
              f"{metrics['images']} val images", flush=True)


def execute(args: argparse.Namespace, run: IterationRun, evaluation: Evaluation,
            resume_state: dict[str, Any] | None, val: SegmentationFolder) -> dict[str, Any]:
    """Resume if asked, then train (or --eval: metrics, eval_<time>.json, --save_predictions); the demo draws its
    figure (`util.iteration.execute`). Ends the process group; returns the metrics."""
    return iteration.execute(args, run, resume_state, lambda: evaluation(args.save_predictions), dict, report,
                             "segmentation", lambda metrics: demo_figure(args, run.bare, val, metrics))
