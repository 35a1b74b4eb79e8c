"""detection.evaluation: the ground truth submitted as detections scores AP 100, shifted boxes and masks score less,
and the metrics equal pycocotools and faster-coco-eval run directly on the written results files."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection import demo
from detection.data import CocoIndex, split_paths
from detection.evaluation import IOU_TYPES, coco_metrics, coco_results, gather_results, write_results


@pytest.fixture(scope="module")
def val_index(tmp_path_factory) -> CocoIndex:
    root = demo.write_demo_dataset(tmp_path_factory.mktemp("coins"))
    return CocoIndex(*split_paths(root, "val"))


def predictions_from_truth(index: CocoIndex, shift: int = 0) -> dict[str, list]:
    """Every validation object as a detection (score from its size, masks as probabilities), moved `shift` pixels
    right, through the same conversion as the detector's outputs."""
    results = {t: [] for t in IOU_TYPES}
    for image_id in sorted(index.coco.imgs):
        anns = index.usable[image_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns]) + torch.tensor([shift, 0, shift, 0])
        masks = torch.stack([torch.from_numpy(index.coco.annToMask(a)) for a in anns]).roll(shift, dims=-1)
        prediction = {"boxes": boxes, "labels": torch.ones(len(anns), dtype=torch.int64),
                      "scores": torch.tensor([a["area"] / 1e4 for a in anns]), "masks": masks[:, None].float()}
        for iou_type, entries in coco_results(prediction, image_id, index.cat_ids).items():
            results[iou_type] += entries
    return results


def rescore(ann_file, results_file, iou_type: str, fast: bool) -> list[float]:
    """AP..APl (percent) of a results file, by pycocotools or by faster-coco-eval, straight from the files."""
    with contextlib.redirect_stdout(io.StringIO()):
        if fast:
            gt = FastCOCO(str(ann_file))
            evaluator = COCOeval_faster(gt, gt.loadRes(str(results_file)), iou_type)
        else:
            gt = COCO(str(ann_file))
            evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [100 * v if v >= 0 else -1.0 for v in evaluator.stats[:6]]


@pytest.mark.parametrize("shift", [0, 4])
def test_metrics_equal_pycocotools_and_faster_coco_eval_on_the_files(val_index, tmp_path, shift):
    results, done = gather_results(predictions_from_truth(val_index, shift), list(range(1, 9)))
    paths = write_results(results, tmp_path)
    assert [p.name for p in paths] == ["results_bbox.json", "results_segm.json"]
    written = json.loads(paths[1].read_text())
    assert written[0]["segmentation"]["counts"] and {e["category_id"] for e in written} == {1}
    for iou_type, path in zip(IOU_TYPES, paths):
        ours, _ = coco_metrics(val_index.coco, results[iou_type], iou_type)
        values = list(ours.values())
        if shift == 0:
            assert values == [100.0, 100.0, 100.0, -1.0, 100.0, -1.0]  # the coins are all medium-sized
        else:
            assert 0 < values[0] < 100 and values[1] == 100.0  # a few pixels: every object still found at IoU 0.5
        assert values == rescore(val_index.ann_file, path, iou_type, fast=False)
        assert values == pytest.approx(rescore(val_index.ann_file, path, iou_type, fast=True), abs=1e-9)


def test_no_detections_score_zero(val_index):
    assert coco_metrics(val_index.coco, [], "bbox")[0] == dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"),
                                                                          0.0)
