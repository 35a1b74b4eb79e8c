"""What the classification entry scripts (main_finetune.py, main_linprobe.py) share outside the training loop:
their common flags (data, output, run, distributed, checkpoints) and checks, the --demo overrides, the checkpoint a
run starts from, the machine and process-group set-up, the --eval record and the final report.

Machine-independent checks run before submission too (a login node has no GPU); device and precision are decided
inside the job by `util.amp.resolve_machine` (`setup_run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from util import checkpoint as ckpt
from util import distributed, resume
from util.amp import AMP_CHOICES, configure_backends, describe_machine, resolve_machine
from util.cli import user_errors
from util.cls_data import check_classification_folders
from util.config import (
    add_config_args,
    add_global_batch_arg,
    apply_global_batch,
    check_range,
    config_yaml,
    maybe_print_config,
    parse_with_config,
    resolve_lr,
)
from util.misc import seed_everything, setup_logging
from util.run_folder import add_overwrite_arg, check_output_dir, prepare_output_dir
from util.training import add_compile_args

logger = logging.getLogger(__name__)

DEMO_PRETRAIN_CHECKPOINT = "./output_demo/pretrain/checkpoint-last.pth"


def add_training_args(parser: argparse.ArgumentParser, batch_size: int, epochs: int, batch_help: str) -> None:
    """The "Training" flags of both scripts (MAE's names); the defaults differ: MAE's per script."""
    g = parser.add_argument_group("Training")
    g.add_argument("--batch_size", default=batch_size, type=int, help=batch_help)
    g.add_argument("--epochs", default=epochs, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--print_freq", default=20, type=int, help="log every N steps")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Data, output, device, distributed and checkpoint flags of both scripts (MAE's names)."""
    g = parser.add_argument_group("Data and output")
    g.add_argument("--data_path", default=None, type=str, help="folder with train/ and val/ ImageFolder roots")
    g.add_argument("--nb_classes", default=None, type=int,
                   help="number of classes (default: the number of class folders in the training set)")
    g.add_argument("--demo", action="store_true",
                   help="train on the built-in digits from the demo pre-training checkpoint (CPU, about a minute)")
    g.add_argument("--no_aug", action="store_true",
                   help="train on the evaluation transform (resize + centre crop): no augmentation; set by --demo")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs (rank 0; default: --output_dir)")
    add_overwrite_arg(g)
    g.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--save_every_iters", default=0, type=int,
                   help="also refresh checkpoint-last.pth every N optimizer updates (0: only at epoch ends)")
    g.add_argument("--max_bad_images", default=None, type=int,
                   help="unreadable training images tolerated per epoch and rank (default: 1%% of the epoch)")
    g.add_argument("--num_workers", default=None, type=int,
                   help="data-loading processes per GPU (default: this task's CPUs - 2, decided in the job)")
    g.add_argument("--pin_mem", action="store_true", help="pin loader memory (default)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    g = parser.add_argument_group("Run")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available; decided in the job, on the machine that "
                        "trains)")
    g.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="autocast dtype (default: bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, "
                        "none on CPU)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="",
                   help="checkpoint of this script to continue (or to --eval), or 'auto': the newest loadable one in "
                        "--output_dir (none: start from --finetune)")
    g.add_argument("--resume_allow_changes", default=None, type=str, metavar="FLAG[,FLAG...]",
                   help="flags allowed to differ from the resumed checkpoint's run (e.g. epochs,layer_decay); any "
                        "other result-changing difference stops the run")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="set from --resume")
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint (top-1/top-5)")
    g.add_argument("--eval_freq", default=1, type=int, metavar="N",
                   help="evaluate on val/ after every N-th epoch and after the last (checkpoint-best.pth is the best "
                        "evaluated epoch)")
    g.add_argument("--dist_eval", action="store_true", help="shard evaluation over ranks (exact, padding skipped)")
    g.add_argument("--dist_url", default="env://", help="process-group URL (MAE)")
    distributed.add_legacy_launcher_args(g)
    distributed.add_dist_args(g)
    add_compile_args(g)
    add_global_batch_arg(g)
    add_config_args(parser)


def apply_demo_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser,
                         overrides: Mapping[str, Any], read_files: bool = True) -> None:
    """--demo: set demo values on every flag the user left at its default; checks that the demo pre-training
    checkpoint exists unless `read_files` is False."""
    if not args.demo:
        return
    if args.data_path:
        raise ValueError("--data_path cannot be combined with --demo (the demo uses the built-in digits)")
    for name, value in overrides.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if not read_files:
        return
    if not Path(args.finetune).is_file() and args.finetune == DEMO_PRETRAIN_CHECKPOINT and not args.resume:
        raise ValueError(f"--demo needs the demo pre-training checkpoint {DEMO_PRETRAIN_CHECKPOINT}: "
                         "run `python main_pretrain.py --demo` first (or pass --finetune PATH)")


def check_common_args(args: argparse.Namespace, read_files: bool = True) -> None:
    """Checks of both scripts: numbers, then (unless `read_files` is False: --print_config) files and data folders.
    Machine-independent (it also runs on a login node before submission): device and amp are checked by
    `util.amp.resolve_machine` inside the job."""
    if args.log_dir is None:
        args.log_dir = args.output_dir  # TensorBoard beside the checkpoints, as pre-training does
    for name in ("epochs", "batch_size", "accum_iter", "print_freq", "save_freq", "eval_freq", "nb_classes"):
        check_range(args, name, 1, math.inf)
    for name in ("num_workers", "save_every_iters", "max_bad_images"):
        check_range(args, name, 0, math.inf)
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise ValueError(f"--warmup_epochs must be in [0, --epochs={args.epochs}] (the bound is --epochs), "
                         f"got {args.warmup_epochs}")
    check_range(args, "weight_decay", 0, math.inf)
    check_range(args, "blr", 0, math.inf, low_open=True)
    check_range(args, "lr", 0, math.inf, low_open=True)
    check_range(args, "min_lr", 0, math.inf)
    if args.eval and not args.resume:
        raise ValueError("--eval evaluates a checkpoint of this script: give it with --resume")
    if not read_files:
        return
    if args.finetune and not Path(args.finetune).exists():
        raise ValueError(f"--finetune {args.finetune}: no such file (or Hub folder)")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise ValueError(f"--resume {args.resume}: no such file")
    if args.resume == "auto" and not args.output_dir:
        raise ValueError("--resume auto looks for checkpoints in --output_dir: give one")
    if not args.demo:
        check_classification_folders(args.data_path)


def load_source_checkpoint(
    args: argparse.Namespace, load_encoder: Callable[[str], dict[str, Any]] = ckpt.load_checkpoint
) -> dict[str, Any] | None:
    """The checkpoint that defines the model: --resume if given, else --finetune (read by `load_encoder`: the
    scripts pass `models_vit.load_encoder_source`, which also reads safetensors exports and Hub folders), else None
    (from scratch).

    `--resume auto` becomes the path of the newest loadable checkpoint in --output_dir, or "" (a fresh run from
    --finetune) when there is none yet.
    """
    if args.resume:
        path, state = resume.load_resume_state(args)
        if state is not None:
            args.resume = str(path)
            return state
        args.resume = ""  # 'auto' found nothing to resume: a fresh run
    return load_encoder(args.finetune) if args.finetune else None


def setup_run(args: argparse.Namespace) -> torch.device:
    """Output folder check, device and precision of this machine, process group, logging, lr, seed, output folder
    and run_info.json."""
    check_output_dir(args)  # every rank, before anything is written: a fresh run never writes over another one
    resolve_machine(args)  # on the machine that trains (in a SLURM job: the compute node)
    distributed.apply_legacy_launcher_args(args)
    info = distributed.init_distributed(args.device, args.dist_url, args.dist_backend, args.output_dir or None)
    if info.distributed and args.device.startswith("cuda"):
        args.device = str(info.device("cuda"))  # this rank's GPU (local rank modulo the GPUs it sees)
    prepare_output_dir(args)  # every rank has checked; --overwrite deletes the old run's files (rank 0)
    setup_logging(None if args.eval else args.output_dir)  # --eval never writes into a training run's folder
    logger.info("%s", describe_machine(args.device, args.amp))  # decided before logging was set up
    apply_global_batch(args, info.world_size)  # a config's global batch: --accum_iter for this world size
    resolve_lr(args, info.world_size)
    seed_everything(args.seed + info.rank)
    configure_backends(args.device)  # attention kernels, TF32, cuDNN: chosen per device in one place
    if args.output_dir and not args.eval:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        ckpt.write_run_info(args)
    logger.info("resolved arguments (a file --config accepts):\n%s", config_yaml(args))
    return torch.device(args.device)


def write_eval_record(args: argparse.Namespace, stats: Mapping[str, float]) -> Path | None:
    """--eval's own record, `eval_<UTC time>.json` beside the evaluated checkpoint (rank 0): the checkpoint, the
    data, top-1/top-5, loss and image count, the git SHA. A training run's run_info.json is never touched."""
    if not distributed.is_main_process():
        return None
    checkpoint = Path(args.resume).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    record = {"checkpoint": str(checkpoint), "data_path": args.data_path, "demo": args.demo, **dict(stats),
              "git_sha": ckpt.git_sha(), "args": ckpt.plain_args(args)}
    path = checkpoint.parent / f"eval_{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    logger.info("evaluation record: %s", path)
    return path


def report(stats: Mapping[str, float], what: str) -> None:
    """The script's final result on stdout (rank 0)."""
    if distributed.is_main_process():
        print(f"{what}: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  on {stats['n']} val images"
              + (f"  (best top-1 {stats['best_acc1']:.2f}%)" if "best_acc1" in stats else ""), flush=True)


def parse_and_resolve(
    parser: argparse.ArgumentParser, resolve: Callable[..., Any], argv: list[str] | None = None
) -> tuple[argparse.Namespace, Any]:
    """Parse the command line and resolve it (`resolve(args, read_files=...)`); --print_config resolves without
    reading any file and exits. A ValueError exits with status 2 and one line naming the flag (`util.cli`)."""
    args = parse_with_config(parser, argv)
    with user_errors(parser.prog):
        maybe_print_config(args, partial(resolve, read_files=False), parser)
        checkpoint = resolve(args)
    return args, checkpoint

