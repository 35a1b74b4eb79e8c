#!/usr/bin/env python
"""Validation reconstruction loss of every decoder (paper Fig. 3 right: DeepMIM-MAE reaches a lower loss on the last
block than MAE; Sec. 4 cites Xie et al.: lower validation loss, better MIM).

Each checkpoint is evaluated on the same fixed images with the same masks (`--seed`; one noise row per image, so the
batch size does not change the masks), against its own pixel targets (per-patch normalised when it was trained with
norm_pix_loss). Several checkpoints of one run share a `--names` label and become a curve over epochs:

    python tools/eval_recon_loss.py --data_path /data/imagenet --num_images 5000 \\
        --ckpt mae/checkpoint-99.pth mae/checkpoint-199.pth dm/checkpoint-99.pth dm/checkpoint-199.pth \\
        --names MAE MAE DeepMIM DeepMIM --output_dir out/recon_loss

Writes recon_loss.png (left: loss of every decoder, latest checkpoint of each name; right: last decoder's loss per
epoch, or per name when each has one checkpoint) and recon_loss.json; prints a Markdown table.

Needs the decoders: pre-training checkpoints of main_pretrain.py (or released MAE/DeepMIM files with decoders).
Fine-tuned / probed classifiers, exports and encoder-only releases are refused with a message naming the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

from analysis import cli, images  # noqa: E402
from analysis.loading import LoadedModel  # noqa: E402
from analysis.visualize import integer_ticks, new_figure, save_figure  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser(__doc__, num_images=1000, batch_size=64)
    group = parser.add_argument_group("masking")
    cli.add_mask_ratio_arg(group)
    group.add_argument("--norm_pix_loss", action="store_true",
                       help="checkpoints without model_cfg were trained on per-patch-normalised pixels")
    return parser


def check_args(args: argparse.Namespace) -> None:
    # Repeated names are allowed: they group checkpoints of one run into a curve over epochs.
    cli.check_common_args(args, unique_names=False)
    cli.check_mask_ratio(args)


@torch.inference_mode()
def evaluate(models: list[LoadedModel], loader: torch.utils.data.DataLoader, mask_ratio: float, seed: int,
             device: str) -> list[dict[str, float]]:
    """Mean loss of every decoder over the loader's images, per model: [{block (str): loss}]."""
    num_images = len(loader.dataset)
    noise = {m.model.num_patches: images.mask_noise(num_images, m.model.num_patches, seed) for m in models}
    sums: list[dict[str, float]] = [{} for _ in models]
    start = 0
    for imgs, _ in loader:
        imgs = imgs.to(device)
        for m, total in zip(models, sums):
            batch_noise = noise[m.model.num_patches][start:start + len(imgs)].to(device)
            _, losses, _, _ = m.model(imgs, mask_ratio=mask_ratio, noise=batch_noise)
            for block, loss in losses.items():
                total[str(block)] = total.get(str(block), 0.0) + float(loss) * len(imgs)
        start += len(imgs)
    return [{block: value / num_images for block, value in total.items()} for total in sums]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    blocks = sorted({int(b) for row in rows for b in row["loss"]})
    lines = ["| checkpoint | epoch | " + " | ".join(f"block {b}" for b in blocks) + " |",
             "|---|---|" + "---|" * len(blocks)]
    for row in rows:
        cells = [f"{row['loss'][str(b)]:.4f}" if str(b) in row["loss"] else "-" for b in blocks]
        lines.append(f"| {row['name']} | {row['epoch'] if row['epoch'] is not None else '-'} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, data: dict[str, Any]) -> None:
    fig = new_figure(11, 4)
    left, right = fig.subplots(1, 2)
    names = list(dict.fromkeys(row["name"] for row in rows))
    for name in names:
        runs = [row for row in rows if row["name"] == name]
        latest = max(runs, key=lambda r: -1 if r["epoch"] is None else r["epoch"])  # the last one if no epochs
        blocks = sorted(int(b) for b in latest["loss"])
        label = name if latest["epoch"] is None else f"{name} (epoch {latest['epoch']})"
        left.plot(blocks, [latest["loss"][str(b)] for b in blocks], marker="o", label=label)
    left.set_xlabel("encoder block read by the decoder")
    left.set_ylabel("validation reconstruction loss")
    left.set_title("loss of every decoder")
    left.legend()
    integer_ticks(left)
    if any(sum(row["name"] == name for row in rows) > 1 for name in names):
        for name in names:
            runs = [row for row in rows if row["name"] == name]
            epochs = [r["epoch"] if r["epoch"] is not None else i for i, r in enumerate(runs)]
            order = sorted(range(len(runs)), key=lambda i: epochs[i])
            right.plot([epochs[i] for i in order], [runs[i]["last_block_loss"] for i in order], marker="o", label=name)
        right.set_xlabel("epoch")
    else:
        right.bar(range(len(rows)), [row["last_block_loss"] for row in rows],
                  color=[f"C{i}" for i in range(len(rows))], label=[row["name"] for row in rows])
        right.set_xticks(range(len(rows)), [row["name"] for row in rows])
        right.set_xlabel("checkpoint")
    right.set_ylabel("validation loss of the last block's decoder")
    right.set_title("last block (Fig. 3 right)")
    right.legend()
    save_figure(fig, data, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    models, input_size = cli.load_models(args, require_decoders=True)
    cli.check_pixel_decoders(models)
    loader = images.build_image_loader(args, input_size)
    losses = evaluate(models, loader, args.mask_ratio, args.seed, args.device)
    rows = [{"name": m.name, "path": m.path, "epoch": m.epoch, "loss": loss,
             "last_block_loss": loss[str(m.model.supervised_blocks[-1])]} for m, loss in zip(models, losses)]
    data = {"mask_ratio": args.mask_ratio, "seed": args.seed, "input_size": input_size,
            "num_images": len(loader.dataset), "checkpoints": rows}
    plot(rows, Path(args.output_dir) / "recon_loss.png", data)
    print(markdown_table(rows))
    return data


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
