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
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

import models_vit
from engine_finetune import Run, execute
from util import cls_run
from util.cli import script_parser, user_errors
from util.cls_data import build_datasets, build_loaders, finetune_transform
from util.config import check_range, flag_defaults
from util.layer_decay import param_groups_layer_decay

logger = logging.getLogger(__name__)

# --demo: digits (10 classes) from the demo pre-training checkpoint, a few minutes on a 2-core CPU (22 steps per
# epoch), 93.9% top-1 measured. 150 steps on 32-px digits cannot absorb the recipe's augmentation (RandAugment
# + random resized crops + erasing leave it near chance), so the demo trains without augmentation and with a larger
# lr. Applied to flags left at their defaults, so `--demo --epochs 3` still works.
DEMO_OVERRIDES: dict[str, Any] = dict(
    finetune=cls_run.DEMO_PRETRAIN_CHECKPOINT, output_dir="./output_demo/finetune",
    nb_classes=10, epochs=7, batch_size=64, blr=1.6e-2, warmup_epochs=1, no_aug=True, num_workers=0,
    print_freq=10, save_freq=100,
)


def get_args_parser() -> argparse.ArgumentParser:
    """MAE's fine-tuning flags and defaults, plus DeepMIM's layer studies; add_help=False for submitit."""
    parser = argparse.ArgumentParser("DeepMIM fine-tuning for image classification", add_help=False)
    cls_run.add_training_args(parser, batch_size=64, epochs=50,
                              batch_help="batch size per process (effective: x accum x ranks)")

    g = models_vit.add_arch_args(parser, input_size_help="(pos-embed resampled)")
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
    g.add_argument("--finetune", default="", type=str,
                   help="pre-trained encoder: a checkpoint (ours, MAE's or DeepMIM's), or an export of "
                        "tools/export_encoder.py (.safetensors or Hub folder); architecture and input size come from "
                        "its model_cfg (none: random initialisation, a from-scratch baseline)")
    g.add_argument("--global_pool", action="store_true", help="average patch tokens + fc_norm (default)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token")
    parser.set_defaults(global_pool=True)

    g = parser.add_argument_group("DeepMIM layer studies (paper Figs. 7 and 8)")
    study = g.add_mutually_exclusive_group()
    study.add_argument("--trainable_blocks", default=None, type=int,
                       help="Fig. 7: freeze patch embed, cls/pos and the first depth-K blocks; train the last K + head")
    study.add_argument("--reinit_blocks", default=None, type=int,
                       help="Fig. 8: re-initialise the last K blocks, then fine-tune end to end")

    cls_run.add_common_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------------------
# Argument resolution and validation (all before any data or model is built)
# --------------------------------------------------------------------------------------------------------------


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


def resolve_args(args: argparse.Namespace, read_files: bool = True) -> dict[str, Any] | None:
    """Validate and complete the flags; returns the loaded source checkpoint. Raises ValueError naming the flag.

    With `read_files` False (--print_config) no file is checked or read; the architecture of a --finetune /
    --resume checkpoint is then left unresolved (None: "the checkpoint's")."""
    cls_run.apply_demo_overrides(args, get_args_parser(), DEMO_OVERRIDES, read_files)
    cls_run.check_common_args(args, read_files)
    check_finetune_args(args)
    if not read_files:
        if not (args.finetune or args.resume):
            models_vit.resolve_architecture(args, None)
        return None
    checkpoint = cls_run.load_source_checkpoint(args, models_vit.load_encoder_source)
    models_vit.resolve_architecture(args, checkpoint)
    return checkpoint


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
    if checkpoint is None and not args.resume:
        logger.warning("no --finetune: the encoder starts from random initialisation (a from-scratch baseline); "
                       "pass --finetune CHECKPOINT to fine-tune a pre-trained encoder")
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
    """AdamW over the layer-decay groups (`util.layer_decay`, the groups timm's `param_groups_layer_decay` gives):
    block i gets lr scale decay^(depth+1-i), the head 1. No weight decay on biases, norms, cls token or position
    embedding (the model's no_weight_decay() names)."""
    groups = param_groups_layer_decay(
        model, weight_decay=args.weight_decay, layer_decay=args.layer_decay, depth=len(model.blocks),
        no_weight_decay=model.no_weight_decay(), final_norm_in_last_block=True,
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


def main(args: argparse.Namespace) -> dict[str, float]:
    """Validate the flags, then fine-tune (or --eval); returns the last val stats. Raises ValueError for bad flags."""
    return train(args, resolve_args(args))


def train(args: argparse.Namespace, checkpoint: Mapping[str, Any] | None) -> dict[str, float]:
    """Fine-tune (or --eval) with flags completed by `resolve_args` and its source checkpoint."""
    device = cls_run.setup_run(args)
    train_transform = finetune_transform(not args.no_aug, args.input_size, args.aa, args.color_jitter, args.reprob,
                                         args.remode, args.recount)
    train_set, val_set = build_datasets(args, train_transform, finetune_transform(False, args.input_size))
    loaders = build_loaders(args, train_set, val_set)
    model = build_model(args, checkpoint).to(device)
    run = Run(args, model, build_criterion(args), build_optimizer(model, args), loaders, build_mixup(args),
              flag_defaults=flag_defaults(get_args_parser()))
    return execute(run, checkpoint, "Fine-tuning")


if __name__ == "__main__":
    with user_errors():
        train(*cls_run.parse_and_resolve(script_parser(__doc__, [get_args_parser()]), resolve_args))
