"""benchmarks/gpu_check.py's sections on the transfer scripts (issues 25, 26): a few updates of UperNet on ADE20K's
layout (main_segmentation.py) and of Mask R-CNN on COCO's layout (main_detection.py) under `torchrun
--nproc_per_node 1` (a real process group: SyncBatchNorm and DDP as on 8 GPUs), one evaluation in the run, then
`--eval` of the last checkpoint (mIoU / box and mask AP written where the issue says).

On a GPU the real ViT-B models run at the released sizes (UperNet at 512, Mask R-CNN at 1024, 2 images per GPU) in
bf16 (fp16 on GPUs without native bf16) on the scripts' own demo data (texture mosaics, coins), random-initialised:
the numbers say nothing about accuracy, only that the path runs on the device. The dry run (`--tiny`) runs the demo
models on the CPU, in this process (the scripts' torchrun paths are in their own tests).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from gpu_check_common import ROOT, Context, check, run_command
from gpu_checks_cluster import in_process

from util import amp as amp_util
from util.cli import script_parser
from util.config import parse_with_config

# The demo models with the fewest updates that still evaluate once in the run and leave checkpoint-<iters>.pth.
TINY_SEGMENTATION = ["--demo", "--iters", "2", "--eval_interval", "2", "--warmup_iters", "1", "--batch_size", "4"]
TINY_DETECTION = ["--demo", "--input_size", "64", "--patch_size", "8", "--embed_dim", "32", "--window_size", "4",
                  "--fpn_channels", "16", "--box_fc_dim", "32", "--iters", "2", "--eval_interval", "2",
                  "--warmup_iters", "1", "--lr_drops", "1", "--batch_size", "2"]
# ViT-B at the released sizes, a few updates (the demo data is upscaled by the task's pipeline).
GPU_SEGMENTATION = ["--num_classes", "4", "--iters", "6", "--eval_interval", "6", "--warmup_iters", "2",
                    "--batch_size", "2"]
GPU_DETECTION = ["--iters", "6", "--eval_interval", "6", "--warmup_iters", "2", "--lr_drops", "4", "--batch_size", "2"]


def launch(ctx: Context, script: str, argv: list[str], timeout: float) -> tuple[int, str]:
    """(exit code, output tail) of `script argv`: on a GPU under torchrun with one rank (a real process group, as on a
    cluster); in the dry run in this process."""
    if not ctx.cuda:
        module = importlib.import_module(Path(script).stem)
        in_process(lambda: module.main(parse_with_config(script_parser(None, [module.get_args_parser()]), argv)))
        return 0, ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / script), *argv]
    return run_command(cmd, timeout)


def last_eval(output_dir: Path) -> dict[str, Any]:
    """The last evaluation line of a run's log.txt (JSON lines), or {}."""
    log = output_dir / "log.txt"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return lines[-1] if lines else {}


def eval_record(output_dir: Path) -> dict[str, Any]:
    """The `eval_<time>.json` an --eval wrote, or {}."""
    records = sorted(output_dir.glob("eval_*.json"))
    return json.loads(records[-1].read_text()) if records else {}


def run_task(ctx: Context, script: str, data: Path, flags: list[str], metric: str) -> dict[str, Any]:
    """Train `flags`, then --eval the run's last checkpoint; the evaluation's `metric` must be a finite number."""
    out, evaluated = ctx.work / f"{Path(script).stem}_run", ctx.work / f"{Path(script).stem}_eval"
    amp = amp_util.default_amp(str(ctx.device)) if ctx.cuda else "none"
    common = ["--data_path", str(data), "--device", ctx.device.type, "--amp", amp, "--num_workers", "0",
              "--print_freq", "1"]
    rc, output = launch(ctx, script, [*flags, *common, "--output_dir", str(out)], min(300.0, ctx.remaining() - 30))
    result: dict[str, Any] = {"amp": amp, "rc": rc, "train": last_eval(out)}
    check(rc == 0, result, f"{script}: exit code {rc}: {output.strip()[-400:]}")
    checkpoints = sorted(out.glob("checkpoint-[0-9]*.pth"), key=lambda p: int(p.stem.split("-")[1]))
    check(bool(checkpoints), result, f"{script}: no checkpoint-<updates>.pth in {out}")
    if rc != 0 or not checkpoints:
        result["output_tail"] = output[-2000:]
        return result
    rc, output = launch(ctx, script, ["--eval", "--resume", str(checkpoints[-1]), *common, "--output_dir",
                                      str(evaluated)], min(240.0, ctx.remaining() - 5))
    result.update(eval_rc=rc, eval=eval_record(evaluated))
    check(rc == 0, result, f"{script} --eval: exit code {rc}: {output.strip()[-400:]}")
    value = result["eval"].get(metric)
    value = value.get("AP") if isinstance(value, dict) else value
    check(isinstance(value, (int, float)) and math.isfinite(value), result, f"{script} --eval: {metric} is {value}")
    return result


def section_segmentation(ctx: Context) -> dict[str, Any]:
    """UperNet (main_segmentation.py): a few updates with an evaluation, then --eval (mIoU in eval_<time>.json)."""
    from segmentation.demo import write_demo_dataset

    data = ctx.work / "seg_data"
    if not data.exists():
        write_demo_dataset(data, n_train=16, n_val=2)
    return run_task(ctx, "main_segmentation.py", data, GPU_SEGMENTATION if ctx.cuda else TINY_SEGMENTATION, "mIoU")


def section_detection(ctx: Context) -> dict[str, Any]:
    """Mask R-CNN (main_detection.py): a few updates with an evaluation, then --eval (box and mask AP)."""
    from detection.demo import write_demo_dataset

    data = ctx.work / "det_data"
    if not data.exists():
        write_demo_dataset(data)
    result = run_task(ctx, "main_detection.py", data, GPU_DETECTION if ctx.cuda else TINY_DETECTION, "bbox")
    segm = result.get("eval", {}).get("segm", {}).get("AP")
    if "eval" in result:
        check(isinstance(segm, (int, float)) and math.isfinite(segm), result, f"--eval: mask AP is {segm}")
    return result
