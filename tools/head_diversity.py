#!/usr/bin/env python
"""Attention-head diversity per layer (paper Fig. 6: DeepMIM's heads are more diverse than MAE's).

For every encoder layer and every pair of attention heads, on unmasked images (definitions in
analysis/head_diversity.py): `--on outputs` (default) the cosine similarity between the heads' outputs, the paper's
"cosine similarity between heads" (lower = more diverse); `--on maps` the KL divergence between the heads' attention
maps, the measure of Xie et al. [52], whom the paper cites for head diversity (higher = more diverse). Drawn as a
scatter of all pairs with the layer mean as a large dot, one panel per checkpoint side by side.

    python tools/head_diversity.py --ckpt mae.pth deepmim.pth --names MAE DeepMIM --data_path /data/imagenet \\
        --num_images 1000 --output_dir out/heads [--on maps]

Writes head_diversity.png and head_diversity.json (every pair's value and the means); with `--on maps`,
head_diversity_maps.png and .json.

Needs only the encoder: takes pre-training checkpoints, fine-tuned and linear-probe classifiers (main_finetune.py,
main_linprobe.py; the head is not used), .safetensors exports and timm Hub folders (tools/export_encoder.py) and
released weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repository

from analysis import cli, features, images  # noqa: E402
from analysis.head_diversity import HeadKL, HeadSimilarity, mean_pairwise, pairwise_values  # noqa: E402
from analysis.loading import LoadedModel  # noqa: E402
from analysis.visualize import integer_ticks, new_figure, save_figure  # noqa: E402


class Measure(NamedTuple):
    accumulator: type  # HeadSimilarity or HeadKL: update(per-layer tensors), compute() -> (layers, H, H)
    features: Callable[..., list[torch.Tensor]]  # (model, imgs) -> per-layer (N, H, T, d) outputs or (N, H, T, T) maps
    definition: str
    axis: str
    file: str


MEASURES = {
    "outputs": Measure(HeadSimilarity, features.attention_head_outputs,
                       "cosine similarity between two heads' attention outputs (input of attn.proj), each flattened "
                       "over all tokens of all images; pairs i < j; mean = the layer's score (lower = more diverse)",
                       "cosine similarity between heads' outputs", "head_diversity"),
    "maps": Measure(HeadKL, features.attention_maps,
                    "KL divergence between two heads' attention maps (Xie et al. [52]): mean over every query token "
                    "of every image of KL(P_i || P_j), averaged over both directions; pairs i < j; mean = the layer's "
                    "score (higher = more diverse)", "KL divergence between heads' attention maps",
                    "head_diversity_maps"),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.tool_parser(__doc__, num_images=256, batch_size=32)
    parser.add_argument_group("head diversity").add_argument(
        "--on", default="outputs", choices=tuple(MEASURES),
        help="what is compared: the heads' outputs (cosine similarity, Fig. 6) or their attention maps (KL "
             "divergence, Xie et al.)")
    return parser


@torch.inference_mode()
def accumulate(models: list[LoadedModel], loader: torch.utils.data.DataLoader, device: str,
               measure: Measure) -> list[HeadSimilarity | HeadKL]:
    accs = [measure.accumulator(m.model.depth, m.model.blocks[0].attn.num_heads) for m in models]
    for imgs, _ in loader:
        imgs = imgs.to(device)
        for m, acc in zip(models, accs):
            acc.update(measure.features(m.model, imgs))
    return accs


def plot(results: dict[str, dict[str, Any]], path: Path, data: dict[str, Any], axis: str) -> None:
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
    axes[0].set_ylabel(axis)
    save_figure(fig, data, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    cli.check_common_args(args)
    models, input_size = cli.load_models(args)
    measure = MEASURES[args.on]
    loader = images.build_image_loader(args, input_size)
    accs = accumulate(models, loader, args.device, measure)
    results = {}
    for m, acc in zip(models, accs):
        values = acc.compute()  # (depth, H, H)
        heads = values.shape[-1]
        results[m.name] = {
            "path": m.path, "num_heads": heads, "mean": mean_pairwise(values).tolist(),
            "pairs": pairwise_values(values).tolist(),
            "pair_index": torch.triu_indices(heads, heads, offset=1).T.tolist(),
        }
        print(f"{m.name}: mean {measure.axis} per layer " + " ".join(f"{v:.3f}" for v in results[m.name]["mean"]))
    data = {"on": args.on, "definition": measure.definition, "input_size": input_size,
            "num_images": len(loader.dataset), "checkpoints": results}
    plot(results, Path(args.output_dir) / f"{measure.file}.png", data, measure.axis)
    return data


if __name__ == "__main__":
    cli.run_cli(get_args_parser(), main)
