"""GPU readiness check (issues "GPU readiness" and 23): one command, about 7 minutes on one lent GPU with 16 cores,
every result in one JSON.

    bash benchmarks/gpu_check.sh                                   # the whole check, with a time limit (420 s)
    python benchmarks/gpu_check.py --output gpu_check.json         # the same, without the shell wrapper
    python benchmarks/gpu_check.py --device cpu --tiny             # dry run of every section's code path on a CPU
                                                                   # (= gpu_check.sh --dry-run; in the test suite)

Sections, in order (each runs even when an earlier one failed; a failure is reported, never raised):

  machine        GPU name, compute capability, this torch build's arch list, torch's CUDA and the driver's
                 versions, util/amp.py's decisions
  seeding        reading samples through util.datasets.RobustSeededDataset in the main process leaves the CUDA
                 (and CPU) RNG state unchanged
  precision      bf16 and fp16 autocast against fp32 (TF32 off) on the same ViT-B batch: relative error of the loss
                 and of the whole gradient
  cpu_parity     one step's loss at fp32 (`--amp none`, TF32 off) on the GPU and on the CPU: same weights, same
                 batch, same masking noise; relative difference <= 1e-4 (also after one AdamW update)
  ddp_train      `torchrun --nproc_per_node 1 main_pretrain.py` on a generated ImageFolder of JPEGs (crops of
                 scikit-image's photographs): the process group is really initialised (NCCL on CUDA); bf16 and
                 fp16 (the GradScaler's scale and skipped updates logged); losses finite, the last epoch's lowest
  ddp_2rank      two ranks on the one GPU (`--dist_backend gloo`), `--accum_iter 2`: one gradient all-reduce per
                 update (counted by a DDP communication hook), both ranks' weights identical
  targets        HOG and CLIP targets (a random-weight ViT-B/16 CLIP teacher) through main_pretrain: the start-up
                 memory estimate runs on the run's own targets and is logged
  finetune_linprobe  a few main_finetune.py and main_linprobe.py steps from a pre-training checkpoint
  memory         peak reserved memory of ViT-B DeepMIM training steps at batch 128 with and without --grad_ckpt,
                 under a 16 GB cap (`torch.cuda.set_per_process_memory_fraction`), and with a CLIP target (teacher
                 counted), against util/memory.py's estimate and advice
  sync_debug     `python benchmarks/sync_check.py`: no host sync between logging steps (bf16, pixel and HOG) and
                 the host syncs per fp16 step counted (GradScaler)
  loader         the training loader's img/s on ImageNet-sized JPEGs (default worker count) against the step's
  throughput     img/s and model FLOP utilisation (analysis/flops.py) of ViT-B DeepMIM and MAE against the GPU's
                 spec-sheet dense bf16 peak and a measured matmul peak (benchmarks/bench_pretrain.py's step)
  sigterm_resume `python main_pretrain.py`, SIGTERM to its process group mid-epoch -> a mid-epoch checkpoint and a
                 clean exit -> `--resume auto` continues to the last epoch
  segmentation   `torchrun --nproc_per_node 1 main_segmentation.py`: ViT-B UperNet at 512 (SyncBatchNorm, DDP), a
                 few updates and one evaluation, then `--eval` of the last checkpoint (mIoU in eval_<time>.json)
  detection      the same for main_detection.py: ViT-B Mask R-CNN at 1024 (windowed attention), box and mask AP
  compile        the one torch.compile: `--compile --grad_ckpt` under torchrun (inductor; eager in the dry run)

Sections that need CUDA run their code path on a CPU and report "skipped: no CUDA". A section that would not fit in
what is left of `--time_budget` is "skipped: time budget". The summary (JSON) is rewritten after every section, so
a run stopped by the outer time limit still leaves the finished sections; on SIGTERM the check kills the commands it
started (their process groups) and exits with status 124.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check_common import Context, kill_children, run_section  # noqa: E402
from gpu_checks_cluster import (  # noqa: E402
    section_compile,
    section_ddp_2rank,
    section_finetune_linprobe,
    section_targets,
)
from gpu_checks_hardware import section_machine, section_memory, section_throughput  # noqa: E402
from gpu_checks_numerics import section_loader, section_precision  # noqa: E402
from gpu_checks_training import (  # noqa: E402
    section_cpu_parity,
    section_ddp_train,
    section_seeding,
    section_sigterm_resume,
    section_sync_debug,
)
from gpu_checks_transfer import section_detection, section_segmentation  # noqa: E402

from util import amp as amp_util  # noqa: E402


def sizes_for(tiny: bool, cuda: bool) -> dict[str, Any]:
    """Problem sizes: the real check on a GPU, or `--tiny` for a quick CPU dry run."""
    small_model = ["--model", "deepmim_vit_small_patch16", "--input_size", "32", "--patch_size", "4",
                   "--embed_dim", "128", "--depth", "6", "--num_heads", "4", "--decoder_embed_dim", "96",
                   "--decoder_depth", "2", "--decoder_num_heads", "4"]
    tiny_arch = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=4)
    tiny_model = ["--model", "deepmim_vit_small_patch16", *[x for k, v in tiny_arch.items() for x in
                                                            (f"--{'input_size' if k == 'img_size' else k}", str(v))]]
    if tiny:
        return dict(images=16, train_flags=tiny_model, train_batch=4, train_epochs=3, workers=0, sig_batch=2,
                    sig_epochs=2, parity_model=tiny_arch, parity_batch=2, mem_model="deepmim_vit_small_patch16",
                    mem_input=32, mem_batch=8, bench_models=["deepmim_vit_small_patch16"], bench_input=32,
                    bench_batch=2, bench_steps=1, bench_warmup=1, peak_sizes=[256], rank2_batch=2,
                    target_flags=[*tiny_model, "--batch_size", "4"], clip_teacher=("test_vit", dict(
                        num_classes=24, img_size=64)), cls_model=tiny_arch, cls_batch=4,
                    precision_model="deepmim_vit_small_patch16", precision_kwargs=tiny_arch, precision_batch=2,
                    loader_images=8, loader_image_size=(64, 48), loader_batch=4, loader_passes=1, loader_steps=1)
    return dict(images=128, train_flags=small_model, train_batch=16, train_epochs=3, workers=2, sig_batch=2,
                sig_epochs=3, parity_model=dict(img_size=224), parity_batch=4, mem_model="deepmim_vit_base_patch16",
                mem_input=224, mem_batch=128, bench_models=["deepmim_vit_base_patch16", "mae_vit_base_patch16"],
                bench_input=224, bench_batch=128, bench_steps=10, bench_warmup=3, peak_sizes=[8192], rank2_batch=16,
                target_flags=["--model", "deepmim_vit_base_patch16", "--batch_size", "32", "--norm_pix_loss"],
                clip_teacher=("vit_base_patch16_clip_quickgelu_224", dict(num_classes=512)),
                cls_model=dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=96,
                               decoder_depth=2, decoder_num_heads=4), cls_batch=16,
                precision_model="deepmim_vit_base_patch16", precision_kwargs=dict(img_size=224), precision_batch=16,
                loader_images=512, loader_image_size=(500, 375), loader_batch=128, loader_passes=2, loader_steps=5)


# name, function, seconds it needs at least (on a GPU: the one compile comes last, so that it never crowds out the
# other sections; whatever does not fit in the budget is reported as skipped)
SECTIONS: tuple[tuple[str, Callable[[Context], dict[str, Any]], float], ...] = (
    ("machine", section_machine, 1),
    ("seeding", section_seeding, 5),
    ("precision", section_precision, 10),
    ("cpu_parity", section_cpu_parity, 20),
    ("ddp_train", section_ddp_train, 40),
    ("ddp_2rank", section_ddp_2rank, 30),
    ("targets", section_targets, 30),
    ("finetune_linprobe", section_finetune_linprobe, 25),
    ("memory", section_memory, 40),
    ("sync_debug", section_sync_debug, 25),
    ("loader", section_loader, 20),
    ("throughput", section_throughput, 25),
    ("sigterm_resume", section_sigterm_resume, 40),
    ("segmentation", section_segmentation, 45),
    ("detection", section_detection, 60),
    ("compile", section_compile, 100),
)


class TimeLimit(BaseException):
    """SIGTERM from gpu_check.sh's time limit: passes through a section's error handling."""


def on_sigterm(signum: int, frame: Any) -> None:
    kill_children()  # no training run or loader worker outlives the check holding the GPU
    raise TimeLimit()


# ------------------------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------------------------


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header(ctx: Context) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git": git_sha(),
        "device": str(ctx.device), "gpu": torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "driver": amp_util.nvidia_driver_version(),
        "python": sys.version.split()[0],
        "tiny": ctx.args.tiny, "time_budget_s": ctx.args.time_budget,
    }


def _runs(r: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> str:
    return "; ".join(f"{k}: {text(run)}" for k, run in r.get("runs", {}).items())


def _memory(r: dict[str, Any]) -> str:
    parts = [f"{k}: {'%.1f GiB' % v['peak_reserved_gib'] if v['fits'] else 'OOM'}"
             + (f" (est/meas {v['estimate_over_measured']:.2f})" if "estimate_over_measured" in v else "")
             for k, v in r.get("runs", {}).items()]
    parts += [f"estimate ckpt={k}: {v['total_gib']:.1f} GiB" for k, v in r.get("estimate", {}).items()]
    if "estimate_clip" in r:
        parts.append(f"estimate clip: {r['estimate_clip']['total_gib']:.1f} GiB")
    return "; ".join(parts)


def _precision(r: dict[str, Any]) -> str:
    return "; ".join(f"{amp}: loss {r[amp]['rel_err_loss']:.1e}, grad {r[amp]['rel_err_grad']:.1e}"
                     for amp in ("bf16", "fp16") if amp in r)


def _throughput(r: dict[str, Any]) -> str:
    return "; ".join(f"{row['model'].split('_vit')[0]}{' compiled' if row['compile'] else ''}: "
                     f"{row['images_per_s']:.0f} img/s, MFU {100 * row['mfu_measured']:.0f} % of measured"
                     + (f", {100 * row['mfu_spec']:.0f} % of spec" if row["mfu_spec"] else "")
                     for row in r.get("rows", []))


def _losses(run: dict[str, Any]) -> str:
    scale = f", scale {run['loss_scale']:g}, skipped {run['skipped_updates']}" if "loss_scale" in run else ""
    return f"{[round(v, 3) for v in run.get('epoch_losses', [])]}{scale}"


# A short text of each section's main numbers for the printed table (the JSON has them all).
KEY_NUMBERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "machine": lambda r: (f"{r['gpu']} cc {r['capability']}, default amp {r['default_amp']}, torch CUDA {r['cuda']}, "
                          f"driver {r['driver']}, arch {','.join(r['arch_list'])}") if "gpu" in r else "",
    "precision": _precision,
    "cpu_parity": lambda r: (f"rel diff {r['rel_diff_loss']:.1e} (after update {r['rel_diff_loss_after_update']:.1e})"
                             if "rel_diff_loss" in r else ""),
    "ddp_train": lambda r: _runs(r, _losses),
    "ddp_2rank": lambda r: (f"all-reduces {[x['allreduces'] for x in r.get('ranks', [])]} for {r.get('updates')} "
                            f"updates, losses {[round(v, 3) for v in r.get('epoch_losses', [])]}"),
    "targets": lambda r: _runs(r, lambda run: f"loss {run['loss']:.3f}, estimate logged {run['estimate_logged']}"),
    "finetune_linprobe": lambda r: _runs(r, lambda run: f"top-1 {run['acc1']:.1f} %"),
    "memory": _memory,
    "sync_debug": lambda r: "; ".join(r.get("summary", [])),
    "loader": lambda r: (f"loader {r['loader_images_per_s']:.0f} img/s with {r['workers']} workers, step "
                         f"{r['step_images_per_s']:.0f} img/s (x{r['loader_over_step']:.2f})"
                         if "loader_images_per_s" in r else ""),
    "throughput": _throughput,
    "sigterm_resume": lambda r: (f"stop at epoch {r['checkpoint_epoch']} iter {r['checkpoint_iter']}, resumed to "
                                 f"epoch {r.get('final_epoch')}" if "checkpoint_iter" in r else ""),
    "segmentation": lambda r: f"{r['amp']}: mIoU {r['eval']['mIoU']:.1f} after {r['train'].get('updates')} updates",
    "detection": lambda r: (f"{r['amp']}: AP box {r['eval']['bbox']['AP']:.1f}, mask {r['eval']['segm']['AP']:.1f} "
                            f"after {r['train'].get('updates')} updates"),
    "compile": lambda r: _losses(r.get("run", {})),
}


def key_numbers(name: str, r: dict[str, Any]) -> str:
    try:
        return KEY_NUMBERS[name](r) if name in KEY_NUMBERS else ""
    except (KeyError, TypeError, ValueError):  # a failed section may lack numbers
        return ""


def print_table(summary: dict[str, Any]) -> None:
    print(f"\nGPU readiness: {summary['gpu'] or summary['device']}, torch {summary['torch']}, CUDA {summary['cuda']}")
    print("| section | status | s | numbers |\n|---|---|---|---|")
    for name, r in summary["sections"].items():
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        print(f"| {name} | {status[:160]} | {r['seconds']} | {key_numbers(name, r)[:300]} |")
    overall = f"STOPPED ({summary['interrupted']})" if "interrupted" in summary else \
        "PASSED" if summary["passed"] else "FAILED"
    print(f"\noverall: {overall} (failed: {summary['failed'] or 'none'})")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("GPU readiness check", add_help=False)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a quick dry run of every section")
    parser.add_argument("--output", default="gpu_check.json", help="the JSON summary")
    parser.add_argument("--time_budget", default=540.0, type=float,
                        help="seconds for all sections; a section that would not fit is skipped")
    parser.add_argument("--sections", default=None, nargs="+", choices=[s[0] for s in SECTIONS],
                        help="run only these sections")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, device, work, time.monotonic() + args.time_budget, sizes_for(args.tiny, device.type == "cuda"))
    if ctx.cuda:
        amp_util.configure_backends(device)
    else:
        torch.set_num_threads(1)  # tiny CPU work: one thread is fastest on a shared machine (see subprocess_env)
    summary = {**header(ctx), "sections": {}, "passed": False, "failed": []}
    print(f"torch {summary['torch']} cuda {summary['cuda']} driver {summary['driver']} torchvision "
          f"{torchvision.__version__} timm {timm.__version__} python {summary['python']}", flush=True)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for name, fn, needs in SECTIONS:
            if args.sections and name not in args.sections:
                continue
            summary["sections"][name] = run_section(name, fn, ctx, needs)
            summary["failed"] = [n for n, r in summary["sections"].items() if r["status"] == "failed"]
            summary["passed"] = not summary["failed"]
            write_summary(Path(args.output), summary)
    except TimeLimit:
        summary.update(passed=False, interrupted=f"time limit during {name}")
        write_summary(Path(args.output), summary)
        print(f"gpu_check: stopped by the time limit during {name}; the commands it started are killed")
    finally:
        kill_children()
    print_table(summary)
    print(f"summary: {Path(args.output).resolve()}")
    return summary


if __name__ == "__main__":
    cli = argparse.ArgumentParser("GPU readiness check", parents=[get_args_parser()]).parse_args()
    result = main(cli)
    sys.exit(124 if "interrupted" in result else 0 if result["passed"] else 1)
