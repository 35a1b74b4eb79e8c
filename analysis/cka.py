"""Linear centered kernel alignment (CKA, Kornblith et al. 2019), the similarity of paper Fig. 4 and Fig. 5.

For two representations of the same n examples, X: (n, p) and Y: (n, q), with linear Gram matrices K = X X^T and
L = Y Y^T,

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Two HSIC estimators are provided:
- biased (Gretton et al. 2005): HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 with H = I - 11^T / n. Full-batch CKA with it
  is Kornblith et al.'s linear CKA.
- unbiased (Song et al. 2012): with K~, L~ the Gram matrices with their diagonals set to zero,
  HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2)) - 2 / (n - 2) 1^T K~ L~ 1] / (n (n - 3)).

Minibatch CKA (Nguyen et al. 2021, "Do wide and deep networks learn the same things?") averages HSIC_1 over k
minibatches before the ratio: CKA = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) mean_i HSIC_1(L_i, L_i)).
Because HSIC_1 is unbiased, the average converges to the population HSIC however small each batch is, so features
of thousands of images never have to be held at once: `MinibatchCKA` keeps one (m, m) matrix of HSIC sums for m
feature sets (e.g. every block of two models).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MIN_BATCH = 4  # HSIC_1 divides by n (n - 3)


def gram_linear(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Linear kernel Gram matrix. x: (n, ...) -> (n, n), computed in `dtype` (float64: the unbiased estimator
    subtracts large terms)."""
    x = x.reshape(x.shape[0], -1).to(dtype)
    return x @ x.T


def hsic_biased(kx: Tensor, ky: Tensor) -> Tensor:
    """HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 for (n, n) Gram matrices."""
    return (_center(kx) * _center(ky)).sum() / (kx.shape[0] - 1) ** 2


def hsic_unbiased(kx: Tensor, ky: Tensor) -> Tensor:
    """HSIC_1(K, L) of Song et al. (2012) for (n, n) Gram matrices, n >= 4."""
    return hsic_unbiased_matrix(torch.stack([kx, ky]))[0, 1]


def hsic_unbiased_matrix(grams: Tensor) -> Tensor:
    """HSIC_1 between every pair of m Gram matrices at once. grams: (m, n, n) -> (m, m), n >= 4.

    The three terms of HSIC_1 are inner products, so all m^2 pairs cost three small matrix products.
    """
    m, n, _ = grams.shape
    if n < MIN_BATCH:
        raise ValueError(f"the unbiased HSIC needs at least {MIN_BATCH} examples, got {n}")
    tilde = grams * (1 - torch.eye(n, dtype=grams.dtype, device=grams.device))
    flat = tilde.reshape(m, n * n)
    row_sums = tilde.sum(dim=2)  # (m, n): K~ 1
    totals = row_sums.sum(dim=1)  # (m,): 1^T K~ 1
    trace_term = flat @ flat.T  # tr(K~ L~), the Gram matrices being symmetric
    sum_term = torch.outer(totals, totals) / ((n - 1) * (n - 2))
    cross_term = 2 / (n - 2) * (row_sums @ row_sums.T)  # 1^T K~ L~ 1
    return (trace_term + sum_term - cross_term) / (n * (n - 3))


def cka(x: Tensor, y: Tensor, unbiased: bool = False) -> float:
    """Full-batch linear CKA between x: (n, ...) and y: (n, ...) (flattened per example).

    unbiased=False is Kornblith et al.'s estimator (HSIC_0); unbiased=True uses HSIC_1, the estimator that
    `MinibatchCKA` averages, so the two agree when the minibatch average has converged.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same examples, got {x.shape[0]} and {y.shape[0]} rows")
    kx, ky = gram_linear(x), gram_linear(y)
    hsic = hsic_unbiased if unbiased else hsic_biased
    return float(hsic(kx, ky) / (hsic(kx, kx) * hsic(ky, ky)).sqrt())


def cka_from_hsic(hsic: Tensor) -> Tensor:
    """(m, m) HSIC values -> (m, m) CKA: hsic[i, j] / sqrt(hsic[i, i] hsic[j, j])."""
    diag = hsic.diagonal()
    return hsic / torch.sqrt(torch.outer(diag, diag))


class MinibatchCKA:
    """Streaming CKA between m feature sets of the same examples (Nguyen et al. 2021).

    Call `update` with one batch of every feature set (e.g. the token features of every block of two models on the
    same images); `compute` returns the (m, m) CKA matrix of the batch-averaged unbiased HSIC. Memory is O(m^2)
    plus one batch. Batches of fewer than 4 examples are skipped (HSIC_1 is undefined there) with a warning.
    """

    def __init__(self, num_sets: int):
        self.num_sets = num_sets
        self.hsic_sum = torch.zeros(num_sets, num_sets, dtype=torch.float64)
        self.num_batches = 0
        self.num_examples = 0

    def update(self, features: Sequence[Tensor]) -> None:
        """features: m tensors (n, ...) for the same n examples, in a fixed order across calls."""
        if len(features) != self.num_sets:
            raise ValueError(f"expected {self.num_sets} feature sets, got {len(features)}")
        n = features[0].shape[0]
        if any(f.shape[0] != n for f in features):
            raise ValueError(f"feature sets hold different numbers of examples: {[f.shape[0] for f in features]}")
        if n < MIN_BATCH:
            logger.warning("MinibatchCKA: skipping a batch of %d examples (the unbiased HSIC needs %d)", n, MIN_BATCH)
            return
        self.update_grams(torch.stack([gram_linear(f) for f in features]))

    def update_grams(self, grams: Tensor) -> None:
        """grams: (m, n, n) Gram matrices of one batch (e.g. `gram_linear` of each feature set), n >= 4."""
        if grams.shape[0] != self.num_sets:
            raise ValueError(f"expected {self.num_sets} Gram matrices, got {grams.shape[0]}")
        self.hsic_sum += hsic_unbiased_matrix(grams.double()).cpu()
        self.num_batches += 1
        self.num_examples += grams.shape[1]

    def compute(self) -> Tensor:
        """(m, m) float64 CKA matrix; raises if no batch was accumulated."""
        if self.num_batches == 0:
            raise RuntimeError("MinibatchCKA.compute() before any batch of at least 4 examples")
        return cka_from_hsic(self.hsic_sum / self.num_batches)


def _center(k: Tensor) -> Tensor:
    """H K H: subtract row and column means, add back the grand mean."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
