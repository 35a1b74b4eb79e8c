"""The `--demo` data and figure: mosaics of scikit-image's texture photographs, in the ADEChallengeData2016 layout.

Each image is a Voronoi mosaic of 3-6 regions around random seeds; every region shows a random crop of one of four
real texture photographs shipped with scikit-image (brick, grass, gravel, and the lunar surface of `moon`), and its
label is that texture. The labels therefore come from the images themselves (which photograph each pixel was cut
from) and are learnable from local appearance. Pixels within one pixel of a region border are annotated 0 ("other"),
so with reduce-zero-label (as for ADE20K) textures k = 1..4 become classes 0..3 and borders are ignored (255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from util.datasets import sample_images

TEXTURES = ("brick", "grass", "gravel", "moon")
DEMO_SIZE = (96, 128)  # (height, width) of every demo image


def mosaic(textures: list[np.ndarray], rng: np.random.Generator, size: tuple[int, int] = DEMO_SIZE
           ) -> tuple[np.ndarray, np.ndarray]:
    """One mosaic: (RGB uint8 (H, W, 3), annotation uint8 (H, W) with 0 on borders and texture k + 1 inside)."""
    height, width = size
    seeds = rng.uniform((0, 0), (height, width), size=(int(rng.integers(3, 7)), 2))
    ys, xs = np.mgrid[0:height, 0:width]
    region = ((ys[..., None] - seeds[:, 0]) ** 2 + (xs[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    kinds = rng.integers(0, len(textures), size=len(seeds))
    image = np.zeros((height, width, 3), np.uint8)
    label = np.zeros((height, width), np.uint8)
    for r, kind in enumerate(kinds):
        texture = textures[kind]
        top = int(rng.integers(0, texture.shape[0] - height))
        left = int(rng.integers(0, texture.shape[1] - width))
        inside = region == r
        image[inside] = texture[top:top + height, left:left + width][inside]
        label[inside] = kind + 1
    border = np.zeros_like(inside)
    border[:-1] |= region[:-1] != region[1:]
    border[:, :-1] |= region[:, :-1] != region[:, 1:]
    label[border] = 0
    return image, label


def write_demo_dataset(root: str | Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> Path:
    """Write the mosaics in the ADEChallengeData2016 layout under `root` (JPEG images, PNG annotations); the same
    files for the same seed. Returns root."""
    root = Path(root)
    textures = [np.asarray(img) for img in sample_images(TEXTURES)]
    rng = np.random.default_rng(seed)
    for split, count in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = mosaic(textures, rng)
            Image.fromarray(image).save(root / "images" / split / f"mosaic_{split}_{i:04d}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / split / f"mosaic_{split}_{i:04d}.png")
    return root


def save_figure(path: str | Path, images: list[Tensor], labels: list[Tensor], preds: list[Tensor],
                num_classes: int, title: str = "") -> None:
    """Rows of image / ground truth / prediction (label maps after reduce-zero-label; 255 left blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 2.4 * len(images)), squeeze=False)
    for row, (image, label, pred) in enumerate(zip(images, labels, preds)):
        for col, (data, name) in enumerate(((image, "image"), (label, "ground truth"), (pred, "prediction"))):
            ax = axes[row, col]
            if col == 0:
                ax.imshow(data.permute(1, 2, 0).numpy())
            else:
                shown = np.ma.masked_equal(data.numpy(), 255)
                ax.set_facecolor("black")
                ax.imshow(shown, cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1), interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
