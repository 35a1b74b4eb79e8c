"""How tests/data/*-706c354-epoch0.pth were written: run with the code of commit 706c354 (before the restructuring of
issue 15) checked out in /tmp/oldwt (`git worktree add /tmp/oldwt 706c354`), then copy /tmp/oldgen/pre/checkpoint-0.pth
and /tmp/oldgen/ft/checkpoint-0.pth here. Kept for the record; tests/test_old_checkpoints.py reads the files."""

import argparse
import shutil
import sys
from pathlib import Path

OLD_CODE = "/tmp/oldwt"
sys.path[:0] = [OLD_CODE, f"{OLD_CODE}/tests"]

from conftest import write_image_folder  # noqa: E402

import main_finetune  # noqa: E402
import main_pretrain  # noqa: E402

root = Path("/tmp/oldgen")
shutil.rmtree(root, ignore_errors=True)
data = write_image_folder(root / "images", num_images=8, size=40)
for split in ("train", "val"):
    write_image_folder(root / "cls" / split, num_images=8, size=40)
arch = ["--input_size", "32", "--patch_size", "8", "--embed_dim", "32", "--depth", "2", "--num_heads", "2",
        "--decoder_embed_dim", "16", "--decoder_depth", "1", "--decoder_num_heads", "2"]
argv = ["--data_path", str(data), "--output_dir", str(root / "pre"), "--model", "deepmim_vit_small_patch16", *arch,
        "--supervised_blocks", "1", "2", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
        "--num_workers", "0", "--blr", "1e-3", "--print_freq", "1", "--save_freq", "1", "--norm_pix_loss",
        "--device", "cpu"]
main_pretrain.main(main_pretrain.parse_args(argv))
ft = main_finetune.get_args_parser()
p = argparse.ArgumentParser(parents=[ft])
fargs = p.parse_args(["--finetune", str(root / "pre" / "checkpoint-0.pth"), "--data_path", str(root / "cls"),
                      "--output_dir", str(root / "ft"), "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
                      "--num_workers", "0", "--device", "cpu", "--print_freq", "1", "--save_freq", "1",
                      "--mixup", "0.8", "--cutmix", "1.0"])
main_finetune.main(fargs)
