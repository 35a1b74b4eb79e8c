"""Layer-wise learning-rate decay (BEiT; MAE's fine-tuning, the released segmentation code): the optimizer groups of
every task, from one rule.

A ViT of depth D has D + 2 "layers": 0 = the embeddings (cls token, position embedding, patch embedding), i + 1 =
block i, D + 1 = everything else (heads, necks, the pyramid). Layer l gets lr scale decay^(D + 1 - l): the
embeddings decay^(D + 1), block i decay^(D - i), the rest 1. A parameter gets no weight decay when it is 1-D, a bias,
or named in `no_weight_decay`.

The two users differ in two details, both reproduced here:
  * classification (main_finetune.py) gave exactly the groups of timm's `param_groups_layer_decay` with the model's
    `no_weight_decay()` (cls token and position embedding not decayed); timm counts the encoder's final `norm` as
    part of the last block (`final_norm_in_last_block`);
  * segmentation reproduces the released `LayerDecayOptimizerConstructor` (DeepMIM's `Segmentation/mmcv_custom/`),
    which compares unprefixed names ('pos_embed', 'cls_token') with the model's `backbone.`-prefixed ones, so the
    comparison never matches and the position embedding and cls token ARE weight-decayed (the segmentor passes no
    `no_weight_decay` names for that reason). Its relative position tables (2-D) are decayed too.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

# Parameters of layer 0 (BEiT's / timm's stem: `^cls_token|reg_token|pos_embed|patch_embed|norm_pre|rel_pos_bias`;
# the released rule: cls_token, mask_token, pos_embed, patch_embed).
EMBEDDING_NAMES = ("cls_token", "reg_token", "mask_token", "pos_embed", "patch_embed", "norm_pre", "rel_pos_bias")


def layer_id(name: str, depth: int, prefix: str = "", final_norm_in_last_block: bool = False) -> int:
    """The layer of parameter `name`: 0 for the embeddings, i + 1 for `blocks.i.*`, depth + 1 for the rest.

    Args:
        prefix: where the ViT sits in the model (e.g. 'backbone.vit.'); names outside it are "the rest".
        final_norm_in_last_block: the ViT's final `norm.*` joins block depth - 1 (timm's grouping for classifiers).
    """
    if not name.startswith(prefix):
        return depth + 1
    local = name[len(prefix):]
    if local.startswith(EMBEDDING_NAMES):
        return 0
    if local.startswith("blocks."):
        return int(local.split(".")[1]) + 1
    if final_norm_in_last_block and local.startswith("norm."):
        return depth
    return depth + 1


def uses_weight_decay(name: str, param: nn.Parameter, no_weight_decay: Collection[str] = ()) -> bool:
    """False for 1-D parameters (norms, biases, layer scales), biases and the names in `no_weight_decay`."""
    return not (param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay)


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    depth: int,
    *,
    prefix: str = "",
    no_weight_decay: Collection[str] = (),
    final_norm_in_last_block: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer groups {"lr_scale", "weight_decay", "params"}, one per (layer, decay or not), in the order their first
    parameter appears in `model.named_parameters()`; frozen parameters are left out. `util.lr_sched` multiplies each
    group's lr by its `lr_scale` at every update.

    Args:
        depth: number of blocks of the ViT (D above).
        prefix: the ViT's name prefix in `model` (see `layer_id`).
        no_weight_decay: full parameter names excluded from weight decay (besides 1-D parameters and biases).
    """
    groups: dict[str, dict[str, Any]] = {}
    top = depth + 1
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth, prefix, final_norm_in_last_block)
        decay = uses_weight_decay(name, param, no_weight_decay)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"lr_scale": layer_decay ** (top - layer), "weight_decay": weight_decay if decay else 0.0,
                           "params": []}
        groups[key]["params"].append(param)
    return list(groups.values())
