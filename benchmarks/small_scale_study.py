#!/usr/bin/env python
"""The paper's findings at small scale on real images, end to end (issue 8).

Data: scikit-learn's 1,797 handwritten digits (real scans shipped with the package), upsampled to 32x32 RGB, with
the fixed train/val split of `util.cls_data.DigitsDemo` (seed 0, 20 % val), written once as an ImageFolder
(`<output_dir>/data/{train,val}/<class>/*.png`) so that pre-training, probing and the analysis tools all read
files through their own pipelines.

Per seed, four tiny ViTs (32 px, patch 4, 6 blocks of width 128, 4 heads) are pre-trained with `main_pretrain.py`
with the same budget, data, seed and `--norm_pix_loss` (MAE's recipe):

    mae             MAE baseline, one decoder on the last block
    deepmim         DeepMIM, independent decoders on blocks depth*{1/2, 2/3, 5/6, 1} = 3 4 5 6
    deepmim_shared  DeepMIM with one decoder shared by those blocks (paper Tab. 10)
    deepmim_hybrid  DeepMIM+ (the paper's dagger): the same seed's MAE checkpoint as --hybrid_generator,
                    default alphas 0 1/3 2/3 1 (paper Eq. 1, Tab. 9 config 4)

and then measured with the project's own tools: linear-probe top-1 of every block (`main_linprobe.py
--probe_block K`, Figs. 5-7 / Tab. 7 with a probe instead of fine-tuning), the last decoder's validation
reconstruction loss with fixed masks (`tools/eval_recon_loss.py`, Fig. 3), CKA of every block with the last
(`tools/cka.py`, Fig. 4) and attention-head similarity per layer (`tools/head_diversity.py`, Fig. 6).

    python benchmarks/small_scale_study.py --output_dir study_out --seeds 0 1 2 --jobs 2 --docs_dir docs
    python benchmarks/small_scale_study.py --output_dir /tmp/smoke --smoke        # the test's few-second version

Writes `<output_dir>/study.json` (every number, the machine, the timings), `<output_dir>/figures/*.png` (with the
plotted numbers as JSON beside each) and `<output_dir>/table.md`; `--docs_dir` also copies the JSON and the PNGs
to `<docs_dir>/small_scale_study.json` and `<docs_dir>/figures/`. Every run keeps its own folder
(`runs/<variant>/seed<S>/`, `probes/<variant>/seed<S>/block<K>/`, `analysis/seed<S>/<tool>/`) with the scripts'
usual logs and the pre-training checkpoints (the probes' checkpoints are dropped), and `study_result.json`, which
`--reuse` uses to resume an interrupted study.

The budget (`FULL`) was fixed once from measured step times to fit about 25 minutes of an idle 2-core CPU (two runs
at a time, one thread each); it was not tuned to make any claim hold (docs/small_scale_study.md says how each
number was chosen).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("small_scale_study")


# --------------------------------------------------------------------------------------------------------------
# What is compared, and with which budget
# --------------------------------------------------------------------------------------------------------------


class Variant(NamedTuple):
    label: str  # in figures and tables
    model: str  # registered name in models_deepmim.MODELS
    flags: tuple[str, ...]  # extra main_pretrain.py flags
    uses_generator: bool  # DeepMIM+: the same seed's MAE checkpoint is the --hybrid_generator


VARIANTS: dict[str, Variant] = {
    "mae": Variant("MAE", "mae_vit_small_patch16", (), False),
    "deepmim": Variant("DeepMIM", "deepmim_vit_small_patch16", (), False),
    "deepmim_shared": Variant("DeepMIM, shared decoder", "deepmim_vit_small_patch16", ("--shared_decoder",), False),
    "deepmim_hybrid": Variant("DeepMIM\u2020 (hybrid targets)", "deepmim_vit_small_patch16", (), True),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Model size and compute of one study; identical for every variant and seed."""

    input_size: int = 32  # digits upsampled from 8x8
    patch_size: int = 4  # 8x8 = 64 patches
    embed_dim: int = 128
    depth: int = 6  # DeepMIM taps depth*{1/2, 2/3, 5/6, 1} = blocks 3 4 5 6
    num_heads: int = 4
    decoder_embed_dim: int = 64  # small and equal for every variant (paper: 512)
    decoder_num_heads: int = 4
    # The registry's ratio MAE : DeepMIM decoder depth = 8 : 4 (paper Sec. 3), scaled down to 2 : 1 for CPU time.
    mae_decoder_depth: int = 2
    deepmim_decoder_depth: int = 1
    batch_size: int = 32  # main_pretrain.py --demo's batch, blr and warm-up
    epochs: int = 12
    warmup_epochs: int = 2
    blr: float = 5e-3
    probe_epochs: int = 5
    probe_batch_size: int = 32
    probe_lr: float = 160.0  # LARS absolute lr; chosen on the demo checkpoint, not on a study model (see the doc)
    probe_warmup_epochs: int = 1
    per_class: int | None = None  # images per class and split (None: all 1,797)
    analysis_batch_size: int = 128


FULL = Budget()
# A few seconds: a narrow model, a handful of steps, one probe epoch, 6 images per class and split.
SMOKE = Budget(embed_dim=32, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2, batch_size=20, epochs=1,
               warmup_epochs=0, probe_epochs=1, probe_batch_size=20, probe_warmup_epochs=0, per_class=6,
               analysis_batch_size=10)


# --------------------------------------------------------------------------------------------------------------
# Data: the digits as an ImageFolder, written once
# --------------------------------------------------------------------------------------------------------------


def export_digits(root: Path, input_size: int, per_class: int | None = None) -> dict[str, Any]:
    """Write `root/{train,val}/<digit>/<index>.png` (RGB, input_size px) from `util.cls_data.DigitsDemo`'s fixed
    split, the first `per_class` images of each class per split when given. Reuses a folder written with the same
    settings (`root/digits.json`); returns its description (images per class and split)."""
    from util.cls_data import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, SPLITS, DigitsDemo

    info_path = root / "digits.json"
    settings = {"input_size": input_size, "per_class": per_class, "split_seed": DIGITS_SPLIT_SEED,
                "val_fraction": DIGITS_VAL_FRACTION}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            return info
    if root.exists():
        shutil.rmtree(root)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        digits = DigitsDemo(split, input_size)
        counts[split] = {}
        for i, label in enumerate(digits.targets.tolist()):
            name = str(label)
            if per_class is not None and counts[split].get(name, 0) >= per_class:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            digits.image(i).save(folder / f"{i:04d}.png")
            counts[split][name] = counts[split].get(name, 0) + 1
    info = {"settings": settings, "source": "sklearn.datasets.load_digits via util.cls_data.DigitsDemo",
            "images_per_class": counts, "images": {s: sum(c.values()) for s, c in counts.items()}}
    info_path.write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------------------------------------------
# Command lines of the project's scripts
# --------------------------------------------------------------------------------------------------------------


def pretrain_argv(variant: str, seed: int, budget: Budget, data: Path, output_dir: Path,
                  generator: Path | None = None) -> list[str]:
    """main_pretrain.py flags of one pre-training run."""
    v = VARIANTS[variant]
    decoder_depth = budget.mae_decoder_depth if v.model.startswith("mae") else budget.deepmim_decoder_depth
    argv = [
        "--model", v.model, "--data_path", str(data), "--output_dir", str(output_dir), "--log_dir", "",
        "--input_size", str(budget.input_size), "--patch_size", str(budget.patch_size),
        "--embed_dim", str(budget.embed_dim), "--depth", str(budget.depth), "--num_heads", str(budget.num_heads),
        "--decoder_embed_dim", str(budget.decoder_embed_dim), "--decoder_depth", str(decoder_depth),
        "--decoder_num_heads", str(budget.decoder_num_heads), "--norm_pix_loss",
        "--batch_size", str(budget.batch_size), "--epochs", str(budget.epochs),
        "--warmup_epochs", str(budget.warmup_epochs), "--blr", str(budget.blr), "--seed", str(seed),
        "--num_workers", "0", "--device", "cpu", "--print_freq", "20", "--save_freq", str(budget.epochs),
        "--vis_freq", "0", *v.flags,
    ]
    if v.uses_generator:
        if generator is None:
            raise ValueError(f"variant {variant} needs the MAE checkpoint of seed {seed} as generator")
        argv += ["--hybrid_generator", str(generator)]
    return argv


def probe_argv(checkpoint: Path, block: int, seed: int, budget: Budget, data: Path, output_dir: Path) -> list[str]:
    """main_linprobe.py flags: probe block `block` of a frozen pre-trained encoder."""
    return [
        "--finetune", str(checkpoint), "--probe_block", str(block), "--data_path", str(data), "--nb_classes", "10",
        "--output_dir", str(output_dir), "--log_dir", "", "--epochs", str(budget.probe_epochs),
        "--batch_size", str(budget.probe_batch_size), "--lr", str(budget.probe_lr),
        "--warmup_epochs", str(budget.probe_warmup_epochs), "--seed", str(seed), "--num_workers", "0",
        "--device", "cpu", "--print_freq", "1000", "--save_freq", str(budget.probe_epochs),
    ]


def tool_argv(checkpoints: Mapping[str, Path], budget: Budget, data: Path, output_dir: Path,
              num_images: int) -> list[str]:
    """Flags shared by tools/eval_recon_loss.py, cka.py and head_diversity.py: every val image, mask seed 0."""
    return [
        "--ckpt", *[str(p) for p in checkpoints.values()], "--names", *checkpoints, "--data_path", str(data),
        "--num_images", str(num_images), "--batch_size", str(budget.analysis_batch_size), "--num_workers", "0",
        "--seed", "0", "--device", "cpu", "--output_dir", str(output_dir),
    ]


# --------------------------------------------------------------------------------------------------------------
# Tasks: each calls one script's main in-process (in a worker process with --jobs > 1)
# --------------------------------------------------------------------------------------------------------------


def run_pretrain(argv: list[str]) -> dict[str, Any]:
    """main_pretrain.py with `argv`; returns the last epoch's training losses, the timings and the checkpoint."""
    import main_pretrain

    start, cpu = time.time(), time.process_time()
    args = main_pretrain.parse_args(argv)
    result = main_pretrain.main(args)
    return {"train_stats": dict(result.stats), "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu,
            "checkpoint": str(Path(args.output_dir) / "checkpoint-last.pth")}


def run_probe(argv: list[str]) -> dict[str, Any]:
    """main_linprobe.py with `argv`; returns the last epoch's validation stats (acc1, acc5, loss, n, best_acc1)."""
    import main_linprobe

    start, cpu = time.time(), time.process_time()
    parser = argparse.ArgumentParser("linear probe", parents=[main_linprobe.get_args_parser()])
    args = parser.parse_args(argv)
    stats = main_linprobe.main(args)
    # The probe's checkpoints are copies of the frozen encoder plus a 1,290-parameter head: drop them (its log.txt
    # and args.json stay), or 72 probes would fill a gigabyte.
    for path in Path(args.output_dir).glob("checkpoint-*.pth"):
        path.unlink()
    return {"stats": {k: float(v) for k, v in stats.items()}, "seconds": time.time() - start,
            "cpu_seconds": time.process_time() - cpu}


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"study_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, argv: list[str]) -> dict[str, Any]:
    """tools/<name>.py's main with `argv`; returns everything it returns (also written to its JSON files)."""
    start, cpu = time.time(), time.process_time()
    tool = load_tool(name)
    data = tool.main(tool.get_args_parser().parse_args(argv))
    return {"data": data, "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu}


class Task(NamedTuple):
    fn: Callable[..., dict[str, Any]]
    args: tuple
    output_dir: Path  # where the task writes; its study_result.json lets --reuse skip it


def execute(task: Task, reuse: bool) -> dict[str, Any]:
    """Run a task, or with `reuse` return the result a previous identical task (same arguments) left behind."""
    record = task.output_dir / "study_result.json"
    key = json.loads(json.dumps([task.fn.__name__, task.args], default=str))
    if reuse and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("task") == key:
            return {**saved["result"], "reused": True}
    result = task.fn(*task.args)
    task.output_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"task": key, "result": result}, default=float))
    return result


class InlineExecutor(Executor):
    """Runs each submitted call at once in this process (--jobs 1: simplest to debug, used by the test)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - re-raised by future.result()
            future.set_exception(err)
        return future


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


MAX_DEFAULT_JOBS = 8


def default_threads(jobs: int, smoke: bool) -> int:
    """Torch threads per run: cores / jobs; 1 for the smoke study, whose tiny operations only lose from threads
    (on a loaded 2-core machine two OpenMP threads per tiny op made it several times slower)."""
    return 1 if smoke else max(1, (os.cpu_count() or 1) // jobs)


def make_executor(jobs: int, threads: int) -> Executor:
    """--jobs 1: every run in this process (the caller sets the threads); else a pool of spawned processes."""
    if jobs == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(threads,))


class Scheduler:
    """Submit tasks with a callback; `run` waits for each to finish and calls its callback, which may submit more."""

    def __init__(self, executor: Executor, reuse: bool):
        self.executor, self.reuse = executor, reuse
        self.pending: dict[Future, Callable[[dict[str, Any]], None]] = {}

    def submit(self, task: Task, on_done: Callable[[dict[str, Any]], None]) -> None:
        self.pending[self.executor.submit(execute, task, self.reuse)] = on_done

    def run(self) -> None:
        while self.pending:
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for future in done:
                self.pending.pop(future)(future.result())


# --------------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------------


class Study:
    """Schedules every run of one study and collects its raw numbers in `self.runs[variant][seed]`."""

    def __init__(self, output_dir: Path, budget: Budget, seeds: Sequence[int], scheduler: Scheduler,
                 data: Path, num_val: int):
        self.out, self.budget, self.seeds, self.sched, self.data = output_dir, budget, list(seeds), scheduler, data
        self.num_val = num_val
        self.runs: dict[str, dict[int, dict[str, Any]]] = {v: {s: {"probe": {}} for s in seeds} for v in VARIANTS}

    def start(self) -> None:
        # MAE first: every DeepMIM+ run waits for the MAE of its seed.
        for variant in ("mae", "deepmim", "deepmim_shared"):
            for seed in self.seeds:
                self.submit_pretrain(variant, seed)

    def submit_pretrain(self, variant: str, seed: int, generator: Path | None = None) -> None:
        out = self.out / "runs" / variant / f"seed{seed}"
        argv = pretrain_argv(variant, seed, self.budget, self.data, out, generator)
        self.sched.submit(Task(run_pretrain, (argv,), out), lambda r: self.pretrained(variant, seed, r))

    def pretrained(self, variant: str, seed: int, result: dict[str, Any]) -> None:
        logger.info("pre-trained %s seed %d in %.0f s", variant, seed, result["seconds"])
        self.runs[variant][seed]["pretrain"] = result
        checkpoint = Path(result["checkpoint"])
        if variant == "mae":
            self.submit_pretrain("deepmim_hybrid", seed, generator=checkpoint)
        for block in range(1, self.budget.depth + 1):
            out = self.out / "probes" / variant / f"seed{seed}" / f"block{block}"
            argv = probe_argv(checkpoint, block, seed, self.budget, self.data, out)
            self.sched.submit(Task(run_probe, (argv,), out), lambda r, b=block: self.probed(variant, seed, b, r))
        if all("pretrain" in self.runs[v][seed] for v in VARIANTS):
            self.submit_analysis(seed)

    def probed(self, variant: str, seed: int, block: int, result: dict[str, Any]) -> None:
        logger.info("probe %s seed %d block %d: top-1 %.2f %%", variant, seed, block, result["stats"]["acc1"])
        self.runs[variant][seed]["probe"][block] = result

    def submit_analysis(self, seed: int) -> None:
        checkpoints = {v: Path(self.runs[v][seed]["pretrain"]["checkpoint"]) for v in VARIANTS}
        for tool in ("eval_recon_loss", "cka", "head_diversity"):
            out = self.out / "analysis" / f"seed{seed}" / tool
            argv = tool_argv(checkpoints, self.budget, self.data, out, self.num_val)
            self.sched.submit(Task(run_tool, (tool, argv), out), lambda r, t=tool: self.analysed(seed, t, r))

    def analysed(self, seed: int, tool: str, result: dict[str, Any]) -> None:
        data = result["data"]
        for variant in VARIANTS:
            run = self.runs[variant][seed]
            if tool == "eval_recon_loss":
                row = next(r for r in data["checkpoints"] if r["name"] == variant)
                run["recon_loss"] = {int(b): v for b, v in row["loss"].items()}
                run["recon_loss_last"] = row["last_block_loss"]
            elif tool == "cka":
                run["cka_with_last"] = data["cka_with_last_block"][variant]
            else:
                run["head_similarity"] = data["checkpoints"][variant]["mean"]
            run.setdefault("analysis_seconds", {})[tool] = result["seconds"]


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


# --------------------------------------------------------------------------------------------------------------
# Machine, command line, main
# --------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DeepMIM small-scale study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, type=str, help="data, runs, figures, study.json, table.md")
    parser.add_argument("--seeds", default=None, type=int, nargs="+",
                        help="pre-training and probe seeds, each a full repeat (default: 0 1 2; 0 with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: narrow model, a handful of steps, one probe epoch, 6 images per class and split")
    parser.add_argument("--jobs", default=None, type=int,
                        help="runs in parallel, each in its own process (default: the cores, at most 8; 1 with "
                             "--smoke); 1: every run in this process")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch threads per run (default: cores / jobs; 1 with --smoke)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip runs whose folder holds the result of the identical command (resume a study)")
    parser.add_argument("--docs_dir", default=None, type=str,
                        help="also copy study.json and the PNGs to DOCS/small_scale_study.json and DOCS/figures/")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag before any compute."""
    if args.seeds is None:
        args.seeds = [0] if args.smoke else [0, 1, 2]
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def publish(output_dir: Path, docs_dir: Path, figures: Mapping[str, Path]) -> None:
    (docs_dir / "figures").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output_dir / "study.json", docs_dir / "small_scale_study.json")
    for path in figures.values():
        shutil.copyfile(path, docs_dir / "figures" / path.name)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole study; returns what study.json holds."""
    check_args(args)
    start, started_at = time.time(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = os.getloadavg()
    budget = SMOKE if args.smoke else FULL
    output_dir = Path(args.output_dir)
    data_dir = output_dir / "data"
    data = export_digits(data_dir, budget.input_size, budget.per_class)
    jobs = args.jobs or (1 if args.smoke else min(os.cpu_count() or 1, MAX_DEFAULT_JOBS))
    threads = args.threads or default_threads(jobs, args.smoke)
    executor = make_executor(jobs, threads)
    study = Study(output_dir, budget, args.seeds, Scheduler(executor, args.reuse), data_dir, data["images"]["val"])
    torch_threads = torch.get_num_threads()
    if jobs == 1:
        torch.set_num_threads(threads)
    try:
        study.start()
        study.sched.run()
    finally:
        executor.shutdown(cancel_futures=True)
        torch.set_num_threads(torch_threads)
    summary = summarize(study.runs, budget.depth)
    result = {
        "command": "python benchmarks/small_scale_study.py " + " ".join(sys.argv[1:]) if __name__ == "__main__"
        else None,
        "started": started_at, "seconds": time.time() - start, "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "machine": machine_info(), "jobs": jobs, "threads": threads,
        "seeds": args.seeds, "smoke": args.smoke, "budget": dataclasses.asdict(budget),
        "variants": {k: v._asdict() for k, v in VARIANTS.items()}, "data": data, **summary,
        "runs": {v: {str(s): run for s, run in by_seed.items()} for v, by_seed in study.runs.items()},
    }
    (output_dir / "study.json").write_text(json.dumps(result, indent=1, default=float))
    figures = plot_figures(summary, output_dir / "figures", len(args.seeds))
    (output_dir / "table.md").write_text(markdown_tables(summary, budget.depth))
    if args.docs_dir:
        publish(output_dir, Path(args.docs_dir), figures)
    result["figures"] = {k: str(p) for k, p in figures.items()}
    return result


if __name__ == "__main__":
    cli = get_args_parser()
    cli_args = cli.parse_args()
    from util.misc import setup_logging

    setup_logging()
    try:
        check_args(cli_args)
    except ValueError as err:
        cli.error(str(err))
    report = main(cli_args)
    logging.getLogger().handlers.clear()
    print(Path(cli_args.output_dir, "table.md").read_text())
    print(f"study finished in {report['seconds']:.0f} s; figures in {Path(cli_args.output_dir) / 'figures'}")
