"""Shared fixtures: tiny models and small folders of real images (crops of scikit-image's photographs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import models_deepmim  # noqa: E402
from util.datasets import demo_photos  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=4)
# The same tiny architecture as command-line flags of main_pretrain.py.
TINY_FLAGS = ["--input_size", "32", "--patch_size", "8", "--embed_dim", "64", "--depth", "4", "--num_heads", "4",
              "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "4"]


@pytest.fixture
def tiny_deepmim():
    torch.manual_seed(0)
    return models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)


def write_image_folder(root: Path, num_images: int = 16, size: int = 48, classes: int = 2, seed: int = 0) -> Path:
    """An ImageFolder of `num_images` JPEG crops of real photographs, spread over `classes` class folders."""
    rng = np.random.default_rng(seed)
    photos = demo_photos()
    for i in range(num_images):
        photo = np.asarray(photos[i % len(photos)])
        y = rng.integers(0, photo.shape[0] - size)
        x = rng.integers(0, photo.shape[1] - size)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + size, x:x + size]).save(folder / f"img{i}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's checkpoint-last.pth (loaded with weights_only=True)."""
    from util.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoint-last.pth")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all floating tensors together. Per-tensor maxima mislead: AdamW turns float noise in
    the near-zero gradients of zero-initialised biases into full-size steps."""
    keys = [k for k in b if b[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(b[k].double().pow(2).sum()) for k in keys)
    return (diff / norm) ** 0.5
