"""Object detection and instance segmentation on COCO with Mask R-CNN on a pre-trained ViT (paper Tab. 3, Appendix
A: AdamW, weight decay 0.1, lr 1e-4, layer decay 0.75, batch 16, 1024x1024, single-scale testing), in the setup of the
ViT detection benchmark MAE follows (Li et al. 2021): windowed attention with four global blocks, relative position
biases, the multi-block pyramid, large-scale jitter, torchvision's v2 heads.

    torchrun --nproc_per_node 8 main_detection.py --batch_size 2 \
        --config configs/detection/mask_rcnn_deepmim_clip_vit_base_100ep.yaml \
        --finetune out/deepmim_clip/checkpoint-1599.pth --data_path /datasets/coco --output_dir out/det
    python main_detection.py --eval --resume out/det/checkpoint-737500.pth --data_path /datasets/coco \
        --output_dir out/det_eval           # results_bbox.json, results_segm.json, eval_<time>.json
    python main_detection.py --demo         # a few minutes on CPU, scikit-image's coins (detection/demo.py)

--finetune takes this project's pre-training (or fine-tuning) checkpoints, `.safetensors` exports, Meta's
`mae_pretrain_vit_base.pth` and the released DeepMIM files. Runs are iteration-based (`util.iteration`), with the
benchmark's warm-up + step schedule (`util.lr_sched.step_lr_at`), evaluation and checkpoint every --eval_interval;
--save_every_iters, stop signals, --resume auto and exact mid-interval resume as the other scripts. Device and
precision are decided on the machine that trains.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch

import models_vit
from detection import demo
from detection.backbone import PYRAMIDS, WINDOW_SIZE, create_detection_backbone, global_block_indices
from detection.data import CocoDetection, CocoIndex, check_layout, split_paths
from detection.model import build_maskrcnn, load_pretrained, param_groups
from detection.transforms import LSJ_SCALE, lsj_transform
from engine_detection import Evaluation, build_loaders, execute, make_step_loss
from models_backbone import to_sync_batchnorm
from util import cls_run, iteration
from util.cli import script_parser, user_errors
from util.config import add_config_args, add_global_batch_arg, check_range, flag_defaults
from util.lr_sched import step_lr_at
from util.training import StepLoss

logger = logging.getLogger(__name__)

DEMO_DATA = "./output_demo/detection_data"
# --demo: a tiny Mask R-CNN (ViT patch 16, width 64, 4 blocks, 32-channel FPN and heads) from scratch on the coins
# set at 192 px; filled into flags left at their defaults only, so `--demo --data_path DIR` trains it on any folder
# in the COCO 2017 layout.
DEMO_OVERRIDES: dict[str, Any] = dict(
    output_dir="./output_demo/detection", model="vit_small_patch16", input_size=192, patch_size=16, embed_dim=64,
    depth=4, num_heads=4, global_blocks=[1, 3], drop_path=0.0, fpn_channels=32, box_fc_dim=256,
    rpn_batch_size_per_image=64, box_batch_size_per_image=32, detections_per_img=50, lsj_scale=[0.5, 1.5],
    batch_size=2, iters=500, eval_interval=250, warmup_iters=20, lr_drops=[400, 475], lr=1e-3, layer_decay=1.0,
    num_workers=0, print_freq=20,
)
# The benchmark's schedule (100 epochs of COCO train2017 at batch 64: 184,375 updates, x0.1 after 88.9 % and 96.3 %,
# 250 warm-up updates) at Appendix A's batch 16: the same epochs, 4x the updates.
ITERS, LR_DROPS, WARMUP_ITERS = 737500, [655556, 710184], 1000


def get_args_parser() -> argparse.ArgumentParser:
    """Flags and defaults of Appendix A and the benchmark; add_help=False for submitit."""
    parser = argparse.ArgumentParser("DeepMIM detection", add_help=False)
    g = parser.add_argument_group("Training")
    g.add_argument("--batch_size", default=2, type=int, help="images per process per step (16 = 2 x 8 GPUs)")
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    iteration.add_iteration_args(g, iters=ITERS, interval=ITERS // 10)
    g.add_argument("--print_freq", default=20, type=int, help="log every N steps")
    add_global_batch_arg(g)

    g = models_vit.add_arch_args(parser, input_size_help="(here: the square input, Appendix A: 1024)")
    parser.set_defaults(input_size=1024)
    g.add_argument("--finetune", default="", type=str, help="pre-trained encoder (every layout the project loads)")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate (the benchmark, ViT-B: 0.1)")
    g.add_argument("--window_size", default=WINDOW_SIZE, type=int, help="attention window in patches (14)")
    g.add_argument("--global_blocks", default=None, type=int, nargs="+",
                   help="0-based blocks with global attention (default: four evenly spaced, [2, 5, 8, 11] for ViT-B)")
    g.add_argument("--pyramid", default="multiblock", choices=PYRAMIDS,
                   help="multiblock: strides 4-32 from blocks 3, 6, 9, 12 (MAE A.3); simple: all from the last block "
                        "(ViTDet)")
    g.add_argument("--fpn_channels", default=256, type=int, help="FPN and head channels (torchvision: 256)")
    g.add_argument("--box_fc_dim", default=1024, type=int, help="the box head's fc width (4conv-1fc: 1024)")
    g.add_argument("--rpn_batch_size_per_image", default=256, type=int, help="anchors sampled per image for the RPN")
    g.add_argument("--box_batch_size_per_image", default=512, type=int, help="RoIs sampled per image for the heads")
    g.add_argument("--detections_per_img", default=100, type=int, help="detections kept per image (COCO: 100)")

    g = parser.add_argument_group("Optimizer (AdamW (0.9, 0.999), warm-up + step decay)")
    g.add_argument("--lr", default=1e-4, type=float, help="absolute lr for the global batch (Appendix A: 1e-4 at 16)")
    g.add_argument("--weight_decay", default=0.1, type=float, help="Appendix A: 0.1")
    g.add_argument("--layer_decay", default=0.75, type=float, help="Appendix A: 0.75")
    g.add_argument("--warmup_iters", default=WARMUP_ITERS, type=int, help="linear warm-up updates")
    g.add_argument("--warmup_factor", default=0.001, type=float, help="warm-up starts at lr x factor (0.001)")
    g.add_argument("--lr_drops", default=LR_DROPS, type=int, nargs="*", help="updates after which lr x --lr_gamma")
    g.add_argument("--lr_gamma", default=0.1, type=float, help="step decay factor (0.1)")

    g = parser.add_argument_group("Data (COCO 2017 layout)")
    g.add_argument("--data_path", default=None, type=str,
                   help="folder with train2017/, val2017/ and annotations/instances_{train,val}2017.json")
    g.add_argument("--num_classes", default=None, type=int,
                   help="object classes (default: the categories of the training annotation file; must agree)")
    g.add_argument("--lsj_scale", default=list(LSJ_SCALE), type=float, nargs=2,
                   help="large-scale jitter range, times --input_size (the benchmark: 0.1 2.0)")
    g.add_argument("--demo", action="store_true", help="tiny Mask R-CNN on scikit-image's coins (CPU, a few minutes)")

    g = iteration.add_run_args(parser)
    g.add_argument("--grad_ckpt", action="store_true",
                   help="activation checkpointing of the ViT blocks (memory for compute; results unchanged)")
    add_config_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------------------
# Flags: demo, checks, the checkpoint that defines the model (all before anything is built)
# --------------------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace, read_files: bool = True) -> None:
    """Ranges and combinations; files. Machine-independent (runs on a login node too)."""
    for name in ("batch_size", "accum_iter", "print_freq", "input_size", "window_size", "fpn_channels", "box_fc_dim",
                 "rpn_batch_size_per_image", "box_batch_size_per_image", "detections_per_img", "num_classes"):
        check_range(args, name, 1, math.inf)
    for name in ("num_workers", "max_bad_images", "weight_decay", "warmup_iters"):
        check_range(args, name, 0, math.inf)
    check_range(args, "lr", 0, math.inf, low_open=True)
    check_range(args, "layer_decay", 0, 1, low_open=True)
    check_range(args, "drop_path", 0, 1, high_open=True)
    check_range(args, "warmup_factor", 0, 1)
    check_range(args, "lr_gamma", 0, 1, low_open=True)
    iteration.check_iteration_args(args)
    if not 0 < args.lsj_scale[0] <= args.lsj_scale[1]:
        raise ValueError(f"--lsj_scale must be 0 < low <= high, got {args.lsj_scale}")
    if sorted(args.lr_drops) != args.lr_drops or any(d < 1 for d in args.lr_drops):
        raise ValueError(f"--lr_drops must be increasing update counts >= 1, got {args.lr_drops}")
    iteration.check_run_flags(args, read_files)
    if read_files and args.eval and (Path(args.output_dir) / "results_bbox.json").exists():
        raise ValueError(f"--output_dir {args.output_dir} holds the results of an earlier evaluation: give a new one")


def resolve_args(args: argparse.Namespace, read_files: bool = True) -> tuple[dict | None, dict | None]:
    """Demo settings, checks, data layout and architecture. Returns (--resume state, --finetune checkpoint); with
    `read_files` False (--print_config) nothing is read and both are None."""
    iteration.apply_demo(args, get_args_parser(), DEMO_OVERRIDES, DEMO_DATA)
    args.log_dir = args.log_dir or args.output_dir
    check_args(args, read_files)
    splits = ("val",) if args.eval else ("train", "val")
    return iteration.resolve_run(args, read_files, DEMO_DATA, lambda: check_layout(args.data_path, splits),
                                 lambda state, source: resolve_architecture(args, state, source))


def resolve_architecture(args: argparse.Namespace, resume_state: dict | None, source: dict | None) -> None:
    """A --resume checkpoint fixes the detector (its "model_cfg"); otherwise the encoder sizes come from --finetune's
    "model_cfg", the flags or the registry (`models_vit.resolve_architecture`)."""
    if resume_state is not None:
        cfg = resume_state.get("model_cfg") or {}
        if "fpn_channels" not in cfg:
            raise ValueError(f"--resume {args.resume} is not a checkpoint of main_detection.py (no detector "
                             "model_cfg); pre-trained encoders go to --finetune")
        iteration.use_checkpoint_architecture(args, cfg)
        return
    models_vit.resolve_architecture(args, source)
    blocks = args.global_blocks if args.global_blocks is not None else global_block_indices(args.depth)
    if not all(0 <= i < args.depth for i in blocks):
        raise ValueError(f"--global_blocks {list(blocks)} must lie in 0..{args.depth - 1} (0-based blocks)")
    args.global_blocks = list(blocks)


# --------------------------------------------------------------------------------------------------------------
# Model, optimizer, data
# --------------------------------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """What rebuilds the detector (stored as the checkpoints' "model_cfg")."""
    keys = (*models_vit.ARCH_KEYS, "input_size", "window_size", "global_blocks", "pyramid", "num_classes",
            "fpn_channels", "box_fc_dim")
    return {k: getattr(args, k) for k in keys}


def build_model(args: argparse.Namespace, source: dict | None) -> torch.nn.Module:
    """Mask R-CNN on the windowed ViT; the pre-trained encoder from --finetune (its load report logged once)."""
    encoder = {k: getattr(args, k) for k in models_vit.ARCH_KEYS}
    body = create_detection_backbone(encoder, args.input_size, args.window_size, args.global_blocks, args.pyramid,
                                     args.drop_path)
    body.vit.set_grad_checkpointing(args.grad_ckpt)
    model = build_maskrcnn(body, args.num_classes, args.input_size, args.fpn_channels, args.box_fc_dim,
                           args.rpn_batch_size_per_image, args.box_batch_size_per_image, args.detections_per_img)
    model.config = model_config(args)
    if source is not None:
        report, heads = load_pretrained(model, source)
        logger.info("--finetune %s: %s", args.finetune, report.describe(heads))
    else:
        logger.info("no --finetune: the backbone starts from random weights")
    return to_sync_batchnorm(model, args.device)


def build_datasets(args: argparse.Namespace) -> tuple[CocoDetection | None, CocoDetection]:
    """The training set (not under --eval) and the validation set; --num_classes from the training file."""
    val_index = CocoIndex(*split_paths(args.data_path, "val"))
    train = None
    if not args.eval:
        train_index = CocoIndex(*split_paths(args.data_path, "train"))
        if train_index.cat_ids != val_index.cat_ids:
            raise ValueError(f"{train_index.ann_file} and {val_index.ann_file} have different categories")
        train = CocoDetection(train_index, True, lsj_transform(args.input_size, tuple(args.lsj_scale)))
    if args.num_classes not in (None, val_index.num_classes):
        raise ValueError(f"--num_classes {args.num_classes} but {val_index.ann_file} has {val_index.num_classes} "
                         "categories: leave --num_classes unset (it comes from the file)")
    args.num_classes = val_index.num_classes
    return train, CocoDetection(val_index, False)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the flags, then train (or --eval); returns the last metrics. Raises ValueError for bad flags."""
    return train(args, *resolve_args(args))


def train(args: argparse.Namespace, resume_state: dict | None, source: dict | None) -> dict[str, Any]:
    """Train (or --eval) with flags completed by `resolve_args`."""
    demo_data = args.demo and args.data_path == DEMO_DATA
    device = iteration.setup(args, (lambda: demo.write_demo_dataset(DEMO_DATA)) if demo_data else None)
    train_set, val_set = build_datasets(args)
    model = build_model(args, source).to(device)
    train_loader, val_loader = build_loaders(args, train_set, val_set)
    evaluation = Evaluation(args, model, val_loader, val_set)

    def lr_at(update: int) -> float:
        return step_lr_at(update, args.lr, args.lr_drops, args.lr_gamma, args.warmup_iters, args.warmup_factor)

    def step_loss_of(train_model: torch.nn.Module) -> StepLoss:
        return make_step_loss(train_model, device, args.amp)

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=args.lr,
                                  betas=(0.9, 0.999), fused=True)
    run = iteration.IterationRun(args, model, optimizer, train_loader, step_loss_of, evaluation, lr_at,
                                 flag_defaults(get_args_parser()))
    return execute(args, run, evaluation, resume_state, val_set)


if __name__ == "__main__":
    with user_errors():
        parsed, (resume_checkpoint, encoder_checkpoint) = cls_run.parse_and_resolve(
            script_parser(__doc__, [get_args_parser()]), resolve_args)
        train(parsed, resume_checkpoint, encoder_checkpoint)
