"""util/amp.py: device, precision and GPU-architecture decisions, with the CUDA queries mocked (CPU-only tests)."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from targets import teachers
from util import amp

ALL_NEW_ARCHS = ["sm_80", "sm_90", "sm_100", "sm_120"]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A pretend CUDA machine: call with the GPU's capability, the build's arch list and its name."""

    def install(capability: tuple[int, int], arch_list: list[str] | None = None, name: str = "Fake GPU") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list or ALL_NEW_ARCHS))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA whose job asked for no GPU (on a GPU machine the suite's CUDA_VISIBLE_DEVICES would
    make a default --device refuse to fall back to the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in (*amp.GPU_LIST_VARS, *amp.GPU_COUNT_VARS):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                      ((8, 6), "bf16"), ((9, 0), "bf16"), ((12, 0), "bf16")])
def test_default_amp_follows_native_bf16(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert amp.default_amp("cuda") == expected
    assert amp.resolve_amp(None, "cuda:0") == expected
    assert amp.autocast_dtype_for("cuda") == (torch.bfloat16 if expected == "bf16" else torch.float16)


def test_cpu_defaults_to_no_autocast(no_gpu):
    assert amp.resolve_device(None) == "cpu"
    assert amp.default_amp("cpu") == "none"
    assert amp.resolve_amp(None, "cpu") == "none"
    assert not amp.has_native_bf16("cpu")


def test_emulated_bf16_on_volta_is_not_native(fake_gpu, monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation (True on a V100): the default must still be fp16."""
    fake_gpu((7, 0), ["sm_70", "sm_80"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert not amp.has_native_bf16("cuda")
    assert amp.default_amp("cuda") == "fp16"
    assert amp.autocast_dtype_for("cuda") is torch.float16


def test_explicit_bf16_on_volta_is_kept_with_a_warning(fake_gpu, caplog):
    fake_gpu((7, 0), ["sm_70"], name="Tesla V100-SXM2-32GB")
    with caplog.at_level(logging.WARNING, logger="util.amp"):
        assert amp.resolve_amp("bf16", "cuda") == "bf16"
    assert "emulated" in caplog.text and "V100" in caplog.text


def test_fp16_on_cpu_names_the_flag(no_gpu):
    with pytest.raises(ValueError, match="--amp"):
        amp.resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="--amp"):
        amp.resolve_amp("fp8", "cpu")
    assert amp.resolve_amp("bf16", "cpu") == "bf16"


def test_device_names(no_gpu):
    assert amp.resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "mps", ""):
        with pytest.raises(ValueError, match="--device"):
            amp.resolve_device(bad)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_the_flag(no_gpu, device):
    with pytest.raises(ValueError, match="--device"):
        amp.resolve_device(device)


def test_device_default_is_cuda_when_available(fake_gpu):
    fake_gpu((9, 0))
    assert amp.resolve_device(None) == "cuda"
    assert amp.resolve_device("cuda:3") == "cuda:3"


def test_arch_check_accepts_a_binary_of_the_same_major(fake_gpu):
    fake_gpu((8, 6), ["sm_80"])
    amp.check_cuda_arch("cuda")  # sm_80 cubins run on an 8.6 GPU


def test_arch_check_refuses_volta_on_a_cuda13_build(fake_gpu):
    fake_gpu((7, 0), ALL_NEW_ARCHS, name="Tesla V100-SXM2-16GB")
    with pytest.raises(RuntimeError) as err:
        amp.check_cuda_arch("cuda")
    message = str(err.value)
    for part in ("Tesla V100-SXM2-16GB", "7.0", "sm_80", torch.__version__, "cu126", "--device"):
        assert part in message, part


def test_arch_check_accepts_ptx_for_newer_gpus(fake_gpu):
    fake_gpu((7, 0), ["compute_70", "sm_80"])
    amp.check_cuda_arch("cuda")  # PTX is JIT-compiled for capability >= 7.0
    fake_gpu((12, 1), ["sm_90", "compute_90"])
    amp.check_cuda_arch("cuda")


def test_arch_rules():
    assert amp.arch_supports(["sm_90a"], (9, 0))
    assert not amp.arch_supports(["sm_86"], (8, 0))  # minor too new for the GPU
    assert not amp.arch_supports(["sm_90"], (10, 0))  # cubins do not cross majors
    assert not amp.arch_supports(["compute_90"], (8, 9))
    assert amp.arch_supports(["sm_100", "sm_120"], (12, 0))


def test_arch_check_is_a_no_op_on_cpu(no_gpu):
    amp.check_cuda_arch("cpu")


def test_resolve_machine_fills_args_in_place(fake_gpu):
    fake_gpu((8, 0))
    args = argparse.Namespace(device=None, amp=None)
    amp.resolve_machine(args)
    assert (args.device, args.amp) == ("cuda", "bf16")
    args = argparse.Namespace(device="cuda:1", amp="fp16")
    amp.resolve_machine(args)
    assert (args.device, args.amp) == ("cuda:1", "fp16")


def test_resolve_machine_checks_the_arch(fake_gpu):
    fake_gpu((7, 0), ALL_NEW_ARCHS)
    with pytest.raises(RuntimeError, match="7.0"):
        amp.resolve_machine(argparse.Namespace(device=None, amp=None))


def test_resolve_machine_on_cpu(no_gpu):
    args = argparse.Namespace(device=None, amp=None)
    amp.resolve_machine(args)
    assert (args.device, args.amp) == ("cpu", "none")
    with pytest.raises(ValueError, match="--device"):
        amp.resolve_machine(argparse.Namespace(device="cuda", amp=None))


def test_frozen_autocast_uses_native_bf16_only(fake_gpu, monkeypatch):
    """Teachers and the hybrid generator (targets.hybrid uses teachers.frozen_autocast) follow autocast_dtype_for."""
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, enabled=True: seen.append(dtype))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    fake_gpu((7, 0))
    teachers.frozen_autocast("cuda")
    fake_gpu((8, 0))
    teachers.frozen_autocast("cuda")
    assert seen == [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("capability, tf32", [((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_backends_per_device(fake_gpu, monkeypatch, capability, tf32):
    import timm.layers

    fake_gpu(capability)
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark
    try:
        amp.configure_backends("cuda")
        expected = "tf32" if tf32 else "ieee"
        assert matmul.fp32_precision == expected and conv.fp32_precision == expected
        assert torch.backends.cudnn.benchmark and timm.layers.use_fused_attn()
        amp.configure_backends("cpu")  # the CPU path: explicit attention matmuls, whatever ran before
        assert not timm.layers.use_fused_attn()
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize(("name", "value"), [("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_JOB_GPUS", "0"),
                                             ("SLURM_GPUS_ON_NODE", "8"), ("SLURM_GPUS_PER_NODE", "a100:4")])
def test_a_job_given_gpus_never_falls_back_to_the_cpu(no_gpu, monkeypatch, name, value):
    """e.g. a CUDA 13 wheel on a node whose driver is too old: CUDA is unavailable but GPUs were requested."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="GPUs were requested") as err:
        amp.resolve_device(None)
    assert f"{name}={value}" in str(err.value) and "--device cpu" in str(err.value)
    assert amp.resolve_device("cpu") == "cpu"  # on purpose: allowed


@pytest.mark.parametrize(("name", "value"), [("CUDA_VISIBLE_DEVICES", ""), ("CUDA_VISIBLE_DEVICES", "-1"),
                                             ("SLURM_GPUS_ON_NODE", "0"), ("SLURM_GPUS_PER_NODE", "gpu:0")])
def test_no_gpus_requested_still_means_the_cpu(no_gpu, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert amp.gpus_requested() is None and amp.resolve_device(None) == "cpu"


def test_the_refusal_names_torchs_cuda_and_the_driver(no_gpu, monkeypatch, tmp_path):
    driver_file = tmp_path / "version"
    driver_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                           "GCC version:  gcc version 11.4.0\n")
    monkeypatch.setattr(amp, "DRIVER_FILE", driver_file)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ValueError) as err:
        amp.resolve_device(None)
    for part in ("CUDA 13.0", "535.104.05", ">= 580.65", torch.__version__, "cu126"):
        assert part in str(err.value), part
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in amp.cuda_unavailable_reason()
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(amp, "DRIVER_FILE", tmp_path / "absent")
    monkeypatch.setattr(amp.shutil, "which", lambda name: None)
    assert "finds no NVIDIA driver" in amp.cuda_unavailable_reason()


def test_the_decision_is_described_for_the_log(fake_gpu, monkeypatch, tmp_path):
    fake_gpu((9, 0), name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    driver_file = tmp_path / "version"
    driver_file.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    monkeypatch.setattr(amp, "DRIVER_FILE", driver_file)
    line = amp.describe_machine("cuda:3", "bf16")
    for part in ("device cuda:3", "NVIDIA H100 80GB HBM3", "compute capability 9.0", "amp bf16", "580.65.06",
                 f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"):
        assert part in line, part


class LegacyMatmul:
    """torch < 2.9's cuBLAS switches: allow_tf32 only."""

    def __init__(self) -> None:
        self.allow_tf32 = False


def test_backends_fall_back_to_allow_tf32_on_older_torch(fake_gpu, monkeypatch):
    """torch 2.4-2.8 (the floor of requirements.txt, and the V100 route) has no fp32_precision attributes."""
    from types import SimpleNamespace

    fake_gpu((8, 0))
    matmul, cudnn = LegacyMatmul(), SimpleNamespace(allow_tf32=False, benchmark=False)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    amp.configure_backends("cuda")
    assert matmul.allow_tf32 and cudnn.allow_tf32 and cudnn.benchmark and not hasattr(matmul, "fp32_precision")
    assert amp.set_tf32(False) is True and not matmul.allow_tf32 and not cudnn.allow_tf32
    new_matmul = SimpleNamespace(fp32_precision="ieee")
    new_cudnn = SimpleNamespace(conv=SimpleNamespace(fp32_precision="ieee"))
    assert amp.set_tf32(True, new_matmul, new_cudnn) is False
    assert new_matmul.fp32_precision == new_cudnn.conv.fp32_precision == "tf32" and not hasattr(new_cudnn, "allow_tf32")
