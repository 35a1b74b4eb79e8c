"""Device and precision, decided in one place for every entry script and for frozen teachers / generators.

Entry scripts parse `--device` and `--amp` with default None and call `resolve_machine(args)` first thing in
`main`, i.e. on the machine that trains (under SLURM: the compute node, never the login node).

Rules:
  * device: None -> cuda when available, else cpu; cpu, cuda and cuda:N are accepted.
  * amp: None -> none on the CPU; on CUDA bf16 where the GPU has native bf16 (compute capability >= 8.0), else fp16
    (the entry scripts then create a GradScaler). `torch.cuda.is_bf16_supported()` is not used: it also counts
    emulated bf16 and is True on a V100 (sm_70), where bf16 is slow.
  * the GPU must be one the installed torch build has kernels for (`check_cuda_arch`): recent CUDA 13 wheels no
    longer ship sm_70 (V100) kernels, and without this check the first CUDA op fails deep in a kernel launch.
"""

from __future__ import annotations

import argparse
import logging
import re

import torch

logger = logging.getLogger(__name__)

AMP_CHOICES = ("bf16", "fp16", "none")
NATIVE_BF16_CAPABILITY = (8, 0)
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)[a-z]?$")
# What still runs on pre-Turing GPUs (PyTorch's CUDA support matrix, RELEASE.md): the CUDA 12.6 wheels.
LEGACY_GPU_HINT = ("install a torch build for CUDA 12.6, which still ships sm_50/sm_60/sm_70 kernels, e.g. "
                   "`pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126` "
                   "(CUDA 13 wheels, and CUDA 12.8 wheels from torch 2.11 on, start at sm_75 / Turing)")


def resolve_device(device: str | None) -> str:
    """The `--device` to train on: None picks cuda when available, else cpu; bad or unavailable names raise."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not _DEVICE_RE.match(device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but CUDA is not available on this machine; use --device cpu")
    return device


def is_cuda(device: str | torch.device) -> bool:
    """True for a CUDA device, given as a string or a torch.device."""
    return torch.device(device).type == "cuda"


def cuda_capability(device: str | torch.device) -> tuple[int, int]:
    """Compute capability (major, minor) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def has_native_bf16(device: str | torch.device) -> bool:
    """True on GPUs with bf16 in hardware (compute capability >= 8.0: Ampere and later); False on the CPU."""
    return is_cuda(device) and cuda_capability(device) >= NATIVE_BF16_CAPABILITY


def default_amp(device: str) -> str:
    """The `--amp` default: none on the CPU; bf16 on GPUs with native bf16, else fp16 (with a GradScaler)."""
    if not is_cuda(device):
        return "none"
    return "bf16" if has_native_bf16(device) else "fp16"


def resolve_amp(amp: str | None, device: str) -> str:
    """The `--amp` to train with on `device` (an already resolved device)."""
    if amp is None:
        return default_amp(device)
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "fp16" and not is_cuda(device):
        raise ValueError(f"--amp fp16 needs a CUDA --device (got {device}); use --amp bf16 or none")
    if amp == "bf16" and is_cuda(device) and not has_native_bf16(device):
        major, minor = cuda_capability(device)
        logger.warning("--amp bf16 on %s (compute capability %d.%d): bf16 is emulated there and slow; "
                       "--amp fp16 is the fast choice on this GPU", torch.cuda.get_device_name(device), major, minor)
    return amp


def autocast_dtype_for(device: str | torch.device) -> torch.dtype:
    """Autocast dtype for frozen forward passes (teachers, generators) on a CUDA device: bf16 where native,
    else fp16."""
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def _parse_arch(arch: str) -> tuple[str, tuple[int, int]] | None:
    """'sm_86' -> ('sm', (8, 6)); 'compute_70' -> ('compute', (7, 0)); 'sm_90a' -> ('sm', (9, 0))."""
    match = _ARCH_RE.match(arch)
    if match is None:
        return None
    kind, major, minor = match.groups()
    return kind, (int(major), int(minor))


def arch_supports(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """True when a build with `arch_list` runs on a GPU of `capability`: an sm_XY binary runs on the same major
    with minor >= Y; a compute_XY (PTX) entry is JIT-compiled for any capability >= XY."""
    for arch in arch_list:
        parsed = _parse_arch(arch)
        if parsed is None:
            continue
        kind, built = parsed
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def check_cuda_arch(device: str) -> None:
    """Raise RuntimeError when the installed torch has no kernels for the GPU of `device` (no-op on the CPU)."""
    if not is_cuda(device):
        return
    capability = cuda_capability(device)
    arch_list = list(torch.cuda.get_arch_list())
    if not arch_list or arch_supports(arch_list, capability):
        return  # an empty list: a build that does not report its architectures; let CUDA decide
    name = torch.cuda.get_device_name(torch.device(device))
    raise RuntimeError(
        f"--device {device}: the GPU {name} (compute capability {capability[0]}.{capability[1]}, "
        f"sm_{capability[0]}{capability[1]}) is not supported by this torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), built for {', '.join(arch_list)}; every CUDA kernel would fail to launch. "
        f"Use a GPU the build supports or {LEGACY_GPU_HINT}."
    )


def resolve_machine(args: argparse.Namespace) -> None:
    """Fill `args.device`, `args.amp` (and `args.num_workers` when None) in place for this machine, and check the
    GPU is usable by this torch.

    Called by every entry script's `main`, inside the job (on a SLURM compute node, not the login node)."""
    args.device = resolve_device(getattr(args, "device", None))
    check_cuda_arch(args.device)
    args.amp = resolve_amp(getattr(args, "amp", None), args.device)
    if hasattr(args, "num_workers") and args.num_workers is None:
        from util.datasets import default_num_workers

        args.num_workers = default_num_workers()  # the CPUs this task has, less the main and pin-memory threads
    logger.info("device %s, amp %s", args.device, args.amp)


def configure_backends(device: str | torch.device) -> None:
    """Per-device kernel choices, made in one place by every entry script, so a run's numerics never depend on what
    ran before it in the same process:

    - attention: fused SDPA (flash) on CUDA; explicit matmuls on the CPU, where the fused backward took 23 % of a
      ViT-B DeepMIM step for 4 % of its FLOPs (benchmarks/RESULTS.md);
    - TF32 matmuls and convolutions on GPUs that have them (compute capability >= 8.0), for fp32 work: `--amp none`
      runs and the float32 parts of frozen teachers and generators;
    - cuDNN autotuning for the fixed input size (MAE).
    """
    import timm.layers

    cuda = is_cuda(device)
    timm.layers.set_fused_attn(cuda)
    if cuda:
        precision = "tf32" if cuda_capability(device) >= (8, 0) else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision  # CUDA only: CPU float32 stays IEEE
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cudnn.benchmark = True
