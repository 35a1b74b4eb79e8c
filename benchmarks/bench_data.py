"""Pre-training data pipeline: images/s per worker process of ours (util/fast_data.py) vs the reference, and fidelity.

Reference (MAE's released code): torchvision ImageFolder + PIL RandomResizedCrop(224, (0.2, 1), bicubic) +
RandomHorizontalFlip + ToTensor + Normalize. Ours: FastRandomResizedCrop (uint8 tensor crop-resize, reduced-scale
JPEG decode when the crop allows it), uint8 output, normalised later on the device.

"Per worker" = one process with one torch thread, as a DataLoader worker runs. The folder of ImageNet-sized JPEGs
(500x375 or 375x500, quality 90) is made from scikit-image's photographs: random crops, resized, so no download.
Fidelity: mean PSNR (dB, on 0..255 pixels) of our output against the reference's for identical crop boxes.

    python benchmarks/bench_data.py                                  # 500x375 JPEGs, the issue's setting
    python benchmarks/bench_data.py --image_size 1000 750            # larger photos: the reduced decode kicks in
    python benchmarks/bench_data.py --loader_workers 2               # also a full DataLoader (collate included)
                                                                     # and the epoch start: fresh vs persistent workers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util import fast_data as fd  # noqa: E402
from util.datasets import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResumableDistributedSampler,
    RobustSeededDataset,
    demo_photos,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Data pipeline benchmark", add_help=False)
    parser.add_argument("--data_dir", default=None, type=str,
                        help="ImageFolder to read (default: a temporary folder of generated JPEGs)")
    parser.add_argument("--num_images", default=200, type=int, help="JPEGs to generate")
    parser.add_argument("--image_size", default=(500, 375), type=int, nargs=2, metavar=("W", "H"),
                        help="landscape size of the generated JPEGs (a quarter are portrait)")
    parser.add_argument("--quality", default=90, type=int, help="JPEG quality of the generated images")
    parser.add_argument("--input_size", default=224, type=int, help="crop size")
    parser.add_argument("--repeats", default=3, type=int, help="timed passes over the folder per pipeline (median)")
    parser.add_argument("--psnr_images", default=100, type=int, help="images (one box each) for the PSNR")
    parser.add_argument("--loader_workers", default=0, type=int,
                        help="also time a DataLoader with this many workers, batch 64, and the start of an epoch "
                             "with fresh vs persistent workers (0: skip)")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def validate(args: argparse.Namespace) -> None:
    for flag in ("num_images", "quality", "input_size", "repeats", "psnr_images"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.quality > 100:
        raise ValueError(f"--quality must be in 1..100, got {args.quality}")
    if min(args.image_size) < args.input_size // 2:
        raise ValueError(f"--image_size {args.image_size} is too small for --input_size {args.input_size}")
    if args.loader_workers < 0:
        raise ValueError("--loader_workers must be >= 0")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data_dir {args.data_dir} is not a folder")


def make_folder(root: Path, num_images: int, size: tuple[int, int], quality: int, seed: int) -> Path:
    """ImageFolder of `num_images` JPEGs: random crops (30-100 % of the side) of real photographs, resized to
    `size` (W, H) or, for every 4th image, to the portrait (H, W). Two class folders."""
    rng = np.random.default_rng(seed)
    photos = demo_photos()
    for i in range(num_images):
        photo = photos[i % len(photos)]
        w, h = size if i % 4 else size[::-1]
        side = rng.uniform(0.3, 1.0)
        cw = min(photo.width, int(photo.height * w / h)) * side
        ch = cw * h / w
        x0, y0 = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
        img = photo.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img{i:05d}.jpg", "JPEG", quality=quality)
    return root


def reference_dataset(root: Path, input_size: int) -> Dataset:
    """MAE's released pre-training pipeline."""
    return datasets.ImageFolder(str(root), transform=transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]))


def time_pass(dataset: Dataset) -> float:
    """Seconds for one pass over the dataset, item by item, in this process."""
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - start


def per_worker_rates(datasets_: dict[str, Dataset], repeats: int) -> dict[str, float]:
    """Median images/s of each pipeline; passes interleaved so that machine noise hits both alike."""
    for ds in datasets_.values():
        time_pass(ds)  # warm the page cache and the code paths
    times: dict[str, list[float]] = {name: [] for name in datasets_}
    for _ in range(repeats):
        for name, ds in datasets_.items():
            times[name].append(time_pass(ds))
    return {name: len(datasets_[name]) / statistics.median(t) for name, t in times.items()}


def loader_rate(dataset: Dataset, workers: int, batch_size: int = 64) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True, drop_last=True,
                        persistent_workers=True)
    for _ in loader:  # start the workers, warm the cache
        pass
    start, n = time.perf_counter(), 0
    for batch, _ in loader:
        n += batch.shape[0]
    return n / (time.perf_counter() - start)


def epoch_start_seconds(dataset: Dataset, workers: int, persistent: bool, epochs: int = 3,
                       batch_size: int = 64) -> float:
    """Median seconds from the start of an epoch to its first batch, over the epochs after the first, with the
    training scripts' sampler and dataset wrapper: workers forked again every epoch, or kept (`persistent`)."""
    robust = RobustSeededDataset(dataset, seed=0)
    sampler = ResumableDistributedSampler(robust, batch_size, num_replicas=1, rank=0, shuffle=True, seed=0,
                                          drop_last=True)
    loader = DataLoader(robust, sampler=sampler, batch_size=batch_size, drop_last=True, num_workers=workers,
                        persistent_workers=persistent)
    latencies = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        latencies.append(time.perf_counter() - start)
        for _ in batches:
            pass
    return statistics.median(latencies[1:])


def fidelity(
    root: Path, input_size: int, num: int, seed: int, min_dct_scale: int | None
) -> tuple[float, float, dict[int, int]]:
    """Mean and min PSNR of our crops vs the reference's for identical boxes, and how often each DCT scale ran."""
    files = [Path(path) for path, _ in datasets.ImageFolder(str(root)).samples[:num]]  # the images both pipelines read
    fast = fd.FastRandomResizedCrop(input_size, min_dct_scale=min_dct_scale)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    to_float = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(seed)
    values, scales = [], {}
    for path in files:
        data = path.read_bytes()
        crop = fd.sample_crop(*fd.open_header(data).size)
        ref = transforms.functional.resized_crop(Image.open(path).convert("RGB"), crop.top, crop.left, crop.height,
                                                 crop.width, [input_size, input_size], InterpolationMode.BICUBIC)
        ref = to_float(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if crop.flip else ref)
        ref_pixels = (ref * std + mean) * 255  # the reference's float output, on the 0..255 scale
        values.append(fd.psnr(fast.apply(data, crop).float(), ref_pixels))
        s = fast.dct_scale(fd.open_header(data), crop)
        scales[s] = scales.get(s, 0) + 1
    return float(np.mean(values)), float(np.min(values)), scales


def main(args: argparse.Namespace) -> None:
    validate(args)
    torch.set_num_threads(1)  # what a DataLoader worker gets
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else make_folder(
            Path(tmp), args.num_images, tuple(args.image_size), args.quality, args.seed)
        pipelines = {
            "reference (PIL crop-resize, ToTensor, Normalize)": reference_dataset(root, args.input_size),
            f"ours (fast_data, uint8; reduced decode from 1/{fd.DEFAULT_MIN_DCT_SCALE})":
                fd.build_fast_pretrain_dataset(root, args.input_size),
            "ours, reduced decode from 1/2": fd.build_fast_pretrain_dataset(root, args.input_size, min_dct_scale=2),
            "ours, full-size decode only": fd.build_fast_pretrain_dataset(root, args.input_size, min_dct_scale=None),
        }
        rates = per_worker_rates(pipelines, args.repeats)
        fidelities = {s: fidelity(root, args.input_size, args.psnr_images, args.seed, s)
                      for s in (fd.DEFAULT_MIN_DCT_SCALE, 2)}
        loader, epoch_start = {}, {}
        if args.loader_workers:
            torch.set_num_threads(max(1, torch.get_num_threads()))
            for name, ds in pipelines.items():
                loader[name] = loader_rate(ds, args.loader_workers)
            default = pipelines[next(name for name in pipelines if name.startswith("ours"))]
            epoch_start = {persistent: epoch_start_seconds(default, args.loader_workers, persistent)
                           for persistent in (False, True)}

    base = next(iter(rates.values()))
    print(f"\n{len(next(iter(pipelines.values())))} JPEGs, {args.image_size[0]}x{args.image_size[1]} "
          f"(q{args.quality}), crops {args.input_size}, one process, 1 thread")
    columns = ["pipeline", "images/s per worker", "speed-up"] + ([f"DataLoader x{args.loader_workers} images/s"]
                                                                 if loader else [])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, rate in rates.items():
        row = f"| {name} | {rate:.0f} | {rate / base:.2f}x |"
        print(row + (f" {loader[name]:.0f} |" if loader else ""))
    if epoch_start:
        print(f"epoch start, {args.loader_workers} workers, ours (default), s to the first batch of epochs 1-2 "
              f"(median): fresh workers {epoch_start[False]:.3f}, persistent workers {epoch_start[True]:.3f}")
    for min_scale, (mean_psnr, min_psnr, scales) in fidelities.items():
        print(f"PSNR ours (reduced decode from 1/{min_scale}) vs reference, identical boxes, {args.psnr_images} "
              f"images: mean {mean_psnr:.1f} dB, min {min_psnr:.1f} dB; decode scale used (1/s: crops) "
              f"{dict(sorted(scales.items()))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Data pipeline benchmark", parents=[get_args_parser()])
    cli_args = parser.parse_args()
    try:
        validate(cli_args)
    except ValueError as err:
        parser.error(str(err))
    main(cli_args)
