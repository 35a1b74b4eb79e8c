"""benchmarks/gpu_check.py: the CPU dry run exercises every section, and the runner reports instead of raising."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

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


def test_cpu_dry_run_exercises_every_section(tmp_path):
    """The whole check with --device cpu --tiny, as a GPU would run it: one command, one JSON summary."""
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--output", str(summary_path), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert summary_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    sections = summary["sections"]
    assert list(sections) == [name for name, _, _ in gpu_check.SECTIONS]
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu"
    assert "| section | status |" in proc.stdout and proc.returncode == (0 if summary["passed"] else 1)
    for name in ("machine", "seeding", "cpu_parity", "memory", "throughput"):
        assert sections[name]["status"] == "skipped" and "no CUDA" in sections[name]["reason"], sections[name]
    assert sections["seeding"]["cpu_rng_unchanged"] and sections["cpu_parity"]["rel_diff_loss"] == 0.0
    assert sections["memory"]["estimate"]["True"]["total_gib"] < sections["memory"]["estimate"]["False"]["total_gib"]
    assert sections["throughput"]["rows"][0]["images_per_s"] > 0
    assert sections["sigterm_resume"]["status"] == "passed", sections["sigterm_resume"]
    assert sections["sync_debug"]["status"] != "failed", sections["sync_debug"]
    # torchrun with one rank: a real process group (gloo here, NCCL on a GPU), losses finite and falling
    run = sections["ddp_train"]["runs"]["none"]
    assert run["rc"] == 0 and len(run["epoch_losses"]) == 3
    assert all(math.isfinite(v) for v in run["epoch_losses"]) and run["epoch_losses"][-1] < run["epoch_losses"][0]
    assert run["problems"] == [], run["problems"]
