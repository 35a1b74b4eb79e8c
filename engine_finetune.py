"""The loss of a fine-tuning or linear-probing step, top-1/top-5 evaluation (MAE's engine_finetune), and `Run`: the
epoch loop of a whole run with resume, evaluation and checkpoints.

Both main_finetune.py and main_linprobe.py use this module; only the model, criterion, optimizer and augmentation
differ. Training runs `util.training.train_epoch`, as pre-training does: gradient accumulation costs one all-reduce
per optimizer update under DDP, losses are checked for non-finite values collectively at logging steps, and logged
values are means over ranks. Evaluation under `--dist_eval` is exact: DistributedSampler pads the last shard with
copies of the first samples, which are skipped here, and correct counts (not per-rank means) are summed over ranks,
so any number of processes reports the same accuracy as one.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import accuracy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from util import checkpoint as ckpt
from util import distributed
from util.cls_run import report, write_eval_record
from util.misc import MetricLogger, RunClock, SmoothedValue, append_json_log, log_summary, make_log_writer
from util.preemption import GracefulStop
from util.resume import resume_run
from util.training import StepLoss, UpdateHook, autocast_context, maybe_compile, train_epoch, wrap_ddp

logger = logging.getLogger(__name__)

Criterion = Callable[[Tensor, Tensor], Tensor]


def classification_step(model: nn.Module, criterion: Criterion, device: torch.device, amp: str,
                        mixup_fn: Mixup | None = None) -> StepLoss:
    """The loss of one fine-tuning / probing micro-step, for `util.training.train_epoch` (MAE's train_one_epoch:
    per-iteration lr schedule with `lr_scale` per group for layer decay, gradient accumulation, clipping by
    `args.clip_grad`), which returns the epoch averages of loss and lr and the unreadable images replaced.

    Batches: images (N, 3, H, W) float, labels (N,) int (util.datasets.RobustSeededDataset's items); `mixup_fn`
    turns labels into soft targets (N, classes). The logits go to `criterion` in float32.
    """

    def step_loss(samples: Tensor, labels: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        samples = samples.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, labels = mixup_fn(samples, labels)
        with autocast_context(device, amp):
            outputs = model(samples)
        return criterion(outputs.float(), labels), {}

    return step_loss


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
            `util.cls_data.real_samples_on_rank`); None counts all.
        sharded: ranks hold disjoint shards (`--dist_eval`): counts are summed over ranks. Otherwise every rank
            evaluated the whole set and its own counts are the answer.

    Run it on the bare model (not DDP): shards may have unequal lengths and DDP's forward would wait for the others.
    The `Test:` progress lines show this rank's running values weighted by batch size, the number the final line
    reports once every batch (and, sharded, every rank) is in.
    """
    model.eval()
    metric_logger = MetricLogger()
    for name in ("loss", "acc1", "acc5"):
        metric_logger.add_meter(name, SmoothedValue(fmt="{global_avg:.3f}"))
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
        metric_logger.update(n=n, loss=loss_sum / n, acc1=acc1, acc5=acc5)
    if sharded and distributed.is_dist():
        dist.all_reduce(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"acc1": round(correct1) * 100 / count, "acc5": round(correct5) * 100 / count, "loss": loss_sum / count,
             "n": int(count)}
    logger.info("* Acc@1 %.3f Acc@5 %.3f loss %.3f (%d images)", stats["acc1"], stats["acc5"], stats["loss"],
                stats["n"])
    return stats


# --------------------------------------------------------------------------------------------------------------
# A whole fine-tuning or linear-probing run: resume, epoch loop, evaluation, checkpoints
# --------------------------------------------------------------------------------------------------------------


class Run:
    """One fine-tuning or linear-probing run: resume, epoch loop with evaluation,
    checkpoints, mid-epoch saves and graceful stops.

    Checkpoints (util.checkpoint's training state plus "best_acc"): checkpoint-last.pth (every epoch end and every
    --save_every_iters updates), checkpoint-<epoch>.pth every --save_freq epochs, checkpoint-best.pth (best val top-1
    among the evaluated epochs). Evaluation runs at the end of every --eval_freq-th epoch and of the last one.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        loaders: tuple[DataLoader, DataLoader, int | None],
        mixup_fn: Mixup | None = None,
        flag_defaults: Mapping[str, Any] | None = None,
    ):
        self.args, self.bare, self.criterion, self.optimizer = args, model, criterion, optimizer
        self.mixup_fn, self.flag_defaults = mixup_fn, flag_defaults
        self.train_loader, self.val_loader, self.num_real_val = loaders
        self.device = torch.device(args.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.best_acc, self.start_step = 0.0, 0

    def resume(self, state: Mapping[str, Any]) -> None:
        """Load --resume: the weights only under --eval; else everything, after util.resume's checks that the
        checkpoint belongs to this experiment (flags, and the layout of a mid-epoch checkpoint)."""
        self.start_step = resume_run(state, self.bare, self.optimizer, self.scaler, self.args, self.flag_defaults)
        if not self.args.eval:
            self.best_acc = float(state.get("best_acc", 0.0))

    def evaluate(self) -> dict[str, float]:
        sharded = self.num_real_val is not None
        return evaluate(self.val_loader, self.bare, self.device, self.args.amp, self.num_real_val, sharded)

    def save(self, epoch: int, step: int, is_best: bool = False) -> None:
        """Checkpoint after `step` steps of `epoch` (0: the epoch is done). A collective (every rank's RNG);
        rank 0 writes."""
        args = self.args
        if not args.output_dir:
            return
        state = ckpt.training_state(self.bare, self.optimizer, self.scaler, epoch, step, args,
                                    best_acc=self.best_acc)
        ckpt.save_training_checkpoint(state, args.output_dir, args.save_freq, args.epochs)
        if is_best and distributed.is_main_process():
            ckpt.save_atomic(state, Path(args.output_dir) / "checkpoint-best.pth")

    def fit(self) -> dict[str, float]:
        """Train from (args.start_epoch, self.start_step) to args.epochs, evaluating and checkpointing after each
        epoch; a stop signal saves and exits (status 0). Returns the last val stats and the best top-1."""
        args = self.args
        logger.info("start training for %d epochs (lr %.3e, %d trainable parameters)", args.epochs, args.lr,
                    self.num_trainable())
        log_writer = make_log_writer(args.log_dir)
        stopper = GracefulStop().install()
        clock = RunClock(args.start_epoch, args.epochs)
        try:
            train_model = wrap_ddp(maybe_compile(self.bare, args.compile, args.compile_backend), self.device)
            distributed.set_training_timeout(args.dist_timeout)  # start-up is over: a stuck rank now fails fast
            test_stats = self.train_epochs(train_model, stopper, log_writer, clock)
        finally:
            stopper.uninstall()
            if log_writer is not None:
                log_writer.close()
        if not test_stats:  # resumed a finished run: nothing trained, report the checkpoint
            test_stats = self.evaluate()
        log_summary("training finished", {
            "checkpoints": f"{args.output_dir} (checkpoint-last.pth, checkpoint-best.pth, checkpoint-<epoch>.pth "
                           f"every {args.save_freq})",
            "log": str(Path(args.output_dir) / "log.txt"), "TensorBoard": args.log_dir or "off",
            "top-1": f"last {test_stats['acc1']:.2f}%, best {self.best_acc:.2f}%", "wall time": clock.elapsed(),
        })
        return {**test_stats, "best_acc1": self.best_acc}

    def train_epochs(self, model: nn.Module, stopper: GracefulStop, log_writer: Any,
                     clock: RunClock) -> dict[str, float]:
        """The epoch loop of `fit` (`model`: the DDP-wrapped model); returns the last epoch's val stats."""
        args, test_stats, start_step = self.args, {}, self.start_step
        on_update = UpdateHook(self.save, stopper, args.accum_iter, args.save_every_iters)
        for epoch in range(args.start_epoch, args.epochs):
            clock.log_epoch_start(epoch)
            self.train_loader.dataset.set_epoch(epoch)
            self.train_loader.sampler.set_epoch(epoch)
            self.train_loader.sampler.set_start_step(start_step)
            step_loss = classification_step(model, self.criterion, self.device, args.amp, self.mixup_fn)
            train_stats = train_epoch(model, self.train_loader, self.optimizer, self.scaler, epoch, args, step_loss,
                                      clip_grad=getattr(args, "clip_grad", None),  # linprobe: no --clip_grad
                                      log_writer=log_writer, start_step=start_step, on_update=on_update)
            start_step = 0
            epoch_stats, is_best = {}, False
            if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
                test_stats = epoch_stats = self.evaluate()
                is_best = test_stats["acc1"] >= self.best_acc  # ties: the later epoch (a 0 % run still has one)
                self.best_acc = max(self.best_acc, test_stats["acc1"])
                logger.info("Accuracy of the network on the %d test images: %.1f%% (max %.2f%%)", test_stats["n"],
                            test_stats["acc1"], self.best_acc)
            self.save(epoch, 0, is_best)
            log_epoch(args, log_writer, epoch, train_stats, epoch_stats, self.num_trainable())
            if stopper.stop_requested():  # a collective: every rank stops after the same epoch
                stopper.finish()
        return test_stats

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.bare.parameters() if p.requires_grad)


def log_epoch(args: argparse.Namespace, log_writer: Any, epoch: int, train_stats: Mapping[str, float],
              test_stats: Mapping[str, float], n_parameters: int) -> None:
    """One JSON line in log.txt and the test scalars in TensorBoard (rank 0); `test_stats` is empty for an epoch
    that was not evaluated (--eval_freq)."""
    if log_writer is not None and test_stats:
        for key in ("acc1", "acc5", "loss"):
            log_writer.add_scalar(f"perf/test_{key}", test_stats[key], epoch)
        log_writer.flush()
    append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                      **{f"test_{k}": v for k, v in test_stats.items()},
                                      "epoch": epoch, "n_parameters": n_parameters})


def execute(run: Run, checkpoint: Mapping[str, Any] | None, what: str) -> dict[str, float]:
    """Resume if asked, then train (or --eval); prints the result, ends the process group, returns the stats. An
    exception is logged naming this process's rank before it propagates."""
    args = run.args
    try:
        with distributed.failures_logged():
            if args.resume:
                run.resume(checkpoint)
            if args.eval:
                stats = run.evaluate()
                report(stats, f"{what} evaluation of {args.resume}")
                write_eval_record(args, stats)
            else:
                stats = run.fit()
                report(stats, what)
    finally:
        distributed.cleanup()
    return stats
