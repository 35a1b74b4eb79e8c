"""Linear CKA (analysis/cka.py): identities, invariances, agreement with a direct NumPy implementation, and the
minibatch (unbiased HSIC) estimate against the full-batch value."""

import numpy as np
import pytest
import torch

from analysis.cka import MinibatchCKA, cka, gram_linear, hsic_biased, hsic_unbiased, hsic_unbiased_matrix


def related_pair(n: int, p: int = 16, q: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (n, p) Gaussian; y: (n, q) a noisy linear map of x, so that CKA is well away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = 0.3 * x @ torch.randn(p, q, generator=g, dtype=torch.float64) + torch.randn(n, q, generator=g,
                                                                                     dtype=torch.float64)
    return x, y


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# -- NumPy reference, written from the formulas (Kornblith et al. 2019; Song et al. 2012) --------------------------


def np_hsic_biased(kx: np.ndarray, ky: np.ndarray) -> float:
    n = kx.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(kx @ h @ ky @ h)) / (n - 1) ** 2


def np_hsic_unbiased(kx: np.ndarray, ky: np.ndarray) -> float:
    n = kx.shape[0]
    kt, lt = kx - np.diag(np.diag(kx)), ky - np.diag(np.diag(ky))
    ones = np.ones(n)
    value = (np.trace(kt @ lt) + (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * ones @ kt @ lt @ ones)
    return float(value) / (n * (n - 3))


def np_cka(x: np.ndarray, y: np.ndarray, hsic) -> float:
    kx, ky = x @ x.T, y @ y.T
    return hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))


def np_linear_cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space form: ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


# -- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(unbiased):
    x, _ = related_pair(64)
    assert cka(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    acc = MinibatchCKA(2)
    for i in range(0, 64, 16):
        acc.update([x[i:i + 16], x[i:i + 16]])
    assert acc.compute()[0, 1].item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(unbiased):
    x, y = related_pair(80)
    reference = cka(x, y, unbiased=unbiased)
    qx, qy = random_orthogonal(x.shape[1], 1), random_orthogonal(y.shape[1], 2)
    assert cka(x @ qx, y, unbiased=unbiased) == pytest.approx(reference, abs=1e-10)
    assert cka(x, y @ qy, unbiased=unbiased) == pytest.approx(reference, abs=1e-10)
    assert cka(3.7 * x, y, unbiased=unbiased) == pytest.approx(reference, abs=1e-10)
    assert cka(x, 0.02 * y, unbiased=unbiased) == pytest.approx(reference, abs=1e-10)
    assert cka(5.0 * x @ qx, 0.3 * y @ qy, unbiased=unbiased) == pytest.approx(reference, abs=1e-10)
    # Not invariant to an arbitrary (non-orthogonal) linear map: the test above would pass for any function.
    squash = torch.diag(torch.linspace(0.01, 10, x.shape[1], dtype=torch.float64))
    assert abs(cka(x @ squash, y, unbiased=unbiased) - reference) > 1e-3


def test_both_estimators_are_invariant_to_translation():
    # Features are not centred before the Gram matrix: HSIC_0 centres it, HSIC_1 is translation invariant.
    x, y = related_pair(60)
    for unbiased in (False, True):
        assert cka(x + 3.0, y - 2.0, unbiased=unbiased) == pytest.approx(cka(x, y, unbiased=unbiased), abs=1e-9)


def test_agrees_with_direct_numpy_formulas():
    x, y = related_pair(40, p=10, q=7, seed=3)
    xn, yn = x.numpy(), y.numpy()
    kx, ky = gram_linear(x), gram_linear(y)
    assert float(hsic_biased(kx, ky)) == pytest.approx(np_hsic_biased(kx.numpy(), ky.numpy()), rel=1e-10)
    assert float(hsic_unbiased(kx, ky)) == pytest.approx(np_hsic_unbiased(kx.numpy(), ky.numpy()), rel=1e-10)
    assert cka(x, y) == pytest.approx(np_cka(xn, yn, np_hsic_biased), rel=1e-10)
    assert cka(x, y) == pytest.approx(np_linear_cka_features(xn, yn), rel=1e-10)
    assert cka(x, y, unbiased=True) == pytest.approx(np_cka(xn, yn, np_hsic_unbiased), rel=1e-10)


def test_hsic_matrix_holds_every_pair():
    sets = [torch.randn(12, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) for d in (3, 5, 8)]
    grams = torch.stack([gram_linear(s) for s in sets])
    matrix = hsic_unbiased_matrix(grams)
    for i in range(3):
        for j in range(3):
            expected = np_hsic_unbiased(grams[i].numpy(), grams[j].numpy())
            assert matrix[i, j].item() == pytest.approx(expected, rel=1e-10)


def test_minibatch_estimate_matches_full_batch_on_random_data():
    # 2000 examples in 20 batches of 100. The minibatch estimate averages the unbiased HSIC_1 over batches
    # (Nguyen et al. 2021); it is compared with (a) full-batch CKA built on the same HSIC_1 and (b) Kornblith's
    # biased full-batch CKA, whose bias is O(p / n) here (p = 16 features, n = 2000), well below the tolerance.
    x, y = related_pair(2000)
    acc = MinibatchCKA(2)
    for i in range(0, 2000, 100):
        acc.update([x[i:i + 100], y[i:i + 100]])
    estimate = acc.compute()[0, 1].item()
    assert 0.2 < estimate < 0.8  # a non-trivial similarity
    assert estimate == pytest.approx(cka(x, y, unbiased=True), abs=1e-2)
    assert estimate == pytest.approx(cka(x, y, unbiased=False), abs=1e-2)
    assert acc.num_batches == 20 and acc.num_examples == 2000


def test_minibatch_cka_skips_batches_too_small_for_the_unbiased_hsic():
    x, y = related_pair(40)
    acc = MinibatchCKA(2)
    with pytest.raises(RuntimeError, match="before any batch"):
        acc.compute()
    acc.update([x[:3], y[:3]])
    assert acc.num_batches == 0
    acc.update([x[:20], y[:20]])
    assert acc.num_batches == 1 and acc.num_examples == 20
    with pytest.raises(ValueError, match="different numbers of examples"):
        acc.update([x[:20], y[:10]])
    with pytest.raises(ValueError, match="expected 2 feature sets"):
        acc.update([x[:20]])
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased_matrix(torch.stack([gram_linear(x[:3])]))
