"""Analytic FLOP count of one DeepMIM / MAE pre-training step, for model FLOP utilisation (issue 6).

Convention (the usual "model FLOPs" of MFU figures): only matrix multiplies count, one multiply-add = 2 FLOPs:
linear layers, the patch-embedding convolution and the two attention products (q k^T and attn v). LayerNorm,
softmax, GELU, gathers and the loss are left out (a few % of a ViT). The count follows what the code runs:

- encoder: patch embedding on all L patches, then every block on the 1 + L_vis visible tokens only (MAE);
- each decoder: embedding of the 1 + L_vis encoder tokens, blocks on all 1 + L tokens, prediction head on the L_m
  masked tokens only (`Decoder(ids_predict=...)`);
- frozen parts, once per batch for all decoders: a teacher ViT (CLIP / DINO) on all 1 + L tokens plus its
  per-token projection; a codebook's VQ-KD tokenizer: its ViT, the projection of the L patch tokens and their
  similarity to every code; the DeepMIM-dagger generator = an MAE forward whose head predicts all L patches.

A training step costs 3x the forward of the trained parts (backward = 2x forward) plus 1x the frozen forwards.
(The patch embedding computes no gradient for the images, so the true backward is 2 L p^2 3 D FLOPs per image
smaller: 0.25 % of a ViT-B DeepMIM step.)
`torch.utils.flop_counter.FlopCounterMode` counts the same operations, which is how tests/test_flops.py checks us.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from models_deepmim import Decoder, MaskedAutoencoderDeepMIM
from util.patches import num_visible

BACKWARD_FACTOR = 2  # backward of a matmul = two matmuls of the same size (input and weight gradients)


class StepFlops(NamedTuple):
    """FLOPs of one step for a whole batch. trained_forward: the student's forward; frozen_forward: teacher or
    generator forward (no backward); total = (1 + BACKWARD_FACTOR) * trained_forward + frozen_forward."""

    trained_forward: int
    frozen_forward: int
    total: int
    parts: dict[str, int]  # forward FLOPs per part for the batch: encoder, decoder_b<k>, frozen


def linear_flops(tokens: int, layer: nn.Linear) -> int:
    """2 * tokens * in * out."""
    return 2 * tokens * layer.in_features * layer.out_features


def block_flops(block: nn.Module, tokens: int) -> int:
    """One timm Transformer block on `tokens` tokens: every linear layer (qkv, proj, fc1, fc2) plus the attention
    products q k^T and attn v, 2 * tokens^2 * attn_dim each (summed over heads)."""
    linears = sum(linear_flops(tokens, m) for m in block.modules() if isinstance(m, nn.Linear))
    attn_dim = block.attn.qkv.out_features // 3
    return linears + 2 * 2 * tokens * tokens * attn_dim


def patch_embed_flops(conv: nn.Conv2d, num_patches: int) -> int:
    """Non-overlapping patch convolution: a (p*p*C_in) x D linear layer on each patch."""
    kernel = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
    return 2 * num_patches * kernel * conv.out_channels


def encoder_flops(model: MaskedAutoencoderDeepMIM, visible: int) -> int:
    """Forward of one image's encoder: patch embedding on all L patches, blocks on 1 + visible tokens."""
    tokens = 1 + visible
    return patch_embed_flops(model.patch_embed.proj, model.num_patches) + sum(
        block_flops(blk, tokens) for blk in model.blocks
    )


def decoder_flops(decoder: Decoder, num_patches: int, visible: int, predicted: int) -> int:
    """Forward of one image's decoder: embed 1 + visible tokens, blocks on 1 + L tokens, head on `predicted`."""
    return (
        linear_flops(1 + visible, decoder.embed)
        + sum(block_flops(blk, 1 + num_patches) for blk in decoder.blocks)
        + linear_flops(predicted, decoder.pred)
    )


def mim_forward_flops(model: MaskedAutoencoderDeepMIM, mask_ratio: float, predict_all: bool = False) -> dict[str, int]:
    """Per-image forward FLOPs of a DeepMIM / MAE model: {"encoder": ..., "decoder_b<k>": ...}.

    Every supervised block has its own decoder pass (a shared decoder still runs once per block). Heads predict
    the masked patches only, unless `predict_all` (how the generator runs).
    """
    length = model.num_patches
    visible = num_visible(length, mask_ratio)
    predicted = length if predict_all else length - visible
    parts = {"encoder": encoder_flops(model, visible)}
    for block in model.supervised_blocks:
        parts[f"decoder_b{block}"] = decoder_flops(model.decoder_for(block), length, visible, predicted)
    return parts


def vit_forward_flops(vit: nn.Module, project: bool = False) -> int:
    """Per-image forward of a frozen timm VisionTransformer teacher on all its tokens (no masking).

    project: the head is applied to every patch token (CLIP's per-token projection in the released DeepMIM code).
    """
    num_patches = vit.patch_embed.num_patches
    tokens = num_patches + vit.num_prefix_tokens
    flops = patch_embed_flops(vit.patch_embed.proj, num_patches) + sum(block_flops(b, tokens) for b in vit.blocks)
    if project and isinstance(vit.head, nn.Linear):
        flops += linear_flops(num_patches, vit.head)
    return flops


def tokenizer_forward_flops(tokenizer: object) -> int:
    """Per-image forward of a VQ-KD tokenizer (`targets.tokenizers.VQKDTokenizer`): encoder ViT, the projection of
    every patch token, and each projected token against every code (one (L, D) x (D, V) product)."""
    vit = tokenizer.encoder.model
    num_patches = vit.patch_embed.num_patches
    projection = sum(linear_flops(num_patches, m) for m in tokenizer.projection.modules() if isinstance(m, nn.Linear))
    return vit_forward_flops(vit) + projection + 2 * num_patches * tokenizer.codebook.numel()


def frozen_forward_flops(
    target: object | None = None, generator: object | None = None, mask_ratio: float = 0.75
) -> int:
    """Per-image FLOPs of the frozen work done once per batch: a teacher target (`targets.build.TeacherTarget`) or a
    codebook's tokenizer (`targets.build.CodebookTarget`), and/or a DeepMIM-dagger generator
    (`targets.hybrid.HybridGenerator`: encoder + last decoder predicting all patches). Pixel and HOG targets count
    as 0 (no matrix multiplies)."""
    flops = 0
    teacher = getattr(target, "teacher", None)
    if teacher is not None:
        flops += vit_forward_flops(teacher.model, project=teacher.project)
    tokenizer = getattr(target, "tokenizer", None)
    if tokenizer is not None:
        flops += tokenizer_forward_flops(tokenizer)
    if generator is not None:
        gen = generator.model
        parts = mim_forward_flops(gen, mask_ratio, predict_all=True)
        flops += parts["encoder"] + parts[f"decoder_b{gen.supervised_blocks[-1]}"]
    return flops


def step_flops(
    model: MaskedAutoencoderDeepMIM,
    batch_size: int,
    mask_ratio: float = 0.75,
    target: object | None = None,
    generator: object | None = None,
) -> StepFlops:
    """FLOPs of one training step on a batch: 3x the student's forward plus the frozen forwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    parts = {k: v * batch_size for k, v in mim_forward_flops(model, mask_ratio).items()}
    trained = sum(parts.values())
    frozen = frozen_forward_flops(target, generator, mask_ratio) * batch_size
    parts["frozen"] = frozen
    return StepFlops(trained, frozen, (1 + BACKWARD_FACTOR) * trained + frozen, parts)
