"""Training augmentation of the benchmark paper: large-scale jitter (LSJ) on images, boxes and instance masks, with
torchvision.transforms.v2 on tv_tensors.

The benchmark's recipe (detectron2 `RandomFlip` -> `ResizeScale(0.1, 2.0, 1024, 1024)` -> `FixedSizeCrop(1024)`,
boxes recomputed from the cropped masks) as v2 transforms: `RandomHorizontalFlip`, `ScaleJitter` (the image scaled
to fit `size` x `size` times a factor drawn from `scale_range`, aspect kept; masks with nearest), `RandomCrop` to
`size` x `size` with `pad_if_needed` (the pad is the ImageNet mean colour, 0 after normalisation, as the test-time
padding; masks pad with 0), boxes recomputed as the tight boxes of the cropped masks, and `SanitizeBoundingBoxes`
(instances whose box is degenerate, e.g. cropped away, are dropped with their masks and labels). Test images are not
transformed here: the detector's own transform resizes and pads them (`detection.model`).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from util.datasets import IMAGENET_MEAN

LSJ_SCALE = (0.1, 2.0)  # the benchmark's ResizeScale(min_scale=0.1, max_scale=2.0)
MEAN_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)

Target = dict[str, Any]


class TightBoxesFromMasks:
    """Replace every box by its mask's tight box (detectron2's `recompute_boxes` after cropping: a crop cuts a
    round object's box to the visible part, not to the clipped original box); instances whose mask was cropped
    away are dropped. Box convention of detectron2's `BitMasks.get_bounding_boxes`: (x0, y0, x_last + 1, y_last + 1)."""

    def __call__(self, image: tv_tensors.Image, target: Target) -> tuple[tv_tensors.Image, Target]:
        masks, boxes = target["masks"], target["boxes"]
        keep = (masks.flatten(1) != 0).any(dim=1)
        masks = masks[keep]
        tight = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]) if len(masks) else boxes[:0]
        target = {**target, "masks": tv_tensors.Mask(masks), "labels": target["labels"][keep],
                  "boxes": tv_tensors.wrap(tight.to(boxes.dtype), like=boxes)}
        return image, target


def lsj_transform(size: int, scale_range: tuple[float, float] = LSJ_SCALE) -> v2.Compose:
    """Large-scale jitter to `size` x `size`: (Image uint8 (3, H, W), target with 'boxes' (BoundingBoxes XYXY),
    'masks' (Mask (N, H, W)) and 'labels' (N,)) -> the same at `size` x `size`."""
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.ScaleJitter((size, size), scale_range=scale_range, antialias=True),
        v2.RandomCrop((size, size), pad_if_needed=True,
                      fill={tv_tensors.Image: MEAN_FILL, tv_tensors.Mask: 0, "others": 0}),
        TightBoxesFromMasks(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])
