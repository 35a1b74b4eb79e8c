"""Histograms of oriented gradients as per-patch targets, MaskFeat's recipe (paper Tab. 11, "HOG [48]").

Per RGB channel: image gradients (Sobel, reflect padding), gradient magnitude weighted by a Gaussian window the
size of a patch, hard voting into 9 unsigned orientation bins of 20 degrees, summed over 8x8-pixel cells, each
cell's 9-bin histogram L2-normalised. A patch's target is its cells' histograms concatenated: a 16x16 patch holds
2x2 cells x 3 channels x 9 bins = 108 values (patch 8: 27).

Everything is batched tensor work (separable conv2d for the gradients, `scatter_` for the bins, sum pooling for
the cells), on whatever device the images are on; there is no per-image loop.

Conventions (fixed so that `skimage.feature.hog` is an independent reference, see tests/test_hog.py):
- angle = atan2(d/drow, d/dcol) in degrees, folded into [0, 180); bin k holds [20k, 20(k+1)). MaskFeat's own code
  measures the angle from the other axis, which only permutes the bins; the target carries the same information.
- `gradient="central"` is skimage's [-1, 0, 1] difference (zero at the border); `"sobel"` (MaskFeat) smooths it
  with [1, 2, 1] across the derivative direction.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

HOG_BINS = 9  # unsigned orientation bins (MaskFeat)
HOG_CELL = 8  # pixels per cell side (MaskFeat)

GradientKind = Literal["sobel", "central"]

_DERIVATIVE = (-1.0, 0.0, 1.0)
_SOBEL_SMOOTHING = (1.0, 2.0, 1.0)  # applied across the difference
_GRADIENTS = ("sobel", "central")


def hog_dim(patch_size: int, channels: int = 3, cell_size: int = HOG_CELL, bins: int = HOG_BINS) -> int:
    """Width of one patch's HOG target: (p / cell)^2 cells x channels x bins (108 for p=16)."""
    if patch_size % cell_size:
        raise ValueError(f"HOG needs a patch size that is a multiple of the {cell_size}-pixel cell, got {patch_size}")
    return (patch_size // cell_size) ** 2 * channels * bins


def image_gradients(pixels: Tensor, gradient: GradientKind = "sobel") -> tuple[Tensor, Tensor]:
    """Per-channel derivatives along rows and columns. pixels: (N, C, H, W) -> (g_row, g_col), each (N, C, H, W).

    Separable filtering (difference, then smoothing across it) keeps an exactly flat direction exactly zero, so a
    pixel's orientation bin does not hinge on rounding. Reflect padding (as MaskFeat) makes the derivative across
    the border zero, which is also skimage's convention.
    """
    if gradient not in _GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(_GRADIENTS)}, got {gradient!r}")
    n, c, h, w = pixels.shape
    x = pixels.reshape(n * c, 1, h, w)
    derivative = _kernel(_DERIVATIVE, pixels.dtype, pixels.device)
    g_row, g_col = _filter_rows(x, derivative), _filter_cols(x, derivative)
    if gradient == "sobel":  # smooth each derivative across its direction
        smoothing = _kernel(_SOBEL_SMOOTHING, pixels.dtype, pixels.device)
        g_row, g_col = _filter_cols(g_row, smoothing), _filter_rows(g_col, smoothing)
    return g_row.reshape(n, c, h, w), g_col.reshape(n, c, h, w)


@functools.lru_cache(maxsize=32)
def _kernel(taps: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A filter kernel on `device`, copied there once and then reused (no host-to-device copy, hence no stream
    sync, per call). Shared: never modify it in place."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(taps, dtype=dtype).to(device)


def _filter_rows(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate (N, 1, H, W) with a 3-tap kernel along rows, reflect padding."""
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="reflect"), kernel.view(1, 1, 3, 1))


def _filter_cols(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate (N, 1, H, W) with a 3-tap kernel along columns, reflect padding."""
    return F.conv2d(F.pad(x, (1, 1, 0, 0), mode="reflect"), kernel.view(1, 1, 1, 3))


def gaussian_window(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """MaskFeat's spatial weighting: a (size, size) Gaussian with std size // 2, summing to 1."""
    n = torch.arange(size, dtype=dtype, device=device)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    window = torch.outer(g, g)
    return window / window.sum()


@functools.lru_cache(maxsize=32)
def _tiled_window(size: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`gaussian_window(size)` tiled over a height x width image, computed once per shape, dtype and device.
    Shared: never modify it in place."""
    with torch.inference_mode(False), torch.no_grad():
        return gaussian_window(size, dtype, device).repeat(height // size, width // size)


def cell_histograms(
    pixels: Tensor,
    cell_size: int = HOG_CELL,
    bins: int = HOG_BINS,
    gradient: GradientKind = "sobel",
    window: int | None = None,
) -> Tensor:
    """Un-normalised orientation histograms: the summed gradient magnitude voting into each cell and bin.

    pixels: (N, C, H, W) with H, W multiples of cell_size. window: side of MaskFeat's Gaussian weighting, tiled
    over the image (None: uniform weights). Returns (N, C, bins, H / cell_size, W / cell_size).
    """
    n, c, h, w = pixels.shape
    if h % cell_size or w % cell_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the {cell_size}-pixel HOG cell")
    g_row, g_col = image_gradients(pixels, gradient)
    magnitude = torch.hypot(g_row, g_col)
    if window is not None:
        if h % window or w % window:
            raise ValueError(f"image size {h}x{w} is not a multiple of the {window}-pixel Gaussian window")
        magnitude = magnitude * _tiled_window(window, h, w, pixels.dtype, pixels.device)
    angle = torch.rad2deg(torch.atan2(g_row, g_col)).remainder(180.0)  # unsigned orientation in [0, 180)
    index = torch.floor(angle / (180.0 / bins)).long() % bins  # the modulo folds a rounded 180.0 back to bin 0
    votes = magnitude.new_zeros(n, c, bins, h, w).scatter_(2, index.unsqueeze(2), magnitude.unsqueeze(2))
    cells = F.avg_pool2d(votes.reshape(n, c * bins, h, w), cell_size, divisor_override=1)  # sum over each cell
    return cells.reshape(n, c, bins, h // cell_size, w // cell_size)


def hog_targets(
    pixels: Tensor,
    patch_size: int,
    cell_size: int = HOG_CELL,
    bins: int = HOG_BINS,
    gradient: GradientKind = "sobel",
    window: int | None = None,
) -> Tensor:
    """Per-patch HOG targets. pixels: (N, C, H, W) -> (N, L, (p / cell)^2 * C * bins).

    Each cell's histogram is L2-normalised over its bins, per channel (MaskFeat). Inside a patch the values are
    ordered (cell row, cell column, channel, bin); patches are in row-major order like `patchify`.
    """
    hog_dim(patch_size, pixels.shape[1], cell_size, bins)  # validates patch_size
    hist = F.normalize(cell_histograms(pixels, cell_size, bins, gradient, window), dim=2)
    n, c, _, hc, wc = hist.shape
    k = patch_size // cell_size
    hist = hist.reshape(n, c, bins, hc // k, k, wc // k, k)
    hist = hist.permute(0, 3, 5, 4, 6, 1, 2)  # (N, grid_h, grid_w, k, k, C, bins)
    return hist.reshape(n, (hc // k) * (wc // k), k * k * c * bins)
