"""util/datasets.py: only decode/IO failures count as broken images, per-sample seeding leaves every global RNG
(and CUDA's) alone and makes timm's fine-tuning augmentation reproducible, and DataLoader workers survive the
signals SLURM sends every process of a job."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from conftest import write_image_folder
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from util import fast_data as fd
from util.cls_data import build_image_folder, finetune_transform
from util.datasets import (
    DemoPhotos,
    GuardedLoader,
    RobustSeededDataset,
    UnreadableImageError,
    build_pretrain_dataset,
    ignore_stop_signals,
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
# 3. DataLoader workers ignore the stop signals
# ------------------------------------------------------------------------------------------------------------------


class Slow(Dataset):
    """index -> index, after a short sleep (so the workers are still busy when they are signalled)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> int:
        time.sleep(0.05)
        return index


def signal_from_another_process(pids: list[int], signals: list[int]) -> None:
    """Send signals as SLURM does: from a process that is not the workers' parent (torch's worker handler lets a
    SIGTERM from the parent end the worker quietly, and one from anyone else kill it)."""
    code = "import os, sys; [os.kill(int(p), int(s)) for s in sys.argv[1].split(',') for p in sys.argv[2:]]"
    subprocess.run([sys.executable, "-c", code, ",".join(map(str, signals)), *map(str, pids)], check=True)


def iterate_and_signal(worker_init_fn, signals: list[int]) -> list[int]:
    loader = DataLoader(Slow(), batch_size=2, num_workers=2, worker_init_fn=worker_init_fn)
    iterator = iter(loader)
    batches = [next(iterator), next(iterator)]  # one from each worker: both have run worker_init_fn
    signal_from_another_process([w.pid for w in iterator._workers], signals)
    time.sleep(0.2)  # let the signals land before the next batch is asked for
    batches.extend(iterator)
    return torch.cat(batches).tolist()


def test_workers_ignore_stop_signals():
    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    assert iterate_and_signal(ignore_stop_signals, signals) == list(range(24))


def test_without_ignore_stop_signals_a_sigterm_kills_the_loader():
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
        iterate_and_signal(None, [signal.SIGTERM])


def test_ignore_stop_signals_sets_sig_ign_for_the_three_signals():
    signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    previous = {sig: signal.getsignal(sig) for sig in signals}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

