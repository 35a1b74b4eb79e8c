"""ViT classifiers: MAE's read-outs on timm, loading pre-trained encoders, and the layer studies (Figs. 7, 8)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY
from timm.layers import resample_abs_pos_embed
from torch import nn

import main_finetune
import models_deepmim
import models_vit
from util.checkpoint import load_checkpoint, save_atomic

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)


def classifier(global_pool: bool = True, **overrides) -> nn.Module:
    torch.manual_seed(1)
    return models_vit.create_classifier("vit_small_patch16", **{**ARCH, "num_classes": 10, **overrides},
                                        global_pool=global_pool)


def encoder_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of MAE's released mae_pretrain_vit_*.pth: the encoder only (patch_embed, cls/pos, blocks, norm)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("decoders.")}


def test_factories_and_config_round_trip():
    model = models_vit.vit_base_patch16(num_classes=7)
    assert (model.patch_embed.proj.kernel_size, model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) \
        == ((16, 16), 768, 12, 12)
    assert models_vit.vit_huge_patch14(depth=1).patch_embed.proj.kernel_size == (14, 14)
    tiny = classifier(drop_path_rate=0.1)
    rebuilt = models_vit.classifier_from_config(tiny.config)
    assert rebuilt.config == tiny.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in tiny.state_dict().items()}
    assert tiny.blocks[0].attn.qkv.bias is not None and tiny.fc_norm.eps == 1e-6
    assert tiny.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="vit_base_patch16"):
        models_vit.create_classifier("vit_tiny_patch3")


@pytest.mark.parametrize("global_pool", [True, False])
def test_readout_is_mae_s(global_pool):
    """global_pool: head(fc_norm(mean of patch tokens)), no final norm; else head(norm(tokens)[:, 0])."""
    model = classifier(global_pool).eval()
    nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.blocks(model._pos_embed(model.patch_embed(x)))  # (N, 1 + L, D) raw output of the last block
    if global_pool:
        assert isinstance(model.norm, nn.Identity)
        expected = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))
    else:
        assert isinstance(model.fc_norm, nn.Identity)
        expected = model.head(model.norm(tokens)[:, 0])
    torch.testing.assert_close(model(x), expected)


def test_loads_this_project_s_checkpoint(tiny_deepmim, tmp_path):
    path = tmp_path / "pretrain.pth"
    save_atomic({"model": tiny_deepmim.state_dict(), "model_cfg": tiny_deepmim.config, "epoch": 0, "args": {}}, path)
    model = classifier()
    report = models_vit.load_encoder_weights(model, load_checkpoint(path))
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == ["norm.bias", "norm.weight"]  # MAE drops the final norm under global pooling
    assert report.dropped and all(k.startswith("decoders.") for k in report.dropped)
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.3.mlp.fc2.weight"):
        assert torch.equal(model.state_dict()[key], tiny_deepmim.state_dict()[key]), key
    assert models_vit.encoder_config(tiny_deepmim.config) == {"name": "vit_small_patch16", **ARCH}


@pytest.mark.parametrize("global_pool, missing", [
    (True, ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]),
    (False, ["head.bias", "head.weight"]),
])
def test_mae_released_key_names_leave_only_the_read_out_missing(tiny_deepmim, global_pool, missing):
    released = {"model": encoder_keys(tiny_deepmim.state_dict())}  # mae_pretrain_vit_base.pth layout
    model = classifier(global_pool)
    report = models_vit.load_encoder_weights(model, released)
    assert report.missing == missing
    assert report.unexpected == (["norm.bias", "norm.weight"] if global_pool else [])
    # the head is re-initialised as MAE does: trunc-normal std 2e-5, zero bias
    assert model.head.weight.abs().max() < 1e-4 and model.head.weight.std() > 5e-6
    assert not model.head.bias.any()


def test_released_deepmim_layout_drops_decoders_teachers_generators(tiny_deepmim):
    state = encoder_keys(tiny_deepmim.state_dict())
    for k in range(1, 5):  # four decoders with suffixes 1..4, as the released DeepMIM checkpoints name them
        state[f"decoder_embed{k}.weight"] = torch.zeros(32, 64)
        state[f"decoder_blocks{k}.0.norm1.weight"] = torch.ones(32)
        state[f"decoder_pred{k}.bias"] = torch.zeros(192)
        state[f"mask_token{k}"] = torch.zeros(1, 1, 32)
    state.update({"decoder_pos_embed": torch.zeros(1, 17, 32), "teacher.visual.proj": torch.zeros(3),
                  "generator.blocks.0.norm1.weight": torch.ones(3), "head.weight": torch.ones(1000, 64)})
    report = models_vit.load_encoder_weights(classifier(False), {"model": state})
    assert report.missing == ["head.bias", "head.weight"] and report.unexpected == []
    assert len(report.dropped) == 4 * 4 + 4


def test_missing_encoder_weight_or_wrong_shape_raises(tiny_deepmim):
    state = encoder_keys(tiny_deepmim.state_dict())
    del state["blocks.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1.weight"):
        models_vit.load_encoder_weights(classifier(), state)
    with pytest.raises(ValueError, match="--embed_dim"):
        models_vit.load_encoder_weights(classifier(embed_dim=32), tiny_deepmim.state_dict())


def test_pos_embed_resampled_224_to_384_keeps_cls():
    source = models_deepmim.create_model("deepmim_vit_small_patch16", **{**TINY, "img_size": 224, "patch_size": 16,
                                                                          "depth": 2})
    nn.init.normal_(source.pos_embed)  # a cls slot that is not zero, so keeping it is visible
    model = models_vit.create_classifier("vit_small_patch16", img_size=384, embed_dim=64, depth=2, num_heads=4,
                                         num_classes=10)
    report = models_vit.load_encoder_weights(model, source.state_dict())
    assert report.resampled_pos_embed
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 64)
    torch.testing.assert_close(model.pos_embed[:, :1], source.pos_embed[:, :1], rtol=0, atol=0)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[24, 24], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 10)


def test_trainable_blocks_freezes_all_but_the_last_k():
    model = classifier()
    names = models_vit.set_trainable_blocks(model, 2)
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "") for n in names} == \
        {"blocks.2", "blocks.3", "fc_norm", "head"}
    assert not any(p.requires_grad for p in [model.cls_token, model.pos_embed, *model.patch_embed.parameters(),
                                             *model.blocks[1].parameters()])
    for bad in (0, 5):
        with pytest.raises(ValueError, match="--trainable_blocks must be in 1..4"):
            models_vit.set_trainable_blocks(classifier(), bad)


def test_reinit_blocks_changes_exactly_the_last_k():
    model = classifier()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # "pre-trained": nothing sits at its initial value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    models_vit.reinit_last_blocks(model, 2)
    for key, value in model.state_dict().items():
        if key.startswith(("blocks.2.", "blocks.3.")):
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key
    assert torch.equal(model.blocks[3].norm1.weight, torch.ones(64))
    assert model.blocks[3].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="--reinit_blocks"):
        models_vit.reinit_last_blocks(model, 5)


# -- the load report is logged once (issue 13, item 9) -------------------------------------------------------------


def report_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "missing" in r.getMessage() or "unexpected" in r.getMessage()]


def test_load_encoder_weights_leaves_the_report_to_its_caller(tiny_deepmim, caplog):
    with caplog.at_level(logging.DEBUG):
        report = models_vit.load_encoder_weights(classifier(), tiny_deepmim.state_dict())
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report_lines(caplog) == []


def test_finetune_and_linprobe_log_the_load_report_once(tiny_deepmim, tmp_path, caplog):
    path = tmp_path / "pretrain.pth"
    save_atomic({"model": tiny_deepmim.state_dict(), "model_cfg": tiny_deepmim.config}, path)
    flags = [f"--{k}={v}" for k, v in ARCH.items() if k != "img_size"]
    args = main_finetune.get_args_parser().parse_args(
        ["--model", "vit_small_patch16", "--input_size", "32", *flags, "--nb_classes", "3", "--finetune", str(path)])
    with caplog.at_level(logging.DEBUG):
        main_finetune.build_model(args, load_checkpoint(path))
    assert len(report_lines(caplog)) == 1, report_lines(caplog)
    caplog.clear()
    config = dict(name="vit_small_patch16", **ARCH, num_classes=3, drop_path_rate=0.0, global_pool=False)
    with caplog.at_level(logging.DEBUG):
        models_vit.build_probe(config, load_checkpoint(path))
    assert len(report_lines(caplog)) == 1, report_lines(caplog)


def test_the_demo_model_is_named_for_what_it_is_and_old_demo_checkpoints_still_fit():
    import argparse

    import main_pretrain

    model = models_deepmim.create_model("deepmim_vit_demo_patch4", img_size=32)
    assert (model.patch_size, model.pos_embed.shape[-1], model.depth, model.blocks[0].attn.num_heads) == (4, 128, 6, 4)
    assert main_pretrain.DEMO_SETTINGS["model"] == "deepmim_vit_demo_patch4"
    assert not {"patch_size", "embed_dim", "depth", "num_heads"} & set(main_pretrain.DEMO_SETTINGS)  # the name says
    old_demo = {"name": "deepmim_vit_small_patch16", "img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6,
                "num_heads": 4}  # what `--demo` wrote before the rename
    args = argparse.Namespace(model="vit_demo_patch4", input_size=None, resume="", patch_size=None, embed_dim=None,
                              depth=None, num_heads=None)
    models_vit.resolve_architecture(args, {"model_cfg": old_demo})
    assert (args.model, args.input_size, args.patch_size, args.embed_dim, args.depth) == ("vit_demo_patch4", 32, 4,
                                                                                          128, 6)


def test_a_hub_config_becomes_a_classifier_config():
    demo = {"architecture": "vit_small_patch16_224", "model_args": {"img_size": [32, 32], "patch_size": 4,
            "embed_dim": 128, "depth": 6, "num_heads": 4, "num_classes": 10, "global_pool": "avg"}}
    assert models_vit.hub_classifier_config(demo) == {"name": "vit_demo_patch4", "img_size": 32, "patch_size": 4,
                                                      "embed_dim": 128, "depth": 6, "num_heads": 4, "num_classes": 10,
                                                      "global_pool": True}
    base = {"architecture": "vit_base_patch16_224", "pretrained_cfg": {"input_size": [3, 224, 224]}}
    assert models_vit.hub_classifier_config(base)["name"] == "vit_base_patch16"
    with pytest.raises(ValueError, match="architecture 'resnet50' is not a ViT"):
        models_vit.hub_classifier_config({"architecture": "resnet50"})
