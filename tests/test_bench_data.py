"""benchmarks/bench_data.py reads an ImageNet-style folder: its PSNR pass takes the images both pipelines read, so
ImageNet's upper-case `.JPEG` files are measured, not skipped into an empty list (issue 24, item 19)."""

import importlib.util
import math

import numpy as np
import torch
from conftest import ROOT
from PIL import Image

spec = importlib.util.spec_from_file_location("bench_data", ROOT / "benchmarks" / "bench_data.py")
bench_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_data)


def imagenet_style_folder(root, num_images=6):
    """<wnid>/<wnid>_<n>.JPEG, as ImageNet's train folders are named."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / ("n01440764" if i % 2 else "n01443537")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{folder.name}_{i}.JPEG", "JPEG", quality=90)
    return root


def test_psnr_pass_reads_upper_case_jpeg_files(tmp_path):
    root = imagenet_style_folder(tmp_path / "train")
    mean_psnr, min_psnr, scales = bench_data.fidelity(root, 32, 4, 0, 2)
    assert sum(scales.values()) == 4 and math.isfinite(mean_psnr) and math.isfinite(min_psnr)


def test_benchmark_runs_on_an_imagenet_style_folder(tmp_path, capsys):
    root = imagenet_style_folder(tmp_path / "train", num_images=4)
    args = bench_data.get_args_parser().parse_args(["--data_dir", str(root), "--input_size", "32", "--repeats", "1",
                                                    "--psnr_images", "4"])
    threads = torch.get_num_threads()
    try:
        bench_data.main(args)  # sets one torch thread, as a loader worker has
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "4 JPEGs" in out and "4 images: mean" in out and "nan" not in out
