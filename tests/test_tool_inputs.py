"""Every tool takes what tools/eval_robustness.py takes: a checkpoint file, a .safetensors export and a timm Hub folder
(tools/export_encoder.py), read by the one path `analysis.loading.read_checkpoint`. One test per kind of tool:
encoder analyses (cka, head_diversity, probe_blocks), decoder analyses (visualize, eval_recon_loss: a Hub folder has
no decoder, and they say so), the classifier evaluation (eval_robustness) and the exports (export_encoder)."""

import importlib.util
import json

import pytest
import torch
from conftest import ROOT, TINY, write_image_folder
from safetensors.torch import load_file

import models_vit
from analysis import cli, loading, probes, robustness
from models_deepmim import create_model
from tools import export_encoder
from util.checkpoint import save_atomic

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"inputs_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pre-training checkpoint and a fine-tuned classifier, each as .pth, .safetensors and Hub folder."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    pretrain = create_model("deepmim_vit_small_patch16", **TINY).eval()
    save_atomic({"model": pretrain.state_dict(), "model_cfg": pretrain.config, "epoch": 4}, root / "pre.pth")
    torch.manual_seed(1)
    classifier = models_vit.create_classifier("vit_small_patch16", **ARCH, num_classes=5, global_pool=True).eval()
    save_atomic({"model": classifier.state_dict(), "model_cfg": classifier.config, "epoch": 9}, root / "ft.pth")
    out = {"root": root, "pretrain": pretrain, "classifier": classifier}
    for name in ("pre", "ft"):
        export_encoder.export(str(root / f"{name}.pth"), str(root / f"{name}.safetensors"), str(root / f"{name}_hub"))
        out[name] = {"pth": root / f"{name}.pth", "safetensors": root / f"{name}.safetensors",
                     "hub": root / f"{name}_hub"}
    write_image_folder(root / "images", num_images=8, size=40)
    write_image_folder(root / "splits" / "train", num_images=20, size=40, seed=1)
    write_image_folder(root / "splits" / "val", num_images=6, size=40, seed=2)
    return out


def tool_args(tool, files, out, *argv, data="images"):
    return tool.get_args_parser().parse_args(["--data_path", str(files["root"] / data), "--num_workers", "0",
                                              "--device", "cpu", "--output_dir", str(out), *argv])


def test_read_checkpoint_gives_the_same_classifier_from_every_form(files):
    forms = {form: loading.read_checkpoint(path) for form, path in files["ft"].items()}
    reference = files["classifier"].state_dict()
    for form, checkpoint in forms.items():
        assert set(checkpoint["model"]) == set(reference), form
        assert all(torch.equal(checkpoint["model"][k], v) for k, v in reference.items()), form
        cfg = models_vit.classifier_from_config(checkpoint["model_cfg"]).config
        assert {k: cfg[k] for k in ("name", "img_size", *models_vit.ARCH_KEYS, "num_classes", "global_pool")} == {
            "name": "vit_small_patch16", **ARCH, "num_classes": 5, "global_pool": True}, form


@pytest.mark.parametrize("tool_name, data, argv, result", [
    ("cka", "images", ["--batch_size", "4"], lambda d: d["cka_with_last_block"]["x"]),
    ("head_diversity", "images", ["--batch_size", "4"], lambda d: d["checkpoints"]["x"]["mean"]),
    ("probe_blocks", "splits", ["--num_images", "20"], lambda d: d["checkpoints"]["x"]["knn_acc1"]),
])
def test_encoder_tools_take_a_file_an_export_and_a_hub_folder(files, tmp_path, monkeypatch, tool_name, data, argv,
                                                               result):
    monkeypatch.setattr(probes, "logistic_probe", lambda *a, **k: {"acc1": 0.0})  # k-NN alone tells the features
    tool = load_tool(tool_name)
    values = {form: result(tool.main(tool_args(tool, files, tmp_path / form, "--ckpt", str(path), "--names", "x",
                                               *argv, data=data)))
              for form, path in files["ft"].items()}
    assert values["safetensors"] == pytest.approx(values["pth"], abs=1e-6)
    assert values["hub"] == pytest.approx(values["pth"], abs=1e-6)


@pytest.mark.parametrize("tool_name", ["visualize", "eval_recon_loss"])
def test_decoder_tools_name_a_hub_folder_as_encoder_only(files, tmp_path, tool_name):
    tool = load_tool(tool_name)
    hub = files["pre"]["hub"]
    with pytest.raises(cli.UsageError) as error:
        tool.main(tool_args(tool, files, tmp_path, "--ckpt", str(hub)))
    message = str(error.value)
    assert str(hub) in message and "holds the encoder only, no decoder" in message and "not found" not in message


def test_eval_robustness_takes_a_file_an_export_and_a_hub_folder(files):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = files["classifier"](x)
        for form, path in files["ft"].items():
            torch.testing.assert_close(robustness.load_classifier(path)(x), expected, msg=form)
    args = load_tool("eval_robustness").get_args_parser().parse_args(
        ["--ckpt", *map(str, files["ft"].values()), "--imagenet_a", str(files["root"]), "--device", "cpu"])
    load_tool("eval_robustness").check_args(args)  # the folder is not refused as "not found"
    assert args.names == ["ft.pth", "ft.safetensors", "ft_hub"]  # one stem, two forms: the suffix tells them apart


def test_export_encoder_takes_its_own_outputs(files, tmp_path):
    again = {}
    for form in ("safetensors", "hub"):
        out = tmp_path / f"{form}.safetensors"
        export_encoder.export(str(files["pre"][form]), str(out))
        again[form] = load_file(str(out))
    first = load_file(str(files["pre"]["safetensors"]))
    for form, state in again.items():
        assert set(state) == set(first) and all(torch.equal(state[k], first[k]) for k in first), form


def test_missing_paths_and_foreign_folders_are_named(files, tmp_path):
    args = load_tool("cka").get_args_parser().parse_args(["--ckpt", str(tmp_path / "nowhere"), "--demo_images"])
    with pytest.raises(cli.UsageError, match=r"--ckpt: not found: .*nowhere \(give a checkpoint file, a "
                                             r"\.safetensors export or a timm Hub folder"):
        cli.check_common_args(args)
    with pytest.raises(ValueError, match="is a folder but not a timm Hub folder"):
        loading.read_checkpoint(tmp_path)
    foreign = tmp_path / "resnet"
    foreign.mkdir()
    config = json.loads((files["ft"]["hub"] / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "architecture": "resnet50"}))
    (foreign / "model.safetensors").write_bytes((files["ft"]["hub"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="architecture 'resnet50' is not a ViT this project builds"):
        loading.read_checkpoint(foreign)
    config["model_args"]["class_token"] = False
    (foreign / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a ViT this project builds"):
        loading.read_checkpoint(foreign)
