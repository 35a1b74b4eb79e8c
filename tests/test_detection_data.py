"""detection.data / detection.transforms: COCO-layout checks name the file and the fix, degenerate boxes are dropped
and counted, crowd annotations and images without annotations stay out of training, and large-scale jitter keeps
boxes and masks on the objects of the image."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from detection import demo
from detection.data import CocoDetection, CocoIndex, SkipUnreadable, check_layout, collate_eval, split_paths
from detection.transforms import lsj_transform
from util.datasets import RobustSeededDataset


@pytest.fixture(scope="module")
def coins_coco(tmp_path_factory) -> Path:
    return demo.write_demo_dataset(tmp_path_factory.mktemp("coins"))


def copy_with(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the demo set whose train annotation file `edit(dict)` changed."""
    out = tmp_path / "data"
    shutil.copytree(root, out)
    _, ann_file = split_paths(out, "train")
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))
    return out


def test_demo_set_is_the_24_coins(coins_coco):
    train, val = (CocoIndex(*split_paths(coins_coco, s)) for s in ("train", "val"))
    assert train.names == ["coin"] and train.num_classes == 1
    assert len(train.coco.anns) == 8 * 18 and len(val.coco.anns) == 8 * 6
    assert len(CocoDetection(train, train=True)) == 8 and len(CocoDetection(val, train=False)) == 8


def near(mask: torch.Tensor) -> torch.Tensor:
    """Pixels within one pixel (8-neighbourhood) of `mask`."""
    return F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def test_lsj_keeps_boxes_and_masks_on_the_objects():
    """The coins' masks, computed from the photograph (`demo.coin_labels`), stay on the coins through flips, scales
    0.1-2 and crops/pads: on a copy of the photograph with its background set to 0, every mask pixel is within one
    pixel of a coin pixel of the transformed image and the reverse (resampling moves edges by less than a pixel);
    boxes are the masks' tight boxes. The same masks mirrored (misaligned) fail."""
    photo, labels = demo.coin_labels()
    image = torch.from_numpy(np.where(labels > 0, np.maximum(photo, 100), 0).astype(np.uint8))
    masks = torch.from_numpy(np.stack([labels == i for i in range(1, labels.max() + 1)]).astype(np.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]),
                                                format="XYXY", canvas_size=image.shape),
              "masks": tv_tensors.Mask(masks), "labels": torch.ones(len(masks), dtype=torch.int64)}
    transform = lsj_transform(256)
    for seed in range(6):
        torch.manual_seed(seed)
        out, t = transform(tv_tensors.Image(image[None].expand(3, -1, -1).clone()), target)
        assert out.shape == (3, 256, 256) and t["masks"].shape[1:] == (256, 256)
        coins = (out[0] > 50) & (out[0] == out[2])  # the grey photograph's coins, not the coloured pad
        union = t["masks"].bool().any(0)
        assert near(coins)[union].all() and near(union)[coins].all(), seed
        mirrored = union.flip(-1)
        assert not (near(coins)[mirrored].all() and near(mirrored)[coins].all()), seed
        for box, mask in zip(t["boxes"], t["masks"].bool()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert len(t["labels"]) == len(t["boxes"]) == len(t["masks"]) > 0


def test_bad_inputs_name_the_file_and_the_fix(coins_coco, tmp_path):
    with pytest.raises(ValueError, match="instances_val2017.json.*COCO 2017 layout"):
        bad = tmp_path / "no_val"
        shutil.copytree(coins_coco, bad)
        split_paths(bad, "val")[1].unlink()
        check_layout(bad)
    missing = copy_with(coins_coco, tmp_path / "a", lambda d: d["images"][0].update(file_name="gone.png"))
    with pytest.raises(ValueError, match=r"gone.png.*does not exist"):
        CocoIndex(*split_paths(missing, "train"))
    unknown = copy_with(coins_coco, tmp_path / "b", lambda d: d["annotations"][3].update(category_id=7))
    with pytest.raises(ValueError, match=r"annotation 4 of .*instances_train2017.json has category 7.*\[1\]"):
        CocoIndex(*split_paths(unknown, "train"))
    empty = copy_with(coins_coco, tmp_path / "c", lambda d: d.update(annotations=[]))
    index = CocoIndex(*split_paths(empty, "train"))
    with pytest.raises(ValueError, match="instances_train2017.json: no image with a usable annotation"):
        CocoDetection(index, train=True)
    no_images = copy_with(coins_coco, tmp_path / "d", lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(ValueError, match="lists no images: the dataset is empty"):
        CocoIndex(*split_paths(no_images, "train"))


def test_degenerate_boxes_crowds_and_empty_images(coins_coco, tmp_path, caplog):
    def edit(data):
        data["annotations"][0]["bbox"] = [10.0, 10.0, 0.0, 5.0]  # no width
        data["annotations"][1]["bbox"] = [500.0, 10.0, 20.0, 20.0]  # outside the image
        data["annotations"][2]["iscrowd"] = 1
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 8]  # image 8: no annotation

    root = copy_with(coins_coco, tmp_path, edit)
    with caplog.at_level(logging.WARNING):
        index = CocoIndex(*split_paths(root, "train"))
    assert index.degenerate == 2
    assert "dropped 2 annotations with degenerate boxes" in caplog.text and "instances_train2017.json" in caplog.text
    assert len(index.usable[1]) == 18 - 3  # two degenerate, one crowd
    train, val = CocoDetection(index, train=True, transform=lsj_transform(128)), CocoDetection(index, train=False)
    assert train.ids == list(range(1, 8)) and val.ids == list(range(1, 9))
    image, target = train[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8 and len(target["boxes"]) <= 15
    image, target = val[7]
    assert target == {"image_id": 8} and image.shape[0] == 3


def test_an_unreadable_image_is_replaced_in_training_and_skipped_in_evaluation(coins_coco, tmp_path):
    root = copy_with(coins_coco, tmp_path, lambda data: None)
    (split_paths(root, "train")[0] / "coins_train_2.png").write_bytes(b"not an image")
    index = CocoIndex(*split_paths(root, "train"))
    train = RobustSeededDataset(CocoDetection(index, train=True, transform=lsj_transform(64)), seed=0)
    image, target, bad = train[2]
    assert bad == 1 and image.shape == (3, 64, 64)  # replaced by another image, counted
    images, targets = collate_eval([SkipUnreadable(CocoDetection(index, train=False))[i] for i in range(3)])
    assert [t["image_id"] for t in targets] == [1, 2] and len(images) == 2  # image 3 skipped (its objects missed)
