"""The small-scale study's setup (benchmarks/small_scale_study.py): the variants compared, the budget shared by
every variant and seed (`FULL`, and `SMOKE` for the test), and the digits written once as an ImageFolder."""

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


@dataclasses.dataclass(frozen=True)
class Budget:
    """Model size and compute of one study; identical for every variant and seed."""

    input_size: int = 32  # digits upsampled from 8x8
    patch_size: int = 4  # 8x8 = 64 patches
    embed_dim: int = 128
    depth: int = 6  # DeepMIM taps depth*{1/2, 2/3, 5/6, 1} = blocks 3 4 5 6
    num_heads: int = 4
    decoder_embed_dim: int = 64  # small and equal for every variant (paper: 512)
    decoder_num_heads: int = 4
    # The registry's ratio MAE : DeepMIM decoder depth = 8 : 4 (paper Sec. 3), scaled down to 2 : 1 for CPU time.
    mae_decoder_depth: int = 2
    deepmim_decoder_depth: int = 1
    batch_size: int = 32  # main_pretrain.py --demo's batch, blr and warm-up
    epochs: int = 12
    warmup_epochs: int = 2
    blr: float = 5e-3
    probe_epochs: int = 5
    probe_batch_size: int = 32
    probe_lr: float = 160.0  # LARS absolute lr; chosen on the demo checkpoint, not on a study model (see the doc)
    probe_warmup_epochs: int = 1
    per_class: int | None = None  # images per class and split (None: all 1,797)
    analysis_batch_size: int = 128


FULL = Budget()
# A few seconds: a narrow model, a handful of steps, one probe epoch, 6 images per class and split.
SMOKE = Budget(embed_dim=32, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2, batch_size=20, epochs=1,
               warmup_epochs=0, probe_epochs=1, probe_batch_size=20, probe_warmup_epochs=0, per_class=6,
               analysis_batch_size=10)


# --------------------------------------------------------------------------------------------------------------
# Data: the digits as an ImageFolder, written once
# --------------------------------------------------------------------------------------------------------------


def export_digits(root: Path, input_size: int, per_class: int | None = None) -> dict[str, Any]:
    """Write `root/{train,val}/<digit>/<index>.png` (RGB, input_size px) from `util.cls_data.DigitsDemo`'s fixed
    split, the first `per_class` images of each class per split when given. Reuses a folder written with the same
    settings (`root/digits.json`); returns its description (images per class and split)."""
    from util.cls_data import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, SPLITS, DigitsDemo

    info_path = root / "digits.json"
    settings = {"input_size": input_size, "per_class": per_class, "split_seed": DIGITS_SPLIT_SEED,
                "val_fraction": DIGITS_VAL_FRACTION}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            return info
    if root.exists():
        shutil.rmtree(root)
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
    info_path.write_text(json.dumps(info, indent=1))
    return info
