#!/usr/bin/env python
"""The paper's findings at small scale on real images, end to end (issues 8 and 17).

Task (`--task`, default gray_crops; docs/small_scale_study.md says why): which of ten of scikit-image's sample
images (7 photographs, 3 textures, converted to gray) a random 32x32 crop (5-30 % of the image's area, random aspect
and flip) comes from, 96 crops per image and split (`study_setup.CROP_SOURCES`; photo_crops: eight colour
photographs); or scikit-learn's 1,797 handwritten digits upsampled to 32x32 (`util.cls_data.DigitsDemo`'s split).
Either is written once as an ImageFolder (`<output_dir>/data/{train,val}/<class>/*.png`), so pre-training,
fine-tuning and the analysis tools all read files through their own pipelines.

Per seed, four tiny ViTs (32 px, patch 4, 6 blocks of width 128, 4 heads with --preset cpu) are pre-trained with
`main_pretrain.py` with the same budget, data, seed and `--norm_pix_loss` (MAE's recipe):

    mae             MAE baseline, one decoder on the last block
    deepmim         DeepMIM, independent decoders on blocks depth*{1/2, 2/3, 5/6, 1} = 3 4 5 6
    deepmim_shared  DeepMIM with one decoder shared by those blocks (paper Tab. 10)
    deepmim_hybrid  DeepMIM+ (the paper's dagger): the same seed's MAE checkpoint as --hybrid_generator,
                    default alphas 0 1/3 2/3 1 (paper Eq. 1, Tab. 9 config 4)

and measured with the project's own code: fine-tuning top-1 (`main_finetune.py`, one fixed budget for every variant:
the paper's metric, Tabs. 7, 8, 10), a converged logistic-regression probe and a k-NN classifier of every block's
frozen features (`analysis.probes`, Figs. 5-7), the last decoder's validation reconstruction loss with fixed masks
(`tools/eval_recon_loss.py`, Fig. 3), CKA of every block with the last (`tools/cka.py`, Fig. 4) and attention-head
similarity per layer (`tools/head_diversity.py`, Fig. 6). A random initialisation of the same encoder (fine-tuned
from scratch, probed frozen) and the raw pixels are the references. Every claim is a paired per-seed difference
with a 95 % t-interval over seeds.

    python benchmarks/small_scale_study.py --output_dir study_out --docs_dir docs     # --preset cpu: <= 30 min
    python benchmarks/small_scale_study.py --output_dir study_gpu --preset gpu         # one GPU, ~10x the updates
    python benchmarks/small_scale_study.py --output_dir /tmp/smoke --preset smoke     # the test's seconds version

Writes `<output_dir>/study.json` (every number, the machine, the load, the timings), `<output_dir>/figures/*.png`
(with the plotted numbers as JSON beside each) and `<output_dir>/table.md`; `--docs_dir` also copies the JSON and the
PNGs to `<docs_dir>/small_scale_study.json` and `<docs_dir>/figures/`. Every run keeps its own folder (`runs/`,
`finetune/`, `frozen_probes/`, `analysis/`) with the scripts' usual logs, the pre-training checkpoints and
`study_result.json`, which `--reuse` uses to resume an interrupted study.

The budgets (`study_setup.PRESETS`) were fixed from measured step times and from pilots on the demo checkpoint
(`benchmarks/study_pilot.py`), before any study model existed; none was tuned to make a claim hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # study_setup, study_runs, study_report

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from study_report import markdown_tables, plot_figures, summarize  # noqa: E402
from study_runs import MAX_DEFAULT_JOBS, Scheduler, Study, default_threads, make_executor  # noqa: E402
from study_setup import PRESETS, TASKS, VARIANTS, budget_for, export_task  # noqa: E402

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
    parser.add_argument("--preset", default="cpu", choices=tuple(PRESETS),
                        help="budget: cpu (<= 30 min of an idle 2-core CPU), gpu (one GPU, ~10x the updates, a wider "
                             "ViT), smoke (seconds: the test's)")
    parser.add_argument("--task", default=None, choices=TASKS, help="default: the preset's (gray_crops)")
    parser.add_argument("--seeds", default=None, type=int, nargs="+",
                        help="pre-training and fine-tuning seeds, each a full repeat (default: 0 1 2 3 4; 0 with "
                             "--preset smoke)")
    parser.add_argument("--jobs", default=None, type=int,
                        help="runs in parallel, each in its own process (default: the cores, at most 8; 1 with "
                             "--preset smoke); 1: every run in this process")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch threads per run (default: cores / jobs; 1 with --preset smoke)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip runs whose folder holds the result of the identical command (resume a study)")
    parser.add_argument("--docs_dir", default=None, type=str,
                        help="also copy study.json and the PNGs to DOCS/small_scale_study.json and DOCS/figures/")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag before any compute."""
    if args.seeds is None:
        args.seeds = [0] if args.preset == "smoke" else [0, 1, 2, 3, 4]
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
    budget = budget_for(args.preset, args.task)
    output_dir = Path(args.output_dir)
    data_dir = output_dir / "data"
    data = export_task(data_dir, budget)
    smoke = args.preset == "smoke"
    jobs = args.jobs or (1 if smoke else min(os.cpu_count() or 1, MAX_DEFAULT_JOBS))
    threads = args.threads or default_threads(jobs, smoke)
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
    summary = summarize(study.runs, budget.depth, study.raw_pixels)
    result = {
        "command": "python benchmarks/small_scale_study.py " + " ".join(sys.argv[1:]) if __name__ == "__main__"
        else None,
        "started": started_at, "seconds": time.time() - start, "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "machine": machine_info(), "jobs": jobs, "threads": threads,
        "seeds": args.seeds, "preset": args.preset, "smoke": smoke, "budget": dataclasses.asdict(budget),
        "variants": {k: v._asdict() for k, v in VARIANTS.items()}, "data": data, **summary,
        "runs": {v: {str(s): run for s, run in by_seed.items()} for v, by_seed in study.runs.items()},
        "raw_pixel_probe": study.raw_pixels,
        "analysis_time": {str(seed): tools for seed, tools in study.analysis_time.items()},
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
