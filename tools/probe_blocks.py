#!/usr/bin/env python
"""Frozen-feature probes of every encoder block (paper Sec. 4: DeepMIM's shallower blocks learn more discriminative
features): for each checkpoint and each block, a logistic-regression probe fitted to convergence and DINO's weighted
k-NN on the block's average-pooled patch tokens (the definitions are in analysis/probes.py).

    python tools/probe_blocks.py --ckpt mae.pth deepmim.pth --names MAE DeepMIM --data_path /data/imagenet-100 \\
        --num_images 10000 --num_val_images 5000 --output_dir out/probes

--data_path holds train/ and val/ ImageFolders with the same class folders; --num_images training and
--num_val_images validation images are taken evenly spaced over each (every class of a sorted folder is covered).
--demo_images labels crops of scikit-image's photographs by photograph: the first --num_images crops train, the next
--num_val_images are validated. Features are extracted once per checkpoint, from un-augmented images (the
evaluation transform), with the whole encoder frozen.

Writes probe_blocks.png (top-1 per block: probe and k-NN side by side, one line per checkpoint) and probe_blocks.json
(every block's probe top-1, chosen C, held-out top-1 per C, convergence, and k-NN top-1).

Needs only the encoder: takes pre-training checkpoints, fine-tuned and linear-probe classifiers (main_finetune.py,
main_linprobe.py; the head is not used), .safetensors exports and timm Hub folders (tools/export_encoder.py) and
released weights.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

from analysis import cli, images, probes  # noqa: E402
from analysis.loading import LoadedModel  # noqa: E402
from analysis.visualize import integer_ticks, new_figure, save_figure  # noqa: E402
from util.datasets import check_image_folder  # noqa: E402

SPLITS = ("train", "val")


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser(__doc__, num_images=1000, batch_size=64)
    parser.add_argument_group("probes").add_argument(
        "--num_val_images", default=None, type=int,
        help="validation images (evenly spaced over val/, or demo crops after the training ones; default: "
             "--num_images)")
    return parser


def check_splits(args: argparse.Namespace) -> None:
    """--data_path must hold train/ and val/ ImageFolders with the same class folders. Raises UsageError."""
    if args.num_val_images is None:
        args.num_val_images = args.num_images
    if args.num_val_images < 1:
        raise cli.UsageError(f"--num_val_images must be >= 1, got {args.num_val_images}")
    if args.data_path is None:
        return
    root = Path(args.data_path)
    classes = {}
    for split in SPLITS:
        try:
            check_image_folder(root / split)
        except ValueError as err:
            raise cli.UsageError(f"--data_path {root} must hold train/ and val/ ImageFolders "
                                 f"(<split>/<class>/<image>): {err}") from None
        classes[split] = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    if classes["train"] != classes["val"]:
        raise cli.UsageError(f"--data_path {root}: train/ and val/ hold different class folders (only in train: "
                             f"{sorted(set(classes['train']) - set(classes['val']))[:5]}, only in val: "
                             f"{sorted(set(classes['val']) - set(classes['train']))[:5]})")


def check_probe_labels(labels: list[int]) -> None:
    """The probe picks C on a stratified 20 % of the training images: every class needs 2 images and the held-out
    part one per class. Raises UsageError naming --num_images."""
    counts = Counter(labels)
    rare = sorted(c for c, n in counts.items() if n < 2)
    held_out = int(len(labels) * probes.HOLDOUT_FRACTION)
    if rare or held_out < len(counts):
        raise cli.UsageError(f"--num_images {len(labels)} is too few for {len(counts)} classes: the probe's held-out "
                             f"split ({probes.HOLDOUT_FRACTION:.0%}) needs one image of each class and every class "
                             f"two training images (classes with fewer: {rare[:5]}); raise --num_images")


def probe_model(m: LoadedModel, train_set: Any, val_set: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every block's features of the training and validation images, then `probes.probe_blocks`."""
    train = probes.block_features(m.model, images.make_loader(train_set, args), args.device)
    val = probes.block_features(m.model, images.make_loader(val_set, args), args.device)
    blocks = probes.probe_blocks(train, val, seed=args.seed)
    return {"path": m.path, "logreg_acc1": [b["logreg"]["acc1"] for b in blocks],
            "knn_acc1": [b["knn_acc1"] for b in blocks], "blocks": blocks}


def plot(results: dict[str, dict[str, Any]], path: Path, data: dict[str, Any]) -> None:
    fig = new_figure(11, 4)
    for ax, key, title in zip(fig.subplots(1, 2, sharey=True), ("logreg_acc1", "knn_acc1"),
                              ("logistic-regression probe (converged)", f"weighted k-NN (k = {probes.KNN_K})")):
        for i, (name, result) in enumerate(results.items()):
            ax.plot(range(1, len(result[key]) + 1), result[key], marker="o", color=f"C{i}", label=name)
        ax.set_xlabel("block")
        ax.set_title(title)
        ax.legend()
        integer_ticks(ax)
    fig.axes[0].set_ylabel("val top-1 (%)")
    save_figure(fig, data, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cli.check_common_args(args)
    check_splits(args)
    models, input_size = cli.load_models(args)
    train_set, val_set = images.build_labelled_splits(args.data_path, args.num_images, args.num_val_images,
                                                      input_size, args.seed)
    check_probe_labels(images.labels_of(train_set))
    results = {}
    for m in models:
        results[m.name] = probe_model(m, train_set, val_set, args)
        print(f"{m.name}: probe top-1 per block " + " ".join(f"{v:.1f}" for v in results[m.name]["logreg_acc1"])
              + "; k-NN " + " ".join(f"{v:.1f}" for v in results[m.name]["knn_acc1"]))
    data = {"features": "average of the patch tokens of each block's raw output, un-augmented images",
            "input_size": input_size, "num_train": len(train_set), "num_val": len(val_set),
            "data": args.data_path or "demo crops (label: photograph)", "knn_k": probes.KNN_K,
            "knn_temperature": probes.KNN_TEMPERATURE, "c_grid": list(probes.C_GRID), "checkpoints": results}
    plot(results, Path(args.output_dir) / "probe_blocks.png", data)
    return data


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
