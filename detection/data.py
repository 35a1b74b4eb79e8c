"""COCO-format detection data, read through pycocotools, in the COCO 2017 layout:

    DIR/train2017/*.jpg   DIR/val2017/*.jpg   DIR/annotations/instances_train2017.json, instances_val2017.json

Any dataset in this layout works: the classes are the annotation file's categories (label k = the k-th category
id in increasing order; 0 is the background), and results are written with the file's own category ids.

Checked when a split is opened (`CocoIndex`), before any training: the files exist, every annotation names a known
image and category and has a 4-number box and a segmentation (Mask R-CNN learns masks), and every image file is
there. Degenerate boxes (no area once clipped to the image) are dropped with a count in the log, as are crowd
annotations in training (torchvision's references ignore them; COCO's evaluation uses them). Training leaves out
images without a usable annotation, as torchvision's reference does (`_coco_remove_images_without_annotations`);
evaluation keeps every image. A file that cannot be decoded raises `util.datasets.UnreadableImageError` (training
replaces and counts it; evaluation skips and counts it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from util.datasets import UnreadableImageError, unreadable_as_error

logger = logging.getLogger(__name__)

Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")
LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"
Transform = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


def split_paths(root: str | os.PathLike, split: Split) -> tuple[Path, Path]:
    """(image folder, annotation file) of `split` in the COCO 2017 layout."""
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def check_layout(root: str | os.PathLike | None, splits: Sequence[Split] = SPLITS) -> None:
    """--data_path holds the COCO 2017 layout for `splits`; ValueError naming the missing path and the layout."""
    if not root:
        raise ValueError(f"--data_path is required (a folder in the COCO 2017 layout: {LAYOUT}) unless --demo")
    for split in splits:
        for path in split_paths(root, split):
            if not path.exists():
                raise ValueError(f"--data_path {root}: no {path} (expected the COCO 2017 layout: {LAYOUT})")


def load_coco(ann_file: Path) -> COCO:
    """pycocotools' COCO of `ann_file` (its progress prints go to the debug log); ValueError naming the file."""
    try:
        dataset = json.loads(ann_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"annotation file {ann_file} is not readable JSON: {err}") from err
    if not isinstance(dataset, dict) or not all(k in dataset for k in ("images", "annotations", "categories")):
        raise ValueError(f"annotation file {ann_file} is not in COCO format (needs 'images', 'annotations' and "
                         "'categories')")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco.createIndex()
    logger.debug("%s: %s", ann_file, out.getvalue().strip())
    return coco


def xyxy_box(ann: dict[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """COCO's [x, y, w, h] -> (x0, y0, x1, y1) clipped to the image (torchvision's `ConvertCocoPolysToMask`)."""
    x, y, w, h = ann["bbox"]
    return (min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width),
            min(max(y + h, 0.0), height))


class CocoIndex:
    """A validated COCO annotation file and its image folder.

    Attributes: `coco` (pycocotools), `cat_ids` (sorted; label k + 1 <-> cat_ids[k]), `names`, `usable[image id]`
    (the annotations training reads: not crowd, box with area), `degenerate` (count of dropped boxes).
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.coco = load_coco(self.ann_file)
        cats = self.coco.dataset["categories"]
        if not cats:
            raise ValueError(f"annotation file {self.ann_file} has no categories")
        self.cat_ids = sorted(int(c["id"]) for c in cats)
        self.names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.label_of = {c: k + 1 for k, c in enumerate(self.cat_ids)}
        if not self.coco.imgs:
            raise ValueError(f"annotation file {self.ann_file} lists no images: the dataset is empty")
        self.check_annotations()
        self.check_images()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def check_annotations(self) -> None:
        """Known images and categories, 4-number boxes, segmentations; collect the usable ones, count degenerate."""
        self.usable: dict[int, list[dict[str, Any]]] = {i: [] for i in self.coco.imgs}
        degenerate = []
        for ann in self.coco.dataset["annotations"]:
            where = f"annotation {ann.get('id')} of {self.ann_file}"
            if ann.get("image_id") not in self.coco.imgs:
                raise ValueError(f"{where} names image {ann.get('image_id')}, which the file does not list")
            if ann.get("category_id") not in self.label_of:
                raise ValueError(f"{where} has category {ann.get('category_id')}, which is not one of the file's "
                                 f"categories {self.cat_ids}: fix the annotation or add the category")
            box = ann.get("bbox")
            if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
                raise ValueError(f"{where} has bbox {box!r}; COCO boxes are [x, y, width, height]")
            if "segmentation" not in ann:
                raise ValueError(f"{where} has no 'segmentation': Mask R-CNN needs instance masks")
            if ann.get("iscrowd", 0):
                continue
            image = self.coco.imgs[ann["image_id"]]
            x0, y0, x1, y1 = xyxy_box(ann, image["width"], image["height"])
            if x1 > x0 and y1 > y0:
                self.usable[ann["image_id"]].append(ann)
            else:
                degenerate.append(ann)
        self.degenerate = len(degenerate)
        if degenerate:
            logger.warning("%s: dropped %d annotations with degenerate boxes (no area inside the image), e.g. "
                           "annotation %s with bbox %s", self.ann_file, len(degenerate), degenerate[0].get("id"),
                           degenerate[0]["bbox"])

    def check_images(self) -> None:
        """Every listed image file exists; ValueError naming the first missing one."""
        missing = [img["file_name"] for img in self.coco.imgs.values()
                   if not (self.image_dir / img["file_name"]).is_file()]
        if missing:
            raise ValueError(f"image file {self.image_dir / missing[0]} listed in {self.ann_file} does not exist "
                             f"({len(missing)} missing): check --data_path")

    def image_ids(self, train: bool) -> list[int]:
        """Sorted image ids; for training only those with a usable annotation (torchvision's reference)."""
        ids = sorted(self.coco.imgs)
        return [i for i in ids if self.usable[i]] if train else ids

    def path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]


def read_image(path: Path) -> Tensor:
    """uint8 RGB (3, H, W); a file that cannot be read or decoded raises UnreadableImageError naming it."""
    with unreadable_as_error(path), Image.open(path) as image:
        array = np.array(image.convert("RGB"))  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CocoDetection(Dataset):
    """Training (`train=True`: usable annotations, boxes and masks, `transform`) or evaluation images of a split.

    Training items: transform(Image uint8 (3, H, W), {'boxes': BoundingBoxes XYXY (N, 4), 'masks': Mask uint8
    (N, H, W), 'labels': int64 (N,), 'image_id'}). Evaluation items: (uint8 (3, H, W), {'image_id'}).
    """

    def __init__(self, index: CocoIndex, train: bool, transform: Transform | None = None):
        self.index, self.train, self.transform = index, train, transform
        self.ids = index.image_ids(train)
        if not self.ids:
            raise ValueError(f"{index.ann_file}: no image with a usable annotation (non-crowd, with a box inside "
                             "the image): the training set is empty")
        self.samples = [(str(index.path(i)), i) for i in self.ids]  # what RobustSeededDataset names in its log

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.ids[i]
        image = read_image(self.index.path(image_id))
        if not self.train:
            return image, {"image_id": image_id}
        target = self.target(image_id, image.shape[-2:])
        image, target = (self.transform or (lambda *a: a))(tv_tensors.Image(image), target)
        return image.as_subclass(Tensor), target

    def target(self, image_id: int, size: torch.Size) -> dict[str, Any]:
        """Boxes, masks and labels of the usable annotations; ValueError when the file's size is not the listed."""
        info = self.index.coco.imgs[image_id]
        if tuple(size) != (info["height"], info["width"]):
            raise ValueError(f"image {self.index.path(image_id)} is {size[1]}x{size[0]} but {self.index.ann_file} "
                             f"lists it as {info['width']}x{info['height']}")
        anns = self.index.usable[image_id]
        boxes = torch.tensor([xyxy_box(a, info["width"], info["height"]) for a in anns], dtype=torch.float32)
        masks = np.stack([self.index.coco.annToMask(a) for a in anns])
        return {"boxes": tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=tuple(size)),
                "masks": tv_tensors.Mask(torch.from_numpy(masks)),
                "labels": torch.tensor([self.index.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                "image_id": image_id}


def plain_target(target: dict[str, Any]) -> dict[str, Any]:
    """tv_tensors -> plain tensors (what torchvision's detection models take)."""
    return {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}


def collate_train(batch: list[tuple[Tensor, dict[str, Any], int]]) -> tuple[Tensor, list[dict[str, Any]], Tensor]:
    """RobustSeededDataset items (image (3, S, S), target, bad) -> (uint8 (N, 3, S, S), [target], bad (N,))."""
    images, targets, bad = zip(*batch)
    return torch.stack(images), [plain_target(t) for t in targets], torch.tensor(bad)


def collate_eval(batch: list[tuple[Tensor, dict[str, Any]] | None]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Evaluation items of any size -> ([image], [target]); None items (unreadable files) are left out."""
    kept = [item for item in batch if item is not None]
    return [image for image, _ in kept], [target for _, target in kept]


class SkipUnreadable(Dataset):
    """Evaluation: an unreadable image becomes None (skipped by `collate_eval`, counted and logged) instead of
    ending the run; its ground truth stays in the evaluation (its objects count as missed)."""

    def __init__(self, dataset: CocoDetection):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]] | None:
        try:
            return self.dataset[i]
        except UnreadableImageError as err:
            logger.warning("evaluation skips %s", err)
            return None
