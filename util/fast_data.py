"""The fast pre-training data path (issue 6): MAE's augmentation with less work per image.

The reference (MAE's released code) decodes every JPEG at full size with PIL, crop-resizes with PIL's bicubic
filter, and converts to a normalised float32 tensor in the loader. Here, for the same crop distribution:

1. The crop box and flip are drawn exactly as torchvision's `RandomResizedCrop(scale=(0.2, 1))` followed by
   `RandomHorizontalFlip()` draw them (same calls on the same torch RNG), from the JPEG header alone.
2. The JPEG is decoded at 1/s of its size, s in {4, 8} (PIL's `Image.draft`, libjpeg's scaled IDCT; 2 on request),
   only when the crop is downscaled by at least s on both axes, so the decoded crop still has at least as many
   pixels as the output.
3. Otherwise torchvision's libjpeg-turbo decoder writes the pixels straight into a uint8 tensor (channels-last),
   and crop and bicubic antialiased resize run on that tensor (torchvision's vectorised uint8 kernel, fastest on
   the channels-last layout). After a reduced decode the box is fractional on the reduced grid, and PIL's resize,
   which takes a fractional box, does it instead. The flip follows.
4. The loader returns uint8 (3, H, W); `util.datasets.normalize_on_device` normalises on the device (4x less to
   collate and copy than float32).

Decoding happens on the CPU, in the loader workers: the GPU (nvJPEG) path was removed, as it was used by no run and
would have needed a per-image CPU fallback (CMYK JPEGs, PNGs named .JPEG) and its own seeded crops (see
benchmarks/RESULTS.md).

Broken files: reading and decoding (never the crop, resize or flip) are guarded, so an unreadable, truncated or
non-image file raises `util.datasets.UnreadableImageError`, the one error `RobustSeededDataset` replaces and counts.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F2

from util.datasets import GuardedLoader, unreadable_as_error

PRETRAIN_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop scale range (paper Appendix A follows MAE)
PRETRAIN_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range, as in MAE
DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg's scaled IDCT offers through PIL's Image.draft
# Smallest reduction worth it: at 1/2, PIL's reduced decode plus its resize were slower here than torchvision's
# full decode plus the uint8 tensor resize; from 1/4 on they are faster (benchmarks/RESULTS.md).
DEFAULT_MIN_DCT_SCALE = 4


class CropParams(NamedTuple):
    """A crop box in the full-size image (pixels) and whether the crop is flipped horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class DecodedCrop(NamedTuple):
    """A decoded RGB image and the crop box (left, top, right, bottom) on its own pixel grid, fractional when the
    image was decoded at a reduced DCT scale (scale > 1)."""

    image: Image.Image
    box: tuple[float, float, float, float]
    scale: int


def sample_crop(
    width: int,
    height: int,
    scale: Sequence[float] = PRETRAIN_SCALE,
    ratio: Sequence[float] = PRETRAIN_RATIO,
    flip_p: float = 0.5,
) -> CropParams:
    """Draw a RandomResizedCrop box and a flip for a `width` x `height` image.

    The draws are torchvision's own (`RandomResizedCrop.get_params`, then `torch.rand(1) < flip_p` as
    `RandomHorizontalFlip` does), in the same order on the global torch RNG: under the same seed this yields the
    boxes and flips of the reference `Compose([RandomResizedCrop, RandomHorizontalFlip, ...])`.
    """
    shape_only = torch.empty((0, height, width))  # get_params reads only the size
    top, left, h, w = RandomResizedCrop.get_params(shape_only, list(scale), list(ratio))
    flip = bool(torch.rand(1) < flip_p)
    return CropParams(top, left, h, w, flip)


def dct_scale(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """Largest JPEG DCT reduction s in {8, 4, 2, 1} such that the crop is downscaled by at least s on both axes.

    Decoding at 1/s then leaves at least out_height x out_width pixels in the crop, so the final resize is still a
    downscale and the output keeps its detail (PSNR vs the full-size decode: see tests/test_fast_data.py).
    """
    for s in DCT_SCALES:
        if crop_height >= s * out_height and crop_width >= s * out_width:
            return s
    return 1


def _decode_jpeg(data: Tensor) -> Tensor:
    """torchvision's JPEG decoder (libjpeg-turbo) of the file bytes `data` to RGB uint8 (3, H, W).

    torchvision 0.29 deprecates its decoders in favour of TorchCodec's (the same libraries); they still work, and
    this function is the one place to switch when they are removed. The per-call warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB)


def open_header(data: bytes) -> Image.Image:
    """Parse an encoded image's header (size, format); nothing is decoded."""
    return Image.open(io.BytesIO(data))


def decode_reduced(img: Image.Image, crop: CropParams, scale: int) -> DecodedCrop:
    """Decode a JPEG whose header `img` has parsed at 1/`scale` (PIL's `draft`), and map the box onto the result.

    The box keeps its sub-pixel position on the reduced grid: rounding it there would shift the crop by up to
    scale/2 pixels and cost about 10 dB of PSNR.
    """
    full_w, full_h = img.size
    img.draft("RGB", (full_w // scale, full_h // scale))
    img = img.convert("RGB")  # decodes; also handles grayscale / CMYK JPEGs (a few in ImageNet)
    sx, sy = img.width / full_w, img.height / full_h
    box = (crop.left * sx, crop.top * sy, (crop.left + crop.width) * sx, (crop.top + crop.height) * sy)
    return DecodedCrop(img, box, round(full_w / img.width))


def decode_full(data: bytes, img: Image.Image) -> Tensor:
    """Full-size decode -> uint8 (3, H, W), a channels-last view (no copy).

    JPEGs go through libjpeg-turbo in torchvision (`decode_jpeg`), which writes the pixels straight into a tensor
    and is about 1.5x faster here than PIL's decode plus its copy to an array; other formats through PIL.
    """
    if img.format == "JPEG":
        return _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return pil_to_uint8(img.convert("RGB"))


def resize_crop_uint8(pixels: Tensor, top: int, left: int, height: int, width: int, size: Sequence[int]) -> Tensor:
    """Crop and bicubic-antialiased resize of a uint8 (3, h, w) tensor to (3, *size), uint8."""
    return F2.resized_crop(pixels, top, left, height, width, list(size), InterpolationMode.BICUBIC, antialias=True)


def pil_to_uint8(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 (3, h, w), a channels-last view of one copy of the pixels."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


class FastRandomResizedCrop:
    """MAE's pre-training augmentation on the bytes of an encoded image -> uint8 (3, size, size).

    Same box distribution and flip as `RandomResizedCrop(size, scale, interpolation=BICUBIC)` +
    `RandomHorizontalFlip()`, with reduced-scale JPEG decoding and a uint8 tensor resize. Normalise the batch on
    the device with `util.datasets.normalize_on_device`.

    min_dct_scale: decode at 1/s only for s >= this (2, 4 or 8) and only when the crop is downscaled by at least s;
    None always decodes at full size.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: Sequence[float] = PRETRAIN_SCALE,
        ratio: Sequence[float] = PRETRAIN_RATIO,
        flip_p: float = 0.5,
        min_dct_scale: int | None = DEFAULT_MIN_DCT_SCALE,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if min_dct_scale not in (None, 2, 4, 8):
            raise ValueError(f"min_dct_scale must be None, 2, 4 or 8, got {min_dct_scale!r}")
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p
        self.min_dct_scale = min_dct_scale

    def __call__(self, data: bytes) -> Tensor:
        with unreadable_as_error():
            img = open_header(data)
        return self.apply(data, sample_crop(*img.size, self.scale, self.ratio, self.flip_p), img)

    def dct_scale(self, img: Image.Image, crop: CropParams) -> int:
        """The DCT reduction this transform decodes `img` at for `crop` (1: full size)."""
        if self.min_dct_scale is None or img.format != "JPEG":
            return 1
        scale = dct_scale(crop.height, crop.width, *self.size)
        return scale if scale >= self.min_dct_scale else 1

    def apply(self, data: bytes, crop: CropParams, img: Image.Image | None = None) -> Tensor:
        """The deterministic part: decode, crop-resize and flip with given parameters -> uint8 (3, H, W).

        data: the encoded file; img: its parsed header (`open_header(data)`), parsed here when None.
        A file that cannot be decoded raises `UnreadableImageError`; errors of the crop-resize propagate as they are.
        """
        with unreadable_as_error():
            img = open_header(data) if img is None else img
        scale = self.dct_scale(img, crop)
        if scale == 1:  # integer box: uint8 tensor crop-resize, about 3x faster than PIL's
            with unreadable_as_error():
                pixels = decode_full(data, img)
            out = resize_crop_uint8(pixels, crop.top, crop.left, crop.height, crop.width, self.size)
        else:  # fractional box on the reduced grid: PIL's resize takes it exactly, on scale^2 fewer pixels
            with unreadable_as_error():
                decoded = decode_reduced(img, crop, scale)
            out = pil_to_uint8(decoded.image.resize(self.size[::-1], Image.Resampling.BICUBIC, box=decoded.box))
        return out.flip(-1) if crop.flip else out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"min_dct_scale={self.min_dct_scale})")


def read_bytes(path: str | os.PathLike) -> bytes:
    """ImageFolder loader returning the encoded file; decoding happens in the transform."""
    with open(path, "rb") as f:
        return f.read()


def _image_root(data_path: str | os.PathLike) -> Path:
    root = Path(data_path)
    return root / "train" if (root / "train").is_dir() else root


def build_fast_pretrain_dataset(
    data_path: str | os.PathLike, input_size: int, min_dct_scale: int | None = DEFAULT_MIN_DCT_SCALE
) -> datasets.ImageFolder:
    """ImageFolder over `data_path` (or `data_path/train`) with `FastRandomResizedCrop`.

    Items: (uint8 (3, input_size, input_size), label); a drop-in for `util.datasets.build_pretrain_dataset`.
    A file that cannot be read or decoded raises `UnreadableImageError` (the path is in the message when reading
    fails; `RobustSeededDataset` logs it in both cases).
    """
    return datasets.ImageFolder(
        str(_image_root(data_path)), transform=FastRandomResizedCrop(input_size, min_dct_scale=min_dct_scale),
        loader=GuardedLoader(read_bytes),
    )


def psnr(a: Tensor, b: Tensor, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images or batches on the same pixel scale."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
