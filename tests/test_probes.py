"""analysis.probes: the converged logistic-regression probe picks its regularisation on held-out training data
only, the weighted k-NN follows DINO's vote, and every block of a real encoder gets both; tools/probe_blocks.py, the
command over it, gives the same numbers and checks its data before computing anything."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, write_image_folder
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from analysis import cli, images, probes
from analysis.images import DemoCrops, eval_transform
from models_deepmim import create_model
from util.checkpoint import save_atomic


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


# -- tools/probe_blocks.py: the command over this module -------------------------------------------------------------


def probe_tool():
    spec = importlib.util.spec_from_file_location("tool_probe_blocks", ROOT / "tools" / "probe_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = probe_tool()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("deepmim_vit_small_patch16", **TINY).eval()
    path = tmp_path_factory.mktemp("probe_tool") / "deepmim.pth"
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 3}, path)
    return path, model


def run_probe_tool(tmp_path, *argv):
    args = TOOL.get_args_parser().parse_args(["--num_workers", "0", "--device", "cpu", "--batch_size", "8",
                                              "--output_dir", str(tmp_path / "out"), *argv])
    return TOOL.main(args)


def test_probe_tool_probes_the_library_s_features_of_every_block(tiny_checkpoint, tmp_path, monkeypatch):
    path, model = tiny_checkpoint
    data_path = tmp_path / "data"
    write_image_folder(data_path / "train", num_images=30, size=40, classes=3, seed=0)
    write_image_folder(data_path / "val", num_images=9, size=40, classes=3, seed=1)
    seen = {}

    def fake_probe_blocks(train, val, seed):  # the features the tool extracted; a result per block
        seen.update(train=train, val=val, seed=seed)
        return [{"logreg": {"acc1": 10.0 * b}, "knn_acc1": 20.0 * b} for b in range(len(train[0]))]

    monkeypatch.setattr(probes, "probe_blocks", fake_probe_blocks)
    data = run_probe_tool(tmp_path, "--ckpt", str(path), "--names", "D", "--data_path", str(data_path),
                          "--num_images", "30", "--num_val_images", "9", "--seed", "3")
    for split in ("train", "val"):
        loader = DataLoader(ImageFolder(str(data_path / split), transform=eval_transform(32)), batch_size=5)
        feats, labels = probes.block_features(model, loader)
        assert len(seen[split][0]) == TINY["depth"] and (seen[split][1] == labels).all()
        for ours, theirs in zip(seen[split][0], feats, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    result = data["checkpoints"]["D"]
    assert seen["seed"] == 3 and result["logreg_acc1"] == [0.0, 10.0, 20.0, 30.0] and result["knn_acc1"][-1] == 60.0
    assert data["num_train"] == 30 and data["num_val"] == 9
    assert json.loads((tmp_path / "out" / "probe_blocks.json").read_text())["checkpoints"]["D"]["path"] == str(path)
    assert (tmp_path / "out" / "probe_blocks.png").stat().st_size > 0


def test_probe_tool_on_demo_crops_labels_them_by_photograph(tiny_checkpoint, tmp_path):
    data = run_probe_tool(tmp_path, "--ckpt", str(tiny_checkpoint[0]), "--demo_images", "--num_images", "48",
                          "--num_val_images", "16")
    photos = len(DemoCrops(32, 1).photos)
    assert data["num_train"] == 48 and data["num_val"] == 16 and data["data"].startswith("demo crops")
    blocks = data["checkpoints"]["deepmim"]["blocks"]  # the real probes, end to end
    assert len(blocks) == TINY["depth"] and all(0 <= b["knn_acc1"] <= 100 and b["logreg"]["C"] in probes.C_GRID
                                                for b in blocks)
    train, val = images.build_labelled_splits(None, 48, 16, 32)
    assert images.labels_of(val) == [i % photos for i in range(48, 64)]  # crops after the training ones
    assert torch.equal(val[0][0], DemoCrops(32, 64)[48][0])


@pytest.mark.parametrize("layout, argv, message", [
    ("no val", ["--num_images", "30"], "must hold train/ and val/ ImageFolders"),
    ("other classes", ["--num_images", "30"], "train/ and val/ hold different class folders"),
    ("ok", ["--num_images", "4"], "--num_images 4 is too few for 3 classes"),
    ("ok", ["--num_images", "30", "--num_val_images", "0"], "--num_val_images must be >= 1"),
])
def test_probe_tool_refuses_bad_data_before_any_feature(tiny_checkpoint, tmp_path, monkeypatch, layout, argv,
                                                         message):
    monkeypatch.setattr(probes, "block_features", lambda *a, **k: pytest.fail("features were computed"))
    data_path = tmp_path / "data"
    write_image_folder(data_path / "train", num_images=30, size=40, classes=3)
    if layout != "no val":
        write_image_folder(data_path / "val", num_images=6, size=40, classes=2 if layout == "other classes" else 3)
    with pytest.raises(cli.UsageError, match=message):
        run_probe_tool(tmp_path, "--ckpt", str(tiny_checkpoint[0]), "--data_path", str(data_path), *argv)
