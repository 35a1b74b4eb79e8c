"""ViT classifiers for fine-tuning and linear probing: timm's VisionTransformer configured as MAE's fine-tuning model.

Configuration, not a re-implementation: qkv bias, LayerNorm eps 1e-6, learned position embedding with a cls slot,
drop path, and MAE's two read-outs: `global_pool=True` averages the patch tokens and applies `fc_norm` (timm's
'avg' pool moves the final norm after pooling, exactly as MAE's models_vit does), `global_pool=False` reads the
normalised cls token.

Also here: loading pre-trained encoders (this project's checkpoints, MAE's `mae_pretrain_vit_*.pth`, the released
DeepMIM ones), the paper's layer studies: train only the last K blocks (Fig. 7) and re-initialise the last K
blocks before fine-tuning (Fig. 8), MAE's linear probe (BatchNorm + linear head on a frozen, possibly truncated
encoder), and the per-head attention maps of a block.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import Tensor, nn

from util.checkpoint import load_checkpoint
from util.config import check_range

logger = logging.getLogger(__name__)

VIT_SIZES: dict[str, tuple[int, int, int, int]] = {  # name: (patch_size, embed_dim, depth, num_heads)
    "vit_small_patch16": (16, 384, 12, 6),
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch14": (14, 1280, 32, 16),
    # The CPU demo's encoder (`main_pretrain.py --demo`, 32-px images): patch 4, width 128, 6 blocks, 4 heads.
    "vit_demo_patch4": (4, 128, 6, 4),
}
# Our classifier names -> the timm architecture with the same blocks (qkv bias, LayerNorm eps 1e-6, MLP ratio 4);
# exports spell out every size, so the demo's encoder is timm's ViT-S/16 with its own sizes.
TIMM_ARCHITECTURES = {
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
    "vit_demo_patch4": "vit_small_patch16_224",
}
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")
# Our classifier names -> the timm architecture with the same blocks (qkv bias, LayerNorm eps 1e-6, MLP ratio 4): the
# name `tools/export_encoder.py` writes into a Hub folder's config.json, and reads back from one.
TIMM_ARCHITECTURES = {
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}
PRETRAIN_PREFIXES = ("deepmim_", "mae_")

# Keys of pre-training checkpoints that are not part of the encoder: our decoders (`decoders.*`), MAE's and the
# released DeepMIM's decoders (`decoder_*`, `mask_token*`), CLIP/DINO teachers and the DeepMIM-dagger generator.
DROPPED_KEY = re.compile(r"^(decoders\.|decoder_|mask_token|teacher|generator)")
# Only the read-out may be missing after loading an encoder: the head (always re-initialised) and fc_norm
# (MAE's pre-training has no fc_norm; global pooling adds it).
ALLOWED_MISSING = re.compile(r"^(head|fc_norm)\.")
HEAD_INIT_STD = 2e-5  # MAE's main_finetune: trunc_normal_(head.weight, std=2e-5)
PROBE_HEAD_INIT_STD = 0.01  # MAE's main_linprobe: trunc_normal_(head.weight, std=0.01)


def encoder_name(name: str) -> str:
    """'deepmim_vit_base_patch16' or 'mae_vit_base_patch16' -> 'vit_base_patch16'; classifier names unchanged."""
    for prefix in PRETRAIN_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def check_name(name: str) -> None:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(VIT_SIZES))}")


def create_classifier(
    name: str = "vit_base_patch16",
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    global_pool: bool = True,
) -> VisionTransformer:
    """Build a registered ViT classifier; size overrides set to None keep the registry's values.

    Args:
        global_pool: average the patch tokens and apply fc_norm (MAE's fine-tuning default); False reads the
            normalised cls token.

    The result carries `model.config`, the fully resolved keyword arguments (plus "name"), which checkpoints store
    as "model_cfg" so `classifier_from_config` rebuilds the same model.
    """
    check_name(name)
    sizes = dict(zip(ARCH_KEYS, VIT_SIZES[name]))
    sizes.update({k: v for k, v in dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                        num_heads=num_heads).items() if v is not None})
    config = dict(name=name, img_size=img_size or 224, **sizes, num_classes=num_classes,
                  drop_path_rate=drop_path_rate, global_pool=global_pool)
    model = VisionTransformer(
        img_size=config["img_size"], patch_size=sizes["patch_size"], embed_dim=sizes["embed_dim"],
        depth=sizes["depth"], num_heads=sizes["num_heads"], mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes, drop_path_rate=drop_path_rate,
        global_pool="avg" if global_pool else "token",  # 'avg' -> mean of patch tokens, then fc_norm (MAE)
    )
    model.config = config
    return model


def classifier_from_config(config: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """Inverse of `model.config` (a fine-tuned checkpoint's "model_cfg"); `overrides` replace stored values."""
    config = {**config, **{k: v for k, v in overrides.items() if v is not None}}
    return create_classifier(config.pop("name"), **config)


def _factory(name: str) -> Callable[..., VisionTransformer]:
    def factory(**kwargs: Any) -> VisionTransformer:
        return create_classifier(name, **kwargs)

    patch_size, embed_dim, depth, num_heads = VIT_SIZES[name]
    factory.__name__ = name
    factory.__doc__ = f"ViT classifier: patch {patch_size}, width {embed_dim}, {depth} blocks, {num_heads} heads."
    return factory


vit_small_patch16 = _factory("vit_small_patch16")
vit_base_patch16 = _factory("vit_base_patch16")
vit_large_patch16 = _factory("vit_large_patch16")
vit_huge_patch14 = _factory("vit_huge_patch14")
vit_demo_patch4 = _factory("vit_demo_patch4")


def encoder_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture of the encoder a checkpoint's "model_cfg" describes.

    Accepts this project's pre-training configs ({"name": "deepmim_vit_base_patch16", **overrides}, where absent
    sizes are the registry's) and classifier configs. Returns {"name", "img_size", "patch_size", "embed_dim",
    "depth", "num_heads"} with the classifier registry name.
    """
    name = encoder_name(str(model_cfg.get("name", "")))
    check_name(name)
    sizes = dict(zip(ARCH_KEYS, VIT_SIZES[name]))
    sizes.update({k: model_cfg[k] for k in ARCH_KEYS if model_cfg.get(k) is not None})
    return {"name": name, "img_size": model_cfg.get("img_size") or 224, **sizes}


# --------------------------------------------------------------------------------------------------------------
# Loading pre-trained encoders
# --------------------------------------------------------------------------------------------------------------


def load_encoder_source(path: str | os.PathLike) -> dict[str, Any]:
    """Any file or folder that holds a ViT encoder, as a checkpoint: {"model": state dict, "model_cfg": ...}.

    - a torch checkpoint (`util.checkpoint.load_checkpoint`, weights_only): this project's pre-training, fine-tuning
      and probing checkpoints (with "model_cfg"), MAE's and DeepMIM's released files (weights only);
    - a `.safetensors` export of tools/export_encoder.py: its tensors, and the source's "model_cfg" from the
      metadata;
    - a timm Hub folder (`export_encoder.py --hub_dir`: config.json + model.safetensors): a classifier
      "model_cfg" from config.json's architecture and model_args.

    Where "model_cfg" is known, architecture and input size come from it (`resolve_architecture`). Raises
    ValueError naming the file or folder when it holds none of these.
    """
    path = Path(path)
    if path.is_dir():
        return load_hub_folder(path)
    return load_checkpoint(path)


def load_hub_folder(folder: Path) -> dict[str, Any]:
    """A timm Hub folder (config.json + model.safetensors) as {"model": tensors, "model_cfg": classifier config}."""
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(f"{folder} is a folder but not a timm Hub folder (config.json + model.safetensors, as "
                         "tools/export_encoder.py --hub_dir writes)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not JSON: {err}") from err
    return {"model": load_checkpoint(weights)["model"], "model_cfg": hub_classifier_config(config, str(folder))}


def hub_classifier_config(config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The classifier config (`create_classifier`'s arguments) of a timm Hub config.json: sizes from its
    model_args, else from the registry entry of its architecture; the registry name whose sizes these are."""
    arch, args = str(config.get("architecture", "")), dict(config.get("model_args") or {})
    by_arch = {timm_name: name for name, timm_name in reversed(TIMM_ARCHITECTURES.items())}
    if arch not in by_arch:
        raise ValueError(f"{where}: architecture {arch!r} is not a ViT this project builds "
                         f"({', '.join(sorted(by_arch))})")
    unknown = sorted(set(args) - {*ARCH_KEYS, "img_size", "num_classes", "global_pool", "in_chans"})
    if unknown or args.get("in_chans", 3) != 3:
        raise ValueError(f"{where}: timm {arch} with model_args {sorted(args)} is not a ViT this project builds "
                         f"({', '.join(unknown) or 'in_chans'} not as tools/export_encoder.py writes them)")
    sizes = dict(zip(ARCH_KEYS, VIT_SIZES[by_arch[arch]]))
    sizes.update({k: int(args[k]) for k in ARCH_KEYS if args.get(k) is not None})
    same = [name for name, values in VIT_SIZES.items() if values == tuple(sizes[k] for k in ARCH_KEYS)]
    img_size = args.get("img_size") or (config.get("pretrained_cfg") or {}).get("input_size", [3, 224])[-1]
    img_size = img_size[0] if isinstance(img_size, (list, tuple)) else img_size
    return {"name": same[0] if same else by_arch[arch], "img_size": int(img_size), **sizes,
            "num_classes": int(args.get("num_classes", config.get("num_classes", 0)) or 0),
            "global_pool": args.get("global_pool", config.get("global_pool")) == "avg"}


class EncoderLoadReport(NamedTuple):
    missing: list[str]  # only head.* / fc_norm.* (anything else raises)
    unexpected: list[str]  # e.g. norm.* when the model pools globally (MAE drops the final norm there too)
    dropped: list[str]  # decoder / teacher / generator / old head keys removed before loading
    resampled_pos_embed: bool


def encoder_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """A checkpoint ({"model": ...} or a bare state dict) -> its state dict, `module.` prefixes removed."""
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise ValueError("checkpoint holds no state dict (expected {'model': {...}} or a mapping of tensors)")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_encoder_weights(model: VisionTransformer, checkpoint: Mapping[str, Any]) -> EncoderLoadReport:
    """Load a pre-trained encoder into a classifier, as MAE's fine-tuning does.

    Decoder, teacher and generator weights and any old head are dropped; the position embedding is resampled
    (bicubic, timm) when the patch grid differs, keeping the cls slot; the head is re-initialised (trunc-normal,
    std 2e-5). Raises ValueError when an encoder weight is missing or has another shape. Does not log the
    missing / unexpected keys: its callers (main_finetune.build_model, build_probe) log the returned
    report once, with the file name.
    """
    state_dict = encoder_state_dict(checkpoint)
    dropped = sorted(k for k in state_dict if DROPPED_KEY.match(k) or k.startswith("head."))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    resampled = False
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape != model.pos_embed.shape:
        old = state_dict["pos_embed"]
        state_dict["pos_embed"] = resample_abs_pos_embed(
            old, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens
        )
        resampled = True
        logger.info("resampled pos_embed %s -> %s", tuple(old.shape), tuple(state_dict["pos_embed"].shape))
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError("checkpoint does not fit the model (give the pre-training architecture: --patch_size "
                         f"--embed_dim --depth --num_heads): {'; '.join(mismatched)}")
    result = model.load_state_dict(state_dict, strict=False)
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    bad = [k for k in missing if not ALLOWED_MISSING.match(k)]
    if bad:
        raise ValueError(f"encoder weights missing from the checkpoint: {bad}")
    reset_head(model)
    return EncoderLoadReport(missing, unexpected, dropped, resampled)


def reset_head(model: VisionTransformer, std: float = HEAD_INIT_STD) -> None:
    """MAE's head initialisation for fine-tuning: trunc-normal weights (std 2e-5), zero bias."""
    if isinstance(model.head, nn.Linear):
        trunc_normal_(model.head.weight, std=std)
        nn.init.zeros_(model.head.bias)


# --------------------------------------------------------------------------------------------------------------
# The paper's layer studies (Sec. 4, Figs. 7 and 8)
# --------------------------------------------------------------------------------------------------------------


def check_last_blocks(k: int, depth: int, flag: str) -> None:
    if not 1 <= k <= depth:
        raise ValueError(f"{flag} must be in 1..{depth} (the encoder depth), got {k}")


def set_trainable_blocks(model: VisionTransformer, k: int) -> list[str]:
    """Fig. 7: freeze the patch embedding, cls/pos embeddings and the first depth-K blocks; train the last K blocks,
    the final norm / fc_norm and the head. Frozen parameters get requires_grad=False, so neither the optimizer nor
    DDP's reducer sees them. Returns the names of the trainable parameters."""
    depth = len(model.blocks)
    check_last_blocks(k, depth, "--trainable_blocks")
    model.requires_grad_(False)
    for module in (*model.blocks[depth - k:], model.norm, model.fc_norm, model.head):
        module.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def reinit_last_blocks(model: VisionTransformer, k: int) -> None:
    """Fig. 8: re-initialise the last K blocks with timm's ViT initialisation (trunc-normal 0.02 linears, zero
    biases, unit LayerNorms), keeping the pre-trained weights of the first depth-K blocks."""
    depth = len(model.blocks)
    check_last_blocks(k, depth, "--reinit_blocks")
    with torch.no_grad():
        for block in model.blocks[depth - k:]:
            named_apply(init_weights_vit_timm, block)


# --------------------------------------------------------------------------------------------------------------
# Linear probes (main_linprobe.py; also rebuilt from their checkpoints by the analyses)
# --------------------------------------------------------------------------------------------------------------


def truncate_to_block(model: VisionTransformer, block: int) -> None:
    """Make `model` read block `block` (1-based): keep blocks 1..block, drop the final norm and fc_norm, and pool by
    averaging the patch tokens. Features: raw output of that block, (N, L, D) -> (N, D)."""
    check_last_blocks(block, len(model.blocks), "--probe_block")
    model.prune_intermediate_layers(indices=[block - 1], prune_norm=True, prune_head=True)
    model.reset_classifier(model.config["num_classes"], global_pool="avg")


def attach_probe_head(model: VisionTransformer) -> None:
    """MAE's probe head: BatchNorm1d without affine parameters (eps 1e-6) then the linear classifier, initialised
    trunc-normal (std 0.01); everything else frozen."""
    linear = model.head
    trunc_normal_(linear.weight, std=PROBE_HEAD_INIT_STD)
    nn.init.zeros_(linear.bias)
    model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    model.requires_grad_(False)
    model.head.requires_grad_(True)


def build_probe(config: Mapping[str, Any], checkpoint: Mapping[str, Any] | None = None) -> VisionTransformer:
    """A classifier from `config` (a classifier config plus "probe_block", a probe checkpoint's "model_cfg"), the
    encoder loaded from a pre-training `checkpoint` when given, truncated at the probed block, with a frozen encoder
    and a trainable probe head."""
    config = dict(config)
    probe_block = config.pop("probe_block", None)
    model = classifier_from_config(config)
    if checkpoint is not None:
        report = load_encoder_weights(model, checkpoint)
        logger.info("loaded the encoder: missing %s, unexpected %s", report.missing, report.unexpected)
    if probe_block is not None:
        truncate_to_block(model, probe_block)
    attach_probe_head(model)
    model.config = {**config, "probe_block": probe_block}
    return model


def is_probe_config(config: Mapping[str, Any]) -> bool:
    """True for the "model_cfg" of a linear probe (main_linprobe.py writes "probe_block", None for the last block)."""
    return "probe_block" in config


# --------------------------------------------------------------------------------------------------------------
# Attention of timm's blocks (head-diversity analysis, semantic-aware masking)
# --------------------------------------------------------------------------------------------------------------


def attention_probs(attn: nn.Module, qkv: Tensor, num_queries: int | None = None) -> Tensor:
    """softmax(q k^T * scale) of one timm `Attention` per head, in float32: (N, heads, Q, T).

    qkv: (N, T, 3 * heads * head_dim), the output of the block's qkv projection. num_queries: only the first Q query
    tokens (1: the class token's row); None: all T. timm's fused kernel never forms these maps, hence this."""
    n, tokens, _ = qkv.shape
    q, k, _ = qkv.float().reshape(n, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q[:, :, :num_queries]), attn.k_norm(k)  # (N, heads, Q, d), (N, heads, T, d)
    return ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)

# --------------------------------------------------------------------------------------------------------------
# Architecture flags of the classification scripts (main_finetune.py, main_linprobe.py)
# --------------------------------------------------------------------------------------------------------------


def add_arch_args(parser: argparse.ArgumentParser, input_size_help: str = "") -> argparse._ArgumentGroup:
    """The "Model" flags: --model, --input_size and one per `ARCH_KEYS` entry, all filled by `resolve_architecture`;
    returns the group for script-specific model flags."""
    g = parser.add_argument_group("Model")
    g.add_argument("--model", default=None, type=str, help=f"one of {', '.join(VIT_SIZES)}; default: "
                   "the --finetune checkpoint's encoder, else vit_base_patch16")
    g.add_argument("--input_size", default=None, type=int,
                   help=f"image size; default: the pre-training size of --finetune, else 224 {input_size_help}".strip())
    for name in ARCH_KEYS:
        g.add_argument(f"--{name}", default=None, type=int,
                       help="default: the --finetune checkpoint's value, else the registry's")
    return g


def resolve_architecture(args: argparse.Namespace, checkpoint: Mapping[str, Any] | None) -> None:
    """Fill --model / --input_size / --patch_size / --embed_dim / --depth / --num_heads.

    A --resume checkpoint fixes the whole classifier (its "model_cfg"); otherwise values not given on the command
    line come from the --finetune checkpoint's "model_cfg" (this project's checkpoints), then from the registry.
    """
    cfg = checkpoint.get("model_cfg") if checkpoint is not None else None
    if cfg is not None and args.resume:
        for key, flag in (("num_classes", "nb_classes"), ("global_pool", "global_pool")):
            if key in cfg and getattr(args, flag) not in (None, cfg[key]):
                logger.warning("--%s %s replaced by the --resume checkpoint's %s", flag, getattr(args, flag), cfg[key])
            if key in cfg:
                setattr(args, flag, cfg[key])
    if cfg is not None:
        encoder = encoder_config(cfg)
        fixed = bool(args.resume)  # a run in progress keeps its architecture
        if not fixed:
            check_given_architecture(args, encoder)
        for key in ("model", "input_size", *ARCH_KEYS):
            source = {"model": "name", "input_size": "img_size"}.get(key, key)
            if getattr(args, key) is None or fixed:
                setattr(args, key, encoder[source])
    args.model = args.model or "vit_base_patch16"
    if args.model not in VIT_SIZES:
        raise ValueError(f"--model {args.model!r} is unknown; known: {', '.join(VIT_SIZES)}")
    args.input_size = args.input_size or 224
    sizes = dict(zip(ARCH_KEYS, VIT_SIZES[args.model]))
    for key in ARCH_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
        check_range(args, key, 1, math.inf)
    if args.input_size % args.patch_size:
        raise ValueError(f"--input_size {args.input_size} must be a multiple of --patch_size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        raise ValueError(f"--embed_dim {args.embed_dim} must be a multiple of --num_heads {args.num_heads}")
    for flag in ("trainable_blocks", "reinit_blocks"):
        if getattr(args, flag, None) is not None:
            check_last_blocks(getattr(args, flag), args.depth, f"--{flag}")


def check_given_architecture(args: argparse.Namespace, encoder: Mapping[str, Any]) -> None:
    """Raise ValueError unless --model and the size flags given on the command line describe the encoder of the
    --finetune checkpoint (`encoder`: its `encoder_config`): another architecture would not hold its weights, and
    building the checkpoint's sizes under another --model name would mislabel the run. The checkpoint's own name,
    and names with the same sizes (an older checkpoint's name for the demo encoder), pass."""
    if args.model is None and all(getattr(args, k) is None for k in ARCH_KEYS):
        return
    if args.model is not None and args.model not in VIT_SIZES:
        raise ValueError(f"--model {args.model!r} is unknown; known: {', '.join(VIT_SIZES)}")
    own_name = args.model in (None, encoder["name"])  # the checkpoint's name stands for its (overridden) sizes
    wanted = {k: encoder[k] for k in ARCH_KEYS} if own_name else dict(zip(ARCH_KEYS, VIT_SIZES[args.model]))
    wanted.update({k: getattr(args, k) for k in ARCH_KEYS if getattr(args, k) is not None})
    differ = [k for k in ARCH_KEYS if wanted[k] != encoder[k]]
    if differ:
        given = " ".join(f"--{k} {getattr(args, k)}" for k in ("model", *ARCH_KEYS) if getattr(args, k) is not None)
        stored = ", ".join(f"{k} {encoder[k]}" for k in ARCH_KEYS)
        raise ValueError(f"{given} does not describe the --finetune checkpoint's encoder ({encoder['name']}: {stored}"
                         f"; differs in {', '.join(differ)}): leave these flags out to build the checkpoint's "
                         "architecture, or fine-tune a checkpoint of the architecture you want")
