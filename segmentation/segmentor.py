"""The released UperNet segmentor (mmseg's EncoderDecoder): the multi-scale ViT backbone (`models_backbone`), the
UPerHead on all four maps and the auxiliary FCNHead on the third (stride 16), their losses, and loading a
pre-trained encoder with a report of every new weight.

Loss (mmseg 0.11's CrossEntropyLoss as the released config uses it): logits upsampled (bilinear) to the label's
size, cross-entropy with ignore index 255, summed and divided by ALL label pixels, ignored ones included (mmseg
before 0.23 has no `avg_non_ignore`; its 'mean' averages the per-pixel losses, zeros of ignored pixels included).
Total: decode loss + 0.4 x auxiliary loss.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

import models_backbone
from models_backbone import BackboneLoadReport, MultiScaleViT
from segmentation.heads import FCNHead, UPerHead, upsample
from segmentation.transforms import IGNORE_INDEX

logger = logging.getLogger(__name__)

AUX_INDEX = 2  # the FCN head reads the stride-16 map (released in_index=2)


class Segmentor(nn.Module):
    """backbone -> UPerHead (+ FCNHead). forward(images (N, 3, H, W)) -> {"decode": (N, K, H/4, W/4), "aux":
    (N, K, H/16, W/16)} (aux only while training); `predict(images)` -> decode logits upsampled to (H, W).

    `config` holds every constructor argument (checkpoints store it as "model_cfg"; `segmentor_from_config`).
    """

    def __init__(self, backbone: MultiScaleViT, num_classes: int, channels: int = 768, aux_channels: int = 256,
                 aux_weight: float = 0.4, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.decode_head = UPerHead(backbone.channels, channels, num_classes, dropout=dropout)
        self.auxiliary_head = FCNHead(backbone.channels[AUX_INDEX], aux_channels, num_classes, dropout=dropout) \
            if aux_weight > 0 else None
        self.aux_weight, self.num_classes = aux_weight, num_classes
        self.config = {**models_backbone.backbone_config(backbone), "num_classes": num_classes, "channels": channels,
                       "aux_channels": aux_channels, "aux_weight": aux_weight, "dropout": dropout}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        maps = self.backbone(images)
        out = {"decode": self.decode_head(maps)}
        if self.training and self.auxiliary_head is not None:
            out["aux"] = self.auxiliary_head(maps[AUX_INDEX])
        return out

    def predict(self, images: Tensor) -> Tensor:
        """Decode-head logits at the input's size (mmseg's encode_decode); the auxiliary head is not used."""
        return upsample(self.decode_head(self.backbone(images)), images.shape[-2:])


def pixel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits (N, K, h, w) upsampled to labels (N, H, W), ignore index 255, summed over labelled
    pixels and divided by every pixel (mmseg 0.11, module docstring). Computed in float32."""
    logits = upsample(logits.float(), labels.shape[-2:])
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / labels.numel()


def segmentation_loss(model: Segmentor, outputs: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, dict]:
    """(decode loss + aux_weight x aux loss, {"decode": ..., "aux": ...})."""
    losses = {name: pixel_loss(logits, labels) for name, logits in outputs.items()}
    total = losses["decode"] + model.aux_weight * losses["aux"] if "aux" in losses else losses["decode"]
    return total, losses


def create_segmentor(encoder: Mapping[str, Any], num_classes: int, img_size: int = 512,
                     out_indices: list[int] | None = None, drop_path_rate: float = 0.1, channels: int = 768,
                     aux_channels: int = 256, aux_weight: float = 0.4, dropout: float = 0.1) -> Segmentor:
    """The released UperNet for an encoder of `encoder`'s sizes (patch_size, embed_dim, depth, num_heads)."""
    backbone = models_backbone.create_backbone(encoder, img_size, out_indices, drop_path_rate)
    return Segmentor(backbone, num_classes, channels, aux_channels, aux_weight, dropout)


def segmentor_from_config(config: Mapping[str, Any], drop_path_rate: float = 0.1) -> Segmentor:
    """Rebuild a segmentor from its `config` (a checkpoint's "model_cfg")."""
    cfg = dict(config)
    encoder = {k: cfg.pop(k) for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    return create_segmentor(encoder, cfg.pop("num_classes"), cfg.pop("img_size"), cfg.pop("out_indices"),
                            drop_path_rate, **cfg)


def load_pretrained_encoder(model: Segmentor, checkpoint: Mapping[str, Any]) -> BackboneLoadReport:
    """Load an encoder checkpoint (every layout `models_backbone.load_backbone_weights` takes) into the backbone;
    the returned report's `describe(head_counts(model))` names every new part, heads included."""
    return models_backbone.load_backbone_weights(model.backbone, checkpoint)


def head_counts(model: Segmentor) -> dict[str, int]:
    """Tensors of each head (new in every fine-tuning), for `BackboneLoadReport.describe`."""
    heads = {"decode head": model.decode_head, "auxiliary head": model.auxiliary_head}
    return {name: len(head.state_dict()) for name, head in heads.items() if head is not None}
