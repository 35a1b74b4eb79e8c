#!/usr/bin/env python
"""Robustness of fine-tuned classifiers (paper Tab. 6): ImageNet-A and ImageNet-R top-1, ImageNet-C mCE.

    python tools/eval_robustness.py --ckpt mae_ft.pth deepmim_ft.pth --names MAE DeepMIM \\
        --imagenet_a /data/imagenet-a --imagenet_r /data/imagenet-r --imagenet_c /data/imagenet-c \\
        --output_dir out/robustness
    torchrun --nproc_per_node 8 tools/eval_robustness.py --ckpt deepmim_ft.pth --imagenet_c /data/imagenet-c

Any subset of the three datasets. ImageNet-A/R (200 classes, one folder per wnid) are scored with the argmax over
the logits of the classes present; ImageNet-C (<corruption>/<severity>/<wnid>/) on all logits, with
CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c} and mCE the mean CE (Hendrycks & Dietterich, ICLR 2019). A partial
ImageNet-C copy gives CE over the severities present and an mCE over the corruptions present, flagged as a subset
on the console and in the JSON ("complete", "coverage").

Logit i is the i-th of ImageNet-1K's 1000 sorted wnids (timm's list) unless --train_wnids says otherwise. Images
get fine-tuning's evaluation transform (resize to input/0.875, centre crop) at each checkpoint's input size (or
--input_size); every model sees each batch of one pass over the data. Under torchrun the ranks share the images
exactly (no padded duplicate is counted) and rank 0 writes robustness.png and robustness.json.

Takes fine-tuned checkpoints of main_finetune.py, linear probes of main_linprobe.py (their BatchNorm + linear head,
on the probed block), .safetensors exports and timm Hub folders of fine-tuned classifiers (tools/export_encoder.py,
--hub_dir), and released fine-tuned weights with --model (e.g. vit_base_patch16). --amp runs the forward passes
under autocast (default as the training scripts: bf16 on GPUs with native bf16, fp16 on older ones, none on CPU).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

import models_vit  # noqa: E402
from analysis import cli, robustness  # noqa: E402
from analysis.visualize import new_figure, save_figure  # noqa: E402
from util import amp, distributed  # noqa: E402
from util.datasets import default_num_workers  # noqa: E402
from util.misc import setup_logging  # noqa: E402

DATASET_TITLES = {"imagenet_a": "IN-A top-1", "imagenet_r": "IN-R top-1", "imagenet_c": "IN-C mCE"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    group = parser.add_argument_group("classifiers")
    cli.add_checkpoint_args(group, "fine-tuned (main_finetune.py) or linear-probe (main_linprobe.py) checkpoints, "
                                   ".safetensors exports or timm Hub folders (tools/export_encoder.py), or released "
                                   "fine-tuned weights with --model",
                            f"classifier for files without model_cfg ({', '.join(models_vit.VIT_SIZES)})")
    group.add_argument("--train_wnids", default=None, metavar="FILE|DIR",
                       help="the classifier's classes in logit order: a file with one wnid a line, or the training "
                            "ImageFolder (its sub-folders, sorted); default: ImageNet-1K's 1000 sorted wnids (timm)")
    data = parser.add_argument_group("datasets (at least one)")
    data.add_argument("--imagenet_a", default=None, metavar="DIR", help="ImageNet-A: <wnid>/ folders")
    data.add_argument("--imagenet_r", default=None, metavar="DIR", help="ImageNet-R: <wnid>/ folders")
    data.add_argument("--imagenet_c", default=None, metavar="DIR",
                      help="ImageNet-C: <corruption>/<severity 1..5>/<wnid>/ folders (all 15 corruptions, or a "
                           "subset: then mCE is over the subset and flagged)")
    run = parser.add_argument_group("run")
    run.add_argument("--input_size", default=None, type=int, help="image size (default: each checkpoint's)")
    run.add_argument("--batch_size", default=128, type=int, help="images per forward pass (per rank)")
    run.add_argument("--num_workers", default=None, type=int,
                     help="data loading processes per rank (default: the CPUs of this rank - 2, as the training "
                          "scripts)")
    run.add_argument("--device", default=None,
                     help="cpu, cuda or cuda:N (default: cuda when available, else cpu, as the training scripts)")
    run.add_argument("--amp", default=None, choices=amp.AMP_CHOICES,
                     help="autocast of the forward passes (default: bf16 on GPUs with native bf16, fp16 on older "
                          "GPUs, none on CPU, as the training scripts)")
    run.add_argument("--output_dir", default="./output_dir/analysis", help="where robustness.png and .json go")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Validate the flags before anything is read; fills args.names, args.device, args.amp and args.num_workers.
    Raises UsageError."""
    cli.check_checkpoint_args(args, tuple(models_vit.VIT_SIZES))
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--num_workers", args.num_workers, 0),
                             ("--input_size", args.input_size, 1)):
        if value is not None and value < low:
            raise cli.UsageError(f"{flag} must be >= {low}, got {value}")
    args.device = cli.resolve_device(args.device)
    try:
        args.amp = amp.resolve_amp(args.amp, args.device)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None


def load_classifiers(args: argparse.Namespace, num_classes: int) -> dict[str, torch.nn.Module]:
    """Every --ckpt as a classifier on the device; its outputs must number the wnids. Raises UsageError."""
    models = {}
    for i, (path, name) in enumerate(zip(args.ckpt, args.names)):
        model_name = None if args.model is None else args.model[i if len(args.model) > 1 else 0]
        try:
            model = robustness.load_classifier(path, model_name, args.input_size)
        except ValueError as err:
            raise cli.UsageError(f"--ckpt {path}: {err}") from err
        if robustness.num_outputs(model) != num_classes:
            raise cli.UsageError(f"--ckpt {path} has {robustness.num_outputs(model)} outputs but the class list "
                                 f"(--train_wnids {args.train_wnids or 'default: ImageNet-1K'}) has {num_classes} "
                                 "wnids")
        patch = model.patch_embed.patch_size[0]
        if robustness.model_input_size(model) % patch:
            raise cli.UsageError(f"--input_size {args.input_size} is not a multiple of {name}'s patch size {patch}")
        models[name] = model.to(args.device)
    return models


def evaluate(models: dict[str, torch.nn.Module], dataset: robustness.EvalSet,
             args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """(parts, 2) counts per model: one pass over the data per input size, every model of that size on each batch."""
    by_size = defaultdict(list)
    for name, model in models.items():
        by_size[robustness.model_input_size(model)].append(name)
    counts, mask = {}, dataset.class_mask()
    for size, names in by_size.items():
        dataset.set_input_size(size)
        loader, num_real = robustness.make_loader(dataset, args.batch_size, args.num_workers, args.device)
        found = robustness.count_correct([models[n] for n in names], loader, mask, args.device, num_real, args.amp)
        counts.update(zip(names, found))
    return counts


def table(results: dict[str, dict[str, Any]]) -> str:
    """The console table: A/R top-1 and mCE per model, then CE per corruption when ImageNet-C was given."""
    names = list(results)
    width = max(12, *(len(n) + 2 for n in names))
    first = next(iter(results.values()))
    shown = [d for d in DATASET_TITLES if d in first]
    lines = ["model".ljust(width) + "".join(DATASET_TITLES[d].rjust(12) for d in shown)]
    for name, result in results.items():
        values = [result[d]["mce" if d == "imagenet_c" else "top1"] for d in shown]
        lines.append(name.ljust(width) + "".join(f"{v:12.2f}" for v in values))
    if "imagenet_c" in first:
        lines += ["", "CE (%) vs AlexNet".ljust(20) + "".join(n.rjust(width) for n in names)]
        for corruption in first["imagenet_c"]["ce"]:
            lines.append(corruption.ljust(20) + "".join(f"{r['imagenet_c']['ce'][corruption]:{width}.2f}"
                                                        for r in results.values()))
        lines.append(f"mCE over {first['imagenet_c']['coverage']}")
    return "\n".join(lines)


def bars(ax: Any, labels: list[str], values: dict[str, list[float]]) -> None:
    """Grouped bars: one group per label, the models side by side in each."""
    width = 0.8 / len(values)
    for i, (name, row) in enumerate(values.items()):
        offset = (i - (len(values) - 1) / 2) * width
        ax.bar([g + offset for g in range(len(labels))], row, width, label=name, color=f"C{i}")
    ax.set_xticks(range(len(labels)), labels)


def plot(results: dict[str, dict[str, Any]], path: Path, data: dict[str, Any]) -> None:
    """CE per corruption and mCE as bars, models side by side; A/R top-1 in a narrow panel when measured."""
    first = next(iter(results.values()))
    subsets = [d for d in robustness.SUBSET_DATASETS if d in first]
    with_c = "imagenet_c" in first
    ratios = [4] * with_c + [1] * bool(subsets)
    fig = new_figure(12 * with_c + 3 * bool(subsets), 4.5)
    axes = list(fig.subplots(1, len(ratios), squeeze=False, width_ratios=ratios)[0])
    if with_c:
        ax = axes[0]
        bars(ax, [*first["imagenet_c"]["ce"], "mCE"],
             {n: [*r["imagenet_c"]["ce"].values(), r["imagenet_c"]["mce"]] for n, r in results.items()})
        ax.tick_params(axis="x", labelrotation=45)
        ax.axhline(100, color="grey", lw=0.8, ls="--", label="AlexNet")
        ax.set_ylabel("corruption error, % of AlexNet's")
        ax.set_title("ImageNet-C CE" + ("" if first["imagenet_c"]["complete"] else " (SUBSET of ImageNet-C)"))
    if subsets:
        bars(axes[-1], [DATASET_TITLES[d] for d in subsets], {n: [r[d]["top1"] for d in subsets]
                                                             for n, r in results.items()})
        axes[-1].set_ylabel("top-1 (%)")
        axes[-1].set_title("ImageNet-A / -R (classes present)")
    axes[0].legend(fontsize=8)
    save_figure(fig, data, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    try:
        wnids = robustness.read_wnids(args.train_wnids)
        dataset = robustness.build_eval_set({"imagenet_a": args.imagenet_a, "imagenet_r": args.imagenet_r,
                                             "imagenet_c": args.imagenet_c}, wnids)
    except ValueError as err:
        raise cli.UsageError(str(err)) from err
    info = distributed.init_distributed(args.device)
    try:
        if info.distributed and args.device.startswith("cuda"):
            args.device = str(info.device("cuda"))  # local rank modulo the GPUs this task sees
        if info.distributed:
            setup_logging()  # again, now that the ranks are known: ranks other than 0 log warnings only
        models = load_classifiers(args, len(wnids))
        counts = evaluate(models, dataset, args)
    finally:
        distributed.cleanup()
    mask = dataset.class_mask()
    results = {name: {"path": str(path), "input_size": robustness.model_input_size(models[name]),
                      **robustness.summarize(dataset.parts, counts[name], mask)}
               for name, path in zip(args.names, args.ckpt)}
    data = {"units": "top-1 and top-1 error in %; CE and mCE in % of AlexNet's error",
            "amp": args.amp, "num_classes": len(wnids), "train_wnids": args.train_wnids or "ImageNet-1K (timm, sorted)",
            "world_size": info.world_size, "checkpoints": results}
    if info.rank == 0:
        print(table(results))
        plot(results, Path(args.output_dir) / "robustness.png", data)
    return data


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
