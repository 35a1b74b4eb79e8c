#!/usr/bin/env python
"""Reconstruction grids: for each checkpoint, a PNG with one row per image — original, masked input and the
reconstruction of every decoder, labelled by the block it reads (paper Fig. 2's decoders).

Every checkpoint sees the same images and, for equal patch grids, the same masks (`--seed`). Predictions of
per-patch-normalised decoders are un-normalised with statistics of the visible patches (see analysis/visualize.py).
For DeepMIM†, `--hybrid_generator` adds each decoder's hybrid target t = a x + (1 - a) x_hat (Eq. 1), x_hat being
the generator's reconstruction under the same mask.

`--mask_strategy random semantic_aware` draws every checkpoint's panels under each masking strategy (paper Tab. 12),
side by side in one PNG, from the same uniform numbers (`--seed`): semantic-aware masking (MILAN [23]) adds an
"attention" panel, the image weighted by the frozen teacher's class-token attention that draws its visible patches
(`--mask_teacher`, `--mask_teacher_path`; see targets/masking.py). The default (random) draws what it always did.

    python tools/visualize.py --ckpt mae.pth deepmim.pth --names MAE DeepMIM --demo_images --output_dir out/vis
    python tools/visualize.py --ckpt deepmim_dagger.pth --hybrid_generator mae_pretrain_vit_base_full.pth \\
        --data_path /data/imagenet --num_images 8 --output_dir out/vis
    python tools/visualize.py --ckpt deepmim.pth --mask_strategy random semantic_aware --mask_teacher clip \\
        --mask_teacher_path ViT-B-16.pt --demo_images --output_dir out/vis

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
from targets import masking  # noqa: E402
from targets.hybrid import DEFAULT_ALPHAS, HybridGenerator, blend_targets, check_hybrid_args  # noqa: E402
from util.datasets import denormalize  # noqa: E402

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
    masking.add_mask_args(parser.add_argument_group("masking strategies (paper Tab. 12), compared side by side"),
                          several=True)
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
    if len(set(args.mask_strategy)) != len(args.mask_strategy):
        raise cli.UsageError(f"--mask_strategy {' '.join(args.mask_strategy)} names a strategy twice")
    semantic = "semantic_aware" if "semantic_aware" in args.mask_strategy else "random"
    try:
        args.mask_teacher_spec = masking.resolve_mask_teacher(semantic, args.mask_teacher, args.mask_teacher_path,
                                                              args.mask_teacher_model)
    except ValueError as err:
        raise cli.UsageError(str(err)) from err


def build_strategies(args: argparse.Namespace, grid_size: tuple[int, int]) -> dict[str, masking.MaskStrategy]:
    """Every --mask_strategy on the first checkpoint's grid (`with_grid` moves them to another one); the teacher
    of semantic_aware is built once."""
    try:
        return {name: masking.build_mask_strategy(name, args.mask_teacher_spec, grid_size=grid_size,
                                                  device=args.device) for name in args.mask_strategy}
    except ValueError as err:
        raise cli.UsageError(str(err)) from err


def attention_panel(imgs: torch.Tensor, weights: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """The image (N, 3, H, W) in [0, 1] dimmed where the teacher's attention (N, L) is low: each patch scaled by
    0.2 + 0.8 w / max(w)."""
    scale = (weights / weights.amax(-1, keepdim=True)).reshape(-1, 1, *grid_size)
    scale = torch.nn.functional.interpolate(scale, size=imgs.shape[-2:], mode="nearest")
    return (denormalize(imgs) * (0.2 + 0.8 * scale)).float().cpu()


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
                    loader: torch.utils.data.DataLoader, uniform: torch.Tensor, strategy: masking.MaskStrategy,
                    args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """Panels {name: (N, 3, H, W)} over every image of the loader, the mean loss of every decoder, and the masking
    noise (N, L) that `strategy` made of the uniform numbers (random: the numbers themselves)."""
    panels: dict[str, list[torch.Tensor]] = {}
    losses: dict[str, float] = {}
    noises = []
    start = 0
    for imgs, _ in loader:
        imgs = imgs.to(args.device)
        batch_noise = strategy(imgs, uniform[start:start + len(imgs)].to(args.device))
        noises.append(batch_noise.cpu())
        start += len(imgs)
        targets = None
        if generator is not None:
            x_hat = generator[0].reconstruct(imgs, batch_noise, args.mask_ratio)
            targets = blend_targets(m.model.pixel_targets(imgs), x_hat, generator[1], m.model.supervised_blocks)
        batch = reconstruction_panels(m.model, imgs, batch_noise, args.mask_ratio, targets, args.patch_stats)
        if isinstance(strategy, masking.SemanticAwareMasking):  # the teacher's pass is cached: not run again
            attention = attention_panel(imgs, strategy.weights(imgs), m.model.grid_size)
            batch = {"original": batch.pop("original"), "attention": attention, **batch}
        for key, value in batch.items():
            panels.setdefault(key, []).append(value)
        _, batch_losses, _, _ = m.model(imgs, mask_ratio=args.mask_ratio, noise=batch_noise, targets=targets)
        for block, loss in batch_losses.items():
            losses[str(block)] = losses.get(str(block), 0.0) + float(loss) * len(imgs)
    return {k: torch.cat(v) for k, v in panels.items()}, {b: v / start for b, v in losses.items()}, torch.cat(noises)


def merge_strategies(panels: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{strategy: panels} -> one set of panels: the original once, then each strategy's other panels with the
    strategy in their names ('masked (random)', ...); a single strategy's panels unchanged."""
    if len(panels) == 1:
        return next(iter(panels.values()))
    first = next(iter(panels.values()))
    merged = {"original": first["original"]}
    for name, own in panels.items():
        merged.update({f"{key} ({name})": value for key, value in own.items() if key != "original"})
    return merged


def write_pngs(panels: dict[str, torch.Tensor], stem: str, args: argparse.Namespace) -> list[str]:
    output_dir = Path(args.output_dir)
    pngs = [str(save_grid_png(panels, output_dir / f"{stem}.png", args.panel_px))]
    if args.per_image:
        for i in range(len(panels["original"])):
            one = {k: v[i:i + 1] for k, v in panels.items()}
            pngs.append(str(save_grid_png(one, output_dir / f"{stem}_{i:03d}.png", args.panel_px)))
    return pngs


def masked_patches(noise: torch.Tensor, mask_ratio: float) -> list[list[int]]:
    """The removed patch positions of every image under this noise."""
    return [row.nonzero().flatten().tolist() for row in random_masking(noise, mask_ratio).mask]


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
    strategies = build_strategies(args, models[0].model.grid_size)
    result["mask_strategy"] = list(strategies)
    for m, generator in zip(models, generators):
        uniform = images.mask_noise(num_images, m.model.num_patches, args.seed)  # shared by every strategy
        runs = {name: reconstruct_all(m, generator, loader, uniform, s.with_grid(m.model.grid_size), args)
                for name, s in strategies.items()}
        panels = merge_strategies({name: run[0] for name, run in runs.items()})
        pngs = write_pngs(panels, f"recon_{file_stem(m.name)}", args)
        by_strategy = {name: {"loss": losses, "masked_patches": masked_patches(noise, args.mask_ratio)}
                       for name, (_, losses, noise) in runs.items()}
        alphas = None if generator is None else dict(zip(map(str, m.model.supervised_blocks), generator[1]))
        result["checkpoints"][m.name] = {
            "path": m.path, "epoch": m.epoch, "panels": list(panels), "png": pngs, "hybrid_alphas": alphas,
            **next(iter(by_strategy.values())),  # the first strategy's, as before strategies existed
        }
        if len(by_strategy) > 1:
            result["checkpoints"][m.name]["by_strategy"] = by_strategy
        logger.info("%s: %s", m.name, pngs[0])
    (Path(args.output_dir) / "recon.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
