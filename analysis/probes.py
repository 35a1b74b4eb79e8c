"""Frozen-feature probes that measure the features rather than an optimiser: for every encoder block, one vector per
image (the block's patch tokens averaged, as `main_linprobe.py --probe_block` reads them) is extracted once from the
un-augmented images, then

- a multinomial logistic regression is fitted to convergence (L-BFGS, scikit-learn) on standardised features, its
  inverse regularisation C picked on a stratified held-out part of the training set and the probe refitted on all of
  it with that C;
- a weighted k-NN classifier (DINO's protocol, Caron et al. 2021: cosine similarity, k = 20, votes weighted by
  exp(similarity / 0.07)) labels each validation image from the training images.

Both see the same standardised features (train mean and std per dimension, as the BatchNorm of MAE's linear-probe
head does); k-NN then L2-normalises them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from analysis.features import iter_block_features, pool_tokens
from models_deepmim import MaskedAutoencoderDeepMIM

# Inverse regularisation strengths tried on the held-out split; the grid's ends are reported when chosen.
C_GRID: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0)
HOLDOUT_FRACTION = 0.2
MAX_ITER = 5000
KNN_K = 20  # DINO's k-NN protocol (Caron et al. 2021, Sec. 4.1 / their eval_knn.py defaults)
KNN_TEMPERATURE = 0.07


@torch.no_grad()
def block_features(model: MaskedAutoencoderDeepMIM, batches: Iterable[tuple[Tensor, Tensor]],
                   device: str | torch.device = "cpu") -> tuple[list[np.ndarray], np.ndarray]:
    """Every block's average-pooled patch tokens of un-masked images; returns ([depth arrays (N, D)], labels (N,)).

    batches: (images ImageNet-normalised (B, 3, H, W), labels (B,)), e.g. a DataLoader with the evaluation transform.
    """
    model.eval()
    per_block: list[list[Tensor]] = [[] for _ in model.blocks]
    labels = []
    for imgs, targets in batches:
        for b, tokens in enumerate(iter_block_features(model, imgs.to(device))):
            per_block[b].append(pool_tokens(tokens, "mean").float().cpu())
        labels.append(targets)
    return [torch.cat(f).numpy() for f in per_block], torch.cat(labels).numpy()


def standardise(train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale both by the training set's per-dimension mean and std (constant dimensions left at 0)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (val - mean) / std


def _fit(probe, x: np.ndarray, y: np.ndarray, c: float) -> bool:
    """Fit `probe` (a LogisticRegression) with inverse regularisation c; returns whether L-BFGS converged."""
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # BLAS threads beyond torch's share only slow these small problems down (and starve parallel runs).
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(torch.get_num_threads()):
        warnings.simplefilter("always", ConvergenceWarning)
        probe.set_params(C=c).fit(x, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   c_grid: Sequence[float] = C_GRID, seed: int = 0) -> dict[str, Any]:
    """Top-1 (%) on val of an L-BFGS logistic regression with C picked on a stratified 20 % of train (ties: the
    smaller C), refitted on all of train. The grid is swept from strong to weak regularisation, each fit starting
    from the previous solution (the same optimum, fewer iterations). Returns acc1, the chosen C, every C's held-out
    top-1 and whether every fit converged (within MAX_ITER iterations)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    fit_x, held_x, fit_y, held_y = train_test_split(train_x, train_y, test_size=HOLDOUT_FRACTION,
                                                    stratify=train_y, random_state=seed)
    fit_x, held_x = standardise(fit_x, held_x)
    held_out, converged = {}, True
    path = LogisticRegression(max_iter=MAX_ITER, warm_start=True, random_state=seed)
    for c in sorted(c_grid):
        converged &= _fit(path, fit_x, fit_y, c)
        held_out[c] = 100.0 * float((path.predict(held_x) == held_y).mean())
    best = max(sorted(c_grid), key=lambda c: (held_out[c], -c))
    train_x, val_x = standardise(train_x, val_x)
    probe = LogisticRegression(max_iter=MAX_ITER, random_state=seed)
    converged &= _fit(probe, train_x, train_y, best)
    return {"acc1": 100.0 * float((probe.predict(val_x) == val_y).mean()), "C": best,
            "held_out_acc1": {str(c): a for c, a in held_out.items()}, "converged": bool(converged)}


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 (%) of DINO's weighted k-NN: cosine similarity of standardised, L2-normalised features; each of the k
    nearest training images votes for its class with weight exp(similarity / temperature)."""
    train_x, val_x = standardise(train_x, val_x)
    bank = torch.nn.functional.normalize(torch.from_numpy(train_x).double(), dim=1)
    queries = torch.nn.functional.normalize(torch.from_numpy(val_x).double(), dim=1)
    labels = torch.from_numpy(train_y).long()
    similarity, index = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), int(labels.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, labels[index], (similarity / temperature).exp())
    return 100.0 * float((votes.argmax(1).numpy() == val_y).mean())


def probe_blocks(train: tuple[Sequence[np.ndarray], np.ndarray], val: tuple[Sequence[np.ndarray], np.ndarray],
                 seed: int = 0) -> list[dict[str, Any]]:
    """logistic_probe and knn_accuracy of every block: [{"logreg": {...}, "knn_acc1": float}] in block order."""
    (train_feats, train_y), (val_feats, val_y) = train, val
    return [{"logreg": logistic_probe(t, train_y, v, val_y, seed=seed), "knn_acc1": knn_accuracy(t, train_y, v, val_y)}
            for t, v in zip(train_feats, val_feats)]
