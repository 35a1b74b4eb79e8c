"""What each decoder reconstructs: one small target class per kind behind one interface (paper Tab. 2, Tab. 11).

A target maps a batch of ImageNet-normalised images (N, 3, H, W) to per-patch targets on the student's patch grid,
under `torch.no_grad()`: float32 values (N, L, C), or int64 code ids (N, L) for the codebook, and says how wide the
decoders' prediction heads must be (`pred_dim` = C, or the V logits of a codebook) and which loss compares them
(`loss_type`, see `models_deepmim.reconstruction_loss`):

| target | C (ViT-B/16)      | loss        | source                                                        |
|--------|-------------------|-------------|---------------------------------------------------------------|
| pixel  | 768 (p*p*3)       | mse         | MAE; `--norm_pix_loss` normalises each patch                  |
| hog    | 108               | mse         | MaskFeat's HOG (targets/hog.py)                                  |
| clip   | 512               | cosine      | frozen CLIP ViT-B/16 tokens after ln_post @ proj (targets/teachers.py) |
| dino   | 768               | cosine      | frozen DINO ViT-B/16 tokens after the final norm              |
| codebook | 8192 (V logits) | cross_entropy | a frozen tokenizer's code per patch (targets/tokenizers.py) |

The cosine loss is 2 - 2 cos per masked token, what the released DeepMIM-CLIP code optimises; the cross-entropy is
BEiT's masked token prediction, with every supervised decoder predicting the same tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import timm
import torch
from torch import Tensor

from models_deepmim import LossType
from targets.hog import HOG_CELL, hog_dim, hog_targets
from targets.teachers import FrozenTeacher, build_teacher
from targets.tokenizers import Tokenizer, build_tokenizer
from util.datasets import imagenet_mean_std
from util.patches import normalize_patches, patchify

TARGETS = ("pixel", "hog", "clip", "dino", "codebook")
TEACHER_TARGETS = ("clip", "dino", "codebook")  # the targets that read --teacher_path / --teacher_model


class Target(Protocol):
    """imgs (N, 3, H, W), ImageNet-normalised -> targets (N, L, pred_dim) float32, or code ids (N, L) int64 when
    loss_type is 'cross_entropy' (pred_dim = V); no gradient."""

    name: str
    pred_dim: int
    loss_type: LossType

    def __call__(self, imgs: Tensor) -> Tensor: ...


class PixelTarget:
    """MAE's pixel target: patches (N, L, p*p*3) of the normalised image, optionally per-patch normalised."""

    name = "pixel"
    loss_type: LossType = "mse"

    def __init__(self, patch_size: int, norm_pix_loss: bool = False):
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.pred_dim = patch_size**2 * 3

    @torch.no_grad()
    def __call__(self, imgs: Tensor) -> Tensor:
        target = patchify(imgs, self.patch_size)
        return normalize_patches(target) if self.norm_pix_loss else target


class HogTarget:
    """MaskFeat's HOG target (paper Tab. 11): (N, L, (p/8)^2 * 3 * 9), 108 for a 16-pixel patch.

    The images are mapped back to the loader's 8-bit pixel values (de-normalised, x255, rounded). After the
    per-cell L2 normalisation this equals HOG on the normalised images (normalisation scales each channel's
    gradients by 1/std; its mean shift does not reach gradients under reflect padding), but gradients of integers
    are exact in float32: a gradient that lies exactly on a bin edge (a perfectly horizontal one, common in flat
    8-bit areas) lands in the same bin on every device instead of flipping between bins 0 and 8 with rounding noise.
    MaskFeat's Gaussian window spans one patch.
    """

    name = "hog"
    loss_type: LossType = "mse"

    def __init__(self, patch_size: int):
        self.pred_dim = hog_dim(patch_size)
        self.patch_size = patch_size

    @torch.no_grad()
    def __call__(self, imgs: Tensor) -> Tensor:
        mean, std = imagenet_mean_std(imgs.device)  # cached on the device: no host copy per step
        with torch.autocast(imgs.device.type, enabled=False):  # angles and bins need full precision
            pixels = (imgs.float() * std + mean).mul_(255).round_()
            return hog_targets(pixels, self.patch_size, window=self.patch_size)


class TeacherTarget:
    """Per-token features of a frozen teacher (CLIP or DINO), compared with a cosine loss."""

    loss_type: LossType = "cosine"

    def __init__(self, name: str, teacher: FrozenTeacher):
        self.name, self.teacher = name, teacher
        self.pred_dim = teacher.out_dim

    def __call__(self, imgs: Tensor) -> Tensor:
        return self.teacher(imgs)


class CodebookTarget:
    """Discrete visual tokens of a frozen tokenizer (Tab. 11 "Perceptual Codebook"): one code id per patch, which
    each decoder predicts as V logits under a cross-entropy loss (BEiT's masked token prediction)."""

    name = "codebook"
    loss_type: LossType = "cross_entropy"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pred_dim = tokenizer.vocab_size

    def __call__(self, imgs: Tensor) -> Tensor:
        return self.tokenizer(imgs)


def check_teacher_model(flag: str, name: str | None) -> None:
    """Raise ValueError naming `flag` unless `name` is None or a timm architecture."""
    if name is not None and not timm.is_model(name):
        raise ValueError(f"{flag} {name!r} is not a timm architecture (see timm.list_models())")


def check_target_args(
    target: str, teacher_path: str | os.PathLike | None, patch_size: int | None = None,
    teacher_model: str | None = None, check_files: bool = True,
) -> None:
    """Validate `--target` / `--teacher_path` / `--teacher_model` (and the patch size HOG needs) before any compute.

    Raises ValueError naming the flag: unknown target (with the allowed values); clip/dino/codebook without
    `--teacher_path` or with a path that is not a file (not checked with `check_files` False: --print_config);
    `--teacher_path` or `--teacher_model` given for a target that reads no teacher, or a `--teacher_model` timm does
    not know; HOG with a patch size that is not a multiple of its 8-pixel cell.
    """
    if target not in TARGETS:
        raise ValueError(f"--target {target!r} is unknown; choose one of {', '.join(TARGETS)}")
    if target in TEACHER_TARGETS:
        if not teacher_path:
            what = "weight file of the tokenizer (BEiT v2's VQ-KD)" if target == "codebook" else \
                f"{target.upper()} weight file"
            raise ValueError(f"--target {target} needs --teacher_path (a local {what})")
        if check_files and not Path(teacher_path).is_file():
            raise ValueError(f"--teacher_path {teacher_path} does not exist or is not a file")
    else:
        for flag, value in (("--teacher_path", teacher_path), ("--teacher_model", teacher_model)):
            if value:
                raise ValueError(f"{flag} is only read by --target {' / '.join(TEACHER_TARGETS)}, not {target}")
    check_teacher_model("--teacher_model", teacher_model)
    if target == "hog" and patch_size is not None and patch_size % HOG_CELL:
        raise ValueError(f"--target hog needs a patch size that is a multiple of {HOG_CELL} (got {patch_size})")


def build_target(
    name: str,
    *,
    patch_size: int,
    img_size: int,
    norm_pix_loss: bool = False,
    teacher_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    teacher_model: str | None = None,
) -> Target:
    """Build the target named by `--target`.

    norm_pix_loss applies to pixel targets only. teacher_path: the clip/dino weight file, or the codebook's
    tokenizer file. teacher_model: a timm architecture replacing the teacher's (or the tokenizer's encoder's) default
    (`vit_base_patch16_clip_quickgelu_224` / `vit_base_patch16_224`), e.g. a ViT-L CLIP, or a tiny ViT in tests; the
    file must match it.
    """
    check_target_args(name, teacher_path, patch_size)
    if img_size % patch_size:
        raise ValueError(f"--input_size {img_size} is not a multiple of the patch size {patch_size}")
    if name == "pixel":
        return PixelTarget(patch_size, norm_pix_loss)
    if name == "hog":
        return HogTarget(patch_size)
    grid = (img_size // patch_size, img_size // patch_size)
    if name == "codebook":
        return CodebookTarget(build_tokenizer(teacher_path, grid_size=grid, device=device, model_name=teacher_model))
    teacher = build_teacher(name, teacher_path, grid_size=grid, device=device, model_name=teacher_model)
    return TeacherTarget(name, teacher)
