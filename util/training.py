"""The training loop shared by pre-training, fine-tuning and probing (`train_epoch`, MAE's train_one_epoch) and its
pieces: autocast, DDP wrapping and gradient accumulation without redundant all-reduces, a rank-collective non-finite
check, and the mid-epoch hook that saves checkpoints and honours stop signals.

Every decision that can end or change a run (stop on NaN, save, stop on a signal) is taken collectively, so all
ranks take it at the same step and none is left waiting in a collective that the others never reach.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from util import distributed, lr_sched
from util.misc import MetricLogger, SmoothedValue
from util.preemption import GracefulStop

logger = logging.getLogger(__name__)

# step_loss(samples, labels) -> (loss, {block: loss of that block's decoder} or {}): one micro-step's forward
StepLoss = Callable[[Tensor, Tensor], tuple[Tensor, Mapping[int | str, Tensor]]]
# on_update(epoch, steps_done, ensure_finite): see UpdateHook
OnUpdate = Callable[[int, int, Callable[[], None]], None]


class Timeline(NamedTuple):
    """Where the micro-steps of one `train_epoch` call sit in a run: `lr(step)` is the base lr of micro-step `step`
    (set at the first micro-step of each update, times each group's `lr_scale`), `x(step)` its TensorBoard x value,
    `header` the progress lines' prefix. Epoch-based runs use `epoch_timeline`; iteration-based ones (segmentation,
    detection) map steps to their global update (`util.iteration`)."""

    lr: Callable[[int], float]
    x: Callable[[int], int]
    header: str


def epoch_timeline(epoch: int, steps: int, args: Any) -> Timeline:
    """MAE's: warm-up + cosine over fractional epochs (step / steps + epoch); x = 1000 x fractional epoch, which
    aligns runs of any batch size."""
    return Timeline(
        lr=lambda step: lr_sched.lr_at(step / steps + epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs),
        x=lambda step: int((step / steps + epoch) * 1000), header=f"Epoch: [{epoch}]")


class NonFiniteLossError(FloatingPointError):
    """Raised on every rank when a loss is NaN or infinite on any rank; the message names the rank(s), the epoch,
    the step and the per-block losses."""


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on the device, or nothing for `amp == 'none'`."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when a process group exists, else the model itself.

    No `static_graph`: with it, DDP's `no_sync()` around forward and backward (the only way to skip the all-reduce
    of an accumulation step) fails on the first backward in torch 2.x (`expect_autograd_hooks_` assertion).
    Frozen parameters (requires_grad=False) stay out of the reducer, so `find_unused_parameters` is not needed.
    """
    if not distributed.is_dist():
        return model
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def accumulation_context(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Wrap the forward AND the backward of one micro-step: on accumulation steps (`sync=False`) a DDP model skips
    its gradient all-reduce, so one optimizer update costs exactly one all-reduce. DDP decides in the forward whether
    the coming backward synchronises, so entering `no_sync()` around the backward alone does nothing."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (a collective when distributed)."""
    if not distributed.is_dist():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def check_bad_images(bad_images: int, max_bad_images: int, epoch: int) -> None:
    """Stop every rank (a collective) when any rank has replaced more unreadable images than allowed."""
    if any_rank(bad_images > max_bad_images):
        raise RuntimeError(f"unreadable images in epoch {epoch} exceed --max_bad_images {max_bad_images} on at least "
                           f"one rank ({bad_images} on this one); check --data_path")


class NonFiniteGuard:
    """Keeps recent losses on the device and checks them all at once, without a per-step host sync.

    `check()` is a collective when distributed: every rank must call it at the same steps (the engines call it at
    logging steps, at the epoch end and before any checkpoint). If any rank saw a non-finite loss, every rank raises
    NonFiniteLossError; the message names the ranks that saw it and the first bad step.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.pending: list[tuple[int, Tensor, dict[int, Tensor]]] = []

    def add(self, step: int, loss: Tensor, losses: Mapping[int, Tensor] | None = None) -> None:
        self.pending.append((step, loss.detach(), {b: v.detach() for b, v in (losses or {}).items()}))

    def _first_bad(self) -> tuple[int, str]:
        """(index of the first non-finite entry in pending or -1, its description)."""
        if not self.pending:
            return -1, ""
        finite = torch.stack([torch.isfinite(loss).all() for _, loss, _ in self.pending]).cpu()
        if bool(finite.all()):
            return -1, ""
        index = int((~finite).nonzero()[0])
        step, loss, losses = self.pending[index]
        per_block = ", ".join(f"block {b}: {v.item():.4g}" for b, v in losses.items())
        where = f"loss {loss.item()} at epoch {self.epoch}, step {step}"
        return index, where + (f" ({per_block})" if per_block else "")

    def check(self) -> None:
        index, description = self._first_bad()
        bad_ranks = [distributed.get_rank()] if index >= 0 else []
        if distributed.is_dist():
            flags: list[Any] = [None] * distributed.get_world_size()
            dist.all_gather_object(flags, description if index >= 0 else None)
            bad_ranks = [rank for rank, flag in enumerate(flags) if flag is not None]
            if bad_ranks and index < 0:
                description = flags[bad_ranks[0]]
        if bad_ranks:
            ranks = ", ".join(map(str, bad_ranks))
            raise NonFiniteLossError(
                f"non-finite {description} on rank(s) {ranks}; stopping every rank so the last saved checkpoint "
                "stays intact"
            )
        self.pending.clear()


class UpdateHook:
    """Called after every optimizer update except an epoch's last: refreshes checkpoint-last every
    `save_every_iters` updates, and on a stop signal (SIGTERM / SIGUSR1 / SIGUSR2 on any rank) saves and exits.

    The stop check is a collective when distributed, so it runs at logging steps only (every `print_freq`
    updates), where the engines read losses anyway. `save(epoch, step)` writes the checkpoint (rank 0);
    `ensure_finite()` is the engine's collective non-finite check, run before weights are saved.
    """

    def __init__(self, save: Callable[[int, int], None], stopper: GracefulStop, accum_iter: int,
                 save_every_iters: int, print_freq: int):
        self.save, self.stopper = save, stopper
        self.accum_iter, self.save_every_iters, self.print_freq = accum_iter, save_every_iters, print_freq

    def __call__(self, epoch: int, step: int, ensure_finite: Callable[[], None]) -> None:
        updates = step // self.accum_iter
        periodic = self.save_every_iters > 0 and updates % self.save_every_iters == 0
        check_stop = not distributed.is_dist() or updates % self.print_freq == 0
        stop = check_stop and self.stopper.stop_requested()
        if periodic or stop:
            ensure_finite()  # never checkpoint weights that a non-finite loss has reached
            self.save(epoch, step)
        if stop:
            self.stopper.finish()


def add_compile_args(group: Any) -> None:
    """`--compile` and `--compile_backend`, shared by pre-training, fine-tuning and probing."""
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model's forward (static shapes, one graph; the first steps compile); "
                            "checkpoints are the same with and without it")
    group.add_argument("--compile_backend", default="inductor", type=str,
                       help="torch.compile backend (inductor; aot_eager or eager to debug a compile problem)")


def maybe_compile(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """Compile `model` in place (`nn.Module.compile`): its class, attributes and state-dict keys stay the same, so
    checkpoints carry no `_orig_mod.` prefix and DDP's `no_sync` still applies to the module that wraps it."""
    if enabled:
        model.compile(backend=backend)
        logger.info("torch.compile: model forward compiled with backend %s", backend)
    return model


# --------------------------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------------------------


def train_epoch(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    args: Any,
    step_loss: StepLoss,
    *,
    clip_grad: float | None = None,
    log_writer: Any = None,
    start_step: int = 0,
    on_update: OnUpdate | None = None,
    timeline: Timeline | None = None,
) -> dict[str, float]:
    """One epoch of MAE's loop, shared by every engine; returns the epoch average of every logged value (loss,
    loss_b<k> per decoder, lr) and the number of unreadable images replaced (`bad_images`).

    Per-iteration lr (warm-up + cosine; `lr_scale` per group for layer decay), gradient accumulation over
    `args.accum_iter` micro-steps with one DDP all-reduce per update (`step_loss` runs inside the micro-step's
    `accumulation_context`), optional gradient clipping, and at logging steps (every `args.print_freq`) the
    collective checks: non-finite losses on any rank, more than `args.max_bad_images` unreadable images.

    Batches: (samples, labels, bad) as `util.datasets.RobustSeededDataset` yields them.
    start_step: steps of this epoch already done (mid-epoch resume; the loader yields only the remaining ones).
    on_update(epoch, steps_done, ensure_finite): called after every optimizer update except the epoch's last
    (mid-epoch checkpoints and graceful stops live there); it must call ensure_finite() before saving weights.
    timeline: lr and TensorBoard x of each step (default: `epoch_timeline`, MAE's schedule over epochs).
    """
    model.train(True)
    metric_logger = MetricLogger(mean_over_ranks=True)  # logged losses: the mean over ranks
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    guard = NonFiniteGuard(epoch)
    steps = start_step + len(data_loader)  # type: ignore[arg-type]
    timeline = timeline or epoch_timeline(epoch, steps, args)
    accum_iter = args.accum_iter
    params = [p for p in model.parameters() if p.requires_grad]
    bad_images = 0
    optimizer.zero_grad(set_to_none=True)

    batches = metric_logger.log_every(data_loader, args.print_freq, timeline.header)
    for step, (samples, labels, bad) in enumerate(batches, start=start_step):
        bad_images += int(bad.sum())  # a host tensor from the loader: no device sync
        if step % accum_iter == 0:
            lr = timeline.lr(step)
            lr_sched.set_lr(optimizer, lr)
        update = (step + 1) % accum_iter == 0
        # DDP: no gradient all-reduce on accumulation steps (forward and backward inside no_sync).
        with accumulation_context(model, sync=update):
            loss, losses = step_loss(samples, labels)
            scaler.scale(loss / accum_iter).backward()

        guard.add(step, loss, losses)
        if update:
            optimizer_step(optimizer, scaler, params, clip_grad)
            if on_update is not None and step + 1 < steps:
                on_update(epoch, step + 1, guard.check)

        metric_logger.update(loss=loss.detach(), **{loss_name(b): v.detach() for b, v in losses.items()}, lr=lr)
        if step % args.print_freq == 0 or step == steps - 1:
            guard.check()  # collective: every rank stops together, within one logging interval
            check_bad_images(bad_images, args.max_bad_images, epoch)
            metric_logger.reduce_over_ranks()
            if log_writer is not None:
                x = timeline.x(step)
                for name, meter in metric_logger.meters.items():
                    log_writer.add_scalar(f"train/{name}", meter.value, x)

    guard.check()
    stats = {**metric_logger.averages(), "bad_images": bad_images}
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite epoch average at epoch {epoch}: {stats}")
    logger.info("Averaged stats: %s", metric_logger)
    return stats


def loss_name(key: int | str) -> str:
    """Logged name of a per-part loss: loss_b<k> for decoder block k, loss_<name> for a named part (loss_aux)."""
    return f"loss_b{key}" if isinstance(key, int) else f"loss_{key}"


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                   clip_grad: float | None) -> None:
    """One update from the accumulated gradients: unscale and clip (when `clip_grad`), step, reset gradients."""
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
