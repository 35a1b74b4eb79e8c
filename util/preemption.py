"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM and submitit send before a kill or a time-out).

The handler only records the signal. The training loop asks `stop_requested()` between optimizer steps, saves a
checkpoint, then calls `finish()`: the signal's previous handler runs (under submitit, that is its
checkpoint-and-requeue handler) and the process exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, NoReturn

import torch

from util import distributed

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class GracefulStop:
    """Records stop signals; safe to create anywhere, active only after `install()` in the main thread."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum
        logger.warning("received %s: will save a checkpoint after the current step and exit",
                       signal.Signals(signum).name)

    def stop_requested(self) -> bool:
        """True when any rank received a stop signal (a collective call when distributed)."""
        flag = self.received is not None
        if not distributed.is_dist():
            return flag
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        value = torch.tensor([int(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def finish(self) -> NoReturn:
        """After the checkpoint is on disk: hand the signal to its previous handler (submitit requeues), exit 0."""
        previous = self.previous.get(self.received) if self.received is not None else None
        self.uninstall()
        if callable(previous):
            previous(self.received, None)
        logger.info("stopped cleanly after a stop signal; resume with --resume auto")
        distributed.cleanup()
        raise SystemExit(0)
