"""The analysis tools end to end on tiny checkpoints on CPU (tools/*.py), and the helpers they share in analysis/:
checkpoint loading (loading.py), argument validation (cli.py), the fixed image sets and masks (images.py)."""

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

import models_deepmim
import models_vit
from analysis import cli, features, images, loading
from analysis.head_diversity import head_cosine_similarity, mean_pairwise
from analysis.visualize import grid_png_size
from models_deepmim import MaskedAutoencoderDeepMIM, create_model
from tools import export_encoder
from util import amp
from util.checkpoint import load_checkpoint, save_atomic
from util.patches import sincos_pos_embed

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=4)
NUM_IMAGES = 10


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLS = {name: load_tool(name) for name in ("visualize", "eval_recon_loss", "cka", "head_diversity", "probe_blocks")}


def save_tiny(path: Path, name: str, seed: int, epoch: int = 5, **overrides) -> MaskedAutoencoderDeepMIM:
    torch.manual_seed(seed)
    model = create_model(name, **{**TINY, **overrides})
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": epoch, "args": {}}, path)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = root / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return {
        "root": root, "images": str(root / "images"),
        "deepmim": str(root / "deepmim.pth"), "mae": str(root / "mae.pth"),
        "models": {"deepmim": save_tiny(root / "deepmim.pth", "deepmim_vit_small_patch16", 0, norm_pix_loss=True),
                   "mae": save_tiny(root / "mae.pth", "mae_vit_small_patch16", 1)},
    }


def run_tool(name: str, files, tmp_path, *argv: str):
    args = TOOLS[name].get_args_parser().parse_args(
        ["--data_path", files["images"], "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path),
         *argv])
    return TOOLS[name].main(args)


def all_images(files, input_size: int = 32) -> torch.Tensor:
    dataset = images.build_image_dataset(files["images"], NUM_IMAGES, input_size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


# -- the tools ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOOLS))
def test_every_tool_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[name].get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt" in out and "--demo_images" in out and "--output_dir" in out


def test_visualize_writes_a_grid_per_checkpoint(files, tmp_path):
    data = run_tool("visualize", files, tmp_path, "--ckpt", files["deepmim"], files["mae"], "--names", "DeepMIM",
                    "MAE", "--num_images", "3", "--panel_px", "48", "--per_image")
    with Image.open(tmp_path / "recon_DeepMIM.png") as png:
        assert png.size == grid_png_size(3, 2 + 3, 48)  # original, masked, decoders on blocks 2, 3, 4
    with Image.open(tmp_path / "recon_MAE.png") as png:
        assert png.size == grid_png_size(3, 2 + 1, 48)
    with Image.open(tmp_path / "recon_MAE_002.png") as png:
        assert png.size == grid_png_size(1, 2 + 1, 48)
    saved = json.loads((tmp_path / "recon.json").read_text())
    assert saved == json.loads(json.dumps(data))
    assert saved["checkpoints"]["DeepMIM"]["panels"] == ["original", "masked", "block 2", "block 3", "block 4"]
    assert all(len(p) == 12 for p in saved["checkpoints"]["MAE"]["masked_patches"])  # 75 % of 16 patches


def test_visualize_draws_hybrid_targets_of_deepmim_dagger(files, tmp_path):
    plain = run_tool("visualize", files, tmp_path / "plain", "--ckpt", files["deepmim"], "--num_images", "2")
    data = run_tool("visualize", files, tmp_path, "--ckpt", files["deepmim"], files["mae"], "--names", "DeepMIM",
                    "MAE", "--num_images", "2", "--panel_px", "32", "--hybrid_generator", files["mae"],
                    "--hybrid_alphas", "0", "0.5", "1")
    deepmim = data["checkpoints"]["DeepMIM"]
    assert deepmim["panels"][-3:] == ["target block 2", "target block 3", "target block 4"]
    assert deepmim["hybrid_alphas"] == {"2": 0.0, "3": 0.5, "4": 1.0}
    with Image.open(tmp_path / "recon_DeepMIM.png") as png:
        assert png.size == grid_png_size(2, 2 + 3 + 3, 32)
    # a = 1 is the image itself, so the last decoder's loss is unchanged; a = 0 is the generator's output.
    assert deepmim["loss"]["4"] == pytest.approx(plain["checkpoints"]["deepmim"]["loss"]["4"], rel=1e-6)
    assert deepmim["loss"]["2"] != pytest.approx(plain["checkpoints"]["deepmim"]["loss"]["2"], rel=1e-3)
    assert data["checkpoints"]["MAE"]["hybrid_alphas"] is None  # one decoder, three alphas: no targets drawn


def test_eval_recon_loss_matches_the_model_and_ignores_batch_size(files, tmp_path):
    mae_later = files["root"] / "mae-later.pth"
    save_tiny(mae_later, "mae_vit_small_patch16", 2, epoch=9)
    ckpts = ["--ckpt", files["mae"], str(mae_later), files["deepmim"], "--names", "MAE", "MAE", "DeepMIM"]
    data = run_tool("eval_recon_loss", files, tmp_path, *ckpts, "--batch_size", "3")
    again = run_tool("eval_recon_loss", files, tmp_path / "b8", *ckpts, "--batch_size", "8")
    for row, other in zip(data["checkpoints"], again["checkpoints"]):
        assert row["loss"] == pytest.approx(other["loss"], rel=1e-5)
    # Same images and masks, evaluated directly in one batch.
    imgs = all_images(files)
    noise = images.mask_noise(NUM_IMAGES, 16, seed=0)
    with torch.no_grad():
        _, losses, _, _ = files["models"]["deepmim"](imgs, mask_ratio=0.75, noise=noise)
    deepmim = data["checkpoints"][2]
    assert deepmim["loss"] == pytest.approx({str(b): float(v) for b, v in losses.items()}, rel=1e-5)
    assert deepmim["last_block_loss"] == deepmim["loss"]["4"]
    assert [row["epoch"] for row in data["checkpoints"]] == [5, 9, 5]
    assert (tmp_path / "recon_loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "recon_loss.json").read_text())["checkpoints"][1]["name"] == "MAE"


def test_cka_tool_fig4_and_fig5(files, tmp_path):
    data = run_tool("cka", files, tmp_path, "--ckpt", files["mae"], files["deepmim"], "--names", "MAE", "DeepMIM",
                    "--batch_size", "5", "--block", "3")
    assert set(data["cka_with_last_block"]) == {"MAE", "DeepMIM"}
    for values in data["cka_with_last_block"].values():
        assert len(values) == 4 and values[-1] == pytest.approx(1.0)
    cross = json.loads((tmp_path / "cka_cross.json").read_text())
    assert np.array(cross["matrix_a_rows_b_cols"]).shape == (4, 4)
    assert cross["a_block_vs_b_blocks"] == cross["matrix_a_rows_b_cols"][2]
    assert cross["num_images"] == NUM_IMAGES and cross["num_batches"] == 2
    assert (tmp_path / "cka_last_block.png").is_file() and (tmp_path / "cka_last_block.json").is_file()
    # One checkpoint under two names: the cross-model matrix is the within-model one, with 1 on the diagonal.
    same = run_tool("cka", files, tmp_path / "same", "--ckpt", files["mae"], files["mae"], "--names", "A", "B",
                    "--batch_size", "5", "--tokens", "mean")
    matrix = np.array(same["cross"]["matrix_a_rows_b_cols"])
    assert np.allclose(np.diag(matrix), 1.0, atol=1e-5)
    assert np.allclose(matrix, np.array(same["cka_between_blocks"]["A"]), atol=1e-5)


def test_head_diversity_tool_matches_one_pass_over_all_images(files, tmp_path):
    data = run_tool("head_diversity", files, tmp_path, "--ckpt", files["mae"], files["deepmim"], "--names", "MAE",
                    "DeepMIM", "--batch_size", "4")
    imgs = all_images(files)
    with torch.no_grad():
        heads = features.attention_head_outputs(files["models"]["deepmim"], imgs)
    expected = torch.stack([head_cosine_similarity(h) for h in heads])
    result = data["checkpoints"]["DeepMIM"]
    assert result["mean"] == pytest.approx(mean_pairwise(expected).tolist(), abs=1e-6)
    assert [len(p) for p in result["pairs"]] == [6] * 4 and result["pair_index"][0] == [0, 1]
    assert json.loads((tmp_path / "head_diversity.json").read_text())["checkpoints"]["MAE"]["num_heads"] == 4
    assert (tmp_path / "head_diversity.png").is_file()


def test_demo_images_are_deterministic_crops(files, tmp_path):
    first, second = images.DemoCrops(32, 10, seed=0), images.DemoCrops(32, 10, seed=0)
    assert len(first) == 10 and torch.equal(first[9][0], second[9][0])
    assert first[9][1] == 9 % len(first.photos)
    assert not torch.equal(first[1][0], first[1 + len(first.photos)][0])  # a later crop of the same photo differs
    args = TOOLS["head_diversity"].get_args_parser().parse_args(
        ["--ckpt", files["mae"], "--demo_images", "--num_images", "9", "--num_workers", "0", "--device", "cpu",
         "--output_dir", str(tmp_path)])
    assert TOOLS["head_diversity"].main(args)["num_images"] == 9


def test_script_runs_from_another_folder(files, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "cka.py"), "--ckpt", files["mae"], "--data_path", files["images"],
         "--num_images", "8", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--output_dir", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "cka_last_block.png").is_file()


# -- validation before compute -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tool, argv, message", [
    ("cka", ["--ckpt", "{root}/missing.pth"], "missing.pth"),
    ("cka", ["--ckpt", "{mae}", "--names", "a", "b"], "--names has 2 values"),
    ("cka", ["--ckpt", "{mae}", "{mae}"], "--names must be distinct"),
    ("cka", ["--ckpt", "{mae}", "--batch_size", "3"], "--batch_size must be >= 4"),
    ("cka", ["--ckpt", "{mae}", "{deepmim}", "--names", "a", "b", "--block", "5"], "--block 5 is outside 1..4"),
    ("head_diversity", ["--ckpt", "{mae}", "--model", "nope"], "--model ['nope'] unknown"),
    ("head_diversity", ["--ckpt", "{mae}", "--device", "gpu0"], "--device must be cpu, cuda or cuda:N, got 'gpu0'"),
    ("visualize", ["--ckpt", "{mae}", "--mask_ratio", "1.0"], "--mask_ratio"),
    ("visualize", ["--ckpt", "{mae}", "--hybrid_alphas", "0", "1"], "--hybrid_alphas needs --hybrid_generator"),
    ("visualize", ["--ckpt", "{encoder_only}"], "decoder weights missing"),
    ("visualize", ["--ckpt", "{no_cfg}"], "has no 'model_cfg'"),
    ("eval_recon_loss", ["--ckpt", "{mae}", "{big}", "--names", "a", "b"], "different input sizes"),
    ("eval_recon_loss", ["--ckpt", "{mae}", "--input_size", "36"], "not a multiple of"),
    ("eval_recon_loss", ["--ckpt", "{hog}"], "pixel-target checkpoints only"),
])
def test_bad_arguments_fail_before_compute(files, tmp_path, tool, argv, message):
    root = files["root"]
    extra = {"encoder_only": root / "encoder_only.pth", "no_cfg": root / "no_cfg.pth", "big": root / "big.pth",
             "hog": root / "hog.pth"}
    if not extra["big"].exists():
        state = files["models"]["mae"].state_dict()
        save_atomic({"model": {k: v for k, v in state.items() if not k.startswith("decoders.")},
                     "model_cfg": files["models"]["mae"].config}, extra["encoder_only"])
        save_atomic({"model": state}, extra["no_cfg"])
        save_tiny(extra["big"], "mae_vit_small_patch16", 0, img_size=48)
        save_tiny(extra["hog"], "mae_vit_small_patch16", 0, pred_dim=108)
    argv = [a.format(root=root, mae=files["mae"], deepmim=files["deepmim"], **extra) for a in argv]
    out = tmp_path / "out"
    with pytest.raises(cli.UsageError) as error:
        run_tool(tool, files, out, *argv)
    assert message in str(error.value)
    assert not any(out.glob("*.png"))


def test_usage_errors_exit_with_the_message(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cka.py", "--ckpt", str(tmp_path / "nowhere.pth"), "--demo_images",
                                      "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(TOOLS["cka"].get_args_parser(), TOOLS["cka"].main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cka.py: error: --ckpt") and "nowhere.pth" in err and "usage:" not in err


def test_loader_workers_default_to_what_the_machine_has(files, monkeypatch):
    monkeypatch.setattr(cli, "default_num_workers", lambda: 3)
    args = TOOLS["cka"].get_args_parser().parse_args(["--ckpt", str(files["deepmim"]), "--demo_images"])
    cli.check_common_args(args)
    assert args.num_workers == 3
    args = TOOLS["cka"].get_args_parser().parse_args(["--ckpt", str(files["deepmim"]), "--demo_images",
                                                      "--num_workers", "0"])
    cli.check_common_args(args)
    assert args.num_workers == 0


# -- analysis/loading.py, cli.py, images.py -------------------------------------------------------------------------


def test_released_weights_load_with_the_model_flag(files, tmp_path, monkeypatch):
    # A released MAE file: MAE's decoder key names, no model_cfg. "--model tiny_mae" names the architecture.
    monkeypatch.setitem(models_deepmim.MODELS, "tiny_mae", lambda **kw: MaskedAutoencoderDeepMIM(**{**TINY, **kw}))
    model = files["models"]["mae"]
    renames = {"decoders.4.embed": "decoder_embed", "decoders.4.mask_token": "mask_token",
               "decoders.4.blocks": "decoder_blocks", "decoders.4.norm": "decoder_norm",
               "decoders.4.pred": "decoder_pred", "decoders.4.pos_embed": "decoder_pos_embed"}
    released = {}
    for key, value in model.state_dict().items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        released[key] = value
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": released}, path)
    ours = run_tool("eval_recon_loss", files, tmp_path / "a", "--ckpt", files["mae"])
    theirs = run_tool("eval_recon_loss", files, tmp_path / "b", "--ckpt", str(path), "--model", "tiny_mae")
    assert theirs["checkpoints"][0]["loss"] == pytest.approx(ours["checkpoints"][0]["loss"], rel=1e-6)
    assert theirs["checkpoints"][0]["epoch"] is None


def test_load_model_at_another_input_size_recomputes_position_embeddings(files):
    model, epoch = loading.load_model(files["mae"], img_size=48)
    assert epoch == 5 and model.patch_embed.img_size[0] == 48
    assert torch.allclose(model.pos_embed, sincos_pos_embed((6, 6), 64))
    assert torch.equal(model.blocks[0].attn.qkv.weight, files["models"]["mae"].blocks[0].attn.qkv.weight)
    assert not model.training


def test_fixed_images_and_masks(files, tmp_path):
    subset = images.build_image_dataset(files["images"], 4, 32)
    assert subset.indices == [0, 3, 6, 9]  # evenly spaced over the folder
    assert len(images.build_image_dataset(files["images"], 50, 32)) == NUM_IMAGES
    val = tmp_path / "split" / "val" / "a"
    val.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(val / "0.png")
    assert len(images.build_image_dataset(str(tmp_path / "split"), 5, 32)) == 1  # val/ is preferred
    noise = images.mask_noise(6, 16, seed=3)
    assert torch.equal(noise[:2], images.mask_noise(2, 16, seed=3))
    assert not torch.equal(noise, images.mask_noise(6, 16, seed=4))
    assert cli.default_names(["a/x.pth", "b/x.pth"]) == ["a/x", "b/x"]


# -- fine-tuned and exported checkpoints (encoder tools accept them, decoder tools say why not) ----------------------


CLASSIFIER = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)


def save_classifier(path: Path, global_pool: bool = True, **extra_cfg) -> torch.nn.Module:
    """A checkpoint as main_finetune.py writes it: timm ViT keys; model_cfg: name vit_*, num_classes, global_pool."""
    torch.manual_seed(3)
    model = models_vit.create_classifier("vit_small_patch16", **CLASSIFIER, num_classes=5, global_pool=global_pool)
    save_atomic({"model": model.state_dict(), "model_cfg": {**model.config, **extra_cfg}, "epoch": 7}, path)
    return model.eval()


def timm_block_outputs(model: torch.nn.Module, imgs: torch.Tensor) -> list[torch.Tensor]:
    x = model._pos_embed(model.patch_embed(imgs))
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("global_pool", [True, False])
def test_finetuned_checkpoint_gives_the_classifier_s_block_features(tmp_path, global_pool):
    classifier = save_classifier(tmp_path / "checkpoint-best.pth", global_pool)
    model, epoch = loading.load_model(tmp_path / "checkpoint-best.pth")
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for ours, theirs in zip(features.encoder_block_features(model, imgs), timm_block_outputs(classifier, imgs),
                                strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert epoch == 7
    # Another input size resamples the learned (fine-tuned) position embedding as fine-tuning does, not sin-cos.
    bigger, _ = loading.load_model(tmp_path / "checkpoint-best.pth", img_size=48)
    expected = resample_abs_pos_embed(classifier.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(bigger.pos_embed, expected)


def test_encoder_tools_accept_finetuned_probed_and_exported_checkpoints(files, tmp_path):
    finetuned = tmp_path / "finetuned.pth"
    save_classifier(finetuned)
    probe = models_vit.build_probe({**CLASSIFIER, "name": "vit_small_patch16", "num_classes": 3,
                                       "drop_path_rate": 0.0, "global_pool": False, "probe_block": 2},
                                      load_checkpoint(files["mae"]))
    probed = tmp_path / "probe.pth"
    save_atomic({"model": probe.state_dict(), "model_cfg": probe.config}, probed)
    exported = tmp_path / "deepmim.safetensors"
    export_encoder.export(files["deepmim"], str(exported))
    data = run_tool("cka", files, tmp_path / "cka", "--ckpt", str(finetuned), files["mae"], str(probed),
                    str(exported), "--names", "FT", "MAE", "probe", "export", "--batch_size", "5")
    assert [len(data["cka_with_last_block"][n]) for n in ("FT", "MAE", "probe", "export")] == [4, 4, 2, 4]
    heads = run_tool("head_diversity", files, tmp_path / "heads", "--ckpt", str(finetuned), str(exported),
                     "--names", "FT", "export")
    with torch.no_grad():
        expected = features.attention_head_outputs(files["models"]["deepmim"], all_images(files))
    means = mean_pairwise(torch.stack([head_cosine_similarity(h) for h in expected])).tolist()
    assert heads["checkpoints"]["export"]["mean"] == pytest.approx(means, abs=1e-6)  # the export is the encoder


@pytest.mark.parametrize("tool", ["visualize", "eval_recon_loss"])
def test_decoder_tools_name_the_encoder_only_file(files, tmp_path, tool):
    finetuned = tmp_path / "finetuned.pth"
    save_classifier(finetuned)
    exported = tmp_path / "mae.safetensors"
    export_encoder.export(files["mae"], str(exported))
    for path in (finetuned, exported):
        with pytest.raises(cli.UsageError) as error:
            run_tool(tool, files, tmp_path / "out", "--ckpt", str(path))
        message = str(error.value)
        assert str(path) in message and "holds the encoder only, no decoder" in message, message
        assert "tools/cka.py, tools/head_diversity.py, tools/probe_blocks.py accept" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_flag_takes_a_classifier_name_for_finetuned_weights_without_model_cfg(files, tmp_path):
    torch.manual_seed(4)
    classifier = models_vit.create_classifier("vit_small_patch16", img_size=32, num_classes=5).eval()
    released = tmp_path / "mae_finetuned_vit_small.pth"  # MAE's released fine-tuned files hold weights only
    save_atomic({"model": classifier.state_dict()}, released)
    args = TOOLS["cka"].get_args_parser().parse_args(
        ["--ckpt", str(released), "--model", "vit_small_patch16", "--demo_images", "--input_size", "32"])
    cli.check_common_args(args)  # a classifier name is a known --model
    model, _ = loading.load_model(released, "vit_small_patch16", img_size=32)
    imgs = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(features.encoder_block_features(model, imgs)[-1],
                                   timm_block_outputs(classifier, imgs)[-1])


# -- the load report is logged once (issue 13, item 9) -----------------------------------------------------------


def test_load_report_is_logged_once(files, tmp_path, caplog):
    state = dict(files["models"]["mae"].state_dict())
    state["teacher.proj.weight"] = torch.zeros(2, 2)  # an unused key, besides missing decoders below
    path = tmp_path / "extra.pth"
    save_atomic({"model": {k: v for k, v in state.items() if not k.startswith("decoders.")},
                 "model_cfg": files["models"]["mae"].config}, path)
    with caplog.at_level(logging.DEBUG):
        loading.load_model(path)
    lines = [r.getMessage() for r in caplog.records
             if any(word in r.getMessage() for word in ("missing", "unexpected", "unused", "not in the file"))]
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "teacher.proj.weight" in lines[0]


# -- --device: the training scripts' rule (issue 13, item 13) -------------------------------------------------------


@pytest.mark.parametrize("cuda", [True, False])
def test_device_defaults_to_cuda_when_available(files, monkeypatch, cuda):
    parsers = {name: tool.get_args_parser() for name, tool in TOOLS.items()}  # built before the mock, as at import
    assert all(parser.get_default("device") is None for parser in parsers.values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for name in (*amp.GPU_LIST_VARS, *amp.GPU_COUNT_VARS):  # no GPU requested (else no CPU fallback)
        monkeypatch.delenv(name, raising=False)
    args = parsers["head_diversity"].parse_args(["--ckpt", files["mae"], "--demo_images"])
    cli.check_common_args(args)
    assert args.device == ("cuda" if cuda else "cpu") == amp.resolve_device(None)
    if not cuda:
        args = parsers["cka"].parse_args(["--ckpt", files["mae"], "--demo_images", "--device", "cuda"])
        with pytest.raises(cli.UsageError, match="--device cuda but CUDA is not available"):
            cli.check_common_args(args)
