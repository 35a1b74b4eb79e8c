"""configs/segmentation: each file resolves, validates and round-trips through --print_config, and holds Appendix A's
numbers and the released config's schedule (typed in here, not read from the files)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from test_configs import CONFIGS, assert_round_trip, file_values, make_parser, print_config, rel

import main_segmentation
from segmentation.demo import write_demo_dataset
from util import config

SEG_FILES = sorted((CONFIGS / "segmentation").glob("*.yaml"))
# Appendix A ("Finetuning on ADE20K"): AdamW, weight decay 0.05, drop path 0.1, batch 16, 512x512; lr / layer decay
# 1e-4 / 0.65 for DeepMIM on MAE, 5e-5 / 0.9 for DeepMIM on MAE-CLIP.
APPENDIX_A = dict(weight_decay=0.05, drop_path=0.1, global_batch_size=16, input_size=512)
LR_AND_DECAY = {"upernet_deepmim_vit_base_160k.yaml": (1e-4, 0.65),
                "upernet_deepmim_clip_vit_base_160k.yaml": (5e-5, 0.9)}
# The released upernet_mae_base_12_512_slide_160k_ade20k.py and its _base_ files.
RELEASED = dict(iters=160000, eval_interval=16000, warmup_iters=1500, warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0,
                out_indices=[3, 5, 7, 11], channels=768, aux_channels=256, aux_weight=0.4, num_classes=150,
                reduce_zero_label=True, img_scale=[2048, 512], ratio_range=[0.5, 2.0], cat_max_ratio=0.75,
                slide_stride=341)


def test_one_file_per_appendix_a_setting():
    assert {p.name for p in SEG_FILES} == set(LR_AND_DECAY)


@pytest.mark.parametrize("path", SEG_FILES, ids=rel)
def test_segmentation_files_hold_appendix_a_and_the_released_schedule(path):
    values = file_values(path)
    for key, expected in {**APPENDIX_A, **RELEASED}.items():
        assert values[key] == expected, f"{rel(path)}: {key}"
    assert (values["lr"], values["layer_decay"]) == LR_AND_DECAY[path.name]
    assert "pos_embed and cls_token are decayed too" in path.read_text()  # the released constructor's behaviour


@pytest.fixture(scope="module")
def ade_folder(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("ade"), n_train=2, n_val=1)


@pytest.mark.parametrize("path", SEG_FILES, ids=rel)
def test_segmentation_config_prints_appendix_a_and_round_trips(path, ade_folder, tmp_path, capsys):
    def resolve(argv: list[str]) -> argparse.Namespace:
        args = config.parse_with_config(make_parser("segmentation"), [*argv, "--data_path", str(ade_folder),
                                                                      "--output_dir", str(tmp_path / "out")])
        main_segmentation.resolve_args(args)
        return args

    no_data = config.parse_with_config(make_parser("segmentation"), ["--config", str(path), "--print_config"])
    main_segmentation.resolve_args(no_data, read_files=False)  # --print_config needs no --data_path: reads no file
    args = resolve(["--config", str(path), "--print_config"])
    text = print_config(args, "segmentation", lambda a: None, capsys)
    lr, decay = LR_AND_DECAY[path.name]
    printed = yaml.safe_load(text)
    assert (float(printed["lr"]), printed["layer_decay"]) == (lr, decay)
    assert args.model == "vit_base_patch16" and args.depth == 12 and args.out_indices == [3, 5, 7, 11]
    assert_round_trip(args, text, tmp_path, resolve)
