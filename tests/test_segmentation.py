"""segmentation/: the ADE20K layout and its errors, the released pipelines (image and label stay aligned, crops
honour cat_max_ratio, padding is 255), mmseg's metrics against torchmetrics and scikit-learn, sliding windows, and
the segmentor's load report; evaluation on 1 and 2 gloo ranks agrees."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from sklearn.metrics import confusion_matrix
from torchmetrics.classification import MulticlassJaccardIndex

from segmentation import data, inference, transforms
from segmentation.demo import write_demo_dataset
from segmentation.metrics import class_areas, metrics_from_areas
from segmentation.segmentor import create_segmentor, head_counts, load_pretrained_encoder

ENCODER = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, label: np.ndarray) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg")
    Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("mosaics"), n_train=4, n_val=5)


# -- data -------------------------------------------------------------------------------------------------------


def test_layout_errors_name_the_file_and_the_fix(tmp_path, mosaics):
    with pytest.raises(ValueError, match="ADEChallengeData2016 layout"):
        data.check_layout(tmp_path)
    image = np.zeros((8, 8, 3), np.uint8)
    write_pair(tmp_path, "training", "a", image, np.zeros((8, 8), np.uint8))
    (tmp_path / "images" / "training" / "b.jpg").write_bytes((tmp_path / "images" / "training" / "a.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"images/training/b.jpg has no annotation .*add the annotations"):
        data.find_pairs(tmp_path, "training")
    write_pair(tmp_path, "training", "b", image, np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"b.jpg is 8x8 but its annotation .*b.png is 8x6"):
        data.check_sizes(data.find_pairs(tmp_path, "training"))
    folder = data.SegmentationFolder(mosaics, "training", transforms.TestTransform(), num_classes=3)
    with pytest.raises(ValueError, match=r"mosaic_training_0000.png holds label values \[3\].*--num_classes 3"):
        folder.read(0)


def test_reduce_zero_label_is_mmseg_s():
    label = np.array([0, 1, 2, 150, 255], np.uint8)
    assert data.reduce_zero_label(label).tolist() == [255, 0, 1, 149, 255]


# -- transforms ---------------------------------------------------------------------------------------------------

COLOURS = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], dtype=torch.uint8)


def blocky_pair(height: int = 96, width: int = 160, block: int = 16, seed: int = 0):
    """A label map of blocks and the image that paints each class its own colour: the label is computed from the
    image."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, len(COLOURS), (height // block, width // block), generator=g)
    label = small.repeat_interleave(block, 0).repeat_interleave(block, 1).to(torch.uint8)
    return COLOURS[label.long()].permute(2, 0, 1).contiguous(), label


def test_image_and_label_stay_aligned_through_the_training_pipeline():
    image, label = blocky_pair()
    transform = transforms.TrainTransform(crop_size=64, scale=(256, 64), photometric=False, normalise=False)
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_label = transform(image, label)
        assert out_image.shape == (3, 64, 64) and out_label.dtype == torch.int64
        valid = out_label != 255
        interior = valid.clone()  # pixels whose 3x3 neighbourhood has one class: bilinear gives the exact colour
        padded = torch.nn.functional.pad(out_label[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                interior &= padded[dy:dy + 64, dx:dx + 64] == out_label
        recomputed = (out_image[:, None].int() - COLOURS.T[:, :, None, None].int()).abs().sum(0).argmin(0)
        assert interior.sum() > 500
        assert torch.equal(recomputed[interior], out_label[interior])
        assert (out_image[:, ~valid] == 0).all()  # padding: image 0 (here before normalisation), label 255


def test_small_images_are_padded_with_255_and_normalised_zero():
    image, label = blocky_pair(height=32, width=48)
    torch.manual_seed(0)
    out_image, out_label = transforms.TrainTransform(64, scale=(64, 32), ratio_range=(1.0, 1.0))(image, label)
    assert (out_label[32:] == 255).all() and (out_label[:, 48:] == 255).all()
    assert (out_image[:, 32:] == 0).all() and out_image[:, :32, :48].abs().sum() > 0


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = torch.zeros(16, 64, dtype=torch.uint8)
    label[:, 50:] = 1  # a crop shows both classes with neither >= 75 % only near the right edge
    image = torch.zeros(3, 16, 64, dtype=torch.uint8)

    def good_share(ratio: float) -> float:
        good = 0
        for seed in range(40):
            torch.manual_seed(seed)
            _, crop = transforms.random_crop(image, label, 16, ratio)
            classes, share = transforms.dominant_share(crop)
            good += classes > 1 and share < 0.75
        return good / 40

    assert good_share(1.0) < 0.35 and good_share(0.75) > 0.8


def test_photometric_distortion_keeps_uint8_and_saturation_is_hsv_s():
    image, _ = blocky_pair()
    torch.manual_seed(0)
    out = transforms.photometric_distortion(image)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(transforms.adjust_hsv_saturation(image, 1.0), image)
    gray = transforms.adjust_hsv_saturation(image, 0.0)
    assert torch.equal(gray, image.amax(0, keepdim=True).expand_as(image))  # S = 0: every channel = V


# -- metrics and inference ------------------------------------------------------------------------------------------


def test_metrics_match_torchmetrics_and_sklearn():
    g = torch.Generator().manual_seed(0)
    classes = 6
    preds = [torch.randint(0, 5, (40, 50), generator=g) for _ in range(3)]  # class 5 never predicted
    labels = [torch.randint(0, 4, (40, 50), generator=g) for _ in range(3)]  # classes 4, 5 never labelled
    for label in labels:
        label[torch.rand(label.shape, generator=g) < 0.2] = 255
    areas = sum(class_areas(p, lab, classes) for p, lab in zip(preds, labels))
    metrics = metrics_from_areas(areas)
    jaccard = MulticlassJaccardIndex(classes, average="none", ignore_index=255)
    for p, lab in zip(preds, labels):
        jaccard.update(p, lab)
    reference = jaccard.compute() * 100
    assert metrics["IoU"][5] is None and metrics["Acc"][4] is None and metrics["IoU"][4] == 0.0
    for k in range(5):
        assert metrics["IoU"][k] == pytest.approx(float(reference[k]), abs=1e-4)
    keep = torch.cat([lab.flatten() for lab in labels]) != 255
    y_true = torch.cat([lab.flatten() for lab in labels])[keep].numpy()
    y_pred = torch.cat([p.flatten() for p in preds])[keep].numpy()
    cm = confusion_matrix(y_true, y_pred, labels=list(range(classes)))
    recall = [cm[k, k] / cm[k].sum() * 100 for k in range(4)]
    assert metrics["mAcc"] == pytest.approx(np.mean(recall))
    assert metrics["aAcc"] == pytest.approx(np.trace(cm) / cm.sum() * 100)
    iou = [float(reference[k]) for k in range(5)]  # class 5: in neither prediction nor label -> left out
    assert metrics["mIoU"] == pytest.approx(np.mean(iou), abs=1e-4)


def test_one_window_equals_whole_image_inference():
    model = create_segmentor(ENCODER, 3, img_size=64, channels=16, aux_channels=8).eval()
    image = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(inference.slide_inference(model.predict, image, 3, 64, 43), model.predict(image))


@pytest.mark.parametrize("size", [(450, 600), (300, 200)])
def test_every_pixel_covered_and_normalised(size):
    """A window-local 'model' that returns its input's channels: the averaged windows give the image back exactly,
    so every pixel is covered and divided by its count (also for an image smaller than the window)."""
    image = torch.rand(1, 3, *size)
    out = inference.slide_inference(lambda crops: crops.clone(), image, 3, 512, 341)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-6)
    assert inference.window_starts(600, 512, 341) == [0, 88]


def test_segmentor_load_report_names_every_new_part(tiny_deepmim):
    model = create_segmentor(ENCODER, 4, img_size=32, channels=16, aux_channels=8)
    report = load_pretrained_encoder(model, {"model": tiny_deepmim.state_dict()})
    loaded = {f"backbone.{k}" for k in report.loaded}
    new = set(model.state_dict()) - loaded
    assert new == {f"backbone.{k}" for k in report.new} | {k for k in model.state_dict()
                                                           if k.startswith(("decode_head.", "auxiliary_head."))}
    assert all(k.startswith(("decoders.", "norm.", "blocks.")) for k in report.unused)
    text = report.describe(head_counts(model))
    assert "decode head" in text and "auxiliary head" in text and "relative position tables (4 tensors)" in text


def evaluate_on_rank(rank: int, world: int, root: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_segmentor(ENCODER, 4, img_size=64, channels=16, aux_channels=8).eval()
    val = data.SegmentationFolder(root, "validation", transforms.TestTransform((256, 64)), 4)
    sampler = torch.utils.data.DistributedSampler(val, world, rank, shuffle=False) if world > 1 else None
    loader = torch.utils.data.DataLoader(data.Indexed(val), batch_size=1, sampler=sampler)
    num_real = len(range(rank, len(val), world)) if world > 1 else None
    metrics = inference.evaluate(model.predict, loader, torch.device("cpu"), 4, 64, 43, num_samples=num_real,
                                 save_dir=f"{out}/pred", stems=val.stem)
    if rank == 0:
        torch.save({k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "images")}, f"{out}/metrics.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def test_one_and_two_ranks_give_the_same_numbers(mosaics, tmp_path):
    """5 validation images: rank 1 gets DistributedSampler's padded duplicate of image 0, which must not count."""
    evaluate_on_rank(0, 1, str(mosaics), 0, str(tmp_path / "one"))
    mp.start_processes(evaluate_on_rank, args=(2, str(mosaics), 29613, str(tmp_path / "two")), nprocs=2,
                       start_method="fork")
    one = torch.load(tmp_path / "one" / "metrics.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "metrics.pt", weights_only=True)
    assert one == two and one["images"] == 5
    assert sorted(p.name for p in (tmp_path / "two" / "pred").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "pred").iterdir())
