"""A model from any checkpoint the analyses take, for `tools/` and the benchmarks: the one reading path of every tool.

Checkpoints written by `main_pretrain.py`, `main_finetune.py` and `main_linprobe.py`, the `.safetensors` exports of
`tools/export_encoder.py` and its timm Hub folders (`--hub_dir`: config.json + model.safetensors) carry "model_cfg"
(a Hub folder as timm's architecture and model_args), from which the architecture is rebuilt; released MAE / DeepMIM
files carry weights only, so the tools take `--model NAME` for them. The encoder analyses (CKA, head diversity, block
probes) take any of these; reconstructions and the validation loss need a pre-training checkpoint with its decoders;
the robustness evaluation needs a classifier (`analysis.robustness.load_classifier`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

import models_deepmim
import models_vit
from models_deepmim import MaskedAutoencoderDeepMIM

logger = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    model: MaskedAutoencoderDeepMIM
    name: str  # label in figures and JSON
    path: str
    epoch: int | None  # the checkpoint's "epoch" when it has one


# need a pre-training checkpoint's decoders
DECODER_TOOLS = ("tools/visualize.py", "tools/eval_recon_loss.py", "tools/export_mae.py")
ENCODER_TOOLS = ("tools/cka.py", "tools/head_diversity.py", "tools/probe_blocks.py")  # take anything with an encoder
CLASSIFIER_READOUT = ("head.", "fc_norm.")  # keys of a fine-tuned / probed classifier the analyses do not use


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint as a dict with "model" (and "model_cfg", "epoch" when stored): `models_vit.load_encoder_source`
    (a torch file read with weights_only, a `.safetensors` export whose metadata holds the source's "model_cfg", or
    a timm Hub folder). Raises ValueError naming the file when it is unreadable."""
    return models_vit.load_encoder_source(path)


def is_classifier_config(cfg: Mapping[str, Any]) -> bool:
    """True for the "model_cfg" of a fine-tuned or linear-probe classifier (main_finetune.py, main_linprobe.py:
    name 'vit_base_patch16', ...), False for a pre-training one ('deepmim_vit_base_patch16', 'mae_...')."""
    return str(cfg.get("name")) in models_vit.VIT_SIZES


def encoder_from_classifier_config(cfg: Mapping[str, Any], img_size: int | None = None) -> MaskedAutoencoderDeepMIM:
    """The encoder of a classifier config as a `MaskedAutoencoderDeepMIM` (same patch embedding, cls/pos slots and
    timm blocks, so its keys load as they are), with one minimal decoder that no encoder analysis reads. A linear
    probe of block K (`probe_block`) holds blocks 1..K only, so the encoder is built K blocks deep."""
    depth = cfg.get("probe_block") or cfg.get("depth")
    return models_deepmim.create_model(
        f"mae_{cfg['name']}", img_size=img_size or cfg.get("img_size"), patch_size=cfg.get("patch_size"),
        embed_dim=cfg.get("embed_dim"), depth=depth, num_heads=cfg.get("num_heads"), decoder_depth=1)


def _resample_learned_pos_embed(state: dict[str, Tensor], model: MaskedAutoencoderDeepMIM) -> dict[str, Tensor]:
    """A fine-tuned position embedding is learned, not sin-cos: resample it to the model's grid (bicubic, timm, cls
    slot kept) rather than recompute it."""
    old = state.get("pos_embed")
    if old is None or old.shape == model.pos_embed.shape:
        return state
    new = resample_abs_pos_embed(old, new_size=list(model.grid_size), num_prefix_tokens=1)
    logger.info("resampled the learned pos_embed %s -> %s", tuple(old.shape), tuple(new.shape))
    return {**state, "pos_embed": new}


def _state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def load_model(
    path: str | os.PathLike,
    model_name: str | None = None,
    img_size: int | None = None,
    norm_pix_loss: bool | None = None,
    require_decoders: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[MaskedAutoencoderDeepMIM, int | None]:
    """Build the model a checkpoint describes and load its weights; returns (model in eval mode, epoch or None).

    Accepts pre-training checkpoints (main_pretrain.py), fine-tuned and linear-probe classifiers (main_finetune.py,
    main_linprobe.py: their encoder, with the read-out left out), `.safetensors` exports (tools/export_encoder.py)
    and released MAE / DeepMIM weights. The architecture comes from the checkpoint's "model_cfg"; files without one
    need `model_name` (a registered name, e.g. 'mae_vit_base_patch16', or a classifier name such as
    'vit_base_patch16' for fine-tuned weights), and `norm_pix_loss` says whether their decoders predict
    per-patch-normalised pixels. img_size rebuilds the model for another input size: fixed sin-cos position
    embeddings are recomputed for the new grid, learned (fine-tuned) ones resampled.

    Raises ValueError naming the file when encoder weights are missing or misshapen, or when `require_decoders`
    and the file holds no decoder (a classifier, an export, MAE's encoder-only `mae_pretrain_*.pth`).
    """
    checkpoint = read_checkpoint(path)
    cfg = checkpoint.get("model_cfg")
    if cfg is None and model_name is None:
        raise ValueError(f"{path} has no 'model_cfg' (a released MAE/DeepMIM file?): pass --model with one of "
                         f"{', '.join(known_model_names())}")
    if cfg is not None and model_name is not None and model_name != cfg.get("name"):
        logger.warning("%s has a model_cfg (%s); ignoring --model %s", path, cfg.get("name"), model_name)
    cfg = dict(cfg) if cfg is not None else {"name": model_name, "norm_pix_loss": norm_pix_loss}
    classifier = is_classifier_config(cfg)
    state = _state_dict(checkpoint)
    if classifier:
        if require_decoders:
            raise ValueError(no_decoder_message(path, f"a classifier checkpoint (model_cfg name {cfg['name']!r}, "
                                                      "from main_finetune.py or main_linprobe.py)"))
        model = encoder_from_classifier_config(cfg, img_size)
        state = _resample_learned_pos_embed(state, model)
    else:
        model = models_deepmim.model_from_config(dict(cfg, **({"img_size": img_size} if img_size else {})))
    report = models_deepmim.load_pretrained(model, state)
    _check_load_report(path, report, require_decoders, classifier)
    epoch = checkpoint.get("epoch")
    return model.eval().to(device), int(epoch) if isinstance(epoch, (int, float)) else None


def known_model_names() -> list[str]:
    """Values `--model` takes: registered pre-training models, then classifier (fine-tuned) names."""
    return sorted(models_deepmim.MODELS) + sorted(models_vit.VIT_SIZES)


def no_decoder_message(path: str | os.PathLike, what: str) -> str:
    """The error of a decoder tool given an encoder-only file; names the file and the tools that accept it."""
    return (f"{path}: {what}: it holds the encoder only, no decoder. Reconstructions, the validation loss and MAE's "
            f"layout ({', '.join(DECODER_TOOLS)}) need a pre-training checkpoint of main_pretrain.py with its "
            f"decoders; {', '.join(ENCODER_TOOLS)} accept encoder-only files")


def _is_pos_embed(key: str) -> bool:
    # Fixed sin-cos buffers (MAE): rebuilt by the model for its grid, never learned.
    return key == "pos_embed" or (key.startswith("decoders.") and key.endswith(".pos_embed"))


def _check_load_report(path: str | os.PathLike, report: models_deepmim.LoadReport, require_decoders: bool,
                       classifier: bool = False) -> None:
    """Raise on missing encoder weights (or decoders when required); otherwise log what did not load, once.

    A classifier's final norm may be absent (global pooling, probes) and its pos_embed is learned, so must load;
    its head / fc_norm are expected leftovers. Only block outputs are analysed, never the final norm."""
    tolerated = (lambda k: k.startswith("norm.")) if classifier else _is_pos_embed
    missing = [k for k in report.missing if not tolerated(k)]
    encoder_missing = [k for k in missing if not k.startswith("decoders.")]
    if encoder_missing:
        raise ValueError(f"{path}: encoder weights missing or of another shape: {encoder_missing[:5]}"
                         f"{' ...' if len(encoder_missing) > 5 else ''} ({len(encoder_missing)} keys); "
                         "is --model (or the checkpoint's model_cfg) the right architecture?")
    decoder_missing = [k for k in missing if k.startswith("decoders.")]
    if decoder_missing and require_decoders:
        raise ValueError(no_decoder_message(path, f"decoder weights missing ({', '.join(decoder_missing[:3])} ...; "
                                                  "an export or an encoder-only release?)"))
    surprising = [k for k in report.unexpected if not (classifier and k.startswith(CLASSIFIER_READOUT))]
    level = logging.WARNING if surprising else logging.INFO
    if classifier:
        logger.log(level, "%s: loaded the encoder of a classifier; unused keys in the file (its read-out is not "
                   "analysed): %d %s", path, len(report.unexpected), report.unexpected[:5])
    elif decoder_missing or report.unexpected:
        logger.log(level, "%s: loaded; not in the file: %d decoder keys; unused keys in the file: %d %s", path,
                   len(decoder_missing), len(report.unexpected), report.unexpected[:5])
