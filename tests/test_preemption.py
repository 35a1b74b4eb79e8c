"""util/preemption.py with real signals sent to this process and a stand-in for submitit's handlers: every signal is
kept, USR2 requeues even when SIGTERM follows, and a watchdog requeues when the loop does not reach a check."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from util.preemption import GracefulStop


@pytest.fixture
def submitit_handlers():
    """What submitit installs in a job: USR2 checkpoints and requeues, SIGTERM is bypassed (logged). Records which
    ran, in which thread; the handlers of this process are restored afterwards."""
    calls: list[tuple[str, str]] = []
    fakes = {signal.SIGUSR2: "requeue", signal.SIGTERM: "bypass", signal.SIGUSR1: "usr1"}
    saved = {sig: signal.getsignal(sig) for sig in fakes}
    for sig, name in fakes.items():
        signal.signal(sig, lambda signum, frame, name=name: calls.append((name, threading.current_thread().name)))
    yield calls
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def send(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs in the main thread at the next bytecode


def test_usr2_then_sigterm_still_requeues(submitit_handlers):
    """SLURM's time-limit SIGTERM after submitit's USR2 must not turn a requeue into a plain exit."""
    stopper = GracefulStop().install()
    send(signal.SIGUSR2)
    send(signal.SIGTERM)
    assert stopper.signals == [signal.SIGUSR2, signal.SIGTERM] and stopper.requested
    with pytest.raises(SystemExit) as exit_:
        stopper.finish()
    assert exit_.value.code == 0
    assert [name for name, _ in submitit_handlers] == ["requeue"]
    assert signal.getsignal(signal.SIGTERM) is not stopper._on_signal  # handlers handed back


def test_without_usr2_the_first_signal_goes_to_its_handler(submitit_handlers):
    stopper = GracefulStop().install()
    send(signal.SIGUSR1)
    send(signal.SIGTERM)
    with pytest.raises(SystemExit):
        stopper.finish()
    assert [name for name, _ in submitit_handlers] == ["usr1"]


def test_watchdog_requeues_when_no_check_is_reached(submitit_handlers):
    """The loop is stuck (a data stall, a long evaluation): the watchdog requeues once; the loop's own check, when it
    comes, does not requeue again."""
    stopper = GracefulStop(watchdog_s=0.2).install()
    send(signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not submitit_handlers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert submitit_handlers and submitit_handlers[0][0] == "requeue"
    assert submitit_handlers[0][1] != threading.main_thread().name
    with pytest.raises(SystemExit):
        stopper.finish()
    assert len(submitit_handlers) == 1


def test_watchdog_stands_down_once_the_loop_reaches_a_check(submitit_handlers):
    stopper = GracefulStop(watchdog_s=0.2).install()
    send(signal.SIGUSR2)
    assert stopper.stop_requested()  # the check: this process saw USR2 (and acknowledges it)
    time.sleep(0.4)
    assert submitit_handlers == []  # nothing from the watchdog: the loop saves and requeues itself
    with pytest.raises(SystemExit):
        stopper.finish()
    assert [name for name, _ in submitit_handlers] == ["requeue"]


def test_no_watchdog_without_a_requeue_handler():
    saved = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        stopper = GracefulStop(watchdog_s=0.05).install()
        send(signal.SIGUSR2)
        assert stopper._watchdog is None and stopper.requested
        stopper.uninstall()
    finally:
        signal.signal(signal.SIGUSR2, saved)
