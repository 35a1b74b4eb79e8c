"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM and submitit send before a kill or a time-out).

The handler only records the signal, every one it sees. The training loop asks at every optimizer update
(`util.training.UpdateHook`, ranks agreeing one update later without a blocking sync) and at epoch ends, saves a
checkpoint, then calls `finish()`: if SIGUSR2 was ever seen (submitit's time-out / preemption signal) its previous
handler runs, which under submitit checkpoints the job and requeues it, even when a SIGTERM came after it; then the
process exits cleanly.

SLURM sends USR2 `SIGNAL_DELAY_S` before the time limit (util/submit.py asks for that delay); a loop that does not
reach a check in time (a slow checkpoint wait, a long evaluation, a recompile, a data stall) would lose the requeue
when the limit's SIGTERM and SIGKILL arrive. A watchdog therefore requeues through the same handler if no check was
reached `watchdog_s` after USR2: the job then continues from its last checkpoint.
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
REQUEUE_SIGNAL = signal.SIGUSR2  # submitit's checkpoint-and-requeue signal
SIGNAL_DELAY_S = 120  # USR2 this long before SLURM's time limit (util/submit.py)
WATCHDOG_S = 60.0  # half of it: the other half is left for the requeue itself


class GracefulStop:
    """Records stop signals; safe to create anywhere, active only after `install()` in the main thread.

    watchdog_s: seconds after USR2 within which the loop must reach a stop check (`acknowledge`), else the
    requeue handler is called from a watchdog thread (0: no watchdog)."""

    def __init__(self, watchdog_s: float = WATCHDOG_S) -> None:
        self.signals: list[int] = []
        self.previous: dict[int, Any] = {}
        self.watchdog_s = watchdog_s
        self.acknowledged = False
        self.requeued = False
        self._watchdog: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def received(self) -> int | None:
        """The last signal seen (None before any)."""
        return self.signals[-1] if self.signals else None

    @property
    def requested(self) -> bool:
        """True once this process received a stop signal (local: no collective)."""
        return bool(self.signals)

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
        self.signals.append(signum)
        logger.warning("received %s: will save a checkpoint after the current step and exit",
                       signal.Signals(signum).name)
        handler = self.previous.get(REQUEUE_SIGNAL)
        if signum == REQUEUE_SIGNAL and self.watchdog_s > 0 and self._watchdog is None and callable(handler):
            self._watchdog = threading.Timer(self.watchdog_s, self._on_watchdog, args=(handler,))
            self._watchdog.daemon = True
            self._watchdog.start()

    def acknowledge(self) -> None:
        """The loop reached a stop check and will save and exit: the watchdog stands down."""
        self.acknowledged = True
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_watchdog(self, handler: Any) -> None:
        if self.acknowledged:
            return
        logger.error("no stop check reached %.0f s after SIGUSR2 (slow checkpoint, long evaluation, recompile or "
                     "data stall?): requeueing now; the job resumes from its last checkpoint", self.watchdog_s)
        try:
            self._requeue(handler)
        except SystemExit:  # submitit's handler exits after requeueing: in this thread that ends only the thread
            pass
        except Exception:  # noqa: BLE001 - a thread has nobody to raise to
            logger.exception("the requeue from the watchdog failed")

    def _requeue(self, handler: Any) -> None:
        """Call USR2's previous handler (submitit's checkpoint-and-requeue) once, whoever asks first (the watchdog
        or `finish`)."""
        with self._lock:
            if self.requeued:
                return
            self.requeued = True
        handler(REQUEUE_SIGNAL, None)

    def stop_requested(self) -> bool:
        """True when any rank received a stop signal (a blocking collective when distributed: epoch ends)."""
        flag = self.requested
        if distributed.is_dist():
            value = torch.tensor([int(flag)])
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=distributed.cpu_group())
            flag = bool(value.item())
        if flag:
            self.acknowledge()
        return flag

    def finish(self) -> NoReturn:
        """After the checkpoint is on disk: requeue if USR2 was ever seen (else hand the first signal to its previous
        handler), exit 0."""
        self.acknowledge()
        handlers = {sig: handler for sig, handler in self.previous.items() if callable(handler)}
        self.uninstall()
        if REQUEUE_SIGNAL in self.signals and REQUEUE_SIGNAL in handlers:
            self._requeue(handlers[REQUEUE_SIGNAL])
        else:
            first = next((sig for sig in self.signals if sig in handlers), None)
            if first is not None:
                handlers[first](first, None)
        logger.info("stopped cleanly after a stop signal; resume with --resume auto")
        distributed.cleanup()
        raise SystemExit(0)
