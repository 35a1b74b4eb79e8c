"""Linear probing of a frozen pre-trained encoder (MAE's recipe) and of any of its blocks (`--probe_block K`).

Frozen encoder; head = BatchNorm1d(affine=False) + Linear; LARS (timm's, configured as MAE's), blr 0.1, no weight
decay, 90 epochs with 10 of warm-up, RandomResizedCrop + flip only; features: the normalised cls token (default)
or the average of the patch tokens (`--global_pool`). `--probe_block K` probes the raw output of block K,
average-pooled over the patch tokens (the encoder stops at block K): the direct test of the paper's claim that
DeepMIM's shallower blocks are more discriminative (Sec. 4, Figs. 5-7).

    torchrun --nproc_per_node 8 main_linprobe.py --finetune output_dir/checkpoint-last.pth --data_path /imagenet \
        --batch_size 2048 --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval      # 16384 images per step, MAE
    python main_linprobe.py --finetune ... --data_path ... --probe_block 6           # block 6 of 12

Demo on CPU (after `python main_pretrain.py --demo`): `python main_linprobe.py --demo`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

import torch
from timm.optim import Lars
from torch import nn

import models_vit
from engine_finetune import Run, execute
from util import cls_run
from util.cli import script_parser, user_errors
from util.cls_data import build_datasets, build_loaders, linprobe_transform
from util.config import flag_defaults

logger = logging.getLogger(__name__)

LARS_MOMENTUM = 0.9  # MAE's LARS defaults
LARS_TRUST_COEFF = 0.001

# --demo: digits from the demo pre-training checkpoint (220 steps), about 89% top-1. LARS moves each weight matrix by
# lr * 0.001 of its norm per step (momentum 0.9 multiplies that by up to 10), so the head, initialised at std 0.01,
# grows geometrically: MAE's recipe takes ~7000 steps at lr 6.4, the demo needs a larger base lr. blr 30 (lr 15) is
# the largest measured that never overshoots: top-1 stays near chance for ~3 epochs while the head grows, then rises;
# at blr 100 the loss spiked from 2.3 to ~60 and top-1 sat at chance for 4 epochs before recovering, at 40-50 to ~10
# (README). Without augmentation, as the fine-tuning demo (see main_finetune.py's DEMO_OVERRIDES).
DEMO_OVERRIDES: dict[str, Any] = dict(
    finetune=cls_run.DEMO_PRETRAIN_CHECKPOINT, output_dir="./output_demo/linprobe",
    nb_classes=10, epochs=20, batch_size=128, blr=30.0, warmup_epochs=1, no_aug=True, num_workers=0,
    print_freq=10, save_freq=100,
)


def get_args_parser() -> argparse.ArgumentParser:
    """MAE's linear-probing flags and defaults, plus `--probe_block`; add_help=False for submitit."""
    parser = argparse.ArgumentParser("DeepMIM linear probing", add_help=False)
    cls_run.add_training_args(parser, batch_size=512, epochs=90,
                              batch_help="batch size per process (MAE: 16384 in total)")

    models_vit.add_arch_args(parser)

    g = parser.add_argument_group("Optimizer (LARS)")
    g.add_argument("--weight_decay", default=0.0, type=float, help="weight decay of the head's weight (MAE: 0)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=0.1, type=float, help="base lr")
    g.add_argument("--min_lr", default=0.0, type=float)
    g.add_argument("--warmup_epochs", default=10, type=int)

    g = parser.add_argument_group("Probe")
    g.add_argument("--finetune", default="", type=str,
                   help="pre-trained encoder: a checkpoint (ours, MAE's or DeepMIM's), or an export of "
                        "tools/export_encoder.py (.safetensors or Hub folder); architecture and input size come from "
                        "its model_cfg")
    g.add_argument("--global_pool", action="store_true", help="average patch tokens + fc_norm")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="normalised cls token (default)")
    parser.set_defaults(global_pool=False)
    g.add_argument("--probe_block", default=None, type=int,
                   help="probe block K's raw output, average-pooled over patch tokens (1..depth; the encoder "
                        "stops at block K; overrides the pooling flags)")

    cls_run.add_common_args(parser)
    return parser


def resolve_args(args: argparse.Namespace, read_files: bool = True) -> dict[str, Any] | None:
    """Validate and complete the flags; returns the loaded source checkpoint. Raises ValueError naming the flag.

    With `read_files` False (--print_config) no file is checked, required or read, and the architecture of the
    --finetune / --resume checkpoint is left unresolved (None: "the checkpoint's")."""
    cls_run.apply_demo_overrides(args, get_args_parser(), DEMO_OVERRIDES, read_files)
    cls_run.check_common_args(args, read_files)
    if not read_files:
        return None
    if not args.finetune and not args.resume:
        raise ValueError("--finetune is required: linear probing needs a pre-trained encoder")
    # `--resume auto` with nothing to resume: from --finetune
    checkpoint = cls_run.load_source_checkpoint(args, models_vit.load_encoder_source)
    if checkpoint is None:
        raise ValueError(f"--finetune is required: --resume {args.resume or 'auto'} found no checkpoint in "
                         f"--output_dir {args.output_dir}, and linear probing needs a pre-trained encoder")
    cfg = checkpoint.get("model_cfg")
    if args.resume and cfg is not None and "probe_block" in cfg:
        args.probe_block = cfg["probe_block"]  # a run in progress keeps its probed block
    models_vit.resolve_architecture(args, checkpoint)
    if args.probe_block is not None:
        models_vit.check_last_blocks(args.probe_block, args.depth, "--probe_block")
    return checkpoint


# --------------------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's LARS set up as MAE's: trust ratio (coefficient 0.001) and weight decay only for tensors with more
    than one dimension; biases get plain SGD with momentum 0.9.

    (With weight decay, timm's trust ratio divides by |g| + wd |w| where MAE's divides by |g + wd w|; with MAE's
    default weight decay 0 the two are identical.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in params if p.ndim > 1], weight_decay=args.weight_decay, always_adapt=True),
        dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, always_adapt=False),
    ]
    return Lars([g for g in groups if g["params"]], lr=args.lr, momentum=LARS_MOMENTUM,
                trust_coeff=LARS_TRUST_COEFF)


def train(args: argparse.Namespace, checkpoint: Mapping[str, Any] | None) -> dict[str, float]:
    """Linear probing (or --eval) with flags completed by `resolve_args` and its source checkpoint."""
    device = cls_run.setup_run(args)
    train_set, val_set = build_datasets(args, linprobe_transform(not args.no_aug, args.input_size),
                                           linprobe_transform(False, args.input_size))
    loaders = build_loaders(args, train_set, val_set)
    config = dict(name=args.model, img_size=args.input_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                  depth=args.depth, num_heads=args.num_heads, num_classes=args.nb_classes, drop_path_rate=0.0,
                  global_pool=args.global_pool, probe_block=args.probe_block)
    model = models_vit.build_probe(config, None if args.resume else checkpoint).to(device)
    run = Run(args, model, nn.CrossEntropyLoss(), build_optimizer(model, args), loaders,
              flag_defaults=flag_defaults(get_args_parser()))
    what = f"block {args.probe_block}" if args.probe_block else ("global pool" if args.global_pool else "cls token")
    return execute(run, checkpoint, f"Linear probe ({what})")


def main(args: argparse.Namespace) -> dict[str, float]:
    """Validate the flags, then probe (or --eval); returns the last val stats. Raises ValueError for bad flags."""
    return train(args, resolve_args(args))


if __name__ == "__main__":
    with user_errors():
        train(*cls_run.parse_and_resolve(script_parser(__doc__, [get_args_parser()]), resolve_args))
