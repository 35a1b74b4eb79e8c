"""The small-scale study's report (benchmarks/small_scale_study.py): mean +- std over seeds, the paper's claims as
paired per-seed differences with a verdict, the figures and the Markdown tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from study_setup import VARIANTS

# --------------------------------------------------------------------------------------------------------------
# Summaries: mean +- std over seeds, and the paper's claims as paired per-seed differences
# --------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of finite numbers."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": int(len(array))}


def scalar_metrics(run: Mapping[str, Any], depth: int) -> dict[str, float]:
    """One run's headline numbers."""
    probe = [run["probe"][b]["stats"]["acc1"] for b in range(1, depth + 1)]
    return {
        "probe_last": probe[-1],
        "probe_best": max(probe),
        "probe_mean": float(np.mean(probe)),
        "probe_intermediate_mean": float(np.mean(probe[:-1])),
        "recon_loss_last": run["recon_loss_last"],
        "cka_intermediate_mean": float(np.mean(run["cka_with_last"][:-1])),
        "head_similarity_mean": float(np.mean(run["head_similarity"])),
    }


def per_block(runs: Mapping[int, Mapping[str, Any]], depth: int) -> dict[str, list[dict[str, float]]]:
    """Per-block curves (mean/std over seeds) of one variant."""
    seeds = list(runs)
    return {
        "probe_acc1": [mean_std([runs[s]["probe"][b]["stats"]["acc1"] for s in seeds]) for b in range(1, depth + 1)],
        "cka_with_last": [mean_std([runs[s]["cka_with_last"][b] for s in seeds]) for b in range(depth)],
        "head_similarity": [mean_std([runs[s]["head_similarity"][b] for s in seeds]) for b in range(depth)],
        "recon_loss": {str(b): mean_std([runs[s]["recon_loss"][b] for s in seeds])
                       for b in sorted(runs[seeds[0]]["recon_loss"])},
    }


class Claim(NamedTuple):
    source: str  # where the paper makes it
    statement: str
    metric: str  # a key of scalar_metrics
    better: str  # variant expected to be better
    worse: str
    higher_is_better: bool


CLAIMS = (
    Claim("Fig. 3", "DeepMIM's last decoder reaches a lower validation reconstruction loss than MAE's",
          "recon_loss_last", "deepmim", "mae", False),
    Claim("Fig. 4", "DeepMIM's blocks 1..depth-1 are more similar (CKA) to its last block than MAE's",
          "cka_intermediate_mean", "deepmim", "mae", True),
    Claim("Fig. 6", "DeepMIM's attention heads are more diverse (lower mean head cosine similarity) than MAE's",
          "head_similarity_mean", "deepmim", "mae", False),
    Claim("Tab. 7 / Tab. 8", "deep supervision improves accuracy: DeepMIM > MAE (linear probe, last block)",
          "probe_last", "deepmim", "mae", True),
    Claim("Tab. 7 / Tab. 9", "hybrid targets improve accuracy further: DeepMIM\u2020 > DeepMIM (linear probe, last "
          "block)", "probe_last", "deepmim_hybrid", "deepmim", True),
    Claim("Tab. 10", "independent decoders beat a shared one: DeepMIM > DeepMIM shared (linear probe, last block)",
          "probe_last", "deepmim", "deepmim_shared", True),
    Claim("Sec. 4 (Figs. 4-7)", "DeepMIM's intermediate blocks are more discriminative: mean probe top-1 of blocks "
          "1..depth-1, DeepMIM > MAE", "probe_intermediate_mean", "deepmim", "mae", True),
)


def evaluate_claim(claim: Claim, metrics: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, Any]:
    """Paired per-seed difference better - worse of the claim's metric; the verdict counts the seeds where the
    difference has the claimed sign: 'holds' (all), 'does not hold' (none), else 'mixed'."""
    seeds = sorted(metrics[claim.better])
    diffs = [metrics[claim.better][s][claim.metric] - metrics[claim.worse][s][claim.metric] for s in seeds]
    agree = sum((d > 0) if claim.higher_is_better else (d < 0) for d in diffs)
    verdict = "holds" if agree == len(diffs) else "does not hold" if agree == 0 else "mixed"
    return {**claim._asdict(), "difference_per_seed": dict(zip(map(str, seeds), diffs)),
            "difference": mean_std(diffs), "seeds_agreeing": agree, "verdict": verdict}


def summarize(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], depth: int) -> dict[str, Any]:
    metrics = {v: {s: scalar_metrics(run, depth) for s, run in by_seed.items()} for v, by_seed in runs.items()}
    scalars = {v: {k: mean_std([m[k] for m in by_seed.values()]) for k in next(iter(by_seed.values()))}
               for v, by_seed in metrics.items()}
    return {
        "scalars": scalars,
        "per_block": {v: per_block(by_seed, depth) for v, by_seed in runs.items()},
        "per_seed": {v: {str(s): m for s, m in by_seed.items()} for v, by_seed in metrics.items()},
        "claims": [evaluate_claim(c, metrics) for c in CLAIMS],
    }


# --------------------------------------------------------------------------------------------------------------
# Figures and tables
# --------------------------------------------------------------------------------------------------------------


def _curves(ax, summary: Mapping[str, Any], key: str, ylabel: str, title: str) -> None:
    from analysis.visualize import integer_ticks

    offsets = np.linspace(-0.12, 0.12, len(VARIANTS))
    for i, (variant, v) in enumerate(VARIANTS.items()):
        points = summary["per_block"][variant][key]
        blocks = np.arange(1, len(points) + 1) + offsets[i]
        ax.errorbar(blocks, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=3,
                    label=v.label, color=f"C{i}")
    ax.set_xlabel("encoder block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    integer_ticks(ax)


def plot_figures(summary: Mapping[str, Any], figures_dir: Path, n_seeds: int) -> dict[str, Path]:
    """probe_accuracy, cka_last_block, head_diversity, recon_loss PNGs (error bars: std over seeds)."""
    from analysis.visualize import integer_ticks, new_figure, save_figure

    seeds = f"mean \u00b1 std over {n_seeds} seed{'s' * (n_seeds > 1)}"
    panels = {
        "probe_accuracy": ("probe_acc1", "linear-probe top-1 (%)", f"Linear probe of every block ({seeds})"),
        "cka_last_block": ("cka_with_last", "CKA with the last block", f"CKA of every block with the last (Fig. 4; "
                           f"{seeds})"),
        "head_diversity": ("head_similarity", "mean cosine similarity between heads",
                           f"Head similarity per layer, lower = more diverse (Fig. 6; {seeds})"),
    }
    paths = {}
    for name, (key, ylabel, title) in panels.items():
        fig = new_figure(7, 4.5)
        _curves(fig.subplots(), summary, key, ylabel, title)
        data = {v: summary["per_block"][v][key] for v in VARIANTS}
        paths[name] = save_figure(fig, data, figures_dir / f"{name}.png")[0]

    fig = new_figure(12, 4.5)
    left, right = fig.subplots(1, 2)
    last = [summary["scalars"][v]["recon_loss_last"] for v in VARIANTS]
    left.bar(range(len(VARIANTS)), [m["mean"] for m in last], yerr=[m["std"] for m in last], capsize=4,
             color=[f"C{i}" for i in range(len(VARIANTS))])
    left.set_xticks(range(len(VARIANTS)), [v.label.replace(" (", "\n(").replace(", ", ",\n") for v in
                                           VARIANTS.values()], fontsize=8)
    lows = [m["mean"] - m["std"] for m in last]
    highs = [m["mean"] + m["std"] for m in last]
    pad = max(0.05 * (max(highs) - min(lows)), 1e-3)
    left.set_ylim(min(lows) - 4 * pad, max(highs) + pad)
    left.set_ylabel("validation loss, last decoder")
    left.set_title(f"Last decoder's validation loss (Fig. 3 right; {seeds})")
    for i, (variant, v) in enumerate(VARIANTS.items()):
        losses = summary["per_block"][variant]["recon_loss"]
        blocks = [int(b) for b in losses]
        right.errorbar(blocks, [losses[str(b)]["mean"] for b in blocks], yerr=[losses[str(b)]["std"] for b in blocks],
                       marker="o", capsize=3, label=v.label, color=f"C{i}")
    right.set_xlabel("encoder block read by the decoder")
    right.set_ylabel("validation loss (target: the image)")
    right.set_title("Every decoder's validation loss")
    right.legend(fontsize=8)
    integer_ticks(right)
    data = {v: summary["per_block"][v]["recon_loss"] for v in VARIANTS}
    paths["recon_loss"] = save_figure(fig, data, figures_dir / "recon_loss.png")[0]
    return paths


def _fmt(m: Mapping[str, float], digits: int) -> str:
    return f"{m['mean']:.{digits}f} \u00b1 {m['std']:.{digits}f}"


def markdown_tables(summary: Mapping[str, Any], depth: int) -> str:
    """Headline table, per-block probe table and the claims, as Markdown."""
    s = summary["scalars"]
    lines = ["| variant | probe top-1, last block (%) | best block's top-1 (%) | mean top-1 over blocks (%) | "
             "last-decoder val loss | CKA with last, blocks 1..depth-1 | head similarity (lower = more diverse) |",
             "|---|---|---|---|---|---|---|"]
    for variant, v in VARIANTS.items():
        m = s[variant]
        lines.append(f"| {v.label} | {_fmt(m['probe_last'], 1)} | {_fmt(m['probe_best'], 1)} | "
                     f"{_fmt(m['probe_mean'], 1)} | {_fmt(m['recon_loss_last'], 4)} | "
                     f"{_fmt(m['cka_intermediate_mean'], 3)} | {_fmt(m['head_similarity_mean'], 3)} |")
    lines += ["", "| variant | " + " | ".join(f"block {b}" for b in range(1, depth + 1)) + " |",
              "|---|" + "---|" * depth]
    for variant, v in VARIANTS.items():
        cells = [_fmt(p, 1) for p in summary["per_block"][variant]["probe_acc1"]]
        lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
    lines += ["", "| paper | claim | difference (mean \u00b1 std over seeds) | seeds agreeing | verdict |",
              "|---|---|---|---|---|"]
    for c in summary["claims"]:
        digits = 4 if c["metric"] == "recon_loss_last" else 3 if "cka" in c["metric"] or "head" in c["metric"] else 2
        lines.append(f"| {c['source']} | {c['statement']} | {_fmt(c['difference'], digits)} | "
                     f"{c['seeds_agreeing']}/{c['difference']['n']} | {c['verdict']} |")
    return "\n".join(lines) + "\n"

