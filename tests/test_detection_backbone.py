"""detection.backbone / detection.model: windowed attention is exact (one window = global attention; padding never
reaches real tokens), the backbone's strides and channels, loading reports exactly the new keys, layer-decay groups
follow the project's one rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models_backbone import ENCODER, mae_encoder_state
from torch import nn

from detection.backbone import WindowedAttention, create_detection_backbone, global_block_indices
from detection.model import VIT_PREFIX, build_maskrcnn, load_pretrained, param_groups
from models_backbone import STRIDES


def tiny_detector(img_size: int = 64, pyramid: str = "multiblock") -> nn.Module:
    torch.manual_seed(0)
    body = create_detection_backbone(ENCODER, img_size=img_size, window_size=3, global_blocks=(1, 3), pyramid=pyramid)
    return build_maskrcnn(body, num_classes=2, img_size=img_size, fpn_channels=16, box_fc_dim=32)


def random_tables(*modules: WindowedAttention) -> None:
    torch.manual_seed(3)
    table = torch.randn_like(modules[0].relative_position_bias_table)
    for m in modules:
        m.relative_position_bias_table.data.copy_(table)


def test_one_window_over_the_whole_map_is_global_attention():
    windowed, plain = WindowedAttention(32, 4, (6, 6), 6), WindowedAttention(32, 4, (6, 6), None)
    plain.load_state_dict(windowed.state_dict())
    random_tables(windowed, plain)
    x = torch.randn(2, 36, 32)
    torch.testing.assert_close(windowed(x), plain(x), rtol=0, atol=1e-6)


def reference_window(attn: WindowedAttention, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                     ) -> torch.Tensor:
    """Attention among the given tokens of one window only (positions rows, cols in the window), by hand."""
    heads, dim = attn.num_heads, tokens.shape[-1]
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
    q, k, v = F.linear(tokens, attn.qkv.weight, bias).view(len(tokens), 3, heads, -1).permute(1, 2, 0, 3)
    w = attn.window
    pos = rows * w + cols
    table_index = attn.relative_position_index[1:, 1:][pos][:, pos]
    logits = q @ k.transpose(-1, -2) * attn.scale + attn.relative_position_bias_table[table_index].permute(2, 0, 1)
    return attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(len(tokens), dim))


def test_padding_to_a_window_multiple_never_reaches_real_tokens():
    """A 5x7 grid in 3x3 windows is padded to 6x9; every real token's output equals attention over the real tokens
    of its window alone."""
    attn = WindowedAttention(16, 2, (5, 7), 3)
    random_tables(attn)
    x = torch.randn(1, 35, 16)
    out = attn(x).view(5, 7, 16)
    grid = x.view(5, 7, 16)
    for top in range(0, 5, 3):
        for left in range(0, 7, 3):
            rows, cols = torch.meshgrid(torch.arange(top, min(top + 3, 5)), torch.arange(left, min(left + 3, 7)),
                                        indexing="ij")
            expected = reference_window(attn, grid[rows, cols].reshape(-1, 16), (rows - top).flatten(),
                                        (cols - left).flatten())
            torch.testing.assert_close(out[rows, cols].reshape(-1, 16), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pyramid", ["multiblock", "simple"])
def test_feature_strides_and_channels(pyramid):
    model = tiny_detector(64, pyramid)
    body = model.backbone.body
    assert body.out_indices == ((0, 1, 2, 3) if pyramid == "multiblock" else (3,))
    maps = body(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 64 // s, 64 // s) for s in STRIDES]
    features = model.backbone(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "0": (2, 16, 16, 16), "1": (2, 16, 8, 8), "2": (2, 16, 4, 4), "3": (2, 16, 2, 2), "pool": (2, 16, 1, 1)}
    assert global_block_indices(12) == (2, 5, 8, 11) and global_block_indices(24) == (5, 11, 17, 23)
    windows = [b.attn.window for b in create_detection_backbone(dict(ENCODER, depth=12), 128).vit.blocks]
    assert windows == [14, 14, None] * 4  # the benchmark: 14x14 windows, blocks 3, 6, 9, 12 global


@pytest.mark.parametrize("layout", ["mae", "project"])
def test_loading_reports_exactly_the_new_keys(tiny_deepmim, layout):
    """MAE's encoder-only file, or this project's pre-training checkpoint (decoders included, dropped)."""
    model = tiny_detector(64)
    state = mae_encoder_state(tiny_deepmim) if layout == "mae" else tiny_deepmim.state_dict()
    report, heads = load_pretrained(model, {"model": state, "model_cfg": tiny_deepmim.config})
    body = model.backbone.body
    new_vit = [f"vit.blocks.{i}.attn.relative_position_bias_table" for i in range(4)]
    assert report.new == sorted(new_vit + [k for k in body.state_dict() if k.startswith("pyramid.")])
    assert {"cls_token", "pos_embed[class-token slot]", "norm.weight", "norm.bias"} <= set(report.unused)
    assert set(heads) == {"FPN", "RPN", "box head", "mask head"} and all(heads.values())
    assert report.resampled_pos_embed == ((1, 17, 64), (1, 64, 64))  # 4x4 + cls -> 8x8, no class-token slot
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(body.vit.pos_embed.data, expected, rtol=0, atol=1e-6)
    assert torch.equal(body.vit.blocks[1].mlp.fc1.weight, state["blocks.1.mlp.fc1.weight"])
    loaded = set(report.loaded) | set(report.new)
    assert loaded == set(body.state_dict())  # every backbone tensor is either loaded or new, nothing else


def test_layer_decay_groups_follow_the_one_rule():
    model = tiny_detector(64)
    depth, decay = 4, 0.75
    groups = param_groups(model, weight_decay=0.1, layer_decay=decay)
    group_of = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        local = name.removeprefix(VIT_PREFIX)
        if local.startswith(("pos_embed", "patch_embed")):
            layer = 0
        elif local.startswith("blocks."):
            layer = int(local.split(".")[1]) + 1
        else:
            assert not name.startswith(VIT_PREFIX), name
            layer = depth + 1
        assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), name
        no_decay = param.ndim == 1 or name.endswith(("pos_embed", "relative_position_bias_table"))
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name



def test_the_detector_s_transform_keeps_the_pipeline():
    """Training images (already img_size x img_size from LSJ) are only normalised, never resized; test images are
    resized to a longer side of img_size and padded to a square; detections map back to the original image."""
    transform = tiny_detector(64).transform
    image = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[3.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}
    transform.train()
    batch, targets = transform([image], [target])
    mean, std = torch.tensor(transform.image_mean)[:, None, None], torch.tensor(transform.image_std)[:, None, None]
    torch.testing.assert_close(batch.tensors[0], (image - mean) / std)
    assert torch.equal(targets[0]["boxes"], target["boxes"]) and batch.image_sizes == [(64, 64)]
    transform.eval()
    batch, _ = transform([torch.rand(3, 16, 32)])
    assert batch.tensors.shape == (1, 3, 64, 64) and batch.image_sizes == [(32, 64)]
    assert not batch.tensors[0, :, 32:].any()  # padding: 0 after normalisation, the mean colour
    out = transform.postprocess([{"boxes": torch.tensor([[0.0, 0.0, 64.0, 32.0]])}], batch.image_sizes, [(16, 32)])
    assert out[0]["boxes"].tolist() == [[0.0, 0.0, 32.0, 16.0]]
