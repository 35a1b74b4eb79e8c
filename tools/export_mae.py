#!/usr/bin/env python
"""Export a pre-training checkpoint in MAE's layout, so that MAE's own code and its visualisation notebook read it.

    python tools/export_mae.py output_dir/checkpoint-799.pth mae_layout.pth

MAE's `models_mae.MaskedAutoencoderViT` holds one decoder, on the last block, under the names `mask_token`,
`decoder_embed`, `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`, `decoder_pred`; its encoder keys
(`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.*`, `norm`) are ours already. The file is MAE's checkpoint
dict: {"model": state dict} (MAE's notebook:
`model.load_state_dict(torch.load(path, weights_only=True)["model"], strict=False)`; plain values only), plus
"model_cfg" (the same model with that one decoder, so this project's tools read the file back without --model),
"epoch" and "mae_model_args": the arguments of MAE's constructor that build the matching model, also printed.

An MAE run (`mae_vit_*`) exports whole. A DeepMIM run exports its encoder and the decoder on the last block (the one
MAE's code can run: it reads the final-normed last block); the decoders on intermediate blocks are left out, named in
the log. Only pixel-target checkpoints: MAE's `decoder_pred` predicts p*p*3 pixels, not HOG or teacher features.
Reads what every tool reads (`analysis.loading.read_checkpoint`); encoder-only files (classifiers, .safetensors
exports, Hub folders) hold no decoder and are refused, naming the file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import models_deepmim  # noqa: E402
import models_vit  # noqa: E402
from analysis import cli  # noqa: E402
from analysis.loading import is_classifier_config, no_decoder_message, read_checkpoint  # noqa: E402
from models_deepmim import MaskedAutoencoderDeepMIM  # noqa: E402
from util.checkpoint import save_atomic  # noqa: E402

logger = logging.getLogger("export_mae")


def load_pixel_autoencoder(path: str | Path, checkpoint: Mapping[str, Any]) -> MaskedAutoencoderDeepMIM:
    """The pre-training model `checkpoint` describes, with every weight loaded (this project's loader,
    `models_deepmim.load_pretrained`). Raises ValueError naming `path` for classifiers, encoder-only files,
    non-pixel targets and files without model_cfg."""
    cfg = checkpoint.get("model_cfg")
    if cfg is None:
        raise ValueError(f"{path} has no 'model_cfg': a released MAE/DeepMIM file, already in MAE's layout (or the "
                         "released DeepMIM's, which models_deepmim.load_pretrained reads)")
    if is_classifier_config(cfg):
        raise ValueError(no_decoder_message(path, f"a classifier checkpoint (model_cfg name {cfg['name']!r})"))
    model = models_deepmim.model_from_config(cfg)
    if model.pred_dim != model.patch_size**2 * model.in_chans or model.loss_type != "mse":
        raise ValueError(f"{path}: its decoders predict {model.pred_dim}-d {model.loss_type} targets; MAE's "
                         f"decoder_pred predicts {model.patch_size**2 * model.in_chans} pixels of a patch")
    report = models_deepmim.load_pretrained(model, models_vit.encoder_state_dict(checkpoint))
    if any(k.startswith("decoders.") for k in report.missing):
        raise ValueError(no_decoder_message(path, "decoder weights missing"))
    if report.missing or report.unexpected:
        raise ValueError(f"{path}: the weights do not fit its model_cfg: missing {report.missing[:5]}, unexpected "
                         f"{report.unexpected[:5]}")
    return model.eval()


def mae_state_dict(model: MaskedAutoencoderDeepMIM) -> tuple[dict[str, Tensor], list[int]]:
    """The encoder and the last block's decoder under MAE's key names (the inverse of
    `models_deepmim.MAE_PART_NAMES`); returns it and the blocks whose decoders were left out."""
    key = models_deepmim.SHARED_KEY if model.shared_decoder else str(model.depth)
    prefix = f"decoders.{key}."
    mae_names = {ours: theirs for theirs, ours in models_deepmim.MAE_PART_NAMES.items()}
    out = {}
    for name, value in model.state_dict().items():
        if not name.startswith("decoders."):
            out[name] = value
        elif name.startswith(prefix):
            part, dot, rest = name[len(prefix):].partition(".")
            out[mae_names[part] + dot + rest] = value
    left_out = [] if model.shared_decoder else [b for b in model.supervised_blocks if b != model.depth]
    return out, left_out


def mae_model_args(model: MaskedAutoencoderDeepMIM) -> dict[str, Any]:
    """Keyword arguments of MAE's `MaskedAutoencoderViT` for the exported model (plus its LayerNorm eps 1e-6, which
    MAE's factories pass as `norm_layer=partial(nn.LayerNorm, eps=1e-6)`)."""
    decoder = model.decoder_for(model.depth)
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_size, in_chans=model.in_chans,
                embed_dim=model.cls_token.shape[-1], depth=model.depth, num_heads=model.blocks[0].attn.num_heads,
                decoder_embed_dim=decoder.embed.out_features, decoder_depth=len(decoder.blocks),
                decoder_num_heads=decoder.blocks[0].attn.num_heads, mlp_ratio=4.0, norm_pix_loss=model.norm_pix_loss)


def export(checkpoint_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write `checkpoint_path` in MAE's layout to `out_path` (atomic); returns what was written."""
    checkpoint = read_checkpoint(checkpoint_path)
    model = load_pixel_autoencoder(checkpoint_path, checkpoint)
    state, left_out = mae_state_dict(model)
    if left_out:
        logger.warning("%s: the decoders on blocks %s are left out (MAE's layout holds the last block's only)",
                       checkpoint_path, left_out)
    cfg = {**checkpoint["model_cfg"], "supervised_blocks": [model.depth], "shared_decoder": False}
    cfg.pop("loss_weights", None)
    exported = {"model": state, "model_cfg": cfg, "epoch": checkpoint.get("epoch"),
                "mae_model_args": mae_model_args(model)}
    save_atomic(exported, out_path)
    args = ", ".join(f"{k}={v!r}" for k, v in exported["mae_model_args"].items())
    logger.info("wrote %d tensors to %s; in MAE's code: models_mae.MaskedAutoencoderViT(%s, "
                "norm_layer=partial(nn.LayerNorm, eps=1e-6))"
                ".load_state_dict(torch.load(%r, weights_only=True)['model'])",
                len(state), out_path, args, str(Path(out_path).resolve()))
    return exported


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("checkpoint", help="pre-training checkpoint of main_pretrain.py (pixel targets)")
    parser.add_argument("output", help="output .pth file in MAE's layout")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return export(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError) as err:
        raise cli.UsageError(str(err)) from err


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run_cli(get_args_parser(), main)
