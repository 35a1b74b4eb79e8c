"""Iteration-based runs (semantic segmentation, detection: mmcv's / detectron2's iteration runners) on the project's
one training loop, `util.training.train_epoch`.

A run of `--iters` optimizer updates is cut into intervals of `--eval_interval` updates (the released segmentation
config: 160k iterations, evaluation and checkpoint every 16k); each interval is one `train_epoch` call whose
`Timeline` maps its micro-steps to the global update (the lr schedule is a function of the update, e.g.
`util.lr_sched.poly_lr_at`). Data epochs run on underneath: `IterationSampler` draws update t's batch from data epoch
t // steps_per_epoch, shuffled per (--seed, data epoch), so the batches depend only on t, never on where a run
stopped. Checkpoints (`util.checkpoint`) store (interval, micro-steps done in it): mid-interval ones (every
--save_every_iters updates and on a stop signal) resume exactly, with every rank's RNG; interval ends keep
checkpoint-<updates>.pth. `--eval` writes only `eval_<time>.json` (and the task's own files) into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Sampler

from util import checkpoint as ckpt
from util import distributed
from util.amp import AMP_CHOICES
from util.cls_run import setup_run
from util.config import apply_defaults
from util.datasets import EpochIndex, ResumableDistributedSampler
from util.misc import RunClock, append_json_log, log_summary, make_log_writer
from util.preemption import GracefulStop
from util.resume import load_resume_state, resume_run
from util.run_folder import add_overwrite_arg, check_output_dir
from util.training import StepLoss, Timeline, UpdateHook, add_compile_args, maybe_compile, train_epoch, wrap_ddp

logger = logging.getLogger(__name__)


class IterationSampler(Sampler[EpochIndex]):
    """This rank's samples for micro-steps [start, stop) of an iteration-based run (`set_range`), across data epochs.

    Micro-step s of this rank takes batch s % steps_per_epoch of data epoch s // steps_per_epoch, where a data epoch
    is `ResumableDistributedSampler`'s shuffled shard of (seed, epoch) and its last incomplete batch is dropped. Items
    carry their data epoch (`EpochIndex`), so `util.datasets.RobustSeededDataset` seeds each sample's augmentation
    from (seed, data epoch, index) in any worker. Use with `DataLoader(batch_size=batch_size, drop_last=False)`.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int, rank: int, seed: int):
        self.epochs = ResumableDistributedSampler(dataset, batch_size, num_replicas=num_replicas, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.steps_per_epoch = self.epochs.num_samples // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch_size {batch_size} x {num_replicas} ranks exceeds the {len(dataset)} training "
                             "images (the last incomplete batch is dropped)")
        self.start = self.stop = 0

    def set_range(self, start: int, stop: int) -> None:
        """Yield the samples of this rank's micro-steps start..stop-1 at the next iteration."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad micro-step range [{start}, {stop})")
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch_size

    def __iter__(self) -> Iterator[EpochIndex]:
        step = self.start
        while step < self.stop:
            epoch, offset = divmod(step, self.steps_per_epoch)
            take = min(self.stop - step, self.steps_per_epoch - offset)
            self.epochs.set_epoch(epoch)
            self.epochs.set_start_step(offset)
            yield from list(self.epochs)[: take * self.batch_size]
            step += take


class Plan(NamedTuple):
    """The shape of a run: `iters` optimizer updates, evaluated and checkpointed every `interval`, each update
    `accum_iter` micro-steps of every rank."""

    iters: int
    interval: int
    accum_iter: int

    @property
    def intervals(self) -> int:
        return math.ceil(self.iters / self.interval)

    def bounds(self, index: int) -> tuple[int, int]:
        """(first update, end update) of interval `index`."""
        return index * self.interval, min((index + 1) * self.interval, self.iters)


def add_iteration_args(group: argparse._ArgumentGroup, iters: int, interval: int) -> None:
    """The schedule flags of an iteration-based script; defaults from its released config."""
    group.add_argument("--iters", default=iters, type=int, help="optimizer updates of the whole run")
    group.add_argument("--eval_interval", default=interval, type=int,
                       help="evaluate and keep checkpoint-<updates>.pth every N updates (also the last)")
    group.add_argument("--save_every_iters", default=0, type=int,
                       help="also refresh checkpoint-last.pth every N updates (0: only at evaluations and on a stop "
                            "signal)")


def add_run_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "Run" flags of an iteration-based script (output, device, precision, loaders, resume, --eval,
    distributed, compile); returns the group for the script's own."""
    g = parser.add_argument_group("Run")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, TensorBoard")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--amp", default=None, choices=AMP_CHOICES, help="autocast (default: bf16 on GPUs with native "
                   "bf16, fp16 + GradScaler on older ones such as V100s, none on CPU)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--num_workers", default=None, type=int, help="loader processes per GPU (default: CPUs - 2)")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--max_bad_images", default=None, type=int, help="unreadable images tolerated per interval")
    g.add_argument("--resume", default="", help="checkpoint of this script, or 'auto' (newest in --output_dir)")
    g.add_argument("--resume_allow_changes", default=None, type=str, metavar="FLAG[,FLAG...]")
    g.add_argument("--start_epoch", default=0, type=int, help="set from --resume (the evaluation interval)")
    g.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint on the validation split")
    g.add_argument("--dist_url", default="env://")
    distributed.add_legacy_launcher_args(g)
    distributed.add_dist_args(g)
    add_overwrite_arg(g)
    add_compile_args(g)
    return g


def load_checkpoints(args: argparse.Namespace) -> tuple[dict | None, dict | None]:
    """(the --resume checkpoint, else None; the --finetune encoder when not resuming, else None). `--resume auto`
    becomes the newest loadable checkpoint of --output_dir, or "" (a fresh run) when there is none."""
    if args.resume:
        path, state = load_resume_state(args)
        if state is not None:
            args.resume = str(path)
            return state, None
        args.resume = ""
    return None, (ckpt.load_checkpoint(args.finetune) if args.finetune else None)


def check_run_flags(args: argparse.Namespace, read_files: bool = True) -> None:
    """--eval has a --resume; with `read_files` (not under --print_config, which checks no file): --finetune /
    --resume name files, and a new training run never writes over another run's --output_dir
    (`util.run_folder.check_output_dir`: --resume auto, a fresh folder or --overwrite). ValueError naming the flag."""
    if args.eval and not args.resume:
        raise ValueError("--eval evaluates a checkpoint of this script: give it with --resume")
    if not read_files:
        return
    for flag in ("finetune", "resume"):
        path = getattr(args, flag)
        if path and path != "auto" and not Path(path).is_file():
            raise ValueError(f"--{flag} {path}: no such file")
    check_output_dir(args)


def resolve_run(args: argparse.Namespace, read_files: bool, demo_data: str, check_data: Callable[[], None],
                resolve_architecture: Callable[[dict | None, dict | None], None]) -> tuple[dict | None, dict | None]:
    """The common end of an iteration-based script's `resolve_args`, after its flag checks: the data layout
    (`check_data`, skipped for the demo's own data `demo_data`, written at start), the --resume / --finetune checkpoints
    and the architecture they fix. With `read_files` False (--print_config) no file is read: the architecture is
    resolved from the flags unless a checkpoint would fix it. Returns (--resume state, --finetune checkpoint)."""
    if not read_files:
        if not (args.finetune or args.resume):
            resolve_architecture(None, None)
        return None, None
    if not args.demo or args.data_path != demo_data:
        check_data()
    resume_state, source = load_checkpoints(args)
    resolve_architecture(resume_state, source)
    return resume_state, source


def apply_demo(args: argparse.Namespace, parser: argparse.ArgumentParser, overrides: Mapping[str, Any],
               demo_data: str) -> None:
    """--demo: the demo's settings on every flag left at its default (`util.config.apply_defaults`), and its built-in
    data (`demo_data`) unless --data_path is given."""
    if args.demo:
        apply_defaults(args, parser, overrides)
        args.data_path = args.data_path or demo_data


def use_checkpoint_architecture(args: argparse.Namespace, values: Mapping[str, Any]) -> None:
    """A --resume checkpoint fixes the model: its architecture `values` replace the flags (a different value given on
    the command line is logged as replaced)."""
    for key, value in values.items():
        if getattr(args, key) not in (None, value) and key != "input_size":  # input_size has a non-None default
            logger.warning("--%s %s replaced by the checkpoint's %s", key, getattr(args, key), value)
        setattr(args, key, value)
    args.model = args.model or "vit_base_patch16"


def setup(args: argparse.Namespace, write_demo_data: Callable[[], Any] | None = None) -> torch.device:
    """`cls_run.setup_run` (device and precision of this machine, process group, logging, seed, run_info.json);
    `write_demo_data` (a --demo run's built-in data) runs first in one process, before the process group, and every
    rank waits for it."""
    if write_demo_data is not None and os.environ.get("RANK", "0") == "0":
        write_demo_data()
    device = setup_run(args)
    if write_demo_data is not None:
        distributed.barrier()
    return device


def check_iteration_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for a schedule that cannot run."""
    for name in ("iters", "eval_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.save_every_iters < 0:
        raise ValueError(f"--save_every_iters must be >= 0, got {args.save_every_iters}")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist_timeout must be > 0 minutes, got {args.dist_timeout}")


class IterationRun:
    """Resume, the interval loop (train, evaluate, checkpoint), graceful stops, log.txt and TensorBoard.

    The task brings: the bare model and its optimizer, the train loader (its sampler an `IterationSampler`),
    `make_step_loss(train_model) -> step_loss(samples, targets) -> (loss, {part: loss})` (train_model: the model as
    wrapped for training, DDP and compile), `evaluate() -> {metric: value}` (a collective when distributed; scalar
    values are logged) and `lr_at(update) -> base lr`.
    """

    def __init__(self, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader: Any, make_step_loss: Callable[[nn.Module], StepLoss],
                 evaluate: Callable[[], dict[str, Any]], lr_at: Callable[[int], float],
                 flag_defaults: Mapping[str, Any] | None = None):
        self.args, self.bare, self.optimizer, self.train_loader = args, model, optimizer, train_loader
        self.make_step_loss, self.evaluate, self.lr_at = make_step_loss, evaluate, lr_at
        self.flag_defaults = flag_defaults
        self.plan = Plan(args.iters, args.eval_interval, args.accum_iter)
        self.device = torch.device(args.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.writer = ckpt.BackgroundWriter()
        self.start_step = 0
        if getattr(args, "max_bad_images", None) is None:  # 1 % of an interval's samples on this rank
            args.max_bad_images = max(1, self.plan.interval * args.accum_iter * args.batch_size // 100)

    def resume(self, state: Mapping[str, Any]) -> None:
        """--eval: the weights only; else everything, after util.resume's same-experiment checks."""
        self.start_step = resume_run(state, self.bare, self.optimizer, self.scaler, self.args, self.flag_defaults)

    def updates_done(self, interval: int, step: int) -> int:
        """Global updates after `step` micro-steps of `interval` (step 0: the interval is complete)."""
        first, end = self.plan.bounds(interval)
        return first + step // self.plan.accum_iter if step else end

    def save(self, interval: int, step: int) -> None:
        """Checkpoint after `step` micro-steps of `interval` (0: the interval is done, also kept as
        checkpoint-<updates>.pth). A collective (every rank's RNG); rank 0 writes."""
        args = self.args
        if not args.output_dir:
            return
        updates = self.updates_done(interval, step)
        state = ckpt.training_state(self.bare, self.optimizer, self.scaler, interval, step, args, updates=updates)
        if not distributed.is_main_process():
            return
        out = Path(args.output_dir)
        if step == 0:
            ckpt.write_checkpoint(state, [out / f"checkpoint-{updates}.pth", out / "checkpoint-last.pth"], self.writer)
        else:  # a mid-interval save or a stop: on disk before training goes on (or the process exits)
            self.writer.wait()
            ckpt.write_checkpoint(state, [out / "checkpoint-last.pth"])

    def fit(self) -> dict[str, Any]:
        """Train from (args.start_epoch, self.start_step) to --iters; returns the last evaluation."""
        args = self.args
        logger.info("start training for %d updates (lr %.3e, evaluation every %d)", args.iters, args.lr,
                    args.eval_interval)
        log_writer = make_log_writer(args.log_dir)
        stopper = GracefulStop().install()
        clock = RunClock(args.start_epoch, self.plan.intervals)
        try:
            model = wrap_ddp(maybe_compile(self.bare, args.compile, args.compile_backend), self.device)
            distributed.set_training_timeout(args.dist_timeout)  # start-up is over: a stuck rank now fails fast
            stats = self.train_intervals(model, stopper, log_writer, clock)
            self.writer.wait()
        finally:
            self.writer.close()
            stopper.uninstall()
            if log_writer is not None:
                log_writer.close()
        if not stats:  # resumed a finished run: nothing trained, report the checkpoint
            stats = self.evaluate()
        log_summary("training finished", {
            "checkpoints": f"{args.output_dir} (checkpoint-last.pth, checkpoint-<updates>.pth every "
                           f"{args.eval_interval})",
            "log": str(Path(args.output_dir) / "log.txt"), "TensorBoard": args.log_dir or "off",
            "wall time": clock.elapsed(), **{k: v for k, v in stats.items() if isinstance(v, float)},
        })
        return stats

    def train_intervals(self, model: nn.Module, stopper: GracefulStop, log_writer: Any,
                        clock: RunClock) -> dict[str, Any]:
        """The loop of `fit` (`model`: DDP-wrapped); returns the last evaluation's stats."""
        args, plan, stats, start_step = self.args, self.plan, {}, self.start_step
        on_update = UpdateHook(self.save, stopper, plan.accum_iter, args.save_every_iters)
        sampler, step_loss = self.train_loader.sampler, self.make_step_loss(model)
        for interval in range(args.start_epoch, plan.intervals):
            clock.log_epoch_start(interval)
            first, end = plan.bounds(interval)
            sampler.set_range(first * plan.accum_iter + start_step, end * plan.accum_iter)
            timeline = self.timeline(first, end)
            train_stats = train_epoch(model, self.train_loader, self.optimizer, self.scaler, interval, args,
                                      step_loss, log_writer=log_writer, start_step=start_step,
                                      on_update=on_update, timeline=timeline)
            start_step = 0
            stats = self.evaluate()
            self.save(interval, 0)
            log_interval(args, log_writer, end, train_stats, stats)
            if stopper.stop_requested():  # a collective: every rank stops after the same interval
                self.writer.wait()
                stopper.finish()
        return stats

    def timeline(self, first: int, end: int) -> Timeline:
        """Micro-step `step` of the interval starting at update `first` belongs to update first + step // accum."""
        accum = self.plan.accum_iter
        return Timeline(lr=lambda step: self.lr_at(first + step // accum), x=lambda step: first + step // accum,
                        header=f"Updates [{first}, {end}) of {self.plan.iters}:")


def execute(args: argparse.Namespace, run: "IterationRun", resume_state: Mapping[str, Any] | None,
            evaluate: Callable[[], dict[str, Any]], record: Callable[[dict[str, Any]], Mapping[str, Any]],
            report: Callable[[dict[str, Any], str], None], task: str,
            figure: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """What an iteration-based script does once built: resume if asked, then train (`run.fit`, and the demo's
    `figure`) or, under --eval, `evaluate` and write `record(metrics)` as eval_<time>.json. An exception is logged
    with this rank (`distributed.failures_logged`); the process group ends however this ends. Returns the metrics."""
    try:
        with distributed.failures_logged():
            if resume_state is not None:
                run.resume(resume_state)
            if args.eval:
                metrics = evaluate()
                write_eval_record(args, record(metrics))
                report(metrics, f"evaluation of {args.resume}")
            else:
                metrics = run.fit()
                report(metrics, task)
                if args.demo and figure is not None:
                    figure(metrics)
    finally:
        distributed.cleanup()
    return metrics


def log_interval(args: argparse.Namespace, log_writer: Any, updates: int, train_stats: Mapping[str, float],
                 stats: Mapping[str, Any]) -> None:
    """One JSON line in log.txt and the scalar evaluation results in TensorBoard (rank 0), at `updates`."""
    scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    if log_writer is not None:
        for key, value in scalars.items():
            log_writer.add_scalar(f"perf/test_{key}", value, updates)
        log_writer.flush()
    append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                      **{f"test_{k}": v for k, v in scalars.items()}, "updates": updates})


def write_eval_record(args: argparse.Namespace, stats: Mapping[str, Any]) -> Path | None:
    """--eval's own record, `--output_dir/eval_<UTC time>.json` (rank 0): the checkpoint, the data, every number of
    `stats`, the git SHA and the flags. Nothing else of a training run's folder is touched."""
    if not distributed.is_main_process():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(args.output_dir) / f"eval_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoint": str(Path(args.resume).resolve()), "data_path": args.data_path, **dict(stats),
              "git_sha": ckpt.git_sha(), "args": ckpt.plain_args(args)}
    path.write_text(json.dumps(record, indent=2))
    logger.info("evaluation record: %s", path)
    return path
