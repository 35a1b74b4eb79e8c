"""Patch-level tensor operations shared by the model, targets and figures: MAE's random masking, patchify, per-patch
normalisation, token gathering, and MAE's fixed 2-D sin-cos position embedding."""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import Tensor


class Masking(NamedTuple):
    """Indices of one random masking. mask: (N, L), 1 = removed; ids_restore: (N, L) unshuffles the token order;
    ids_keep: (N, L_vis) visible positions; ids_masked: (N, L_m) removed positions, ascending."""

    mask: Tensor
    ids_restore: Tensor
    ids_keep: Tensor
    ids_masked: Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of patches the encoder sees: int(L * (1 - r)), as in MAE."""
    return int(num_patches * (1 - mask_ratio))


def uniform_noise(batch_size: int, num_patches: int, device: torch.device | str) -> Tensor:
    """MAE's masking noise: u ~ U(0, 1), (N, L), drawn from the global RNG on `device`. The one call of it, so that the
    model's random masking and every masking strategy draw the same numbers for the same seed."""
    return torch.rand(batch_size, num_patches, device=device)


def random_masking(noise: Tensor, mask_ratio: float) -> Masking:
    """Per-sample random masking by argsort of noise (MAE): the smallest noise values are kept.

    noise: (N, L) in any range; the same noise always gives the same mask, which is how decoders, the hybrid
    target generator and visualisations share one mask.
    """
    n, length = noise.shape
    len_keep = num_visible(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    ids_masked = ids_shuffle[:, len_keep:].sort(dim=1).values
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(mask, ids_restore, ids_keep, ids_masked)


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding in MAE's channel layout.

    timm builds the embedding as [sin(h), sin(w), cos(h), cos(w)] (each dim/4 wide); MAE's released checkpoints use
    [sin(w), cos(w), sin(h), cos(h)]. We reorder timm's output so fresh models match MAE exactly.

    Returns: (1, [1 +] H*W, dim); the cls row is zero.
    """
    emb = build_sincos2d_pos_embed(list(grid_size), dim=dim)  # (H*W, dim)
    sin_h, sin_w, cos_h, cos_w = emb.chunk(4, dim=1)
    emb = torch.cat([sin_w, cos_w, sin_h, cos_h], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb.unsqueeze(0)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x: (N, L, C) or (N, L) (e.g. code ids), ids: (N, K) -> (N, K, C) or (N, K)."""
    return torch.gather(x, 1, ids if x.ndim == 2 else ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_masked(pred: Tensor, mask: Tensor, fill: Tensor | None = None) -> Tensor:
    """Put predictions of the masked patches back on the full grid.

    pred: (N, L_m, C) in ascending position order (as `forward` returns them); mask: (N, L), 1 = removed;
    fill: optional (N, L, C) values for the visible positions (zeros otherwise). Returns (N, L, C).
    """
    n, length = mask.shape
    out = torch.zeros(n, length, pred.shape[-1], dtype=pred.dtype, device=pred.device) if fill is None else fill.clone()
    out[mask.bool()] = pred.reshape(-1, pred.shape[-1]).to(out.dtype)
    return out


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """imgs: (N, C, H, W) -> (N, L, p*p*C), MAE's channel-last order inside each patch."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> Tensor:
    """x: (N, L, p*p*C) -> (N, C, H, W); inverse of `patchify`."""
    n = x.shape[0]
    p, (gh, gw) = patch_size, grid_size
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch normalisation of pixel targets (MAE's `--norm_pix_loss`): zero mean, unit variance per patch."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5
