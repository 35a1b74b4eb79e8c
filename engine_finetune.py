"""One epoch of fine-tuning or linear probing, and top-1/top-5 evaluation (MAE's engine_finetune).

Both main_finetune.py and main_linprobe.py use these two functions; only the model, criterion, optimizer and
augmentation differ. Evaluation under `--dist_eval` is exact: DistributedSampler pads the last shard with copies
of the first samples, which are skipped here, and correct counts (not per-rank means) are summed over ranks, so
any number of processes reports the same accuracy as one.
"""

from __future__ import annotations

import contextlib
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

from engine_pretrain import NonFiniteGuard, NonFiniteLossError, autocast_context
from util import distributed, lr_sched
from util.misc import MetricLogger, SmoothedValue

logger = logging.getLogger(__name__)

Criterion = Callable[[Tensor, Tensor], Tensor]


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
) -> dict[str, float]:
    """Train for one epoch with a per-iteration lr schedule (warm-up + cosine, `lr_scale` per group for layer
    decay), gradient accumulation (`args.accum_iter`), optional clipping (`args.clip_grad`) and autocast
    (`args.amp`). Returns the epoch averages of loss and lr.

    Batches: images (N, 3, H, W) float, labels (N,) int; `mixup_fn` turns labels into soft targets (N, classes).
    """
    model.train(True)
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    guard = NonFiniteGuard(epoch)
    steps = len(data_loader)  # type: ignore[arg-type]
    accum_iter = args.accum_iter
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)

    batches = metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]")
    for step, (samples, targets) in enumerate(batches):
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(
                optimizer, step / steps + epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs
            )
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with autocast_context(device, args.amp):
            outputs = model(samples)
        loss = criterion(outputs.float(), targets)

        update = (step + 1) % accum_iter == 0
        # DDP: skip the gradient all-reduce on accumulation steps.
        sync_context = contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync_context:
            scaler.scale(loss / accum_iter).backward()
        if update:
            if getattr(args, "clip_grad", None):  # main_linprobe has no --clip_grad
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        guard.add(step, loss, {})
        metric_logger.update(loss=loss.detach(), lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            guard.check()
            if log_writer is not None:
                epoch_1000x = int((step / steps + epoch) * 1000)  # MAE's x-axis: aligns runs of any batch size
                log_writer.add_scalar("train/loss", metric_logger.meters["loss"].value, epoch_1000x)
                log_writer.add_scalar("train/lr", lr, epoch_1000x)

    guard.check()
    stats = metric_logger.averages()
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite epoch average at epoch {epoch}: {stats}")
    logger.info("Averaged stats: %s", metric_logger)
    return stats


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
