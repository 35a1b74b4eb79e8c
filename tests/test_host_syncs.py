"""No host syncs in the pre-training hot loop (issue "GPU readiness").

`torch.tensor(python_list, device="cuda")` inside a training step copies from pageable host memory and makes the
host wait for the stream, every step. These tests run a few real pre-training steps (main_pretrain's own builders,
`engine_pretrain.train_one_epoch`, a tiny model, pixel and HOG targets) and check the steps after the first.

CPU proxy (runs everywhere): `torch.tensor`, `torch.as_tensor` and `Tensor.new_tensor` are patched to record every
call that names a device, and every call made from this repository's code (which would be a per-step host copy
once moved to a device), with the step it happened in. After the first step (warm-up: device constants are made
once then) the count must be 0 per step. What this proves: nothing on the step's path (normalisation, masking,
targets, model, loss, optimizer, logging) builds a tensor from Python data per step, on any device. What it cannot
see: other kinds of host syncs (`.item()`, `.cpu()`, `nonzero`, boolean-mask indexing, a pageable copy) and calls
inside compiled extensions; the CUDA test below catches those.

On a GPU, benchmarks/sync_check.py (run by `benchmarks/gpu_check.sh`) runs the same steps with
`torch.cuda.set_sync_debug_mode("error")` between the first and the last step, so any synchronising call raises;
the last test here checks that script's mechanics on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from conftest import ROOT

from targets import hog
from util import datasets as data_utils

sys.path.insert(0, str(ROOT / "benchmarks"))
import sync_check  # noqa: E402
from sync_check import STEPS, pretrain_args, run_steps  # noqa: E402


class FactoryCall(NamedTuple):
    step: int
    factory: str
    device: Any
    caller: str


class TensorFactoryRecorder:
    """Records calls of `torch.tensor`, `torch.as_tensor` and `Tensor.new_tensor` that name a device or come from
    this repository's code, tagged with the current step (set by `Steps`)."""

    def __init__(self) -> None:
        self.step = -1
        self.calls: list[FactoryCall] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> TensorFactoryRecorder:
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self._wrap(name, getattr(torch, name), device_position=1))
        monkeypatch.setattr(torch.Tensor, "new_tensor", self._wrap("new_tensor", torch.Tensor.new_tensor, 2))
        return self

    def _wrap(self, name: str, factory: Callable[..., torch.Tensor], device_position: int) -> Callable:
        def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
            device = kwargs.get("device", args[device_position] if len(args) > device_position else None)
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename
            if device is not None or _is_project_file(caller):
                self.calls.append(FactoryCall(self.step, name, device, f"{caller}:{frame.f_lineno}"))
            return factory(*args, **kwargs)

        return recording

    def after_warmup(self) -> list[FactoryCall]:
        return [call for call in self.calls if call.step >= 1]


def _is_project_file(path: str) -> bool:
    resolved = Path(path).resolve()
    return resolved.is_relative_to(ROOT) and ".venv" not in resolved.parts and "site-packages" not in resolved.parts


def clear_device_constants() -> None:
    """Forget the cached device constants, so that the warm-up step has to make them again."""
    for cached in (data_utils._cached_constant, hog._kernel, hog._tiled_window):
        cached.cache_clear()


@pytest.mark.parametrize("target", ["pixel", "hog"])
def test_no_tensor_from_python_data_after_the_first_step(target, tmp_path, monkeypatch):
    recorder = TensorFactoryRecorder()
    args = pretrain_args(target, "cpu", tmp_path, print_freq=1)  # every step logs: logging is checked too
    clear_device_constants()
    recorder.install(monkeypatch)
    stats = run_steps(args, lambda step: setattr(recorder, "step", step))

    assert torch.isfinite(torch.as_tensor(stats["loss"]))
    warmup = [call for call in recorder.calls if call.step == 0]
    assert any("util/datasets.py" in call.caller for call in warmup), "the recorder saw no warm-up constant"
    per_step = recorder.after_warmup()
    assert per_step == [], "tensors from Python data per step:\n" + "\n".join(map(str, per_step))


def test_the_proxy_flags_a_per_step_device_constant(tmp_path, monkeypatch):
    """What the issue fixed: `torch.tensor(IMAGENET_MEAN, device=...)` in every step is seen by the recorder."""

    def per_step_constants(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(data_utils.IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                torch.tensor(data_utils.IMAGENET_STD, device=device).view(1, 3, 1, 1))

    recorder = TensorFactoryRecorder()
    args = pretrain_args("pixel", "cpu", tmp_path, print_freq=100)
    monkeypatch.setattr(data_utils, "imagenet_mean_std", per_step_constants)
    recorder.install(monkeypatch)
    run_steps(args, lambda step: setattr(recorder, "step", step))
    assert {call.step for call in recorder.after_warmup()} == set(range(1, STEPS))


def test_the_gpu_check_turns_the_sync_debugger_on_between_logging_steps_only(tmp_path):
    """benchmarks/sync_check.py (run on a GPU by gpu_check.sh): on the CPU, with the debugger's setter recorded,
    it is "error" exactly for the steps between the first and the last, and "default" again at the end."""
    modes: list[str] = []
    stats = sync_check.check_no_sync("pixel", "cpu", tmp_path, set_mode=modes.append)
    assert torch.isfinite(torch.as_tensor(stats["loss"]))
    assert modes == ["default", *["error"] * (STEPS - 2), "default", "default", "default"]

    def failing_step(mode: str) -> None:
        modes.append(mode)
        if mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")  # what torch raises in "error" mode

    modes.clear()
    with pytest.raises(RuntimeError, match="synchronizing"):
        sync_check.check_no_sync("pixel", "cpu", tmp_path, set_mode=failing_step)
    assert modes[-1] == "default"  # never left in "error" mode


def test_the_gpu_check_counts_the_synchronising_calls_of_fp16_steps(tmp_path, monkeypatch):
    """sync_check.count_syncs (fp16 on a GPU; --amp none here, the steps stood in for): the debugger is at "warn"
    between the first and the last step and every warning it gives there is counted."""
    import warnings

    modes: list[str] = []

    def warning_debugger(mode: str) -> None:
        modes.append(mode)
        if mode == "warn":  # stands for one synchronising call in each checked step
            warnings.warn("called a synchronizing CUDA operation", UserWarning)

    def steps(args, on_step):
        for step in [*range(STEPS), -1]:
            on_step(step)

    monkeypatch.setattr(sync_check, "run_steps", steps)
    assert sync_check.count_syncs("pixel", "cpu", tmp_path, amp="none", set_mode=warning_debugger) == STEPS - 2
    assert modes.count("warn") == STEPS - 2 and modes[-1] == "default"
