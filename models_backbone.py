"""A pre-trained ViT encoder as a multi-scale backbone for dense tasks (segmentation; detection builds on it).

The backbone the released segmentation code builds (DeepMIM's `Segmentation/backbone/mae.py`, after BEiT and MAE's
segmentation recipe) is timm's `Beit`: absolute position embedding (resampled to the new grid), a relative position
bias table per block (initialised to zero), layer scale (initialised to 1) and drop path. Features of four blocks
(`out_indices`, [3, 5, 7, 11] for ViT-B) are made into strides 4, 8, 16, 32 by `SimpleFeaturePyramid`, which builds
every scale from one list of scale factors (detectron2's ViTDet pyramid; for patch 16 the factors are 4, 2, 1, 1/2:
deconv+norm+GELU+deconv, deconv, identity, max-pool, exactly the released `fpn1..fpn4`).

`load_backbone_weights` takes every encoder layout the project loads (`models_vit.encoder_state_dict`): this
project's pre-training and fine-tuning checkpoints, `.safetensors` exports, Meta's `mae_pretrain_vit_*.pth` and the
released DeepMIM files. It maps MAE's fused `qkv.bias` onto Beit's `q_bias` / `v_bias` (see `split_qkv_bias`),
resamples the position embedding, and reports exactly which weights are new (`BackboneLoadReport`).

Everything here works for any timm ViT with `forward_intermediates` (`MultiScaleViT` takes the encoder as a module),
so a windowed-attention variant for detection reuses the pyramid and the loading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.beit import Beit
from torch import Tensor, nn

from models_vit import ARCH_KEYS, DROPPED_KEY, encoder_state_dict

STRIDES = (4, 8, 16, 32)  # the pyramid the UperNet / Mask R-CNN heads read (released backbone, ViTDet)
NormLayer = Callable[[int], nn.Module]
CHECKPOINT_PREFIX_TOKENS = 1  # the class-token slot of every pre-trained position embedding the project loads

# Weights a dense backbone adds to a pre-trained encoder; they start from their initial values (the released
# backbone's "missing keys": relative position tables at 0, layer scales at 1; the pyramid's deconvolutions).
NEW_KEY_KINDS = (
    ("relative position tables", re.compile(r"(^|\.)relative_position_bias_table$")),
    ("layer scales", re.compile(r"(^|\.)gamma_[12]$")),
    ("pyramid", re.compile(r"^pyramid\.")),
)
# Checkpoint entries a backbone does not use: decoders, teachers and generators (`models_vit.DROPPED_KEY`), a
# classifier's read-out, the final norm (the released backbone taps raw block outputs; its log lists
# `norm.weight` / `norm.bias` as unexpected) and, for a backbone without a class token (detection's windowed ViT),
# the class token.
UNUSED_KEY = re.compile(r"^(head\.|fc_norm\.|norm\.|cls_token$)")


SEGMENTATION_TAPS = (1 / 3, 1 / 2, 2 / 3, 1)  # the released segmentation backbone
DETECTION_TAPS = (1 / 4, 1 / 2, 3 / 4, 1)  # four evenly spaced blocks (MAE A.3, the ViT detection benchmark)


def default_out_indices(depth: int, fractions: Sequence[float] = SEGMENTATION_TAPS) -> tuple[int, ...]:
    """Blocks whose outputs feed the pyramid, 0-based: depth x fractions - 1. Segmentation: [3, 5, 7, 11] for 12 blocks
    (the released config) and [7, 11, 15, 23] for 24 (BEiT-L's segmentation config); detection (`DETECTION_TAPS`):
    [2, 5, 8, 11] for 12 blocks and [5, 11, 17, 23] for 24."""
    return tuple(sorted({max(0, round(depth * f) - 1) for f in fractions}))


def pyramid_scale_factors(patch_size: int, strides: Sequence[int] = STRIDES) -> tuple[float, ...]:
    """Scale factor of each pyramid level relative to the patch grid: patch 16 -> (4, 2, 1, 0.5)."""
    factors = tuple(patch_size / s for s in strides)
    for stride, f in zip(strides, factors):
        if f <= 0 or not math.log2(f).is_integer():
            raise ValueError(f"stride {stride} is not a power-of-two multiple or fraction of patch size {patch_size}")
    return factors


def scale_op(factor: float, dim: int, norm_layer: NormLayer) -> nn.Module:
    """One pyramid level from the patch grid: up by 2^k with k stride-2 deconvolutions (norm + GELU between them),
    identity, or down by max-pooling. Factor 4: ConvT, norm, GELU, ConvT (the released fpn1); 2: ConvT (fpn2);
    1: identity (fpn3); 1/2: MaxPool(2) (fpn4); 1/4: MaxPool(4) (the released patch-8 fpn4)."""
    steps = round(math.log2(factor))
    if steps == 0:
        return nn.Identity()
    if steps < 0:
        return nn.MaxPool2d(kernel_size=2 ** -steps, stride=2 ** -steps)
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [norm_layer(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """Maps of one resolution (the patch grid) -> one map per scale factor (detectron2's SimpleFeaturePyramid without
    its output convolutions; the heads bring their own).

    forward(maps): a list with one (N, C, h, w) map per level (the released multi-block pyramid), or a single map used
    for every level (ViTDet's pyramid from the last block). Returns [(N, C, h * f, w * f) for f in scale_factors].
    """

    def __init__(self, scale_factors: Sequence[float], dim: int, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.scale_factors = tuple(scale_factors)
        self.scales = nn.ModuleList(scale_op(f, dim, norm_layer) for f in self.scale_factors)

    def forward(self, maps: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(maps, Tensor):
            maps = [maps] * len(self.scales)
        if len(maps) != len(self.scales):
            raise ValueError(f"{len(maps)} feature maps for {len(self.scales)} pyramid levels")
        return [op(x) for op, x in zip(self.scales, maps)]


class MultiScaleViT(nn.Module):
    """A ViT (any timm model with `forward_intermediates`) whose tapped block outputs become a feature pyramid.

    forward(images (N, 3, H, W)) -> [(N, C, H / s, W / s) for s in strides]; `vit` holds the pre-trained weights and
    `pyramid` the new ones (state-dict prefixes `vit.` and `pyramid.`, which layer-wise lr decay reads). One tapped
    block per stride (the released multi-block pyramid), or a single one that feeds every level (ViTDet's simple
    pyramid from the last block).
    """

    def __init__(self, vit: nn.Module, out_indices: Sequence[int], strides: Sequence[int] = STRIDES,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if len(out_indices) not in (1, len(strides)):
            raise ValueError(f"{len(out_indices)} tapped blocks for {len(strides)} strides (give one per stride, or "
                             "one for all)")
        patch_size = vit.patch_embed.patch_size[0]
        self.vit, self.out_indices, self.strides = vit, tuple(out_indices), tuple(strides)
        self.embed_dim = vit.embed_dim
        self.pyramid = SimpleFeaturePyramid(pyramid_scale_factors(patch_size, strides), vit.embed_dim, norm_layer)

    @property
    def channels(self) -> list[int]:
        return [self.embed_dim] * len(self.strides)

    def forward(self, images: Tensor) -> list[Tensor]:
        maps = self.vit.forward_intermediates(images, indices=list(self.out_indices), norm=False, output_fmt="NCHW",
                                              intermediates_only=True)
        return self.pyramid(maps[0] if len(maps) == 1 else maps)


def create_beit(encoder: Mapping[str, Any], img_size: int, drop_path_rate: float = 0.1,
                layer_scale_init: float | None = 1.0, rel_pos_bias: bool = True) -> Beit:
    """timm's Beit with the encoder's sizes (`patch_size`, `embed_dim`, `depth`, `num_heads`; MLP ratio 4, qkv bias,
    LayerNorm eps 1e-6 as MAE), the released backbone's extras (relative position bias per block, layer scale 1,
    drop path 0.1), absolute position embedding for `img_size`, and no final norm, pooling or head."""
    vit = Beit(img_size=img_size, patch_size=encoder["patch_size"], embed_dim=encoder["embed_dim"],
               depth=encoder["depth"], num_heads=encoder["num_heads"], mlp_ratio=4.0, qkv_bias=True, num_classes=0,
               global_pool="avg", drop_path_rate=drop_path_rate, init_values=layer_scale_init, use_abs_pos_emb=True,
               use_rel_pos_bias=rel_pos_bias)  # global_pool 'avg': no final norm (it moves to fc_norm) ...
    vit.fc_norm = nn.Identity()  # ... which is dropped with the head: the pyramid reads raw block outputs
    return vit


def create_backbone(encoder: Mapping[str, Any], img_size: int = 512, out_indices: Sequence[int] | None = None,
                    drop_path_rate: float = 0.1, norm_layer: NormLayer = nn.BatchNorm2d) -> MultiScaleViT:
    """The released segmentation backbone for an encoder of `encoder`'s sizes (a dict with `ARCH_KEYS`, e.g.
    `models_vit.encoder_config(model_cfg)`): Beit at `img_size` + the stride 4/8/16/32 pyramid."""
    missing = [k for k in ARCH_KEYS if k not in encoder]
    if missing:
        raise ValueError(f"encoder sizes missing: {missing}")
    indices = tuple(out_indices) if out_indices is not None else default_out_indices(encoder["depth"])
    if not all(0 <= i < encoder["depth"] for i in indices):
        raise ValueError(f"out_indices {list(indices)} must lie in 0..{encoder['depth'] - 1} (0-based blocks)")
    vit = create_beit(encoder, img_size, drop_path_rate)
    return MultiScaleViT(vit, indices, norm_layer=norm_layer)


# --------------------------------------------------------------------------------------------------------------
# Loading pre-trained encoders
# --------------------------------------------------------------------------------------------------------------


class BackboneLoadReport(NamedTuple):
    loaded: list[str]  # backbone keys that got a pre-trained tensor
    new: list[str]  # backbone keys left at their initial values (only the NEW_KEY_KINDS parts; anything else raises)
    unused: list[str]  # checkpoint keys the backbone does not use (UNUSED_KEY, DROPPED_KEY, the key part of qkv.bias)
    resampled_pos_embed: tuple[tuple[int, ...], tuple[int, ...]] | None  # (old shape, new shape)

    def describe(self, extra_new: Mapping[str, int] | None = None) -> str:
        """One paragraph for the log: counts of what was loaded, what is new (by kind) and what was not used."""
        kinds = {name: sum(1 for k in self.new if pattern.search(k)) for name, pattern in NEW_KEY_KINDS}
        kinds.update(extra_new or {})
        new = ", ".join(f"{name} ({n} tensors)" for name, n in kinds.items() if n)
        unused_groups = sorted({k.split(".")[0] for k in self.unused})
        text = (f"loaded {len(self.loaded)} encoder tensors; new (initialised here): {new or 'nothing'}; "
                f"not used from the checkpoint: {len(self.unused)} tensors ({', '.join(unused_groups) or 'none'})")
        if self.resampled_pos_embed:
            text += f"; pos_embed resampled {self.resampled_pos_embed[0]} -> {self.resampled_pos_embed[1]}"
        return text


def split_qkv_bias(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """MAE's fused `blocks.i.attn.qkv.bias` (3C) -> Beit's `q_bias` and `v_bias` (C each) where the model has them;
    returns the new state and the names of the dropped key-bias slices.

    Dropping the key bias changes nothing: a key bias b_k adds q_i . b_k to every logit of query i, the same amount
    for every key j, and softmax over j is invariant to a shift shared by the whole row; so the attention weights,
    the output and every gradient other than b_k's are the same. (b_k's own gradient is zero for the same reason,
    which is why BEiT does not learn it.) The relative position bias does not change this: it is added per (i, j)
    and does not depend on b_k.
    """
    out, dropped = dict(state), []
    for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
        prefix = key[: -len("qkv.bias")]
        if prefix + "q_bias" not in own:
            continue
        q, _, v = out.pop(key).chunk(3)
        out[prefix + "q_bias"], out[prefix + "v_bias"] = q, v
        dropped.append(key + "[key part]")
    return out, dropped


def resample_pos_embed(state: dict[str, Tensor], vit: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Resample `pos_embed` in place to the model's patch grid, keeping the class-token slot when the model has a
    class token (`num_prefix_tokens` 1) and dropping it when it has none (0: ViTDet's backbone); returns the shapes.

    Every encoder the project loads has one class-token slot (`CHECKPOINT_PREFIX_TOKENS`). Bicubic without
    antialiasing (`torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`), as the released loader
    (BEiT's `mmcv_custom/checkpoint.py`) does; timm's default antialias=True gives other values when upsampling
    14x14 -> 32x32.
    """
    old = state.get("pos_embed")
    target = getattr(vit, "pos_embed", None)
    if old is None or target is None or old.shape == target.shape:
        return None
    prefix = min(getattr(vit, "num_prefix_tokens", 1), CHECKPOINT_PREFIX_TOKENS)
    grid = resample_abs_pos_embed(old[:, CHECKPOINT_PREFIX_TOKENS:], new_size=list(vit.patch_embed.grid_size),
                                  num_prefix_tokens=0, antialias=False)
    state["pos_embed"] = torch.cat([old[:, :prefix], grid], dim=1)
    return tuple(old.shape), tuple(state["pos_embed"].shape)


def load_backbone_weights(backbone: MultiScaleViT, checkpoint: Mapping[str, Any]) -> BackboneLoadReport:
    """Load a pre-trained encoder (any layout `models_vit.encoder_state_dict` takes) into `backbone.vit`.

    Raises ValueError when a tensor has another shape (the encoder sizes differ), when an encoder weight is missing
    (anything new other than relative position tables, layer scales and the pyramid), or when the checkpoint holds
    keys that belong to no known part (not an encoder file). Logs nothing: the caller logs `report.describe()` once,
    with the file name.
    """
    own = backbone.vit.state_dict()
    state = {k: v for k, v in encoder_state_dict(checkpoint).items() if isinstance(v, Tensor)}
    state, k_bias = split_qkv_bias(state, own)
    resampled = resample_pos_embed(state, backbone.vit)
    unused = sorted(k for k in state if k not in own and (DROPPED_KEY.match(k) or UNUSED_KEY.match(k)))
    if resampled and getattr(backbone.vit, "num_prefix_tokens", 1) == 0:
        unused.append("pos_embed[class-token slot]")
    foreign = sorted(k for k in state if k not in own and k not in unused)
    if foreign:
        raise ValueError(f"checkpoint keys that are no part of a ViT encoder: {foreign[:8]}"
                         f"{' ...' if len(foreign) > 8 else ''} (is this an encoder checkpoint?)")
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError("checkpoint does not fit the backbone (give the pre-training architecture: --patch_size "
                         f"--embed_dim --depth --num_heads): {'; '.join(mismatched[:4])}")
    loadable = {k: v for k, v in state.items() if k in own}
    backbone.vit.load_state_dict(loadable, strict=False)
    new = sorted([f"vit.{k}" for k in own if k not in loadable] + [k for k in backbone.state_dict()
                                                                     if k.startswith("pyramid.")])
    missing = [k for k in new if not any(pattern.search(k) for _, pattern in NEW_KEY_KINDS)]
    if missing:
        raise ValueError(f"encoder weights missing from the checkpoint: {missing[:8]}")
    return BackboneLoadReport(sorted(f"vit.{k}" for k in loadable), new, sorted(unused + k_bias), resampled)


def backbone_config(backbone: MultiScaleViT) -> dict[str, Any]:
    """The arguments that rebuild `backbone` with `create_backbone` (stored in checkpoints' "model_cfg")."""
    vit = backbone.vit
    return {"img_size": int(vit.patch_embed.img_size[0]), "patch_size": int(vit.patch_embed.patch_size[0]),
            "embed_dim": int(vit.embed_dim), "depth": len(vit.blocks), "num_heads": int(vit.blocks[0].attn.num_heads),
            "out_indices": list(backbone.out_indices)}


def to_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when a process group is up on GPUs (the released `norm_cfg=dict(type='SyncBN')`):
    batch statistics over every GPU's 2 images rather than each GPU's own. torch's SyncBatchNorm runs on GPUs only, so
    CPU (gloo) runs keep per-process BatchNorm."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
