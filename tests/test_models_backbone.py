"""models_backbone.py: the released segmentation backbone (Beit + the stride 4/8/16/32 pyramid) built from any
encoder checkpoint; the qkv-bias mapping and the position-embedding resampling are exact; the load report names
exactly the new parts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

import models_backbone as mb
import models_deepmim
import models_vit
from tools import export_encoder
from util.checkpoint import load_checkpoint, save_atomic

ENCODER = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)  # conftest.TINY's encoder


def tiny_backbone(img_size: int = 64) -> mb.MultiScaleViT:
    torch.manual_seed(1)
    return mb.create_backbone(ENCODER, img_size=img_size)


def mae_encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's encoder under MAE's released names (mae_pretrain_vit_base.pth: no decoder keys), with a non-zero
    key bias so that dropping it is tested."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not models_vit.DROPPED_KEY.match(k)}
    for key in [k for k in state if k.endswith("qkv.bias")]:
        state[key] = torch.randn_like(state[key])
    return state


def test_pyramid_levels_are_the_released_fpn1_to_fpn4_for_patch_16():
    pyramid = mb.SimpleFeaturePyramid(mb.pyramid_scale_factors(16), 8)
    kinds = [[type(m).__name__ for m in (op if isinstance(op, nn.Sequential) else [op])] for op in pyramid.scales]
    assert kinds == [["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"], ["ConvTranspose2d"],
                     ["Identity"], ["MaxPool2d"]]
    assert mb.pyramid_scale_factors(8) == (2.0, 1.0, 0.5, 0.25)  # the released patch-8 branch
    assert mb.default_out_indices(12) == (3, 5, 7, 11)  # released out_indices
    single = pyramid(torch.randn(1, 8, 6, 6))  # ViTDet: one map for every level
    assert [tuple(x.shape[-2:]) for x in single] == [(24, 24), (12, 12), (6, 6), (3, 3)]


def test_backbone_strides_channels_and_released_extras():
    backbone = tiny_backbone()
    maps = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    assert backbone.channels == [64] * 4
    vit = backbone.vit
    assert all(not b.attn.relative_position_bias_table.any() for b in vit.blocks)  # zero-initialised
    assert all(torch.equal(b.gamma_1, torch.ones(64)) for b in vit.blocks)  # layer scale 1
    assert isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)
    assert mb.backbone_config(backbone) == {"img_size": 64, **ENCODER, "out_indices": [0, 1, 2, 3]}


def test_mae_weights_give_the_mae_encoder_s_block_outputs(tiny_deepmim):
    """With zero relative-position tables and unit layer scales, the backbone's tapped blocks equal the MAE
    encoder's: the qkv.bias split (key bias dropped) changes nothing."""
    source = models_vit.create_classifier("vit_small_patch16", img_size=32, **ENCODER).eval()
    state = mae_encoder_state(tiny_deepmim)
    source.load_state_dict(state, strict=False)
    backbone = tiny_backbone(img_size=32).eval()
    report = mb.load_backbone_weights(backbone, {"model": state})
    assert report.resampled_pos_embed is None
    x = torch.randn(2, 3, 32, 32)
    expected = source.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
    got = backbone.vit.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pos_embed_resampled_as_the_released_loader(tiny_deepmim):
    state = mae_encoder_state(tiny_deepmim)  # 4x4 grid at 32 px
    backbone = tiny_backbone(img_size=64)  # 8x8
    report = mb.load_backbone_weights(backbone, state)
    assert report.resampled_pos_embed == ((1, 17, 64), (1, 65, 64))
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(backbone.vit.pos_embed[:, 1:], expected, rtol=0, atol=1e-6)
    assert torch.equal(backbone.vit.pos_embed[:, :1], state["pos_embed"][:, :1])


def expected_new(backbone: mb.MultiScaleViT) -> list[str]:
    depth = len(backbone.vit.blocks)
    new = [f"vit.blocks.{i}.{name}" for i in range(depth)
           for name in ("attn.relative_position_bias_table", "gamma_1", "gamma_2")]
    return sorted(new + [k for k in backbone.state_dict() if k.startswith("pyramid.")])


@pytest.mark.parametrize("layout", ["project", "mae", "export", "released_deepmim"])
def test_every_layout_leaves_exactly_the_new_parts(layout, tiny_deepmim, tmp_path):
    path = tmp_path / "pretrain.pth"
    save_atomic({"model": tiny_deepmim.state_dict(), "model_cfg": tiny_deepmim.config, "epoch": 0}, path)
    if layout == "project":
        checkpoint = load_checkpoint(path)
    elif layout == "mae":
        checkpoint = {"model": mae_encoder_state(tiny_deepmim)}
    elif layout == "export":
        export_encoder.export(str(path), str(tmp_path / "enc.safetensors"))
        checkpoint = load_checkpoint(tmp_path / "enc.safetensors")
    else:
        state = mae_encoder_state(tiny_deepmim)
        state.update({"decoder_embed1.weight": torch.zeros(32, 64), "mask_token1": torch.zeros(1, 1, 32),
                      "decoder_pos_embed": torch.zeros(1, 17, 32)})
        checkpoint = {"model": state}
    backbone = tiny_backbone(img_size=32)
    report = mb.load_backbone_weights(backbone, checkpoint)
    assert report.new == expected_new(backbone)
    unused = set(report.unused)
    assert {"norm.weight", "norm.bias"} <= unused  # the final norm: the pyramid reads raw block outputs
    assert {f"blocks.{i}.attn.qkv.bias[key part]" for i in range(4)} <= unused
    assert all(k.startswith(("norm.", "decoder", "mask_token", "blocks.")) for k in unused)
    text = report.describe({"decode head": 5})
    assert "relative position tables (4 tensors)" in text and "layer scales (8 tensors)" in text
    assert "pyramid" in text and "decode head (5 tensors)" in text
    qkv_bias = models_vit.encoder_state_dict(checkpoint)["blocks.2.attn.qkv.bias"]
    assert torch.equal(backbone.vit.blocks[2].attn.q_bias, qkv_bias[:64])
    assert torch.equal(backbone.vit.blocks[2].attn.v_bias, qkv_bias[128:])


def test_bad_checkpoints_raise_naming_the_problem(tiny_deepmim):
    state = mae_encoder_state(tiny_deepmim)
    broken = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc1.weight"}
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1.weight"):
        mb.load_backbone_weights(tiny_backbone(32), broken)
    with pytest.raises(ValueError, match="--embed_dim"):
        mb.load_backbone_weights(mb.create_backbone({**ENCODER, "embed_dim": 32}, img_size=32), state)
    with pytest.raises(ValueError, match="no part of a ViT encoder"):
        mb.load_backbone_weights(tiny_backbone(32), {**state, "classifier.fc.weight": torch.zeros(2)})


def test_pretraining_model_sizes_match_the_registry():
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)
    assert models_vit.encoder_config(model.config) == {"name": "vit_small_patch16", "img_size": 32, **ENCODER}
