"""Classification data: MAE's fine-tuning and linear-probing transforms, ImageFolder train/val sets, the built-in
labelled demo set (scikit-learn's handwritten digits, upsampled to RGB at the model's input size), and the datasets
and loaders of a fine-tuning or linear-probing run.

Transforms return float tensors normalised with ImageNet's mean/std (Mixup/CutMix and random erasing work on
normalised images, as in MAE).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util import distributed
from util.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GuardedLoader,
    ResumableDistributedSampler,
    RobustSeededDataset,
    check_image_folder,
    ignore_stop_signals,
)

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")
Transform = Callable[[Image.Image], Tensor]

DIGITS_VAL_FRACTION = 0.2  # fixed held-out share of the 1797 digits
DIGITS_SPLIT_SEED = 0


def eval_transform(input_size: int, resize_size: int | None = None) -> Transform:
    """MAE's evaluation transform: resize the short side to input/0.875 (bicubic), centre crop, normalise.

    Above 224 px MAE resizes straight to the input size (crop_pct 1). `resize_size` replaces the short-side size
    (the analysis tools' fixed view rounds input/0.875 at every size, see `analysis.images.eval_transform`)."""
    if resize_size is None:
        resize_size = int(input_size / (224 / 256 if input_size <= 224 else 1.0))
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def finetune_transform(
    is_train: bool,
    input_size: int,
    aa: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float | None = None,
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Transform:
    """MAE's fine-tuning augmentation (paper Appendix A: RandAugment, random erasing) through timm's
    `create_transform`: RandomResizedCrop (bicubic, area fraction in `scale`), flip, RandAugment `aa` ('none':
    off), random erasing; eval: `eval_transform`."""
    if not is_train:
        return eval_transform(input_size)
    aa = None if aa in (None, "", "none") else aa
    transform = create_transform(
        input_size=input_size, is_training=True, color_jitter=color_jitter, auto_augment=aa, interpolation="bicubic",
        re_prob=reprob, re_mode=remode, re_count=recount, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=scale,
    )
    return keep_zero_bit_posterize(transform)


def keep_zero_bit_posterize(transform: transforms.Compose) -> transforms.Compose:
    """Route RandAugment's posterize through `posterize_zero_bits_black` (see there)."""
    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is timm_posterize:
                    op.aug_fn = posterize_zero_bits_black
    return transform


def posterize_zero_bits_black(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, keeping 0 bits -> a black image.

    RandAugment's increasing posterize ('inc1') keeps 4 - int(4 m / 10) bits, so 0 bits whenever the sampled
    magnitude reaches 10 (about 2% of draws with m9-mstd0.5). Pillow < 13 returned a black image there (MAE was
    trained that way); Pillow 13 raises ValueError, which would stop training at random.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def linprobe_transform(is_train: bool, input_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> Transform:
    """MAE's linear-probing augmentation: RandomResizedCrop (bicubic) + horizontal flip only; eval as fine-tuning."""
    if not is_train:
        return eval_transform(input_size)
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_classification_folders(data_path: str | os.PathLike | None) -> None:
    """Raise ValueError naming --data_path unless it holds ImageFolder roots `train/` and `val/` with images, in the
    same class folders (the labels are the folders' sorted order)."""
    if not data_path:
        raise ValueError("--data_path is required (a folder with train/ and val/ ImageFolder roots) unless --demo")
    classes = {}
    for split in SPLITS:
        folder = Path(data_path) / split
        if not folder.is_dir():
            raise ValueError(f"--data_path {data_path} has no '{split}' folder (expected {'/, '.join(SPLITS)}/)")
        classes[split] = check_image_folder(folder)
    if classes["train"] != classes["val"]:
        only = {split: sorted(set(classes[split]) - set(classes[other]))
                for split, other in (("train", "val"), ("val", "train"))}
        shown = "; ".join(f"only in {split}/: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                          for split, names in only.items() if names)
        raise ValueError(f"--data_path {data_path}: train/ and val/ have different class folders ({shown}); "
                         "label i is the i-th folder name, so both need the same ones")


def build_image_folder(data_path: str | os.PathLike, split: Split, transform: Transform) -> datasets.ImageFolder:
    """ImageFolder over `data_path/split` (class = sub-folder name, sorted).

    A file that cannot be read or decoded raises `util.datasets.UnreadableImageError` naming it (what
    `RobustSeededDataset` replaces and counts); errors of `transform` propagate as they are."""
    return datasets.ImageFolder(str(Path(data_path) / split), transform=transform,
                                loader=GuardedLoader(datasets.folder.default_loader))


class DigitsDemo(Dataset):
    """scikit-learn's 8x8 handwritten digits (1797 real scans, 10 classes, shipped with the package) as RGB PIL
    images upsampled (bicubic) to `input_size`, with a fixed random train/val split (seed 0, 20% val).

    Items: (transform(image), label in 0..9).
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: Split, input_size: int, transform: Transform | None = None):
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        digits = load_digits()
        order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(digits.target))
        n_val = int(len(order) * DIGITS_VAL_FRACTION)
        self.indices = order[:n_val] if split == "val" else order[n_val:]  # rows of load_digits()
        index = self.indices
        self.images = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)  # (n, 8, 8), 0..16 -> 0..255
        self.targets = digits.target[index].astype(np.int64)
        self.input_size = input_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        gray = Image.fromarray(self.images[index]).resize((self.input_size, self.input_size), Image.BICUBIC)
        return gray.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Tensor | Image.Image, int]:
        image = self.image(index)
        return (self.transform(image) if self.transform else image), int(self.targets[index])


# --------------------------------------------------------------------------------------------------------------
# The datasets and loaders of a fine-tuning or linear-probing run
# --------------------------------------------------------------------------------------------------------------


def build_datasets(
    args: argparse.Namespace, train_transform: Callable, val_transform: Callable
) -> tuple[RobustSeededDataset, Dataset]:
    """ImageFolder train/val under --data_path, or the digits demo; checks the classes against --nb_classes.

    The training set draws each sample's augmentation from (--seed, epoch, index), so a resumed run (any worker
    count) sees the same images, and replaces unreadable images (counted, see --max_bad_images)."""
    if args.demo:
        train = DigitsDemo("train", args.input_size, train_transform)
        val = DigitsDemo("val", args.input_size, val_transform)
    else:
        train = build_image_folder(args.data_path, "train", train_transform)  # same classes: checked before
        val = build_image_folder(args.data_path, "val", val_transform)
    check_num_classes(args, len(train.classes))
    if not args.eval and len(train) < args.batch_size * distributed.get_world_size():
        raise ValueError(f"--batch_size {args.batch_size} x {distributed.get_world_size()} ranks exceeds the "
                         f"{len(train)} training images (the last incomplete batch is dropped)")
    return RobustSeededDataset(train, args.seed), val


def check_num_classes(args: argparse.Namespace, found: int) -> None:
    """--nb_classes from the training folders when not given; a given value that is smaller than the folders' count
    stops the run, a larger one (a subset of a bigger label set) is allowed with a warning."""
    if args.nb_classes is None:
        args.nb_classes = found
        logger.info("--nb_classes %d: the class folders of the training set", found)
    elif found > args.nb_classes:
        raise ValueError(f"--nb_classes {args.nb_classes} is smaller than the {found} classes found in the training "
                         "set; leave --nb_classes out to take it from the folders")
    elif found < args.nb_classes:
        logger.warning("--nb_classes %d but the training set has %d class folders: %d logits never see a positive "
                       "example (leave --nb_classes out to take it from the folders)", args.nb_classes, found,
                       args.nb_classes - found)


def build_loaders(args: argparse.Namespace, train: Dataset, val: Dataset) -> tuple[DataLoader, DataLoader, int | None]:
    """Loaders (train: shuffled per (--seed, epoch), can start mid-epoch, incomplete batch dropped; val: in order)
    and this rank's real val count. Also fills --max_bad_images (default 1 % of this rank's epoch)."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    train_sampler = ResumableDistributedSampler(train, args.batch_size, num_replicas=world, rank=rank, shuffle=True,
                                                seed=args.seed, drop_last=True)
    if args.max_bad_images is None:
        args.max_bad_images = max(1, len(train_sampler) // 100)
    num_real = None
    if args.dist_eval and world > 1:
        val_sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False)
        num_real = real_samples_on_rank(val_sampler)
    else:
        val_sampler = SequentialSampler(val)
    # Workers ignore stop signals (the main process saves, then shuts them down). Workers persist across epochs
    # (training: the epoch travels with the sampler's indices; validation reads fixed images), so neither loader
    # forks its workers again every epoch. Own generators leave the global RNG to the model.
    common = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith("cuda"),
                  worker_init_fn=ignore_stop_signals, persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train, sampler=train_sampler, batch_size=args.batch_size, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **common)
    val_loader = DataLoader(val, sampler=val_sampler, batch_size=args.batch_size, drop_last=False,
                            generator=torch.Generator().manual_seed(args.seed), **common)
    return train_loader, val_loader, num_real


def real_samples_on_rank(sampler: DistributedSampler) -> int:
    """How many of this rank's samples are real rather than DistributedSampler's padding.

    With drop_last=False the sampler repeats the first samples until the list divides by the number of ranks;
    rank r takes positions r, r + W, r + 2W, ... of that list, so its padded samples are its last ones: those at
    positions >= len(dataset).
    """
    if sampler.drop_last:
        raise ValueError("evaluation needs DistributedSampler(drop_last=False): dropping samples changes accuracy")
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]
