"""GPU readiness check (issue "GPU readiness"): one command, under 10 minutes on a lent GPU, every result in one JSON.

    bash benchmarks/gpu_check.sh                                   # the whole check, with a time limit
    python benchmarks/gpu_check.py --output gpu_check.json         # the same, without the shell wrapper
    python benchmarks/gpu_check.py --device cpu --tiny             # dry run of every section's code path on a CPU

Sections (each runs even when an earlier one failed; a failure is reported, never raised):

  machine        GPU name, compute capability, this torch build's arch list, util/amp.py's decisions
  seeding        reading samples through util.datasets.RobustSeededDataset in the main process leaves the CUDA
                 (and CPU) RNG state unchanged
  ddp_train      `torchrun --nproc_per_node 1 main_pretrain.py` on a generated ImageFolder of JPEGs (crops of
                 scikit-image's photographs): the process group is really initialised (NCCL on CUDA); bf16 and
                 fp16; every logged loss finite, the last epoch's below the first's; and a `--compile` run
  cpu_parity     one step's loss at fp32 (`--amp none`, TF32 off) on the GPU and on the CPU: same weights, same
                 batch, same masking noise; relative difference <= 1e-4 (also after one AdamW update)
  sigterm_resume `python main_pretrain.py`, SIGTERM to its process group mid-epoch -> a mid-epoch checkpoint and a
                 clean exit -> `--resume auto` continues to the last epoch
  memory         peak reserved memory of ViT-B DeepMIM training steps at batch 128 with and without --grad_ckpt,
                 and under a 16 GB cap (`torch.cuda.set_per_process_memory_fraction`), against util/memory.py's
                 estimate and advice
  throughput     img/s and model FLOP utilisation (analysis/flops.py) of ViT-B DeepMIM and MAE against the GPU's
                 spec-sheet dense bf16 peak and a measured matmul peak, without and with torch.compile
                 (benchmarks/bench_pretrain.py's step)
  sync_debug     `python benchmarks/sync_check.py` (steps under torch.cuda.set_sync_debug_mode("error"))

Sections that need CUDA run their code path on a CPU and report "skipped: no CUDA". A section that would not fit in
what is left of `--time_budget` is "skipped: time budget". The summary (JSON) is rewritten after every section, so
a run killed by the outer time limit still leaves the finished sections.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check_common import Context, run_section  # noqa: E402
from gpu_checks_hardware import section_machine, section_memory, section_throughput  # noqa: E402
from gpu_checks_training import (  # noqa: E402
    section_cpu_parity,
    section_ddp_train,
    section_seeding,
    section_sigterm_resume,
    section_sync_debug,
)

from util import amp as amp_util  # noqa: E402


def sizes_for(tiny: bool, cuda: bool) -> dict[str, Any]:
    """Problem sizes: the real check on a GPU, or `--tiny` for a quick CPU dry run."""
    small_model = ["--model", "deepmim_vit_small_patch16", "--input_size", "32", "--patch_size", "4",
                   "--embed_dim", "128", "--depth", "6", "--num_heads", "4", "--decoder_embed_dim", "96",
                   "--decoder_depth", "2", "--decoder_num_heads", "4"]
    tiny_model = ["--model", "deepmim_vit_small_patch16", "--input_size", "32", "--patch_size", "8",
                  "--embed_dim", "64", "--depth", "4", "--num_heads", "4", "--decoder_embed_dim", "32",
                  "--decoder_depth", "1", "--decoder_num_heads", "4"]
    if tiny:
        return dict(images=16, train_flags=tiny_model, train_batch=4, train_epochs=3, workers=0, sig_batch=2,
                    sig_epochs=2, parity_model=dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                                                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
                    parity_batch=2, mem_model="deepmim_vit_small_patch16", mem_input=32, mem_batch=8,
                    bench_models=["deepmim_vit_small_patch16"], bench_input=32, bench_batch=2, bench_steps=1,
                    bench_warmup=1, peak_sizes=[256], compile=False)
    return dict(images=128, train_flags=small_model, train_batch=16, train_epochs=5, workers=2, sig_batch=2,
                sig_epochs=3, parity_model=dict(img_size=224), parity_batch=4, mem_model="deepmim_vit_base_patch16",
                mem_input=224, mem_batch=128, bench_models=["deepmim_vit_base_patch16", "mae_vit_base_patch16"],
                bench_input=224, bench_batch=128, bench_steps=10, bench_warmup=3, peak_sizes=[8192], compile=cuda)


# name, function, seconds it needs at least
SECTIONS: tuple[tuple[str, Callable[[Context], dict[str, Any]], float], ...] = (
    ("machine", section_machine, 1),
    ("seeding", section_seeding, 5),
    ("cpu_parity", section_cpu_parity, 20),
    ("ddp_train", section_ddp_train, 60),
    ("sigterm_resume", section_sigterm_resume, 45),
    ("memory", section_memory, 45),
    ("sync_debug", section_sync_debug, 30),
    ("throughput", section_throughput, 40),
)


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
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "tiny": ctx.args.tiny, "time_budget_s": ctx.args.time_budget,
    }


def key_numbers(name: str, r: dict[str, Any]) -> str:
    """A short text of a section's main numbers for the printed table."""
    if name == "machine" and "gpu" in r:
        return f"{r['gpu']} cc {r['capability']}, default amp {r['default_amp']}, arch {','.join(r['arch_list'])}"
    if name == "ddp_train":
        return "; ".join(f"{k}: {[round(v, 3) for v in run.get('epoch_losses', [])]}"
                         for k, run in r.get("runs", {}).items())
    if name == "cpu_parity" and "rel_diff_loss" in r:
        return f"rel diff {r['rel_diff_loss']:.1e} (after update {r['rel_diff_loss_after_update']:.1e})"
    if name == "sigterm_resume" and "checkpoint_iter" in r:
        return (f"stop at epoch {r['checkpoint_epoch']} iter {r['checkpoint_iter']}, "
                f"resumed to epoch {r.get('final_epoch')}")
    if name == "memory":
        runs = r.get("runs", {})
        parts = [f"{k}: {'%.1f GiB' % v['peak_reserved_gib'] if v['fits'] else 'OOM'}" for k, v in runs.items()]
        est = r.get("estimate", {})
        parts += [f"estimate ckpt={k}: {v['total_gib']:.1f} GiB" for k, v in est.items()]
        return "; ".join(parts)
    if name == "throughput":
        return "; ".join(f"{row['model'].split('_vit')[0]}{' compiled' if row['compile'] else ''}: "
                         f"{row['images_per_s']:.0f} img/s, MFU {100 * row['mfu_measured']:.0f} % of measured"
                         + (f", {100 * row['mfu_spec']:.0f} % of spec" if row["mfu_spec"] else "")
                         for row in r.get("rows", []))
    if name == "sync_debug":
        return "; ".join(r.get("summary", []))
    return ""


def print_table(summary: dict[str, Any]) -> None:
    print(f"\nGPU readiness: {summary['gpu'] or summary['device']}, torch {summary['torch']}, CUDA {summary['cuda']}")
    print("| section | status | s | numbers |\n|---|---|---|---|")
    for name, r in summary["sections"].items():
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        print(f"| {name} | {status[:160]} | {r['seconds']} | {key_numbers(name, r)[:300]} |")
    print(f"\noverall: {'PASSED' if summary['passed'] else 'FAILED'} (failed: {summary['failed'] or 'none'})")


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
    for name, fn, needs in SECTIONS:
        if args.sections and name not in args.sections:
            continue
        summary["sections"][name] = run_section(name, fn, ctx, needs)
        summary["failed"] = [n for n, r in summary["sections"].items() if r["status"] == "failed"]
        summary["passed"] = not summary["failed"]
        write_summary(Path(args.output), summary)
    print_table(summary)
    print(f"summary: {Path(args.output).resolve()}")
    return summary


if __name__ == "__main__":
    cli = argparse.ArgumentParser("GPU readiness check", parents=[get_args_parser()]).parse_args()
    sys.exit(0 if main(cli)["passed"] else 1)
