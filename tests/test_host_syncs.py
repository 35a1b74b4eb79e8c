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

CUDA (skipped without a GPU; `benchmarks/gpu_check.sh` runs it): the same steps with
`torch.cuda.set_sync_debug_mode("error")` over the steps between the first and the last (those two read the losses
back for logging, which is a deliberate sync every `--print_freq` steps), so any synchronising call raises.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from conftest import ROOT, TINY_FLAGS

import main_pretrain
from engine_pretrain import train_one_epoch
from util import datasets as data_utils
from util import hog
from util.amp import configure_backends, resolve_machine

STEPS = 5


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


class Steps:
    """The first `steps` batches of a loader; `on_step(i)` runs right before batch i is handed to the engine, after
    the loader has produced it (the loader's own work is not part of the checked step)."""

    def __init__(self, loader: Iterable, steps: int, on_step: Callable[[int], None]):
        self.loader, self.steps, self.on_step = loader, steps, on_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        for step, batch in zip(range(self.steps), self.loader):
            self.on_step(step)
            yield batch
        self.on_step(-1)


def pretrain_args(target: str, device: str, output_dir: Path, print_freq: int) -> argparse.Namespace:
    """main_pretrain's flags for a tiny DeepMIM on the demo photographs, resolved for this machine."""
    parser = main_pretrain.get_args_parser()
    argv = ["--demo", *TINY_FLAGS, "--target", target, "--device", device, "--batch_size", "4", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", str(print_freq),
            "--output_dir", str(output_dir)]
    args = main_pretrain.resolve_args(parser.parse_args(argv), parser)
    main_pretrain.validate_args(args)
    resolve_machine(args)
    return args


def run_steps(args: argparse.Namespace, on_step: Callable[[int], None]) -> dict[str, float]:
    """`STEPS` pre-training steps of epoch 0, built as main_pretrain builds a run."""
    device = torch.device(args.device)
    configure_backends(device)
    dataset = main_pretrain.build_dataset(args)
    loader = main_pretrain.build_loader(dataset, args)
    loader.sampler.set_epoch(0)
    target = main_pretrain.build_target(args, device)
    model = main_pretrain.build_model(args, target.pred_dim, target.loss_type).to(device)
    args.lr, args.max_bad_images = args.blr * args.batch_size / 256, 0
    optimizer = main_pretrain.build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    targets_fn = main_pretrain.build_targets_fn(args, target, model, device)
    return train_one_epoch(model, Steps(loader, STEPS, on_step), optimizer, scaler, device, 0, args, targets_fn)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("target", ["pixel", "hog"])
def test_no_host_sync_between_logging_steps_on_cuda(target, tmp_path):
    args = pretrain_args(target, "cuda", tmp_path, print_freq=100)  # logs (and syncs) at the first and last step

    def sync_debug_mode(step: int) -> None:
        torch.cuda.set_sync_debug_mode("error" if 1 <= step < STEPS - 1 else "default")

    try:
        stats = run_steps(args, sync_debug_mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.as_tensor(stats["loss"]))
