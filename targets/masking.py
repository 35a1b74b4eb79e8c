"""Masking strategies: which patches the encoder sees (paper Appendix B, Tab. 12: "DeepMIM is compatible with
different masking strategies").

A strategy maps a batch of ImageNet-normalised images (N, 3, H, W) to masking NOISE (N, L) on the student's patch
grid; the model keeps the int(L (1 - r)) patches with the smallest noise (`util.patches.random_masking`), so one
noise gives one mask to every decoder, the DeepMIM-dagger generator and the figures. A strategy may be handed the
uniform numbers u (N, L) to use (seeded figures); by default it draws them with `torch.rand` on the images' device.

- random (MAE [15], Tab. 12 row 1): noise = u. Exactly the RNG calls of `MaskedAutoencoderDeepMIM.make_noise`, so a
  seed gives the masks, and the training run, it gave before strategies existed.
- semantic_aware (MILAN [23], Tab. 12 row 3): a frozen CLIP or DINO teacher (`targets.teachers`) weighs each patch
  by the attention its class token pays to it in the teacher's LAST block, averaged over heads (w, summing to 1).
  The visible patches are drawn WITHOUT replacement with probability proportional to w, through the noise
  interface: noise_i = -log(u_i) / w_i is an exponential clock of rate w_i, and the first k clocks to ring are a
  sequential draw without replacement proportional to w (the exponential race, equivalently Gumbel-top-k on
  log w_i). For k = 1 patch i comes first with probability w_i / sum(w); for k > 1 the inclusion probabilities are
  those of sequential sampling, not w itself.
- semantic-guided masking (SemMAE [28], Tab. 12 row 2) is NOT here: it needs its own part model learned before
  pre-training (an attention module that turns a pre-trained ViT's class token into part tokens whose attention
  maps segment the image into parts, trained by a StyleGAN-based decoder that rebuilds the image from those maps),
  then a schedule that moves from masking patches inside every part to masking whole parts.

timm's Attention runs fused scaled-dot-product attention and never forms the attention matrix, so the class
token's row is computed here from the last block's qkv projection of that block's input (captured by a forward
hook: no second pass through the block): softmax(q_cls k^T * scale) per head, in float32.

When the reconstruction target is the same teacher (same kind, file and architecture), ONE teacher forward per
batch gives the target features and the attention (`TeacherPass` caches the batch's result). A codebook target's
tokenizer is never the masking teacher: MILAN weighs patches by a CLIP / DINO class token, so a codebook run with
semantic-aware masking names its own (--mask_teacher, --mask_teacher_path) and pays its forward too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models_vit import attention_probs
from targets.build import Target, TeacherTarget, check_teacher_model
from targets.teachers import TEACHERS, FrozenTeacher, build_teacher
from util.patches import uniform_noise

MASK_STRATEGIES = ("random", "semantic_aware")
TEACHER_FLAGS = ("--mask_teacher", "--mask_teacher_path", "--mask_teacher_model")


class MaskStrategy(Protocol):
    """imgs (N, 3, H, W), ImageNet-normalised [, uniform (N, L) in [0, 1)] -> masking noise (N, L)."""

    name: str

    def __call__(self, imgs: Tensor, uniform: Tensor | None = None) -> Tensor: ...

    def with_grid(self, grid_size: tuple[int, int]) -> MaskStrategy: ...


class RandomMasking:
    """MAE's random masking: noise = u ~ U(0, 1), every set of visible patches equally likely (Tab. 12 row 1)."""

    name = "random"

    def __init__(self, num_patches: int):
        self.num_patches = num_patches

    def with_grid(self, grid_size: tuple[int, int]) -> RandomMasking:
        """The same strategy for a student with another patch grid."""
        return RandomMasking(grid_size[0] * grid_size[1])

    def __call__(self, imgs: Tensor, uniform: Tensor | None = None) -> Tensor:
        # `MaskedAutoencoderDeepMIM.make_noise`'s call: the same seed gives the same masks as before strategies.
        return uniform_noise(imgs.shape[0], self.num_patches, imgs.device) if uniform is None else uniform


MIN_WEIGHT = 1e-30  # weights below count as this: patches without attention come last, in random order


def sampling_noise(uniform: Tensor, weights: Tensor) -> Tensor:
    """noise_i = -log(u_i) / w_i: keeping the k smallest samples k patches without replacement, proportionally to w
    (exponential race). uniform, weights: (N, L), w >= 0. Weights under `MIN_WEIGHT` are raised to it, so that when
    fewer than k patches have attention the rest are still drawn at random (finite noise: -log(u) <= 17 in float32)."""
    return -torch.log(uniform) / weights.clamp_min(MIN_WEIGHT)


def resample_attention(weights: Tensor, from_grid: tuple[int, int], to_grid: tuple[int, int]) -> Tensor:
    """(N, h*w) patch weights on the teacher's grid -> (N, H*W) on the student's, each row summing to 1.

    The map is resized as an image with antialiased bilinear interpolation (when shrinking, a triangle filter as
    wide as the scale factor, so every teacher patch contributes to the student patches it overlaps; when enlarging,
    plain bilinear), then clamped at 0 and renormalised. On equal grids it is only renormalised.
    """
    weights = weights.float()
    if tuple(from_grid) != tuple(to_grid):
        image = weights.reshape(-1, 1, *from_grid)
        image = F.interpolate(image, size=tuple(to_grid), mode="bilinear", align_corners=False, antialias=True)
        weights = image.flatten(1).clamp_min(0)
    return weights / weights.sum(-1, keepdim=True)


class SemanticAwareMasking:
    """MILAN's semantic-aware masking (Tab. 12 row 3): visible patches drawn without replacement, proportionally to
    the teacher's class-token attention (`attention`: imgs -> (N, h*w) on `teacher_grid`), resampled to the
    student's `grid_size` (`resample_attention`)."""

    name = "semantic_aware"

    def __init__(self, attention: Callable[[Tensor], Tensor], teacher_grid: tuple[int, int],
                 grid_size: tuple[int, int]):
        self.attention, self.teacher_grid, self.grid_size = attention, tuple(teacher_grid), tuple(grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def with_grid(self, grid_size: tuple[int, int]) -> SemanticAwareMasking:
        """The same teacher for a student with another patch grid (its attention resampled to that grid)."""
        return SemanticAwareMasking(self.attention, self.teacher_grid, grid_size)

    @torch.no_grad()
    def weights(self, imgs: Tensor) -> Tensor:
        """(N, L) sampling weights on the student's grid, each row summing to 1."""
        return resample_attention(self.attention(imgs), self.teacher_grid, self.grid_size)

    @torch.no_grad()
    def __call__(self, imgs: Tensor, uniform: Tensor | None = None) -> Tensor:
        weights = self.weights(imgs)
        if uniform is None:
            uniform = uniform_noise(imgs.shape[0], self.num_patches, imgs.device)
        return sampling_noise(uniform.to(weights.device), weights)


# --------------------------------------------------------------------------------------------------------------
# The teacher's class-token attention
# --------------------------------------------------------------------------------------------------------------


def check_attention_teacher(model: nn.Module, name: str) -> None:
    """Raise ValueError unless the timm ViT has a class token and a fused qkv projection in its last block."""
    attn = getattr(model.blocks[-1], "attn", None) if hasattr(model, "blocks") else None
    if getattr(model, "cls_token", None) is None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        raise ValueError(f"--mask_teacher_model {name}: semantic-aware masking needs a ViT with a class token and "
                         "timm's Attention (a fused qkv projection) in its last block")


@contextlib.contextmanager
def last_block_qkv(model: nn.Module) -> Iterator[list[Tensor]]:
    """While open, the output (N, T, 3 * heads * head_dim) of the last block's qkv projection of every forward is
    appended to the yielded list."""
    captured: list[Tensor] = []
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda _module, _inputs, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


def class_token_attention(attn: nn.Module, qkv: Tensor, num_prefix_tokens: int) -> Tensor:
    """softmax(q_cls k^T * scale) of one timm Attention, averaged over heads, over the patch tokens only.

    qkv: (N, T, 3 * heads * head_dim), the block's qkv projection (T = prefix + patch tokens, class token first).
    Returns (N, T - num_prefix_tokens) in float32, each row renormalised to sum 1 over the patches.
    """
    probs = attention_probs(attn, qkv, num_queries=1).mean(dim=1)[:, 0]  # (N, T)
    patches = probs[:, num_prefix_tokens:]
    return patches / patches.sum(-1, keepdim=True)


class TeacherPass:
    """A frozen teacher run once per batch for both its per-token features (a target) and its class token's
    last-block attention (semantic-aware masking): the result of the last batch is kept and returned again for the
    same images tensor (same object, unmodified); it holds that batch's images and features until the next batch.
    Calling it gives the features, so it can stand in for the `FrozenTeacher` of a `TeacherTarget`. `forwards`
    counts the teacher's forward passes."""

    def __init__(self, teacher: FrozenTeacher):
        self.teacher, self.forwards = teacher, 0
        self.grid_size, self.out_dim = teacher.grid_size, teacher.out_dim
        self._last: tuple[Tensor, int, tuple[Tensor, Tensor]] | None = None

    def run(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """(features (N, L_t, out_dim), attention (N, L_t)) on the teacher's grid."""
        version = 0 if imgs.is_inference() else imgs._version  # inference tensors keep no version counter
        if self._last is not None and self._last[0] is imgs and self._last[1] == version:
            return self._last[2]
        model = self.teacher.model
        with last_block_qkv(model) as captured:
            features = self.teacher(imgs)
        with torch.no_grad():
            attention = class_token_attention(model.blocks[-1].attn, captured[-1], model.num_prefix_tokens)
        self.forwards += 1
        self._last = (imgs, version, (features, attention))
        return features, attention

    def __call__(self, imgs: Tensor) -> Tensor:
        return self.run(imgs)[0]

    def attention(self, imgs: Tensor) -> Tensor:
        return self.run(imgs)[1]


# --------------------------------------------------------------------------------------------------------------
# Flags, validation before compute, building
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskTeacher:
    """The teacher of semantic-aware masking. shared: it is the target's own teacher (one forward per batch)."""

    kind: str
    path: str
    model: str | None
    shared: bool


def add_mask_args(group: argparse._ActionsContainer, several: bool = False) -> None:
    """--mask_strategy (one; or, with `several`, one or more to compare, default random) and the teacher flags of
    semantic_aware (`add_mask_teacher_args`)."""
    group.add_argument("--mask_strategy", default=["random"] if several else "random", choices=MASK_STRATEGIES,
                       nargs="+" if several else None,
                       help="random (MAE [15]) or semantic_aware (MILAN [23]: visible patches drawn in proportion to "
                            "a frozen teacher's class-token attention); semantic-guided masking (SemMAE [28]) needs a "
                            "learned part model and is not implemented")
    add_mask_teacher_args(group)


def add_mask_teacher_args(group: argparse._ActionsContainer) -> None:
    """--mask_teacher / --mask_teacher_path / --mask_teacher_model (read by --mask_strategy semantic_aware)."""
    group.add_argument("--mask_teacher", default=None, choices=tuple(TEACHERS),
                       help="semantic_aware: the frozen teacher whose class-token attention weighs the patches "
                            "(MILAN [23] uses CLIP); default in pre-training: the --target teacher (clip / dino)")
    group.add_argument("--mask_teacher_path", default=None, type=str,
                       help="its local weight file (as --teacher_path); default in pre-training: --teacher_path when "
                            "--mask_teacher is the --target teacher (then one forward gives target and mask)")
    group.add_argument("--mask_teacher_model", default=None, type=str,
                       help="its timm architecture (default: --teacher_model for the --target teacher, else ViT-B/16 "
                            "of the kind); the file must match it")


def resolve_mask_teacher(
    mask_strategy: str,
    mask_teacher: str | None = None,
    mask_teacher_path: str | os.PathLike | None = None,
    mask_teacher_model: str | None = None,
    *,
    target: str = "pixel",
    teacher_path: str | os.PathLike | None = None,
    teacher_model: str | None = None,
    check_files: bool = True,
) -> MaskTeacher | None:
    """Validate the masking flags before any compute; the semantic-aware teacher to build, or None (random).

    A teacher flag without --mask_strategy semantic_aware is an error. semantic_aware needs a teacher kind
    (--mask_teacher, default the clip/dino --target) and a file (--mask_teacher_path, default --teacher_path when
    the kinds agree; whether it exists is not checked with `check_files` False: --print_config). Raises ValueError
    naming the flag and the allowed values.
    """
    if mask_strategy not in MASK_STRATEGIES:
        raise ValueError(f"--mask_strategy {mask_strategy!r} is unknown; choose one of {', '.join(MASK_STRATEGIES)}")
    given = [flag for flag, value in zip(TEACHER_FLAGS, (mask_teacher, mask_teacher_path, mask_teacher_model))
             if value is not None]
    if mask_strategy == "random":
        if given:
            raise ValueError(f"{', '.join(given)}: only read by --mask_strategy semantic_aware (got random)")
        return None
    kind = mask_teacher or (target if target in TEACHERS else None)  # a codebook's tokenizer is no CLIP / DINO
    if kind not in TEACHERS:
        raise ValueError(f"--mask_strategy semantic_aware needs --mask_teacher (one of {', '.join(TEACHERS)}; "
                         f"pre-training defaults it to a clip / dino --target, not {target}) and --mask_teacher_path: "
                         "the frozen teacher whose attention picks the visible patches")
    same_kind = kind == target
    path = mask_teacher_path or (teacher_path if same_kind else None)
    if not path:
        raise ValueError(f"--mask_strategy semantic_aware needs --mask_teacher_path (a local {kind.upper()} weight "
                         "file)")
    if check_files and not Path(path).is_file():
        raise ValueError(f"--mask_teacher_path {path} does not exist or is not a file")
    check_teacher_model("--mask_teacher_model", mask_teacher_model)
    model = mask_teacher_model or (teacher_model if same_kind else None)
    shared = same_kind and bool(teacher_path) and Path(path).resolve() == Path(teacher_path).resolve() \
        and model == teacher_model
    return MaskTeacher(kind, str(path), model, shared)


def mask_teacher_from_args(args: argparse.Namespace, check_files: bool = True) -> MaskTeacher | None:
    """`resolve_mask_teacher` for pre-training's flags (--mask_* and --target / --teacher_path / --teacher_model)."""
    return resolve_mask_teacher(args.mask_strategy, args.mask_teacher, args.mask_teacher_path, args.mask_teacher_model,
                                target=args.target, teacher_path=args.teacher_path, teacher_model=args.teacher_model,
                                check_files=check_files)


def build_mask_strategy(
    mask_strategy: str,
    mask_teacher: MaskTeacher | None,
    *,
    grid_size: tuple[int, int],
    target: Target | None = None,
    device: torch.device | str = "cpu",
) -> MaskStrategy:
    """The strategy of `--mask_strategy` on the student's `grid_size`. A shared teacher reuses `target`'s: its
    `FrozenTeacher` is wrapped in a `TeacherPass` (in place) so that one forward per batch serves both."""
    if mask_strategy == "random":
        return RandomMasking(grid_size[0] * grid_size[1])
    if mask_teacher is None:
        raise ValueError("--mask_strategy semantic_aware needs a teacher (see resolve_mask_teacher)")
    if mask_teacher.shared and isinstance(target, TeacherTarget):
        if not isinstance(target.teacher, TeacherPass):
            target.teacher = TeacherPass(target.teacher)
        teacher = target.teacher
    else:
        try:
            teacher = TeacherPass(build_teacher(mask_teacher.kind, mask_teacher.path, grid_size=tuple(grid_size),
                                                device=device, model_name=mask_teacher.model))
        except (ValueError, FileNotFoundError) as err:  # the teachers' messages name the target's flag
            raise ValueError(str(err).replace("--teacher_path", "--mask_teacher_path")) from err
    check_attention_teacher(teacher.teacher.model, mask_teacher.model or TEACHERS[mask_teacher.kind].model)
    return SemanticAwareMasking(teacher.attention, teacher.grid_size, grid_size)
