"""Pre-training data: MAE's augmentation (RandomResizedCrop 0.2-1, bicubic, flip), uint8 batches normalised on
the device, ImageFolder datasets, the built-in demo set of real photographs, reproducible sampling (the epoch travels
with the sampler's indices, so DataLoader workers can persist) and the default worker count."""

from __future__ import annotations

import functools
import logging
import operator
import os
import random
import signal
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Real colour images shipped inside scikit-image (no download needed), eight different ones (skimage.data.cat()
# is chelsea() again, so it is not among them; retina is a fundus photograph).
DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "colorwheel")


def pretrain_transform(input_size: int) -> transforms.Compose:
    """MAE's pre-training augmentation (paper Appendix A: random resized crop + horizontal flip).

    Returns uint8 (3, H, W) tensors: normalisation happens on the device (`normalize_on_device`), which keeps the
    loader's work and the host-to-device copy 4x smaller than float32.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


def device_constant(values: tuple[float, ...], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """A 1-D tensor of `values` on `device`, created once per (values, device, dtype) and then reused.

    `torch.tensor(list, device="cuda")` in a training step copies from pageable host memory and waits for the
    stream: a host sync per call. This copies once. The tensor is shared by every caller: never modify it in place.
    It is a normal tensor even when first asked for under `torch.inference_mode()`.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current device, which may change
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached_constant(tuple(values), device, dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """`device_constant`'s cache, keyed by an indexed device."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(values, dtype=dtype).to(device)


def imagenet_mean_std(device: torch.device | str) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as float32 (1, 3, 1, 1) tensors on `device`, cached (`device_constant`)."""
    return (device_constant(IMAGENET_MEAN, device).view(1, 3, 1, 1),
            device_constant(IMAGENET_STD, device).view(1, 3, 1, 1))


def normalize_on_device(images: Tensor, device: torch.device | str, non_blocking: bool = True) -> Tensor:
    """uint8 (N, 3, H, W) on the host -> float32 ImageNet-normalised on `device` (no host sync after the first call:
    the constants are cached on the device; pin the batch's memory for an asynchronous copy)."""
    images = images.to(device, non_blocking=non_blocking).float().div_(255.0)
    mean, std = imagenet_mean_std(images.device)
    return images.sub_(mean).div_(std)


def denormalize(images: Tensor) -> Tensor:
    """ImageNet-normalised (N, 3, H, W) -> [0, 1] (float32 or wider) for display."""
    mean, std = imagenet_mean_std(images.device)
    return (images * std + mean).clamp(0, 1)


def check_image_folder(path: str | os.PathLike, prefer: str | None = None) -> list[str]:
    """Raise ValueError naming the path unless it is an ImageFolder root: class sub-folders (`root/<class>/<image>`),
    each with at least one image (torchvision refuses a root without class folders and any empty class). With
    `prefer` ('train', 'val'), `path/prefer` is the root when it exists, as the datasets read it. Returns the class
    folder names, sorted (ImageFolder's order). Scans only until each class's first image."""
    given = Path(path)
    if not given.is_dir():
        raise ValueError(f"--data_path {given} is not a folder")
    root = given / prefer if prefer and (given / prefer).is_dir() else given
    with os.scandir(root) as entries:
        entries = list(entries)
    classes = sorted(e.name for e in entries if e.is_dir())
    layout = "an ImageFolder: root/<class>/<image>, one sub-folder per class"
    if not classes:
        loose = sum(e.is_file() and _is_image(e.name) for e in entries)
        found = f"{loose} images but no class sub-folders" if loose else "no class sub-folders"
        raise ValueError(f"--data_path {given}: {root} holds {found}; expected {layout} (for unlabelled images, "
                         f"move them into one sub-folder, e.g. {root}/images/)")
    empty = [c for c in classes if not _holds_image(root / c)]
    if empty:
        raise ValueError(f"--data_path {given}: class folder(s) without images under {root}: {', '.join(empty[:5])}"
                         f"{' ...' if len(empty) > 5 else ''} (images: {', '.join(datasets.folder.IMG_EXTENSIONS)}); "
                         f"expected {layout}")
    return classes


def _is_image(name: str) -> bool:
    return name.lower().endswith(datasets.folder.IMG_EXTENSIONS)


def _holds_image(folder: Path) -> bool:
    """Whether `folder` or a folder below it holds an image file (as ImageFolder walks it, links followed)."""
    subfolders = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and _is_image(entry.name):
                return True
            if entry.is_dir():
                subfolders.append(Path(entry.path))
    return any(_holds_image(sub) for sub in subfolders)


def build_pretrain_dataset(data_path: str, input_size: int) -> Dataset:
    """ImageFolder over `data_path` (or `data_path/train` when it exists), MAE's transform.

    A file that cannot be read or decoded raises `UnreadableImageError` (see `GuardedLoader`)."""
    root = Path(data_path) / "train" if (Path(data_path) / "train").is_dir() else Path(data_path)
    return datasets.ImageFolder(str(root), transform=pretrain_transform(input_size),
                                loader=GuardedLoader(datasets.folder.default_loader))


def sample_images(names: Sequence[str], gray: bool = False) -> list[Image.Image]:
    """scikit-image's sample images `skimage.data.<name>()` (shipped with the package, no download) as RGB PIL
    images: colour ones without their alpha channel, grayscale ones replicated to three channels; with `gray`, every
    image converted to gray first."""
    import skimage.data

    images = []
    for name in names:
        array = np.asarray(getattr(skimage.data, name)())
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array)
        images.append((image.convert("L") if gray else image).convert("RGB"))
    return images


def demo_photos() -> list[Image.Image]:
    """The colour photographs of DEMO_PHOTOS, as RGB PIL images."""
    return sample_images(DEMO_PHOTOS)


class DemoPhotos(Dataset):
    """A small real-image set for the demo and tests: `samples_per_photo` augmented crops of each photograph.

    Photographs larger than `max_side` pixels are shrunk first (antialiased, aspect kept): a crop of a fifth of the
    photograph or more ends at input_size (32 px in the demo) anyway, and cropping the 1411-px retina at full size
    would cost the demo ten times the time of the others."""

    def __init__(self, input_size: int, samples_per_photo: int = 64, max_side: int = 512):
        self.photos = demo_photos()
        for photo in self.photos:
            photo.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        self.samples_per_photo = samples_per_photo
        self.transform = pretrain_transform(input_size)

    def __len__(self) -> int:
        return len(self.photos) * self.samples_per_photo

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        photo = index % len(self.photos)
        return self.transform(self.photos[photo]), photo


# ------------------------------------------------------------------------------------------------------------------
# Reproducible, fault-tolerant sampling (exact resume, broken files)
# ------------------------------------------------------------------------------------------------------------------

# What reading and decoding a broken file raises: PIL raises OSError (UnidentifiedImageError, "image file is
# truncated"), SyntaxError, ValueError, EOFError, struct.error or DecompressionBombError; torchvision's JPEG decoder
# raises RuntimeError. Only the reading/decoding step is guarded with these (`GuardedLoader`, `unreadable_as_error`):
# the same types raised by a transform are bugs and propagate.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, EOFError, struct.error,
                    Image.DecompressionBombError)


class UnreadableImageError(Exception):
    """A file could not be read or decoded as an image (unreadable, truncated, not an image).

    The only error `RobustSeededDataset` replaces and counts; `cause` is the decoder's or the OS's error.
    """

    def __init__(self, path: str | os.PathLike | None, cause: BaseException | None = None):
        self.path, self.cause = (None if path is None else str(path)), cause
        where = "image data" if path is None else f"image {path}"
        # With no cause (e.g. re-created from a DataLoader worker's message), `path` is the whole message.
        super().__init__(f"unreadable {where}: {type(cause).__name__}: {cause}" if cause is not None else str(path))


@contextmanager
def unreadable_as_error(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn the decode/IO errors (`BAD_IMAGE_ERRORS`) raised inside the block into `UnreadableImageError(path)`.

    Guard only the reading and decoding of a file with it, never a transform."""
    try:
        yield
    except BAD_IMAGE_ERRORS as err:
        raise UnreadableImageError(path, err) from err


class GuardedLoader:
    """An ImageFolder `loader` (path -> image) whose read/decode failures raise `UnreadableImageError(path)`.

    Picklable (DataLoader workers). Wrap the loader, not the transform: augmentation bugs keep their own type.
    """

    def __init__(self, loader: Callable[[str], Any]):
        self.loader = loader

    def __call__(self, path: str) -> Any:
        with unreadable_as_error(path):
            return self.loader(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.loader, '__name__', self.loader)!r})"


def sample_seed(seed: int, epoch: int, index: int, length: int) -> int:
    """The seed of sample `index` of a dataset of `length` items in `epoch` (unique per triple, < 2**64)."""
    return ((seed * 1_000_003 + epoch) * length + index) % 2**64


@contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Seed the host RNGs augmentations draw from (torch's default CPU generator, python's `random`, numpy's
    global RNG) with `seed` inside the block, and restore their previous states afterwards.

    CUDA (and other accelerator) generators are never touched: `torch.manual_seed` would reseed them, and in the
    main process (--num_workers 0) that would reset the masking noise at every sample.
    """
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed([seed % 2**32, seed >> 32])  # numpy takes 32-bit words
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class EpochIndex(NamedTuple):
    """A sampler item that carries its epoch: `ResumableDistributedSampler` yields these, `RobustSeededDataset`
    draws the sample's augmentation from (seed, epoch, index).

    Persistent DataLoader workers hold a copy of the dataset made when they started, so an epoch set on the dataset
    later (`set_epoch`) never reaches them; an epoch sent with every index does.
    """

    epoch: int
    index: int


class RobustSeededDataset(Dataset):
    """Wraps a dataset so that (1) each sample's augmentation is drawn from host RNGs seeded by (seed, epoch,
    index) — the same crops whatever the worker count, whether workers persist, or the point a run resumed from —
    and (2) an unreadable image is replaced by another sample, logged with its path and counted.

    Keys: an `EpochIndex(epoch, index)` (what `ResumableDistributedSampler` yields: the epoch travels with the index,
    which makes `persistent_workers=True` safe) or a plain int index, which uses the epoch given to `set_epoch`.

    Only `UnreadableImageError` counts as a broken file: build the wrapped dataset with a guarded loader
    (`build_pretrain_dataset`, `util.fast_data.build_fast_pretrain_dataset`, `GuardedLoader`). Any other error,
    e.g. a bug in a transform, propagates unchanged.

    Items are (image, label, bad) where bad is the number of broken files skipped to produce this item.
    """

    def __init__(self, dataset: Dataset, seed: int, max_retries: int = 20):
        self.dataset, self.seed, self.epoch, self.max_retries = dataset, seed, 0, max_retries

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain int keys (an `EpochIndex` carries its own). Not seen by workers that already run."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _path(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[index][0] if samples is not None else f"item {index}"

    def _epoch_and_index(self, key: int | EpochIndex) -> tuple[int, int]:
        """(epoch, index) of a key: an (epoch, index) pair, or an int index with the epoch set by set_epoch."""
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"a {type(self).__name__} key is an int index or an (epoch, index) pair, got {key!r}")
            return operator.index(key[0]), operator.index(key[1])
        return self.epoch, operator.index(key)

    def __getitem__(self, key: int | EpochIndex) -> tuple[Tensor, int, int]:
        epoch, index = self._epoch_and_index(key)
        length = len(self)
        for bad in range(self.max_retries + 1):
            candidate = (index + bad * 7919) % length  # a deterministic replacement (7919 is prime)
            try:
                with seeded_host_rngs(sample_seed(self.seed, epoch, candidate, length)):
                    image, label = self.dataset[candidate]
                return image, label, bad
            except UnreadableImageError as err:
                cause = err.cause if err.cause is not None else err
                logger.warning("skipping unreadable image %s (%s: %s)", self._path(candidate),
                               type(cause).__name__, cause)
        raise RuntimeError(f"{self.max_retries + 1} unreadable images in a row around index {index}; "
                           "is --data_path the right folder?")


# Signals SLURM sends every process of a job step on preemption, scancel or time-out (and submitit's USR2).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGTERM, SIGUSR1 and SIGUSR2.

    SLURM signals every process of the job step; a worker killed by it makes the main process fail with "DataLoader
    worker exited unexpectedly" before it can save. The main process keeps its own graceful-stop handler
    (util/preemption.py) and shuts the workers down itself; a worker whose main process is gone exits on its own
    (torch's worker watchdog).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose items carry their epoch, and that can start part-way through an epoch (after
    `start_step` batches of this rank).

    Yields `EpochIndex(epoch, index)`, for a dataset that accepts them (`RobustSeededDataset`): the epoch set with
    `set_epoch` reaches the workers with every index, so the DataLoader may keep its workers across epochs
    (`persistent_workers=True`). Call `set_epoch` (and `set_start_step`) before iterating the loader.
    """

    def __init__(self, dataset: Dataset, batch_size: int, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_step = batch_size, 0

    def set_start_step(self, step: int) -> None:
        """Skip the first `step` batches of the next epoch iterated (reset to 0 after one epoch)."""
        if step < 0:
            raise ValueError(f"start step must be >= 0, got {step}")
        self.start_step = step

    def __iter__(self) -> Iterator[EpochIndex]:
        indices = list(super().__iter__())
        skip, self.start_step = self.start_step * self.batch_size, 0
        return iter([EpochIndex(self.epoch, index) for index in indices[skip:]])

    def __len__(self) -> int:
        return self.num_samples - self.start_step * self.batch_size


# ------------------------------------------------------------------------------------------------------------------
# Loader processes
# ------------------------------------------------------------------------------------------------------------------

# Busy threads of a training process besides its loader workers: the main process and the pin-memory thread.
MAIN_PROCESS_THREADS = 2
# Workers per training process (per GPU), at most: our JPEG pipeline gives 330-500 images/s per worker
# (benchmarks/RESULTS.md), so 16 feed ~5000-8000 images/s, above what one GPU pre-trains ViT-B at; more only cost
# memory and fork time (MAE's launcher used 10 per GPU).
MAX_WORKERS_PER_PROCESS = 16


def default_num_workers() -> int:
    """DataLoader workers per training process from the CPUs this process may use, at most
    MAX_WORKERS_PER_PROCESS.

    The CPUs are those of `os.sched_getaffinity(0)`, shared by the training processes of this node that were
    started from one task: torchrun's LOCAL_WORLD_SIZE children (TORCHELASTIC_RUN_ID set) always share their
    parent's set, e.g. 8 ranks under one `--cpus-per-task=64` task. A process that SLURM started as its own task
    (srun, submitit) has SLURM_CPUS_PER_TASK CPUs, whether or not SLURM bound it to them. Otherwise the set is
    divided by LOCAL_WORLD_SIZE (1 when unset). Minus the main process and the pin-memory thread, at least 0 (0:
    load in the main process).
    """
    machine = os.cpu_count() or 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    task_cpus = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if "TORCHELASTIC_RUN_ID" not in os.environ and task_cpus.isdigit() and int(task_cpus) > 0:
        cpus = min(cpus, int(task_cpus))
    else:
        cpus //= _local_world_size()
    return min(MAX_WORKERS_PER_PROCESS, max(0, cpus - MAIN_PROCESS_THREADS))


def _local_world_size() -> int:
    """Training processes on this node: LOCAL_WORLD_SIZE (torchrun, util/submit.py), 1 when unset."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer, got {value!r}")
    return int(value)
