"""The small-scale study's report (benchmarks/small_scale_study.py): mean +- std over seeds, the paper's claims as
paired per-seed differences with a 95 % t-interval and a verdict, the figures and the Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from study_runs import RANDOM_INIT
from study_setup import VARIANTS

LABELS = {**{k: v.label for k, v in VARIANTS.items()}, RANDOM_INIT: "random init (not pre-trained)"}
CONFIDENCE = 0.95

# --------------------------------------------------------------------------------------------------------------
# Summaries: mean +- std over seeds, and the paper's claims as paired per-seed differences
# --------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of finite numbers."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": int(len(array))}


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Student-t confidence interval of the mean of `values` (seeds as independent draws): mean +- t_{(1+c)/2, n-1}
    * std / sqrt(n). With one value the interval is (-inf, inf): one seed resolves nothing."""
    from scipy.stats import t

    stats = mean_std(values)
    n = stats["n"]
    half = float(t.ppf((1 + confidence) / 2, n - 1) * stats["std"] / math.sqrt(n)) if n > 1 else math.inf
    return {**stats, "low": stats["mean"] - half, "high": stats["mean"] + half, "confidence": confidence}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def scalar_metrics(run: Mapping[str, Any]) -> dict[str, float]:
    """One run's headline numbers (those it has: the random-init reference has no decoders to analyse)."""
    out: dict[str, float] = {}
    if "finetune" in run:
        out["finetune_top1"] = run["finetune"]["stats"]["acc1"]
    if "frozen_probes" in run:
        blocks = run["frozen_probes"]["blocks"]
        probe = [b["logreg"]["acc1"] for b in blocks]
        knn = [b["knn_acc1"] for b in blocks]
        out |= {"probe_last": probe[-1], "probe_best": max(probe), "probe_intermediate_mean": _mean(probe[:-1]),
                "knn_last": knn[-1], "knn_intermediate_mean": _mean(knn[:-1])}
    if "recon_loss_last" in run:
        out |= {"recon_loss_last": run["recon_loss_last"],
                "cka_intermediate_mean": _mean(run["cka_with_last"][:-1]),
                "head_similarity_mean": _mean(run["head_similarity"])}
    return out


def per_block(runs: Mapping[int, Mapping[str, Any]], depth: int) -> dict[str, Any]:
    """Per-block curves (mean/std over seeds) of one variant."""
    seeds = list(runs)
    first = runs[seeds[0]]
    curves: dict[str, Any] = {}
    if "frozen_probes" in first:
        curves["probe_acc1"] = [mean_std([runs[s]["frozen_probes"]["blocks"][b]["logreg"]["acc1"] for s in seeds])
                                for b in range(depth)]
        curves["knn_acc1"] = [mean_std([runs[s]["frozen_probes"]["blocks"][b]["knn_acc1"] for s in seeds])
                              for b in range(depth)]
    if "cka_with_last" in first:
        curves["cka_with_last"] = [mean_std([runs[s]["cka_with_last"][b] for s in seeds]) for b in range(depth)]
        curves["head_similarity"] = [mean_std([runs[s]["head_similarity"][b] for s in seeds]) for b in range(depth)]
        curves["recon_loss"] = {str(b): mean_std([runs[s]["recon_loss"][b] for s in seeds])
                                for b in sorted(first["recon_loss"])}
    return curves


class Claim(NamedTuple):
    source: str  # where the paper makes it ("precondition": not the paper's, what the others rest on)
    statement: str
    metric: str  # a key of scalar_metrics
    better: str  # variant expected to be better
    worse: str
    higher_is_better: bool


FT = "fine-tuning top-1"
CLAIMS = (
    Claim("precondition", f"pre-training helps at this scale: MAE > random init ({FT})", "finetune_top1", "mae",
          RANDOM_INIT, True),
    Claim("precondition", "pre-training helps at this scale: MAE > random init (converged probe, last block)",
          "probe_last", "mae", RANDOM_INIT, True),
    Claim("Tab. 7 / Tab. 8", f"deep supervision improves accuracy: DeepMIM > MAE ({FT})", "finetune_top1", "deepmim",
          "mae", True),
    Claim("Tab. 7 / Tab. 9", f"hybrid targets improve it further: DeepMIM\u2020 > DeepMIM ({FT})", "finetune_top1",
          "deepmim_hybrid", "deepmim", True),
    Claim("Tab. 10", f"independent decoders beat a shared one: DeepMIM > DeepMIM shared ({FT})", "finetune_top1",
          "deepmim", "deepmim_shared", True),
    Claim("Sec. 4 (Figs. 5-7)", "DeepMIM's intermediate blocks are more discriminative: converged probe, mean of "
          "blocks 1..depth-1, DeepMIM > MAE", "probe_intermediate_mean", "deepmim", "mae", True),
    Claim("Sec. 4 (Figs. 5-7)", "the same with k-NN (k = 20): mean of blocks 1..depth-1, DeepMIM > MAE",
          "knn_intermediate_mean", "deepmim", "mae", True),
    Claim("Sec. 4", "DeepMIM's last block is more discriminative: converged probe, DeepMIM > MAE", "probe_last",
          "deepmim", "mae", True),
    Claim("Fig. 3", "DeepMIM's last decoder reaches a lower validation reconstruction loss than MAE's",
          "recon_loss_last", "deepmim", "mae", False),
    Claim("Fig. 4", "DeepMIM's blocks 1..depth-1 are more similar (CKA) to its last block than MAE's",
          "cka_intermediate_mean", "deepmim", "mae", True),
    Claim("Fig. 6", "DeepMIM's attention heads are more diverse (lower mean head cosine similarity) than MAE's",
          "head_similarity_mean", "deepmim", "mae", False),
)


def verdict(interval: Mapping[str, float], higher_is_better: bool) -> str:
    """'holds' if the interval of better - worse excludes 0 in the claimed direction, 'contradicted' if it excludes
    0 in the other, 'not resolved' otherwise."""
    low, high = (interval["low"], interval["high"]) if higher_is_better else (-interval["high"], -interval["low"])
    return "holds" if low > 0 else "contradicted" if high < 0 else "not resolved"


def evaluate_claim(claim: Claim, metrics: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, Any]:
    """Paired per-seed difference better - worse of the claim's metric, its 95 % t-interval and the verdict."""
    seeds = sorted(metrics[claim.better])
    diffs = [metrics[claim.better][s][claim.metric] - metrics[claim.worse][s][claim.metric] for s in seeds]
    interval = t_interval(diffs)
    return {**claim._asdict(), "difference_per_seed": dict(zip(map(str, seeds), diffs)), "difference": interval,
            "verdict": verdict(interval, claim.higher_is_better)}


def summarize(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], depth: int,
              raw_pixels: Mapping[str, Any] | None = None) -> dict[str, Any]:
    metrics = {v: {s: scalar_metrics(run) for s, run in by_seed.items()} for v, by_seed in runs.items()}
    scalars = {v: {k: mean_std([m[k] for m in by_seed.values()]) for k in next(iter(by_seed.values()))}
               for v, by_seed in metrics.items()}
    raw = None
    if raw_pixels:
        block = raw_pixels["blocks"][0]
        raw = {"probe_acc1": block["logreg"]["acc1"], "knn_acc1": block["knn_acc1"], "C": block["logreg"]["C"]}
    return {
        "scalars": scalars,
        "per_block": {v: per_block(by_seed, depth) for v, by_seed in runs.items()},
        "per_seed": {v: {str(s): m for s, m in by_seed.items()} for v, by_seed in metrics.items()},
        "raw_pixels": raw,
        "claims": [evaluate_claim(c, metrics) for c in CLAIMS],
    }


# --------------------------------------------------------------------------------------------------------------
# Figures and tables
# --------------------------------------------------------------------------------------------------------------


def _curves(ax, summary: Mapping[str, Any], key: str, ylabel: str, title: str) -> list[str]:
    from analysis.visualize import integer_ticks

    variants = [v for v in LABELS if key in summary["per_block"][v]]
    offsets = np.linspace(-0.12, 0.12, len(variants))
    for i, variant in enumerate(variants):
        points = summary["per_block"][variant][key]
        blocks = np.arange(1, len(points) + 1) + offsets[i]
        ax.errorbar(blocks, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=3,
                    label=LABELS[variant], color=f"C{i}", linestyle=":" if variant == RANDOM_INIT else "-")
    raw = summary.get("raw_pixels")
    if raw and key in raw:
        ax.axhline(raw[key], color="grey", linestyle="--", label="raw pixels")
    ax.set_xlabel("encoder block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    integer_ticks(ax)
    return variants


def _finetune_figure(summary: Mapping[str, Any], path: Path, seeds: str) -> Path:
    from analysis.visualize import new_figure, save_figure

    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    variants = [v for v in LABELS if "finetune_top1" in summary["scalars"][v]]
    for i, variant in enumerate(variants):
        values = [m["finetune_top1"] for m in summary["per_seed"][variant].values()]
        interval = t_interval(values)
        ax.bar(i, interval["mean"], color=f"C{i}", alpha=0.6)
        if math.isfinite(interval["low"]):
            ax.errorbar(i, interval["mean"], yerr=[[interval["mean"] - interval["low"]],
                                                   [interval["high"] - interval["mean"]]], color="black", capsize=5)
        ax.plot(np.full(len(values), i) + np.linspace(-0.15, 0.15, len(values)), values, "k.", markersize=6)
    ax.set_xticks(range(len(variants)), [LABELS[v].replace(" (", "\n(").replace(", ", ",\n") for v in variants],
                  fontsize=8)
    low = min(min(m["finetune_top1"] for m in summary["per_seed"][v].values()) for v in variants)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("fine-tuning top-1 (%)")
    ax.set_title(f"Fine-tuning top-1 (bars: mean, whiskers: 95 % t-interval, dots: seeds; {seeds})")
    data = {v: summary["per_seed"][v] for v in variants}
    return save_figure(fig, data, path)[0]


def _recon_figure(summary: Mapping[str, Any], path: Path, seeds: str) -> Path:
    from analysis.visualize import integer_ticks, new_figure, save_figure

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
    return save_figure(fig, data, path)[0]


def plot_figures(summary: Mapping[str, Any], figures_dir: Path, n_seeds: int) -> dict[str, Path]:
    """finetune_accuracy, probe_accuracy, knn_accuracy, cka_last_block, head_diversity, recon_loss PNGs."""
    from analysis.visualize import new_figure, save_figure

    seeds = f"{n_seeds} seed{'s' * (n_seeds > 1)}"
    std = f"mean \u00b1 std over {seeds}"
    panels = {
        "probe_accuracy": ("probe_acc1", "top-1 (%)", f"Converged logistic-regression probe of every block ({std})"),
        "knn_accuracy": ("knn_acc1", "top-1 (%)", f"k-NN (k = 20, cosine) of every block ({std})"),
        "cka_last_block": ("cka_with_last", "CKA with the last block", f"CKA of every block with the last (Fig. 4; "
                           f"{std})"),
        "head_diversity": ("head_similarity", "mean cosine similarity between heads",
                           f"Head similarity per layer, lower = more diverse (Fig. 6; {std})"),
    }
    paths = {"finetune_accuracy": _finetune_figure(summary, figures_dir / "finetune_accuracy.png", seeds)}
    for name, (key, ylabel, title) in panels.items():
        fig = new_figure(7, 4.5)
        variants = _curves(fig.subplots(), summary, key, ylabel, title)
        data = {v: summary["per_block"][v][key] for v in variants}
        paths[name] = save_figure(fig, data, figures_dir / f"{name}.png")[0]
    paths["recon_loss"] = _recon_figure(summary, figures_dir / "recon_loss.png", std)
    return paths


def _fmt(m: Mapping[str, float] | None, digits: int) -> str:
    return "\u2013" if m is None else f"{m['mean']:.{digits}f} \u00b1 {m['std']:.{digits}f}"


def _digits(metric: str) -> int:
    return 4 if metric == "recon_loss_last" else 3 if "cka" in metric or "head" in metric else 2


HEADLINE = (("finetune_top1", "fine-tuning top-1 (%)", 1), ("probe_last", "probe, last block (%)", 1),
            ("probe_intermediate_mean", "probe, mean of blocks 1..depth-1 (%)", 1),
            ("knn_last", "k-NN, last block (%)", 1), ("recon_loss_last", "last-decoder val loss", 4),
            ("cka_intermediate_mean", "CKA with last, blocks 1..depth-1", 3),
            ("head_similarity_mean", "head similarity (lower = more diverse)", 3))


def markdown_tables(summary: Mapping[str, Any], depth: int) -> str:
    """Headline table, per-block probe and k-NN tables and the claims, as Markdown."""
    s = summary["scalars"]
    lines = ["| variant | " + " | ".join(h for _, h, _ in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for variant, label in LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(s[variant].get(k), d) for k, _, d in HEADLINE) + " |")
    raw = summary.get("raw_pixels")
    if raw:  # one "block": its probe and k-NN fill the last-block columns
        values = {"probe_last": raw["probe_acc1"], "knn_last": raw["knn_acc1"]}
        lines.append("| raw pixels | " + " | ".join(f"{values[k]:.{d}f}" if k in values else "\u2013"
                                                     for k, _, d in HEADLINE) + " |")
    for key, what in (("probe_acc1", "Converged probe"), ("knn_acc1", "k-NN")):
        lines += ["", f"{what} top-1 (%) of every block:", "",
                  "| variant | " + " | ".join(f"block {b}" for b in range(1, depth + 1)) + " |",
                  "|---|" + "---|" * depth]
        for variant, label in LABELS.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(p, 1) for p in summary["per_block"][variant][key]) + " |")
    lines += ["", "| paper | claim | per seed (better \u2212 worse) | mean [95 % t-interval] | verdict |",
              "|---|---|---|---|---|"]
    for c in summary["claims"]:
        d, diff = _digits(c["metric"]), c["difference"]
        per_seed = ", ".join(f"{v:+.{d}f}" for v in c["difference_per_seed"].values())
        lines.append(f"| {c['source']} | {c['statement']} | {per_seed} | {diff['mean']:+.{d}f} "
                     f"[{diff['low']:+.{d}f}, {diff['high']:+.{d}f}] | {c['verdict']} |")
    return "\n".join(lines) + "\n"
