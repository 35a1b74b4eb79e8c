"""Attention-head diversity: cosine similarity between the outputs of the heads of one layer (paper Fig. 6).

Definition used here (the paper says only "cosine similarities between different attention heads", citing [52]):
for layer l, let O_h be head h's attention output softmax(Q_h K_h^T / sqrt(d_h)) V_h — the (T, d_h) slice of the
input of the output projection `attn.proj` — stacked over all T tokens (cls included) of all N images into one
vector o_h of N * T * d_h numbers. The similarity of heads i and j is cos(o_i, o_j) = <o_i, o_j> / (|o_i| |o_j|),
for every pair i < j (H (H - 1) / 2 pairs); the layer's score is the mean over pairs. Lower means more diverse.
Identical heads score 1, heads with orthogonal outputs 0.

The inner products <o_i, o_j> are sums over images, so `HeadSimilarity` accumulates one (H, H) Gram matrix per layer
batch by batch and never holds the features of more than one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def head_gram(heads: Tensor) -> Tensor:
    """heads: (N, H, T, d) attention outputs of one layer -> (H, H) float64 inner products summed over N, T, d."""
    flat = heads.transpose(0, 1).reshape(heads.shape[1], -1).double()
    return flat @ flat.T


def cosine_from_gram(gram: Tensor) -> Tensor:
    """(..., H, H) Gram matrices -> (..., H, H) cosine similarities."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
    return gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))


def head_cosine_similarity(heads: Tensor) -> Tensor:
    """heads: (N, H, T, d) -> (H, H) cosine similarity between the heads' flattened outputs (see module doc)."""
    return cosine_from_gram(head_gram(heads))


def pairwise_values(similarity: Tensor) -> Tensor:
    """(..., H, H) similarity -> (..., H (H - 1) / 2) values of the pairs i < j, in row-major order."""
    h = similarity.shape[-1]
    rows, cols = torch.triu_indices(h, h, offset=1)
    return similarity[..., rows, cols]


def mean_pairwise(similarity: Tensor) -> Tensor:
    """(..., H, H) -> (...) mean cosine similarity over the pairs i < j (the large dots of Fig. 6)."""
    return pairwise_values(similarity).mean(dim=-1)


class HeadSimilarity:
    """Streaming per-layer head similarity: `update` with one batch of every layer's (N, H, T, d) head outputs;
    `compute` returns (num_layers, H, H) cosine similarities over every image seen."""

    def __init__(self, num_layers: int, num_heads: int):
        self.gram = torch.zeros(num_layers, num_heads, num_heads, dtype=torch.float64)
        self.num_images = 0

    def update(self, heads_per_layer: Sequence[Tensor]) -> None:
        if len(heads_per_layer) != self.gram.shape[0]:
            raise ValueError(f"expected {self.gram.shape[0]} layers, got {len(heads_per_layer)}")
        for layer, heads in enumerate(heads_per_layer):
            self.gram[layer] += head_gram(heads).cpu()
        self.num_images += heads_per_layer[0].shape[0]

    def compute(self) -> Tensor:
        if self.num_images == 0:
            raise RuntimeError("HeadSimilarity.compute() before any update")
        return cosine_from_gram(self.gram)
