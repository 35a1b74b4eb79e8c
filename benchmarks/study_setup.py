"""The small-scale study's setup (benchmarks/small_scale_study.py): the variants compared, the budget shared by
every variant and seed (`PRESETS`: cpu, gpu, and smoke for the test), and the tasks, each written once as an
ImageFolder: crops of scikit-image's sample images labelled by the image they come from (gray_crops, the study's;
photo_crops), and scikit-learn's digits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

# --------------------------------------------------------------------------------------------------------------
# What is compared, and with which budget
# --------------------------------------------------------------------------------------------------------------


class Variant(NamedTuple):
    label: str  # in figures and tables
    model: str  # registered name in models_deepmim.MODELS
    flags: tuple[str, ...]  # extra main_pretrain.py flags
    uses_generator: bool  # DeepMIM+: the same seed's MAE checkpoint is the --hybrid_generator


VARIANTS: dict[str, Variant] = {
    "mae": Variant("MAE", "mae_vit_small_patch16", (), False),
    "deepmim": Variant("DeepMIM", "deepmim_vit_small_patch16", (), False),
    "deepmim_shared": Variant("DeepMIM, shared decoder", "deepmim_vit_small_patch16", ("--shared_decoder",), False),
    "deepmim_hybrid": Variant("DeepMIM\u2020 (hybrid targets)", "deepmim_vit_small_patch16", (), True),
}


CROP_SCALE = (0.05, 0.3)  # area of a crop task's crops, as a fraction of the source image
# The crop tasks' sources: scikit-image's sample images that ship with the package (no download). Note that
# skimage.data.cat() is the same photograph as chelsea(), so neither list holds both.
CROP_SOURCES: dict[str, tuple[tuple[str, ...], bool]] = {  # task -> (skimage.data names, convert to grayscale)
    "photo_crops": (("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                     "colorwheel", "retina"), False),
    "gray_crops": (("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "brick", "grass", "gravel"),
                   True),
}
TASKS = (*CROP_SOURCES, "digits")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Task, model size and compute of one study; identical for every variant and seed."""

    task: str = "gray_crops"  # see TASKS; chosen by benchmarks/study_pilot.py task (docs/small_scale_study.md)
    per_class: int | None = 96  # images per class and split (digits: None = all 1,797)
    input_size: int = 32
    patch_size: int = 4  # 8x8 = 64 patches
    embed_dim: int = 128
    depth: int = 6  # DeepMIM taps depth*{1/2, 2/3, 5/6, 1} = blocks 3 4 5 6
    num_heads: int = 4
    decoder_embed_dim: int = 64  # small and equal for every variant (paper: 512)
    decoder_num_heads: int = 4
    # The registry's ratio MAE : DeepMIM decoder depth = 8 : 4 (paper Sec. 3), scaled down to 2 : 1 for CPU time.
    mae_decoder_depth: int = 2
    deepmim_decoder_depth: int = 1
    # Pre-training: main_pretrain.py --demo's blr; batch 16 (lr 3.1e-4) so that 8 epochs make 480 updates for the CPU
    # time of 240 at batch 32: at 240 updates MAE fine-tuned 12.9 points *below* random init (docs, "Run A").
    batch_size: int = 16
    epochs: int = 8
    warmup_epochs: int = 1
    blr: float = 5e-3
    # Fine-tuning: main_finetune.py --demo's recipe (DEMO_OVERRIDES) for 3 epochs instead of 7, what the 30-minute cap
    # leaves after pre-training (not converged: docs, "How the budget was chosen").
    finetune_epochs: int = 3
    finetune_batch_size: int = 64
    finetune_blr: float = 1.6e-2
    finetune_warmup_epochs: int = 1
    analysis_batch_size: int = 128
    analysis_images: int | None = 480  # val images read by the three analysis tools (None: all)
    device: str = "cpu"


PRESETS: dict[str, Budget] = {
    "cpu": Budget(),
    # One GPU, under 10 minutes (estimated, not yet measured: no GPU was available): the same task and study with
    # 10x the pre-training and fine-tuning updates, a 3x wider encoder (384, 6 heads) and a 2x wider decoder.
    "gpu": Budget(embed_dim=384, num_heads=6, decoder_embed_dim=128, epochs=80, warmup_epochs=8, finetune_epochs=30,
                  finetune_warmup_epochs=3, analysis_batch_size=256, device="cuda"),
    # A few seconds, for the test: a narrow model, a handful of steps, 6 images per class and split.
    "smoke": Budget(per_class=6, embed_dim=32, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2, batch_size=20,
                    epochs=1, warmup_epochs=0, finetune_epochs=1, finetune_batch_size=20, finetune_warmup_epochs=0,
                    analysis_batch_size=10),
}


# --------------------------------------------------------------------------------------------------------------
# Data: the digits as an ImageFolder, written once
# --------------------------------------------------------------------------------------------------------------


def _reuse_or_clear(root: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The description of a folder written with the same settings (`root/task.json`), or None after removing it."""
    info_path = root / "task.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            return info
    if root.exists():
        shutil.rmtree(root)
    return None


def export_crops(root: Path, task: str, input_size: int, per_class: int, seed: int = 0) -> dict[str, Any]:
    """Write `root/{train,val}/<source>/<index>.png`: `per_class` random crops per split of each source image of
    `task` (CROP_SOURCES), label = the image a crop comes from.

    Each crop is a RandomResizedCrop of the whole image (area 5-30 %, aspect 3/4-4/3) resized to input_size,
    flipped with probability 1/2, drawn from torch's generator seeded by `seed` and the split: val crops are new
    draws, so they can overlap regions that train crops cover (the task asks which image a view at a new position
    and scale comes from, not about unseen images). Reuses a folder written with the same settings."""
    import torch
    from torchvision.transforms import v2

    settings = {"task": task, "sources": list(CROP_SOURCES[task][0]), "gray": CROP_SOURCES[task][1],
                "input_size": input_size, "per_class": per_class, "seed": seed, "scale": list(CROP_SCALE)}
    info = _reuse_or_clear(root, settings)
    if info is not None:
        return info
    from util.datasets import sample_images

    crop = v2.Compose([v2.RandomResizedCrop(input_size, scale=CROP_SCALE, antialias=True),
                       v2.RandomHorizontalFlip()])
    names, gray = CROP_SOURCES[task]
    images = sample_images(names, gray)
    for split_index, split in enumerate(("train", "val")):
        torch.manual_seed(seed * 1000 + split_index)  # torchvision's random transforms draw from torch's generator
        for name, image in zip(names, images):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                crop(image).save(folder / f"{i:04d}.png")
    counts = {split: {name: per_class for name in names} for split in ("train", "val")}
    info = {"settings": settings, "source": "skimage.data sample images (shipped with scikit-image)",
            "classes": list(names), "images_per_class": counts, "images": {s: per_class * len(names) for s in counts}}
    (root / "task.json").write_text(json.dumps(info, indent=1))
    return info


def export_digits(root: Path, input_size: int, per_class: int | None = None) -> dict[str, Any]:
    """Write `root/{train,val}/<digit>/<index>.png` (RGB, input_size px) from `util.cls_data.DigitsDemo`'s fixed
    split, the first `per_class` images of each class per split when given. Reuses a folder written with the same
    settings (`root/digits.json`); returns its description (images per class and split)."""
    from util.cls_data import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, SPLITS, DigitsDemo

    settings = {"task": "digits", "input_size": input_size, "per_class": per_class, "split_seed": DIGITS_SPLIT_SEED,
                "val_fraction": DIGITS_VAL_FRACTION}
    info = _reuse_or_clear(root, settings)
    if info is not None:
        return info
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        digits = DigitsDemo(split, input_size)
        counts[split] = {}
        for i, label in enumerate(digits.targets.tolist()):
            name = str(label)
            if per_class is not None and counts[split].get(name, 0) >= per_class:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            digits.image(i).save(folder / f"{i:04d}.png")
            counts[split][name] = counts[split].get(name, 0) + 1
    info = {"settings": settings, "source": "sklearn.datasets.load_digits via util.cls_data.DigitsDemo",
            "images_per_class": counts, "images": {s: sum(c.values()) for s, c in counts.items()}}
    (root / "task.json").write_text(json.dumps(info, indent=1))
    return info


def budget_for(preset: str, task: str | None = None) -> Budget:
    """PRESETS[preset], on `task` instead of the preset's when given. The digits keep all their images (their split
    is fixed), except in the smoke preset."""
    budget = PRESETS[preset]
    if task is None:
        return budget
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return dataclasses.replace(budget, task=task, per_class=None if task == "digits" and preset != "smoke"
                               else budget.per_class)


def export_task(root: Path, budget: Budget) -> dict[str, Any]:
    """The budget's task as an ImageFolder under `root` (written once; see export_crops, export_digits)."""
    if budget.task in CROP_SOURCES:
        return export_crops(root, budget.task, budget.input_size, budget.per_class)
    if budget.task == "digits":
        return export_digits(root, budget.input_size, budget.per_class)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {budget.task!r}")
