"""Fine-tune a pre-trained ViT encoder on ImageNet-style classification (MAE's recipe, paper Appendix A).

Accepts this project's pre-training checkpoints, MAE's released `mae_pretrain_vit_*.pth` and the released DeepMIM
ones. The paper's ViT-B recipe (Appendix A: 100 epochs, batch 1024, absolute lr 2e-4, i.e. blr 5e-5 — 4e-4 / blr
1e-4 for CLIP targets —, layer decay 0.65 / 0.6, drop path 0.1, RandAugment, label smoothing 0.1, Mixup 0.8,
CutMix 1.0, warm-up 5):

    torchrun --nproc_per_node 8 main_finetune.py --finetune output_dir/checkpoint-last.pth --data_path /imagenet \
        --batch_size 128 --epochs 100 --blr 5e-5 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 \
        --reprob 0.25 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --warmup_epochs 5 --dist_eval

Layer studies (paper Figs. 7, 8): `--trainable_blocks K` trains only the last K blocks and the head;
`--reinit_blocks K` re-initialises the last K blocks before end-to-end fine-tuning.
Demo on CPU (after `python main_pretrain.py --demo`): `python main_finetune.py --demo`.

Cluster runs (shared with main_linprobe.py): `--save_every_iters N` refreshes checkpoint-last.pth every N updates;
SIGTERM / SIGUSR1 / SIGUSR2 save and exit cleanly; `--resume auto` continues exactly (weights, optimizer, scaler,
schedule, sampler position, every rank's RNG) from the newest loadable checkpoint in --output_dir, refusing one
written with other result-changing flags unless they are named in `--resume_allow_changes`. Device and precision
are decided inside the job (`util.amp.resolve_machine`), never at submission.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

import models_vit
from engine_finetune import evaluate, real_samples_on_rank, train_one_epoch
from util import checkpoint as ckpt
from util import distributed
from util.amp import AMP_CHOICES, configure_backends, resolve_machine
from util.cls_data import DigitsDemo, build_image_folder, check_classification_folders, finetune_transform
from util.config import (
    add_config_args,
    add_global_batch_arg,
    apply_global_batch,
    config_yaml,
    maybe_print_config,
    parse_with_config,
)
from util.datasets import ResumableDistributedSampler, RobustSeededDataset, ignore_stop_signals
from util.misc import RunClock, append_json_log, log_summary, make_log_writer, seed_everything, setup_logging
from util.preemption import GracefulStop
from util.training import UpdateHook, add_compile_args, maybe_compile, wrap_ddp

logger = logging.getLogger(__name__)

DEMO_PRETRAIN_CHECKPOINT = "./output_demo/pretrain/checkpoint-last.pth"
# --demo: digits (10 classes) from the demo pre-training checkpoint, about a minute on a 2-core CPU (~0.4 s per step,
# 22 steps per epoch), about 80% top-1. 150 steps on 32-px digits cannot absorb the recipe's augmentation (RandAugment
# + random resized crops + erasing leave it near chance), so the demo trains without augmentation and with a larger
# lr. Applied to flags left at their defaults, so `--demo --epochs 3` still works.
DEMO_OVERRIDES: dict[str, Any] = dict(
    finetune=DEMO_PRETRAIN_CHECKPOINT, output_dir="./output_demo/finetune", log_dir="./output_demo/finetune",
    nb_classes=10, epochs=7, batch_size=64, blr=1.6e-2, warmup_epochs=1, no_aug=True, num_workers=0,
    print_freq=10, save_freq=100,
)


def get_args_parser() -> argparse.ArgumentParser:
    """MAE's fine-tuning flags and defaults, plus DeepMIM's layer studies; add_help=False for submitit."""
    parser = argparse.ArgumentParser("DeepMIM fine-tuning for image classification", add_help=False)
    g = parser.add_argument_group("Training")
    g.add_argument("--batch_size", default=64, type=int, help="batch size per process (effective: x accum x ranks)")
    g.add_argument("--epochs", default=50, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--print_freq", default=20, type=int, help="log every N steps")

    g = parser.add_argument_group("Model")
    g.add_argument("--model", default=None, type=str, help=f"one of {', '.join(models_vit.VIT_SIZES)}; default: "
                   "the --finetune checkpoint's encoder, else vit_base_patch16")
    g.add_argument("--input_size", default=None, type=int,
                   help="image size; default: the pre-training size of --finetune, else 224 (pos-embed resampled)")
    for name in models_vit.ARCH_KEYS:
        g.add_argument(f"--{name}", default=None, type=int,
                       help="default: the --finetune checkpoint's value, else the registry's")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate (paper: 0.1)")

    g = parser.add_argument_group("Optimizer")
    g.add_argument("--clip_grad", default=None, type=float, help="clip gradient norm (default: off)")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float,
                   help="base lr: lr = blr * effective batch / 256 (MAE's default 1e-3; paper Appendix A: absolute lr "
                        "2e-4 at batch 1024, i.e. blr 5e-5; 4e-4, i.e. blr 1e-4, for CLIP targets)")
    g.add_argument("--layer_decay", default=0.75, type=float,
                   help="layer-wise lr decay in (0, 1] (paper: 0.65 after 300-epoch, 0.6 after 800-epoch pre-training)")
    g.add_argument("--min_lr", default=1e-6, type=float)
    g.add_argument("--warmup_epochs", default=5, type=int)

    g = parser.add_argument_group("Augmentation")
    g.add_argument("--color_jitter", default=None, type=float, help="colour jitter (only without --aa)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str,
                   help="timm auto-augment policy (RandAugment); 'none' turns it off")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--reprob", default=0.25, type=float, help="random erase probability")
    g.add_argument("--remode", default="pixel", type=str, choices=("const", "rand", "pixel"))
    g.add_argument("--recount", default=1, type=int, help="random erase count")
    g.add_argument("--mixup", default=0.0, type=float, help="mixup alpha (paper: 0.8)")
    g.add_argument("--cutmix", default=0.0, type=float, help="cutmix alpha (paper: 1.0)")
    g.add_argument("--cutmix_minmax", default=None, type=float, nargs=2, help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup_prob", default=1.0, type=float)
    g.add_argument("--mixup_switch_prob", default=0.5, type=float)
    g.add_argument("--mixup_mode", default="batch", type=str, choices=("batch", "pair", "elem"))

    g = parser.add_argument_group("Fine-tuning")
    g.add_argument("--finetune", default="", type=str, help="pre-trained checkpoint (ours, MAE's or DeepMIM's)")
    g.add_argument("--global_pool", action="store_true", help="average patch tokens + fc_norm (default)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token")
    parser.set_defaults(global_pool=True)

    g = parser.add_argument_group("DeepMIM layer studies (paper Figs. 7 and 8)")
    study = g.add_mutually_exclusive_group()
    study.add_argument("--trainable_blocks", default=None, type=int,
                       help="Fig. 7: freeze patch embed, cls/pos and the first depth-K blocks; train the last K + head")
    study.add_argument("--reinit_blocks", default=None, type=int,
                       help="Fig. 8: re-initialise the last K blocks, then fine-tune end to end")

    add_common_args(parser)
    return parser


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Data, output, device, distributed and checkpoint flags shared with main_linprobe.py (MAE's names)."""
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
    g.add_argument("--dist_eval", action="store_true", help="shard evaluation over ranks (exact, padding skipped)")
    g.add_argument("--dist_url", default="env://", help="process-group URL (MAE)")
    distributed.add_legacy_launcher_args(g)
    add_compile_args(g)
    add_global_batch_arg(g)
    add_config_args(parser)


# --------------------------------------------------------------------------------------------------------------
# Argument resolution and validation (all before any data or model is built)
# --------------------------------------------------------------------------------------------------------------


def apply_demo_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser,
                         overrides: Mapping[str, Any]) -> None:
    """--demo: set demo values on every flag the user left at its default."""
    if not args.demo:
        return
    if args.data_path:
        raise ValueError("--data_path cannot be combined with --demo (the demo uses the built-in digits)")
    for name, value in overrides.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if not Path(args.finetune).is_file() and args.finetune == DEMO_PRETRAIN_CHECKPOINT and not args.resume:
        raise ValueError(f"--demo needs the demo pre-training checkpoint {DEMO_PRETRAIN_CHECKPOINT}: "
                         "run `python main_pretrain.py --demo` first (or pass --finetune PATH)")


def check_range(args: argparse.Namespace, name: str, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> None:
    value = getattr(args, name)
    if value is None:
        return
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"--{name} must be in {interval}, got {value}")


def check_common_args(args: argparse.Namespace) -> None:
    """Checks shared with main_linprobe.py: numbers, files and data folders. Machine-independent (it also runs on
    a login node before submission): device and amp are checked by `util.amp.resolve_machine` inside the job."""
    if args.log_dir is None:
        args.log_dir = args.output_dir  # TensorBoard beside the checkpoints, as pre-training does
    for name in ("epochs", "batch_size", "accum_iter", "print_freq", "save_freq", "nb_classes"):
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
    for flag in ("finetune", "resume"):
        path = getattr(args, flag)
        if path and path != "auto" and not Path(path).is_file():
            raise ValueError(f"--{flag} {path}: no such file")
    if args.resume == "auto" and not args.output_dir:
        raise ValueError("--resume auto looks for checkpoints in --output_dir: give one")
    if args.eval and not args.resume:
        raise ValueError("--eval evaluates a checkpoint of this script: give it with --resume")
    if not args.demo:
        check_classification_folders(args.data_path)


def check_finetune_args(args: argparse.Namespace) -> None:
    """Fine-tuning specific ranges and combinations."""
    check_range(args, "layer_decay", 0, 1, low_open=True)
    check_range(args, "drop_path", 0, 1, high_open=True)
    check_range(args, "smoothing", 0, 1, high_open=True)
    check_range(args, "reprob", 0, 1)
    check_range(args, "recount", 1, math.inf)
    check_range(args, "mixup", 0, math.inf)
    check_range(args, "cutmix", 0, math.inf)
    check_range(args, "mixup_prob", 0, 1)
    check_range(args, "mixup_switch_prob", 0, 1)
    check_range(args, "clip_grad", 0, math.inf, low_open=True)
    if mixup_active(args) and args.batch_size % 2:
        raise ValueError(f"--batch_size must be even with --mixup/--cutmix (timm's Mixup pairs samples), "
                         f"got {args.batch_size}")
    for flag in ("trainable_blocks", "reinit_blocks"):
        if getattr(args, flag) is not None and not args.finetune and not args.resume:
            raise ValueError(f"--{flag} studies a pre-trained encoder: give it with --finetune")


def resolve_architecture(args: argparse.Namespace, checkpoint: Mapping[str, Any] | None) -> None:
    """Fill --model / --input_size / --patch_size / --embed_dim / --depth / --num_heads.

    A --resume checkpoint fixes the whole classifier (its "model_cfg"); otherwise values not given on the command
    line come from the --finetune checkpoint's "model_cfg" (this project's checkpoints), then from the registry.
    """
    cfg = checkpoint.get("model_cfg") if checkpoint is not None else None
    if cfg is not None and args.resume:
        for key, flag in (("num_classes", "nb_classes"), ("global_pool", "global_pool")):
            if key in cfg and getattr(args, flag) not in (None, cfg[key]):
                logger.warning("--%s %s replaced by the --resume checkpoint's %s", flag, getattr(args, flag), cfg[key])
            if key in cfg:
                setattr(args, flag, cfg[key])
    if cfg is not None:
        encoder = models_vit.encoder_config(cfg)
        fixed = bool(args.resume)  # a run in progress keeps its architecture
        for key in ("model", "input_size", *models_vit.ARCH_KEYS):
            source = {"model": "name", "input_size": "img_size"}.get(key, key)
            if getattr(args, key) is None or fixed:
                setattr(args, key, encoder[source])
    args.model = args.model or "vit_base_patch16"
    if args.model not in models_vit.VIT_SIZES:
        raise ValueError(f"--model {args.model!r} is unknown; known: {', '.join(models_vit.VIT_SIZES)}")
    args.input_size = args.input_size or 224
    sizes = dict(zip(models_vit.ARCH_KEYS, models_vit.VIT_SIZES[args.model]))
    for key in models_vit.ARCH_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
        check_range(args, key, 1, math.inf)
    if args.input_size % args.patch_size:
        raise ValueError(f"--input_size {args.input_size} must be a multiple of --patch_size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        raise ValueError(f"--embed_dim {args.embed_dim} must be a multiple of --num_heads {args.num_heads}")
    for flag in ("trainable_blocks", "reinit_blocks"):
        if getattr(args, flag, None) is not None:
            models_vit.check_last_blocks(getattr(args, flag), args.depth, f"--{flag}")


def load_source_checkpoint(args: argparse.Namespace) -> dict[str, Any] | None:
    """The checkpoint that defines the model: --resume if given, else --finetune, else None (from scratch).

    `--resume auto` becomes the path of the newest loadable checkpoint in --output_dir, or "" (a fresh run from
    --finetune) when there is none yet.
    """
    if args.resume:
        path, state = ckpt.load_resume_state(args)
        if state is not None:
            args.resume = str(path)
            return state
        args.resume = ""  # 'auto' found nothing to resume: a fresh run
    return ckpt.load_checkpoint(args.finetune) if args.finetune else None


def resolve_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """Validate and complete the flags; returns the loaded source checkpoint. Raises ValueError naming the flag."""
    apply_demo_overrides(args, get_args_parser(), DEMO_OVERRIDES)
    check_common_args(args)
    check_finetune_args(args)
    checkpoint = load_source_checkpoint(args)
    resolve_architecture(args, checkpoint)
    return checkpoint


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """MAE: absolute lr = base lr * effective batch / 256, effective batch = batch_size * accum_iter * ranks."""
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
    return args.lr


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def build_datasets(
    args: argparse.Namespace, train_transform: Callable, val_transform: Callable
) -> tuple[RobustSeededDataset, Dataset]:
    """ImageFolder train/val under --data_path, or the digits demo; checks the classes against --nb_classes.

    The training set draws each sample's augmentation from (--seed, epoch, index), so a resumed run (any worker
    count) sees the same images, and replaces unreadable images (counted, see --max_bad_images)."""
    if args.demo:
        train = DigitsDemo("train", args.input_size, train_transform)
        val = DigitsDemo("val", args.input_size, val_transform)
    else:
        train = build_image_folder(args.data_path, "train", train_transform)
        val = build_image_folder(args.data_path, "val", val_transform)
        if train.classes != val.classes:
            raise ValueError(f"--data_path {args.data_path}: train/ and val/ have different class folders")
    check_num_classes(args, len(train.classes))
    if not args.eval and len(train) < args.batch_size * distributed.get_world_size():
        raise ValueError(f"--batch_size {args.batch_size} x {distributed.get_world_size()} ranks exceeds the "
                         f"{len(train)} training images (the last incomplete batch is dropped)")
    return RobustSeededDataset(train, args.seed), val


def check_num_classes(args: argparse.Namespace, found: int) -> None:
    """--nb_classes from the training folders when not given; a given value that is smaller than the folders' count
    stops the run, a larger one (a subset of a bigger label set) is allowed with a warning."""
    if args.nb_classes is None:
        args.nb_classes = found
        logger.info("--nb_classes %d: the class folders of the training set", found)
    elif found > args.nb_classes:
        raise ValueError(f"--nb_classes {args.nb_classes} is smaller than the {found} classes found in the training "
                         "set; leave --nb_classes out to take it from the folders")
    elif found < args.nb_classes:
        logger.warning("--nb_classes %d but the training set has %d class folders: %d logits never see a positive "
                       "example (leave --nb_classes out to take it from the folders)", args.nb_classes, found,
                       args.nb_classes - found)


def build_loaders(args: argparse.Namespace, train: Dataset, val: Dataset) -> tuple[DataLoader, DataLoader, int | None]:
    """Loaders (train: shuffled per (--seed, epoch), can start mid-epoch, incomplete batch dropped; val: in order)
    and this rank's real val count. Also fills --max_bad_images (default 1 % of this rank's epoch)."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    train_sampler = ResumableDistributedSampler(train, args.batch_size, num_replicas=world, rank=rank, shuffle=True,
                                                seed=args.seed, drop_last=True)
    if args.max_bad_images is None:
        args.max_bad_images = max(1, len(train_sampler) // 100)
    num_real = None
    if args.dist_eval and world > 1:
        val_sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False)
        num_real = real_samples_on_rank(val_sampler)
    else:
        val_sampler = SequentialSampler(val)
    # Workers ignore stop signals (the main process saves, then shuts them down). Training workers persist across
    # epochs: the epoch travels with the sampler's indices. Own generators leave the global RNG to the model.
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith("cuda"),
                  worker_init_fn=ignore_stop_signals)
    train_loader = DataLoader(train, sampler=train_sampler, batch_size=args.batch_size, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed),
                              persistent_workers=args.num_workers > 0, **common)
    val_loader = DataLoader(val, sampler=val_sampler, batch_size=args.batch_size, drop_last=False,
                            generator=torch.Generator().manual_seed(args.seed), **common)
    return train_loader, val_loader, num_real


# --------------------------------------------------------------------------------------------------------------
# Model, optimizer, loss
# --------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, checkpoint: Mapping[str, Any] | None) -> nn.Module:
    """The classifier; pre-trained encoder from --finetune (not when resuming); layer-study edits."""
    model = models_vit.create_classifier(
        args.model, img_size=args.input_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads, num_classes=args.nb_classes, drop_path_rate=args.drop_path,
        global_pool=args.global_pool,
    )
    if checkpoint is not None and not args.resume:
        report = models_vit.load_encoder_weights(model, checkpoint)
        logger.info("loaded %s: missing %s, unexpected %s", args.finetune, report.missing, report.unexpected)
        if args.reinit_blocks:
            models_vit.reinit_last_blocks(model, args.reinit_blocks)
            logger.info("re-initialised the last %d blocks (Fig. 8)", args.reinit_blocks)
    if args.trainable_blocks:
        names = models_vit.set_trainable_blocks(model, args.trainable_blocks)
        logger.info("training the last %d blocks + head (Fig. 7): %d tensors", args.trainable_blocks, len(names))
    return model


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW over timm's layer-decay groups: block i gets lr scale decay^(depth+1-i), the head 1. No weight decay
    on biases, norms, cls token or position embedding (the model's no_weight_decay() names)."""
    groups = param_groups_layer_decay(
        model, weight_decay=args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
        layer_decay=args.layer_decay,
    )
    # Fused, as pre-training: with an fp16 GradScaler the non-fused step reads the scale on the host every update.
    return torch.optim.AdamW(groups, lr=args.lr, fused=True)


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args: argparse.Namespace) -> Mixup | None:
    if not mixup_active(args):
        return None
    return Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
        num_classes=args.nb_classes,
    )


def build_criterion(args: argparse.Namespace) -> nn.Module:
    """Soft-target CE with Mixup/CutMix (smoothing folded into the targets), else label-smoothing CE, else CE."""
    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and the epoch loop (shared with main_linprobe.py)
# --------------------------------------------------------------------------------------------------------------


class Run:
    """One fine-tuning or linear-probing run (shared with main_linprobe.py): resume, epoch loop with evaluation,
    checkpoints, mid-epoch saves and graceful stops.

    Checkpoints (util.checkpoint's training state plus "best_acc"): checkpoint-last.pth (every epoch end and every
    --save_every_iters updates), checkpoint-<epoch>.pth every --save_freq epochs, checkpoint-best.pth (best val top-1,
    at epoch ends). Evaluation runs at epoch ends only.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        loaders: tuple[DataLoader, DataLoader, int | None],
        mixup_fn: Mixup | None = None,
    ):
        self.args, self.bare, self.criterion, self.optimizer = args, model, criterion, optimizer
        self.mixup_fn = mixup_fn
        self.train_loader, self.val_loader, self.num_real_val = loaders
        self.device = torch.device(args.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.best_acc, self.start_step = 0.0, 0

    def resume(self, state: Mapping[str, Any]) -> None:
        """Load --resume: the weights only under --eval; else everything, after util.checkpoint's checks that the
        checkpoint belongs to this experiment (flags, and the layout of a mid-epoch checkpoint)."""
        args = self.args
        try:
            ckpt.check_model_fits(self.bare, state, args.resume)
        except ValueError as err:
            raise ValueError(f"--resume {args.resume} is not a checkpoint of this script (pre-trained encoders go to "
                             f"--finetune): {err}") from err
        if args.eval:
            self.bare.load_state_dict(state["model"])
            return
        self.start_step = ckpt.restore_training_state(state, self.bare, self.optimizer, self.scaler, args,
                                                      path=args.resume)
        self.best_acc = float(state.get("best_acc", 0.0))

    def evaluate(self) -> dict[str, float]:
        sharded = self.num_real_val is not None
        return evaluate(self.val_loader, self.bare, self.device, self.args.amp, self.num_real_val, sharded)

    def save(self, epoch: int, step: int, is_best: bool = False) -> None:
        """Checkpoint after `step` steps of `epoch` (0: the epoch is done). A collective (every rank's RNG);
        rank 0 writes."""
        args = self.args
        if not args.output_dir:
            return
        state = ckpt.training_state(self.bare, self.optimizer, self.scaler, epoch, step, args,
                                    best_acc=self.best_acc)
        ckpt.save_training_checkpoint(state, args.output_dir, args.save_freq, args.epochs)
        if is_best and distributed.is_main_process():
            ckpt.save_atomic(state, Path(args.output_dir) / "checkpoint-best.pth")

    def fit(self) -> dict[str, float]:
        """Train from (args.start_epoch, self.start_step) to args.epochs, evaluating and checkpointing after each
        epoch; a stop signal saves and exits (status 0). Returns the last val stats and the best top-1."""
        args = self.args
        logger.info("start training for %d epochs (lr %.3e, %d trainable parameters)", args.epochs, args.lr,
                    self.num_trainable())
        log_writer = make_log_writer(args.log_dir)
        stopper = GracefulStop().install()
        clock = RunClock(args.start_epoch, args.epochs)
        try:
            train_model = wrap_ddp(maybe_compile(self.bare, args.compile, args.compile_backend), self.device)
            test_stats = self.train_epochs(train_model, stopper, log_writer, clock)
        finally:
            stopper.uninstall()
            if log_writer is not None:
                log_writer.close()
        if not test_stats:  # resumed a finished run: nothing trained, report the checkpoint
            test_stats = self.evaluate()
        log_summary("training finished", {
            "checkpoints": f"{args.output_dir} (checkpoint-last.pth, checkpoint-best.pth, checkpoint-<epoch>.pth "
                           f"every {args.save_freq})",
            "log": str(Path(args.output_dir) / "log.txt"), "TensorBoard": args.log_dir or "off",
            "top-1": f"last {test_stats['acc1']:.2f}%, best {self.best_acc:.2f}%", "wall time": clock.elapsed(),
        })
        return {**test_stats, "best_acc1": self.best_acc}

    def train_epochs(self, model: nn.Module, stopper: GracefulStop, log_writer: Any,
                     clock: RunClock) -> dict[str, float]:
        """The epoch loop of `fit` (`model`: the DDP-wrapped model); returns the last epoch's val stats."""
        args, test_stats, start_step = self.args, {}, self.start_step
        on_update = UpdateHook(self.save, stopper, args.accum_iter, args.save_every_iters, args.print_freq)
        for epoch in range(args.start_epoch, args.epochs):
            clock.log_epoch_start(epoch)
            self.train_loader.dataset.set_epoch(epoch)
            self.train_loader.sampler.set_epoch(epoch)
            self.train_loader.sampler.set_start_step(start_step)
            train_stats = train_one_epoch(model, self.criterion, self.train_loader, self.optimizer, self.scaler,
                                          self.device, epoch, args, self.mixup_fn, log_writer, start_step, on_update)
            start_step = 0
            test_stats = self.evaluate()
            is_best = test_stats["acc1"] > self.best_acc
            self.best_acc = max(self.best_acc, test_stats["acc1"])
            self.save(epoch, 0, is_best)
            logger.info("Accuracy of the network on the %d test images: %.1f%% (max %.2f%%)", test_stats["n"],
                        test_stats["acc1"], self.best_acc)
            log_epoch(args, log_writer, epoch, train_stats, test_stats, self.num_trainable())
            if stopper.stop_requested():  # a collective: every rank stops after the same epoch
                stopper.finish()
        return test_stats

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.bare.parameters() if p.requires_grad)


def log_epoch(args: argparse.Namespace, log_writer: Any, epoch: int, train_stats: Mapping[str, float],
              test_stats: Mapping[str, float], n_parameters: int) -> None:
    """One JSON line in log.txt and the test scalars in TensorBoard (rank 0)."""
    if log_writer is not None:
        for key in ("acc1", "acc5", "loss"):
            log_writer.add_scalar(f"perf/test_{key}", test_stats[key], epoch)
        log_writer.flush()
    append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                      **{f"test_{k}": v for k, v in test_stats.items()},
                                      "epoch": epoch, "n_parameters": n_parameters})


def execute(run: Run, checkpoint: Mapping[str, Any] | None, what: str) -> dict[str, float]:
    """Resume if asked, then train (or --eval); prints the result, ends the process group, returns the stats."""
    args = run.args
    try:
        if args.resume:
            run.resume(checkpoint)
        if args.eval:
            stats = run.evaluate()
            report(stats, f"{what} evaluation of {args.resume}")
            write_eval_record(args, stats)
        else:
            stats = run.fit()
            report(stats, what)
    finally:
        distributed.cleanup()
    return stats


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


def setup_run(args: argparse.Namespace) -> torch.device:
    """Device and precision of this machine, process group, logging, lr, seed, output folder and run_info.json."""
    resolve_machine(args)  # on the machine that trains (in a SLURM job: the compute node)
    distributed.apply_legacy_launcher_args(args)
    info = distributed.init_distributed(args.device, args.dist_url)
    if info.distributed and args.device.startswith("cuda"):
        args.device = f"cuda:{info.local_rank}"
    setup_logging(None if args.eval else args.output_dir)  # --eval never writes into a training run's folder
    apply_global_batch(args, info.world_size)  # a config's global batch: --accum_iter for this world size
    resolve_lr(args, info.world_size)
    seed_everything(args.seed + info.rank)
    configure_backends(args.device)  # attention kernels, TF32, cuDNN: chosen per device in one place
    if args.output_dir and not args.eval:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        ckpt.write_run_info(args)
    logger.info("resolved arguments (a file --config accepts):\n%s", config_yaml(args))
    return torch.device(args.device)


def report(stats: Mapping[str, float], what: str) -> None:
    """The script's final result on stdout (rank 0)."""
    if distributed.is_main_process():
        print(f"{what}: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  on {stats['n']} val images"
              + (f"  (best top-1 {stats['best_acc1']:.2f}%)" if "best_acc1" in stats else ""), flush=True)


def main(args: argparse.Namespace) -> dict[str, float]:
    """Validate the flags, then fine-tune (or --eval); returns the last val stats. Raises ValueError for bad flags."""
    return train(args, resolve_args(args))


def train(args: argparse.Namespace, checkpoint: Mapping[str, Any] | None) -> dict[str, float]:
    """Fine-tune (or --eval) with flags completed by `resolve_args` and its source checkpoint."""
    device = setup_run(args)
    train_transform = finetune_transform(not args.no_aug, args.input_size, args.aa, args.color_jitter, args.reprob,
                                         args.remode, args.recount)
    train_set, val_set = build_datasets(args, train_transform, finetune_transform(False, args.input_size))
    loaders = build_loaders(args, train_set, val_set)
    model = build_model(args, checkpoint).to(device)
    run = Run(args, model, build_criterion(args), build_optimizer(model, args), loaders, build_mixup(args))
    return execute(run, checkpoint, "Fine-tuning")


def parse_and_resolve(
    parser: argparse.ArgumentParser, resolve: Callable[[argparse.Namespace], Any], argv: list[str] | None = None
) -> tuple[argparse.Namespace, Any]:
    """Parse the command line and resolve it; a ValueError exits with status 2 and its message (naming the flag)."""
    args = parse_with_config(parser, argv)
    try:
        checkpoint = resolve(args)
        maybe_print_config(args, lambda _: None, parser)  # resolve() has validated
    except ValueError as err:
        parser.error(str(err))
    return args, checkpoint


if __name__ == "__main__":
    train(*parse_and_resolve(argparse.ArgumentParser("DeepMIM fine-tuning", parents=[get_args_parser()]), resolve_args))
