"""tools/export_mae.py: our MAE runs in MAE's checkpoint layout (issue 24, item 21). The export loads strictly into a
module with MAE's attribute names and reconstructs what our model reconstructs; it round-trips through this project's
MAE-layout loader (`models_deepmim.load_pretrained`) and the tools' reading path; DeepMIM runs keep the last block's
decoder; files MAE's layout cannot hold are refused, naming the file."""

import importlib.util
import logging
from functools import partial

import pytest
import torch
from conftest import ROOT, TINY
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import models_deepmim
import models_vit
from analysis import cli, loading
from models_deepmim import create_model
from tools import export_encoder
from util.checkpoint import save_atomic

spec = importlib.util.spec_from_file_location("export_mae", ROOT / "tools" / "export_mae.py")
export_mae = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_mae)

MAE_KEYS = {"cls_token", "pos_embed", "patch_embed", "blocks", "norm", "mask_token", "decoder_embed",
            "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred"}


class MAELayout(nn.Module):
    """The parameters of MAE's MaskedAutoencoderViT under its attribute names, and its decoder pass."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                 decoder_num_heads, mlp_ratio, norm_pix_loss):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, tokens, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                  norm_layer=norm) for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

    def reconstruct(self, imgs, ids_keep, ids_restore):
        """MAE's forward_encoder and forward_decoder for given masking indices: (N, L, p*p*3) for every patch."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        masked = self.mask_token.expand(len(x), ids_restore.shape[1] + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def save_run(path, name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model(name, **{**TINY, **overrides}).eval()
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 7, "args": {}}, path)
    return model


def masking(model, imgs):
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(0))
    ids_shuffle = noise.argsort(dim=1)
    keep = int(model.num_patches * 0.25)
    return noise, ids_shuffle[:, :keep], ids_shuffle.argsort(dim=1)


@torch.no_grad()
def test_mae_run_exports_in_mae_s_layout_and_reconstructs_the_same(tmp_path):
    ours = save_run(tmp_path / "mae.pth", "mae_vit_small_patch16", norm_pix_loss=True)
    exported = export_mae.export(tmp_path / "mae.pth", tmp_path / "mae_layout.pth")
    written = torch.load(tmp_path / "mae_layout.pth", weights_only=True)  # as MAE's notebook reads it, but safely
    assert {k.split(".")[0] for k in written["model"]} == MAE_KEYS and written["epoch"] == 7
    mae = MAELayout(**written["mae_model_args"]).eval()
    mae.load_state_dict(written["model"], strict=True)  # every key of MAE's model, nothing else
    assert exported["mae_model_args"]["norm_pix_loss"] is True and exported["mae_model_args"]["decoder_depth"] == 1
    imgs = torch.randn(2, 3, 32, 32)
    noise, ids_keep, ids_restore = masking(ours, imgs)
    latents, mask = ours.forward_encoder(imgs, 0.75, noise=noise)
    expected = ours.decoder_for(4)(latents[4], mask.ids_restore)
    torch.testing.assert_close(mae.reconstruct(imgs, ids_keep, ids_restore), expected)


@torch.no_grad()
def test_export_round_trips_through_the_mae_layout_loader(tmp_path, monkeypatch):
    ours = save_run(tmp_path / "mae.pth", "mae_vit_small_patch16", seed=1)
    export_mae.export(tmp_path / "mae.pth", tmp_path / "mae_layout.pth")
    written = torch.load(tmp_path / "mae_layout.pth", weights_only=True)
    torch.manual_seed(9)
    fresh = create_model("mae_vit_small_patch16", **TINY)
    report = models_deepmim.load_pretrained(fresh, written["model"])  # MAE's names -> decoders.4.*
    assert report.missing == [] and report.unexpected == []
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in fresh.state_dict().items())
    # The tools read it back with its model_cfg, and as a released MAE file (weights only) with --model.
    model, epoch = loading.load_model(tmp_path / "mae_layout.pth", require_decoders=True)
    assert epoch == 7 and all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())
    save_atomic({"model": written["model"]}, tmp_path / "weights_only.pth")
    monkeypatch.setitem(models_deepmim.MODELS, "tiny_mae",
                        lambda **kw: models_deepmim.MaskedAutoencoderDeepMIM(**{**TINY, **kw}))
    released, _ = loading.load_model(tmp_path / "weights_only.pth", "tiny_mae", require_decoders=True)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in released.state_dict().items())


@torch.no_grad()
def test_deepmim_run_keeps_the_last_block_s_decoder(tmp_path, caplog):
    ours = save_run(tmp_path / "deepmim.pth", "deepmim_vit_small_patch16", loss_weights=[1, 1, 2])
    with caplog.at_level(logging.WARNING):
        export_mae.export(tmp_path / "deepmim.pth", tmp_path / "layout.pth")
    assert "decoders on blocks [2, 3] are left out" in caplog.text
    written = torch.load(tmp_path / "layout.pth", weights_only=True)
    assert written["model_cfg"]["supervised_blocks"] == [4] and "loss_weights" not in written["model_cfg"]
    model, _ = loading.load_model(tmp_path / "layout.pth", require_decoders=True)
    imgs = torch.randn(2, 3, 32, 32)
    noise = masking(ours, imgs)[0]
    torch.testing.assert_close(model(imgs, noise=noise)[1][4], ours(imgs, noise=noise)[1][4])


@pytest.mark.parametrize("kind, message", [
    ("hog", "its decoders predict 108-d mse targets; MAE's decoder_pred predicts 192 pixels"),
    ("classifier", "a classifier checkpoint (model_cfg name 'vit_small_patch16'): it holds the encoder only"),
    ("safetensors", "decoder weights missing: it holds the encoder only"),
    ("hub", "a classifier checkpoint"),
    ("released", "has no 'model_cfg': a released MAE/DeepMIM file, already in MAE's layout"),
])
def test_files_mae_s_layout_cannot_hold_are_refused_by_name(tmp_path, kind, message, capsys):
    path = tmp_path / f"{kind}.pth"
    if kind == "hog":
        save_run(path, "mae_vit_small_patch16", pred_dim=108)
    elif kind == "classifier":
        classifier = models_vit.create_classifier("vit_small_patch16", img_size=32, patch_size=8, embed_dim=64,
                                                  depth=2, num_heads=4, num_classes=3)
        save_atomic({"model": classifier.state_dict(), "model_cfg": classifier.config}, path)
    elif kind == "released":
        save_atomic({"model": save_run(tmp_path / "run.pth", "mae_vit_small_patch16").state_dict()}, path)
    else:
        save_run(tmp_path / "run.pth", "mae_vit_small_patch16")
        path = tmp_path / ("run.safetensors" if kind == "safetensors" else "hub")
        export_encoder.export(str(tmp_path / "run.pth"), *((str(path),) if kind == "safetensors" else (None, path)))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(export_mae.get_args_parser(), export_mae.main, [str(path), str(tmp_path / "out.pth")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and str(path) in err
    assert not (tmp_path / "out.pth").exists()
