"""The ViT detection backbone of the benchmark paper (Li et al. 2021, *Benchmarking detection transfer learning with
vision transformers*, the setup MAE's A.3 and DeepMIM's App. A follow): the pre-trained ViT at 1024x1024 (position
embedding resampled to the 64x64 patch grid), attention in non-overlapping 14x14 windows except in four evenly
spaced global blocks (3, 6, 9, 12 of ViT-B), a relative position bias table per block (zero-initialised), drop path
0.1, no class token and no layer scale (the benchmark's MAE configs: `use_cls_token_det=False`, `init_values=None`).

Features of the global blocks feed `models_backbone.MultiScaleViT`'s pyramid (strides 4, 8, 16, 32; the same
deconvolution / max-pool levels and the same loading as segmentation), or, with `pyramid="simple"`, ViTDet's simple
pyramid builds all four levels from the last block.

Why a subclass of timm's Beit rather than timm's SAM ViT (which has windows): the project's loading, load report,
layer-wise decay and segmentation backbone all speak Beit's parameter names (`q_bias`/`v_bias` for MAE's `qkv.bias`,
`relative_position_bias_table`); SAM's blocks use decomposed relative positions (`rel_pos_h`/`rel_pos_w`, ViTDet
2022), which is not the benchmark's BEiT-style table, and no class-token-free BEiT table. So `WindowedAttention` is
Beit's attention run on windows (timm's own `window_partition` / `window_unpartition`), with the table indexed
without its class-token row and column, and `WindowedViT` is Beit without the class token.

Padding: 64 is not a multiple of 14, so windows are padded to 70x70 (ViTDet pads the same way). Unlike ViTDet, padded
tokens are masked out as keys: the outputs of real tokens are exactly those of attention over the real tokens of
their window, whatever the padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.beit import Attention, Beit
from timm.models.vision_transformer_sam import window_partition, window_unpartition
from torch import Tensor, nn

from models_backbone import DETECTION_TAPS, MultiScaleViT, NormLayer, default_out_indices
from models_vit import ARCH_KEYS

Pyramid = Literal["multiblock", "simple"]
PYRAMIDS: tuple[Pyramid, ...] = ("multiblock", "simple")
WINDOW_SIZE = 14  # the pre-training grid (224 / 16): every window block attends as in pre-training


def global_block_indices(depth: int) -> tuple[int, ...]:
    """Blocks with global attention, 0-based: four evenly spaced ones, the benchmark's placement (blocks 3, 6, 9, 12
    of ViT-B -> 2, 5, 8, 11; 6, 12, 18, 24 of ViT-L -> 5, 11, 17, 23)."""
    return default_out_indices(depth, DETECTION_TAPS)


def padding_mask(grid: tuple[int, int], window: int, batch: int, device: torch.device) -> Tensor | None:
    """Additive key mask (batch * windows, 1, 1, window^2): 0 for real tokens, -inf for the padding that completes
    the grid to a multiple of `window` (None without padding). Every window holds a real token (padding < window)."""
    if grid[0] % window == 0 and grid[1] % window == 0:
        return None
    real, _ = window_partition(torch.ones(1, *grid, 1, device=device), window)
    mask = torch.zeros(real.shape[0], 1, 1, window * window, device=device)
    mask.masked_fill_(real.reshape(real.shape[0], 1, 1, -1) == 0, float("-inf"))
    return mask.repeat(batch, 1, 1, 1)


class WindowedAttention(Attention):
    """timm's Beit attention over non-overlapping `window` x `window` windows of the patch grid (`window=None`:
    global attention over the whole grid), with a relative position bias table sized to what it attends over.

    forward(x (B, H * W, C)) -> (B, H * W, C), tokens in row-major grid order, no class token.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: int | None,
                 rel_pos_bias: bool = True):
        span = (window, window) if window else tuple(grid)
        super().__init__(dim, num_heads=num_heads, qkv_bias=True, window_size=span if rel_pos_bias else None)
        self.grid, self.window = tuple(grid), window

    def _get_rel_pos_bias(self) -> Tensor:
        """(1, heads, A, A) for the A tokens of a window: Beit's table without its class-token entries, which
        stay unused (at zero)."""
        area = self.window_size[0] * self.window_size[1]
        index = self.relative_position_index[1:, 1:].reshape(-1)
        bias = self.relative_position_bias_table[index].view(area, area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        if not self.window:
            return super().forward(x, shared_rel_pos_bias)
        batch, _, dim = x.shape
        windows, padded = window_partition(x.view(batch, *self.grid, dim), self.window)
        mask = padding_mask(self.grid, self.window, batch, x.device)  # added to the logits, as a shared bias is
        out = super().forward(windows.flatten(1, 2), mask)
        out = window_unpartition(out.view(-1, self.window, self.window, dim), self.window, self.grid, padded)
        return out.reshape(batch, -1, dim)


class WindowedViT(Beit):
    """timm's Beit with windowed attention in every block but `global_blocks`, and no class token.

    Parameter names are Beit's (what `models_backbone.load_backbone_weights` and `util.layer_decay` read); the
    position embedding has no class-token slot (`num_prefix_tokens` 0). Only `forward_intermediates` (what
    `MultiScaleViT` calls) is supported.
    """

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 window_size: int = WINDOW_SIZE, global_blocks: Sequence[int] | None = None,
                 drop_path_rate: float = 0.1, rel_pos_bias: bool = True):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="avg",
                         drop_path_rate=drop_path_rate, init_values=None, use_abs_pos_emb=True,
                         use_rel_pos_bias=False)
        self.fc_norm = nn.Identity()  # no final norm: the pyramid reads raw block outputs
        self.cls_token, self.num_prefix_tokens = None, 0
        grid = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.window_size = window_size
        self.global_blocks = tuple(global_block_indices(depth) if global_blocks is None else global_blocks)
        for i, block in enumerate(self.blocks):
            window = None if i in self.global_blocks else window_size
            block.attn = WindowedAttention(embed_dim, num_heads, grid, window, rel_pos_bias)
            block.attn.apply(self._init_weights)  # Beit's initialisation of the new attention, as for the others
            with torch.no_grad():
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = True,
                              **_: Any) -> list[Tensor]:
        """images (B, 3, H, W) -> [(B, C, H / p, W / p) for each tapped block], raw block outputs."""
        if norm or output_fmt != "NCHW" or not intermediates_only:
            raise ValueError("WindowedViT gives raw NCHW intermediates only (norm=False, intermediates_only=True)")
        take, _ = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        out = []
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and self.training else block(x)
            if i in take:
                out.append(x)
        height, width = self.patch_embed.grid_size
        return [y.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous() for y in out]


def create_detection_backbone(encoder: Mapping[str, Any], img_size: int = 1024, window_size: int = WINDOW_SIZE,
                              global_blocks: Sequence[int] | None = None, pyramid: Pyramid = "multiblock",
                              drop_path_rate: float = 0.1, rel_pos_bias: bool = True,
                              norm_layer: NormLayer = nn.BatchNorm2d) -> MultiScaleViT:
    """The benchmark's backbone for an encoder of `encoder`'s sizes (`models_vit.ARCH_KEYS`): `WindowedViT` at
    `img_size` + the stride 4/8/16/32 pyramid, fed by the global blocks (`pyramid="multiblock"`, MAE A.3) or by the
    last block alone (`"simple"`, ViTDet)."""
    missing = [k for k in ARCH_KEYS if k not in encoder]
    if missing:
        raise ValueError(f"encoder sizes missing: {missing}")
    if pyramid not in PYRAMIDS:
        raise ValueError(f"--pyramid must be one of {', '.join(PYRAMIDS)}, got {pyramid!r}")
    depth = encoder["depth"]
    vit = WindowedViT(img_size, encoder["patch_size"], encoder["embed_dim"], depth, encoder["num_heads"], window_size,
                      global_blocks, drop_path_rate, rel_pos_bias)
    if not all(0 <= i < depth for i in vit.global_blocks):
        raise ValueError(f"global blocks {list(vit.global_blocks)} must lie in 0..{depth - 1} (0-based)")
    taps = global_block_indices(depth) if pyramid == "multiblock" else (depth - 1,)
    return MultiScaleViT(vit, taps, norm_layer=norm_layer)
