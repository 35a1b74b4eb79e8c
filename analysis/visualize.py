"""Reconstruction figures: original, masked input and the reconstruction of every decoder (labelled by block), and
optionally each decoder's (hybrid) target, as tensors for TensorBoard and as a labelled PNG; plus the save helper
the analysis tools share (figure PNG with the JSON of its numbers beside it).

Un-normalising per-patch-normalised predictions (`norm_pix_loss`). A decoder trained on normalised targets predicts
each masked patch up to its mean and standard deviation, which are unknown at inference. MAE's demo borrows them
from the true patch, i.e. shows information the model never saw (`patch_stats="target"` reproduces it). By default
(`patch_stats="visible"`) we estimate them from what the encoder saw: a masked patch takes the average per-patch mean
and the average per-patch variance of the visible patches in its 3x3 neighbourhood on the patch grid (brightness and
contrast vary slowly across an image), or of all visible patches of the image when no neighbour is visible. In both
cases visible patches are pasted from the original, as in MAE's demo, so only masked patches show predictions.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import make_grid

from models_deepmim import MaskedAutoencoderDeepMIM
from util.datasets import denormalize
from util.patches import patchify, scatter_masked, unpatchify

logger = logging.getLogger(__name__)

PatchStats = Literal["visible", "target"]
PATCH_STATS = ("visible", "target")
NORM_EPS = 1e-6  # as util.patches.normalize_patches
MASK_GREY = 0.5  # display value of removed patches in the masked input
TITLE_PX = 24  # height of the column titles in `save_grid_png`


def block_key(block: int) -> str:
    return f"block {block}"


def target_key(block: int) -> str:
    return f"target block {block}"


def estimate_patch_stats(patches: Tensor, mask: Tensor, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Mean and variance of every patch estimated from the visible patches (see module doc).

    patches: (N, L, C) ImageNet-normalised pixels; mask: (N, L), 1 = removed. Returns mean, var: (N, L, 1); for
    visible patches these are the neighbourhood averages too (callers paste visible patches from the original).
    """
    n, length, _ = patches.shape
    visible = (1 - mask).float()
    stats = torch.stack([patches.mean(-1) * visible, patches.var(-1) * visible, visible], dim=1)  # (N, 3, L)
    ones = torch.ones(1, 1, 3, 3, dtype=stats.dtype, device=stats.device)
    sums = F.conv2d(stats.reshape(n * 3, 1, *grid_size), ones, padding=1).reshape(n, 3, length)  # 3x3 window sums
    local = sums[:, :2] / sums[:, 2:].clamp_min(1)
    overall = stats[:, :2].sum(-1, keepdim=True) / stats[:, 2:].sum(-1, keepdim=True).clamp_min(1)  # (N, 2, 1)
    est = torch.where(sums[:, 2:] > 0, local, overall)
    return est[:, 0].unsqueeze(-1), est[:, 1].unsqueeze(-1)


def patches_to_display(
    pred: Tensor, mask: Tensor, patches: Tensor, model: MaskedAutoencoderDeepMIM, patch_stats: PatchStats
) -> Tensor:
    """Masked-patch predictions -> display image in [0, 1] with the visible patches pasted from the original.

    pred: (N, L_m, C) in ascending masked position order, in the model's target space; patches: (N, L, C) the
    original's ImageNet-normalised patches; mask: (N, L). Returns (N, 3, H, W).
    """
    if model.norm_pix_loss:
        if patch_stats == "visible":
            mean, var = estimate_patch_stats(patches, mask, model.grid_size)
        else:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        removed = mask.bool()
        pred = pred * (var[removed].reshape(*pred.shape[:2], 1) + NORM_EPS).sqrt() + mean[removed].reshape(
            *pred.shape[:2], 1)
    full = scatter_masked(pred, mask, fill=patches)
    return denormalize(unpatchify(full, model.patch_size, model.grid_size, model.in_chans))


@torch.no_grad()
def reconstruction_panels(
    model: MaskedAutoencoderDeepMIM,
    imgs: Tensor,
    noise: Tensor,
    mask_ratio: float,
    hybrid_targets: Mapping[int, Tensor] | None = None,
    patch_stats: PatchStats = "visible",
) -> dict[str, Tensor]:
    """The panels of a reconstruction figure, in display order, each (N, 3, H, W) in [0, 1] on the CPU.

    imgs: (N, 3, H, W) ImageNet-normalised; noise: (N, L) masking noise (the same noise gives the same mask for
    every model and for a hybrid-target generator). hybrid_targets: {block: (N, L, C)} targets in the model's target
    space (what `model.forward` takes as `targets`), shown for masked patches like the predictions.
    Keys: "original", "masked", "block <b>" for every supervised block, then "target block <b>" when given.
    """
    if patch_stats not in PATCH_STATS:
        raise ValueError(f"patch_stats must be one of {PATCH_STATS}, got {patch_stats!r}")
    pixel_dim = model.patch_size**2 * model.in_chans
    if model.pred_dim != pixel_dim or model.loss_type != "mse":
        raise ValueError(f"reconstructions can be shown only for pixel targets (pred_dim {pixel_dim}); this model "
                         f"predicts {model.pred_dim}-d {model.loss_type} targets (HOG / teacher features)")
    _, _, preds, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    patches = patchify(imgs, model.patch_size)
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand_as(patches), model.patch_size, model.grid_size, model.in_chans)
    original = denormalize(imgs)
    panels = {"original": original, "masked": original * (1 - pixel_mask) + MASK_GREY * pixel_mask}
    for block in model.supervised_blocks:
        panels[block_key(block)] = patches_to_display(preds[block], mask, patches, model, patch_stats)
    for block, target in (hybrid_targets or {}).items():
        masked_target = target[mask.bool()].reshape(target.shape[0], -1, target.shape[-1])
        panels[target_key(block)] = patches_to_display(masked_target, mask, patches, model, patch_stats)
    return {k: v.float().cpu() for k, v in panels.items()}


def grid_tensor(panels: Mapping[str, Tensor], padding: int = 2) -> Tensor:
    """Panels {name: (N, 3, H, W)} -> one (3, H', W') image: a row per image, a column per panel (TensorBoard's
    `add_image`)."""
    stacked = torch.stack(list(panels.values()), dim=1)  # (N, P, 3, H, W)
    n, p = stacked.shape[:2]
    return make_grid(stacked.flatten(0, 1), nrow=p, padding=padding, pad_value=1.0)


def grid_png_size(num_images: int, num_panels: int, panel_px: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_grid_png` writes."""
    return num_panels * panel_px, num_images * panel_px + TITLE_PX


def save_grid_png(panels: Mapping[str, Tensor], path: str | os.PathLike, panel_px: int | None = None) -> Path:
    """Write panels {name: (N, 3, H, W)} as a labelled PNG: one row per image, one column per panel, the panel
    names as column titles. Each panel is `panel_px` square (default: max(W, 128), upscaled without smoothing);
    the file is exactly `grid_png_size(N, P, panel_px)` pixels."""
    names = list(panels)
    n, _, h, w = panels[names[0]].shape
    panel_px = panel_px or max(w, 128)
    width, height = grid_png_size(n, len(names), panel_px)
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for col, name in enumerate(names):
        for row in range(n):
            bottom = 1 - (TITLE_PX + (row + 1) * panel_px) / height
            ax = fig.add_axes((col * panel_px / width, bottom, panel_px / width, panel_px / height))
            ax.imshow(panels[name][row].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_axis_off()
        fig.text((col + 0.5) * panel_px / width, 1 - TITLE_PX / 2 / height, name, ha="center", va="center",
                 fontsize=min(10, max(5, panel_px // 14)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure (inches) drawn by the Agg canvas: headless, no pyplot state, nothing to close."""
    return Figure(figsize=(width, height))


def integer_ticks(*axes: Any, y: bool = False) -> None:
    """Integer-only ticks on the x axis (and the y axis with y=True) of each matplotlib Axes: block numbers."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig: Figure, data: Mapping[str, Any], path: str | os.PathLike) -> tuple[Path, Path]:
    """Save a figure as PNG and `data` (every plotted number) as JSON beside it (same stem)."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1))
    logger.info("wrote %s and %s", path, json_path)
    return path, json_path


def file_stem(name: str) -> str:
    """A checkpoint label as a file-name part: characters other than letters, digits, '-', '.' become '_'."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", name).strip("_") or "model"
