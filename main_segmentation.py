"""Semantic segmentation on ADE20K with UperNet on a pre-trained ViT (paper Tab. 4, Appendix A; the released
`Segmentation/configs/mae/upernet_mae_base_12_512_slide_160k_ade20k.py`).

    torchrun --nproc_per_node 8 main_segmentation.py \
        --config configs/segmentation/upernet_deepmim_clip_vit_base_160k.yaml --batch_size 2 \
        --finetune out/deepmim_clip/checkpoint-1599.pth --data_path /datasets/ADEChallengeData2016 --output_dir out/seg
    python main_segmentation.py --eval --resume out/seg/checkpoint-160000.pth --data_path DIR --save_predictions P \
        --output_dir out/seg_eval
    python main_segmentation.py --demo            # a few minutes on CPU, texture mosaics (segmentation/demo.py)

--finetune takes this project's pre-training (or fine-tuning) checkpoints, `.safetensors` exports, Meta's
`mae_pretrain_vit_base.pth` and the released DeepMIM files. Runs are iteration-based (`util.iteration`): 160k updates
of a global batch of 16, AdamW, layer-wise lr decay as the released constructor (`util.layer_decay`), warm-up + poly
(`util.lr_sched.poly_lr_at`), evaluation and checkpoint every 16k; --save_every_iters, stop signals, --resume auto
and exact mid-interval resume as the other scripts. Device and precision are decided on the machine that trains.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch

import models_backbone
import models_vit
from engine_segmentation import Evaluation, build_loaders, execute, make_step_loss
from segmentation import demo
from segmentation.data import SegmentationFolder, check_layout, class_names
from segmentation.segmentor import Segmentor, create_segmentor, head_counts, load_pretrained_encoder
from segmentation.transforms import TestTransform, TrainTransform
from util import cls_run, iteration
from util.cli import script_parser, user_errors
from util.config import add_config_args, add_global_batch_arg, check_range, flag_defaults
from util.layer_decay import param_groups_layer_decay
from util.lr_sched import poly_lr_at
from util.training import StepLoss

logger = logging.getLogger(__name__)

DEMO_DATA = "./output_demo/segmentation_data"
# --demo: a tiny UperNet (patch 8, width 64, 4 blocks) from scratch on 64-px crops of texture mosaics; filled into
# flags left at their defaults only, so `--demo --data_path DIR --num_classes K` trains it on any folder.
DEMO_OVERRIDES: dict[str, Any] = dict(
    output_dir="./output_demo/segmentation", num_classes=4, model="vit_small_patch16", input_size=64, patch_size=8,
    embed_dim=64, depth=4, num_heads=4, channels=64, aux_channels=32, drop_path=0.0, img_scale=[256, 64],
    slide_stride=43, batch_size=8, iters=600, eval_interval=300, warmup_iters=40, lr=2e-3, layer_decay=1.0,
    num_workers=0, print_freq=20,
)


def get_args_parser() -> argparse.ArgumentParser:
    """Flags and defaults of the released config (DeepMIM-MAE-CLIP); add_help=False for submitit."""
    parser = argparse.ArgumentParser("DeepMIM semantic segmentation", add_help=False)
    g = parser.add_argument_group("Training")
    g.add_argument("--batch_size", default=2, type=int, help="images per process per step (released: 2 x 8 GPUs)")
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    iteration.add_iteration_args(g, iters=160000, interval=16000)
    g.add_argument("--print_freq", default=50, type=int, help="log every N steps (released: 50)")
    add_global_batch_arg(g)

    g = models_vit.add_arch_args(parser, input_size_help="(here: the crop and sliding-window size, released 512)")
    parser.set_defaults(input_size=512)
    g.add_argument("--finetune", default="", type=str, help="pre-trained encoder (every layout the project loads)")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate (Appendix A: 0.1)")
    g.add_argument("--out_indices", default=None, type=int, nargs=4,
                   help="0-based blocks feeding strides 4, 8, 16, 32 (default: depth x (1/3, 1/2, 2/3, 1) - 1, "
                        "[3, 5, 7, 11] for ViT-B)")
    g.add_argument("--channels", default=768, type=int, help="UPerHead channels (released: 768)")
    g.add_argument("--aux_channels", default=256, type=int, help="auxiliary FCNHead channels (released: 256)")
    g.add_argument("--aux_weight", default=0.4, type=float, help="auxiliary loss weight (released: 0.4; 0: no head)")

    g = parser.add_argument_group("Optimizer (AdamW (0.9, 0.999), poly schedule)")
    g.add_argument("--lr", default=5e-5, type=float, help="absolute lr for the batch of 16 (Appendix A: 1e-4 MAE "
                   "pixels, 5e-5 MAE-CLIP)")
    g.add_argument("--weight_decay", default=0.05, type=float, help="Appendix A: 0.05")
    g.add_argument("--layer_decay", default=0.9, type=float, help="Appendix A: 0.65 MAE pixels, 0.9 MAE-CLIP")
    g.add_argument("--warmup_iters", default=1500, type=int, help="linear warm-up updates (released: 1500)")
    g.add_argument("--warmup_ratio", default=1e-6, type=float, help="warm-up starts at lr x ratio (released: 1e-6)")
    g.add_argument("--poly_power", default=1.0, type=float, help="poly decay power (released: 1.0)")
    g.add_argument("--min_lr", default=0.0, type=float, help="lr at the last update (released: 0)")

    g = parser.add_argument_group("Data (ADEChallengeData2016 layout) and pipeline")
    g.add_argument("--data_path", default=None, type=str, help="folder with images/ and annotations/ "
                   "({training,validation} each)")
    g.add_argument("--num_classes", default=150, type=int, help="classes after reduce-zero-label (ADE20K: 150)")
    g.add_argument("--reduce_zero_label", action=argparse.BooleanOptionalAction, default=True,
                   help="annotation 0 = ignored, k -> class k-1 (ADE20K); --no_reduce_zero_label when 0 is a class")
    g.add_argument("--class_names", default=None, type=str, help="file with one class name per line (the table)")
    g.add_argument("--img_scale", default=[2048, 512], type=int, nargs=2, help="resize scale (long, short edge)")
    g.add_argument("--ratio_range", default=[0.5, 2.0], type=float, nargs=2, help="training scale ratio range")
    g.add_argument("--cat_max_ratio", default=0.75, type=float, help="largest share of one class in a crop")
    g.add_argument("--slide_stride", default=341, type=int, help="sliding-window stride at test time (released 341)")
    g.add_argument("--demo", action="store_true", help="tiny UperNet on texture mosaics (CPU, a few minutes)")
    g.add_argument("--save_predictions", default=None, type=str,
                   help="with --eval: write DIR/<image stem>.png per validation image (the dataset's label values)")

    iteration.add_run_args(parser)
    add_config_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------------------
# Flags: demo, checks, the checkpoint that defines the model (all before anything is built)
# --------------------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace, read_files: bool = True) -> None:
    """Ranges and combinations; files and folders. Machine-independent (runs on a login node too)."""
    for name in ("batch_size", "accum_iter", "print_freq", "input_size", "slide_stride", "channels"):
        check_range(args, name, 1, math.inf)
    check_range(args, "num_classes", 1, 255)  # predictions are saved as uint8 PNGs; 255 is the ignore label
    check_range(args, "num_workers", 0, math.inf)
    check_range(args, "max_bad_images", 0, math.inf)
    check_range(args, "lr", 0, math.inf, low_open=True)
    check_range(args, "layer_decay", 0, 1, low_open=True)
    check_range(args, "drop_path", 0, 1, high_open=True)
    check_range(args, "cat_max_ratio", 0, 1, low_open=True)
    check_range(args, "warmup_ratio", 0, 1)
    for name in ("weight_decay", "min_lr", "aux_weight", "poly_power", "warmup_iters"):
        check_range(args, name, 0, math.inf)
    iteration.check_iteration_args(args)
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise ValueError(f"--ratio_range must be 0 < low <= high, got {args.ratio_range}")
    if args.save_predictions and not args.eval:
        raise ValueError("--save_predictions is an --eval option (the predictions of a trained checkpoint)")
    iteration.check_run_flags(args, read_files)
    if read_files:
        if args.class_names and not Path(args.class_names).is_file():
            raise ValueError(f"--class_names {args.class_names}: no such file")
        check_outputs(args)


def check_outputs(args: argparse.Namespace) -> None:
    """Nothing already written is overwritten: a folder of predictions (a run's checkpoints: `check_run_flags`)."""
    if args.save_predictions and Path(args.save_predictions).is_dir() and any(Path(args.save_predictions).iterdir()):
        raise ValueError(f"--save_predictions {args.save_predictions} is not empty: give a new folder")


def resolve_args(args: argparse.Namespace, read_files: bool = True) -> tuple[dict | None, dict | None]:
    """Demo settings, checks, data layout and architecture. Returns (--resume state, --finetune checkpoint); with
    `read_files` False (--print_config) nothing is read and both are None."""
    iteration.apply_demo(args, get_args_parser(), DEMO_OVERRIDES, DEMO_DATA)
    args.log_dir = args.log_dir or args.output_dir
    check_args(args, read_files)
    return iteration.resolve_run(args, read_files, DEMO_DATA, lambda: check_layout(args.data_path),
                                 lambda state, source: resolve_architecture(args, state, source))


def resolve_architecture(args: argparse.Namespace, resume_state: dict | None, source: dict | None) -> None:
    """A --resume checkpoint fixes the segmentor (its "model_cfg"); otherwise the encoder sizes come from --finetune's
    "model_cfg", the flags or the registry (`models_vit.resolve_architecture`)."""
    if resume_state is not None:
        cfg = resume_state.get("model_cfg") or {}
        if "num_classes" not in cfg:
            raise ValueError(f"--resume {args.resume} is not a checkpoint of main_segmentation.py (no segmentor "
                             "model_cfg); pre-trained encoders go to --finetune")
        values = {"input_size": cfg["img_size"], "num_classes": cfg["num_classes"], "out_indices": cfg["out_indices"],
                  **{k: cfg[k] for k in (*models_vit.ARCH_KEYS, "channels", "aux_channels", "aux_weight")}}
        iteration.use_checkpoint_architecture(args, values)
        if args.eval:
            evaluate_as_trained(args, resume_state.get("args") or {})
    else:
        models_vit.resolve_architecture(args, source)
        indices = args.out_indices or models_backbone.default_out_indices(args.depth)
        if not all(0 <= i < args.depth for i in indices):
            raise ValueError(f"--out_indices {list(indices)} must lie in 0..{args.depth - 1} (0-based blocks)")
        args.out_indices = list(indices)
    if args.slide_stride > args.input_size:
        raise ValueError(f"--slide_stride {args.slide_stride} leaves pixels between windows of --input_size "
                         f"{args.input_size}: give a stride <= the window")


# The test pipeline of a run: --eval takes these from the checkpoint's flags unless they are given.
EVAL_SETTINGS = ("img_scale", "slide_stride", "reduce_zero_label", "class_names")


def evaluate_as_trained(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """--eval: every EVAL_SETTINGS flag left at its default takes the evaluated run's value (a demo checkpoint is
    evaluated at the demo's scale and window stride without repeating them)."""
    parser = get_args_parser()
    for key in EVAL_SETTINGS:
        if key in saved and getattr(args, key) == parser.get_default(key) and saved[key] != getattr(args, key):
            logger.info("--eval: --%s %s from the checkpoint's run", key, saved[key])
            setattr(args, key, saved[key])


# --------------------------------------------------------------------------------------------------------------
# Model, optimizer, data
# --------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, source: dict | None) -> Segmentor:
    """The released UperNet; the pre-trained encoder from --finetune (its load report logged once)."""
    encoder = {k: getattr(args, k) for k in models_vit.ARCH_KEYS}
    model = create_segmentor(encoder, args.num_classes, args.input_size, args.out_indices, args.drop_path,
                             args.channels, args.aux_channels, args.aux_weight)
    if source is not None:
        report = load_pretrained_encoder(model, source)
        logger.info("--finetune %s: %s", args.finetune, report.describe(head_counts(model)))
    else:
        logger.info("no --finetune: the backbone starts from random weights")
    return models_backbone.to_sync_batchnorm(model, args.device)


def build_optimizer(model: Segmentor, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) over the released layer-decay groups: embeddings decay^13, block i decay^(12 - i), heads
    and pyramid 1; pos_embed and cls_token are weight-decayed, as the released constructor does."""
    groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay, depth=args.depth,
                                      prefix="backbone.vit.")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)


def build_datasets(args: argparse.Namespace) -> tuple[SegmentationFolder, SegmentationFolder]:
    train_tf = TrainTransform(args.input_size, tuple(args.img_scale), tuple(args.ratio_range), args.cat_max_ratio)
    val_tf = TestTransform(tuple(args.img_scale))
    train = SegmentationFolder(args.data_path, "training", train_tf, args.num_classes, args.reduce_zero_label)
    val = SegmentationFolder(args.data_path, "validation", val_tf, args.num_classes, args.reduce_zero_label)
    return train, val


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the flags, then train (or --eval); returns the last metrics. Raises ValueError for bad flags."""
    return train(args, *resolve_args(args))


def train(args: argparse.Namespace, resume_state: dict | None, source: dict | None) -> dict[str, Any]:
    """Train (or --eval) with flags completed by `resolve_args`."""
    demo_data = args.demo and args.data_path == DEMO_DATA
    device = iteration.setup(args, (lambda: demo.write_demo_dataset(DEMO_DATA)) if demo_data else None)
    if demo_data:
        check_layout(args.data_path)
    train_set, val_set = build_datasets(args)
    train_loader, val_loader, num_real = build_loaders(args, train_set, val_set)
    model = build_model(args, source).to(device)
    names = class_names(args.num_classes, args.class_names, ade20k=args.reduce_zero_label)
    evaluation = Evaluation(args, model, val_loader, num_real, names)

    def lr_at(update: int) -> float:
        return poly_lr_at(update, args.lr, args.iters, args.poly_power, args.min_lr, args.warmup_iters,
                          args.warmup_ratio)

    def step_loss_of(train_model: torch.nn.Module) -> StepLoss:
        return make_step_loss(train_model, model, device, args.amp)

    run = iteration.IterationRun(args, model, build_optimizer(model, args), train_loader, step_loss_of, evaluation,
                                 lr_at, flag_defaults(get_args_parser()))
    return execute(args, run, evaluation, resume_state, val_set)


if __name__ == "__main__":
    with user_errors():
        parsed, (resume_checkpoint, encoder_checkpoint) = cls_run.parse_and_resolve(
            script_parser(__doc__, [get_args_parser()]), resolve_args)
        train(parsed, resume_checkpoint, encoder_checkpoint)
