"""util/layer_decay.py: one layer-decay rule for every task. Fine-tuning gets exactly the groups timm's
param_groups_layer_decay gave; a segmentor gets the released LayerDecayOptimizerConstructor's lr scale and weight
decay for every parameter (its rules re-stated below from DeepMIM's Segmentation/mmcv_custom/)."""

from __future__ import annotations

import argparse

import pytest
import torch
from timm.optim import param_groups_layer_decay as timm_groups
from torch import nn

import main_finetune
import main_segmentation
import models_vit
from segmentation.segmentor import create_segmentor
from util.layer_decay import layer_id, param_groups_layer_decay

ENCODER = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)


def same_groups(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert a["lr_scale"] == b["lr_scale"] and a["weight_decay"] == b["weight_decay"]
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("trainable_blocks", [None, 2])
def test_finetuning_groups_are_timm_s(global_pool, trainable_blocks):
    model = models_vit.create_classifier("vit_small_patch16", img_size=32, num_classes=5, global_pool=global_pool,
                                         **ENCODER)
    if trainable_blocks:
        models_vit.set_trainable_blocks(model, trainable_blocks)
    theirs = timm_groups(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.65, lr=1e-3)
    optimizer = main_finetune.build_optimizer(model, args)
    same_groups([{k: g[k] for k in ("lr_scale", "weight_decay", "params")} for g in optimizer.param_groups], theirs)


# -- the released constructor, re-stated (Segmentation/mmcv_custom/layer_decay_optimizer_constructor.py) ----------


def released_layer(name: str, num_max_layer: int) -> int:
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    if name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.blocks"):
        return int(name.split(".")[2]) + 1
    return num_max_layer - 1


def released_rule(name: str, param: nn.Parameter, depth: int, rate: float, wd: float) -> tuple[float, float]:
    num_layers = depth + 2
    no_decay = len(param.shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
    layer = released_layer(name, num_layers)
    return rate ** (num_layers - layer - 1), 0.0 if no_decay else wd


def released_name(name: str) -> str:
    """Our names -> the released model's: backbone.vit.X -> backbone.X, pyramid level k -> fpn{k+1}."""
    name = name.replace("backbone.vit.", "backbone.")
    if name.startswith("backbone.pyramid.scales."):
        level, rest = name.removeprefix("backbone.pyramid.scales.").split(".", 1)
        name = f"backbone.fpn{int(level) + 1}.{rest}"
    return name


def test_segmentor_groups_are_the_released_constructor_s():
    model = create_segmentor({**ENCODER, "patch_size": 16}, 3, img_size=64, channels=16, aux_channels=8)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.9, lr=5e-5, depth=4)
    groups = main_segmentation.build_optimizer(model, args).param_groups
    got = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(got) == len(names)
    for name, param in names.items():
        assert got[id(param)] == released_rule(released_name(name), param, 4, 0.9, 0.05), name
    # what the released comparison implies: pos_embed, cls_token and relative position tables are weight-decayed
    for name in ("backbone.vit.pos_embed", "backbone.vit.cls_token",
                 "backbone.vit.blocks.0.attn.relative_position_bias_table"):
        assert got[id(names[name])][1] == 0.05
    assert got[id(names["backbone.vit.pos_embed"])][0] == 0.9 ** 5  # embeddings: decay^(depth + 1)
    assert got[id(names["backbone.vit.blocks.0.attn.qkv.weight"])][0] == 0.9 ** 4  # block i: decay^(depth - i)
    assert got[id(names["backbone.pyramid.scales.0.0.weight"])][0] == 1.0


def test_layer_ids():
    assert layer_id("backbone.vit.patch_embed.proj.weight", 12, "backbone.vit.") == 0
    assert layer_id("backbone.vit.blocks.11.mlp.fc1.weight", 12, "backbone.vit.") == 12
    assert layer_id("decode_head.conv_seg.weight", 12, "backbone.vit.") == 13
    assert layer_id("norm.weight", 12, final_norm_in_last_block=True) == 12
    assert layer_id("norm.weight", 12) == 13
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert param_groups_layer_decay(frozen, 0.05, 0.9, depth=1) == []
    assert torch.is_tensor(frozen.weight)
