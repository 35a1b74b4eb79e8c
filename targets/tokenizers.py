"""Frozen visual tokenizers whose discrete codes are reconstruction targets (paper Tab. 11, "Perceptual Codebook").

A tokenizer maps ImageNet-normalised images (N, 3, H, W) to one code id per patch of the student's grid, (N, L)
int64 in `range(vocab_size)`, row-major as `patchify`; the decoders then predict `vocab_size` logits per masked patch
(`targets.build.CodebookTarget`, a cross-entropy loss). Like the teachers, a tokenizer is a plain object, frozen,
outside the student's checkpoint and optimizer; it loads only from a local file, with strict key checks.

- vqkd: BEiT v2's VQ-KD tokenizer (Peng et al. 2022 [35]; released as `vqkd_encoder_base_decoder_{1,3}x768x12_
  {clip,dino}` in microsoft/unilm, beit2/modeling_vqkd.py and norm_ema_quantizer.py). Its encoder is BEiT's ViT-B/16
  with absolute position embeddings, no relative position bias, no layer scale, q/v biases only, and a final
  LayerNorm (`fc_norm`) on the patch tokens; `encode_task_layer` (Linear-Tanh-Linear, 768 -> 768 -> 32) projects each
  token; `quantize.embedding.weight` (8,192 x 32) is the codebook, kept l2-normalised by its EMA updates, and a
  token's code is the one nearest to its l2-normalised projection (`nearest_code`: largest cosine). The released
  tokenizer reads [0, 1] images mapped to [-1, 1] (its `process_type='default'`); here ImageNet-normalised images are
  mapped there with one affine map per channel (mean = std = 0.5 in [0, 1] units). The encoder runs as a timm
  VisionTransformer (`--teacher_model`, default `vit_base_patch16_224`, mean-pooled so that its final norm is
  `fc_norm`): BEiT's q and v biases become timm's qkv bias with a zero key bias, which is what BEiT's attention adds.
  The encoder runs under `frozen_autocast` (BEiT v2 tokenizes under autocast); projection and code search run in
  float32 with autocast off, as the release does.

PeCo's tokenizer (Dong et al. [11], the codebook of the paper's Tab. 11) is not here: its architecture and weight key
names could not be read from a public release (github.com/microsoft/PeCo, which the paper points to, was not
available to us), so there is nothing to check a file against. A new tokenizer is a class with `name`, `vocab_size`,
`grid_size` and `__call__`, and an entry in `TOKENIZERS` (the key that recognises its files and its builder).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from targets.teachers import FrozenTeacher, assign_weights, key_mismatches, load_teacher_weights, meta_vit

logger = logging.getLogger(__name__)

VQKD_ENCODER = "vit_base_patch16_224"  # BEiT's ViT-B/16 (VQ-KD's encoder) as a timm architecture
VQKD_MEAN = VQKD_STD = (0.5, 0.5, 0.5)  # [0, 1] -> [-1, 1] (modeling_vqkd.VQKD.pre_process, 'default')
VQKD_VOCAB, VQKD_CODE_DIM = 8192, 32  # the released codebooks' shape, quoted when a file lacks one
# Parts of a VQ-KD training checkpoint that tokenizing does not read: the decoder that rebuilt the teacher's features,
# the codebook's EMA statistics, and the keys the release itself drops before loading a tokenizer.
VQKD_UNUSED = ("decoder.", "decode_task_layer.", "quantize.cluster_size", "quantize.embedding.cluster_size",
               "quantize.embedding.embed_avg", "quantize.embedding.initted", "loss", "teacher", "scaling")
VQKD_LAYOUT = ("BEiT v2's VQ-KD tokenizer: encoder.* (a BEiT ViT: cls_token, pos_embed, patch_embed.proj.*, "
               "blocks.N.attn.q_bias / v_bias / qkv.weight / proj.*, blocks.N.norm1/norm2/mlp.*, fc_norm.*), "
               "encode_task_layer.0.* and .2.* (Linear-Tanh-Linear to the code width), quantize.embedding.weight "
               "(the V x D codebook); e.g. vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth")


class Tokenizer(Protocol):
    """imgs (N, 3, H, W), ImageNet-normalised -> code ids (N, L) int64 on `grid_size` (L = h * w), no gradient."""

    name: str
    vocab_size: int
    grid_size: tuple[int, int]

    def __call__(self, imgs: Tensor) -> Tensor: ...


def nearest_code(z: Tensor, codebook: Tensor, chunk: int = 4096) -> Tensor:
    """Index of the codebook row with the largest cosine similarity to each row of z: (M, D), (V, D) -> (M,) int64.

    The search runs over `chunk` rows at a time: a batch of 128 ViT-B images against 8,192 codes would otherwise hold
    a 25,088 x 8,192 float32 similarity matrix (0.8 GB) at once."""
    z, codebook = F.normalize(z.float(), dim=-1), F.normalize(codebook.float(), dim=-1)
    return torch.cat([(part @ codebook.T).argmax(dim=-1) for part in z.split(chunk)])


class VQKDTokenizer:
    """BEiT v2's VQ-KD tokenizer: ViT encoder -> Linear-Tanh-Linear projection -> nearest code by cosine."""

    name = "vqkd"

    def __init__(self, encoder: FrozenTeacher, projection: nn.Sequential, codebook: Tensor):
        self.encoder = encoder
        self.projection = projection.eval().requires_grad_(False)
        self.codebook = F.normalize(codebook.float(), dim=-1)  # stored normalised; exact cosine either way
        self.vocab_size, self.grid_size = codebook.shape[0], encoder.grid_size
        self.to(encoder.device)

    def to(self, device: torch.device | str) -> VQKDTokenizer:
        self.encoder.to(device)
        self.projection.to(device)
        self.codebook = self.codebook.to(device)
        return self

    @torch.no_grad()
    def __call__(self, imgs: Tensor) -> Tensor:
        features = self.encoder(imgs)  # (N, L, D) float32, after fc_norm
        with torch.autocast(features.device.type, enabled=False):  # projection and search in float32, as released
            z = self.projection(features)
            return nearest_code(z.flatten(0, 1), self.codebook).view(z.shape[:2])


# --------------------------------------------------------------------------------------------------------------
# Loading VQ-KD files
# --------------------------------------------------------------------------------------------------------------


def vqkd_layout(encoder: VisionTransformer, vocab: int, code_dim: int) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a VQ-KD file whose encoder is `encoder` (BEiT's names: q/v biases instead of a qkv bias)."""
    shapes = {}
    for key, value in encoder.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            stem = key.removesuffix("qkv.bias")
            shapes[f"encoder.{stem}q_bias"] = shapes[f"encoder.{stem}v_bias"] = (value.shape[0] // 3,)
        else:
            shapes[f"encoder.{key}"] = tuple(value.shape)
    width = encoder.embed_dim
    shapes.update({
        "encode_task_layer.0.weight": (width, width), "encode_task_layer.0.bias": (width,),
        "encode_task_layer.2.weight": (code_dim, width), "encode_task_layer.2.bias": (code_dim,),
        "quantize.embedding.weight": (vocab, code_dim),
    })
    return shapes


def vqkd_encoder_weights(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's tensors with timm's names: prefix dropped, q/v biases joined into one qkv bias whose key part is
    zero (BEiT's attention adds exactly cat(q_bias, 0, v_bias))."""
    out = {}
    for key, value in weights.items():
        if not key.startswith("encoder.") or key.endswith("attn.v_bias"):
            continue
        key = key.removeprefix("encoder.")
        if key.endswith("attn.q_bias"):
            v_bias = weights[f"encoder.{key.removesuffix('q_bias')}v_bias"]
            out[key.removesuffix("q_bias") + "qkv.bias"] = torch.cat([value, torch.zeros_like(v_bias), v_bias])
        else:
            out[key] = value
    return out


def _square_grid_of(pos_embed: Tensor, width: int) -> bool:
    """Whether a position embedding is (1, 1 + h * h, width): a class token and a square grid of patches."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != width or pos_embed.shape[1] < 2:
        return False
    return math.isqrt(pos_embed.shape[1] - 1) ** 2 == pos_embed.shape[1] - 1


def build_vqkd(path: Path, weights: Mapping[str, Tensor], *, grid_size: tuple[int, int],
               device: torch.device | str = "cpu", model_name: str | None = None) -> VQKDTokenizer:
    """A VQ-KD tokenizer from its file's tensors, strictly checked against `VQKD_LAYOUT` (every key the tokenizer
    reads present with its shape, nothing unknown besides `VQKD_UNUSED`); its encoder sees the student's grid."""
    model_name = model_name or VQKD_ENCODER
    used = {k: v for k, v in weights.items() if not k.startswith(VQKD_UNUSED)}
    codebook = used.get("quantize.embedding.weight")
    has_codebook = codebook is not None and codebook.ndim == 2  # its shape sets V and D; else quote the release's
    vocab, code_dim = tuple(codebook.shape) if has_codebook else (VQKD_VOCAB, VQKD_CODE_DIM)
    encoder = meta_vit(model_name, grid_size, num_classes=0, global_pool="avg")  # avg pool: the final norm is fc_norm
    expected = vqkd_layout(encoder, vocab, code_dim)
    pos_key = "encoder.pos_embed"  # any square grid of the right width: resampled to the student's grid below
    if pos_key in used and _square_grid_of(used[pos_key], encoder.embed_dim):
        expected[pos_key] = tuple(used[pos_key].shape)
    problems = key_mismatches(expected, used)
    if problems:
        raise ValueError(f"--teacher_path {path} does not match the VQ-KD tokenizer (encoder: timm {model_name!r}); "
                         f"expected {VQKD_LAYOUT}. Keys that did not match: {'; '.join(problems)}")
    encoder_weights = checkpoint_filter_fn(vqkd_encoder_weights(used), encoder)  # resamples pos_embed to the grid
    encoder = assign_weights(encoder, encoder_weights, model_name, device)
    projection = nn.Sequential(nn.Linear(encoder.embed_dim, encoder.embed_dim), nn.Tanh(),
                               nn.Linear(encoder.embed_dim, code_dim))
    projection.load_state_dict({k.removeprefix("encode_task_layer."): v.float() for k, v in used.items()
                                if k.startswith("encode_task_layer.")})
    tokenizer = VQKDTokenizer(FrozenTeacher(encoder, mean=VQKD_MEAN, std=VQKD_STD, project=False), projection,
                              codebook)
    logger.info("VQ-KD tokenizer (encoder %s) from %s: input %s, grid %s, %d codes of width %d", model_name, path,
                tokenizer.encoder.input_size, tokenizer.grid_size, vocab, code_dim)
    return tokenizer


class TokenizerKind(NamedTuple):
    """A tokenizer family: the key that recognises its files, the layout quoted in errors, and its builder."""

    marker: str
    layout: str
    build: Callable[..., Tokenizer]


TOKENIZERS: dict[str, TokenizerKind] = {
    "vqkd": TokenizerKind("encode_task_layer.0.weight", VQKD_LAYOUT, build_vqkd),
}


def build_tokenizer(path: str | os.PathLike, *, grid_size: tuple[int, int], device: torch.device | str = "cpu",
                    model_name: str | None = None) -> Tokenizer:
    """A frozen tokenizer from a local file (safetensors or `torch.save`, read with weights_only=True, weights nested
    under 'model' / 'state_dict' as the releases ship them) whose token grid is `grid_size` (the student's).

    The family is recognised from the file's keys; a file of none (another tokenizer, a teacher) is checked against
    VQ-KD's layout, so the error names the keys it lacks. model_name: the timm architecture of the encoder (default
    ViT-B/16; a smaller one in tests); the file must match it. Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path)
    weights = load_teacher_weights(path)
    kind = next((k for k, spec in TOKENIZERS.items() if spec.marker in weights), "vqkd")
    return TOKENIZERS[kind].build(path, weights, grid_size=tuple(grid_size), device=device, model_name=model_name)
