"""Training-memory estimate of a model on a device, and the flags to use when it would not fit (issue: GPU readiness).

What one training step keeps on the device, per process:

- weights (parameters and buffers), gradients of the trainable parameters, the optimizer's state (AdamW: two
  float32 moments per trainable parameter) and, under DDP, its gradient buckets (one more copy of the gradients:
  `gradient_as_bucket_view=False`, torch's default); the weights of frozen networks the step also runs (teachers,
  the DeepMIM+ generator: `frozen`, found by `reachable_modules`);
- activations: the tensors autograd saves for the backward. They are measured, not modelled: a forward at two small
  batch sizes runs under `torch.autograd.graph.saved_tensors_hooks`, every saved tensor is counted once per storage
  (views share one), parameters are left out (counted as weights), and the two totals give a per-image cost and a
  fixed part (under autocast, the low-precision copies of the weights, cached once per forward);
- with activation checkpointing, the one block being recomputed in the backward holds its full activations: the
  largest item of any `nn.ModuleList` (the Transformer blocks) measured without checkpointing is added;
- the caching allocator's rounding and fragmentation: `fragmentation` (default 10 %) of the activations, the
  gap usually seen between peak allocated and peak reserved memory in transformer training (benchmarks/gpu_check.py
  measures it: estimate vs peak reserved);
- a reserve for the CUDA context and cuBLAS / cuDNN workspaces.

`memory_advice` turns an estimate and the GPU's total memory into a warning that names the flags that would fit.
This module imports nothing of the project: the model is an argument.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

GiB = 2**30
MiB = 2**20
ADVICE_FRACTION = 0.9  # warn when the estimate exceeds this share of the GPU's memory
DEFAULT_RESERVE = 768 * MiB  # CUDA context (~300-500 MiB), cuBLAS / cuDNN workspaces
DEFAULT_FRAGMENTATION = 0.10  # peak reserved / peak allocated - 1, applied to the activations
V100_32GB = 32 * GiB

MakeBatch = Callable[[int], Sequence[Any]]  # batch size -> positional arguments of model(...)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs; `total` is what to compare with the GPU's memory.

    activations_per_image: saved-for-backward bytes per image in the model's current mode;
    activations_per_image_plain / _ckpt: the same without / with activation checkpointing (None when the model
    cannot switch it: no `set_grad_checkpointing`); recompute_per_image: the largest block's activations, held while
    a checkpointed block is recomputed (0 without checkpointing); fixed_activations: the batch-independent part of
    the saved tensors (autocast's weight copies); frozen: weights of frozen teachers / generators."""

    batch_size: int
    grad_ckpt: bool
    activations_per_image: int
    fixed_activations: int
    recompute_per_image: int
    weights: int
    grads: int
    optimizer: int
    ddp_buckets: int
    reserve: int
    activations_per_image_plain: int | None = None
    activations_per_image_ckpt: int | None = None
    recompute_per_image_ckpt: int = 0
    fragmentation: float = DEFAULT_FRAGMENTATION
    frozen: int = 0

    @property
    def activations(self) -> int:
        """Activation bytes of the whole batch (saved tensors plus a recomputed block), with the allocator's
        fragmentation."""
        saved = self.batch_size * (self.activations_per_image + self.recompute_per_image) + self.fixed_activations
        return int(saved * (1 + self.fragmentation))

    @property
    def states(self) -> int:
        """Batch-independent bytes: weights (the model's and frozen networks'), gradients, optimizer state, DDP
        buckets, reserve."""
        return self.weights + self.frozen + self.grads + self.optimizer + self.ddp_buckets + self.reserve

    @property
    def total(self) -> int:
        return self.activations + self.states

    def with_ddp(self) -> "MemoryEstimate":
        """The same run under DDP: one more copy of the gradients (its buckets)."""
        return replace(self, ddp_buckets=self.grads)

    def with_batch(self, batch_size: int) -> "MemoryEstimate":
        """The same run at another per-process batch size."""
        return replace(self, batch_size=batch_size)

    def with_grad_ckpt(self) -> "MemoryEstimate | None":
        """The same run with activation checkpointing (None when it was not measured)."""
        if self.grad_ckpt:
            return self
        if self.activations_per_image_ckpt is None:
            return None
        return replace(self, grad_ckpt=True, activations_per_image=self.activations_per_image_ckpt,
                       recompute_per_image=self.recompute_per_image_ckpt)

    def summary(self) -> dict[str, float | int | bool]:
        """The estimate in MiB / GiB, for logs and JSON."""
        return {
            "batch_size": self.batch_size, "grad_ckpt": self.grad_ckpt,
            "activations_mib_per_image": (self.activations_per_image + self.recompute_per_image) / MiB,
            "activations_gib": self.activations / GiB, "weights_gib": self.weights / GiB,
            "frozen_gib": self.frozen / GiB, "grads_gib": self.grads / GiB, "optimizer_gib": self.optimizer / GiB,
            "ddp_buckets_gib": self.ddp_buckets / GiB, "reserve_gib": self.reserve / GiB, "total_gib": self.total / GiB,
        }


# ------------------------------------------------------------------------------------------------------------------
# Measuring saved tensors
# ------------------------------------------------------------------------------------------------------------------


def storage_key(tensor: Tensor) -> tuple[str, int] | None:
    """(device, address) of a tensor's storage; None for tensors without one (e.g. some wrapper subclasses)."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return str(tensor.device), storage.data_ptr()


class SavedTensorMeter:
    """Counts the bytes of the distinct storages autograd saves for the backward inside `with meter.record():`.

    Storages in `exclude` (the parameters and buffers) are not counted; `total` is the running count, which module
    hooks read to attribute bytes to a block."""

    def __init__(self, exclude: Iterator[Tensor] | Sequence[Tensor] = ()):
        self.seen: set[tuple[str, int]] = set()
        self.excluded = {k for k in map(storage_key, exclude) if k is not None}
        self.total = 0

    def _pack(self, tensor: Tensor) -> Tensor:
        key = storage_key(tensor)
        if key is not None and key not in self.seen and key not in self.excluded:
            self.seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor  # keep it: the storage stays alive, so its address is not reused during the forward

    def count(self, tensors: Sequence[Tensor]) -> None:
        """Count tensors that live through the step besides saved ones (the input batch)."""
        for tensor in tensors:
            if isinstance(tensor, Tensor):
                self._pack(tensor)

    @contextlib.contextmanager
    def record(self) -> Iterator["SavedTensorMeter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


@contextlib.contextmanager
def block_meter(model: nn.Module, meter: SavedTensorMeter) -> Iterator[list[int]]:
    """Yields a list that receives, per forward of each item of an `nn.ModuleList` (the Transformer blocks), the
    bytes saved inside it."""
    sizes: list[int] = []
    starts: dict[int, int] = {}
    handles = []

    def pre(module: nn.Module, args: Any) -> None:
        starts[id(module)] = meter.total

    def post(module: nn.Module, args: Any, output: Any) -> None:
        sizes.append(meter.total - starts.pop(id(module), meter.total))

    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The training autocast: bf16 / fp16 on `device`, nothing for 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


def measure_saved_bytes(model: nn.Module, batch: Sequence[Any], amp: str = "none") -> tuple[int, int]:
    """(bytes saved for the backward by one training-mode forward of `model(*batch)` plus the batch itself, the
    largest share of one ModuleList item). No backward runs; the graph is freed on return."""
    device = next(model.parameters()).device
    meter = SavedTensorMeter([*model.parameters(), *model.buffers()])
    meter.count(batch)
    was_training = model.training
    model.train(True)
    try:
        with torch.enable_grad(), block_meter(model, meter) as blocks, meter.record(), autocast_for(device, amp):
            output = model(*batch)
        del output
    finally:
        model.train(was_training)
    return meter.total, max(blocks, default=0)


def per_image_saved_bytes(model: nn.Module, make_batch: MakeBatch, amp: str,
                          probe_batch: int = 2) -> tuple[int, int, int]:
    """(per-image bytes, fixed bytes, largest block per image) from forwards at `probe_batch` and twice that: the
    difference is per image; what is left at zero images is the fixed part (autocast's weight copies)."""
    small, block_small = measure_saved_bytes(model, make_batch(probe_batch), amp)
    large, block_large = measure_saved_bytes(model, make_batch(2 * probe_batch), amp)
    per_image = max(0, (large - small) // probe_batch)
    fixed = max(0, small - per_image * probe_batch)
    block = max(0, (block_large - block_small) // probe_batch)
    return per_image, fixed, block


@contextlib.contextmanager
def grad_checkpointing(model: nn.Module, enable: bool) -> Iterator[None]:
    """Switch the model's activation checkpointing (timm's `set_grad_checkpointing`) inside the block."""
    before = bool(getattr(model, "grad_checkpointing", False))
    model.set_grad_checkpointing(enable)
    try:
        yield
    finally:
        model.set_grad_checkpointing(before)


# ------------------------------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------------------------------


def tensor_bytes(tensors: Iterator[Tensor] | Sequence[Tensor]) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def reachable_modules(*roots: Any, max_depth: int = 6) -> list[nn.Module]:
    """The nn.Modules that `roots` hold: themselves, their attributes, the objects of bound methods, the variables
    a function closes over, the parts of a functools.partial and the items of containers, `max_depth` levels deep.
    What a run's targets function, target object and masking strategy keep alive (teachers, a generator), whatever
    kind of target they are."""
    found: dict[int, nn.Module] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if depth > max_depth or id(obj) in seen or isinstance(obj, (Tensor, type, types.ModuleType, str, bytes)):
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found[id(obj)] = obj
            return
        if isinstance(obj, types.MethodType):
            children: list[Any] = [obj.__self__, obj.__func__]
        elif isinstance(obj, types.FunctionType):
            children = [cell.cell_contents for cell in obj.__closure__ or () if _cell_filled(cell)]
        elif isinstance(obj, functools.partial):
            children = [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        else:
            children = list(getattr(obj, "__dict__", {}).values())
        for child in children:
            visit(child, depth + 1)

    for root in roots:
        visit(root, 0)
    return list(found.values())


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a variable not yet bound
        return False
    return True


def frozen_bytes(model: nn.Module, modules: Sequence[nn.Module]) -> int:
    """Bytes of the distinct parameter and buffer storages of `modules` that are not `model`'s."""
    own = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    counted: dict[tuple[str, int], int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            key = storage_key(tensor)
            if key is not None and key not in own:
                counted[key] = tensor.untyped_storage().nbytes()
    return sum(counted.values())


def image_batch(input_size: int | tuple[int, int], device: torch.device | str,
                channels: int = 3) -> MakeBatch:
    """make_batch for models called as model(images): normalised float32 images of `input_size`."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size

    def make(batch_size: int) -> tuple[Tensor]:
        generator = torch.Generator().manual_seed(batch_size)
        return (torch.randn(batch_size, channels, height, width, generator=generator).to(device),)

    return make


def estimate_training_memory(
    model: nn.Module,
    batch_size: int,
    *,
    input_size: int | tuple[int, int] = 224,
    make_batch: MakeBatch | None = None,
    amp: str = "bf16",
    device: torch.device | str | None = None,
    optimizer_states: int = 2,
    ddp: bool = False,
    probe_batch: int = 2,
    reserve: int = DEFAULT_RESERVE,
    fragmentation: float = DEFAULT_FRAGMENTATION,
    frozen: Sequence[nn.Module] = (),
) -> MemoryEstimate:
    """Estimate one process's training memory at `batch_size` images per step.

    model: on `device` (default: the device of its parameters), in the configuration it will train in (its
    `grad_checkpointing` decides `grad_ckpt`). make_batch(n): the positional arguments of `model(...)` for n
    images (default: float images of `input_size`). amp: 'bf16', 'fp16' or 'none', as the training autocast.
    optimizer_states: float32 tensors per trainable parameter (AdamW: 2). ddp: add DDP's gradient buckets.
    probe_batch: images of the smaller of the two measuring forwards (the other has twice as many); the global RNG
    states (CPU, and CUDA for a CUDA device) are restored afterwards. reserve: bytes
    for the CUDA context and workspaces (pass 0 on the CPU); fragmentation: allocator overhead on activations.
    frozen: networks the step runs besides `model` (teachers, generators): their weights are counted.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    make_batch = make_batch or image_batch(input_size, device)
    switchable = hasattr(model, "set_grad_checkpointing")
    ckpt_now = bool(getattr(model, "grad_checkpointing", False))
    per_mode: dict[bool, tuple[int, int, int]] = {}
    # the probes draw masking noise from the global RNGs: leave the run's random streams as they were
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for mode in ((False, True) if switchable else (ckpt_now,)):
            with grad_checkpointing(model, mode) if switchable else contextlib.nullcontext():
                per_mode[mode] = per_image_saved_bytes(model, make_batch, amp, probe_batch)
    per_image, fixed, _ = per_mode[ckpt_now]
    largest_block = per_mode[False][2] if False in per_mode else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = tensor_bytes(trainable)
    return MemoryEstimate(
        batch_size=batch_size, grad_ckpt=ckpt_now, activations_per_image=per_image, fixed_activations=fixed,
        recompute_per_image=largest_block if ckpt_now else 0,
        weights=tensor_bytes([*model.parameters(), *model.buffers()]), grads=grads,
        optimizer=optimizer_states * sum(p.numel() * 4 for p in trainable), ddp_buckets=grads if ddp else 0,
        reserve=reserve,
        activations_per_image_plain=per_mode[False][0] if False in per_mode else None,
        activations_per_image_ckpt=per_mode[True][0] if True in per_mode else None,
        recompute_per_image_ckpt=largest_block, fragmentation=fragmentation, frozen=frozen_bytes(model, frozen),
    )


# ------------------------------------------------------------------------------------------------------------------
# Advice
# ------------------------------------------------------------------------------------------------------------------


def fits(estimate: MemoryEstimate, total_bytes: int, fraction: float = ADVICE_FRACTION) -> bool:
    """True when the estimate is within `fraction` of `total_bytes`."""
    return estimate.total <= fraction * total_bytes


def largest_fitting_batch(estimate: MemoryEstimate, total_bytes: int,
                          fraction: float = ADVICE_FRACTION) -> int | None:
    """The largest divisor of the batch size (so that --accum_iter keeps the effective batch) that fits."""
    for batch in range(estimate.batch_size, 0, -1):
        if estimate.batch_size % batch == 0 and fits(estimate.with_batch(batch), total_bytes, fraction):
            return batch
    return None


def memory_advice(
    estimate: MemoryEstimate,
    total_bytes: int,
    *,
    accum_iter: int = 1,
    fraction: float = ADVICE_FRACTION,
    device_name: str | None = None,
) -> str | None:
    """None when `estimate` fits in `fraction` of `total_bytes`; otherwise a warning naming flags that would fit:
    `--batch_size N --accum_iter M` (the same effective batch), `--grad_ckpt`, and on V100s `--use_volta32`
    (submitit launchers: a 32 GB V100 on SLURM)."""
    if fits(estimate, total_bytes, fraction):
        return None
    gib = GiB
    where = f"{device_name} ({total_bytes / gib:.1f} GiB)" if device_name else f"this GPU ({total_bytes / gib:.1f} GiB)"
    lines = [f"estimated training memory {estimate.total / gib:.1f} GiB at --batch_size {estimate.batch_size} "
             f"exceeds {100 * fraction:.0f} % of {where}; likely out of memory. Options that fit:"]
    smaller = largest_fitting_batch(estimate, total_bytes, fraction)
    if smaller is not None:
        factor = estimate.batch_size // smaller
        lines.append(f"  --batch_size {smaller} --accum_iter {accum_iter * factor} (same effective batch; "
                     f"{estimate.with_batch(smaller).total / gib:.1f} GiB)")
    ckpt = estimate.with_grad_ckpt()
    if ckpt is not None and not estimate.grad_ckpt:
        if fits(ckpt, total_bytes, fraction):
            lines.append(f"  --grad_ckpt (activation checkpointing, ~1/3 more compute; {ckpt.total / gib:.1f} GiB)")
        else:
            both = largest_fitting_batch(ckpt, total_bytes, fraction)
            if both is not None:
                factor = estimate.batch_size // both
                lines.append(f"  --grad_ckpt --batch_size {both} --accum_iter {accum_iter * factor} "
                             f"({ckpt.with_batch(both).total / gib:.1f} GiB)")
    # an unnamed GPU of about 16 GB may be a V100 (a 16 GB V100 reports 15.8 GiB)
    is_v100 = "V100" in device_name.upper() if device_name else 14 * gib <= total_bytes <= 17 * gib
    if is_v100 and total_bytes < V100_32GB and fits(estimate, V100_32GB, fraction):
        lines.append("  --use_volta32 (submitit launchers on SLURM: a 32 GB V100)")
    if len(lines) == 1:
        lines.append("  none found: use more GPUs, a smaller model or a smaller --input_size")
    return "\n".join(lines)


def warn_if_memory_short(model: nn.Module, batch_size: int, make_batch: MakeBatch, amp: str, accum_iter: int,
                         device: torch.device, world_size: int,
                         frozen: Sequence[nn.Module] = ()) -> MemoryEstimate | None:
    """Start-up check on CUDA: estimate this GPU's peak memory for the chosen batch (a few small forwards of
    `model(*make_batch(n))`, the run's own inputs and targets), log it, and warn, naming the flags that would fit
    (--batch_size/--accum_iter, --grad_ckpt, --use_volta32). `frozen`: teachers / generator, counted as weights.
    The estimate only advises: if it fails, a warning says so and the run goes on (returns None)."""
    try:
        estimate = estimate_training_memory(model, batch_size, make_batch=make_batch, amp=amp, device=device,
                                            ddp=world_size > 1, frozen=frozen)
        _, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    except Exception as err:  # noqa: BLE001 - advice must never end a run
        logger.warning("start-up memory estimate failed (%s: %s); training goes on without it",
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
    finally:
        torch.cuda.empty_cache()
    logger.info("memory estimate %.1f GiB of %.1f GiB: %s", estimate.total / 2**30, total / 2**30, estimate.summary())
    advice = memory_advice(estimate, total, accum_iter=accum_iter, device_name=name)
    if advice:
        logger.warning(advice)
    return estimate
