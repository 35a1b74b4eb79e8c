"""The released decode heads (mmseg 0.11's `UPerHead` and `FCNHead`, as the DeepMIM segmentation log prints them).

UPerHead (Xiao et al. 2018): a pyramid-pooling module (scales 1, 2, 3, 6) on the coarsest map, 1x1 lateral convs on
the others, a top-down sum, 3x3 FPN convs, every level upsampled to the finest and concatenated, one 3x3 bottleneck,
dropout 0.1 and a 1x1 classifier. FCNHead (the auxiliary head on the third map): one 3x3 conv to 256 channels,
dropout 0.1, 1x1 classifier. Every conv is conv (no bias) + BatchNorm + ReLU (mmcv's ConvModule; BatchNorm becomes
SyncBatchNorm under DDP); upsampling is bilinear with align_corners=False.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with BN and ReLU: conv without bias (Kaiming-normal, fan-out, as mmcv initialises it),
    BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Classifier(nn.Sequential):
    """mmseg's `cls_seg`: Dropout2d then a 1x1 conv to the classes (weights normal(0, 0.01), bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(conv.weight, 0, 0.01)
        nn.init.zeros_(conv.bias)
        super().__init__(nn.Dropout2d(dropout), conv)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map average-pooled to each scale, 1x1 conv, upsampled back; concatenated with
    the map itself."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels))
                                    for s in scales)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] + [upsample(stage(x), x.shape[-2:]) for stage in self.stages], dim=1)


class UPerHead(nn.Module):
    """UperNet's decode head. forward([maps at strides 4, 8, 16, 32]) -> logits (N, classes, H / 4, W / 4)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        *fine, coarsest = in_channels
        self.ppm = PyramidPooling(coarsest, channels, pool_scales)
        self.bottleneck = ConvBNReLU(coarsest + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in fine)
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.cls_seg = Classifier(channels, num_classes, dropout)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.bottleneck(self.ppm(maps[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [upsample(x, size) for x in outs[1:]], dim=1))
        return self.cls_seg(fused)


class FCNHead(nn.Module):
    """The auxiliary head: `num_convs` 3x3 ConvBNReLU (released: 1, 256 channels), dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*(ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))
        self.cls_seg = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls_seg(self.convs(x))
