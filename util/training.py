"""Pieces of a training step shared by pre-training, fine-tuning and probing: autocast, DDP wrapping and gradient
accumulation without redundant all-reduces, a rank-collective non-finite check, and the mid-epoch hook that saves
checkpoints and honours stop signals.

Every decision that can end or change a run (stop on NaN, save, stop on a signal) is taken collectively, so all
ranks take it at the same step and none is left waiting in a collective that the others never reach.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from util import distributed
from util.preemption import GracefulStop

logger = logging.getLogger(__name__)


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
