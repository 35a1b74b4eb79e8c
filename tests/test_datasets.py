"""util/datasets.py: only decode/IO failures count as broken images, per-sample seeding leaves every global RNG
(and CUDA's) alone and makes timm's fine-tuning augmentation reproducible, the epoch travels with the sampler's
indices (persistent workers see every epoch), the default worker count follows the job's CPUs, and device constants
are made once. That DataLoader workers survive SLURM's signals: tests/test_loader_signals.py."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from conftest import write_image_folder
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from util import fast_data as fd
from util.cls_data import build_image_folder, check_classification_folders, finetune_transform
from util.datasets import (
    DEMO_PHOTOS,
    IMAGENET_MEAN,
    DemoPhotos,
    EpochIndex,
    GuardedLoader,
    ResumableDistributedSampler,
    RobustSeededDataset,
    UnreadableImageError,
    build_pretrain_dataset,
    check_image_folder,
    default_num_workers,
    denormalize,
    device_constant,
    normalize_on_device,
    sample_images,
)

BUILDERS = {
    "torchvision": lambda root: build_pretrain_dataset(str(root), 32),
    "fast": lambda root: fd.build_fast_pretrain_dataset(root, 32),
}


def add_broken_files(root: Path) -> tuple[Path, Path]:
    """A JPEG cut in half and a text file named .jpg, next to the good images."""
    good = (root / "class0" / "img0.jpg").read_bytes()
    truncated = root / "class0" / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    notes = root / "class1" / "notes.jpg"
    notes.write_text("this is not an image")
    return truncated, notes


def failing_transform(image):
    raise ValueError("bug in the transform")


def read_all(dataset: Dataset) -> list[tuple[torch.Tensor, int, int]]:
    return [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]


def loader_items(dataset: Dataset, num_workers: int) -> list[tuple[torch.Tensor, int, int]]:
    """Every item through a DataLoader (batch 1, in order), unbatched."""
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    return [(image[0], int(label), int(bad)) for image, label, bad in loader]


# ------------------------------------------------------------------------------------------------------------------
# 1. Only unreadable files are replaced and counted
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_truncated_and_non_image_files_are_replaced_and_counted(tmp_path, builder, caplog):
    root = write_image_folder(tmp_path / "images", num_images=8)
    truncated, notes = add_broken_files(root)
    dataset = BUILDERS[builder](root)
    broken = [i for i, (path, _) in enumerate(dataset.samples) if path in (str(truncated), str(notes))]
    assert len(broken) == 2
    for i in broken:
        with pytest.raises(UnreadableImageError):
            dataset[i]
    robust = RobustSeededDataset(dataset, seed=0)
    with caplog.at_level("WARNING", logger="util.datasets"):
        items = read_all(robust)
    assert sum(bad for _, _, bad in items) == 2
    assert all(items[i][2] == 1 for i in broken)
    assert all(image.shape == (3, 32, 32) and image.dtype == torch.uint8 for image, _, _ in items)
    assert "truncated.jpg" in caplog.text and "notes.jpg" in caplog.text
    assert sum(bad for _, _, bad in loader_items(robust, num_workers=0)) == 2


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_transform_errors_propagate_and_are_not_counted(tmp_path, builder):
    root = write_image_folder(tmp_path / "images", num_images=4)
    dataset = BUILDERS[builder](root)
    dataset.transform = failing_transform
    robust = RobustSeededDataset(dataset, seed=0)
    with pytest.raises(ValueError, match="bug in the transform"):
        robust[0]
    with pytest.raises(ValueError, match="bug in the transform"):
        next(iter(DataLoader(robust, batch_size=2, num_workers=0)))


def test_errors_of_the_fast_crop_resize_are_not_taken_for_broken_files(image_folder, monkeypatch):
    def broken_resize(*args, **kwargs):
        raise RuntimeError("bug in the resize")

    monkeypatch.setattr(fd, "resize_crop_uint8", broken_resize)
    robust = RobustSeededDataset(fd.build_fast_pretrain_dataset(image_folder, 32, min_dct_scale=None), seed=0)
    with pytest.raises(RuntimeError, match="bug in the resize"):
        robust[0]


def test_classification_folders_raise_unreadable_image_error(tmp_path):
    root = write_image_folder(tmp_path / "data" / "train", num_images=4)
    truncated, notes = add_broken_files(root)
    dataset = build_image_folder(tmp_path / "data", "train", finetune_transform(True, 32))
    items = read_all(RobustSeededDataset(dataset, seed=0))
    assert sum(bad for _, _, bad in items) == 2 and len(items) == 6
    with pytest.raises(UnreadableImageError, match="notes.jpg"):
        dataset[[p for p, _ in dataset.samples].index(str(notes))]


def test_unreadable_image_error_names_the_file_and_survives_a_worker():
    loader = GuardedLoader(datasets.folder.default_loader)
    with pytest.raises(UnreadableImageError, match="missing.jpg: FileNotFoundError") as info:
        loader("/nonexistent/missing.jpg")
    assert isinstance(info.value.cause, FileNotFoundError) and info.value.path == "/nonexistent/missing.jpg"
    # What DataLoader does to re-raise a worker's error: rebuild the type from the formatted message.
    assert isinstance(type(info.value)(str(info.value)), UnreadableImageError)


def test_too_many_unreadable_images_in_a_row_stop(tmp_path):
    root = tmp_path / "broken" / "class0"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"bad{i}.jpg").write_text("broken")
    robust = RobustSeededDataset(build_pretrain_dataset(str(tmp_path / "broken"), 32), seed=0, max_retries=2)
    with pytest.raises(RuntimeError, match="3 unreadable images in a row"):
        robust[0]


# ------------------------------------------------------------------------------------------------------------------
# 2. Per-sample seeding
# ------------------------------------------------------------------------------------------------------------------

CUDA_SEEDING = ["manual_seed", "manual_seed_all", "seed", "seed_all", "set_rng_state", "set_rng_state_all"]


def randaugment_dataset(root: Path) -> RobustSeededDataset:
    """timm's RandAugment + random erasing (python random, numpy and torch draws) over an image folder."""
    transform = timm.data.create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    return RobustSeededDataset(datasets.ImageFolder(str(root), transform=transform), seed=3)


def test_reading_samples_never_seeds_cuda(image_folder, monkeypatch):
    calls = []
    for name in CUDA_SEEDING:
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: calls.append(_name))
    for module in (torch, torch.random):
        monkeypatch.setattr(module, "manual_seed", lambda *a, **k: calls.append("torch.manual_seed"))
    for dataset in (randaugment_dataset(image_folder), RobustSeededDataset(DemoPhotos(32, 2), seed=0),
                    RobustSeededDataset(fd.build_fast_pretrain_dataset(image_folder, 32), seed=0)):
        read_all(dataset)
        loader_items(dataset, num_workers=0)
    assert calls == []


def test_reading_samples_leaves_the_global_rngs_alone(image_folder):
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    read_all(randaugment_dataset(image_folder))
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()
    assert torch.equal(before[0], after[0])
    assert before[1] == after[1]
    assert before[2][0] == after[2][0] and np.array_equal(before[2][1], after[2][1]) and before[2][2:] == after[2][2:]


@pytest.mark.parametrize("make_transform", ["timm", "finetune_transform"])
def test_augmentation_depends_only_on_seed_epoch_index(image_folder, make_transform):
    transform = (finetune_transform(True, 32) if make_transform == "finetune_transform" else
                 timm.data.create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    dataset = RobustSeededDataset(datasets.ImageFolder(str(image_folder), transform=transform), seed=3)
    dataset.set_epoch(1)
    direct = read_all(dataset)
    random.random(), np.random.rand(), torch.rand(1)  # the global states must not matter
    assert all(torch.equal(a[0], b[0]) for a, b in zip(direct, read_all(dataset)))
    for workers in (0, 2):
        through_loader = loader_items(dataset, num_workers=workers)
        assert [label for _, label, _ in through_loader] == [label for _, label, _ in direct]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(direct, through_loader)), f"{workers} workers"
    dataset.set_epoch(2)
    other_epoch = read_all(dataset)
    assert sum(not torch.equal(a[0], b[0]) for a, b in zip(direct, other_epoch)) >= len(direct) - 1


def test_pretrain_crops_change_with_the_epoch_only():
    dataset = RobustSeededDataset(DemoPhotos(32, samples_per_photo=1), seed=0)
    first = read_all(dataset)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, read_all(dataset)))
    dataset.set_epoch(1)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(first, read_all(dataset)))


# ------------------------------------------------------------------------------------------------------------------
# 3. The epoch travels with the sampler's indices: persistent workers
# ------------------------------------------------------------------------------------------------------------------

BATCH = 4


def seeded_loader(dataset: Dataset, num_workers: int, persistent: bool) -> DataLoader:
    """The training scripts' loader: shuffled per (seed, epoch), resumable, incomplete batch dropped."""
    sampler = ResumableDistributedSampler(dataset, BATCH, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    return DataLoader(dataset, sampler=sampler, batch_size=BATCH, drop_last=True, num_workers=num_workers,
                      persistent_workers=persistent)


def run_epoch(loader: DataLoader, epoch: int, start_step: int = 0) -> dict[int, torch.Tensor]:
    """One epoch (from `start_step`) as {dataset index: crop}; the epoch is given to the sampler only."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start_step(start_step)
    keys = list(loader.sampler)  # what the loader's sampler iterator will yield (the same epoch and start step)
    assert all(isinstance(key, EpochIndex) and key.epoch == epoch for key in keys)
    loader.sampler.set_start_step(start_step)
    assert len(loader) == len(keys) // BATCH
    images = torch.cat([batch for batch, _, _ in loader])
    assert len(images) == len(keys) // BATCH * BATCH
    return {key.index: image for key, image in zip(keys, images)}


def test_sampler_keys_equal_int_keys_with_set_epoch(image_folder):
    dataset = RobustSeededDataset(fd.build_fast_pretrain_dataset(image_folder, 32), seed=0)
    dataset.set_epoch(3)
    by_int = [dataset[i][0] for i in range(4)]
    dataset.set_epoch(0)  # an EpochIndex ignores the dataset's own epoch
    assert all(torch.equal(dataset[EpochIndex(3, i)][0], by_int[i]) for i in range(4))
    assert all(torch.equal(dataset[(3, i)][0], by_int[i]) for i in range(4))
    with pytest.raises(TypeError, match="int index or an \\(epoch, index\\) pair"):
        dataset[(3, 1, 2)]


def test_persistent_workers_see_every_epoch(image_folder):
    """With persistent workers and nothing but the sampler told the epoch, epoch 1's crops differ from epoch 0's
    and equal, sample by sample, what a fresh non-persistent loader yields for epoch 1."""
    dataset = RobustSeededDataset(fd.build_fast_pretrain_dataset(image_folder, 32), seed=0)
    persistent = seeded_loader(dataset, num_workers=2, persistent=True)
    epoch0, epoch1 = run_epoch(persistent, 0), run_epoch(persistent, 1)
    workers = persistent._iterator._workers
    fresh = run_epoch(seeded_loader(dataset, num_workers=0, persistent=False), 1)

    assert dataset.epoch == 0  # the dataset was never told
    assert sorted(epoch1) == sorted(fresh) and all(torch.equal(epoch1[i], fresh[i]) for i in fresh)
    common = set(epoch0) & set(epoch1)
    assert len(common) >= len(dataset) // 2
    assert all(not torch.equal(epoch0[i], epoch1[i]) for i in common)
    mid = run_epoch(persistent, 1, start_step=2)  # mid-epoch resume, same workers
    assert persistent._iterator._workers == workers
    order = [key.index for key in list(persistent.sampler)]  # epoch 1's order (start step was reset to 0)
    assert list(mid) == order[2 * BATCH:len(fresh)]
    assert all(torch.equal(mid[i], fresh[i]) for i in mid)


def test_set_start_step_rejects_negative_steps(image_folder):
    with pytest.raises(ValueError, match="start step must be >= 0"):
        seeded_loader(DemoPhotos(32, 1), num_workers=0, persistent=False).sampler.set_start_step(-1)


# ------------------------------------------------------------------------------------------------------------------
# 4. Default worker count from the job's CPUs
# ------------------------------------------------------------------------------------------------------------------


TORCHRUN = {"TORCHELASTIC_RUN_ID": "1"}


@pytest.mark.parametrize(("machine", "affinity", "env", "expected"), [
    (64, 64, {}, 16),  # one process owns the machine: capped per GPU
    (64, 64, {"LOCAL_WORLD_SIZE": "8", **TORCHRUN}, 6),  # torchrun, 8 GPUs, no binding: the machine is shared
    (224, 224, {"LOCAL_WORLD_SIZE": "8", **TORCHRUN}, 16),  # 8xH100 box: 28 CPUs per rank, capped
    # torchrun's 8 ranks inside one SLURM task of --cpus-per-task=64 share that task's CPUs (62 each before)
    (128, 64, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "64", **TORCHRUN}, 6),
    (96, 12, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "12"}, 10),  # srun task bound to its 12 CPUs
    (96, 80, {"LOCAL_WORLD_SIZE": "8", "SLURM_CPUS_PER_TASK": "10"}, 8),  # srun task, not bound: 10 are its own
    (2, 2, {}, 0),  # never below 0
    (8, 8, {"LOCAL_WORLD_SIZE": "16"}, 0),
])
def test_default_num_workers(monkeypatch, machine, affinity, env, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: machine)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    for name in ("LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_num_workers() == expected


class WorkerPid(Dataset):
    """Items are the pid of the process that loaded them."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(os.getpid()), 0


def test_classification_val_loader_keeps_its_workers_across_epochs():
    """The validation loader re-forked its workers at every evaluation (once per epoch, on every rank)."""
    import argparse

    from util.cls_data import build_loaders
    from util.datasets import RobustSeededDataset

    args = argparse.Namespace(world_size=None, batch_size=2, seed=0, max_bad_images=None, dist_eval=False,
                              num_workers=1, pin_mem=False, device="cpu")
    train_loader, val_loader, _ = build_loaders(args, RobustSeededDataset(WorkerPid(), 0), WorkerPid())
    assert train_loader.persistent_workers and val_loader.persistent_workers
    epochs = [{int(pid) for pids, _ in val_loader for pid in pids} for _ in range(2)]
    assert epochs[0] == epochs[1] and os.getpid() not in epochs[0]


def test_default_num_workers_without_affinity_and_bad_env(monkeypatch):
    for name in ("SLURM_CPUS_PER_TASK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # e.g. macOS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_num_workers() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "zero")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE must be a positive integer, got 'zero'"):
        default_num_workers()


# ------------------------------------------------------------------------------------------------------------------
# 5. Normalisation constants are made once per device
# ------------------------------------------------------------------------------------------------------------------


def test_normalisation_constants_are_cached_and_exact():
    assert device_constant(IMAGENET_MEAN, torch.device("cpu")) is device_constant(IMAGENET_MEAN, torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    normalised = normalize_on_device(images, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert torch.equal(normalised, (images.float() / 255 - mean) / std)
    assert torch.allclose(denormalize(normalised), images.float() / 255, atol=1e-6)
    with torch.inference_mode():  # a constant first made in inference mode still works with autograd later
        device_constant((0.5, 0.25), torch.device("cpu"))
    x = torch.ones(2, requires_grad=True)
    (x * device_constant((0.5, 0.25), torch.device("cpu"))).sum().backward()
    assert x.grad.tolist() == [0.5, 0.25]


def test_sample_images_are_rgb_whatever_the_source():
    from util.datasets import sample_images

    camera, coffee = sample_images(("camera", "coffee"))  # a grayscale and a colour sample image
    assert camera.mode == coffee.mode == "RGB"
    gray = np.asarray(camera)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    colour = np.asarray(coffee)
    assert not (colour[..., 0] == colour[..., 2]).all()
    gray_coffee = np.asarray(sample_images(("coffee",), gray=True)[0])
    assert gray_coffee.shape == colour.shape and (gray_coffee[..., 0] == gray_coffee[..., 2]).all()


def test_image_folder_layout_is_checked_before_torchvision_would_fail(tmp_path):
    """ImageFolder needs root/<class>/<image>: a flat folder of images, and a class folder without images, are
    refused naming the layout (torchvision would stop later, after the output folder exists)."""
    flat = tmp_path / "flat"
    write_image_folder(tmp_path / "tmp", num_images=2, classes=1)
    flat.mkdir()
    for image in (tmp_path / "tmp" / "class0").iterdir():
        image.rename(flat / image.name)
    with pytest.raises(ValueError, match=r"holds 2 images but no class sub-folders; expected .*root/<class>/<image>"):
        check_image_folder(flat)
    (flat / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) without images .*: empty_class"):
        check_image_folder(flat)
    good = write_image_folder(tmp_path / "good" / "train", num_images=4, classes=2).parent
    assert check_image_folder(good, prefer="train") == ["class0", "class1"]  # pre-training reads data_path/train
    with pytest.raises(ValueError, match="no class sub-folders"):
        check_image_folder(tmp_path / "good" / "train" / "class0", prefer="train")


def test_train_and_val_with_different_classes_are_refused_before_the_run(tmp_path):
    write_image_folder(tmp_path / "data" / "train", num_images=6, classes=3)
    write_image_folder(tmp_path / "data" / "val", num_images=4, classes=2)
    with pytest.raises(ValueError, match=r"train/ and val/ have different class folders \(only in train/: class2\)"):
        check_classification_folders(tmp_path / "data")


def test_demo_photos_are_eight_different_photographs():
    photos = [np.asarray(p.resize((64, 64))).astype(np.float32) for p in sample_images(DEMO_PHOTOS)]
    assert len(set(DEMO_PHOTOS)) == len(photos) == 8
    for i in range(len(photos)):
        for j in range(i):
            assert np.abs(photos[i] - photos[j]).mean() > 10, (DEMO_PHOTOS[i], DEMO_PHOTOS[j])
