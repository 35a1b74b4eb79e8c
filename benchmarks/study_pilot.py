#!/usr/bin/env python
"""Choices the small-scale study makes before any of its models exists (docs/small_scale_study.md, "How the budget
was chosen"), each reproducible by one command:

    python benchmarks/study_pilot.py --output_dir /tmp/pilot task       # which task separates pre-training
    python benchmarks/study_pilot.py --output_dir /tmp/pilot finetune   # the fine-tuning epochs, demo checkpoint

task: for each task (colour photo crops, grayscale crops, digits), one MAE pre-trained with the preset's budget
(seed 0) against the same architecture at random initialisation and against raw pixels, with the converged
logistic-regression probe and the k-NN of every block, and both fine-tuned with the preset's budget. A task is
useful if pre-training separates clearly from random initialisation there.

finetune: main_finetune.py with the study's fixed recipe from the project's demo checkpoint (`main_pretrain.py
--demo`, which is not a study model) on the chosen task, for each epoch count given, to pick the shortest budget
that is not far from the longest one.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from study_runs import finetune_argv, pretrain_argv, run_finetune, run_frozen_probes, run_pretrain  # noqa: E402
from study_setup import PRESETS, TASKS, budget_for, export_task  # noqa: E402

from util.cls_run import DEMO_PRETRAIN_CHECKPOINT  # noqa: E402


def pilot_task(out: Path, preset: str, tasks: list[str]) -> dict:
    results = {}
    for task in tasks:
        budget = budget_for(preset, task)
        data = out / "data" / task
        export_task(data, budget)
        ckpt = run_pretrain(pretrain_argv("mae", 0, budget, data, out / "mae" / task))["checkpoint"]
        common = (0, str(data), budget.input_size, budget.analysis_batch_size, budget.device)
        rows = {"MAE": run_frozen_probes(ckpt, *common), "random init": run_frozen_probes(None, *common,
                                                                                          random_init_of=ckpt),
                "raw pixels": run_frozen_probes(None, *common)}
        results[task] = {name: [{"logreg": b["logreg"]["acc1"], "knn": b["knn_acc1"], "C": b["logreg"]["C"]}
                                for b in r["blocks"]] for name, r in rows.items()}
        for name, blocks in results[task].items():
            print(task, name, " ".join(f"{b['logreg']:.1f}/{b['knn']:.1f}" for b in blocks), flush=True)
        for name, source in (("MAE", Path(ckpt)), ("random init", None)):
            run = run_finetune(finetune_argv(source, 0, budget, data, out / "finetune" / task / name))
            results[task][f"finetune {name}"] = run["stats"]["acc1"]
            print(task, "fine-tuning", name, f"{run['stats']['acc1']:.2f}", flush=True)
    return results


def pilot_finetune(out: Path, preset: str, task: str, epochs: list[int]) -> dict:
    budget = budget_for(preset, task)
    data = out / "data" / task
    export_task(data, budget)
    results = {}
    for e in epochs:
        run = run_finetune(finetune_argv(Path(DEMO_PRETRAIN_CHECKPOINT), 0, dataclasses.replace(
            budget, finetune_epochs=e), data, out / "finetune" / f"epochs{e}"))
        results[e] = {"acc1": run["stats"]["acc1"], "cpu_seconds": run["cpu_seconds"]}
        print(f"{task}: {e} epochs -> top-1 {run['stats']['acc1']:.2f} % ({run['cpu_seconds']:.0f} CPU-s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("task", "finetune"))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", default="cpu", choices=tuple(PRESETS))
    parser.add_argument("--task", default=PRESETS["cpu"].task, choices=TASKS, help="finetune: the task")
    parser.add_argument("--tasks", default=list(TASKS), choices=TASKS, nargs="+", help="task: the tasks compared")
    parser.add_argument("--epochs", default=[1, 2, 3, 5, 7], type=int, nargs="+", help="finetune: epoch counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    result = pilot_task(out, args.preset, args.tasks) if args.what == "task" else \
        pilot_finetune(out, args.preset, args.task, args.epochs)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pilot_{args.what}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
