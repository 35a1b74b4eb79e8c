"""Device and precision, decided in one place for every entry script and for frozen teachers / generators.

Entry scripts parse `--device` and `--amp` with default None and call `resolve_machine(args)` first thing in
`main`, i.e. on the machine that trains (under SLURM: the compute node, never the login node).

Rules:
  * device: None -> cuda when available, else cpu; cpu, cuda and cuda:N are accepted. A job that asked for GPUs
    (CUDA_VISIBLE_DEVICES, SLURM's GPU variables; the submitit launchers pass --device cuda) never falls back to the
    CPU: when this torch cannot use CUDA (e.g. a CUDA 13 wheel on a node whose driver is too old) it stops, naming
    torch's CUDA version and the driver's, instead of training on the CPU while holding the GPUs.
  * amp: None -> none on the CPU; on CUDA bf16 where the GPU has native bf16 (compute capability >= 8.0), else fp16
    (the entry scripts then create a GradScaler). `torch.cuda.is_bf16_supported()` is not used: it also counts
    emulated bf16 and is True on a V100 (sm_70), where bf16 is slow.
  * the GPU must be one the installed torch build has kernels for (`check_cuda_arch`): recent CUDA 13 wheels no
    longer ship sm_70 (V100) kernels, and without this check the first CUDA op fails deep in a kernel launch.
  * the decision is described (`describe_machine`: GPU, capability, amp, torch's CUDA, the driver) for the entry
    script to log once its logging is set up (`resolve_machine` runs before it).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

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
# Environment variables that mean "this task was given GPUs": device lists, and SLURM's GPU counts.
GPU_LIST_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
NO_GPU_LISTS = ("", "-1", "none", "nodevfiles", "void")
# Oldest Linux driver per CUDA major (NVIDIA's CUDA Compatibility guide, minor-version compatibility: 12.x needs
# >= 525.60.13, 13.x >= 580.65.06).
MIN_DRIVER = {12: (525, 60), 13: (580, 65)}
DRIVER_FILE = Path("/proc/driver/nvidia/version")


def resolve_device(device: str | None) -> str:
    """The `--device` to train on: None picks cuda when available, else cpu (but never the CPU when GPUs were
    requested, `gpus_requested`); bad or unavailable names raise ValueError."""
    if device is None:
        if torch.cuda.is_available():
            return "cuda"
        requested = gpus_requested()
        if requested:
            raise ValueError(f"GPUs were requested ({requested}) but CUDA is not available: "
                             f"{cuda_unavailable_reason()}; training on the CPU would hold the GPUs for nothing. Fix "
                             "the CUDA set-up, or pass --device cpu to train on the CPU on purpose")
        return "cpu"
    if not _DEVICE_RE.match(device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but CUDA is not available: {cuda_unavailable_reason()}; use --device "
                         "cpu to train on the CPU")
    return device


def gpus_requested() -> str | None:
    """What gave this task GPUs ('CUDA_VISIBLE_DEVICES=0,1', 'SLURM_GPUS_ON_NODE=8'), or None: device lists that
    are set and not empty / -1, SLURM GPU counts that are not 0 ('a100:8' counts)."""
    for name in GPU_LIST_VARS:
        value = os.environ.get(name)
        if value is not None and value.strip().lower() not in NO_GPU_LISTS:
            return f"{name}={value}"
    for name in GPU_COUNT_VARS:
        value = os.environ.get(name, "").strip()
        counts = [int(n) for n in re.findall(r"\d+", value.split(":")[-1])] if value else []
        if any(counts):
            return f"{name}={value}"
    return None


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version ('580.65.06'), or None when none is visible: read from
    /proc/driver/nvidia/version (Linux), else asked of nvidia-smi."""
    try:
        match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", DRIVER_FILE.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def cuda_unavailable_reason() -> str:
    """Why this torch cannot use CUDA here, naming torch's CUDA version and the driver's (for error messages)."""
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return (f"{build} is a CPU-only build; install a CUDA build, e.g. `pip install torch torchvision "
                f"--index-url https://download.pytorch.org/whl/cu126`")
    driver = nvidia_driver_version()
    build += f" (built for CUDA {torch.version.cuda})"
    if driver is None:
        return f"{build} finds no NVIDIA driver on this node (no {DRIVER_FILE}, no nvidia-smi)"
    need = MIN_DRIVER.get(_version_tuple(torch.version.cuda)[0])
    if need is not None and _version_tuple(driver)[:2] < need:
        return (f"{build} needs an NVIDIA driver >= {need[0]}.{need[1]} and this node has {driver}; update the "
                f"driver or {LEGACY_GPU_HINT}")
    return f"{build} cannot use CUDA with NVIDIA driver {driver} (are the GPUs visible to this task?)"


def describe_machine(device: str | torch.device, amp: str) -> str:
    """One line for the log: the device and amp decided, the GPU and its capability, torch's CUDA and the driver."""
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}"
    driver = nvidia_driver_version()
    versions += f", NVIDIA driver {driver}" if driver else ", no NVIDIA driver visible"
    if is_cuda(device):
        major, minor = cuda_capability(device)
        gpu = f"{torch.cuda.get_device_name(torch.device(device))}, compute capability {major}.{minor}, " \
              f"{torch.cuda.device_count()} visible"
        return f"device {device} ({gpu}), amp {amp}; {versions}"
    why = "" if torch.cuda.is_available() else " (CUDA not available)"
    return f"device {device}{why}, amp {amp}; {versions}"


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

    Called by every entry script's `main`, inside the job (on a SLURM compute node, not the login node), before
    logging is set up: the script logs `describe_machine(device, args.amp)` once it is."""
    args.device = resolve_device(getattr(args, "device", None))
    check_cuda_arch(args.device)
    args.amp = resolve_amp(getattr(args, "amp", None), args.device)
    if hasattr(args, "num_workers") and args.num_workers is None:
        from util.datasets import default_num_workers

        args.num_workers = default_num_workers()  # the CPUs this task has, less the main and pin-memory threads


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
        set_tf32(cuda_capability(device) >= (8, 0))  # CUDA only: CPU float32 stays IEEE
        torch.backends.cudnn.benchmark = True


def set_tf32(enabled: bool, matmul: object | None = None, cudnn: object | None = None) -> bool:
    """TF32 for float32 CUDA matmuls and cuDNN convolutions, on or off; returns the previous setting.

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` / `torch.backends.cudnn.conv.fp32_precision`
    ('tf32' / 'ieee'; mixing them with the legacy flags is an error there); older torch (down to the 2.4 floor of
    requirements.txt) has only `allow_tf32`, used when the new attribute is missing. `matmul` / `cudnn` default to
    torch's backends (tests pass stubs)."""
    matmul = torch.backends.cuda.matmul if matmul is None else matmul
    cudnn = torch.backends.cudnn if cudnn is None else cudnn
    conv = getattr(cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        before = matmul.fp32_precision == "tf32"
        matmul.fp32_precision = conv.fp32_precision = "tf32" if enabled else "ieee"
        return before
    before = bool(matmul.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    return before
