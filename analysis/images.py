"""The images the analyses are measured on: a fixed, ordered set of evaluation images (an ImageFolder or crops of
scikit-image's photographs) and the masking noise that gives every model the same masks."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets

from util import cls_data
from util.cls_data import Transform
from util.datasets import demo_photos

logger = logging.getLogger(__name__)

EVAL_CROP_RATIO = 224 / 256  # MAE's evaluation transform: resize to 256, center-crop 224


def eval_transform(input_size: int) -> Transform:
    """Fixed evaluation view: `util.cls_data.eval_transform` (bicubic resize of the short side, center crop, ImageNet
    normalisation) with the short side at round(input_size / 0.875) at every size. Returns float (3, input_size,
    input_size). Fine-tuning truncates that size instead, and resizes straight to input_size above 224 px (96 px:
    109 there, 110 here); the analyses keep their own rounding so that their images, and numbers, stay as they were."""
    return cls_data.eval_transform(input_size, resize_size=int(round(input_size / EVAL_CROP_RATIO)))


class DemoCrops(Dataset):
    """Deterministic crops of the photographs scikit-image ships (`util.datasets.demo_photos`).

    Image i comes from photo i mod P (P photos); the first P images are the evaluation view of each photo, later
    ones square crops of 25-100 % of the short side at positions drawn from a generator seeded by (seed, i).
    """

    def __init__(self, input_size: int, num_images: int, seed: int = 0):
        self.photos = demo_photos()
        self.num_images, self.seed = num_images, seed
        self.transform = eval_transform(input_size)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = index % len(self.photos)
        photo = self.photos[label]
        if index >= len(self.photos):
            photo = self._random_square(photo, np.random.default_rng((self.seed, index)))
        return self.transform(photo), label

    @staticmethod
    def _random_square(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
        side = int(min(photo.size) * np.sqrt(rng.uniform(0.25, 1.0)))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        return photo.crop((left, top, left + side, top + side))


def evenly_spaced(dataset: Dataset, num_images: int) -> Dataset:
    """`num_images` images evenly spaced over `dataset` (all of it when it holds no more); the spacing is >= 1, so
    there are no repeats, and on a sorted ImageFolder every class is covered."""
    if num_images >= len(dataset):
        return dataset
    return Subset(dataset, torch.linspace(0, len(dataset) - 1, num_images).round().long().tolist())


def build_image_dataset(data_path: str | None, num_images: int, input_size: int, seed: int = 0) -> Dataset:
    """A fixed set of `num_images` evaluation images: evenly spaced over the ImageFolder at `data_path` (its `val/`
    subfolder when there is one), or demo crops when data_path is None. Fewer when the folder holds fewer."""
    if data_path is None:
        return DemoCrops(input_size, num_images, seed)
    root = Path(data_path) / "val" if (Path(data_path) / "val").is_dir() else Path(data_path)
    dataset = datasets.ImageFolder(str(root), transform=eval_transform(input_size))
    if num_images > len(dataset):
        logger.info("%s holds %d images (< --num_images %d): using all", root, len(dataset), num_images)
    return evenly_spaced(dataset, num_images)


def build_labelled_splits(data_path: str | None, num_train: int, num_val: int, input_size: int,
                          seed: int = 0) -> tuple[Dataset, Dataset]:
    """Training and validation images with labels, for probes: `num_train` / `num_val` images evenly spaced over
    `data_path`/train and `data_path`/val (ImageFolders), or with data_path None demo crops labelled by photograph
    (`DemoCrops`): the first `num_train` crops for training, the next `num_val` for validation."""
    if data_path is None:
        crops = DemoCrops(input_size, num_train + num_val, seed)
        return Subset(crops, range(num_train)), Subset(crops, range(num_train, num_train + num_val))
    return tuple(evenly_spaced(datasets.ImageFolder(str(Path(data_path) / split), transform=eval_transform(input_size)),
                               n) for split, n in (("train", num_train), ("val", num_val)))


def labels_of(dataset: Dataset) -> list[int]:
    """The label of every image of an ImageFolder, DemoCrops or a Subset of either, without reading an image."""
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, DemoCrops):
        return [i % len(dataset.photos) for i in range(len(dataset))]
    return list(dataset.targets)


def make_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """DataLoader over `dataset` in a fixed order with the `add_common_args` flags (batch size, workers, device)."""
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                      pin_memory=torch.device(args.device).type == "cuda")


def build_image_loader(args: argparse.Namespace, input_size: int) -> DataLoader:
    """DataLoader over `build_image_dataset` for the flags of `add_common_args`, in a fixed order."""
    return make_loader(build_image_dataset(args.data_path, args.num_images, input_size, args.seed), args)


def mask_noise(num_images: int, num_patches: int, seed: int) -> Tensor:
    """(num_images, num_patches) masking noise from a generator seeded by `seed`: row i masks image i the same way
    whatever the batch size, and every model with the same patch grid sees the same masks."""
    return torch.rand(num_images, num_patches, generator=torch.Generator().manual_seed(seed))
