"""Segmentation data in the ADEChallengeData2016 layout:

    DIR/images/training/*.jpg       DIR/annotations/training/*.png      (same file stems)
    DIR/images/validation/*.jpg     DIR/annotations/validation/*.png

ADE20K: 150 classes, annotation 0 = "other" -> ignored, k -> class k - 1 (`reduce_zero_label`, mmseg's
LoadAnnotations). Users' own data uses the same folders with `--num_classes`, reduce-zero-label on or off and an
optional class-names file. Images may be .jpg/.jpeg/.png; annotations are single-channel (or palette) PNGs of label
values.

Checked before any training: the folders, that every image has its annotation (and the reverse), and that image and
annotation sizes agree (PNG/JPEG headers only). Label values are checked as each annotation is read: a value that is
neither a class (< num_classes after reduction) nor 255 stops the run with the file named. An image that cannot be
decoded raises `util.datasets.UnreadableImageError`, which the training set replaces and counts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from segmentation.classes import ADE20K_CLASSES
from segmentation.transforms import IGNORE_INDEX
from util.datasets import unreadable_as_error

Split = Literal["training", "validation"]
SPLITS: tuple[Split, Split] = ("training", "validation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = "images/{training,validation}/*.jpg with annotations/{training,validation}/*.png"
PairTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def find_pairs(root: str | os.PathLike, split: Split) -> list[tuple[str, str]]:
    """(image, annotation) paths of `split`, sorted by stem; ValueError naming the folder or file and the fix."""
    root = Path(root)
    images_dir, labels_dir = root / "images" / split, root / "annotations" / split
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise ValueError(f"--data_path {root}: no folder {folder.relative_to(root)} (expected the "
                             f"ADEChallengeData2016 layout: {LAYOUT})")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    if not images:
        raise ValueError(f"--data_path {root}: {images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    orphans = sorted(set(images) - set(labels))
    if orphans:
        raise ValueError(f"image {images[orphans[0]]} has no annotation {labels_dir / (orphans[0] + '.png')} "
                         f"({len(orphans)} images without one): add the annotations or remove the images")
    extra = sorted(set(labels) - set(images))
    if extra:
        raise ValueError(f"annotation {labels[extra[0]]} has no image in {images_dir} ({len(extra)} such "
                         "annotations): add the images or remove the annotations")
    return [(str(images[s]), str(labels[s])) for s in sorted(images)]


def check_sizes(pairs: list[tuple[str, str]]) -> None:
    """Every image has its annotation's size (headers only). ValueError naming the first mismatch."""
    for image, label in pairs:
        with Image.open(image) as a, Image.open(label) as b:
            if a.size != b.size:
                raise ValueError(f"image {image} is {a.size[0]}x{a.size[1]} but its annotation {label} is "
                                 f"{b.size[0]}x{b.size[1]}: they must have the same size")


def check_layout(root: str | os.PathLike | None) -> None:
    """--data_path in the ADEChallengeData2016 layout, pairs complete and sizes equal in both splits."""
    if not root:
        raise ValueError(f"--data_path is required (the ADEChallengeData2016 layout: {LAYOUT}) unless --demo")
    for split in SPLITS:
        check_sizes(find_pairs(root, split))


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (other) -> 255, k -> k - 1, 255 stays 255."""
    out = label.astype(np.int32) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def class_names(num_classes: int, names_file: str | None = None, ade20k: bool = False) -> list[str]:
    """Names for the per-class table: a file with one name per line, ADE20K's (150 classes), else class_<k>."""
    if names_file:
        names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"--class_names {names_file} has {len(names)} names for --num_classes {num_classes}")
        return names
    if ade20k and num_classes == len(ADE20K_CLASSES):
        return [n.strip() for n in ADE20K_CLASSES]
    return [f"class_{k}" for k in range(num_classes)]


class SegmentationFolder(Dataset):
    """One split of a folder in the ADEChallengeData2016 layout.

    Items: transform(image uint8 (3, H, W), label uint8 (H, W) after reduce-zero-label). `samples` lists (image
    path, annotation path).
    """

    def __init__(self, root: str | os.PathLike, split: Split, transform: PairTransform, num_classes: int,
                 reduce_zero: bool = True):
        self.samples = find_pairs(root, split)
        self.transform, self.num_classes, self.reduce_zero = transform, num_classes, reduce_zero

    def __len__(self) -> int:
        return len(self.samples)

    def stem(self, index: int) -> str:
        return Path(self.samples[index][0]).stem

    def read(self, index: int) -> tuple[Tensor, Tensor]:
        """The image (uint8 RGB, (3, H, W)) and its checked label map (uint8, (H, W), after reduce-zero-label)."""
        image_path, label_path = self.samples[index]
        with unreadable_as_error(image_path):
            with Image.open(image_path) as img:
                image = np.asarray(img.convert("RGB"))
        with unreadable_as_error(label_path):
            with Image.open(label_path) as lab:
                label = np.asarray(lab)
        if label.ndim != 2:
            raise ValueError(f"annotation {label_path} has {label.shape[-1]} channels: save one label value per pixel "
                             "(mode L or P PNG)")
        if label.shape != image.shape[:2]:
            raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its annotation "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        if self.reduce_zero:
            label = reduce_zero_label(label)
        self.check_values(label, label_path)
        return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(label.copy())

    def check_values(self, label: np.ndarray, path: str) -> None:
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
        if len(bad):
            shift = " after reduce-zero-label (k -> k - 1)" if self.reduce_zero else ""
            raise ValueError(f"annotation {path} holds label values {[int(v) for v in bad[:5]]}{shift}, not below "
                             f"--num_classes {self.num_classes} nor 255 (ignored): give the right --num_classes, or "
                             "--no_reduce_zero_label if 0 is a class")

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(*self.read(index))


class Indexed(Dataset):
    """Items of `dataset` with their index appended (evaluation names each prediction after its image)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index], index)
