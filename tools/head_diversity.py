#!/usr/bin/env python
"""Attention-head diversity per layer (paper Fig. 6: DeepMIM's heads are more diverse than MAE's).

For every encoder layer, the cosine similarity between the outputs of every pair of attention heads on unmasked
images (the definition is in analysis/head_diversity.py), drawn as a scatter of all pairs with the layer mean as a large
dot, one panel per checkpoint side by side.

    python tools/head_diversity.py --ckpt mae.pth deepmim.pth --names MAE DeepMIM --data_path /data/imagenet \\
        --num_images 1000 --output_dir out/heads

Writes head_diversity.png and head_diversity.json (every pair's similarity and the means).

Needs only the encoder: takes pre-training checkpoints, fine-tuned and linear-probe classifiers (main_finetune.py,
main_linprobe.py; the head is not used), .safetensors exports (tools/export_encoder.py) and released weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

from analysis import cli, features, images  # noqa: E402
from analysis.head_diversity import HeadSimilarity, mean_pairwise, pairwise_values  # noqa: E402
from analysis.loading import LoadedModel  # noqa: E402
from analysis.visualize import integer_ticks, new_figure, save_figure  # noqa: E402

DEFINITION = ("cosine similarity between two heads' attention outputs (input of attn.proj), each flattened over "
              "all tokens of all images; pairs i < j; mean = the layer's score (lower = more diverse)")


def get_args_parser() -> argparse.ArgumentParser:
    return cli.tool_parser(__doc__, num_images=256, batch_size=32)


@torch.inference_mode()
def accumulate(models: list[LoadedModel], loader: torch.utils.data.DataLoader,
               device: str) -> list[HeadSimilarity]:
    accs = [HeadSimilarity(m.model.depth, m.model.blocks[0].attn.num_heads) for m in models]
    for imgs, _ in loader:
        imgs = imgs.to(device)
        for m, acc in zip(models, accs):
            acc.update(features.attention_head_outputs(m.model, imgs))
    return accs


def plot(results: dict[str, dict[str, Any]], path: Path, data: dict[str, Any]) -> None:
    fig = new_figure(5.5 * len(results), 4.5)
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False)[0]
    for i, (ax, (name, result)) in enumerate(zip(axes, results.items())):
        color = f"C{i}"
        for layer, values in enumerate(result["pairs"], start=1):
            # Spread the pairs of one layer evenly across +-0.3 around it so that they do not hide each other.
            offsets = torch.linspace(-0.3, 0.3, len(values)).tolist() if len(values) > 1 else [0.0]
            ax.scatter([layer + o for o in offsets], values, s=6, alpha=0.35, color=color,
                       label=f"{name}: head pairs" if layer == 1 else None)
        layers = range(1, len(result["mean"]) + 1)
        ax.scatter(layers, result["mean"], s=70, color=color, edgecolors="black", zorder=3, label=f"{name}: mean")
        ax.set_xlabel("layer")
        ax.set_title(name)
        ax.legend(loc="best", fontsize=8)
        integer_ticks(ax)
    axes[0].set_ylabel("cosine similarity between heads")
    save_figure(fig, data, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cli.check_common_args(args)
    models, input_size = cli.load_models(args)
    loader = images.build_image_loader(args, input_size)
    accs = accumulate(models, loader, args.device)
    results = {}
    for m, acc in zip(models, accs):
        similarity = acc.compute()  # (depth, H, H)
        heads = similarity.shape[-1]
        results[m.name] = {
            "path": m.path, "num_heads": heads, "mean": mean_pairwise(similarity).tolist(),
            "pairs": pairwise_values(similarity).tolist(),
            "pair_index": torch.triu_indices(heads, heads, offset=1).T.tolist(),
        }
        print(f"{m.name}: mean head similarity per layer " + " ".join(f"{v:.3f}" for v in results[m.name]["mean"]))
    data = {"definition": DEFINITION, "input_size": input_size, "num_images": len(loader.dataset),
            "checkpoints": results}
    plot(results, Path(args.output_dir) / "head_diversity.png", data)
    return data


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
