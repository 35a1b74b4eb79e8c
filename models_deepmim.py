"""DeepMIM: masked autoencoders with deep supervision (paper Sec. 3, Fig. 2).

An MAE whose ViT encoder sees only the visible patches, with one light Transformer decoder on each of several
encoder blocks (default: blocks 6, 8, 10 and 12 of ViT-B, Tab. 8). Every decoder sees the same mask and the losses
are summed (Eq. 2). A model with a single decoder on the last block is exactly MAE, so the `mae_*` baselines are
the same class with other arguments.

Key names stay MAE/timm compatible for the encoder (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.*`,
`norm`); decoders live under `decoders.<block>.*` (or `decoders.shared.*`). `load_pretrained` maps the released
MAE and DeepMIM key layouts onto this model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from models_vit import ARCH_KEYS, VIT_SIZES
from util.patches import (
    Masking,
    gather_tokens,
    normalize_patches,
    patchify,
    random_masking,
    sincos_pos_embed,
    uniform_noise,
)

logger = logging.getLogger(__name__)

LossType = Literal["mse", "cosine", "cross_entropy"]
SHARED_KEY = "shared"


# --------------------------------------------------------------------------------------------------------------
# Small pure functions (position embeddings, masking and patchify live in util.patches)
# --------------------------------------------------------------------------------------------------------------


def reconstruction_loss(pred: Tensor, target: Tensor, loss_type: LossType = "mse") -> Tensor:
    """Mean loss over the masked patches. pred: (N, L_m, C); target: (N, L_m, C), or (N, L_m) code ids.

    mse: MAE's per-patch mean squared error, averaged over patches (Eq. 2's l2 term).
    cosine: 2 - 2 cos(pred, target) per patch, the loss of the released DeepMIM-CLIP code.
    cross_entropy: C = V logits per patch against its code id (Tab. 11 codebook; BEiT's masked token prediction).
    """
    pred = pred.float()
    if loss_type == "cross_entropy":
        return F.cross_entropy(pred.flatten(0, 1), target.flatten())
    target = target.float()
    if loss_type == "mse":
        return (pred - target).pow(2).mean()
    if loss_type == "cosine":
        return (2 - 2 * F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"loss_type must be 'mse', 'cosine' or 'cross_entropy', got {loss_type!r}")


def default_supervised_blocks(depth: int) -> tuple[int, ...]:
    """DeepMIM's taps at depth * {1/2, 2/3, 5/6, 1}: blocks 6, 8, 10, 12 for a 12-block ViT (paper Sec. 3, Tab. 8)."""
    return tuple(sorted({max(1, round(depth * f)) for f in (1 / 2, 2 / 3, 5 / 6, 1)}))


def run_block(block: nn.Module, x: Tensor, grad_checkpointing: bool) -> Tensor:
    """One Transformer block; with `grad_checkpointing` (and gradients on) its activations are recomputed in the
    backward instead of kept (torch's non-reentrant checkpoint: same result, less memory, ~1/3 more compute)."""
    if grad_checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return block(x)


# --------------------------------------------------------------------------------------------------------------
# The decoder (one class, instantiated once per supervised block)
# --------------------------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """MAE's light decoder: embed visible tokens, insert mask tokens, add a fixed position embedding, run
    Transformer blocks, predict the target of each patch. DeepMIM uses 4 blocks of width 512 (paper Sec. 3)."""

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        pred_dim: int,
        decoder_embed_dim: int = 512,
        depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ):
        super().__init__()
        num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(decoder_embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.norm = norm_layer(decoder_embed_dim)
        self.pred = nn.Linear(decoder_embed_dim, pred_dim)
        self.pos_embed.data.copy_(sincos_pos_embed(grid_size, decoder_embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.grad_checkpointing = False

    def forward(self, latent: Tensor, ids_restore: Tensor, ids_predict: Tensor | None = None) -> Tensor:
        """latent: (N, 1 + L_vis, D) encoder tokens, cls first; ids_restore: (N, L).

        ids_predict: (N, K) positions whose prediction is wanted (the masked ones during training: the head then
        runs on K tokens only); None predicts all L patches. Returns (N, K or L, pred_dim).
        """
        x = self.embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = gather_tokens(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = run_block(blk, x, self.grad_checkpointing)
        x = self.norm(x)[:, 1:]
        if ids_predict is not None:
            x = gather_tokens(x, ids_predict)
        return self.pred(x)


# --------------------------------------------------------------------------------------------------------------
# Encoder with multiple decoders
# --------------------------------------------------------------------------------------------------------------


class MaskedAutoencoderDeepMIM(nn.Module):
    """ViT encoder (visible patches only) with one decoder per supervised block.

    Args:
        supervised_blocks: 1-based encoder blocks that feed a decoder; must include the last block. Intermediate
            taps are raw block outputs; the last block's output passes through the final norm (as MAE and the
            released DeepMIM code do).
        shared_decoder: one decoder for every tap (Tab. 10 ablation) instead of independent ones (paper default).
        loss_weights: per-decoder weights of Eq. 2, default 1 each.
        norm_pix_loss: per-patch normalised pixel targets when no targets are given to `forward`.
        pred_dim: width of each prediction head; default p*p*3 pixels. Other targets (HOG, CLIP) set it.
        loss_type: 'mse' (pixels, HOG), 'cosine' (teacher features) or 'cross_entropy' (codebook ids).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        supervised_blocks: Sequence[int] | None = None,
        shared_decoder: bool = False,
        loss_weights: Sequence[float] | None = None,
        norm_pix_loss: bool = False,
        pred_dim: int | None = None,
        loss_type: LossType = "mse",
    ):
        super().__init__()
        self.supervised_blocks = tuple(supervised_blocks or (depth,))
        check_supervised_blocks(self.supervised_blocks, depth)
        self.loss_weights = tuple(loss_weights or [1.0] * len(self.supervised_blocks))
        if len(self.loss_weights) != len(self.supervised_blocks):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} values for {len(self.supervised_blocks)} blocks"
            )
        self.patch_size, self.in_chans, self.depth = patch_size, in_chans, depth
        self.norm_pix_loss, self.loss_type = norm_pix_loss, loss_type
        self.shared_decoder = shared_decoder
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        # DeepMIM: decoders also read intermediate blocks (paper Sec. 3, Tab. 8); one class, N instances (Tab. 10).
        self.pred_dim = pred_dim or patch_size**2 * in_chans
        make_decoder = partial(
            Decoder, embed_dim, self.grid_size, self.pred_dim, decoder_embed_dim, decoder_depth, decoder_num_heads,
            mlp_ratio, norm_layer,
        )
        keys = [SHARED_KEY] if shared_decoder else [str(b) for b in self.supervised_blocks]
        self.decoders = nn.ModuleDict({k: make_decoder() for k in keys})
        self.grad_checkpointing = False
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder and decoder block activations in the backward (`--grad_ckpt`): same gradients, a
        fraction of the activation memory (timm's method name)."""
        self.grad_checkpointing = enable
        for decoder in self.decoders.values():
            decoder.grad_checkpointing = enable

    # -- initialisation (MAE's) --------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        self.pos_embed.data.copy_(sincos_pos_embed(self.grid_size, self.pos_embed.shape[-1]))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, as MAE does
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names (fnmatch patterns) excluded from weight decay besides biases and norms: tokens and pos-embeds."""
        return {"cls_token", "pos_embed", "decoders.*.mask_token", "decoders.*.pos_embed"}

    def decoder_for(self, block: int) -> Decoder:
        return self.decoders[SHARED_KEY if self.shared_decoder else str(block)]

    # -- forward pieces ------------------------------------------------------------------------------------------
    def make_noise(self, batch_size: int, device: torch.device | str) -> Tensor:
        """Uniform masking noise (N, L), MAE's random masking; draw it outside `forward` to share one mask with a
        generator or a plot. Other strategies (paper Tab. 12, `targets.masking`) also reach the model as noise."""
        return uniform_noise(batch_size, self.num_patches, device)

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[dict[int, Tensor], Masking]:
        """imgs: (N, 3, H, W) -> ({block: (N, 1 + L_vis, D)}, masking). Encoder sees visible patches only."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if noise is None:
            noise = self.make_noise(x.shape[0], x.device)
        masking = random_masking(noise, mask_ratio)
        x = gather_tokens(x, masking.ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        latents = {}
        for index, blk in enumerate(self.blocks, start=1):
            x = run_block(blk, x, self.grad_checkpointing)
            if index in self.supervised_blocks:
                latents[index] = self.norm(x) if index == self.depth else x
        return latents, masking

    def pixel_targets(self, imgs: Tensor) -> Tensor:
        """Pixel targets (N, L, p*p*3) in float32 whatever autocast region the caller is in, per-patch normalised
        with `norm_pix_loss` (MAE): the per-patch mean and variance in bf16 would be off by ~0.4 % (median) to ~4 %
        (p99) of the normalised target."""
        with torch.autocast(imgs.device.type, enabled=False):
            target = patchify(imgs.float(), self.patch_size)
            return normalize_patches(target) if self.norm_pix_loss else target

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float = 0.75,
        noise: Tensor | None = None,
        targets: Tensor | Mapping[int, Tensor] | None = None,
    ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor], Tensor]:
        """One DeepMIM step.

        imgs: (N, 3, H, W). noise: (N, L) masking noise (drawn here when None). targets: (N, L, C) (or (N, L) code
        ids) shared by every decoder, or {block: (N, L, C)} per decoder (hybrid targets, Eq. 1); pixels when None.

        Returns total loss (Eq. 2: weighted sum), {block: loss}, {block: pred (N, L_m, C) for the masked patches in
        ascending position order, see `scatter_masked`}, mask (N, L) with 1 = removed.
        """
        latents, masking = self.forward_encoder(imgs, mask_ratio, noise)
        if targets is None:
            targets = self.pixel_targets(imgs)
        preds, losses = {}, {}
        for block in self.supervised_blocks:
            preds[block] = self.decoder_for(block)(latents[block], masking.ids_restore, masking.ids_masked)
            target = targets[block] if isinstance(targets, Mapping) else targets
            losses[block] = reconstruction_loss(preds[block], gather_tokens(target, masking.ids_masked), self.loss_type)
        loss = sum(w * losses[b] for w, b in zip(self.loss_weights, self.supervised_blocks))
        return loss, losses, preds, masking.mask


def check_supervised_blocks(blocks: Sequence[int], depth: int) -> None:
    """Raise ValueError unless blocks are distinct, within 1..depth, and include the last block."""
    if not blocks:
        raise ValueError("supervised_blocks must name at least one block")
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"supervised_blocks {bad} outside 1..{depth} (the encoder depth)")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"supervised_blocks {list(blocks)} repeats a block")
    if depth not in blocks:
        # Every configuration in the paper supervises the last block (Tab. 8); blocks after the last tap would
        # otherwise receive no gradient.
        raise ValueError(f"supervised_blocks {list(blocks)} must include the last block ({depth})")


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., MaskedAutoencoderDeepMIM]] = {}


def _register(prefix: str, encoder: str, **defaults) -> None:
    patch_size, embed_dim, depth, num_heads = VIT_SIZES[encoder]
    name = f"{prefix}_{encoder}"

    def factory(**kwargs) -> MaskedAutoencoderDeepMIM:
        cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **defaults)
        cfg.update({k: v for k, v in kwargs.items() if v is not None})
        if prefix == "deepmim" and cfg.get("supervised_blocks") is None:
            cfg["supervised_blocks"] = default_supervised_blocks(cfg["depth"])
        return MaskedAutoencoderDeepMIM(**cfg)

    factory.__name__ = name
    factory.__doc__ = f"{prefix.upper()} with a {encoder} encoder; defaults {defaults}."
    MODELS[name] = factory


for _encoder in VIT_SIZES:
    # DeepMIM: four independent 512-d decoders of 4 blocks on depth * {1/2, 2/3, 5/6, 1} (paper Sec. 3, Tab. 8).
    _register("deepmim", _encoder, decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16)
    # MAE baseline: one 512-d decoder of 8 blocks on the last block (MAE's own).
    _register("mae", _encoder, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def _encoder_size(name: str, key: str, override: int | None) -> int:
    """One size (`models_vit.ARCH_KEYS` entry) of a registered model's encoder, or the override, without building it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return override if override is not None else dict(zip(ARCH_KEYS, VIT_SIZES[name.split("_", 1)[1]]))[key]


def encoder_depth(name: str, depth: int | None = None) -> int:
    """Depth of a registered model's encoder (or the override), without building it."""
    return _encoder_size(name, "depth", depth)


def encoder_patch_size(name: str, patch_size: int | None = None) -> int:
    """Patch size of a registered model (or the override), without building it."""
    return _encoder_size(name, "patch_size", patch_size)


def create_model(name: str, **kwargs) -> MaskedAutoencoderDeepMIM:
    """Build a registered model; kwargs set to None keep the registry's defaults.

    The result carries `model.config` ({"name": ..., **kwargs}), which checkpoints store as "model_cfg" so that
    `model_from_config` rebuilds the same architecture.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if v is not None}
    model = MODELS[name](**kwargs)
    model.config = {"name": name, **kwargs}
    return model


def model_from_config(config: Mapping) -> MaskedAutoencoderDeepMIM:
    """Inverse of `model.config`: rebuild a registered model from a checkpoint's "model_cfg"."""
    config = dict(config)
    return create_model(config.pop("name"), **config)


# --------------------------------------------------------------------------------------------------------------
# Checkpoint interoperability
# --------------------------------------------------------------------------------------------------------------

# MAE names its decoder parts `decoder_embed`, `mask_token`, ...; the released DeepMIM code appends 1..4 for the
# decoders on blocks 6, 8, 10, 12 and shares one `decoder_pos_embed`.
_RELEASED_DECODER_KEY = re.compile(
    r"^(?P<part>decoder_embed|mask_token|decoder_blocks|decoder_norm|decoder_pred|decoder_pos_embed)"
    r"(?P<index>\d*)(?P<rest>(\..*)?)$"
)
MAE_PART_NAMES = {  # MAE key prefix -> the part of our Decoder; tools/export_mae.py writes the inverse
    "decoder_embed": "embed", "mask_token": "mask_token", "decoder_blocks": "blocks", "decoder_norm": "norm",
    "decoder_pred": "pred", "decoder_pos_embed": "pos_embed",
}


class LoadReport(NamedTuple):
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # present on both sides with different shapes; left as initialised


def convert_released_keys(state_dict: Mapping[str, Tensor], model: MaskedAutoencoderDeepMIM) -> dict[str, Tensor]:
    """Rename released MAE / DeepMIM decoder keys to this model's `decoders.<key>.*` names.

    Unsuffixed keys (MAE) go to the decoder on the last block; suffix k (released DeepMIM) to the model's k-th
    supervised block; an unsuffixed `decoder_pos_embed` is shared by every decoder. Other keys pass unchanged.
    """
    decoder_keys = list(model.decoders.keys())
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        match = _RELEASED_DECODER_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        part, index, rest = match["part"], match["index"], match["rest"]
        if part == "decoder_pos_embed" and not index:
            targets = decoder_keys
        elif model.shared_decoder:
            targets = [SHARED_KEY]
        elif not index:
            targets = [str(model.supervised_blocks[-1])]
        else:
            k = int(index)
            targets = [str(model.supervised_blocks[k - 1])] if 1 <= k <= len(model.supervised_blocks) else []
        if not targets:
            out[key] = value  # a decoder this model does not have: reported as unexpected
        for target in targets:
            out[f"decoders.{target}.{MAE_PART_NAMES[part]}{rest}"] = value
    return out


def load_pretrained(model: MaskedAutoencoderDeepMIM, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load this project's, MAE's or the released DeepMIM's weights into `model`; report what did not fit.

    state_dict may be a full checkpoint ({'model': ...}). Tensors whose shape differs from the model's are left
    as initialised and listed in `mismatched`. Logs nothing: the caller decides which keys matter and logs once.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    converted = convert_released_keys(state_dict, model)
    own = model.state_dict()
    mismatched = [k for k, v in converted.items() if k in own and own[k].shape != v.shape]
    loadable = {k: v for k, v in converted.items() if k not in mismatched}
    result = model.load_state_dict(loadable, strict=False)
    # No log here: the caller knows which keys it expects and logs the report once (analysis.loading, targets.hybrid).
    return LoadReport(sorted(set(result.missing_keys) | set(mismatched)), sorted(result.unexpected_keys), mismatched)
