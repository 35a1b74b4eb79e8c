"""The small-scale study's runs (benchmarks/small_scale_study.py): the command lines of the project's scripts, the
tasks that call their mains (in this process or in a pool of worker processes, resumable with --reuse), and `Study`,
which schedules every pre-training, probe and analysis of one study and collects their raw numbers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import torch
from study_setup import VARIANTS, Budget

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("small_scale_study")


# --------------------------------------------------------------------------------------------------------------
# Command lines of the project's scripts
# --------------------------------------------------------------------------------------------------------------


def pretrain_argv(variant: str, seed: int, budget: Budget, data: Path, output_dir: Path,
                  generator: Path | None = None) -> list[str]:
    """main_pretrain.py flags of one pre-training run."""
    v = VARIANTS[variant]
    decoder_depth = budget.mae_decoder_depth if v.model.startswith("mae") else budget.deepmim_decoder_depth
    argv = [
        "--model", v.model, "--data_path", str(data), "--output_dir", str(output_dir), "--log_dir", "", "--overwrite",
        "--input_size", str(budget.input_size), "--patch_size", str(budget.patch_size),
        "--embed_dim", str(budget.embed_dim), "--depth", str(budget.depth), "--num_heads", str(budget.num_heads),
        "--decoder_embed_dim", str(budget.decoder_embed_dim), "--decoder_depth", str(decoder_depth),
        "--decoder_num_heads", str(budget.decoder_num_heads), "--norm_pix_loss",
        "--batch_size", str(budget.batch_size), "--epochs", str(budget.epochs),
        "--warmup_epochs", str(budget.warmup_epochs), "--blr", str(budget.blr), "--seed", str(seed),
        "--num_workers", "0", "--device", budget.device, "--print_freq", "20", "--save_freq", str(budget.epochs),
        "--vis_freq", "0", *v.flags,
    ]
    if v.uses_generator:
        if generator is None:
            raise ValueError(f"variant {variant} needs the MAE checkpoint of seed {seed} as generator")
        argv += ["--hybrid_generator", str(generator)]
    return argv


def finetune_argv(checkpoint: Path | None, seed: int, budget: Budget, data: Path, output_dir: Path) -> list[str]:
    """main_finetune.py flags: the study's fixed budget (`Budget.finetune_*`, main_finetune.py --demo's: no
    augmentation, MAE's other defaults), from `checkpoint`'s encoder or, with None, from a random initialisation of
    the same architecture."""
    argv = [
        "--data_path", str(data), "--output_dir", str(output_dir), "--log_dir", "", "--overwrite",
        "--epochs", str(budget.finetune_epochs), "--batch_size", str(budget.finetune_batch_size),
        "--blr", str(budget.finetune_blr), "--warmup_epochs", str(budget.finetune_warmup_epochs), "--no_aug",
        "--seed", str(seed), "--num_workers", "0", "--device", budget.device, "--print_freq", "1000",
        "--save_freq", str(budget.finetune_epochs),
    ]
    if checkpoint is not None:
        return ["--finetune", str(checkpoint), *argv]
    return ["--model", "vit_small_patch16", "--input_size", str(budget.input_size), "--patch_size",
            str(budget.patch_size), "--embed_dim", str(budget.embed_dim), "--depth", str(budget.depth),
            "--num_heads", str(budget.num_heads), *argv]


def tool_argv(checkpoints: Mapping[str, Path], budget: Budget, data: Path, output_dir: Path,
              num_images: int) -> list[str]:
    """Flags shared by tools/eval_recon_loss.py, cka.py and head_diversity.py: every val image, mask seed 0."""
    return [
        "--ckpt", *[str(p) for p in checkpoints.values()], "--names", *checkpoints, "--data_path", str(data),
        "--num_images", str(num_images), "--batch_size", str(budget.analysis_batch_size), "--num_workers", "0",
        "--seed", "0", "--device", budget.device, "--output_dir", str(output_dir),
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


def run_finetune(argv: list[str]) -> dict[str, Any]:
    """main_finetune.py with `argv`; returns the last epoch's validation stats (acc1, acc5, loss, n, best_acc1). The
    fine-tuned checkpoints are dropped (its log.txt and args.json stay): nothing reads them."""
    import main_finetune

    start, cpu = time.time(), time.process_time()
    parser = argparse.ArgumentParser("fine-tuning", parents=[main_finetune.get_args_parser()])
    args = parser.parse_args(argv)
    stats = main_finetune.main(args)
    for path in Path(args.output_dir).glob("checkpoint-*.pth"):
        path.unlink()
    return {"stats": {k: float(v) for k, v in stats.items()}, "seconds": time.time() - start,
            "cpu_seconds": time.process_time() - cpu}


def _feature_batches(data: Path, split: str, input_size: int, batch_size: int):
    from torch.utils.data import DataLoader

    from util.cls_data import build_image_folder, eval_transform

    return DataLoader(build_image_folder(data, split, eval_transform(input_size)), batch_size=batch_size)


def raw_pixel_features(data: Path, split: str, input_size: int, batch_size: int):
    """Every image of data/split flattened (the evaluation view, ImageNet-normalised): ([(N, 3*H*W)], labels)."""
    feats, labels = [], []
    for imgs, targets in _feature_batches(data, split, input_size, batch_size):
        feats.append(imgs.flatten(1))
        labels.append(targets)
    return [torch.cat(feats).numpy()], torch.cat(labels).numpy()


def run_frozen_probes(checkpoint: str | None, seed: int, data: str, input_size: int, batch_size: int,
                      device: str, random_init_of: str | None = None) -> dict[str, Any]:
    """Converged logistic-regression probe and k-NN (analysis.probes) of every block of a frozen encoder: the
    pre-trained `checkpoint`, or with `random_init_of` the architecture of that checkpoint freshly initialised with
    torch seed `seed`; with neither, the raw pixels (one "block"). Returns {"blocks": [...], "seconds", ...}."""
    from analysis.loading import load_model, read_checkpoint
    from analysis.probes import block_features, probe_blocks
    from models_deepmim import model_from_config

    start, cpu = time.time(), time.process_time()
    data_path = Path(data)
    if checkpoint is None and random_init_of is None:
        train = raw_pixel_features(data_path, "train", input_size, batch_size)
        val = raw_pixel_features(data_path, "val", input_size, batch_size)
    else:
        if random_init_of is not None:
            torch.manual_seed(seed)
            model = model_from_config(read_checkpoint(random_init_of)["model_cfg"]).to(device).eval()
        else:
            model = load_model(checkpoint, device=device)[0]
        train = block_features(model, _feature_batches(data_path, "train", input_size, batch_size), device)
        val = block_features(model, _feature_batches(data_path, "val", input_size, batch_size), device)
    blocks = probe_blocks(train, val, seed=seed)
    return {"blocks": blocks, "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu}


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


RANDOM_INIT = "random_init"  # reference: the study's architecture, not pre-trained (fine-tuned from scratch)


class Study:
    """Schedules every run of one study and collects its raw numbers in `self.runs[variant][seed]` (the variants of
    VARIANTS and RANDOM_INIT), `self.raw_pixels` (the probes of the images themselves) and the analysis tools' times
    in `self.analysis_time[seed][tool]`."""

    def __init__(self, output_dir: Path, budget: Budget, seeds: Sequence[int], scheduler: Scheduler,
                 data: Path, num_val: int):
        self.out, self.budget, self.seeds, self.sched, self.data = output_dir, budget, list(seeds), scheduler, data
        self.num_val = num_val
        self.runs: dict[str, dict[int, dict[str, Any]]] = {v: {s: {} for s in seeds} for v in (*VARIANTS, RANDOM_INIT)}
        self.raw_pixels: dict[str, Any] = {}
        self.analysis_time: dict[int, dict[str, dict[str, float]]] = {}  # seed -> tool -> seconds, cpu_seconds

    def start(self) -> None:
        # MAE first: every DeepMIM+ run waits for the MAE of its seed.
        for variant in ("mae", "deepmim", "deepmim_shared"):
            for seed in self.seeds:
                self.submit_pretrain(variant, seed)
        for seed in self.seeds:
            self.submit_finetune(RANDOM_INIT, seed, None)
        self.submit_probes("raw_pixels", self.seeds[0], None, lambda r: setattr(self, "raw_pixels", r))

    def probe_args(self, checkpoint: Path | None, seed: int, random_init_of: Path | None = None) -> tuple:
        b = self.budget
        return (None if checkpoint is None else str(checkpoint), seed, str(self.data), b.input_size,
                b.analysis_batch_size, b.device, None if random_init_of is None else str(random_init_of))

    def submit_probes(self, name: str, seed: int, checkpoint: Path | None, on_done,
                      random_init_of: Path | None = None) -> None:
        out = self.out / "frozen_probes" / name / f"seed{seed}"
        self.sched.submit(Task(run_frozen_probes, self.probe_args(checkpoint, seed, random_init_of), out), on_done)

    def submit_pretrain(self, variant: str, seed: int, generator: Path | None = None) -> None:
        out = self.out / "runs" / variant / f"seed{seed}"
        argv = pretrain_argv(variant, seed, self.budget, self.data, out, generator)
        self.sched.submit(Task(run_pretrain, (argv,), out), lambda r: self.pretrained(variant, seed, r))

    def submit_finetune(self, variant: str, seed: int, checkpoint: Path | None) -> None:
        out = self.out / "finetune" / variant / f"seed{seed}"
        argv = finetune_argv(checkpoint, seed, self.budget, self.data, out)
        self.sched.submit(Task(run_finetune, (argv,), out), lambda r: self.record(variant, seed, "finetune", r))

    def record(self, variant: str, seed: int, key: str, result: dict[str, Any]) -> None:
        if key == "finetune":
            logger.info("fine-tuned %s seed %d: top-1 %.2f %%", variant, seed, result["stats"]["acc1"])
        self.runs[variant][seed][key] = result

    def pretrained(self, variant: str, seed: int, result: dict[str, Any]) -> None:
        logger.info("pre-trained %s seed %d in %.0f s", variant, seed, result["seconds"])
        self.runs[variant][seed]["pretrain"] = result
        checkpoint = Path(result["checkpoint"])
        if variant == "mae":
            self.submit_pretrain("deepmim_hybrid", seed, generator=checkpoint)
            self.submit_probes(RANDOM_INIT, seed, None, lambda r: self.record(RANDOM_INIT, seed, "frozen_probes", r),
                               random_init_of=checkpoint)
        self.submit_finetune(variant, seed, checkpoint)
        self.submit_probes(variant, seed, checkpoint, lambda r: self.record(variant, seed, "frozen_probes", r))
        if all("pretrain" in self.runs[v][seed] for v in VARIANTS):
            self.submit_analysis(seed)

    def submit_analysis(self, seed: int) -> None:
        checkpoints = {v: Path(self.runs[v][seed]["pretrain"]["checkpoint"]) for v in VARIANTS}
        for tool in ("eval_recon_loss", "cka", "head_diversity"):
            out = self.out / "analysis" / f"seed{seed}" / tool
            images = min(self.num_val, self.budget.analysis_images or self.num_val)
            argv = tool_argv(checkpoints, self.budget, self.data, out, images)
            self.sched.submit(Task(run_tool, (tool, argv), out), lambda r, t=tool: self.analysed(seed, t, r))

    def analysed(self, seed: int, tool: str, result: dict[str, Any]) -> None:
        # One run of each tool measures every variant of the seed: its time is the seed's, not each variant's.
        self.analysis_time.setdefault(seed, {})[tool] = {k: result[k] for k in ("seconds", "cpu_seconds")}
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
