"""The released ADE20K pipelines (DeepMIM's `Segmentation/configs/_base_/datasets/ade20k.py`, mmseg 0.11's
transforms), on uint8 tensors with torchvision.transforms.v2 (`tv_tensors.Mask` keeps labels on nearest resampling).

Training: Resize to scale (2048, 512) x a ratio drawn in [0.5, 2.0], keeping the aspect; random 512 crop where no
class covers 75 % or more of the crop's labelled pixels (`cat_max_ratio`, up to 10 re-draws); horizontal flip with
probability 0.5; PhotoMetricDistortion (brightness +-32, contrast and saturation x [0.5, 1.5], hue +-18 of 180, each
with probability 0.5, contrast before or after the colour changes); ImageNet normalisation; padding to 512 (image 0
after normalisation, label 255). Test: resize to scale (2048, 512) keeping the aspect, normalise.

Random draws use torch's default generator, which `util.datasets.RobustSeededDataset` seeds per (seed, data epoch,
sample): the same crops in any worker and after any resume. Labels are only ever resampled with nearest.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from util.datasets import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = 255
MEAN_255 = tuple(m * 255 for m in IMAGENET_MEAN)  # mmseg's img_norm_cfg: 123.675, 116.28, 103.53
STD_255 = tuple(s * 255 for s in IMAGENET_STD)  # 58.395, 57.12, 57.375


def uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def randint(low: int, high: int) -> int:
    """An integer in [low, high) (numpy's randint convention, as mmseg draws)."""
    return int(torch.randint(low, high, ()))


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `imrescale`: the largest size with the aspect kept whose long edge <= max(scale) and short edge <=
    min(scale); returns (height, width) rounded as mmcv does."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: Tensor, label: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Bilinear for the image (no antialiasing, as OpenCV's INTER_LINEAR), nearest for the label."""
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
    if label is not None:
        label = TF.resize(tv_tensors.Mask(label), list(size), interpolation=InterpolationMode.NEAREST)
    return image, label


def random_rescale(image: Tensor, label: Tensor, scale: tuple[int, int],
                   ratio_range: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """mmseg's `Resize(img_scale, ratio_range)`: scale x a ratio uniform in ratio_range, then `rescale_size`."""
    ratio = uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize(image, label, rescale_size(*image.shape[-2:], target))


def crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """A random (top, left, height, width) crop of at most size x size inside the image."""
    top, left = randint(0, max(height - size, 0) + 1), randint(0, max(width - size, 0) + 1)
    return top, left, min(size, height), min(size, width)


def dominant_share(label: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[int, float]:
    """(number of classes, largest class's share of the labelled pixels) of a label map."""
    _, counts = torch.unique(label[label != ignore_index], return_counts=True)
    return len(counts), (float(counts.max()) / float(counts.sum()) if len(counts) else 1.0)


def random_crop(image: Tensor, label: Tensor, size: int, cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE_INDEX, tries: int = 10) -> tuple[Tensor, Tensor]:
    """mmseg's `RandomCrop(crop_size, cat_max_ratio)`: re-draw the crop (up to `tries` times) while it holds a single
    class or one class covers `cat_max_ratio` or more of its labelled pixels; the last draw is kept."""
    height, width = image.shape[-2:]
    box = crop_box(height, width, size)
    if cat_max_ratio < 1:
        for _ in range(tries):
            classes, share = dominant_share(TF.crop(label, *box), ignore_index)
            if classes > 1 and share < cat_max_ratio:
                break
            box = crop_box(height, width, size)
    return TF.crop(image, *box), TF.crop(label, *box)


def adjust_hsv_saturation(image: Tensor, alpha: float) -> Tensor:
    """HSV saturation x alpha (clipped at 1), value and hue kept: each channel c becomes V - (V - c) alpha', with
    alpha' = min(alpha, 1 / S) per pixel (mmseg scales the S channel of OpenCV's HSV). uint8 in, uint8 out."""
    x = image.float()
    value = x.amax(dim=0, keepdim=True)
    spread = value - x.amin(dim=0, keepdim=True)
    limit = torch.where(spread > 0, value / spread.clamp_min(1e-6), torch.full_like(value, float("inf")))
    x = value - (value - x) * torch.minimum(torch.full_like(value, alpha), limit)
    return x.clamp(0, 255).to(torch.uint8)


def photometric_distortion(image: Tensor, brightness_delta: int = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> Tensor:
    """mmseg's PhotoMetricDistortion on a uint8 (3, H, W) RGB image: each step applies with probability 1/2 and
    saturates to uint8 (truncating, as numpy's astype)."""
    def affine(x: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)

    if randint(0, 2):
        image = affine(image, beta=uniform(-brightness_delta, brightness_delta))
    contrast_first = randint(0, 2) == 1
    if contrast_first and randint(0, 2):
        image = affine(image, alpha=uniform(*contrast))
    if randint(0, 2):
        image = adjust_hsv_saturation(image, uniform(*saturation))
    if randint(0, 2):
        image = TF.adjust_hue(image, randint(-hue_delta, hue_delta) / 180)
    if not contrast_first and randint(0, 2):
        image = affine(image, alpha=uniform(*contrast))
    return image


def normalize(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float32 normalised with ImageNet's mean / std (in 0..255 units, mmseg's img_norm_cfg)."""
    mean = torch.tensor(MEAN_255).view(3, 1, 1)
    std = torch.tensor(STD_255).view(3, 1, 1)
    return (image.float() - mean) / std


def pad_to(image: Tensor, label: Tensor, size: int, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Pad bottom / right to size x size: the (normalised) image with 0, the label with `ignore_index`."""
    bottom, right = size - image.shape[-2], size - image.shape[-1]
    if bottom <= 0 and right <= 0:
        return image, label
    padding = [0, 0, max(right, 0), max(bottom, 0)]
    return TF.pad(image, padding, fill=0), TF.pad(label, padding, fill=ignore_index)


class TrainTransform:
    """The released training pipeline (module docstring). (image uint8 (3, H, W), label uint8 (H, W)) -> (image
    float32 (3, crop, crop) normalised, label int64 (crop, crop)). `photometric=False` and `normalise=False` leave
    those steps out (tests of geometric alignment)."""

    def __init__(self, crop_size: int = 512, scale: tuple[int, int] = (2048, 512),
                 ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, normalise: bool = True):
        self.crop_size, self.scale, self.ratio_range = crop_size, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob = cat_max_ratio, flip_prob
        self.photometric, self.normalise = photometric, normalise

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        image, label = random_rescale(image, label, self.scale, self.ratio_range)
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio)
        if float(torch.rand(())) < self.flip_prob:
            image, label = TF.horizontal_flip(image), TF.horizontal_flip(label)
        if self.photometric:
            image = photometric_distortion(image)
        if self.normalise:
            image = normalize(image)
        image, label = pad_to(image, label, self.crop_size)
        return image, label.as_subclass(Tensor).long()


class TestTransform:
    """Single-scale testing: resize to `scale` keeping the aspect (mmseg's test pipeline), normalise. The label
    stays at its original size: predictions are resized back to it."""

    def __init__(self, scale: tuple[int, int] = (2048, 512)):
        self.scale = tuple(scale)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        image, _ = resize(image, None, rescale_size(*image.shape[-2:], self.scale))
        return normalize(image), label.long()
