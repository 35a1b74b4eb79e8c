"""One epoch of DeepMIM pre-training: the masking noise every decoder shares (drawn by the run's masking strategy,
paper Tab. 12), the reconstruction targets, and the summed decoder losses (Eq. 2), run by
`util.training.train_epoch` (autocast, gradient accumulation, grad scaling, per-iteration lr schedule); the
reconstruction panels logged during training; and the pieces main_pretrain.py builds a run from (data, loader, model,
AdamW, target, DeepMIM+ targets).

The step never waits for the device: losses stay on the device and are read only every `print_freq` steps, when
they are also checked for non-finite values (the step that first went bad is named).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import models_deepmim
import targets.build
from analysis.visualize import reconstruction_panels
from targets.build import Target
from targets.hybrid import HybridGenerator, check_hybrid_args, hybrid_targets_fn
from util import distributed, memory
from util.datasets import (
    DemoPhotos,
    ResumableDistributedSampler,
    RobustSeededDataset,
    ignore_stop_signals,
    normalize_on_device,
)
from util.fast_data import build_fast_pretrain_dataset
from util.training import NonFiniteLossError, OnUpdate, autocast_context, train_epoch

__all__ = ["MaskNoiseFn", "NonFiniteLossError", "TargetsFn", "autocast_context", "build_dataset", "build_loader",
           "build_model", "build_optimizer", "build_target", "build_targets_fn", "compute_targets", "reconstructions",
           "memory_probe", "step_inputs", "train_one_epoch", "warn_if_memory_short"]

logger = logging.getLogger(__name__)

# targets_fn(imgs, noise) -> None (pixel targets), (N, L, C), or {block: (N, L, C)}
TargetsFn = Callable[[Tensor, Tensor], Any]
# mask_noise_fn(imgs[, uniform]) -> (N, L) masking noise, the smallest kept (a `targets.masking.MaskStrategy`)
MaskNoiseFn = Callable[..., Tensor]


def compute_targets(targets_fn: TargetsFn | None, imgs: Tensor, noise: Tensor) -> Any:
    """Every reconstruction target (HOG, teacher features, codebook ids, the DeepMIM+ blend of Eq. 1) is computed
    here, in float32 with autocast off, whatever region the caller is in: frozen teachers, tokenizers and the
    generator open their own autocast for their forward pass, and floating-point outputs are cast back to float32
    (integer ones, the codebook's token ids, are exact in any precision and stay integers). None (pixel targets) lets
    the model compute them, also in float32 (`MaskedAutoencoderDeepMIM.pixel_targets`)."""
    if targets_fn is None:
        return None
    with torch.autocast(imgs.device.type, enabled=False):
        targets = targets_fn(imgs.float(), noise)
    if isinstance(targets, Tensor):
        return _full_precision(targets)
    return {block: _full_precision(target) for block, target in targets.items()}


def _full_precision(target: Tensor) -> Tensor:
    """float32 for values (a frozen net's autocast may hand back bf16 / fp16); integer ids unchanged."""
    return target.float() if target.is_floating_point() else target


def train_one_epoch(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    args: Any,
    targets_fn: TargetsFn | None = None,
    log_writer: Any = None,
    start_step: int = 0,
    on_update: OnUpdate | None = None,
    mask_noise_fn: MaskNoiseFn | None = None,
) -> dict[str, float]:
    """Train for one epoch (`util.training.train_epoch`); returns the epoch's average of every logged value (loss,
    loss_b<k>, lr) and the number of unreadable images skipped (`bad_images`).

    Each step draws one masking noise that every decoder and the DeepMIM-dagger generator share (`mask_noise_fn`,
    the run's masking strategy; None: the model's uniform noise, MAE's random masking), computes the targets
    (`compute_targets`) and sums the decoders' losses (Eq. 2, in the model's forward).
    """
    raw_model = model.module if hasattr(model, "module") else model

    def step_loss(samples: Tensor, _labels: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        imgs, noise, targets = step_inputs(raw_model, samples, device, targets_fn, mask_noise_fn)
        with autocast_context(device, args.amp):
            loss, losses, _, _ = model(imgs, args.mask_ratio, noise=noise, targets=targets)
        return loss, losses

    return train_epoch(model, data_loader, optimizer, scaler, epoch, args, step_loss, log_writer=log_writer,
                       start_step=start_step, on_update=on_update)


def step_inputs(model: nn.Module, samples: Tensor, device: torch.device, targets_fn: TargetsFn | None,
                mask_noise_fn: MaskNoiseFn | None) -> tuple[Tensor, Tensor, Any]:
    """What one step feeds the model: the normalised images on the device, the masking noise that every decoder and
    the generator share (the run's masking strategy; None: the model's uniform noise) and the targets."""
    imgs = normalize_on_device(samples, device)
    noise = model.make_noise(imgs.shape[0], device) if mask_noise_fn is None else mask_noise_fn(imgs)
    return imgs, noise, compute_targets(targets_fn, imgs, noise)


def memory_probe(model: nn.Module, args: argparse.Namespace, device: torch.device, targets_fn: TargetsFn | None,
                 mask_noise_fn: MaskNoiseFn | None,
                 frozen_owners: Iterable[Any] = ()) -> tuple[memory.MakeBatch, list[nn.Module]]:
    """What `util.memory` needs to estimate a pre-training run: make_batch(n) builds the step's own model inputs
    from n random uint8 images through `step_inputs` (the run's targets and masking noise, whatever the target
    kind), and the frozen networks that `targets_fn`, `mask_noise_fn` and `frozen_owners` hold."""

    def make_batch(n: int) -> tuple[Any, ...]:
        generator = torch.Generator().manual_seed(n)
        samples = torch.randint(0, 256, (n, 3, args.input_size, args.input_size), dtype=torch.uint8,
                                generator=generator)
        imgs, noise, targets = step_inputs(model, samples, device, targets_fn, mask_noise_fn)
        return imgs, args.mask_ratio, noise, targets

    return make_batch, memory.reachable_modules(targets_fn, mask_noise_fn, *frozen_owners)


def warn_if_memory_short(model: nn.Module, args: argparse.Namespace, device: torch.device, world_size: int,
                         targets_fn: TargetsFn | None, mask_noise_fn: MaskNoiseFn | None,
                         frozen_owners: Iterable[Any] = ()) -> memory.MemoryEstimate | None:
    """The start-up memory estimate (`util.memory.warn_if_memory_short`) on the run's own step inputs
    (`memory_probe`), the frozen teachers / generator counted. None when the estimate failed (it only advises: a
    warning, and the run goes on)."""
    make_batch, frozen = memory_probe(model, args, device, targets_fn, mask_noise_fn, frozen_owners)
    return memory.warn_if_memory_short(model, args.batch_size, make_batch, args.amp, args.accum_iter, device,
                                       world_size, frozen=frozen)


@torch.no_grad()
def reconstructions(model: nn.Module, dataset: Any, targets_fn: TargetsFn | None, mask_ratio: float,
                    num_images: int = 8, mask_noise_fn: MaskNoiseFn | None = None) -> dict:
    """Panels (original, masked, every decoder, DeepMIM+ targets) for the first images with a fixed mask: uniform
    numbers from a generator seeded by 0, turned into noise by the run's masking strategy (`mask_noise_fn`)."""
    device = next(model.parameters()).device
    samples = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
    imgs = normalize_on_device(samples, device)
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    if mask_noise_fn is not None:
        noise = mask_noise_fn(imgs, noise)
    hybrid = compute_targets(targets_fn, imgs, noise)  # None for pixel targets, {block: target} for DeepMIM+
    return reconstruction_panels(model, imgs, noise, mask_ratio, hybrid_targets=hybrid)


# ------------------------------------------------------------------------------------------------------------------
# Building blocks of a pre-training run (from main_pretrain.py's validated flags)
# ------------------------------------------------------------------------------------------------------------------


def build_dataset(args: argparse.Namespace) -> RobustSeededDataset:
    """Crops drawn per (seed, epoch, index), broken files replaced and counted."""
    dataset = DemoPhotos(args.input_size, samples_per_photo=32) if args.demo else \
        build_fast_pretrain_dataset(args.data_path, args.input_size)
    return RobustSeededDataset(dataset, args.seed)


def build_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    sampler = ResumableDistributedSampler(
        dataset, args.batch_size, num_replicas=distributed.get_world_size(), rank=distributed.get_rank(),
        shuffle=True, seed=args.seed, drop_last=True,
    )
    return DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=True,
        worker_init_fn=ignore_stop_signals,  # SLURM signals loader workers too: only the main process reacts
        persistent_workers=args.num_workers > 0,  # the epoch travels with the sampler's indices, not set_epoch
        generator=torch.Generator().manual_seed(args.seed),  # leaves the global RNG (masking noise) alone
    )


def build_model(args: argparse.Namespace, pred_dim: int | None = None, loss_type: str = "mse"):
    return models_deepmim.create_model(
        args.model, img_size=args.input_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads, decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
        supervised_blocks=args.supervised_blocks, shared_decoder=args.shared_decoder or None,
        loss_weights=args.loss_weights, norm_pix_loss=args.norm_pix_loss, pred_dim=pred_dim,
        loss_type=None if loss_type == "mse" else loss_type,
    )


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95) as MAE (paper Appendix A); no weight decay on biases, norms, tokens and pos-embeds."""
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    # Fused AdamW on every device: 0.43 s vs 0.98 s (foreach) per ViT-B DeepMIM update here (benchmarks/RESULTS.md)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)


def build_target(args: argparse.Namespace, device: torch.device) -> Target:
    return targets.build.build_target(
        args.target, patch_size=models_deepmim.encoder_patch_size(args.model, args.patch_size),
        img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, teacher_path=args.teacher_path, device=device,
        teacher_model=args.teacher_model,
    )


def build_targets_fn(args: argparse.Namespace, target: Target, model, device: torch.device) -> TargetsFn | None:
    """What each decoder reconstructs from (imgs, noise); None: the model's own pixel targets (cheapest)."""
    if args.hybrid_generator is None:
        return None if args.target == "pixel" else (lambda imgs, noise: target(imgs))
    generator = HybridGenerator.from_file(args.hybrid_generator, student_norm_pix=args.norm_pix_loss, device=device)
    generator.check_student(model.patch_size, model.grid_size)
    alphas = check_hybrid_args(args.hybrid_generator, args.hybrid_alphas, model.supervised_blocks)
    logger.info("DeepMIM+: generator %s, alphas %s for blocks %s", args.hybrid_generator, alphas,
                model.supervised_blocks)

    return hybrid_targets_fn(generator, target, alphas, model.supervised_blocks, args.mask_ratio)
