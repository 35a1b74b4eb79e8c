"""Mask R-CNN on the ViT backbone (paper Tab. 3): torchvision's `MaskRCNN` with the heads of its
`maskrcnn_resnet50_fpn_v2` (the benchmark paper's improved heads: a 2-conv RPN head, a 4conv-1fc box head and a
4-conv mask head, each conv followed by BatchNorm, which becomes SyncBatchNorm under DDP as the benchmark's SyncBN),
an FPN with normalisation and the extra max-pool level (P6) on the backbone's stride 4/8/16/32 maps.

The input pipeline is the benchmark's: training images arrive at `img_size` x `img_size` from large-scale jitter
(`detection.transforms`) and are not resized again; test images are resized so that their longer side is
`img_size` (detectron2's `ResizeShortestEdge(img_size, max_size=img_size)`) and padded to `img_size` x `img_size`
(the ViT's fixed grid), and detections are mapped back to the original image. Both come from torchvision's own
`GeneralizedRCNNTransform`: `min_size = max_size = img_size` gives the test resize, `size_divisible = img_size` the
square padding, and `_skip_resize` (the switch torchvision's LSJ reference recipe uses) keeps training images as
they are. Normalisation (ImageNet mean / std) happens there too, on float images in [0, 1]: pads are 0 after it,
the mean colour, as the training crops are padded with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models_backbone import BackboneLoadReport, MultiScaleViT, load_backbone_weights
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.layer_decay import param_groups_layer_decay

VIT_PREFIX = "backbone.body.vit."  # where the pre-trained ViT sits in the detector (layer-wise lr decay reads it)
# torchvision's FPN anchors: one size per level (P2..P6), three aspect ratios.
ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)


class ViTFPN(nn.Module):
    """`MultiScaleViT` -> torchvision `FeaturePyramidNetwork` (lateral 1x1 and output 3x3 convs with BatchNorm,
    top-down sums, P6 by max-pooling P5): forward(images (N, 3, S, S)) -> {'0'..'3', 'pool': (N, C, S/s, S/s)} for
    strides 4, 8, 16, 32, 64. `out_channels` is what torchvision's detection heads read."""

    def __init__(self, body: MultiScaleViT, out_channels: int = 256):
        super().__init__()
        self.body, self.out_channels = body, out_channels
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=nn.BatchNorm2d)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_maskrcnn(body: MultiScaleViT, num_classes: int, img_size: int, fpn_channels: int = 256,
                   box_fc_dim: int = 1024, rpn_batch_size_per_image: int = 256,
                   box_batch_size_per_image: int = 512, detections_per_img: int = 100) -> MaskRCNN:
    """Mask R-CNN with the v2 heads for `num_classes` object classes (+ background) on `body`.

    The RPN, RoI sampling and post-processing settings are torchvision's defaults (its v2 reference), except the
    batch sizes of RPN and RoI sampling and the detections per image, which the tests and the demo shrink.
    """
    convs, classes = [fpn_channels] * 4, num_classes + 1
    return MaskRCNN(
        ViTFPN(body, fpn_channels), num_classes=None,
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS),
        rpn_head=RPNHead(fpn_channels, len(ASPECT_RATIOS[0]), conv_depth=2),
        box_head=FastRCNNConvFCHead((fpn_channels, 7, 7), convs, [box_fc_dim], norm_layer=nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(box_fc_dim, classes),
        mask_head=MaskRCNNHeads(fpn_channels, convs, 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, classes),
        rpn_batch_size_per_image=rpn_batch_size_per_image, box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=detections_per_img,
        min_size=img_size, max_size=img_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        size_divisible=img_size, _skip_resize=True,
    )


def detector_config(model: MaskRCNN) -> dict[str, Any]:
    """Sizes of the heads (stored with the backbone's in checkpoints' "model_cfg")."""
    return {"num_classes": int(model.roi_heads.box_predictor.cls_score.out_features) - 1,
            "fpn_channels": int(model.backbone.out_channels),
            "box_fc_dim": int(model.roi_heads.box_predictor.cls_score.in_features)}


def load_pretrained(model: MaskRCNN, checkpoint: Mapping[str, Any]) -> tuple[BackboneLoadReport, dict[str, int]]:
    """Load a pre-trained encoder into the detector's ViT (`models_backbone.load_backbone_weights`: every layout the
    project loads, the report of exactly the new keys). Returns the report and the tensor count of the new detector
    parts outside the backbone (for `report.describe`)."""
    report = load_backbone_weights(model.backbone.body, checkpoint)
    parts = {"FPN": "backbone.fpn.", "RPN": "rpn.", "box head": "roi_heads.box_", "mask head": "roi_heads.mask_"}
    counts = {name: sum(1 for k in model.state_dict() if k.startswith(prefix)) for name, prefix in parts.items()}
    return report, counts


def param_groups(model: MaskRCNN, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: layer-wise lr decay by the project's one rule (`util.layer_decay`, as segmentation: embeddings
    decay^(D+1), block i decay^(D-i), FPN and heads 1; detectron2's `get_vit_lr_decay_rate` is the same rule) and
    the benchmark config's weight-decay exceptions: none for the position embedding and the relative position
    tables (its `overrides`), nor for 1-D parameters and biases."""
    no_decay = {name for name, _ in model.named_parameters()
                if name == VIT_PREFIX + "pos_embed" or name.endswith(".relative_position_bias_table")}
    return param_groups_layer_decay(model, weight_decay, layer_decay, depth=len(model.backbone.body.vit.blocks),
                                    prefix=VIT_PREFIX, no_weight_decay=no_decay)


def images_to_model(images: Tensor | list[Tensor], device: torch.device) -> list[Tensor]:
    """uint8 images ((N, 3, H, W) or a list of (3, H, W)) -> float [0, 1] images on `device`, as the detector's
    transform takes them (it normalises them on the device)."""
    return [image.to(device, non_blocking=True).float().div_(255.0) for image in images]
