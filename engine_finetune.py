"""One epoch of fine-tuning or linear probing, and top-1/top-5 evaluation (MAE's engine_finetune).

Both main_finetune.py and main_linprobe.py use these two functions; only the model, criterion, optimizer and
augmentation differ. Training follows engine_pretrain's step: gradient accumulation costs one all-reduce per
optimizer update under DDP, losses are checked for non-finite values collectively at logging steps, and logged
values are means over ranks. Evaluation under `--dist_eval` is exact: DistributedSampler pads the last shard with
copies of the first samples, which are skipped here, and correct counts (not per-rank means) are summed over ranks,
so any number of processes reports the same accuracy as one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import accuracy
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from util import distributed, lr_sched
from util.misc import MetricLogger, SmoothedValue
from util.training import (
    NonFiniteGuard,
    NonFiniteLossError,
    accumulation_context,
    autocast_context,
    check_bad_images,
)

logger = logging.getLogger(__name__)

Criterion = Callable[[Tensor, Tensor], Tensor]
# on_update(epoch, steps_done, ensure_finite): see util.training.UpdateHook
OnUpdate = Callable[[int, int, Callable[[], None]], None]


def train_one_epoch(
    model: nn.Module,
    criterion: Criterion,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: Any,
    mixup_fn: Mixup | None = None,
    log_writer: Any = None,
    start_step: int = 0,
    on_update: OnUpdate | None = None,
) -> dict[str, float]:
    """Train for one epoch with a per-iteration lr schedule (warm-up + cosine, `lr_scale` per group for layer
    decay), gradient accumulation (`args.accum_iter`), optional clipping (`args.clip_grad`) and autocast
    (`args.amp`). Returns the epoch averages of loss and lr, and the number of unreadable images replaced
    (`bad_images`; more than `args.max_bad_images` stops every rank).

    Batches: images (N, 3, H, W) float, labels (N,) int, bad (N,) int (util.datasets.RobustSeededDataset's items);
    `mixup_fn` turns labels into soft targets (N, classes).
    start_step: steps of this epoch already done (mid-epoch resume; the loader yields only the remaining ones).
    on_update(epoch, steps_done, ensure_finite): called after every optimizer update except the epoch's last
    (mid-epoch checkpoints and graceful stops live there).
    """
    model.train(True)
    metric_logger = MetricLogger(mean_over_ranks=True)  # logged losses: the mean over ranks
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    guard = NonFiniteGuard(epoch)
    steps = start_step + len(data_loader)  # type: ignore[arg-type]
    accum_iter = args.accum_iter
    params = [p for p in model.parameters() if p.requires_grad]
    bad_images = 0
    optimizer.zero_grad(set_to_none=True)

    batches = metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]")
    for step, (samples, targets, bad) in enumerate(batches, start=start_step):
        bad_images += int(bad.sum())  # a host tensor from the loader: no device sync
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(
                optimizer, step / steps + epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs
            )
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (step + 1) % accum_iter == 0
        # DDP: no gradient all-reduce on accumulation steps (forward and backward inside no_sync).
        with accumulation_context(model, sync=update):
            with autocast_context(device, args.amp):
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            scaler.scale(loss / accum_iter).backward()

        guard.add(step, loss)
        if update:
            optimizer_step(optimizer, scaler, params, getattr(args, "clip_grad", None))  # linprobe: no --clip_grad
            if on_update is not None and step + 1 < steps:
                on_update(epoch, step + 1, guard.check)

        metric_logger.update(loss=loss.detach(), lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            guard.check()  # collective: every rank stops together, within one logging interval
            check_bad_images(bad_images, args.max_bad_images, epoch)
            metric_logger.reduce_over_ranks()
            if log_writer is not None:
                epoch_1000x = int((step / steps + epoch) * 1000)  # MAE's x-axis: aligns runs of any batch size
                log_writer.add_scalar("train/loss", metric_logger.meters["loss"].value, epoch_1000x)
                log_writer.add_scalar("train/lr", lr, epoch_1000x)

    guard.check()
    stats = {**metric_logger.averages(), "bad_images": bad_images}
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite epoch average at epoch {epoch}: {stats}")
    logger.info("Averaged stats: %s", metric_logger)
    return stats


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                   clip_grad: float | None) -> None:
    """One update from the accumulated gradients: unscale and clip (when `clip_grad`), step, reset gradients."""
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def real_samples_on_rank(sampler: DistributedSampler) -> int:
    """How many of this rank's samples are real rather than DistributedSampler's padding.

    With drop_last=False the sampler repeats the first samples until the list divides by the number of ranks;
    rank r takes positions r, r + W, r + 2W, ... of that list, so its padded samples are its last ones: those at
    positions >= len(dataset).
    """
    if sampler.drop_last:
        raise ValueError("evaluation needs DistributedSampler(drop_last=False): dropping samples changes accuracy")
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(
    data_loader: Iterable,
    model: nn.Module,
    device: torch.device,
    amp: str = "none",
    num_samples: int | None = None,
    sharded: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the val set.

    Args:
        num_samples: count only the first `num_samples` samples this rank sees (the rest are sampler padding, see
            `real_samples_on_rank`); None counts all.
        sharded: ranks hold disjoint shards (`--dist_eval`): counts are summed over ranks. Otherwise every rank
            evaluated the whole set and its own counts are the answer.

    Run it on the bare model (not DDP): shards may have unequal lengths and DDP's forward would wait for the others.
    """
    model.eval()
    metric_logger = MetricLogger()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct@1, correct@5, samples
    remaining = math.inf if num_samples is None else num_samples
    for images, target in metric_logger.log_every(data_loader, 50, "Test:"):
        n = int(min(len(target), remaining))
        if n <= 0:
            break
        remaining -= n
        images, target = images[:n].to(device, non_blocking=True), target[:n].to(device, non_blocking=True)
        with autocast_context(device, amp):
            output = model(images)
        output = output.float()
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        loss_sum = F.cross_entropy(output, target, reduction="sum")
        totals += torch.stack([loss_sum.double(), acc1.double() * n / 100, acc5.double() * n / 100,
                               torch.tensor(n, dtype=torch.float64, device=device)])
        metric_logger.update(loss=loss_sum / n, acc1=acc1, acc5=acc5)
    if sharded and distributed.is_dist():
        dist.all_reduce(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"acc1": round(correct1) * 100 / count, "acc5": round(correct5) * 100 / count, "loss": loss_sum / count,
             "n": int(count)}
    logger.info("* Acc@1 %.3f Acc@5 %.3f loss %.3f (%d images)", stats["acc1"], stats["acc5"], stats["loss"],
                stats["n"])
    return stats
