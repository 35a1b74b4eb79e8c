"""main_segmentation.py end to end on CPU with a tiny UperNet: the demo's outputs, --eval's PNGs and record (their
numbers recomputed from the files), a SIGKILL mid-interval then --resume auto giving bit-identical weights, and bad
input stopped before training with the file and the fix named."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_weights, final_weights
from PIL import Image

import main_segmentation
from segmentation.data import find_pairs, reduce_zero_label
from segmentation.demo import write_demo_dataset
from segmentation.metrics import class_areas, metrics_from_areas
from util.checkpoint import load_checkpoint
from util.config import apply_defaults

ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}


def parse(*argv: str) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[main_segmentation.get_args_parser()]).parse_args(list(argv))


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("mosaics"), n_train=8, n_val=3)


def tiny_flags(data: Path, out: Path, *extra: str) -> list[str]:
    """The demo model on `data` (--demo fills only flags left at their defaults), a few updates."""
    return ["--demo", "--data_path", str(data), "--num_classes", "4", "--output_dir", str(out), "--batch_size", "4",
            "--iters", "8", "--eval_interval", "4", "--warmup_iters", "2", "--print_freq", "2", "--device", "cpu",
            *extra]


def test_demo_writes_checkpoints_log_tensorboard_and_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo writes its data and outputs under ./output_demo
    metrics = main_segmentation.main(parse("--demo", "--iters", "4", "--eval_interval", "2"))
    out = tmp_path / "output_demo" / "segmentation"
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint-2.pth", "checkpoint-4.pth", "checkpoint-last.pth", "log.txt", "run_info.json",
            "segmentation.png"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["updates"] for line in lines] == [2, 4] and "test_mIoU" in lines[0] and "train_loss_aux" in lines[0]
    assert 0 <= metrics["mIoU"] <= 100
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert state["updates"] == 4 and state["model_cfg"]["num_classes"] == 4 and state["args"]["embed_dim"] == 64


def test_demo_fills_only_flags_left_at_their_defaults():
    args = parse("--demo", "--iters", "7", "--data_path", "somewhere", "--num_classes", "9")
    apply_defaults(args, main_segmentation.get_args_parser(), main_segmentation.DEMO_OVERRIDES)
    assert (args.iters, args.num_classes, args.data_path, args.embed_dim) == (7, 9, "somewhere", 64)


def test_eval_writes_predictions_and_a_record_that_agree(mosaics, tmp_path):
    run = tmp_path / "run"
    main_segmentation.main(parse(*tiny_flags(mosaics, run, "--iters", "2", "--eval_interval", "2")))
    before = sorted(p.name for p in run.iterdir())
    preds, out = tmp_path / "preds", tmp_path / "eval"
    metrics = main_segmentation.main(parse("--eval", "--resume", str(run / "checkpoint-2.pth"), "--data_path",
                                           str(mosaics), "--save_predictions", str(preds), "--output_dir", str(out),
                                           "--device", "cpu", "--num_workers", "0"))
    assert sorted(p.name for p in run.iterdir()) == before  # the training run's folder is not touched
    (record_path,) = out.glob("eval_*.json")
    record = json.loads(record_path.read_text())
    areas = torch.zeros(4, 4, dtype=torch.int64)
    for image, annotation in find_pairs(mosaics, "validation"):
        pred = np.asarray(Image.open(preds / f"{Path(image).stem}.png"))
        truth = np.asarray(Image.open(annotation))
        assert pred.shape == truth.shape and set(np.unique(pred)) <= {1, 2, 3, 4}  # class k saved as k + 1
        areas += class_areas(torch.from_numpy(reduce_zero_label(pred).astype(np.int64)),
                             torch.from_numpy(reduce_zero_label(truth).astype(np.int64)), 4)
    recomputed = metrics_from_areas(areas)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert record[key] == pytest.approx(recomputed[key]) == pytest.approx(metrics[key])
    # the run's own evaluation of this checkpoint: --eval takes the run's test scale and window stride
    last = json.loads((run / "log.txt").read_text().splitlines()[-1])
    assert metrics["mIoU"] == pytest.approx(last["test_mIoU"]) and record["args"]["slide_stride"] == 43


KILL_DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import argparse, main_segmentation, util.training as training
original = training.UpdateHook.__call__

def after_update(self, epoch, step, ensure_finite):
    original(self, epoch, step, ensure_finite)
    if (epoch, step) == ({interval}, {step}):
        os.kill(os.getpid(), signal.SIGKILL)

training.UpdateHook.__call__ = after_update
parser = argparse.ArgumentParser(parents=[main_segmentation.get_args_parser()])
main_segmentation.main(parser.parse_args(sys.argv[1:]))
"""


def test_sigkill_mid_interval_then_resume_is_bit_identical(mosaics, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main_segmentation.main(parse(*tiny_flags(mosaics, straight)))
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER.format(root=str(ROOT), interval=1, step=3))
    flags = tiny_flags(mosaics, killed, "--save_every_iters", "2")
    proc = subprocess.run([sys.executable, str(driver), *flags], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = load_checkpoint(killed / "checkpoint-last.pth")
    assert (state["epoch"], state["iter"], state["updates"]) == (1, 2, 6)  # update 7 was lost, redone on resume
    main_segmentation.main(parse(*flags, "--resume", "auto"))
    assert_same_weights(final_weights(straight), final_weights(killed))


def test_bad_input_is_refused_before_training(mosaics, tmp_path):
    def resolve(*argv: str) -> None:
        main_segmentation.resolve_args(parse(*argv))

    with pytest.raises(ValueError, match="ADEChallengeData2016 layout"):
        resolve("--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--save_predictions is an --eval option"):
        resolve(*tiny_flags(mosaics, tmp_path / "o", "--save_predictions", str(tmp_path / "p")))
    done = tmp_path / "done"
    done.mkdir()
    (done / "checkpoint-last.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a run .*: continue it with --resume auto"):
        resolve(*tiny_flags(mosaics, done))
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is not empty"):
        resolve("--eval", "--resume", str(done / "checkpoint-last.pth"), "--save_predictions", str(preds),
                "--data_path", str(mosaics))
    assert (preds / "x.png").read_bytes() == b"" and (done / "checkpoint-last.pth").read_bytes() == b""


def test_label_values_beyond_the_classes_stop_with_the_file_named(mosaics, tmp_path):
    with pytest.raises(ValueError, match=r"annotations/training/mosaic_training_\d+.png holds label values \[3\]"):
        main_segmentation.main(parse(*tiny_flags(mosaics, tmp_path / "o", "--num_classes", "3")))
    assert not list((tmp_path / "o").glob("checkpoint-*.pth"))


def test_two_gloo_ranks_train_and_evaluate(mosaics, tmp_path):
    """torchrun with 2 CPU processes: DDP training on per-rank shards (BatchNorm per process: torch's SyncBatchNorm
    runs on GPUs only), checkpoints with both ranks' RNG, and a sharded evaluation counting the 3 val images once."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
           str(ROOT / "main_segmentation.py"), *tiny_flags(mosaics, out, "--iters", "4", "--eval_interval", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint-4.pth")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["updates"] == 4
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["test_images"] for line in lines] == [3, 3]


def test_loaders_keep_their_workers_between_evaluations(mosaics, tmp_path):
    """Validation every --eval_interval updates re-forked the val loader's workers (issue 23: persistent, as the
    classification loaders); the training loader's workers live across intervals too."""
    from engine_segmentation import build_loaders

    args = parse(*tiny_flags(mosaics, tmp_path / "out", "--num_workers", "1"))
    main_segmentation.resolve_args(args)
    train_loader, val_loader, _ = build_loaders(args, *main_segmentation.build_datasets(args))
    assert train_loader.persistent_workers and val_loader.persistent_workers
