"""DeepMIM's progressive hybrid targets (DeepMIM†, paper Sec. 3 "Progressive hybrid targets", Eq. 1, Tab. 7, Tab. 9).

A frozen pre-trained MAE (the "hybrid target generator") reconstructs the same masked image the student sees (same
masking noise, hence the same mask), and decoder i learns t_i = a_i * x + (1 - a_i) * x_hat (Eq. 1): the shallow
decoders get the generator's easier, blurrier reconstruction, the last one the real image. Paper default
a = (0, 1/3, 2/3, 1) for blocks 6, 8, 10, 12 (Tab. 9, config 4); without a generator a = 1 everywhere.

The generator costs one forward pass per step: no gradients, no optimizer state, autocast on CUDA (bf16 where
native, else fp16: `util.amp.autocast_dtype_for` through `frozen_autocast`). It is a
plain object, never a submodule of the student, so it is absent from the student's checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from models_deepmim import (
    MaskedAutoencoderDeepMIM,
    create_model,
    encoder_patch_size,
    load_pretrained,
    model_from_config,
)
from models_vit import VIT_SIZES
from targets.teachers import frozen_autocast
from util.checkpoint import load_checkpoint
from util.patches import patchify

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.0, 1 / 3, 2 / 3, 1.0)  # blocks 6, 8, 10, 12 (paper Sec. 3, Tab. 9 config 4)
PATCH_EPS = 1e-6  # the epsilon of `normalize_patches` (MAE's norm_pix_loss)
DEFAULT_IMG_SIZE = 224  # MaskedAutoencoderDeepMIM's img_size when a model_cfg does not set it
RAW_PIXEL_RELEASES = ("mae_visualize_",)  # released MAE files trained without norm_pix_loss (MAE's demo notebook)


# --------------------------------------------------------------------------------------------------------------
# Argument checks and blending
# --------------------------------------------------------------------------------------------------------------


def check_hybrid_args(
    hybrid_generator: str | os.PathLike | None,
    hybrid_alphas: Sequence[float] | None,
    supervised_blocks: Sequence[int],
    check_files: bool = True,
) -> tuple[float, ...]:
    """Validate `--hybrid_generator` / `--hybrid_alphas` before any compute; return the alphas to use.

    With a generator, alphas default to `DEFAULT_ALPHAS` and need one value in [0, 1] per supervised block.
    Without one every alpha is 1 (plain DeepMIM), so alphas other than 1 are an error. The generator file must
    exist unless `check_files` is False (--print_config).
    """
    if hybrid_generator and check_files and not Path(hybrid_generator).is_file():
        raise ValueError(f"--hybrid_generator {hybrid_generator} does not exist or is not a file")
    if not hybrid_generator:
        if hybrid_alphas is not None and any(a != 1 for a in hybrid_alphas):
            raise ValueError(f"--hybrid_alphas {list(hybrid_alphas)} needs --hybrid_generator (without a generator "
                             "every target is the real image, alpha = 1)")
        return tuple(1.0 for _ in supervised_blocks)
    alphas = tuple(float(a) for a in (DEFAULT_ALPHAS if hybrid_alphas is None else hybrid_alphas))
    if len(alphas) != len(supervised_blocks):
        raise ValueError(f"--hybrid_alphas needs one value per supervised block {list(supervised_blocks)}, got "
                         f"{len(alphas)}: {list(alphas)}")
    bad = [a for a in alphas if not 0 <= a <= 1]
    if bad:
        raise ValueError(f"--hybrid_alphas must lie in [0, 1], got {bad}")
    return alphas


def blend_targets(
    pixel_targets: Tensor, x_hat: Tensor, alphas: Sequence[float], blocks: Sequence[int]
) -> dict[int, Tensor]:
    """Eq. 1 per decoder: t_i = a_i * x + (1 - a_i) * x_hat.

    pixel_targets, x_hat: (N, L, C) in the same target space. Returns {block: (N, L, C)}; a = 1 gives exactly
    `pixel_targets` and a = 0 exactly `x_hat`.
    """
    if len(alphas) != len(blocks):
        raise ValueError(f"{len(alphas)} alphas for {len(blocks)} blocks {list(blocks)}")
    if pixel_targets.shape != x_hat.shape:
        raise ValueError(f"pixel targets {tuple(pixel_targets.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    out = {}
    for block, a in zip(blocks, alphas, strict=True):
        out[block] = pixel_targets if a == 1 else x_hat if a == 0 else a * pixel_targets + (1 - a) * x_hat
    return out


def to_target_space(pred: Tensor, target_patches: Tensor, pred_norm_pix: bool, target_norm_pix: bool) -> Tensor:
    """Move a pixel prediction between raw and per-patch-normalised (norm-pix) spaces.

    pred: (N, L, p*p*3); target_patches: (N, L, p*p*3), the true patches of the image x being reconstructed.

    The rule: both directions use the TRUE patch statistics of x (mean, sqrt(var + 1e-6), as `normalize_patches`),
    never the prediction's own. norm-pix -> raw is pred * std_x + mean_x (how MAE de-normalises a norm-pix
    reconstruction for display); raw -> norm-pix is (pred - mean_x) / std_x. The two maps are exact inverses and
    affine, so Eq. 1 blended in either space gives the same target, and a perfect prediction of x lands exactly on
    the student's target for x. (Normalising a blurry x_hat by its own statistics would instead inflate its
    contrast to unit variance.)
    """
    if pred_norm_pix == target_norm_pix:
        return pred
    mean = target_patches.mean(dim=-1, keepdim=True)
    std = (target_patches.var(dim=-1, keepdim=True) + PATCH_EPS) ** 0.5
    return pred * std + mean if pred_norm_pix else (pred - mean) / std


# --------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------


def _count_indexed(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_mae_config(state_dict: Mapping[str, Tensor]) -> dict:
    """Architecture of a released MAE checkpoint (with decoder) from its tensor shapes, as `create_model` kwargs.

    Patch size and width come from `patch_embed.proj.weight`, depth from `blocks.N`, image size from `pos_embed`,
    decoder width/depth from `decoder_embed` / `decoder_blocks.N` (16 decoder heads, MAE's). Head counts are not in
    the weights: a known encoder (ViT-B/L/H) uses its registered count, any other width dim / 64.
    Raises KeyError (args[0]: the list of absent keys) when the file lacks the keys these shapes are read from.
    """
    required = ("patch_embed.proj.weight", "pos_embed", "decoder_embed.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(missing)
    embed_dim, _, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    depth = _count_indexed(state_dict, "blocks")
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    known = {(p, d, n): (name, h) for name, (p, d, n, h) in VIT_SIZES.items()}
    name, num_heads = known.get((patch_size, embed_dim, depth), ("vit_base_patch16", embed_dim // 64))
    return dict(
        name=f"mae_{name}", img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0],
        decoder_depth=_count_indexed(state_dict, "decoder_blocks"), decoder_num_heads=16,
    )


def check_grids(source: str, generator_patch: int, generator_grid: Sequence[int], student_patch: int,
                student_grid: Sequence[int]) -> None:
    """Raise ValueError naming `--hybrid_generator` and both grids unless generator and student cut images into the
    same patches on the same grid: the generator reconstructs exactly the student's masked patches (same noise)."""
    own, student = (generator_patch, tuple(generator_grid)), (student_patch, tuple(student_grid))
    if own == student:
        return
    own_px, student_px = own[0] * own[1][0], student[0] * student[1][0]
    raise ValueError(
        f"--hybrid_generator {source} uses patch {own[0]} on a {own[1]} grid ({own_px} px images); the student uses "
        f"patch {student[0]} on a {student[1]} grid (--input_size {student_px} --patch_size {student[0]}): the "
        f"generator must reconstruct the student's patches, so pre-train at --input_size {own_px} --patch_size "
        f"{own[0]} or give a generator trained at --input_size {student_px} --patch_size {student[0]}")


def _read_lazily(path: Path) -> Mapping:
    """The checkpoint memory-mapped (nothing read but what is touched) when torch can, else fully loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped; load_checkpoint names the file if broken
        return load_checkpoint(path)


def generator_geometry(path: str | os.PathLike) -> tuple[int, tuple[int, int]]:
    """(patch size, patch grid) of a generator file without building the model: from its stored "model_cfg"
    (absent sizes are the registry's; image size 224 by default), else, for released MAE files, from the shapes of
    `patch_embed.proj.weight` and `pos_embed`. Raises ValueError naming `--hybrid_generator` and the file."""
    path = Path(path)
    try:
        ckpt = _read_lazily(path)
        if isinstance(ckpt.get("model_cfg"), Mapping):
            cfg = ckpt["model_cfg"]
            patch = encoder_patch_size(str(cfg.get("name")), cfg.get("patch_size"))
            side = int(cfg.get("img_size") or DEFAULT_IMG_SIZE) // patch
            return patch, (side, side)
        cfg = infer_mae_config(ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt)
    except KeyError as err:
        raise ValueError(f"--hybrid_generator {path} is not an MAE checkpoint with a decoder: missing keys "
                         f"{', '.join(err.args[0])}") from err
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--hybrid_generator {path}: {err}") from err
    side = cfg["img_size"] // cfg["patch_size"]
    return cfg["patch_size"], (side, side)


def check_generator_file(path: str | os.PathLike, *, patch_size: int, input_size: int) -> None:
    """Validate `--hybrid_generator` against the student's `--patch_size` / `--input_size` before any compute,
    from the file's stored model_cfg (or tensor shapes) without building either model; raises ValueError naming the
    flag and both grids (`check_grids`)."""
    gen_patch, gen_grid = generator_geometry(path)
    side = input_size // patch_size
    check_grids(str(path), gen_patch, gen_grid, patch_size, (side, side))


class HybridGenerator:
    """A frozen pre-trained MAE that reconstructs the student's masked images in the student's target space."""

    def __init__(self, model: MaskedAutoencoderDeepMIM, *, generator_norm_pix: bool, student_norm_pix: bool,
                 source: str = "<memory>"):
        if model.pred_dim != model.patch_size**2 * model.in_chans:
            p, c = model.patch_size, model.in_chans
            raise ValueError(f"--hybrid_generator {source} predicts {model.pred_dim}-d features, not pixels "
                             f"({p}x{p}x{c}); a generator must be a pixel MAE")
        self.model = model.eval().requires_grad_(False)
        self.generator_norm_pix, self.student_norm_pix = generator_norm_pix, student_norm_pix
        self.source = source

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        student_norm_pix: bool,
        device: torch.device | str = "cpu",
        generator_norm_pix: bool | None = None,
    ) -> HybridGenerator:
        """Load a generator from this project's checkpoint ("model" + "model_cfg") or a released MAE checkpoint with
        its decoder (`mae_pretrain_vit_base_full.pth`, `mae_visualize_vit_*.pth` layouts, weights under "model").

        A DeepMIM checkpoint also works: its decoder on the last block is the generator.

        generator_norm_pix: whether the generator predicts per-patch-normalised pixels; None reads it from the file.
        Project checkpoints record it (model_cfg "norm_pix_loss"). Released files do not: MAE's visualisation
        checkpoints (`mae_visualize_vit_*.pth`, recognised by that name) were trained on raw pixels, which MAE's demo
        de-normalises with ImageNet statistics only; any other released file is taken to follow MAE's pre-training
        recipe (`--norm_pix_loss`, as its `*_full.pth` checkpoints). The assumption is logged; pass the argument to
        override it. Raises ValueError naming the file when keys are missing or shaped differently.
        """
        path = Path(path)
        ckpt = load_checkpoint(path)
        state = ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt
        if "model_cfg" in ckpt:
            model = model_from_config(ckpt["model_cfg"])
            recorded = bool(ckpt["model_cfg"].get("norm_pix_loss", False))
        else:
            try:
                cfg = infer_mae_config(state)
            except KeyError as err:
                raise ValueError(f"--hybrid_generator {path} is not an MAE checkpoint with a decoder: missing keys "
                                 f"{', '.join(err.args[0])}") from err
            model = create_model(cfg.pop("name"), **cfg)
            recorded = not path.name.startswith(RAW_PIXEL_RELEASES)
            if generator_norm_pix is None:
                logger.info("--hybrid_generator %s: released MAE file, assuming %s predictions", path,
                            "per-patch normalised (MAE's recipe)" if recorded else "raw-pixel (MAE's visualisation)")
        report = load_pretrained(model, state)
        if report.missing:
            raise ValueError(f"--hybrid_generator {path} does not fit the generator {model.config}: missing or "
                             f"mis-shaped keys {report.missing}")
        if report.unexpected:
            logger.warning("--hybrid_generator %s: ignoring unexpected keys %s", path, report.unexpected)
        norm_pix = recorded if generator_norm_pix is None else generator_norm_pix
        return cls(model.to(device), generator_norm_pix=norm_pix, student_norm_pix=student_norm_pix, source=str(path))

    def check_student(self, patch_size: int, grid_size: Sequence[int]) -> None:
        """Raise ValueError unless the generator cuts images into the student's patches and grid (to check before
        loading the generator, use `check_generator_file`)."""
        check_grids(self.source, self.model.patch_size, self.model.grid_size, patch_size, grid_size)

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        """The generator's reconstruction x_hat of the student's masked image, in the student's target space.

        imgs: (N, 3, H, W) ImageNet-normalised; noise: (N, L), the student's masking noise (same noise -> same mask).
        Returns (N, L, p*p*3) float32 for every patch; only the masked ones enter the student's loss. The
        generator reads the decoder on its last block (an MAE's only one). Call `check_student` once after loading:
        this method only sees the generator's own patch size.
        """
        self.check_student(self.model.patch_size, (imgs.shape[-2] // self.model.patch_size,
                                                   imgs.shape[-1] // self.model.patch_size))
        if noise.shape != (imgs.shape[0], self.model.num_patches):
            raise ValueError(f"noise {tuple(noise.shape)} does not match ({imgs.shape[0]}, {self.model.num_patches})")
        with frozen_autocast(imgs.device):
            latents, masking = self.model.forward_encoder(imgs, mask_ratio, noise)
            last = self.model.supervised_blocks[-1]
            pred = self.model.decoder_for(last)(latents[last], masking.ids_restore).float()
        # DeepMIM: x_hat must live in the student's target space before Eq. 1 blends it (see `to_target_space`).
        return to_target_space(pred, patchify(imgs.float(), self.model.patch_size), self.generator_norm_pix,
                               self.student_norm_pix)

    def to(self, device: torch.device | str) -> HybridGenerator:
        self.model.to(device)
        return self


def hybrid_targets_fn(generator: HybridGenerator, target: Callable[[Tensor], Tensor], alphas: Sequence[float],
                      blocks: Sequence[int], mask_ratio: float) -> Callable[[Tensor, Tensor], dict[int, Tensor]]:
    """targets_fn(imgs, noise) -> {block: t_block} of Eq. 1: the generator reconstructs the student's masked image
    (the same noise, hence the same mask) and each decoder's target blends it with `target(imgs)`."""

    def hybrid_targets(imgs: Tensor, noise: Tensor) -> dict[int, Tensor]:
        x_hat = generator.reconstruct(imgs, noise, mask_ratio)
        return blend_targets(target(imgs), x_hat, alphas, blocks)

    return hybrid_targets
