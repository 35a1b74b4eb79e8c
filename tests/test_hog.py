"""HOG targets against scikit-image as an independent reference (same cells, bins and gradient conventions)."""

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import torch
from skimage.feature import hog
from skimage.feature._hoghistogram import hog_histograms  # skimage's own cell histograms, before normalisation

from targets.hog import cell_histograms, gaussian_window, hog_dim, hog_targets

RTOL = 1e-4


def skimage_cells(g_row: np.ndarray, g_col: np.ndarray, cell: int = 8, bins: int = 9) -> np.ndarray:
    """skimage's un-normalised (mean-per-cell) orientation histograms of one channel: (rows, cols, bins)."""
    h, w = g_row.shape
    out = np.zeros((h // cell, w // cell, bins))
    hog_histograms(np.ascontiguousarray(g_col), np.ascontiguousarray(g_row), cell, cell, w, h, w // cell, h // cell,
                   bins, out)
    return out


def skimage_central_gradients(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """skimage.feature.hog's gradient: [-1, 0, 1] differences, zero on the border."""
    g_row, g_col = np.zeros_like(channel), np.zeros_like(channel)
    g_row[1:-1] = channel[2:] - channel[:-2]
    g_col[:, 1:-1] = channel[:, 2:] - channel[:, :-2]
    return g_row, g_col


def reference(images: np.ndarray, gradients, weight: np.ndarray | None = None) -> np.ndarray:
    """Per image and channel (skimage picks the strongest channel; MaskFeat keeps all three): (N, C, bins, hc, wc)
    as sums over each 8x8 cell."""
    out = []
    for image in images:
        per_channel = []
        for channel in image:
            g_row, g_col = gradients(channel)
            if weight is not None:  # scaling both components scales the magnitude and keeps the angle
                g_row, g_col = g_row * weight, g_col * weight
            per_channel.append(skimage_cells(g_row, g_col).transpose(2, 0, 1) * 64)
        out.append(per_channel)
    return np.asarray(out)


def assert_relative(ours: torch.Tensor, ref: np.ndarray) -> None:
    ours = ours.numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


@pytest.fixture(params=["random", "photo"])
def images(request) -> np.ndarray:
    """(2, 3, 32, 48) float64: uniform noise, or crops of a real 8-bit photo kept as integers 0..255 (as `HogTarget`
    feeds it): flat areas give gradients exactly on a bin edge, and integer arithmetic is exact in both codes."""
    if request.param == "random":
        return np.random.default_rng(0).random((2, 3, 32, 48))
    photo = skimage.data.astronaut().transpose(2, 0, 1).astype(np.float64)
    return np.stack([photo[:, 100:132, 150:198], photo[:, 0:32, 0:48]])


def test_central_gradient_cells_match_skimage(images):
    ours = cell_histograms(torch.from_numpy(images), gradient="central")
    assert_relative(ours, reference(images, skimage_central_gradients))


def test_sobel_cells_with_gaussian_window_match_scipy_gradients_and_skimage_binning(images):
    """The default recipe (MaskFeat): Sobel gradients with reflect padding, Gaussian-weighted magnitudes."""

    def sobel(channel):  # scipy's 'mirror' is torch's 'reflect' (the border pixel is not repeated)
        return scipy.ndimage.sobel(channel, axis=0, mode="mirror"), scipy.ndimage.sobel(channel, axis=1, mode="mirror")

    n = np.arange(16) - 7.5
    g = np.exp(-0.5 * (n / 8) ** 2)
    window = np.outer(g, g) / np.outer(g, g).sum()
    weight = np.tile(window, (32 // 16, 48 // 16))
    ours = cell_histograms(torch.from_numpy(images), gradient="sobel", window=16)
    assert_relative(ours, reference(images, sobel, weight))
    np.testing.assert_allclose(gaussian_window(16, torch.float64).numpy(), window, rtol=1e-12)


def test_normalised_cells_match_skimage_l2_blocks_of_one_cell(images):
    """After normalisation: skimage.feature.hog with 1x1-cell L2 blocks on each channel."""
    ours = hog_targets(torch.from_numpy(images), patch_size=8, gradient="central")  # patch 8 = one cell
    for n in range(images.shape[0]):
        for c in range(3):
            ref = hog(images[n, c], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(1, 1), block_norm="L2",
                      feature_vector=False)[:, :, 0, 0]  # (rows, cols, 9)
            np.testing.assert_allclose(ours[n].reshape(4, 6, 3, 9)[:, :, c].numpy(), ref, rtol=RTOL, atol=1e-8)


def test_patch_layout_concatenates_cells_channels_bins():
    images = torch.rand(2, 3, 32, 32)
    targets = hog_targets(images, patch_size=16)
    assert targets.shape == (2, 4, 108) == (2, 4, hog_dim(16))
    cells = torch.nn.functional.normalize(cell_histograms(images), dim=2)  # (2, 3, 9, 4, 4)
    # patch 3 is grid (1, 1); its cell (0, 1) is cell (2, 3) of the image; layout (cell row, cell col, channel, bin)
    torch.testing.assert_close(targets[:, 3].reshape(2, 2, 2, 3, 9)[:, 0, 1], cells[:, :, :, 2, 3])
    norms = targets.reshape(2, 4, 4, 3, 9).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="multiple of the 8-pixel cell"):
        hog_dim(14)
    with pytest.raises(ValueError, match="not a multiple"):
        cell_histograms(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="gradient must be"):
        cell_histograms(torch.rand(1, 3, 16, 16), gradient="prewitt")


def test_filter_kernels_and_window_are_made_once_per_device_and_dtype():
    """No per-call host-to-device copy (a stream sync on a GPU): constants are cached, results unchanged."""
    from targets import hog as hog_module

    pixels = torch.rand(2, 3, 32, 32) * 255
    first = hog_targets(pixels, 16, window=16)
    misses = hog_module._kernel.cache_info().misses, hog_module._tiled_window.cache_info().misses
    with torch.inference_mode():
        again = hog_targets(pixels, 16, window=16)
    assert (hog_module._kernel.cache_info().misses, hog_module._tiled_window.cache_info().misses) == misses
    assert torch.equal(first, again)
    tiled = hog_module._tiled_window(16, 32, 32, torch.float32, torch.device("cpu"))
    assert torch.equal(tiled, gaussian_window(16).repeat(2, 2)) and not tiled.is_inference()
