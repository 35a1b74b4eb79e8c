#!/usr/bin/env python
"""Reconstruction grids: for each checkpoint, a PNG with one row per image — original, masked input and the
reconstruction of every decoder, labelled by the block it reads (paper Fig. 2's decoders).

Every checkpoint sees the same images and, for equal patch grids, the same masks (`--seed`). Predictions of
per-patch-normalised decoders are un-normalised with statistics of the visible patches (see analysis/visualize.py).
For DeepMIM†, `--hybrid_generator` adds each decoder's hybrid target t = a x + (1 - a) x_hat (Eq. 1), x_hat being
the generator's reconstruction under the same mask.

    python tools/visualize.py --ckpt mae.pth deepmim.pth --names MAE DeepMIM --demo_images --output_dir out/vis
    python tools/visualize.py --ckpt deepmim_dagger.pth --hybrid_generator mae_pretrain_vit_base_full.pth \\
        --data_path /data/imagenet --num_images 8 --output_dir out/vis

Needs the decoders: pre-training checkpoints of main_pretrain.py (or released MAE/DeepMIM files with decoders).
Fine-tuned / probed classifiers, exports and encoder-only releases are refused with a message naming the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

from analysis import cli, images  # noqa: E402
from analysis.loading import LoadedModel  # noqa: E402
from analysis.visualize import PATCH_STATS, file_stem, reconstruction_panels, save_grid_png  # noqa: E402
from models_deepmim import random_masking  # noqa: E402
from targets.hybrid import DEFAULT_ALPHAS, HybridGenerator, blend_targets, check_hybrid_args  # noqa: E402

logger = logging.getLogger("tools.visualize")


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser(__doc__, num_images=4, batch_size=16)
    group = parser.add_argument_group("masking and display")
    cli.add_mask_ratio_arg(group)
    group.add_argument("--patch_stats", default="visible", choices=PATCH_STATS,
                       help="statistics that un-normalise norm-pix predictions: estimated from visible patches, or "
                            "the true patch's (MAE's demo)")
    group.add_argument("--norm_pix_loss", action="store_true",
                       help="checkpoints without model_cfg predict per-patch-normalised pixels")
    hybrid = parser.add_argument_group("DeepMIM† hybrid targets (Eq. 1)")
    hybrid.add_argument("--hybrid_generator", default=None, metavar="PATH",
                        help="pre-trained MAE whose reconstruction is blended into each decoder's target; adds a "
                             "'target block <b>' panel per decoder")
    hybrid.add_argument("--hybrid_alphas", default=None, type=float, nargs="+",
                        help="blending ratio a per supervised block (default 0 1/3 2/3 1, paper Tab. 9); checkpoints "
                             "with another number of decoders are drawn without targets")
    group.add_argument("--per_image", action="store_true", help="also write one PNG per image and checkpoint")
    group.add_argument("--panel_px", default=None, type=int, help="panel size in the PNG (default max(input, 128))")
    return parser


def check_args(args: argparse.Namespace) -> None:
    cli.check_common_args(args)
    cli.check_mask_ratio(args)
    if args.panel_px is not None and args.panel_px < 8:
        raise cli.UsageError(f"--panel_px must be >= 8, got {args.panel_px}")
    if args.hybrid_alphas is not None and args.hybrid_generator is None:
        raise cli.UsageError("--hybrid_alphas needs --hybrid_generator")
    if args.hybrid_generator is not None and not Path(args.hybrid_generator).is_file():
        raise cli.UsageError(f"--hybrid_generator {args.hybrid_generator} does not exist or is not a file")


def load_generator(args: argparse.Namespace, m: LoadedModel) -> tuple[HybridGenerator, tuple] | None:
    """The hybrid-target generator and the alphas for model m, or None (no generator, or alphas that do not fit
    m's decoders, e.g. MAE's single decoder)."""
    if args.hybrid_generator is None:
        return None
    alphas = tuple(args.hybrid_alphas or DEFAULT_ALPHAS)
    if len(alphas) != len(m.model.supervised_blocks):
        logger.info("%s: %d decoders, %d hybrid alphas: drawn without targets", m.name,
                    len(m.model.supervised_blocks), len(alphas))
        return None
    try:
        check_hybrid_args(args.hybrid_generator, alphas, m.model.supervised_blocks)
        generator = HybridGenerator.from_file(args.hybrid_generator, student_norm_pix=m.model.norm_pix_loss,
                                              device=args.device)
        generator.check_student(m.model.patch_size, m.model.grid_size)
    except ValueError as err:
        raise cli.UsageError(str(err)) from err
    return generator, alphas


@torch.inference_mode()
def reconstruct_all(m: LoadedModel, generator: tuple[HybridGenerator, tuple] | None,
                    loader: torch.utils.data.DataLoader, noise: torch.Tensor,
                    args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Panels {name: (N, 3, H, W)} over every image of the loader, and the mean loss of every decoder."""
    panels: dict[str, list[torch.Tensor]] = {}
    losses: dict[str, float] = {}
    start = 0
    for imgs, _ in loader:
        imgs = imgs.to(args.device)
        batch_noise = noise[start:start + len(imgs)].to(args.device)
        start += len(imgs)
        targets = None
        if generator is not None:
            x_hat = generator[0].reconstruct(imgs, batch_noise, args.mask_ratio)
            targets = blend_targets(m.model.pixel_targets(imgs), x_hat, generator[1], m.model.supervised_blocks)
        for key, value in reconstruction_panels(m.model, imgs, batch_noise, args.mask_ratio, targets,
                                                args.patch_stats).items():
            panels.setdefault(key, []).append(value)
        _, batch_losses, _, _ = m.model(imgs, mask_ratio=args.mask_ratio, noise=batch_noise, targets=targets)
        for block, loss in batch_losses.items():
            losses[str(block)] = losses.get(str(block), 0.0) + float(loss) * len(imgs)
    return {k: torch.cat(v) for k, v in panels.items()}, {b: v / start for b, v in losses.items()}


def write_pngs(panels: dict[str, torch.Tensor], stem: str, args: argparse.Namespace) -> list[str]:
    output_dir = Path(args.output_dir)
    pngs = [str(save_grid_png(panels, output_dir / f"{stem}.png", args.panel_px))]
    if args.per_image:
        for i in range(len(panels["original"])):
            one = {k: v[i:i + 1] for k, v in panels.items()}
            pngs.append(str(save_grid_png(one, output_dir / f"{stem}_{i:03d}.png", args.panel_px)))
    return pngs


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    models, input_size = cli.load_models(args, require_decoders=True)
    cli.check_pixel_decoders(models)
    generators = [load_generator(args, m) for m in models]
    loader = images.build_image_loader(args, input_size)
    num_images = len(loader.dataset)
    result: dict[str, Any] = {"mask_ratio": args.mask_ratio, "seed": args.seed, "patch_stats": args.patch_stats,
                              "input_size": input_size, "num_images": num_images,
                              "hybrid_generator": args.hybrid_generator, "checkpoints": {}}
    for m, generator in zip(models, generators):
        noise = images.mask_noise(num_images, m.model.num_patches, args.seed)
        panels, losses = reconstruct_all(m, generator, loader, noise, args)
        pngs = write_pngs(panels, f"recon_{file_stem(m.name)}", args)
        masks = random_masking(noise, args.mask_ratio).mask
        alphas = None if generator is None else dict(zip(map(str, m.model.supervised_blocks), generator[1]))
        result["checkpoints"][m.name] = {
            "path": m.path, "epoch": m.epoch, "panels": list(panels), "png": pngs, "loss": losses,
            "hybrid_alphas": alphas, "masked_patches": [row.nonzero().flatten().tolist() for row in masks],
        }
        logger.info("%s: %s", m.name, pngs[0])
    (Path(args.output_dir) / "recon.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
