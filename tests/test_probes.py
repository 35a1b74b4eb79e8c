"""analysis.probes: the converged logistic-regression probe picks its regularisation on held-out training data
only, the weighted k-NN follows DINO's vote, and every block of a real encoder gets both."""

import numpy as np
import pytest
import torch

from analysis import probes
from models_deepmim import create_model


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_logistic_probe_separates_blobs_and_picks_c_on_held_out_data():
    x, y = blobs(40, 4, 8, 0.5, 0)
    vx, vy = blobs(20, 4, 8, 0.5, 0)
    out = probes.logistic_probe(x, y, vx, vy)
    assert out["acc1"] == 100.0 and out["converged"]
    assert set(out["held_out_acc1"]) == {str(c) for c in probes.C_GRID}
    best = max(out["held_out_acc1"].values())
    # The chosen C is the smallest of those with the best held-out accuracy: chosen on train data only.
    assert out["C"] == min(c for c in probes.C_GRID if out["held_out_acc1"][str(c)] == best)


def test_logistic_probe_does_not_look_at_val_labels():
    x, y = blobs(30, 3, 6, 2.0, 1)
    vx, vy = blobs(30, 3, 6, 2.0, 2)
    a = probes.logistic_probe(x, y, vx, vy)
    b = probes.logistic_probe(x, y, vx, (vy + 1) % 3)  # permuted val labels: same C, same predictions
    assert a["C"] == b["C"] and a["held_out_acc1"] == b["held_out_acc1"]


def test_knn_weighted_vote_by_hand():
    # Training points at angles 0, 40, 50 degrees and their rotations by 90, 180, 270: zero mean and equal std per
    # dimension, so standardising only rescales and cosine similarities stay those of the angles. Labels: 0, 1, 1 for
    # the first three, 2 for the rotations. A query at 10 degrees has as its 3 nearest: 0 deg (cos 10 = 0.985, class
    # 0), 40 deg (cos 30 = 0.866, class 1), 50 deg (cos 40 = 0.766, class 1).
    angles = np.deg2rad([a + r for r in (0, 90, 180, 270) for a in (0, 40, 50)])
    train = np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = np.array([0, 1, 1] + [2] * 9)
    query = np.array([[np.cos(np.deg2rad(10)), np.sin(np.deg2rad(10))]]) * 3.0
    # T = 0.07: exp(0.985 / 0.07) = 1.3e6 outweighs exp(0.866 / 0.07) + exp(0.766 / 0.07) = 2.9e5: class 0.
    assert probes.knn_accuracy(train, labels, query, np.array([0]), k=3, temperature=0.07) == 100.0
    # A very high temperature makes the weights equal: the two class-1 neighbours outvote class 0.
    assert probes.knn_accuracy(train, labels, query, np.array([1]), k=3, temperature=1e6) == 100.0
    # k = 1 is the nearest neighbour.
    assert probes.knn_accuracy(train, labels, query, np.array([0]), k=1) == 100.0


def test_every_block_of_an_encoder_is_probed():
    torch.manual_seed(0)
    model = create_model("mae_vit_small_patch16", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(40, 3, 16, 16)
    labels = torch.arange(40) % 4
    imgs += labels.view(-1, 1, 1, 1).float()  # class shifts the brightness: separable from any block
    batches = [(imgs[i:i + 16], labels[i:i + 16]) for i in range(0, 40, 16)]
    feats, y = probes.block_features(model, batches)
    assert len(feats) == 3 and all(f.shape == (40, 32) for f in feats) and (y == labels.numpy()).all()
    results = probes.probe_blocks((feats, y), (feats, y))
    assert len(results) == 3
    assert all(r["logreg"]["acc1"] > 90 and r["knn_acc1"] > 90 for r in results)


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_standardise_uses_train_statistics(shift):
    train = np.array([[0.0, 1.0], [2.0, 1.0]]) + shift
    val = np.array([[1.0, 3.0]]) + shift
    t, v = probes.standardise(train, val)
    assert np.allclose(t.mean(0), 0) and np.allclose(v, [[0.0, 2.0]])  # constant dimension: centred, not scaled
