"""A new run never writes over another one (util/run_folder.py): every entry script refuses an --output_dir that
holds a run unless --resume or --overwrite, and --overwrite leaves only the new run's files."""

from __future__ import annotations

import json

import pytest
from conftest import write_image_folder
from test_finetune import labelled_folder, pretrain_checkpoint
from test_finetune import parse as finetune_args
from test_finetune import tiny_argv as finetune_argv
from test_linprobe import parse as linprobe_args
from test_main_pretrain import tiny_args as pretrain_args

import main_finetune
import main_linprobe
import main_pretrain
from util.run_folder import run_results

OLD_RUN = {"checkpoint-7.pth": b"old", "checkpoint-last.pth": b"old", "log.txt": b'{"epoch": 7}\n',
           "run_info.json": b"{}", "reconstructions.png": b"old", "events.out.tfevents.1.host": b"old"}


def old_run(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in OLD_RUN.items():
        (folder / name).write_bytes(content)
    (folder / "notes.md").write_text("the user's own file")
    return folder


def test_a_used_output_dir_is_refused_by_every_script_naming_the_ways_on(tmp_path):
    data, ckpt = labelled_folder(tmp_path / "cls"), pretrain_checkpoint(tmp_path / "pre.pth")
    out = old_run(tmp_path / "out")
    images = write_image_folder(tmp_path / "images", num_images=8)
    runs = [lambda: main_pretrain.main(pretrain_args(images, out)),
            lambda: main_finetune.main(finetune_args(*finetune_argv(data, out, ckpt))),
            lambda: main_linprobe.main(linprobe_args(*finetune_argv(data, out, ckpt)))]
    for run in runs:
        with pytest.raises(ValueError, match=f"--output_dir {out} already holds a run") as err:
            run()
        assert "--resume auto" in str(err.value) and "fresh --output_dir" in str(err.value)
        assert "--overwrite" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in OLD_RUN} == OLD_RUN  # nothing touched
    assert run_results(tmp_path / "images") == []


def test_overwrite_starts_over_leaving_only_the_new_run_and_the_users_files(tmp_path):
    images = write_image_folder(tmp_path / "images", num_images=8)
    out = old_run(tmp_path / "out")
    main_pretrain.main(pretrain_args(images, out, "--epochs", "1", "--overwrite"))
    names = {p.name for p in out.iterdir()}
    assert "checkpoint-7.pth" not in names and "reconstructions.png" not in names
    assert not (out / "events.out.tfevents.1.host").exists() and (out / "notes.md").exists()
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    assert json.loads((out / "run_info.json").read_text())["args"]["epochs"] == 1
