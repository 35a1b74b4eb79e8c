#!/usr/bin/env python
"""Linear CKA between encoder blocks (paper Fig. 4 and Fig. 5).

Fig. 4: per checkpoint, CKA between the token features of every block and those of the last block (DeepMIM's
shallow blocks are closer to its last block than MAE's). Fig. 5: CKA between block `--block` (paper: the 8th of
ViT-B) of the first checkpoint and every block of the second, and the reverse, with the whole cross-model matrix as a
heatmap. Features are taken on unmasked images; each image is one example, its block output reduced by `--tokens`
(default: all tokens flattened). CKA is the minibatch estimate with the unbiased HSIC (Nguyen et al. 2021), so
thousands of images never have to be held at once.

    python tools/cka.py --ckpt mae.pth deepmim.pth --names MAE DeepMIM --data_path /data/imagenet \\
        --num_images 5000 --batch_size 256 --output_dir out/cka

Writes cka_last_block.png (Fig. 4), with two checkpoints cka_cross.png (Fig. 5 a, b and the heatmap), and the
JSON beside each.

Needs only the encoder: takes pre-training checkpoints, fine-tuned and linear-probe classifiers (main_finetune.py,
main_linprobe.py; the head is not used), .safetensors exports (tools/export_encoder.py) and released weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

from analysis import cli, features, images  # noqa: E402
from analysis.cka import MIN_BATCH, MinibatchCKA, gram_linear  # noqa: E402
from analysis.loading import LoadedModel  # noqa: E402
from analysis.visualize import integer_ticks, new_figure, save_figure  # noqa: E402

logger = logging.getLogger("tools.cka")


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser(__doc__, num_images=1024, batch_size=128)
    group = parser.add_argument_group("CKA")
    group.add_argument("--tokens", default="flatten", choices=features.TOKEN_POOLINGS,
                       help="one vector per image from a block's tokens: all tokens flattened, mean of the patch "
                            "tokens, or the cls token")
    group.add_argument("--block", default=None, type=int,
                       help="1-based block of each model compared with every block of the other (Fig. 5; "
                            "default round(2/3 depth): the paper's 8th of 12)")
    return parser


def default_block(depth: int) -> int:
    return max(1, round(depth * 2 / 3))  # block 8 of ViT-B (paper Fig. 5)


def check_block(args: argparse.Namespace, models: list[LoadedModel]) -> None:
    if args.block is None or len(models) < 2:
        return
    for m in models[:2]:
        if not 1 <= args.block <= m.model.depth:
            raise cli.UsageError(f"--block {args.block} is outside 1..{m.model.depth} ({m.name}'s depth)")


@torch.inference_mode()
def accumulate(models: list[LoadedModel], loader: torch.utils.data.DataLoader, tokens: str,
               device: str) -> MinibatchCKA:
    """Minibatch CKA over every block of every model: feature set k is (model i, block j) in model-major order."""
    acc = MinibatchCKA(sum(m.model.depth for m in models))
    for imgs, _ in loader:
        imgs = imgs.to(device)
        if len(imgs) < MIN_BATCH:
            logger.warning("skipping the last batch of %d images (the unbiased HSIC needs %d)", len(imgs), MIN_BATCH)
            continue
        grams = [gram_linear(features.pool_tokens(x, tokens)) for m in models
                 for x in features.iter_block_features(m.model, imgs)]
        acc.update_grams(torch.stack(grams))
    return acc


def plot_last_block(models: list[LoadedModel], last: dict[str, list[float]], path: Path,
                    data: dict[str, Any]) -> None:
    fig = new_figure(6, 4)
    ax = fig.subplots()
    for m in models:
        ax.plot(range(1, m.model.depth + 1), last[m.name], marker="o", label=m.name)
    ax.set_xlabel("block")
    ax.set_ylabel("CKA with the last block")
    ax.set_title("CKA between every block and the last block (Fig. 4)")
    ax.legend()
    integer_ticks(ax)
    save_figure(fig, data, path)


def plot_cross(a: LoadedModel, b: LoadedModel, cross: torch.Tensor, block_a: int, block_b: int,
               path: Path, data: dict[str, Any]) -> None:
    fig = new_figure(16, 4.5)
    ax_a, ax_b, ax_h = fig.subplots(1, 3)
    ax_a.plot(range(1, b.model.depth + 1), cross[block_a - 1].tolist(), marker="o", color="C1",
              label=f"{a.name} block {block_a} vs {b.name}")
    ax_a.set_xlabel(f"{b.name} block")
    ax_a.set_title(f"(a) block {block_a} of {a.name} vs all blocks of {b.name}")
    ax_b.plot(range(1, a.model.depth + 1), cross[:, block_b - 1].tolist(), marker="o", color="C0",
              label=f"{b.name} block {block_b} vs {a.name}")
    ax_b.set_xlabel(f"{a.name} block")
    ax_b.set_title(f"(b) block {block_b} of {b.name} vs all blocks of {a.name}")
    for ax in (ax_a, ax_b):
        ax.set_ylabel("CKA")
        ax.legend()
    image = ax_h.imshow(cross.numpy(), origin="lower", cmap="magma", vmin=min(0.0, float(cross.min())), vmax=1.0,
                        extent=(0.5, b.model.depth + 0.5, 0.5, a.model.depth + 0.5), aspect="auto")
    ax_h.set_xlabel(f"{b.name} block")
    ax_h.set_ylabel(f"{a.name} block")
    ax_h.set_title(f"CKA: {a.name} (rows) vs {b.name} (columns)")
    fig.colorbar(image, ax=ax_h, label="CKA")
    integer_ticks(ax_a, ax_b)
    integer_ticks(ax_h, y=True)
    save_figure(fig, data, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cli.check_common_args(args, min_batch=MIN_BATCH)
    models, input_size = cli.load_models(args)
    check_block(args, models)
    loader = images.build_image_loader(args, input_size)
    acc = accumulate(models, loader, args.tokens, args.device)
    matrix = acc.compute().float()
    offsets = torch.tensor([0] + [m.model.depth for m in models]).cumsum(0).tolist()
    within = {m.name: matrix[offsets[i]:offsets[i + 1], offsets[i]:offsets[i + 1]] for i, m in enumerate(models)}
    last = {name: w[:, -1].tolist() for name, w in within.items()}
    common = {"tokens": args.tokens, "input_size": input_size, "num_images": acc.num_examples,
              "num_batches": acc.num_batches, "checkpoints": {m.name: m.path for m in models}}
    output_dir = Path(args.output_dir)
    data = {**common, "cka_with_last_block": last, "cka_between_blocks": {k: v.tolist() for k, v in within.items()}}
    plot_last_block(models, last, output_dir / "cka_last_block.png", data)
    if len(models) >= 2:
        a, b = models[:2]
        block_a = args.block or default_block(a.model.depth)
        block_b = args.block or default_block(b.model.depth)
        cross = matrix[offsets[0]:offsets[1], offsets[1]:offsets[2]]
        data["cross"] = {"a": a.name, "b": b.name, "block_a": block_a, "block_b": block_b,
                         "a_block_vs_b_blocks": cross[block_a - 1].tolist(),
                         "b_block_vs_a_blocks": cross[:, block_b - 1].tolist(), "matrix_a_rows_b_cols": cross.tolist()}
        plot_cross(a, b, cross, block_a, block_b, output_dir / "cka_cross.png", {**common, **data["cross"]})
    for name, values in last.items():
        print(f"{name}: CKA with the last block " + " ".join(f"{v:.3f}" for v in values))
    return data


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
