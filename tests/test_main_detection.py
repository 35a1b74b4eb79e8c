"""main_detection.py end to end on CPU with a tiny Mask R-CNN: checkpoints, log.txt, TensorBoard and the demo figure;
--eval's results files and record (the record's AP recomputed by pycocotools from the files) on 1 and 2 gloo ranks;
a crash mid-interval then --resume auto giving bit-identical weights; bad flags stopped before anything runs."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_same_weights, final_weights
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import main_detection
import util.training
from detection import demo
from detection.data import split_paths
from util.checkpoint import load_checkpoint
from util.config import apply_defaults

ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}


def parse(*argv: str) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[main_detection.get_args_parser()]).parse_args(list(argv))


@pytest.fixture(scope="module")
def coins(tmp_path_factory) -> Path:
    return demo.write_demo_dataset(tmp_path_factory.mktemp("coins"))


def tiny_flags(data: Path, out: Path, *extra: str) -> list[str]:
    """The demo model, smaller (64 px, patch 8, 16-channel heads, few RoIs), a few updates."""
    return ["--demo", "--data_path", str(data), "--output_dir", str(out), "--input_size", "64", "--patch_size", "8",
            "--embed_dim", "32", "--window_size", "4", "--fpn_channels", "16", "--box_fc_dim", "32",
            "--rpn_batch_size_per_image", "32", "--box_batch_size_per_image", "16", "--detections_per_img", "20",
            "--iters", "6", "--eval_interval", "3", "--warmup_iters", "1", "--lr_drops", "5", "--print_freq", "1",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(coins, tmp_path_factory) -> Path:
    """A finished 6-update run (evaluated after 3 and 6)."""
    out = tmp_path_factory.mktemp("run") / "run"
    main_detection.main(parse(*tiny_flags(coins, out)))
    return out


def test_run_writes_checkpoints_log_tensorboard(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"checkpoint-3.pth", "checkpoint-6.pth", "checkpoint-last.pth", "log.txt", "run_info.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    lines = [json.loads(line) for line in (trained / "log.txt").read_text().splitlines()]
    assert [line["updates"] for line in lines] == [3, 6]
    assert {"test_bbox_AP", "test_segm_AP75", "train_loss_mask", "train_loss_objectness"} <= set(lines[0])
    state = load_checkpoint(trained / "checkpoint-last.pth")
    assert state["updates"] == 6 and state["model_cfg"]["num_classes"] == 1
    assert state["model_cfg"]["global_blocks"] == [1, 3] and state["args"]["lr_drops"] == [5]


def test_demo_fills_only_flags_left_at_their_defaults():
    args = parse("--demo", "--iters", "7", "--data_path", "somewhere")
    apply_defaults(args, main_detection.get_args_parser(), main_detection.DEMO_OVERRIDES)
    assert (args.iters, args.data_path, args.embed_dim, args.input_size) == (7, "somewhere", 64, 192)


def test_demo_figure(trained, coins, monkeypatch):
    """The demo's figure, drawn from the trained run (the demo itself is timed in README, not here)."""
    import engine_detection

    args = parse(*tiny_flags(coins, trained / "fig", "--eval", "--resume", str(trained / "checkpoint-6.pth")))
    resume_state, _ = main_detection.resolve_args(args)
    model = main_detection.build_model(args, None)
    model.load_state_dict(resume_state["model"])
    _, val = main_detection.build_datasets(args)
    metrics = {"bbox": {"AP": 1.0}, "segm": {"AP": 2.0}}
    args.output_dir = str(trained)
    path = engine_detection.demo_figure(args, model, val, metrics)
    assert path.name == "detections.png" and path.stat().st_size > 1000


def rescored(data: Path, results: Path) -> dict[str, list[float]]:
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(split_paths(data, "val")[1]))
        for iou_type in ("bbox", "segm"):
            entries = json.loads((results / f"results_{iou_type}.json").read_text())
            if not entries:
                out[iou_type] = [0.0] * 6
                continue
            evaluator = COCOeval(gt, gt.loadRes(str(results / f"results_{iou_type}.json")), iou_type)
            evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
            out[iou_type] = [100 * v if v >= 0 else -1.0 for v in evaluator.stats[:6]]
    return out


def eval_argv(trained: Path, coins: Path, out: Path) -> list[str]:
    return ["--eval", "--resume", str(trained / "checkpoint-6.pth"), "--data_path", str(coins), "--output_dir",
            str(out), "--device", "cpu", "--num_workers", "0"]


def test_eval_writes_results_files_and_a_record_pycocotools_agrees_with(trained, coins, tmp_path):
    before = sorted(p.name for p in trained.iterdir())
    out = tmp_path / "eval"
    main_detection.main(parse(*eval_argv(trained, coins, out)))
    assert sorted(p.name for p in trained.iterdir()) == before  # the training run's folder is not touched
    (record_path,) = out.glob("eval_*.json")
    record = json.loads(record_path.read_text())
    assert record["images"] == 8 and record["skipped_images"] == 0
    files = rescored(coins, out)
    for iou_type in ("bbox", "segm"):
        assert list(record[iou_type]) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
        assert list(record[iou_type].values()) == files[iou_type]
    with pytest.raises(ValueError, match="holds the results of an earlier evaluation"):
        main_detection.main(parse(*eval_argv(trained, coins, out)))

    two = tmp_path / "two"  # the same evaluation on 2 gloo ranks: the same files, the same record
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "main_detection.py"), *eval_argv(trained, coins, two)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record_two,) = two.glob("eval_*.json")
    assert {k: json.loads(record_two.read_text())[k] for k in ("bbox", "segm", "images")} == \
        {k: record[k] for k in ("bbox", "segm", "images")}
    for name in ("results_bbox.json", "results_segm.json"):  # the same detections, in the same order
        assert_same_detections(json.loads((two / name).read_text()), json.loads((out / name).read_text()))


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    """Equal detections up to float rounding: the two runs differ in thread count, so reductions may round the last
    bit of a score or box differently (1e-7 seen); ids, categories and RLE masks must be equal."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-6)
        if "bbox" in a:
            assert a["bbox"] == pytest.approx(b["bbox"], rel=1e-5, abs=1e-3)
        if "segmentation" in a:
            assert a["segmentation"]["size"] == b["segmentation"]["size"]


class Crash(Exception):
    """Stands for a kill right after an update (the in-flight work of that update is lost)."""


def test_crash_mid_interval_then_resume_is_bit_identical(trained, coins, tmp_path, monkeypatch):
    """Updates are saved one by one; the run dies after update 5 before saving it, and resumes from the
    mid-interval checkpoint of update 4 (interval 1, step 1)."""
    out = tmp_path / "crashed"
    flags = tiny_flags(coins, out, "--save_every_iters", "1")
    hook = util.training.UpdateHook.__call__

    def crash_after_update_5(self, epoch, step, ensure_finite):
        if (epoch, step) == (1, 2):
            raise Crash
        hook(self, epoch, step, ensure_finite)

    monkeypatch.setattr(util.training.UpdateHook, "__call__", crash_after_update_5)
    with pytest.raises(Crash):
        main_detection.main(parse(*flags))
    monkeypatch.undo()
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert (state["updates"], state["epoch"], state["iter"]) == (4, 1, 1)
    main_detection.main(parse(*flags, "--resume", "auto"))
    assert_same_weights(final_weights(trained), final_weights(out))


def test_bad_flags_stop_before_anything_runs(coins, trained, tmp_path):
    with pytest.raises(ValueError, match="--eval evaluates a checkpoint"):
        main_detection.resolve_args(parse("--eval", "--data_path", str(coins)))
    with pytest.raises(ValueError, match="already holds a run"):
        main_detection.resolve_args(parse(*tiny_flags(coins, trained)))
    with pytest.raises(ValueError, match="COCO 2017 layout"):
        main_detection.resolve_args(parse("--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--lr_drops must be increasing"):
        main_detection.resolve_args(parse(*tiny_flags(coins, tmp_path / "o"), "--lr_drops", "3", "2"))
    args = parse(*tiny_flags(coins, tmp_path / "o"), "--num_classes", "80")
    main_detection.resolve_args(args)
    with pytest.raises(ValueError, match="--num_classes 80 but .*instances_val2017.json has 1 categories"):
        main_detection.build_datasets(args)


def test_loaders_keep_their_workers_between_evaluations(coins, tmp_path):
    """Validation every --eval_interval updates re-forked the val loader's workers (issue 23: persistent, as the
    classification loaders); the training loader's workers live across intervals too."""
    from engine_detection import build_loaders

    args = parse(*tiny_flags(coins, tmp_path / "out", "--num_workers", "1"))
    main_detection.resolve_args(args)
    train_loader, val_loader = build_loaders(args, *main_detection.build_datasets(args))
    assert train_loader.persistent_workers and val_loader.persistent_workers
