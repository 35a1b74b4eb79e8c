"""Robustness of a fine-tuned classifier (paper Tab. 6): top-1 accuracy on ImageNet-A and ImageNet-R, mean
corruption error (mCE) on ImageNet-C.

ImageNet-A (natural adversarial examples) and ImageNet-R (renditions) hold 200 of ImageNet-1K's 1000 classes, one
folder per WordNet id (wnid). Their standard protocol keeps only the logits of the classes present before the argmax.
A folder's logit is its wnid's position in the classifier's class list: ImageNet-1K's 1000 wnids in sorted order (an
ImageFolder of the training set numbers its class folders that way), or the list the caller gives.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations") holds the validation images under 15 corruptions at severities 1..5, laid out as
`<corruption>/<severity>/<wnid>/*.JPEG`, and is evaluated on all the logits. With E_{s,c} the top-1 error at
severity s of corruption c, the corruption error is CE_c = sum_s E_{s,c} / sum_s E^{AlexNet}_{s,c} and mCE is the
mean of CE_c over the 15 corruptions. On a partial copy the sums run over the severities present and the mean over
the corruptions present; `mce_summary` says which.

Every folder evaluated is one part of a single dataset (`EvalSet`), so one pass over the images (one loader, one
DistributedSampler) evaluates every model on every part; `count_correct` counts exactly under torchrun.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from timm.data import ImageNetInfo
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import datasets

import models_vit
from analysis.loading import is_classifier_config, read_checkpoint
from util import cls_data, distributed
from util.datasets import GuardedLoader
from util.misc import MetricLogger
from util.training import autocast_context

CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(c for group in CORRUPTION_GROUPS.values() for c in group)
# ImageNet-C's 4 held-out corruptions: not part of mCE, and no AlexNet baseline below.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet's top-1 error on ImageNet-C at severities 1..5, the denominator of CE. Source: Hendrycks's
# github.com/hendrycks/robustness (ImageNet-C evaluation); each row's mean is the per-corruption AlexNet error
# published there (gaussian_noise 0.886428, ..., jpeg_compression 0.606500; checked in tests/test_robustness.py).
ALEXNET_ERRORS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
SUBSET_DATASETS = {"imagenet_a": "--imagenet_a", "imagenet_r": "--imagenet_r"}  # 200-class sets: logits restricted


# --------------------------------------------------------------------------------------------------------------
# The classifier's classes and the folders evaluated
# --------------------------------------------------------------------------------------------------------------


def imagenet_wnids() -> list[str]:
    """ImageNet-1K's 1000 wnids in sorted order (timm's `ImageNetInfo`): logit i of a classifier fine-tuned on an
    ImageFolder of ImageNet-1K is class i of this list."""
    return list(ImageNetInfo().label_names())


def read_wnids(source: str | os.PathLike | None, flag: str = "--train_wnids") -> list[str]:
    """The classifier's wnids, logit by logit: ImageNet-1K's sorted list (source None), a text file (one wnid a
    line, in logit order) or a training folder (its sub-folder names sorted, as ImageFolder numbers them).
    Raises ValueError naming `flag` and the path when it is missing, empty or repeats a wnid."""
    if source is None:
        return imagenet_wnids()
    path = Path(source)
    if path.is_dir():
        wnids = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    elif path.is_file():
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{flag} {path}: no such file or folder")
    if not wnids:
        raise ValueError(f"{flag} {path} holds no wnids (a text file with one wnid a line, or a training folder "
                         "with one sub-folder per class)")
    repeated = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if repeated:
        raise ValueError(f"{flag} {path} repeats wnids {repeated[:5]}")
    return wnids


class Part(NamedTuple):
    """One folder evaluated: ImageNet-A, ImageNet-R, or one corruption and severity of ImageNet-C."""

    dataset: str  # "imagenet_a", "imagenet_r" or "imagenet_c"
    root: Path  # holds one folder per wnid
    corruption: str | None = None
    severity: int | None = None

    @property
    def restricted(self) -> bool:
        """True where the argmax runs over the classes present only (ImageNet-A and -R)."""
        return self.dataset in SUBSET_DATASETS


def imagenet_c_parts(root: str | os.PathLike, flag: str = "--imagenet_c") -> list[Part]:
    """The (corruption, severity) folders of an ImageNet-C copy, in the table's order. Raises ValueError naming the
    path for a missing or empty folder, a corruption outside the 15 or a severity outside 1..5."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{flag} {root} is not a folder")
    folders = sorted((entry for entry in os.scandir(root) if entry.is_dir()), key=lambda e: e.name)
    if not folders:
        raise ValueError(f"{flag} {root} holds no corruption folders (expected <corruption>/<severity>/<wnid>/ with "
                         f"corruptions {', '.join(CORRUPTIONS)})")
    parts = []
    for folder in folders:
        if folder.name not in CORRUPTIONS:
            extra = " (one of ImageNet-C's held-out extra corruptions, not part of mCE)" * (
                folder.name in EXTRA_CORRUPTIONS)
            raise ValueError(f"{flag}: {folder.path}: unknown corruption {folder.name!r}{extra}; allowed: "
                             f"{', '.join(CORRUPTIONS)}")
        levels = sorted((e for e in os.scandir(folder.path) if e.is_dir()), key=lambda e: e.name)
        if not levels:
            raise ValueError(f"{flag}: {folder.path} holds no severity folders (expected 1 to 5)")
        for level in levels:
            if level.name not in {str(s) for s in SEVERITIES}:
                raise ValueError(f"{flag}: {level.path}: severity {level.name!r} is not one of 1, 2, 3, 4, 5")
            parts.append(Part("imagenet_c", Path(level.path), folder.name, int(level.name)))
    return sorted(parts, key=lambda p: (CORRUPTIONS.index(p.corruption), p.severity))


class WnidFolder(datasets.ImageFolder):
    """An ImageFolder of one part whose labels are the logits of its wnid folders; items (image, label, part
    index). Unreadable images raise `util.datasets.UnreadableImageError` naming the file."""

    def __init__(self, part: Part, wnids: Sequence[str], index: int, flag: str):
        self.wnid_index = {w: i for i, w in enumerate(wnids)}
        self.index, self.flag = index, flag
        super().__init__(str(part.root), loader=GuardedLoader(datasets.folder.default_loader))

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if not classes:
            raise ValueError(f"{self.flag}: {directory} holds no class folders (one per wnid, e.g. n01440764)")
        unknown = [c for c in classes if c not in self.wnid_index]
        if unknown:
            raise ValueError(f"{self.flag}: {Path(directory) / unknown[0]}: {unknown[0]!r} is not one of the "
                             f"classifier's {len(self.wnid_index)} wnids (--train_wnids); {len(unknown)} such "
                             "folder(s)")
        return classes, {c: self.wnid_index[c] for c in classes}

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = super().__getitem__(index)
        return image, label, self.index


class EvalSet(ConcatDataset):
    """Every part's images as one dataset of (image, label, part index) items, in the order of `parts`."""

    def __init__(self, parts: Sequence[Part], wnids: Sequence[str]):
        self.parts, self.num_classes = list(parts), len(wnids)
        folders = []
        for i, part in enumerate(parts):
            flag = SUBSET_DATASETS.get(part.dataset, "--imagenet_c")
            try:
                folders.append(WnidFolder(part, wnids, i, flag))
            except FileNotFoundError as err:  # torchvision: a class folder without images
                raise ValueError(f"{flag}: {part.root}: {err}") from None
        super().__init__(folders)

    def set_input_size(self, input_size: int) -> None:
        """Evaluate at `input_size` with fine-tuning's evaluation transform (`util.cls_data.eval_transform`)."""
        transform = cls_data.eval_transform(input_size)
        for folder in self.datasets:
            folder.transform = transform

    def class_mask(self) -> Tensor:
        """(parts, classes) bool: the logits each part's argmax runs over (its classes for ImageNet-A/R, all else)."""
        mask = torch.ones(len(self.parts), self.num_classes, dtype=torch.bool)
        for i, (part, folder) in enumerate(zip(self.parts, self.datasets)):
            if part.restricted:
                mask[i] = False
                mask[i, list(folder.class_to_idx.values())] = True
        return mask


def build_eval_set(roots: Mapping[str, str | os.PathLike | None], wnids: Sequence[str]) -> EvalSet:
    """The parts of the datasets given ({"imagenet_a": DIR or None, "imagenet_r": ..., "imagenet_c": ...}), with
    every folder name checked before any model runs. Raises ValueError naming the flag and path."""
    parts = []
    for dataset, flag in SUBSET_DATASETS.items():
        if roots.get(dataset) is not None:
            if not Path(roots[dataset]).is_dir():
                raise ValueError(f"{flag} {roots[dataset]} is not a folder")
            parts.append(Part(dataset, Path(roots[dataset])))
    if roots.get("imagenet_c") is not None:
        parts += imagenet_c_parts(roots["imagenet_c"])
    if not parts:
        raise ValueError("give at least one of --imagenet_a, --imagenet_r, --imagenet_c")
    return EvalSet(parts, wnids)


# --------------------------------------------------------------------------------------------------------------
# Classifiers and exact counting
# --------------------------------------------------------------------------------------------------------------


def load_classifier(path: str | os.PathLike, model_name: str | None = None, input_size: int | None = None) -> nn.Module:
    """A classifier in eval mode from anything `analysis.loading.read_checkpoint` reads: a fine-tuned checkpoint of
    main_finetune.py or a linear probe of main_linprobe.py (their "model_cfg" rebuilds them with `models_vit`), a
    `.safetensors` export or a timm Hub folder of one (tools/export_encoder.py), or a released fine-tuned file
    without model_cfg (with `model_name`, e.g. 'vit_base_patch16'). `input_size` rebuilds it at another size
    (learned position embedding resampled). Raises ValueError naming the file when it holds no classifier head."""
    checkpoint = read_checkpoint(path)
    state = models_vit.encoder_state_dict(checkpoint)
    cfg = checkpoint.get("model_cfg")
    if cfg is None and model_name is None:
        raise ValueError(f"{path} has no 'model_cfg': pass --model with one of {', '.join(models_vit.VIT_SIZES)}")
    if cfg is not None and not is_classifier_config(cfg):
        raise ValueError(f"{path} is a pre-training checkpoint (model_cfg name {cfg.get('name')!r}) without a "
                         "classifier: fine-tune it with main_finetune.py first")
    probe = cfg is not None and models_vit.is_probe_config(cfg)
    head = "head.1.weight" if probe else "head.weight"  # a probe's head: BatchNorm1d, then the Linear
    if head not in state:
        raise ValueError(f"{path} holds no classifier head ({head}): an encoder-only file?")
    cfg = {**(cfg or _released_config(state, model_name)), "num_classes": state[head].shape[0]}
    if input_size:
        cfg["img_size"] = input_size
    model = models_vit.build_probe(cfg) if probe else models_vit.classifier_from_config(cfg)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=model.num_prefix_tokens)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit {cfg['name']}: {err}") from None
    return model.eval()


def _released_config(state: Mapping[str, Tensor], name: str) -> dict[str, Any]:
    """The classifier config of weights without one (MAE's released fine-tuned files): the registry size `name`, at
    the input size of the stored position embedding, pooling globally when the file has fc_norm (MAE's default)."""
    patch = models_vit.VIT_SIZES[name][0]
    cfg = {"name": name, "global_pool": "fc_norm.weight" in state}
    if "pos_embed" in state:
        cfg["img_size"] = round((state["pos_embed"].shape[1] - 1) ** 0.5) * patch
    return cfg


def model_input_size(model: nn.Module) -> int:
    """The square input size a ViT was built for (timm's patch_embed.img_size)."""
    return int(model.patch_embed.img_size[0])


def num_outputs(model: nn.Module) -> int:
    """The number of classes a classifier scores (timm's num_classes: the head's outputs)."""
    return int(model.num_classes)


def make_loader(dataset: EvalSet, batch_size: int, num_workers: int, device: str) -> tuple[DataLoader, int | None]:
    """A loader over `dataset` in order, and this rank's number of real samples under torchrun (None alone):
    `--dist_eval`'s exact evaluation, a DistributedSampler without drop_last whose padding is skipped."""
    sampler, num_real = None, None
    if distributed.get_world_size() > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, distributed.get_world_size(), distributed.get_rank(),
                                                      shuffle=False)
        num_real = cls_data.real_samples_on_rank(sampler)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    return loader, num_real


@torch.inference_mode()
def count_correct(models: Sequence[nn.Module], loader: DataLoader, class_mask: Tensor, device: str | torch.device,
                  num_samples: int | None = None, amp: str = "none", print_freq: int = 200) -> Tensor:
    """(models, parts, 2) int64: top-1 correct and images per model and part, summed over ranks.

    Each batch is read once for all models; a part's argmax runs over the logits `class_mask` keeps for it.
    `num_samples`: count only this rank's first samples (the rest are DistributedSampler padding, see
    `util.cls_data.real_samples_on_rank`). `amp`: the forward passes' autocast (`util.training.autocast_context`)."""
    counts = torch.zeros(len(models), class_mask.shape[0], 2, dtype=torch.int64, device=device)
    mask = class_mask.to(device)
    remaining = len(loader.dataset) if num_samples is None else num_samples
    for images, labels, parts in MetricLogger().log_every(loader, print_freq, "Robustness:"):
        n = min(len(labels), remaining)
        if n <= 0:
            break
        remaining -= n
        images, labels, parts = images[:n].to(device), labels[:n].to(device), parts[:n].to(device)
        seen = torch.bincount(parts, minlength=mask.shape[0])
        for i, model in enumerate(models):
            with autocast_context(torch.device(device), amp):
                logits = model(images)
            logits = logits.float().masked_fill(~mask[parts], float("-inf"))
            hits = parts[logits.argmax(dim=1) == labels]
            counts[i, :, 0] += torch.bincount(hits, minlength=mask.shape[0])
            counts[i, :, 1] += seen
    if distributed.is_dist():
        dist.all_reduce(counts)
    return counts.cpu()


# --------------------------------------------------------------------------------------------------------------
# The numbers of Tab. 6
# --------------------------------------------------------------------------------------------------------------


def mce_summary(errors: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """CE per corruption and mCE from top-1 errors in % ({corruption: {severity: error}}), with what they cover.

    CE_c = sum_s E_{s,c} / sum_s E^{AlexNet}_{s,c} over the severities present, in %; mCE = mean CE over the
    corruptions present. "complete" is True only for all 15 corruptions at all 5 severities; otherwise "coverage"
    says which were measured (the mCE is then not comparable with published values)."""
    unknown = sorted(set(errors) - set(CORRUPTIONS))
    if unknown or not errors:
        raise ValueError(f"corruptions {unknown or '(none)'}: expected some of {', '.join(CORRUPTIONS)}")
    ce = {}
    for corruption, by_severity in errors.items():
        alexnet = sum(ALEXNET_ERRORS[corruption][s - 1] for s in by_severity)
        ce[corruption] = 100 * sum(e / 100 for e in by_severity.values()) / alexnet
    severities = {c: sorted(by_severity) for c, by_severity in errors.items()}
    missing = [c for c in CORRUPTIONS if c not in errors]
    partial = {c: s for c, s in severities.items() if s != list(SEVERITIES)}
    complete = not missing and not partial
    if complete:
        coverage = "all 15 corruptions at severities 1-5"
    else:
        measured = "; ".join(f"{c} {','.join(map(str, s))}" for c, s in severities.items())
        coverage = (f"SUBSET: {len(errors)} of 15 corruptions ({measured}); not comparable with published mCE")
    return {"ce": ce, "mce": sum(ce.values()) / len(ce), "complete": complete, "coverage": coverage,
            "severities": severities, "missing_corruptions": missing}


def summarize(parts: Sequence[Part], counts: Tensor, class_mask: Tensor) -> dict[str, Any]:
    """One model's numbers from its (parts, 2) counts: ImageNet-A/R top-1 (%) with image and class counts;
    ImageNet-C top-1 error (%) and images per corruption and severity, CE per corruption and mCE (`mce_summary`)."""
    result: dict[str, Any] = {}
    errors: dict[str, dict[int, float]] = {}
    images: dict[str, dict[int, int]] = {}
    for i, part in enumerate(parts):
        correct, total = (int(v) for v in counts[i])
        if part.restricted:
            result[part.dataset] = {"top1": 100 * correct / total, "correct": correct, "images": total,
                                    "classes": int(class_mask[i].sum()), "root": str(part.root)}
        else:
            errors.setdefault(part.corruption, {})[part.severity] = 100 * (1 - correct / total)
            images.setdefault(part.corruption, {})[part.severity] = total
    if errors:
        result["imagenet_c"] = {"top1_error": errors, "images": images, **mce_summary(errors)}
    return result
