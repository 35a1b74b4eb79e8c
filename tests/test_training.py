"""util/training.py's update hook (stop check at every update, ranks agreeing without a blocking sync; the timer that
refreshes checkpoint-last.pth) and the fp16 loss scale and skipped updates of `train_epoch`."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist

from util.preemption import GracefulStop
from util.training import SaveTimer, UpdateHook, train_epoch


class Stopped(Exception):
    """Stands in for the SystemExit of GracefulStop.finish."""


def hook_run(hook: UpdateHook, updates: int, epoch: int = 0, on_step=lambda step: None) -> int | None:
    """Call the hook after updates 1..`updates`; the update at which it stopped (None: it did not)."""
    for step in range(1, updates + 1):
        on_step(step)
        try:
            hook(epoch, step, ensure_finite=lambda: None)
        except Stopped:
            return step
    return None


def raise_stopped() -> None:
    raise Stopped()


def stopper_that_raises() -> GracefulStop:
    stopper = GracefulStop(watchdog_s=0)
    stopper.finish = raise_stopped  # type: ignore[method-assign]
    return stopper


def test_one_process_stops_at_the_update_after_the_signal():
    """The check runs at every update (no longer every print_freq-th), so a late signal is not missed."""
    saves: list[tuple[int, int]] = []
    stopper = stopper_that_raises()
    hook = UpdateHook(lambda epoch, step: saves.append((epoch, step)), stopper, accum_iter=1, save_every_iters=0)
    stopped = hook_run(hook, 50, on_step=lambda step: stopper.signals.append(signal.SIGTERM) if step == 7 else None)
    assert stopped == 7 and saves == [(0, 7)] and stopper.acknowledged


def hook_ranks(rank: int, port: int, queue) -> None:
    """Rank `rank` of 2 runs the hook for 10 updates; rank 1 receives a real SIGUSR1 after update 3."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stopper = stopper_that_raises().install()
    saves: list[int] = []
    hook = UpdateHook(lambda epoch, step: saves.append(step), stopper, accum_iter=1, save_every_iters=0)
    stopped = hook_run(hook, 10, on_step=lambda step: os.kill(os.getpid(), signal.SIGUSR1)
                       if rank == 1 and step == 4 else None)
    stopper.uninstall()
    dist.destroy_process_group()
    queue.put((rank, stopped, saves))


def test_two_ranks_stop_together_one_update_after_a_signal_on_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=hook_ranks, args=(rank, port, queue)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    results = {rank: (stopped, saves) for rank, stopped, saves in (queue.get(timeout=60) for _ in procs)}
    for proc in procs:
        proc.join(timeout=30)
    assert results[0] == results[1] == (5, [5])  # signal during update 4, agreed at update 5 by both ranks


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_save_timer_prefers_epoch_ends_and_saves_mid_epoch_only_in_long_epochs():
    clock = FakeClock()
    timer = SaveTimer(minutes=15, clock=clock)
    assert timer.due_at_epoch_end()  # never written: the first epoch end writes
    timer.saved()
    for minute in range(1, 15):  # 30-second epochs: no mid-epoch save, the epoch end after 15 minutes writes
        timer.new_epoch()
        clock.now = minute * 60 - 1
        assert not timer.due_mid_epoch() and not timer.due_at_epoch_end()
    clock.now = 15 * 60
    assert timer.due_at_epoch_end() and not timer.due_mid_epoch()
    timer.saved()
    timer.new_epoch()  # a long epoch: mid-epoch refreshes every 15 minutes
    clock.now += 15 * 60
    assert timer.due_mid_epoch()
    assert SaveTimer(minutes=0, clock=clock).due_at_epoch_end() and not SaveTimer(0, clock).due_mid_epoch()


def test_epoch_end_refreshes_checkpoint_last_on_the_timer_on_stop_and_at_the_end():
    stopper = stopper_that_raises()
    hook = UpdateHook(lambda epoch, step: None, stopper, accum_iter=1, save_every_iters=0, save_every_minutes=15)
    clock = FakeClock()
    hook.timer = SaveTimer(15, clock=clock)
    assert hook.epoch_end(final=False) == (False, True)  # the first epoch end
    clock.now = 60
    assert hook.epoch_end(final=False) == (False, False)  # one minute later: not due
    assert hook.epoch_end(final=True) == (False, True)  # the last epoch
    stopper.signals.append(signal.SIGUSR2)
    assert hook.epoch_end(final=False) == (True, True) and stopper.acknowledged


def test_fp16_loss_scale_and_skipped_updates_are_logged(caplog):
    """A gradient that overflows in fp16 makes the scaler skip the update and halve its scale: counted per epoch,
    logged at print steps (TensorBoard too) and in the epoch's stats."""
    weight = torch.nn.Parameter(torch.tensor([1e-2]))
    model = torch.nn.Module()
    model.weight = weight
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    inputs = iter([1.0, 1e35, 1.0, 1.0])  # the second step's gradient (x 65536) is inf in float32

    def step_loss(samples, labels):
        return (weight * next(inputs)).sum(), {}

    batches = [(torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))] * 4
    args = SimpleNamespace(accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, print_freq=1,
                           max_bad_images=0)
    scalars: list[tuple[str, float]] = []
    writer = SimpleNamespace(add_scalar=lambda name, value, step: scalars.append((name, value)))
    with caplog.at_level(logging.WARNING, logger="util.training"):
        stats = train_epoch(model, batches, optimizer, scaler, 0, args, step_loss, log_writer=writer)
    assert stats["skipped_updates"] == 1 and stats["loss_scale"] == 2.0**15
    assert ("train/loss_scale", 2.0**15) in scalars and ("train/skipped_updates", 1.0) in scalars
    assert "1 of this epoch's updates skipped" in caplog.text
    bf16 = train_epoch(model, batches[:1], optimizer, torch.amp.GradScaler("cpu", enabled=False), 0, args,
                       lambda samples, labels: ((weight * 1.0).sum(), {}))
    assert "loss_scale" not in bf16 and "skipped_updates" not in bf16
