"""util/datasets.py's `ignore_stop_signals`: DataLoader workers survive the SIGTERM / SIGUSR1 / SIGUSR2 that SLURM
sends every process of a job (only the main process reacts: it saves and exits), and without it a SIGTERM kills the
loader."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from util.datasets import ignore_stop_signals


class Slow(Dataset):
    """index -> index, after a short sleep (so the workers are still busy when they are signalled)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> int:
        time.sleep(0.05)
        return index


def signal_from_another_process(pids: list[int], signals: list[int]) -> None:
    """Send signals as SLURM does: from a process that is not the workers' parent (torch's worker handler lets a
    SIGTERM from the parent end the worker quietly, and one from anyone else kill it)."""
    code = "import os, sys; [os.kill(int(p), int(s)) for s in sys.argv[1].split(',') for p in sys.argv[2:]]"
    subprocess.run([sys.executable, "-c", code, ",".join(map(str, signals)), *map(str, pids)], check=True)


def iterate_and_signal(worker_init_fn, signals: list[int]) -> list[int]:
    loader = DataLoader(Slow(), batch_size=2, num_workers=2, worker_init_fn=worker_init_fn)
    iterator = iter(loader)
    batches = [next(iterator), next(iterator)]  # one from each worker: both have run worker_init_fn
    signal_from_another_process([w.pid for w in iterator._workers], signals)
    time.sleep(0.2)  # let the signals land before the next batch is asked for
    batches.extend(iterator)
    return torch.cat(batches).tolist()


def test_workers_ignore_stop_signals():
    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    assert iterate_and_signal(ignore_stop_signals, signals) == list(range(24))


def test_without_ignore_stop_signals_a_sigterm_kills_the_loader():
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
        iterate_and_signal(None, [signal.SIGTERM])


def test_ignore_stop_signals_sets_sig_ign_for_the_three_signals():
    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
