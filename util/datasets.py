"""Pre-training data: MAE's augmentation (RandomResizedCrop 0.2-1, bicubic, flip), uint8 batches normalised on
the device, ImageFolder datasets and the built-in demo set of real photographs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Real colour photographs shipped inside scikit-image (no download needed).
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "cat",
               "colorwheel")


def pretrain_transform(input_size: int) -> transforms.Compose:
    """MAE's pre-training augmentation (paper Appendix A: random resized crop + horizontal flip).

    Returns uint8 (3, H, W) tensors: normalisation happens on the device (`normalize_on_device`), which keeps the
    loader's work and the host-to-device copy 4x smaller than float32.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def normalize_on_device(images: Tensor, device: torch.device | str, non_blocking: bool = True) -> Tensor:
    """uint8 (N, 3, H, W) on the host -> float32 ImageNet-normalised on `device`."""
    images = images.to(device, non_blocking=non_blocking).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def denormalize(images: Tensor) -> Tensor:
    """ImageNet-normalised (N, 3, H, W) -> [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def check_image_folder(path: str | os.PathLike) -> None:
    """Raise ValueError naming the path unless it is an ImageFolder root with at least one image."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--data_path {path} is not a folder")
    for _, _, files in os.walk(path):
        if any(f.lower().endswith(datasets.folder.IMG_EXTENSIONS) for f in files):
            return
    raise ValueError(f"--data_path {path} holds no images ({', '.join(datasets.folder.IMG_EXTENSIONS)})")


def build_pretrain_dataset(data_path: str, input_size: int) -> Dataset:
    """ImageFolder over `data_path` (or `data_path/train` when it exists), MAE's transform."""
    root = Path(data_path) / "train" if (Path(data_path) / "train").is_dir() else Path(data_path)
    return datasets.ImageFolder(str(root), transform=pretrain_transform(input_size))


def demo_photos() -> list[Image.Image]:
    """The colour photographs scikit-image ships, as RGB PIL images."""
    import skimage.data

    return [Image.fromarray(np.asarray(getattr(skimage.data, name)())[..., :3]) for name in DEMO_PHOTOS]


class DemoPhotos(Dataset):
    """A small real-image set for the demo and tests: `samples_per_photo` augmented crops of each photograph."""

    def __init__(self, input_size: int, samples_per_photo: int = 64):
        self.photos = demo_photos()
        self.samples_per_photo = samples_per_photo
        self.transform = pretrain_transform(input_size)

    def __len__(self) -> int:
        return len(self.photos) * self.samples_per_photo

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        photo = index % len(self.photos)
        return self.transform(self.photos[photo]), photo


# ------------------------------------------------------------------------------------------------------------------
# Reproducible, fault-tolerant sampling (exact resume, broken files)
# ------------------------------------------------------------------------------------------------------------------

# What PIL and torchvision raise for unreadable, truncated or non-image files (torchvision's JPEG decoder raises
# RuntimeError). A systematic failure still stops the run through --max_bad_images.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)


class RobustSeededDataset(Dataset):
    """Wraps a dataset so that (1) each sample's augmentation is drawn from a generator seeded by (seed, epoch,
    index) — the same crops whatever the worker count or the point a run resumed from — and (2) an unreadable
    image is replaced by another sample, logged with its path and counted.

    Items are (image, label, bad) where bad is the number of broken files skipped to produce this item.
    """

    def __init__(self, dataset: Dataset, seed: int, max_retries: int = 20):
        self.dataset, self.seed, self.epoch, self.max_retries = dataset, seed, 0, max_retries

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _path(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[index][0] if samples is not None else f"item {index}"

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        length = len(self)
        for bad in range(self.max_retries + 1):
            candidate = (index + bad * 7919) % length  # a deterministic replacement (7919 is prime)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch) * length + candidate)
                try:
                    image, label = self.dataset[candidate]
                    return image, label, bad
                except BAD_IMAGE_ERRORS as err:
                    logger.warning("skipping unreadable image %s (%s: %s)", self._path(candidate),
                                   type(err).__name__, err)
        raise RuntimeError(f"{self.max_retries + 1} unreadable images in a row around index {index}; "
                           "is --data_path the right folder?")


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (after `start_step` batches of this rank)."""

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_step = batch_size, 0

    def set_start_step(self, step: int) -> None:
        """Skip the first `step` batches of the next epoch iterated (reset to 0 after one epoch)."""
        self.start_step = step

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.start_step = self.start_step * self.batch_size, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        return self.num_samples - self.start_step * self.batch_size
