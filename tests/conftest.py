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


# A VQ-KD tokenizer (BEiT v2) small enough for tests: timm's test_vit shape (patch 16, width 64, 6 blocks, 2 heads,
# MLP 3x), 40 codes of width 8.
VQKD_TINY = dict(patch_size=16, embed_dim=64, depth=6, num_heads=2, mlp_ratio=3)


def vqkd_state(grid: int = 4, vocab: int = 40, code_dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of a VQ-KD checkpoint with the release's key names (microsoft/unilm beit2/modeling_vqkd.py):
    the encoder is timm's BEiT (q/v biases, fc_norm: the release's own names) with every parameter random, plus the
    parts a tokenizer does not read (decoder, decode_task_layer, the codebook's EMA statistics, a teacher key)."""
    from timm.models.beit import Beit

    torch.manual_seed(seed)
    encoder = Beit(img_size=grid * 16, num_classes=0, global_pool="avg", use_abs_pos_emb=True, use_rel_pos_bias=False,
                   init_values=None, **VQKD_TINY)
    state = {f"encoder.{k}": v + 0.1 * torch.randn_like(v) for k, v in encoder.state_dict().items()}
    width = VQKD_TINY["embed_dim"]
    state.update({
        "encode_task_layer.0.weight": torch.randn(width, width) / width**0.5,
        "encode_task_layer.0.bias": torch.randn(width),
        "encode_task_layer.2.weight": torch.randn(code_dim, width) / width**0.5,
        "encode_task_layer.2.bias": 0.1 * torch.randn(code_dim),
        "quantize.embedding.weight": torch.nn.functional.normalize(torch.randn(vocab, code_dim), dim=-1),
        "quantize.embedding.cluster_size": torch.rand(vocab),
        "quantize.embedding.embed_avg": torch.randn(vocab, code_dim),
        "quantize.embedding.initted": torch.tensor([1.0]), "quantize.cluster_size": torch.rand(vocab),
        "decoder.cls_token": torch.randn(1, 1, width),
        "decoder.patch_embed.proj.weight": torch.randn(width, code_dim, 1, 1),
        "decode_task_layer.2.weight": torch.randn(512, width), "teacher_model.visual.proj": torch.randn(width, 512),
    })
    return state


def write_vqkd_file(path: Path, **kwargs) -> Path:
    """`vqkd_state` saved as the release ships it: {'model': state dict}."""
    torch.save({"model": vqkd_state(**kwargs)}, path)
    return path
