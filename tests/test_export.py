"""tools/export_encoder.py: the exported file and the --hub_dir folder load in timm with no missing keys and give
our features."""

from __future__ import annotations

import json
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
from util.datasets import IMAGENET_MEAN, IMAGENET_STD

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


# ----------------------------------------------------------------------------------------------------------------
# --hub_dir: timm's Hub layout, rebuilt by timm.create_model('local-dir:DIR') with no architecture arguments
# ----------------------------------------------------------------------------------------------------------------


def local_dir_model(hub_dir, caplog):
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(f"local-dir:{hub_dir}", pretrained=True)
    assert not [r for r in caplog.records if "Missing keys" in r.message or "Unexpected keys" in r.message]
    return model.eval()


def test_hub_dir_encoder_rebuilds_from_local_dir_with_our_features(tmp_path, caplog):
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    hub = tmp_path / "hub"
    exported = export_encoder.export(str(ckpt), None, str(hub))
    assert sorted(p.name for p in hub.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_224" and cfg["num_classes"] == 0
    assert {k: cfg["model_args"][k] for k in ("patch_size", "embed_dim", "depth", "num_heads")} == \
        {k: v for k, v in TIMM_TINY.items() if k != "img_size"}
    assert not {"tag", "license", "hf_hub_id", "url"} & set(cfg["pretrained_cfg"])  # nothing of timm's own weights

    model = local_dir_model(hub, caplog)
    assert set(model.state_dict()) == set(exported) == set(load_file(hub / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, exported[key]), key
    data = timm.data.resolve_data_config({}, model=model)  # MAE's evaluation preprocessing travels with it
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bicubic" and data["crop_pct"] == 0.875
    assert tuple(data["mean"]) == IMAGENET_MEAN and tuple(data["std"]) == IMAGENET_STD

    ours = models_vit.create_classifier("vit_small_patch16", **TIMM_TINY, num_classes=0, global_pool=False).eval()
    models_vit.load_encoder_weights(ours, load_checkpoint(ckpt))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x))


def test_hub_dir_finetuned_classifier_keeps_head_and_pooling(tmp_path, caplog):
    torch.manual_seed(0)
    classifier = models_vit.create_classifier("vit_small_patch16", **TIMM_TINY, num_classes=5, global_pool=True)
    torch.nn.init.normal_(classifier.head.weight)
    ckpt = tmp_path / "checkpoint-best.pth"
    save_atomic({"model": classifier.state_dict(), "model_cfg": classifier.config, "epoch": 3}, ckpt)
    hub = tmp_path / "hub"
    export_encoder.export(str(ckpt), str(tmp_path / "classifier.safetensors"), str(hub))  # both outputs
    model = local_dir_model(hub, caplog)
    assert model.num_classes == 5 and model.global_pool == "avg"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier.eval()(x))


def test_hub_dir_of_a_released_checkpoint_without_model_cfg(tmp_path, caplog):
    """MAE's / DeepMIM's released files hold only weights: heads come from the registry size that fits."""
    torch.manual_seed(0)
    encoder = models_vit.create_classifier("vit_small_patch16", img_size=32, num_classes=0, global_pool=False)
    released = tmp_path / "mae_pretrain_vit_small.pth"
    save_atomic({"model": encoder.state_dict()}, released)
    hub = tmp_path / "hub"
    export_encoder.export(str(released), None, str(hub))
    model = local_dir_model(hub, caplog)
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 6
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder.eval()(x))
    tiny = tmp_path / "tiny.pth"
    save_atomic({"model": models_vit.create_classifier("vit_small_patch16", **TIMM_TINY).state_dict()}, tiny)
    with pytest.raises(ValueError, match="number of heads is unknown"):
        export_encoder.export(str(tiny), None, str(tmp_path / "hub2"))


def test_command_line_hub_dir(tmp_path):
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    hub = tmp_path / "hub"
    run = subprocess.run([sys.executable, "tools/export_encoder.py", str(ckpt), "--hub_dir", str(hub)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and (hub / "config.json").is_file() and "local-dir:" in run.stderr, run.stderr
    none = subprocess.run([sys.executable, "tools/export_encoder.py", str(ckpt)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert none.returncode == 2 and "--hub_dir" in none.stderr


# ----------------------------------------------------------------------------------------------------------------
# The printed "load with" line runs as pasted (issue 13, item 8)
# ----------------------------------------------------------------------------------------------------------------


def printed_code(caplog) -> list[str]:
    return [r.getMessage().split("load with: ", 1)[1] for r in caplog.records if "load with: " in r.getMessage()]


def run_pasted(code: str, cwd, monkeypatch) -> torch.nn.Module:
    """exec the printed line in a fresh namespace from another folder, as a user pasting it would."""
    assert "<" not in code and "..." not in code, code  # no placeholders
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 (the point of the test)
    return namespace["model"].eval()


def test_printed_load_line_runs_as_pasted_for_pretraining_and_finetuned(tmp_path, caplog, monkeypatch):
    torch.manual_seed(0)
    classifier = models_vit.create_classifier("vit_small_patch16", **TIMM_TINY, num_classes=5, global_pool=True)
    torch.nn.init.normal_(classifier.head.weight)
    finetuned = tmp_path / "checkpoint-best.pth"
    save_atomic({"model": classifier.state_dict(), "model_cfg": classifier.config, "epoch": 3}, finetuned)
    pretrain = pretrain_checkpoint(tmp_path / "pretrain.pth")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)  # relative output paths, as typed on the command line
    for ckpt, out in ((pretrain, "encoder.safetensors"), (finetuned, "classifier.safetensors")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="export_encoder"):
            exported = export_encoder.export(str(ckpt), out, hub_dir=f"hub_{ckpt.stem}")
        file_line, hub_line = printed_code(caplog)
        for code in (file_line, hub_line):
            with caplog.at_level(logging.INFO, logger="timm"):
                model = run_pasted(code, elsewhere, monkeypatch)
            assert not [r for r in caplog.records if "Missing keys" in r.message or "Unexpected keys" in r.message]
            assert set(model.state_dict()) == set(exported)
            for key, value in model.state_dict().items():
                assert torch.equal(value, exported[key]), (code, key)
            monkeypatch.chdir(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier.eval()(x))  # the fine-tuned head and pooling came along


def test_printed_load_line_of_the_command_line_runs(tmp_path, monkeypatch):
    ckpt = pretrain_checkpoint(tmp_path / "pretrain.pth")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "export_encoder.py"), str(ckpt), "enc.safetensors"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (code,) = [line.split("load with: ", 1)[1] for line in run.stderr.splitlines() if "load with: " in line]
    model = run_pasted(code, ROOT, monkeypatch)
    assert set(model.state_dict()) == set(load_file(tmp_path / "enc.safetensors"))
