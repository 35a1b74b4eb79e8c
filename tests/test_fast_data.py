"""The fast data path (util/fast_data.py): same crop draws as torchvision, uint8 + on-device normalisation equal to
the float reference, fidelity to PIL's pipeline, reduced-scale decoding only when the crop allows it, and
grayscale, CMYK and non-JPEG inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from util import fast_data as fd
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, demo_photos, normalize_on_device


def jpeg_file(path: Path, size: tuple[int, int], photo: int = 0, quality: int = 90, mode: str = "RGB") -> Path:
    """A real photograph resized to `size` (W, H) and saved as JPEG."""
    demo_photos()[photo].resize(size, Image.Resampling.LANCZOS).convert(mode).save(path, "JPEG", quality=quality)
    return path


def pil_reference(img: Image.Image, crop: fd.CropParams, size: int) -> torch.Tensor:
    """The reference pipeline's crop for a given box: PIL bicubic crop-resize, flip, uint8 (3, size, size)."""
    out = TF.resized_crop(img.convert("RGB"), crop.top, crop.left, crop.height, crop.width, [size, size],
                          InterpolationMode.BICUBIC)
    out = TF.pil_to_tensor(out)
    return out.flip(-1) if crop.flip else out


@pytest.fixture
def draft_spy(monkeypatch):
    """Record every call to PIL's JPEG `draft` (the reduced-DCT-scale decode)."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def test_sample_crop_draws_what_torchvision_draws():
    img = Image.new("RGB", (500, 375))
    rrc, flip = transforms.RandomResizedCrop(224, scale=(0.2, 1.0)), transforms.RandomHorizontalFlip()
    torch.manual_seed(3)
    expected = []
    for _ in range(20):
        box = rrc.get_params(img, list(rrc.scale), list(rrc.ratio))
        expected.append((*box, bool(torch.rand(1) < flip.p)))
    torch.manual_seed(3)
    assert [tuple(fd.sample_crop(500, 375)) for _ in range(20)] == expected
    assert {e[-1] for e in expected} == {True, False}


def test_uint8_batch_normalised_on_device_equals_float_reference():
    """Same crops (same PIL resize for both): only the normalisation path differs, and it agrees to 1e-6."""
    photo = demo_photos()[1]
    torch.manual_seed(0)
    crops = [fd.sample_crop(*photo.size) for _ in range(6)]
    resized = [TF.resized_crop(photo, c.top, c.left, c.height, c.width, [64, 64], InterpolationMode.BICUBIC)
               for c in crops]
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    float_batch = torch.stack([reference(r) for r in resized])
    uint8_batch = torch.stack([TF.pil_to_tensor(r) for r in resized])
    assert uint8_batch.dtype == torch.uint8
    ours = normalize_on_device(uint8_batch, "cpu")
    assert ours.dtype == torch.float32 and ours.shape == float_batch.shape
    assert (ours - float_batch).abs().max().item() <= 1e-6


@pytest.mark.parametrize("size", [(500, 375), (1000, 750)])
def test_fast_crops_match_pil_reference(tmp_path, size):
    """ImageNet-sized and larger JPEGs (the latter decoded at 1/2 scale for big crops): >= 35 dB PSNR each."""
    path = jpeg_file(tmp_path / "photo.jpg", size, photo=0)
    transform = fd.FastRandomResizedCrop(224, min_dct_scale=2)
    torch.manual_seed(1)
    values = []
    scales = set()
    for _ in range(12):
        crop = fd.sample_crop(*size)
        scales.add(fd.dct_scale(crop.height, crop.width, 224, 224))
        out = transform.apply(path.read_bytes(), crop)
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
        values.append(fd.psnr(out, pil_reference(Image.open(path), crop, 224)))
    assert min(values) >= 35, values
    if size[0] >= 1000:
        assert 2 in scales  # the reduced decode was exercised


def test_same_seed_gives_reference_boxes_and_flips(tmp_path):
    """Seeded runs of the reference Compose and of the fast transform produce the same crops (to within resampling)."""
    path = jpeg_file(tmp_path / "photo.jpg", (500, 375), photo=2)
    reference = transforms.Compose([
        transforms.RandomResizedCrop(96, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])
    fast = fd.FastRandomResizedCrop(96)
    torch.manual_seed(7)
    ref = [reference(Image.open(path).convert("RGB")) for _ in range(8)]
    torch.manual_seed(7)
    ours = [fast(path.read_bytes()) for _ in range(8)]
    assert all(fd.psnr(a, b) >= 35 for a, b in zip(ours, ref))
    assert fd.psnr(ours[0], ref[1]) < 25  # a different box would not pass


def test_dct_scale_needs_the_crop_downscaled_by_that_factor():
    assert fd.dct_scale(375, 500, 224, 224) == 1
    assert fd.dct_scale(447, 1000, 224, 224) == 1  # 447 < 2 * 224 on one axis
    assert fd.dct_scale(448, 448, 224, 224) == 2
    assert fd.dct_scale(900, 1000, 224, 224) == 4
    assert fd.dct_scale(1792, 2000, 224, 224) == 8
    assert fd.dct_scale(300, 300, 32, 32) == 8


def test_draft_decode_only_when_the_crop_is_downscaled_enough(tmp_path, draft_spy):
    small = jpeg_file(tmp_path / "small.jpg", (500, 375)).read_bytes()
    large = jpeg_file(tmp_path / "large.jpg", (1000, 750)).read_bytes()
    transform = fd.FastRandomResizedCrop(224, min_dct_scale=2)

    for data, crop in ((small, fd.CropParams(10, 20, 300, 400, False)),
                       (large, fd.CropParams(10, 20, 400, 800, False))):  # 400 < 2 * 224: still full size
        assert transform.dct_scale(fd.open_header(data), crop) == 1
        assert transform.apply(data, crop).shape == (3, 224, 224)
    assert draft_spy == []

    crop = fd.CropParams(10, 20, 700, 600, False)
    assert transform.dct_scale(fd.open_header(large), crop) == 2
    assert transform.apply(large, crop).shape == (3, 224, 224)
    assert draft_spy == [(500, 375)]
    decoded = fd.decode_reduced(fd.open_header(large), crop, 2)
    assert decoded.scale == 2 and decoded.image.size == (500, 375)
    assert decoded.box == (10.0, 5.0, 310.0, 355.0)  # (left, top, right, bottom) halved, kept fractional

    crop = fd.CropParams(0, 0, 300, 300, False)
    assert fd.FastRandomResizedCrop(32).apply(small, crop).shape == (3, 32, 32)
    assert draft_spy[-1] == (62, 46)  # 300 >= 8 * 32: decoded at 1/8 (63 x 47 pixels)
    assert fd.decode_reduced(fd.open_header(small), crop, 8).image.size == (63, 47)

    calls = len(draft_spy)
    crop = fd.CropParams(10, 20, 700, 600, False)  # downscaled 2.7x: 1/2 would do, the default minimum is 1/4
    assert fd.FastRandomResizedCrop(224).dct_scale(fd.open_header(large), crop) == 1
    fd.FastRandomResizedCrop(224).apply(large, crop)
    no_draft = fd.FastRandomResizedCrop(32, min_dct_scale=None)
    assert no_draft.dct_scale(fd.open_header(small), crop) == 1
    no_draft.apply(small, fd.CropParams(0, 0, 300, 300, False))
    assert len(draft_spy) == calls  # neither decoded at a reduced scale


def test_non_jpeg_grayscale_and_cmyk_inputs(tmp_path, draft_spy):
    png = tmp_path / "photo.png"
    demo_photos()[0].resize((500, 375)).save(png)
    gray = jpeg_file(tmp_path / "gray.jpg", (1000, 750), mode="L")
    transform = fd.FastRandomResizedCrop(64)
    crop = fd.CropParams(0, 0, 375, 500, True)
    out = transform.apply(png.read_bytes(), crop)
    assert draft_spy == [] and out.shape == (3, 64, 64)  # PNG: never drafted
    assert fd.psnr(out, pil_reference(Image.open(png), crop, 64)) >= 35
    for min_scale in (4, None):  # reduced decode by PIL (1/4 here) and full decode by torchvision: both give RGB
        out = fd.FastRandomResizedCrop(64, min_dct_scale=min_scale).apply(gray.read_bytes(), crop)
        assert out.shape == (3, 64, 64) and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        assert fd.psnr(out, pil_reference(Image.open(gray), crop, 64)) >= 35
    assert draft_spy == [(250, 187)]
    cmyk = jpeg_file(tmp_path / "cmyk.jpg", (500, 375), mode="CMYK")  # a few ImageNet files are CMYK
    decoded = fd.decode_full(cmyk.read_bytes(), Image.open(cmyk))
    assert torch.equal(decoded, fd.pil_to_uint8(Image.open(cmyk).convert("RGB")))


def test_dataset_and_loader_yield_uint8_batches(image_folder):
    dataset = fd.build_fast_pretrain_dataset(image_folder, input_size=32)
    samples, labels = next(iter(DataLoader(dataset, batch_size=4)))
    assert samples.shape == (4, 3, 32, 32) and samples.dtype == torch.uint8
    assert labels.tolist() == [dataset[i][1] for i in range(4)]
    assert normalize_on_device(samples, "cpu").dtype == torch.float32


def test_bad_transform_arguments_are_rejected():
    with pytest.raises(ValueError, match="size"):
        fd.FastRandomResizedCrop(0)
    with pytest.raises(ValueError, match="scale"):
        fd.FastRandomResizedCrop(224, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        fd.FastRandomResizedCrop(224, ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="min_dct_scale must be None, 2, 4 or 8"):
        fd.FastRandomResizedCrop(224, min_dct_scale=3)


def test_psnr():
    a = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert fd.psnr(a, a) == float("inf")
    assert fd.psnr(a, a + 1) == pytest.approx(20 * np.log10(255))
