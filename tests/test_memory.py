"""util/memory.py: the training-memory estimate and the advice that names flags that would fit."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from torch.profiler import ProfilerActivity, profile

import models_deepmim
from util import memory

GiB = memory.GiB


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)


def held_after_forward(model: torch.nn.Module, batch: torch.Tensor) -> int:
    """Direct measurement: bytes the CPU allocator hands out during a training-mode forward and still holds while
    its output (and so the autograd graph) is alive."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output = model(batch)
    del output
    return sum(event.self_cpu_memory_usage for event in prof.events())


def test_estimate_matches_a_direct_measurement(tiny_model):
    batch = 48
    estimate = memory.estimate_training_memory(tiny_model, batch, input_size=32, amp="none", device="cpu",
                                               reserve=0, fragmentation=0)
    direct = held_after_forward(tiny_model, torch.randn(batch, 3, 32, 32))
    assert not estimate.grad_ckpt and estimate.recompute_per_image == 0
    assert 0.75 < estimate.activations / direct < 1.33, (estimate.activations, direct)


def test_state_bytes_follow_the_parameters(tiny_model):
    estimate = memory.estimate_training_memory(tiny_model, 8, input_size=32, amp="none", device="cpu", ddp=True)
    params = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert estimate.grads == estimate.ddp_buckets == 4 * params
    assert estimate.optimizer == 2 * 4 * params  # AdamW: two float32 moments
    assert estimate.weights >= 4 * params


def test_grad_checkpointing_lowers_the_estimate(tiny_model):
    plain = memory.estimate_training_memory(tiny_model, 64, input_size=32, amp="bf16", device="cpu")
    tiny_model.set_grad_checkpointing(True)
    try:
        ckpt = memory.estimate_training_memory(tiny_model, 64, input_size=32, amp="bf16", device="cpu")
    finally:
        tiny_model.set_grad_checkpointing(False)
    assert ckpt.grad_ckpt and ckpt.recompute_per_image > 0
    assert ckpt.activations < 0.7 * plain.activations
    assert plain.with_grad_ckpt().total == pytest.approx(ckpt.total, rel=0.05)
    assert not tiny_model.grad_checkpointing  # the estimate restores the model's mode


def test_autocast_weight_copies_are_a_fixed_cost(tiny_model):
    """Under bf16 autocast the weights' bf16 copies are saved once per forward, whatever the batch."""
    estimate = memory.estimate_training_memory(tiny_model, 8, input_size=32, amp="bf16", device="cpu")
    matrices = sum(p.numel() for n, p in tiny_model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n)
    assert 0.5 * 2 * matrices < estimate.fixed_activations < 2 * 2 * matrices


def fake_estimate(batch_size: int = 128, grad_ckpt_per_image: int | None = 20 * 2**20) -> memory.MemoryEstimate:
    """ViT-B-like numbers: 80 MiB per image, 3 GiB of weights / grads / AdamW / buckets / reserve."""
    return memory.MemoryEstimate(
        batch_size=batch_size, grad_ckpt=False, activations_per_image=80 * 2**20, fixed_activations=0,
        recompute_per_image=0, weights=GiB // 2, grads=GiB // 2, optimizer=GiB, ddp_buckets=GiB // 2,
        reserve=GiB // 2, activations_per_image_plain=80 * 2**20, activations_per_image_ckpt=grad_ckpt_per_image,
        recompute_per_image_ckpt=2 * 2**20, fragmentation=0.0,
    )


def test_advice_absent_when_it_fits():
    assert memory.memory_advice(fake_estimate(), 80 * GiB, device_name="NVIDIA H100 80GB HBM3") is None


def test_advice_names_flags_that_fit_on_a_16gb_v100():
    estimate = fake_estimate()  # 10 GiB + 3 GiB of activations and states
    advice = memory.memory_advice(estimate, 14 * GiB, accum_iter=2, device_name="Tesla V100-SXM2-16GB")
    assert advice is not None
    assert "--batch_size 64 --accum_iter 4" in advice  # the same effective batch: 128 x 2 = 64 x 4
    assert "--grad_ckpt" in advice and "--use_volta32" in advice
    assert memory.memory_advice(estimate.with_batch(64), 14 * GiB) is None


def test_advice_without_a_checkpointing_measurement_or_on_other_gpus():
    advice = memory.memory_advice(fake_estimate(grad_ckpt_per_image=None), 12 * GiB, device_name="NVIDIA A10")
    assert advice is not None and "--batch_size" in advice
    assert "--grad_ckpt" not in advice and "--use_volta32" not in advice


def test_advice_when_nothing_fits():
    advice = memory.memory_advice(fake_estimate(), 2 * GiB)
    assert advice is not None and "none found" in advice


def test_estimate_leaves_the_random_streams_alone(tiny_model):
    """The probes draw masking noise: a start-up estimate must not shift the run's masks."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    memory.estimate_training_memory(tiny_model, 8, input_size=32, amp="none", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_pretraining_start_up_check_warns_with_the_flags_that_fit(monkeypatch, caplog):
    """util.memory.warn_if_memory_short runs on CUDA only (main_pretrain calls it at start): here the device queries
    are mocked, the estimate is real."""
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)
    batch = memory.image_batch(32, "cpu")
    needed = memory.estimate_training_memory(model, 4096, input_size=32, amp="none", device="cpu").total
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, needed))  # just too small
    with caplog.at_level("WARNING"):
        memory.warn_if_memory_short(model, 4096, batch, "none", 1, torch.device("cpu"), world_size=1)
    assert "--grad_ckpt" in caplog.text and "--batch_size" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))  # plenty
    with caplog.at_level("WARNING"):
        memory.warn_if_memory_short(model, 4096, batch, "none", 1, torch.device("cpu"), world_size=1)
    assert "--grad_ckpt" not in caplog.text


def test_a_failing_estimate_warns_and_the_run_goes_on(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def broken(n):
        raise RuntimeError("The size of tensor a (108) must match the size of tensor b (768)")

    with caplog.at_level("WARNING"):
        result = memory.warn_if_memory_short(tiny_model, 8, broken, "none", 1, torch.device("cpu"), world_size=1)
    assert result is None and "memory estimate failed (RuntimeError: The size of tensor a (108)" in caplog.text


class Holder:
    def __init__(self, teacher):
        self.teacher = teacher

    def attention(self, imgs):
        return imgs


def test_frozen_networks_held_by_targets_functions_are_found_and_counted(tiny_model):
    """Teachers and generators hide in closures, bound methods, partials and attributes: all are found, and only
    weights that are not the student's are counted."""
    import functools

    teacher, generator = torch.nn.Linear(10, 10), torch.nn.Linear(20, 5).half()

    def targets_fn(imgs, noise):
        return generator(teacher(imgs))

    found = memory.reachable_modules(targets_fn, Holder(teacher).attention,
                                     functools.partial(print, [tiny_model]), None, 3)
    assert {id(m) for m in found} == {id(teacher), id(generator), id(tiny_model)}
    expected = (10 * 10 + 10) * 4 + (20 * 5 + 5) * 2
    assert memory.frozen_bytes(tiny_model, found) == expected
    estimate = memory.estimate_training_memory(tiny_model, 8, input_size=32, amp="none", device="cpu",
                                               frozen=found)
    plain = memory.estimate_training_memory(tiny_model, 8, input_size=32, amp="none", device="cpu")
    assert estimate.frozen == expected and estimate.total - plain.total == expected
