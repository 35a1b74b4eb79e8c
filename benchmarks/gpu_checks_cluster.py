"""benchmarks/gpu_check.py's sections on the cluster paths (issue 23): two ranks with gradient accumulation (the
all-reduces counted), HOG and CLIP targets through main_pretrain (whose start-up memory estimate crashed on them),
a few fine-tuning and linear-probing steps, and the one `--compile` run (with `--grad_ckpt`)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import ROOT, Context, check, epoch_losses, pretrain_flags, run_command, write_image_folder

import models_deepmim

# main_pretrain under torchrun, every DDP model counting its gradient all-reduce rounds with a communication hook;
# each rank writes its count, its GPU and a checksum of its final weights.
COUNTING_DRIVER = """
import json, os, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
sys.path.insert(0, {root!r})
import main_pretrain, util.training as training

rounds = []

class CountingDDP(training.DistributedDataParallel):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        def hook(state, bucket):
            if bucket.index() == 0:
                rounds.append(1)
            return default_hooks.allreduce_hook(state, bucket)
        self.register_comm_hook(None, hook)

training.DistributedDataParallel = CountingDDP
args = main_pretrain.parse_args(sys.argv[1:])
model = main_pretrain.main(args).model
device = torch.cuda.current_device() if torch.cuda.is_available() and args.device.startswith("cuda") else None
checksum = sum(float(t.double().abs().sum()) for t in model.state_dict().values())
with open(os.path.join(args.output_dir, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{"allreduces": len(rounds), "cuda_device": device, "checksum": checksum}}, f)
"""


def in_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an entry script's function here; its argparse exit becomes an error the section reports."""
    try:
        return fn(*args)
    except SystemExit as err:
        raise RuntimeError(f"exited with status {err.code}") from err


def section_ddp_2rank(ctx: Context) -> dict[str, Any]:
    """`torchrun --nproc_per_node 2` on one machine: gloo (on CUDA both ranks share GPU 0: NCCL refuses two ranks on
    one GPU), --accum_iter 2: exactly one gradient all-reduce per optimizer update on each rank, the two ranks'
    weights identical at the end."""
    out = ctx.work / "ddp_2rank"
    out.mkdir(parents=True, exist_ok=True)
    driver = out / "driver.py"
    driver.write_text(COUNTING_DRIVER.format(root=str(ROOT)))
    batch, epochs, accum = ctx.sizes["rank2_batch"], 2, 2
    amp = "bf16" if ctx.cuda else "none"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           *pretrain_flags(ctx, out, batch, epochs, "--accum_iter", str(accum), "--dist_backend", "gloo",
                           "--amp", amp)]
    rc, output = run_command(cmd, min(240.0, ctx.remaining() - 5))
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    steps = ctx.sizes["images"] // (2 * batch)  # per rank and epoch (incomplete batches dropped)
    updates = epochs * (steps // accum)
    result: dict[str, Any] = {"rc": rc, "ranks": ranks, "updates": updates, "epoch_losses": epoch_losses(out),
                              "accum_iter": accum, "backend": "gloo"}
    check(rc == 0 and len(ranks) == 2, result, f"exit code {rc}: {output.strip()[-300:]}")
    if len(ranks) == 2:
        check(all(r["allreduces"] == updates for r in ranks), result,
              f"all-reduce rounds {[r['allreduces'] for r in ranks]}, expected {updates} (one per update)")
        check(ranks[0]["checksum"] == ranks[1]["checksum"], result, "the ranks' weights differ")
        if ctx.cuda:
            check(ranks[0]["cuda_device"] == ranks[1]["cuda_device"] == 0 or torch.cuda.device_count() > 1, result,
                  f"GPUs {[r['cuda_device'] for r in ranks]}: local ranks should share GPU 0 (modulo the count)")
    if rc != 0:
        result["output_tail"] = output[-2000:]
    return result


def teacher_file(ctx: Context) -> tuple[Path, list[str]]:
    """A random-weight CLIP image tower in timm's layout and the flags that read it: ViT-B/16 (QuickGELU, 512-d
    projection) on a GPU, timm's tiny test ViT in the dry run."""
    import timm

    path = ctx.work / "clip_teacher.pth"
    name, kwargs = ctx.sizes["clip_teacher"]
    if not path.exists():
        torch.manual_seed(0)
        torch.save(timm.create_model(name, pretrained=False, **kwargs).state_dict(), path)
    return path, ["--target", "clip", "--teacher_path", str(path), "--teacher_model", name]


def section_targets(ctx: Context) -> dict[str, Any]:
    """HOG and CLIP targets through main_pretrain (one short epoch each): on CUDA the start-up memory estimate runs
    on the run's own targets (it used to crash on both) and is logged."""
    import main_pretrain

    result: dict[str, Any] = {"runs": {}}
    for name in ("hog", "clip"):
        out = ctx.work / f"target_{name}"
        extra = ["--target", "hog"] if name == "hog" else teacher_file(ctx)[1]
        flags = ["--data_path", str(ctx.image_folder()), "--output_dir", str(out), *ctx.sizes["target_flags"],
                 "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", "1",
                 "--device", ctx.device.type, *extra]
        stats = in_process(lambda: main_pretrain.main(main_pretrain.parse_args(flags)).stats)
        console = (out / "console.log").read_text()
        run = {"loss": stats.get("loss"), "estimate_logged": "memory estimate" in console,
               "estimate_failed": "memory estimate failed" in console}
        result["runs"][name] = run
        check(run["loss"] is not None and math.isfinite(run["loss"]), result, f"{name}: no finite loss")
        check(not run["estimate_failed"] and (run["estimate_logged"] or not ctx.cuda), result,
              f"{name}: the start-up memory estimate did not run")
        release(ctx)
    return result


def release(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def classification_folder(ctx: Context) -> Path:
    """train/ and val/ ImageFolders of photograph crops (2 classes)."""
    root = ctx.work / "cls"
    if not root.exists():
        write_image_folder(root / "train", ctx.sizes["images"], seed=0)
        write_image_folder(root / "val", max(4, ctx.sizes["images"] // 4), seed=1)
    return root


def section_finetune_linprobe(ctx: Context) -> dict[str, Any]:
    """A few fine-tuning (main_finetune.py) and linear-probing (main_linprobe.py) steps from a pre-training
    checkpoint of the check's small model: top-1 is a number and the runs leave checkpoints."""
    import argparse

    import main_finetune
    import main_linprobe
    from util.checkpoint import save_atomic

    torch.manual_seed(0)
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **ctx.sizes["cls_model"])
    source = ctx.work / "cls_pretrained.pth"
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 0, "args": {}}, source)
    result: dict[str, Any] = {"runs": {}}
    for module in (main_finetune, main_linprobe):
        name = module.__name__.removeprefix("main_")
        out = ctx.work / name
        argv = ["--finetune", str(source), "--data_path", str(classification_folder(ctx)), "--nb_classes", "2",
                "--epochs", "1", "--warmup_epochs", "0", "--batch_size", str(ctx.sizes["cls_batch"]),
                "--num_workers", str(ctx.sizes["workers"]), "--output_dir", str(out), "--log_dir", str(out),
                "--print_freq", "1", "--device", ctx.device.type]
        parser = argparse.ArgumentParser(name, parents=[module.get_args_parser()])
        stats = in_process(lambda: module.main(parser.parse_args(argv)))
        run = {"acc1": stats.get("acc1"), "checkpoint": (out / "checkpoint-last.pth").exists()}
        result["runs"][name] = run
        check(run["acc1"] is not None and 0 <= run["acc1"] <= 100 and run["checkpoint"], result,
              f"{name}: {run}")
        release(ctx)
    return result


def section_compile(ctx: Context) -> dict[str, Any]:
    """The check's one torch.compile: `--compile --grad_ckpt` (inductor) under torchrun with one rank, losses finite
    and falling. The dry run compiles with the eager backend in this process (the torchrun path is ddp_train's)."""
    from gpu_checks_training import ddp_run

    if ctx.cuda:
        run = ddp_run(ctx, "compile_grad_ckpt", "bf16", "--compile", "--compile_backend", "inductor", "--grad_ckpt")
        result: dict[str, Any] = {"run": run, "backend": "inductor"}
        for problem in run["problems"]:
            check(False, result, problem)
        return result
    import main_pretrain

    out = ctx.work / "compile_grad_ckpt"
    flags = pretrain_flags(ctx, out, ctx.sizes["train_batch"], ctx.sizes["train_epochs"], "--amp", "none",
                           "--compile", "--compile_backend", "eager", "--grad_ckpt")
    in_process(lambda: main_pretrain.main(main_pretrain.parse_args(flags)))
    losses = epoch_losses(out)
    result = {"run": {"epoch_losses": losses}, "backend": "eager"}
    check(len(losses) == ctx.sizes["train_epochs"] and all(map(math.isfinite, losses)) and losses[-1] < losses[0],
          result, f"losses {losses}")
    return result
