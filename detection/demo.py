"""The `--demo` data and figure: a COCO-format instance-segmentation set built from scikit-image's `coins`
photograph (24 Greek coins on a dark background, shipped with the package), in the COCO 2017 layout.

Labels are derived from the image itself, not drawn by hand: scikit-image's region-based segmentation of `coins`
(Sobel elevation map, watershed from markers at intensity < 30 (background) and > 150 (coin), holes filled, regions
of 100 pixels or less dropped) gives exactly 24 regions, one per coin; each is one instance of the single category
"coin", its mask the region (RLE) and its box the region's tight box. Every fourth coin (6) is held out for
validation: the training photograph has them erased (biharmonic inpainting of the coin, grown by 3 pixels) and the
validation photograph has the 18 training coins erased, so no validation coin is ever seen in training. Each split
holds the photograph's 8 flips and quarter turns (the dihedral group), 8 images of 303x384 or 384x303 pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detection.data import split_paths
from detection.evaluation import encode_masks

CATEGORY = {"id": 1, "name": "coin", "supercategory": "coin"}
HOLD_OUT_EVERY = 4  # coins 3, 7, 11, ... (in label order) are the validation coins


def coin_labels() -> tuple[np.ndarray, np.ndarray]:
    """(the coins photograph, uint8 (303, 384); its instance map, int (303, 384): 0 background, 1..24 coins)."""
    import skimage.data
    from scipy import ndimage
    from skimage import filters, measure, segmentation

    image = skimage.data.coins()
    markers = np.zeros_like(image)
    markers[image < 30], markers[image > 150] = 1, 2
    coins = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(image), markers) == 2)
    labels = measure.label(coins)
    small = [r.label for r in measure.regionprops(labels) if r.area <= 100]
    labels[np.isin(labels, small)] = 0
    return image, measure.label(labels > 0)


def erase(image: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """`image` with the coins `ids` inpainted away (biharmonic, each coin grown by 3 pixels)."""
    from skimage import morphology, restoration

    region = morphology.dilation(np.isin(labels, ids), morphology.disk(3))
    return (restoration.inpaint_biharmonic(image, region) * 255).round().astype(np.uint8)


def dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips and quarter turns of a (H, W, ...) array."""
    return np.ascontiguousarray(np.rot90(array[:, ::-1] if k >= 4 else array, k % 4))


def annotations(labels: np.ndarray, ids: Sequence[int], image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations (RLE masks, tight boxes) of the coins `ids` in one instance map."""
    masks = torch.from_numpy(np.stack([labels == i for i in ids]))
    out = []
    for n, (mask, rle) in enumerate(zip(masks, encode_masks(masks))):
        ys, xs = np.nonzero(mask.numpy())
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        out.append({"id": first_id + n, "image_id": image_id, "category_id": CATEGORY["id"], "segmentation": rle,
                    "area": float(mask.sum()), "bbox": box, "iscrowd": 0})
    return out


def write_demo_dataset(root: str | Path) -> Path:
    """Write the coins set in the COCO 2017 layout under `root` (PNG images; the same files every time)."""
    image, labels = coin_labels()
    coins = list(range(1, labels.max() + 1))
    val = [c for c in coins if c % HOLD_OUT_EVERY == 0]
    splits = {"train": ([c for c in coins if c not in val], val), "val": (val, [c for c in coins if c not in val])}
    for split, (kept, erased) in splits.items():
        photo = erase(image, labels, erased)
        image_dir, ann_file = split_paths(root, split)
        image_dir.mkdir(parents=True, exist_ok=True)
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(8):
            name = f"coins_{split}_{k}.png"
            view, view_labels = dihedral(photo, k), dihedral(labels, k)
            Image.fromarray(view).convert("RGB").save(image_dir / name)
            images.append({"id": k + 1, "file_name": name, "height": view.shape[0], "width": view.shape[1]})
            anns += annotations(view_labels, kept, k + 1, len(anns) + 1)
        ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [CATEGORY]}))
    return Path(root)


def save_figure(path: str | Path, images: list[Tensor], predictions: list[dict[str, Tensor]], title: str = "",
                score_threshold: float = 0.5) -> None:
    """Images side by side with the detections scoring at least `score_threshold`: masks tinted, boxes drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4), squeeze=False)
    for ax, image, pred in zip(axes[0], images, predictions):
        shown = image.permute(1, 2, 0).float().numpy() / 255
        keep = pred["scores"] >= score_threshold
        for n, (box, mask) in enumerate(zip(pred["boxes"][keep], pred["masks"][keep, 0] > 0.5)):
            colour = np.array(colours(n % 20)[:3])
            shown[mask.numpy()] = 0.5 * shown[mask.numpy()] + 0.5 * colour
            x0, y0, x1, y1 = box.tolist()
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, linewidth=1.5))
        ax.imshow(shown)
        ax.set_title(f"{int(keep.sum())} detections >= {score_threshold}")
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
