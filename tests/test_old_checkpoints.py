"""Checkpoints written before the restructuring (commit 706c354, by tests/data/make_old_checkpoints.py) still load:
a pre-training run resumes, its encoder fine-tunes and loads into the analysis tools, a fine-tuning run resumes."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder

import main_finetune
import main_pretrain
from analysis.loading import load_model
from util.checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parent / "data"
OLD_PRETRAIN = DATA / "pretrain-706c354-epoch0.pth"
OLD_FINETUNE = DATA / "finetune-706c354-epoch0.pth"
ARCH = ["--input_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
        "--decoder_embed_dim", "16", "--decoder_depth", "1", "--decoder_num_heads", "2"]


def finetune_args(*argv: str) -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[main_finetune.get_args_parser()]).parse_args(list(argv))


def test_old_pretraining_checkpoint_resumes_its_run(tmp_path):
    out = tmp_path / "pre"
    out.mkdir()
    shutil.copy(OLD_PRETRAIN, out / "checkpoint-0.pth")
    data = write_image_folder(tmp_path / "images", num_images=8, size=40)
    argv = ["--data_path", str(data), "--output_dir", str(out), "--model", "deepmim_vit_small_patch16", *ARCH,
            "--supervised_blocks", "1", "2", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--blr", "1e-3", "--print_freq", "1", "--save_freq", "1", "--norm_pix_loss",
            "--device", "cpu", "--resume", "auto"]
    result = main_pretrain.main(main_pretrain.parse_args(argv))
    assert {"loss_b1", "loss_b2"} <= set(result.stats)
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert state["epoch"] == 1  # the old run's second epoch, trained now
    old = load_checkpoint(OLD_PRETRAIN)["model"]
    assert not torch.equal(state["model"]["blocks.0.attn.qkv.weight"], old["blocks.0.attn.qkv.weight"])


def test_old_pretraining_run_resumed_with_another_masking_strategy_is_refused(tmp_path):
    """The old run predates --mask_strategy: it masked randomly, so semantic-aware masking is another experiment."""
    out = tmp_path / "pre"
    out.mkdir()
    shutil.copy(OLD_PRETRAIN, out / "checkpoint-0.pth")
    teacher = tmp_path / "clip.pt"
    teacher.write_bytes(b"never read: the resume check comes first")
    data = write_image_folder(tmp_path / "images", num_images=8, size=40)
    argv = ["--data_path", str(data), "--output_dir", str(out), "--model", "deepmim_vit_small_patch16", *ARCH,
            "--supervised_blocks", "1", "2", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--blr", "1e-3", "--norm_pix_loss", "--device", "cpu", "--resume", "auto",
            "--mask_strategy", "semantic_aware", "--mask_teacher", "clip", "--mask_teacher_path", str(teacher)]
    with pytest.raises(ValueError, match="--mask_strategy: 'random' -> 'semantic_aware'"):
        main_pretrain.main(main_pretrain.parse_args(argv))


def test_old_pretraining_checkpoint_loads_into_the_analysis_tools():
    model, epoch = load_model(OLD_PRETRAIN, device="cpu", require_decoders=True)
    assert epoch == 0 and list(model.supervised_blocks) == [1, 2]
    old = load_checkpoint(OLD_PRETRAIN)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, old[key]), key


def test_old_pretraining_checkpoint_fine_tunes_and_an_old_fine_tuning_run_resumes(tmp_path):
    data = tmp_path / "cls"
    for split in ("train", "val"):
        write_image_folder(data / split, num_images=8, size=40)
    common = ["--data_path", str(data), "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
              "--num_workers", "0", "--device", "cpu", "--print_freq", "1", "--save_freq", "1", "--mixup", "0.8",
              "--cutmix", "1.0"]
    fresh = main_finetune.main(finetune_args("--finetune", str(OLD_PRETRAIN), "--output_dir", str(tmp_path / "a"),
                                             *common))
    assert 0 <= fresh["acc1"] <= 100
    out = tmp_path / "b"
    out.mkdir()
    shutil.copy(OLD_FINETUNE, out / "checkpoint-0.pth")
    resumed = main_finetune.main(finetune_args("--resume", "auto", "--output_dir", str(out), *common))
    assert resumed["n"] == 8 and load_checkpoint(out / "checkpoint-last.pth")["epoch"] == 1
