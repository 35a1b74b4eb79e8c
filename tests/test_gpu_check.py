"""benchmarks/gpu_check.py: the CPU dry run exercises every section, and the runner reports instead of raising."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_common  # noqa: E402
import gpu_checks_hardware  # noqa: E402


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125), ("NVIDIA L40S", 362),
    ("Tesla V100-SXM2-16GB", 125), ("Tesla V100-PCIE-32GB", 112), ("NVIDIA GH200 480GB", 989),
])
def test_spec_peaks_match_device_names(name, tflops):
    peak, source = gpu_checks_hardware.spec_peak(name)
    assert peak == tflops * 1e12 and "datasheet" in source


def test_unknown_gpu_has_no_spec_peak():
    peak, reason = gpu_checks_hardware.spec_peak("Some Future GPU")
    assert peak is None and "no spec-sheet peak" in reason


def make_context(budget: float = 60.0) -> gpu_check_common.Context:
    args = argparse.Namespace(tiny=True, time_budget=budget)
    return gpu_check_common.Context(args, torch.device("cpu"), ROOT, time.monotonic() + budget, {})


def test_a_failing_section_is_reported_not_raised():
    def broken(ctx):
        raise RuntimeError("boom")

    result = gpu_check_common.run_section("broken", broken, make_context(), needs_s=0)
    assert result["status"] == "failed" and "RuntimeError: boom" in result["reason"] and "traceback" in result


def test_skips_keep_their_numbers_and_the_time_budget_is_honoured():
    def needs_cuda(ctx):
        raise gpu_check_common.skip("no CUDA", measured=1.5)

    result = gpu_check_common.run_section("cuda_only", needs_cuda, make_context(), needs_s=0)
    assert result["status"] == "skipped" and result["reason"] == "no CUDA" and result["measured"] == 1.5
    late = gpu_check_common.run_section("late", needs_cuda, make_context(budget=5), needs_s=30)
    assert late["status"] == "skipped" and late["reason"].startswith("time budget")


SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_dry_run_of_the_shell_script_exercises_every_section(tmp_path):
    """`gpu_check.sh --dry-run`: the whole check with --device cpu --tiny, as a GPU would run it: one command, one
    JSON summary, every section's plumbing."""
    summary_path = tmp_path / "summary.json"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # this interpreter is `python`, as in a venv
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUTPUT": str(summary_path), "PATH": path}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    sections = summary["sections"]
    assert list(sections) == [name for name, _, _ in gpu_check.SECTIONS]
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu" and "driver" in summary
    assert f"torch {torch.__version__} cuda {torch.version.cuda} driver" in proc.stdout  # the versions it ran with
    assert "| section | status |" in proc.stdout and proc.returncode == (0 if summary["passed"] else 1)
    for name in ("machine", "seeding", "cpu_parity", "memory", "throughput", "sync_debug"):
        assert sections[name]["status"] == "skipped" and "no CUDA" in sections[name]["reason"], sections[name]
    for name in ("precision", "ddp_train", "ddp_2rank", "targets", "finetune_linprobe", "loader", "sigterm_resume",
                 "compile"):
        assert sections[name]["status"] == "passed", (name, sections[name])
    assert sections["seeding"]["cpu_rng_unchanged"] and sections["cpu_parity"]["rel_diff_loss"] == 0.0
    assert 0 < sections["precision"]["bf16"]["rel_err_loss"] < 1e-2
    assert sections["memory"]["estimate"]["True"]["total_gib"] < sections["memory"]["estimate"]["False"]["total_gib"]
    assert sections["memory"]["estimate_clip"]["frozen_gib"] > 0  # the CLIP teacher counted
    assert sections["throughput"]["rows"][0]["images_per_s"] > 0 and not sections["throughput"]["rows"][0]["compile"]
    # torchrun with one rank: a real process group (gloo here, NCCL on a GPU), losses finite and falling
    run = sections["ddp_train"]["runs"]["none"]
    assert run["rc"] == 0 and len(run["epoch_losses"]) == 3
    assert all(math.isfinite(v) for v in run["epoch_losses"]) and run["epoch_losses"][-1] < run["epoch_losses"][0]
    two = sections["ddp_2rank"]  # two ranks, --accum_iter 2: one all-reduce per update on each rank
    assert [r["allreduces"] for r in two["ranks"]] == [two["updates"]] * 2 and two["updates"] == 4
    assert set(sections["targets"]["runs"]) == {"hog", "clip"} and sections["loader"]["loader_images_per_s"] > 0
    assert sections["compile"]["backend"] == "eager" and len(sections["compile"]["run"]["epoch_losses"]) == 3


def test_the_time_limit_leaves_no_process_behind_and_python3_is_enough(tmp_path):
    """At LIMIT the check and the torchrun it started are stopped (no orphan would keep a GPU), the finished
    sections stay in the JSON, the exit status says so; a machine with `python3` and no `python` runs it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    work, summary_path = tmp_path / "work", tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUTPUT": str(summary_path), "LIMIT": "12",
           "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    sections = ["ddp_2rank", "sigterm_resume"]  # torchrun and its 2 workers, then main_pretrain runs: > 12 s
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--workdir", str(work), "--time_budget", "300",
                           "--sections", *sections], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hit the 12 s limit" in proc.stdout and f"torch {torch.__version__}" in proc.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["interrupted"].startswith("time limit during") and not summary["passed"]
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(work) in cmdline.read_text(errors="replace"):
                left.append(cmdline.parent.name)
        except OSError:  # a process that ended meanwhile
            pass
    assert not left, f"processes left behind: {left}"
