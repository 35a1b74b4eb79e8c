"""Metric logging (MAE-style console lines with ETA, JSON lines, TensorBoard), logging set-up and seeding."""

from __future__ import annotations

import datetime
import json
import logging
import random
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util import distributed

logger = logging.getLogger(__name__)


def setup_logging(output_dir: str | None = None, level: int = logging.INFO) -> None:
    """Log to stdout (and `output_dir/console.log`) from rank 0 only; other ranks log warnings and errors."""
    rank = distributed.get_rank()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "console.log"))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s r{rank}] %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SmoothedValue:
    """A window of values and the global average. Tensors are kept as they are and read only when printed, so a
    training step never waits for the device to report a loss."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window: deque[Any] = deque(maxlen=window_size)
        self.pending: list[Any] = []
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: Any, n: int = 1) -> None:
        self.pending.append((value.detach() if torch.is_tensor(value) else value, n))

    def _flush(self) -> None:
        if not self.pending:
            return
        values = [v for v, _ in self.pending]
        tensors = [i for i, v in enumerate(values) if torch.is_tensor(v)]
        if tensors:  # one device-to-host copy for all pending tensors
            host = torch.stack([values[i].float().reshape(()) for i in tensors]).cpu().tolist()
            for i, value in zip(tensors, host):
                values[i] = value
        for value, (_, n) in zip(values, self.pending):
            self.window.append(float(value))
            self.total += float(value) * n
            self.count += n
        self.pending.clear()

    @property
    def median(self) -> float:
        self._flush()
        return float(np.median(self.window)) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        self._flush()
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        self._flush()
        return self.window[-1] if self.window else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Collects named meters and prints MAE-style progress lines every `print_freq` steps."""

    def __init__(self, delimiter: str = "  ", mean_over_ranks: bool = False):
        """mean_over_ranks: before each progress line (every `print_freq` steps and at the end), replace the values
        logged since the previous line by their mean over ranks, so printed and returned numbers describe the whole
        run rather than rank 0's shard. A collective: every rank must iterate `log_every` in step (training loops,
        not sharded evaluation)."""
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.mean_over_ranks = mean_over_ranks

    def update(self, n: int = 1, **values: Any) -> None:
        """Add one value per meter, each weighing `n` in the global average (e.g. a batch of n samples)."""
        for name, value in values.items():
            self.meters[name].update(value, n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def reduce_over_ranks(self) -> None:
        """Replace every meter's pending tensor values by their mean over ranks (one all-reduce for all meters, then
        host floats, so a second call reduces nothing). Call it on every rank at the same steps, before any rank
        reads a meter."""
        if not distributed.is_dist():
            return
        slots = [(meter, i) for _, meter in sorted(self.meters.items()) for i, (value, _) in enumerate(meter.pending)
                 if torch.is_tensor(value)]
        if not slots:
            return
        values = torch.stack([meter.pending[i][0].float().reshape(()) for meter, i in slots])
        torch.distributed.all_reduce(values)
        values /= distributed.get_world_size()
        for (meter, i), value in zip(slots, values.tolist()):
            meter.pending[i] = (value, meter.pending[i][1])

    def averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", total: int | None = None) -> Iterator:
        total = len(iterable) if total is None else total  # type: ignore[arg-type]
        start = end = time.time()
        iter_time, data_time = SmoothedValue(), SmoothedValue()
        width = len(str(total))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                if self.mean_over_ranks:
                    self.reduce_over_ranks()
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                logger.info(
                    "%s [%*d/%d]  eta: %s  %s  time: %.4f  data: %.4f",
                    header, width, i, total, eta, self, iter_time.global_avg, data_time.global_avg,
                )
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        logger.info("%s Total time: %s (%.4f s / it)", header, elapsed, (time.time() - start) / max(total, 1))


def append_json_log(output_dir: str | None, stats: dict[str, Any]) -> None:
    """Append one JSON line to `output_dir/log.txt` (rank 0 only)."""
    if output_dir and distributed.is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as f:
            f.write(json.dumps(stats) + "\n")


def make_log_writer(log_dir: str | None):
    """TensorBoard writer on rank 0 (None elsewhere or without a folder)."""
    if not distributed.is_main_process() or not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


class RunClock:
    """Wall time of a run and its ETA from the epochs done so far in this process (resumed epochs excluded)."""

    def __init__(self, start_epoch: int, epochs: int):
        self.start, self.first_epoch, self.epochs = time.time(), start_epoch, epochs

    def elapsed(self) -> str:
        return str(datetime.timedelta(seconds=int(time.time() - self.start)))

    def eta(self, epoch: int) -> str:
        """Time left before `epoch` starts, extrapolated from the epochs this process trained."""
        done = epoch - self.first_epoch
        if done <= 0:
            return "known after the first epoch"
        per_epoch = (time.time() - self.start) / done
        return str(datetime.timedelta(seconds=int(per_epoch * (self.epochs - epoch))))

    def log_epoch_start(self, epoch: int) -> None:
        logger.info("epoch %d of %d starts; run ETA %s (elapsed %s)", epoch + 1, self.epochs, self.eta(epoch),
                    self.elapsed())


def log_summary(title: str, items: dict[str, Any]) -> None:
    """The end of a run in a few lines: where its outputs went, its result and its wall time (rank 0)."""
    if not distributed.is_main_process():
        return
    width = max(len(key) for key in items)
    lines = "\n".join(f"  {key:<{width}}  {value}" for key, value in items.items())
    logger.info("%s\n%s", title, lines)
