"""tools/export_encoder.py: the exported file loads in timm with no missing keys and gives our features."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_finetune import pretrain_checkpoint

import models_vit
from tools import export_encoder
from util.checkpoint import load_checkpoint, save_atomic

TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)


def timm_model(path, caplog, **kwargs):
    """timm.create_model('vit_small_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=...)) of the
    tiny architecture; fails if timm reports missing or unexpected keys."""
    overlay = dict(file=str(path), **kwargs.pop("overlay", {}))
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model("vit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                                  **TIMM_TINY, **kwargs)
    assert not [r for r in caplog.records if "Missing keys" in r.message or "Unexpected keys" in r.message]
    return model.eval()


def test_pretraining_encoder_loads_in_timm_with_our_features(tmp_path, caplog):
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    out = tmp_path / "encoder.safetensors"
    exported = export_encoder.export(str(ckpt), str(out))
    model = timm_model(out, caplog, num_classes=0)
    assert set(load_file(out)) == set(exported) == set(model.state_dict())  # nothing missing, nothing extra
    for key, value in model.state_dict().items():
        assert torch.equal(value, exported[key]), key

    x = torch.randn(2, 3, 32, 32)
    ours = models_vit.create_classifier("vit_small_patch16", **TIMM_TINY, num_classes=0, global_pool=False).eval()
    models_vit.load_encoder_weights(ours, load_checkpoint(ckpt))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x))  # (N, D): normalised cls token
        # and the same tokens as the pre-training encoder itself, unmasked, in patch order
        pre = pretrain_checkpoint(tmp_path / "again.pth")  # same seed -> same weights
        from models_deepmim import model_from_config

        mim = model_from_config(load_checkpoint(pre)["model_cfg"])
        mim.load_state_dict(load_checkpoint(pre)["model"])
        latents, _ = mim.eval().forward_encoder(x, mask_ratio=0.0, noise=torch.arange(16.0).expand(2, 16))
        torch.testing.assert_close(model.forward_features(x), latents[4])


def test_finetuned_classifier_exports_with_head_and_fc_norm(tmp_path, caplog):
    torch.manual_seed(0)
    classifier = models_vit.create_classifier("vit_small_patch16", **TIMM_TINY, num_classes=5, global_pool=True)
    torch.nn.init.normal_(classifier.head.weight)
    ckpt = tmp_path / "checkpoint-best.pth"
    save_atomic({"model": classifier.state_dict(), "model_cfg": classifier.config, "epoch": 3}, ckpt)
    out = tmp_path / "classifier.safetensors"
    exported = export_encoder.export(str(ckpt), str(out))
    assert {"head.weight", "fc_norm.weight"} <= set(exported) and "norm.weight" not in exported
    model = timm_model(out, caplog, num_classes=5, global_pool="avg", overlay=dict(num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier.eval()(x))


def test_command_line_and_refusals(tmp_path):
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    out = tmp_path / "sub" / "encoder.safetensors"
    run = subprocess.run([sys.executable, "tools/export_encoder.py", str(ckpt), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and out.is_file() and "timm.create_model" in run.stderr, run.stderr
    bad = subprocess.run([sys.executable, "tools/export_encoder.py", str(ckpt), str(tmp_path / "x.pth")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and ".safetensors" in bad.stderr
    probe = tmp_path / "probe.pth"
    save_atomic({"model": {}, "model_cfg": {"name": "vit_small_patch16", "probe_block": 2}}, probe)
    with pytest.raises(ValueError, match="block 2"):
        export_encoder.export(str(probe), str(tmp_path / "p.safetensors"))
