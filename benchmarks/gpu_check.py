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
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import models_deepmim  # noqa: E402
from util import amp as amp_util  # noqa: E402
from util import memory  # noqa: E402

GiB = 2**30
V100_16GB = 16_945_512_448  # total_memory a 16 GB V100 reports
CUDA_CONTEXT = 512 * 2**20  # what the CUDA context takes of a V100's memory besides torch's allocator (approx.)
PARITY_RTOL = 1e-4

# Dense (no sparsity) tensor-core peak in TFLOP/s for bf16 (fp16 on V100, which has no bf16 tensor cores), per GPU,
# from NVIDIA's data sheets. Patterns are matched against torch.cuda.get_device_name(), most specific first.
SPEC_PEAKS: tuple[tuple[str, float, str], ...] = (
    # "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979 TFLOPS (SXM) / 1,513 (PCIe) / 1,671 (NVL), "with sparsity"
    (r"H100.*PCIe", 756.0, "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity (PCIe), dense = half"),
    (r"H100.*NVL", 835.0, "NVIDIA H100 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL), dense = half"),
    # "NVIDIA H200 Tensor Core GPU" datasheet: BF16 1,979 TFLOPS (SXM) / 1,671 (NVL), with sparsity
    (r"H200.*NVL", 835.0, "NVIDIA H200 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL), dense = half"),
    (r"GH200", 989.0, "NVIDIA GH200 Grace Hopper datasheet: 1,979 TFLOPS bf16 with sparsity, dense = half"),
    (r"H200", 989.0, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM), dense = half"),
    (r"H100", 989.0, "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM), dense = half"),
    # "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 TFLOPS (624 with sparsity), SXM and PCIe
    (r"A100", 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    # "NVIDIA A30" datasheet: BF16 165 TFLOPS (330 with sparsity)
    (r"\bA30\b", 165.0, "NVIDIA A30 datasheet: BF16 165 TFLOPS dense (330 with sparsity)"),
    # "NVIDIA L40S" datasheet: BF16 362.05 TFLOPS (733 with sparsity)
    (r"L40S", 362.0, "NVIDIA L40S datasheet: BF16 362 TFLOPS dense (733 with sparsity)"),
    # "NVIDIA A10" datasheet: BF16 125 TFLOPS (250 with sparsity)
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: BF16 125 TFLOPS dense (250 with sparsity)"),
    # "NVIDIA L4" datasheet: BF16 121 TFLOPS (242 with sparsity)
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: BF16 121 TFLOPS dense (242 with sparsity)"),
    # "NVIDIA V100 Tensor Core GPU" datasheet: tensor performance 125 TFLOPS (SXM2), 112 (PCIe), V100S 130
    (r"V100S", 130.0, "NVIDIA V100S datasheet: 130 TFLOPS fp16 tensor"),
    (r"V100.*PCIE", 112.0, "NVIDIA V100 datasheet: 112 TFLOPS fp16 tensor (PCIe)"),
    (r"V100", 125.0, "NVIDIA V100 datasheet: 125 TFLOPS fp16 tensor (SXM2)"),
)


def spec_peak(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 / fp16 tensor peak in FLOP/s, its source) for a GPU name; (None, why) when unknown."""
    for pattern, tflops, source in SPEC_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops * 1e12, source
    return None, f"no spec-sheet peak known for {device_name!r}"


# ------------------------------------------------------------------------------------------------------------------
# Running sections
# ------------------------------------------------------------------------------------------------------------------


class Skip(Exception):
    """Raised by a section that cannot run here; the message is the reason ("no CUDA", ...)."""


@dataclass
class Context:
    """What every section sees: the flags, the device, the work folder, the deadline and the sizes."""

    args: argparse.Namespace
    device: torch.device
    work: Path
    deadline: float
    sizes: dict[str, Any]
    data: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def image_folder(self) -> Path:
        """The generated ImageFolder (made once)."""
        if self.data is None:
            self.data = write_image_folder(self.work / "images", self.sizes["images"])
        return self.data


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


def run_section(name: str, fn: Callable[[Context], dict[str, Any]], ctx: Context, needs_s: float) -> dict[str, Any]:
    """Run one section; never raises. Result: status (passed / failed / skipped), reason, seconds, numbers."""
    start = time.monotonic()
    if ctx.remaining() < needs_s:
        result: dict[str, Any] = {"status": "skipped", "reason": f"time budget ({ctx.remaining():.0f} s left, "
                                                                 f"needs ~{needs_s:.0f} s)"}
    else:
        print(f"== {name}", flush=True)
        try:
            result = fn(ctx)
            result.setdefault("status", "passed")
        except Skip as why:
            result = {"status": "skipped", "reason": str(why), **getattr(why, "numbers", {})}
        except Exception as err:  # noqa: BLE001 - a failed section is a result, the next one still runs
            result = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.monotonic() - start, 1)
    print(f"   {name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""), flush=True)
    return result


def skip(reason: str, **numbers: Any) -> Skip:
    """A Skip that still carries the numbers measured on the way (the CPU dry run's code path)."""
    err = Skip(reason)
    err.numbers = numbers  # type: ignore[attr-defined]
    return err


def check(condition: bool, result: dict[str, Any], reason: str) -> None:
    """Mark the section failed (keeping its numbers) when `condition` is False; reasons accumulate."""
    if not condition:
        result["status"] = "failed"
        result["reason"] = "; ".join(filter(None, [result.get("reason"), reason]))


# ------------------------------------------------------------------------------------------------------------------
# Helpers: data, subprocesses, logs
# ------------------------------------------------------------------------------------------------------------------


def write_image_folder(root: Path, num_images: int, size: int = 48, classes: int = 2, seed: int = 0) -> Path:
    """An ImageFolder of JPEG crops of scikit-image's colour photographs."""
    from util.datasets import demo_photos

    rng = np.random.default_rng(seed)
    photos = [np.asarray(p) for p in demo_photos()]
    for i in range(num_images):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + size, x:x + size]).save(folder / f"img{i}.jpg", quality=90)
    return root


def subprocess_env() -> dict[str, str]:
    """The children's environment; OMP_NUM_THREADS follows this process's torch threads (1 in a CPU dry run: on a
    shared machine a tiny model's step with two threads waits for a descheduled one and takes 10-50x longer)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::DeprecationWarning",
            "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run_command(cmd: list[str], timeout: float) -> tuple[int, str]:
    """(return code, stdout + stderr); a command past its time-out is killed with its process group (rc -9)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -9, output + f"\n[killed after {timeout:.0f} s]"
    return proc.returncode, output


def epoch_losses(output_dir: Path) -> list[float]:
    """train_loss of every epoch from main_pretrain's log.txt (JSON lines)."""
    log = output_dir / "log.txt"
    if not log.exists():
        return []
    return [json.loads(line)["train_loss"] for line in log.read_text().splitlines() if line.strip()]


def pretrain_flags(ctx: Context, out: Path, batch: int, epochs: int, *extra: str) -> list[str]:
    return ["--data_path", str(ctx.image_folder()), "--output_dir", str(out), *ctx.sizes["train_flags"],
            "--batch_size", str(batch), "--epochs", str(epochs), "--warmup_epochs", "1", "--blr", "5e-3",
            "--norm_pix_loss", "--num_workers", str(ctx.sizes["workers"]), "--print_freq", "2",
            "--device", ctx.device.type, *extra]


def main_pretrain_has(flag: str) -> bool:
    """Whether main_pretrain.py accepts `flag` (a section that needs a flag reports its absence, not a crash)."""
    import main_pretrain

    return any(flag in action.option_strings for action in main_pretrain.get_args_parser()._actions)


# ------------------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------------------


def section_machine(ctx: Context) -> dict[str, Any]:
    """GPU, capability, arch list of this build, and util/amp.py's decisions (the cluster path)."""
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                              "arch_list": list(torch.cuda.get_arch_list()) if torch.cuda.is_available() else []}
    if not ctx.cuda:
        result.update(default_amp_cpu=amp_util.default_amp("cpu"))
        raise skip("no CUDA", **result)
    capability = amp_util.cuda_capability(ctx.device)
    props = torch.cuda.get_device_properties(ctx.device)
    result.update(gpu=torch.cuda.get_device_name(ctx.device), capability=f"{capability[0]}.{capability[1]}",
                  total_memory_gib=props.total_memory / GiB, default_amp=amp_util.default_amp(str(ctx.device)),
                  autocast_dtype=str(amp_util.autocast_dtype_for(ctx.device)),
                  is_bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    try:
        amp_util.check_cuda_arch(str(ctx.device))
        result["check_cuda_arch"] = "ok"
    except RuntimeError as err:
        result["check_cuda_arch"] = str(err)
        check(False, result, "this torch build has no kernels for the GPU")
    expected = "bf16" if capability >= amp_util.NATIVE_BF16_CAPABILITY else "fp16"
    check(result["default_amp"] == expected, result, f"default amp {result['default_amp']}, expected {expected}")
    return result


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
           "process_group": f"distributed init: rank 0/1 ({backend}" in output}
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


def section_ddp_train(ctx: Context) -> dict[str, Any]:
    """main_pretrain.py under torchrun with one rank: bf16, fp16 (CUDA only), and --compile."""
    result: dict[str, Any] = {"runs": {}}
    skipped = []
    if ctx.cuda:
        for amp in ("bf16", "fp16"):
            result["runs"][amp] = ddp_run(ctx, amp, amp)
    else:  # CPU bf16 autocast of a tiny model takes ~1 s a step (per-shape kernel set-up): the dry run uses fp32
        skipped.append("bf16, fp16: no CUDA (fp32 instead)")
        result["runs"]["none"] = ddp_run(ctx, "none", "none")
    if not ctx.sizes["compile"]:
        skipped.append("--compile: " + ("no CUDA" if not ctx.cuda else "--tiny"))
    elif not main_pretrain_has("--compile"):
        result["runs"]["bf16_compile"] = {"problems": ["main_pretrain.py has no --compile flag yet"]}
    elif ctx.remaining() < 300:  # leave time for the later sections; compiling takes a minute or two
        skipped.append(f"--compile: time budget ({ctx.remaining():.0f} s left)")
    else:
        result["runs"]["bf16_compile"] = ddp_run(ctx, "bf16_compile", "bf16", "--compile")
    for label, run in result["runs"].items():
        for problem in run["problems"]:
            check(False, result, f"{label}: {problem}")
    if skipped:
        result["skipped_runs"] = skipped
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
    """TF32 off for the block (configure_backends turns it on for fp32 work on Ampere+); torch's fp32_precision API,
    the one configure_backends uses (mixing it with the legacy allow_tf32 flags is an error)."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


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
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    last = out / "checkpoint-last.pth"
    result: dict[str, Any] = {}
    try:
        saved = wait_for(last.exists, min(180.0, ctx.remaining() - 30), proc)
        result["signalled"] = saved and proc.poll() is None
        if result["signalled"]:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as SLURM does: loader workers included
        proc.wait(timeout=max(5.0, min(120.0, ctx.remaining() - 20)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
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


def train_steps(model: torch.nn.Module, device: torch.device, amp: str, batch: int, input_size: int,
                steps: int) -> None:
    """`steps` real pre-training steps (engine_pretrain.train_one_epoch, fused AdamW) on a synthetic uint8 batch."""
    from bench_pretrain import build_optimizer

    from engine_pretrain import train_one_epoch

    optimizer = build_optimizer(model, "fused", device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    samples = torch.randint(0, 256, (batch, 3, input_size, input_size), dtype=torch.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    engine_args = SimpleNamespace(accum_iter=1, print_freq=10**9, lr=1e-4, min_lr=0.0, warmup_epochs=1, epochs=2,
                                  mask_ratio=0.75, amp=amp, max_bad_images=0)
    train_one_epoch(model, [(samples, labels, labels)] * steps, optimizer, scaler, device, 0, engine_args)


def release_cuda(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_run(ctx: Context, grad_ckpt: bool, cap_bytes: int | None, amp: str) -> dict[str, Any]:
    """Peak reserved / allocated memory of 3 training steps in a fresh model, optionally under a memory cap."""
    torch.manual_seed(0)
    release_cuda(ctx.device)
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    if cap_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), ctx.device)
    run: dict[str, Any] = {"grad_ckpt": grad_ckpt, "cap_gib": None if cap_bytes is None else cap_bytes / GiB}
    try:
        model = models_deepmim.create_model(ctx.sizes["mem_model"], img_size=ctx.sizes["mem_input"],
                                            norm_pix_loss=True).to(ctx.device)
        model.set_grad_checkpointing(grad_ckpt)
        train_steps(model, ctx.device, amp, ctx.sizes["mem_batch"], ctx.sizes["mem_input"], steps=3)
        torch.cuda.synchronize(ctx.device)
        run.update(fits=True, peak_reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / GiB,
                   peak_allocated_gib=torch.cuda.max_memory_allocated(ctx.device) / GiB)
    except torch.OutOfMemoryError:
        run.update(fits=False, peak_reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / GiB)
    finally:
        model = None  # noqa: F841 - drop the model before emptying the cache
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        release_cuda(ctx.device)
    return run


def section_memory(ctx: Context) -> dict[str, Any]:
    """Peak reserved memory at batch 128 (ViT-B DeepMIM), with / without --grad_ckpt and under a 16 GB cap, against
    util/memory.py's estimate and advice."""
    amp = amp_util.default_amp(str(ctx.device)) if ctx.cuda else "none"
    torch.manual_seed(0)
    probe = models_deepmim.create_model(ctx.sizes["mem_model"], img_size=ctx.sizes["mem_input"],
                                        norm_pix_loss=True).to(ctx.device)
    estimate = memory.estimate_training_memory(probe, ctx.sizes["mem_batch"], input_size=ctx.sizes["mem_input"],
                                               amp=amp, device=ctx.device)
    del probe
    cap = V100_16GB - CUDA_CONTEXT
    estimates = {False: estimate, True: estimate.with_grad_ckpt()}
    result: dict[str, Any] = {"model": ctx.sizes["mem_model"], "batch": ctx.sizes["mem_batch"], "amp": amp,
                              "estimate": {str(k): v.summary() for k, v in estimates.items()},
                              "advice_16gb": memory.memory_advice(estimate, V100_16GB, device_name="V100 16GB")}
    if not ctx.cuda:
        raise skip("no CUDA (estimate only)", **result)
    runs = {}
    for grad_ckpt in (False, True):
        for cap_bytes in (None, cap):
            run = memory_run(ctx, grad_ckpt, cap_bytes, amp)
            est = estimates[grad_ckpt]
            run["estimate_gib"] = est.total / GiB
            if run["fits"] and cap_bytes is None:  # the allocator's peak: the estimate without the CUDA context
                run["estimate_over_measured"] = (est.total - est.reserve) / (run["peak_reserved_gib"] * GiB)
            run["advice_says_fits"] = memory.memory_advice(est, V100_16GB) is None
            runs[f"ckpt={grad_ckpt} cap={'16GB' if cap_bytes else 'none'}"] = run
    result["runs"] = runs
    plain, ckpt = runs["ckpt=False cap=none"], runs["ckpt=True cap=none"]
    check(plain["fits"] and ckpt["fits"], result, "batch 128 does not fit the whole GPU")
    if plain["fits"] and ckpt["fits"]:
        check(ckpt["peak_reserved_gib"] < plain["peak_reserved_gib"], result, "--grad_ckpt did not lower the peak")
        for run in (plain, ckpt):
            ratio = run["estimate_over_measured"]
            check(0.75 <= ratio <= 1.33, result, f"estimate / measured = {ratio:.2f} (grad_ckpt={run['grad_ckpt']})")
    check(runs["ckpt=True cap=16GB"]["fits"], result, "--grad_ckpt does not fit a 16 GB cap")
    for key in ("ckpt=False cap=16GB", "ckpt=True cap=16GB"):
        run = runs[key]
        run["advice_consistent"] = run["fits"] or not run["advice_says_fits"]  # an OOM must have been warned about
        check(run["advice_consistent"], result, f"{key}: out of memory although memory_advice predicted a fit")
    return result


def bench_args(ctx: Context, compile_model: bool, amp: str) -> SimpleNamespace:
    """The namespace benchmarks/bench_pretrain.run_config reads."""
    return SimpleNamespace(input_size=ctx.sizes["bench_input"], norm_pix_loss=True, attn="sdpa" if ctx.cuda else "math",
                           adamw="fused", amp=amp, compile=compile_model, batch_size=ctx.sizes["bench_batch"],
                           mask_ratio=0.75, warmup=ctx.sizes["bench_warmup"], steps=ctx.sizes["bench_steps"],
                           frozen_amp=False)


def section_throughput(ctx: Context) -> dict[str, Any]:
    """img/s and MFU (vs spec sheet and vs measured matmul peak), without and with torch.compile."""
    import bench_pretrain

    amp = amp_util.default_amp(str(ctx.device)) if ctx.cuda else "none"  # CPU: bf16 is slow on tiny shapes
    dtype = bench_pretrain.AMP_DTYPES[amp]
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else bench_pretrain.device_name(ctx.device)
    spec, source = spec_peak(name) if ctx.cuda else (None, "CPU: no spec-sheet peak")
    measured = bench_pretrain.matmul_peak(ctx.device, dtype, ctx.sizes["peak_sizes"], seconds=1.0 if ctx.cuda else 0.2)
    result: dict[str, Any] = {"device": name, "amp": amp, "spec_peak_tflops": spec and spec / 1e12,
                              "spec_source": source, "matmul_peak_tflops": measured / 1e12, "rows": []}
    configs = [(m, False) for m in ctx.sizes["bench_models"]]
    if ctx.sizes["compile"]:
        configs.append((ctx.sizes["bench_models"][0], True))
    for model_name, compiled in configs:
        if ctx.remaining() < (150 if compiled else 30):
            result.setdefault("not_run", []).append(f"{model_name} compile={compiled}: time budget")
            continue
        row = bench_pretrain.run_config(bench_args(ctx, compiled, amp), model_name, "pixel", False, ctx.device,
                                        ctx.sizes["peak_sizes"][0])
        flops_per_s = row["tflops"] * 1e12
        result["rows"].append({
            "model": model_name, "compile": compiled, "batch": ctx.sizes["bench_batch"],
            "images_per_s": row["images_per_s"], "step_s": row["step"], "model_tflop_per_step": row["flops"] / 1e12,
            "tflops": row["tflops"], "mfu_spec": spec and flops_per_s / spec, "mfu_measured": flops_per_s / measured,
            "peak_mem_gib": row["peak_mem_gib"],
        })
        del row
        release_cuda(ctx.device)
    check(bool(result["rows"]), result, "no configuration ran")
    if not ctx.cuda and result.get("status") != "failed":
        raise skip("no CUDA (CPU code path, no compile)", **result)
    return result


def section_sync_debug(ctx: Context) -> dict[str, Any]:
    """benchmarks/sync_check.py: pre-training steps under torch.cuda.set_sync_debug_mode("error") (CUDA only; its
    CPU mechanics and the CPU proxy are in tests/test_host_syncs.py)."""
    if not ctx.cuda:
        raise Skip("no CUDA (the sync debugger is CUDA's; the CPU proxy runs in the test suite)")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sync_check.py"), "--device", str(ctx.device)]
    rc, output = run_command(cmd, min(300.0, ctx.remaining() - 5))
    lines = [line for line in output.strip().splitlines() if line.strip()]
    result: dict[str, Any] = {"rc": rc, "summary": lines[-2:] if lines else []}
    check(rc == 0, result, f"a host sync between logging steps (exit code {rc})")
    if rc != 0:
        result["output_tail"] = output[-3000:]
    return result


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
