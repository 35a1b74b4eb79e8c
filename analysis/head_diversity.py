"""Attention-head diversity of one layer (paper Fig. 6), measured on the heads' outputs or on their attention maps.

Outputs (`HeadSimilarity`; the paper says only "cosine similarities between different attention heads", citing [52]):
for layer l, let O_h be head h's attention output softmax(Q_h K_h^T / sqrt(d_h)) V_h — the (T, d_h) slice of the
input of the output projection `attn.proj` — stacked over all T tokens (cls included) of all N images into one
vector o_h of N * T * d_h numbers. The similarity of heads i and j is cos(o_i, o_j) = <o_i, o_j> / (|o_i| |o_j|),
for every pair i < j (H (H - 1) / 2 pairs); the layer's score is the mean over pairs. Lower means more diverse.
Identical heads score 1, heads with orthogonal outputs 0.

Maps (`HeadKL`): the measure of the work the paper cites for head diversity, Xie et al. [52] ("Revealing the dark
secrets of masked image modeling", Sec. 3.2), the KL divergence between the attention distributions of two heads:
for query token q of image n, P_h(q) = softmax(Q_h K_h^T / sqrt(d_h))[q] is a distribution over the T keys, and
KL(i || j) is the mean over all N * T query rows of KL(P_i(q) || P_j(q)). KL is asymmetric and [52] does not say
which direction its dots show, so each pair i < j gets the mean of both directions. Higher means more diverse;
identical heads score 0.

The sums over images are accumulated batch by batch, so neither measure holds the features of more than one batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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


class HeadPairSums(ABC):
    """Per-layer (H, H) sums over the images seen, batch by batch: `update` with one batch of every layer's
    (N, H, ...) tensors adds `batch_sum` of each; a subclass says what is summed and what `compute` returns."""

    def __init__(self, num_layers: int, num_heads: int):
        self.sums = torch.zeros(num_layers, num_heads, num_heads, dtype=torch.float64)
        self.num_images = 0
        self.num_rows = 0  # images x tokens

    @staticmethod
    @abstractmethod
    def batch_sum(heads: Tensor) -> Tensor:
        """(N, H, ...) one batch of one layer's heads -> (H, H) what this measure sums over images."""

    def update(self, heads_per_layer: Sequence[Tensor]) -> None:
        if len(heads_per_layer) != self.sums.shape[0]:
            raise ValueError(f"expected {self.sums.shape[0]} layers, got {len(heads_per_layer)}")
        for layer, heads in enumerate(heads_per_layer):
            self.sums[layer] += self.batch_sum(heads).cpu()
        self.num_images += heads_per_layer[0].shape[0]
        self.num_rows += heads_per_layer[0].shape[0] * heads_per_layer[0].shape[2]

    def check_updated(self) -> None:
        if self.num_images == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() before any update")


class HeadSimilarity(HeadPairSums):
    """Streaming per-layer head similarity: `update` with one batch of every layer's (N, H, T, d) head outputs;
    `compute` returns (num_layers, H, H) cosine similarities over every image seen."""

    batch_sum = staticmethod(head_gram)

    def compute(self) -> Tensor:
        self.check_updated()
        return cosine_from_gram(self.sums)


def head_kl_sums(maps: Tensor) -> Tensor:
    """maps: (N, H, T, T) attention probabilities of one layer -> (H, H) float64, entry (i, j) the sum over the N * T
    query rows of KL(P_i || P_j) (natural log)."""
    p = maps.double()
    log_p = p.clamp_min(torch.finfo(torch.float64).tiny).log()
    neg_entropy = (p * log_p).sum(dim=(0, 2, 3))  # (H,): sum of P_i log P_i
    cross = torch.einsum("nhqk,ngqk->hg", p, log_p)  # (H, H): sum of P_i log P_j
    return neg_entropy.unsqueeze(1) - cross


class HeadKL(HeadPairSums):
    """Streaming per-layer KL divergence between heads' attention maps (Xie et al. [52], see the module doc):
    `update` with one batch of every layer's (N, H, T, T) maps; `compute` returns (num_layers, H, H), symmetric,
    zero on the diagonal."""

    batch_sum = staticmethod(head_kl_sums)

    def compute(self) -> Tensor:
        self.check_updated()
        kl = self.sums / self.num_rows
        return (kl + kl.transpose(-1, -2)) / 2
