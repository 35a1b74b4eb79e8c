"""benchmarks/gpu_check.py's sections on training itself: sample seeding vs the CUDA RNG, torchrun with one rank,
fp32 parity of one step with the CPU, SIGTERM mid-epoch then `--resume auto`, and host syncs in the step
(benchmarks/sync_check.py)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from gpu_check_common import (
    CHILDREN,
    ROOT,
    Context,
    Skip,
    check,
    epoch_losses,
    pretrain_flags,
    run_command,
    skip,
    start_child,
    stop_tree,
)

import models_deepmim
from util import amp as amp_util

PARITY_RTOL = 1e-4


def section_seeding(ctx: Context) -> dict[str, Any]:
    """Reading samples in the main process (--num_workers 0) must not touch the CUDA RNG (the masking noise)."""
    from util.datasets import EpochIndex, RobustSeededDataset
    from util.fast_data import build_fast_pretrain_dataset

    dataset = RobustSeededDataset(build_fast_pretrain_dataset(str(ctx.image_folder()), 32), seed=0)
    cuda_before = torch.cuda.get_rng_state(ctx.device).clone() if ctx.cuda else None
    cpu_before = torch.get_rng_state().clone()
    first = dataset[EpochIndex(1, 3)][0]
    for index in range(4):
        dataset[index]
    again = dataset[EpochIndex(1, 3)][0]
    result: dict[str, Any] = {"samples_read": 6, "cpu_rng_unchanged": torch.equal(cpu_before, torch.get_rng_state()),
                              "same_sample_same_crop": torch.equal(first, again)}
    check(result["cpu_rng_unchanged"], result, "reading samples changed the CPU RNG")
    check(result["same_sample_same_crop"], result, "the same (epoch, index) gave another crop")
    if not ctx.cuda:
        if result.get("status") == "failed":
            return result
        raise skip("no CUDA (CPU RNG checked)", **result)
    result["cuda_rng_unchanged"] = torch.equal(cuda_before, torch.cuda.get_rng_state(ctx.device))
    check(result["cuda_rng_unchanged"], result, "reading samples changed the CUDA RNG state")
    return result


def ddp_run(ctx: Context, label: str, amp: str, *extra: str) -> dict[str, Any]:
    """One `torchrun --nproc_per_node 1 main_pretrain.py` run; its losses and whether a process group came up."""
    out = ctx.work / f"ddp_{label}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "main_pretrain.py"),
           *pretrain_flags(ctx, out, ctx.sizes["train_batch"], ctx.sizes["train_epochs"], "--amp", amp, *extra)]
    start = time.monotonic()
    rc, output = run_command(cmd, min(240.0, ctx.remaining() - 5))
    losses = epoch_losses(out)
    backend = "nccl" if ctx.cuda else "gloo"
    run = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "epoch_losses": losses,
           "process_group": f"distributed init: rank 0/1 ({backend}" in output, **scaler_log(out)}
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc}: {output.strip().splitlines()[-1] if output.strip() else ''}")
        run["output_tail"] = output[-2000:]
    if not losses or not all(math.isfinite(v) for v in losses):
        problems.append(f"losses not finite or missing: {losses}")
    elif len(losses) < 2 or not losses[-1] < losses[0]:
        problems.append(f"loss did not decrease: {losses}")
    if rc == 0 and not run["process_group"]:
        problems.append(f"no {backend} process group with WORLD_SIZE=1 (util/distributed.init_distributed returns "
                        "early for one process)")
    run["problems"] = problems
    return run


def scaler_log(output_dir) -> dict[str, Any]:
    """The fp16 GradScaler's scale and skipped updates of the last epoch in main_pretrain's log.txt ({} without)."""
    log = output_dir / "log.txt"
    lines = log.read_text().splitlines() if log.exists() else []
    last = json.loads(lines[-1]) if lines else {}
    return {key: last[f"train_{key}"] for key in ("loss_scale", "skipped_updates") if f"train_{key}" in last}


def section_ddp_train(ctx: Context) -> dict[str, Any]:
    """main_pretrain.py under torchrun with one rank: bf16 and fp16 (CUDA only; fp16 logs the GradScaler's scale and
    the updates it skipped). The --compile run is its own section (`compile`), the check's only compile."""
    result: dict[str, Any] = {"runs": {}}
    if ctx.cuda:
        for amp in ("bf16", "fp16"):
            result["runs"][amp] = ddp_run(ctx, amp, amp)
        fp16 = result["runs"]["fp16"]
        check(fp16.get("loss_scale") is not None, result, "fp16: no loss scale in log.txt")
    else:  # CPU bf16 autocast of a tiny model takes ~1 s a step (per-shape kernel set-up): the dry run uses fp32
        result["skipped_runs"] = ["bf16, fp16: no CUDA (fp32 instead)"]
        result["runs"]["none"] = ddp_run(ctx, "none", "none")
    for label, run in result["runs"].items():
        for problem in run["problems"]:
            check(False, result, f"{label}: {problem}")
    return result


def parity_losses(model: torch.nn.Module, device: torch.device, samples: torch.Tensor, noise: torch.Tensor,
                  mask_ratio: float) -> tuple[float, float, float]:
    """(loss, gradient norm, loss after one AdamW update) of one fp32 step on `device`."""
    from util.datasets import normalize_on_device
    from util.training import autocast_context

    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs, noise = normalize_on_device(samples, device), noise.to(device)
    with autocast_context(device, "none"):
        loss = model(imgs, mask_ratio, noise=noise)[0]
    loss.backward()
    loss = loss.detach()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    optimizer.step()
    with torch.no_grad(), autocast_context(device, "none"):
        after = model(imgs, mask_ratio, noise=noise)[0]
    return loss.item(), grad_norm.item(), after.item()


@contextlib.contextmanager
def ieee_fp32(device: torch.device):
    """TF32 off for the block (configure_backends turns it on for fp32 work on Ampere+), through util.amp.set_tf32,
    the switch configure_backends uses (the fp32_precision API, or allow_tf32 on torch < 2.9)."""
    if device.type != "cuda":
        yield
        return
    before = amp_util.set_tf32(False)
    try:
        yield
    finally:
        amp_util.set_tf32(before)


def section_cpu_parity(ctx: Context) -> dict[str, Any]:
    """The same fp32 step on the device and on the CPU: same weights, batch and noise."""
    torch.manual_seed(0)
    model = models_deepmim.create_model("deepmim_vit_small_patch16", norm_pix_loss=True, **ctx.sizes["parity_model"])
    size, batch = model.patch_embed.img_size[0], ctx.sizes["parity_batch"]
    generator = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    noise = torch.rand(batch, model.num_patches, generator=generator)
    with ieee_fp32(ctx.device):
        on_device = parity_losses(model, ctx.device, samples, noise, 0.75)
    on_cpu = parity_losses(model, torch.device("cpu"), samples, noise, 0.75)
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(on_device, on_cpu)]
    result: dict[str, Any] = {
        "loss_device": on_device[0], "loss_cpu": on_cpu[0], "rel_diff_loss": rel[0], "rel_diff_grad_norm": rel[1],
        "rel_diff_loss_after_update": rel[2], "rtol": PARITY_RTOL, "model": f"deepmim_vit_small {size}px",
    }
    check(rel[0] <= PARITY_RTOL, result, f"loss differs by {rel[0]:.2e} (> {PARITY_RTOL})")
    check(rel[2] <= 10 * PARITY_RTOL, result, f"loss after one update differs by {rel[2]:.2e}")
    if not ctx.cuda and result.get("status") != "failed":
        raise skip("no CUDA (CPU against itself)", **result)
    return result


def wait_for(condition: Callable[[], bool], timeout: float, proc: subprocess.Popen) -> bool:
    """Poll `condition` every 20 ms until it holds, the process exits or `timeout` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def section_sigterm_resume(ctx: Context) -> dict[str, Any]:
    """SIGTERM to the run's process group mid-epoch: a mid-epoch checkpoint, exit 0; `--resume auto` finishes."""
    from util.checkpoint import load_checkpoint

    out = ctx.work / "sigterm"
    epochs = ctx.sizes["sig_epochs"]
    flags = pretrain_flags(ctx, out, ctx.sizes["sig_batch"], epochs, "--save_every_iters", "2", "--print_freq", "1")
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), *flags]
    log = ctx.work / "sigterm_first_run.log"  # a file, not a pipe: a full pipe would stall the run while we poll
    with open(log, "w") as sink:
        proc = start_child(cmd, stdout=sink, stderr=subprocess.STDOUT)
    last = out / "checkpoint-last.pth"
    result: dict[str, Any] = {}
    try:
        saved = wait_for(last.exists, min(180.0, ctx.remaining() - 30), proc)
        result["signalled"] = saved and proc.poll() is None
        if result["signalled"]:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as SLURM does: loader workers included
        proc.wait(timeout=max(5.0, min(120.0, ctx.remaining() - 20)))
    except subprocess.TimeoutExpired:
        stop_tree([proc.pid])
        proc.wait()
    finally:
        CHILDREN.discard(proc.pid)
    output = log.read_text(errors="replace")
    result.update(rc=proc.returncode, stopped_cleanly="stopped cleanly" in output)
    state = load_checkpoint(last) if last.exists() else {}
    result.update(checkpoint_epoch=state.get("epoch"), checkpoint_iter=state.get("iter"))
    check(result["signalled"], result, "the run ended before a mid-epoch checkpoint existed")
    check(proc.returncode == 0 and result["stopped_cleanly"], result,
          f"no clean stop (exit code {proc.returncode}): {output.strip()[-300:]}")
    check(bool(state) and state.get("iter", 0) > 0, result, "the stop checkpoint is not mid-epoch")
    rc, resumed = run_command([*cmd, "--resume", "auto"], min(240.0, ctx.remaining() - 5))
    final = load_checkpoint(last) if last.exists() else {}
    losses = epoch_losses(out)
    result.update(resume_rc=rc, resumed="resumed from" in resumed, final_epoch=final.get("epoch"),
                  final_iter=final.get("iter"), epoch_losses=losses)
    check(rc == 0 and result["resumed"], result, f"--resume auto failed (exit code {rc}): {resumed.strip()[-300:]}")
    check(final.get("epoch") == epochs - 1 and final.get("iter") == 0, result,
          f"the resumed run did not finish epoch {epochs - 1}")
    check(bool(losses) and all(math.isfinite(v) for v in losses), result, f"non-finite losses {losses}")
    return result


def section_sync_debug(ctx: Context) -> dict[str, Any]:
    """benchmarks/sync_check.py: pre-training steps under torch.cuda.set_sync_debug_mode("error"), and the host syncs
    of fp16 steps counted (CUDA only; its CPU mechanics and the CPU proxy are in tests/test_host_syncs.py)."""
    if not ctx.cuda:
        raise Skip("no CUDA (the sync debugger is CUDA's; the CPU proxy runs in the test suite)")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sync_check.py"), "--device", str(ctx.device)]
    rc, output = run_command(cmd, min(300.0, ctx.remaining() - 5))
    lines = [line for line in output.strip().splitlines() if line.split(":")[0] in ("pixel", "hog", "fp16")]
    result: dict[str, Any] = {"rc": rc, "summary": lines}
    fp16 = [line for line in lines if line.startswith("fp16:")]
    if fp16:
        result["fp16_host_syncs"] = int(fp16[0].split()[1])
    check(rc == 0, result, f"a host sync between logging steps, or in an fp16 step (exit code {rc})")
    if rc != 0:
        result["output_tail"] = output[-3000:]
    return result

