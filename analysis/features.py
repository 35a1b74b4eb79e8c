"""Features of the encoder on unmasked images: the token features of every block, the per-head attention outputs
and attention maps, read block by block, and one vector per image from a block's tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from models_deepmim import MaskedAutoencoderDeepMIM
from models_vit import attention_probs

TokenPooling = Literal["flatten", "mean", "cls"]
TOKEN_POOLINGS = ("flatten", "mean", "cls")


def embed_unmasked(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> Tensor:
    """imgs: (N, 3, H, W) -> (N, 1 + L, D): patch embedding + position embedding with the cls token, no masking."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def iter_block_features(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> Iterator[Tensor]:
    """Yield the token features of encoder blocks 1..depth on the whole (unmasked) image, one block at a time (a
    consumer that reduces each block, e.g. to a Gram matrix, holds one block's features at a time).

    imgs: (N, 3, H, W) ImageNet-normalised. Yields (N, 1 + L, D), cls token first: the raw output (residual stream)
    of each block; the final norm is not applied, so every block is measured alike.
    """
    x = embed_unmasked(model, imgs)
    for blk in model.blocks:
        x = blk(x)
        yield x


def encoder_block_features(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> list[Tensor]:
    """imgs: (N, 3, H, W) -> `depth` tensors (N, 1 + L, D): every block's output, unmasked (`iter_block_features`)."""
    return list(iter_block_features(model, imgs))


@contextlib.contextmanager
def capture_head_outputs(model: MaskedAutoencoderDeepMIM) -> Iterator[list[Tensor]]:
    """Within the context, every encoder forward appends each block's per-head attention output to the yielded list.

    The output of head h is softmax(Q_h K_h^T / sqrt(d)) V_h, i.e. the input of `attn.proj` (timm's Attention
    concatenates the heads there), read by a forward pre-hook on each block's `attn.proj`: (N, H, T, d) per block.
    Hooks are removed on exit; nothing global is patched.
    """
    outputs: list[Tensor] = []
    handles = []
    for blk in model.blocks:
        attn = blk.attn
        if not isinstance(attn.norm, torch.nn.Identity) or getattr(attn, "gate", None) is not None:
            raise ValueError("capture_head_outputs needs plain timm attention (no scale_norm, no gate)")

        def hook(_module, inputs, heads=attn.num_heads):
            x = inputs[0]  # (N, T, H * d)
            outputs.append(x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2))

        handles.append(attn.proj.register_forward_pre_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def attention_head_outputs(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> list[Tensor]:
    """imgs: (N, 3, H, W) -> `depth` tensors (N, H, 1 + L, d): each block's per-head attention output, unmasked."""
    with capture_head_outputs(model) as outputs:
        for _ in iter_block_features(model, imgs):
            pass
    return list(outputs)


def attention_maps(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> list[Tensor]:
    """imgs: (N, 3, H, W) -> `depth` tensors (N, heads, 1 + L, 1 + L): each block's per-head attention probabilities
    softmax(Q_h K_h^T / sqrt(d)) on the unmasked image (row q: where query token q attends; rows sum to 1), float32.
    Read from each block's qkv projection (a forward hook) and `models_vit.attention_probs`."""
    qkvs: list[Tensor] = []
    handles = [blk.attn.qkv.register_forward_hook(lambda _module, _inputs, out: qkvs.append(out))
               for blk in model.blocks]
    try:
        for _ in iter_block_features(model, imgs):
            pass
    finally:
        for handle in handles:
            handle.remove()
    return [attention_probs(blk.attn, qkv) for blk, qkv in zip(model.blocks, qkvs, strict=True)]


def pool_tokens(x: Tensor, pooling: TokenPooling = "flatten") -> Tensor:
    """One feature vector per image from block tokens x: (N, 1 + L, D).

    flatten: all tokens concatenated, (N, (1 + L) D) — each image is one example and the spatial layout is kept
        (as minibatch CKA of Nguyen et al. 2021 treats conv feature maps); the default of `tools/cka.py`.
    mean: average of the L patch tokens, (N, D). cls: the cls token, (N, D).
    """
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1)
    if pooling == "mean":
        return x[:, 1:].mean(dim=1)
    if pooling == "cls":
        return x[:, 0]
    raise ValueError(f"pooling must be one of {', '.join(TOKEN_POOLINGS)}, got {pooling!r}")
