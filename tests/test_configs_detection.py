"""configs/detection: each file resolves, validates and round-trips through --print_config, and holds Appendix A's
numbers and the ViT detection benchmark's setup (typed in here, not read from the files)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from test_configs import CONFIGS, assert_round_trip, file_values, make_parser, print_config, rel

import main_detection
from detection.demo import write_demo_dataset
from util import config

DET_FILES = sorted((CONFIGS / "detection").glob("*.yaml"))
# Appendix A ("Finetuning on COCO"): AdamW, weight decay 0.1, lr 1e-4, layer decay 0.75, batch 16, 1024x1024.
APPENDIX_A = dict(weight_decay=0.1, lr=1e-4, layer_decay=0.75, global_batch_size=16, input_size=1024)
# Li et al. 2021 (mask_rcnn_vit_b, MAE init): 14x14 windows, global blocks 3/6/9/12, drop path 0.1, LSJ 0.1-2.0,
# 100 epochs = 184,375 updates at batch 64 with drops at 163,889 and 177,546 and 250 warm-up updates from 0.001,
# here scaled to batch 16 (x4 updates).
BENCHMARK = dict(window_size=14, global_blocks=[2, 5, 8, 11], pyramid="multiblock", drop_path=0.1,
                 lsj_scale=[0.1, 2.0], iters=184375 * 4, lr_drops=[163889 * 4, 177546 * 4], lr_gamma=0.1,
                 warmup_iters=250 * 4, warmup_factor=0.001)
ROWS = {"mask_rcnn_deepmim_dagger_vit_base_100ep.yaml": "51.6 AP box / 45.2 AP mask",
        "mask_rcnn_deepmim_clip_vit_base_100ep.yaml": "52.8 AP box / 46.0 AP mask"}


def test_one_file_per_table_3_row():
    assert {p.name for p in DET_FILES} == set(ROWS)


@pytest.mark.parametrize("path", DET_FILES, ids=rel)
def test_detection_files_hold_appendix_a_and_the_benchmark(path):
    values = file_values(path)
    for key, expected in {**APPENDIX_A, **BENCHMARK}.items():
        assert values[key] == expected, f"{rel(path)}: {key}"
    assert ROWS[path.name] in path.read_text()


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("coco"))


@pytest.mark.parametrize("path", DET_FILES, ids=rel)
def test_detection_config_prints_appendix_a_and_round_trips(path, coco_folder, tmp_path, capsys):
    def resolve(argv: list[str]) -> argparse.Namespace:
        args = config.parse_with_config(make_parser("detection"), [*argv, "--data_path", str(coco_folder),
                                                                   "--output_dir", str(tmp_path / "out")])
        main_detection.resolve_args(args)
        return args

    args = resolve(["--config", str(path), "--print_config"])
    text = print_config(args, "detection", lambda a: None, capsys)
    printed = yaml.safe_load(text)
    assert (float(printed["lr"]), printed["layer_decay"], printed["weight_decay"]) == (1e-4, 0.75, 0.1)
    assert args.model == "vit_base_patch16" and args.depth == 12 and args.global_blocks == [2, 5, 8, 11]
    assert_round_trip(args, text, tmp_path, resolve)
