"""The fine-tuning and linear-probing SLURM launchers: argument checks and a real job on submitit's local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, write_image_folder

import models_deepmim
import submitit_finetune
import submitit_linprobe
from util.checkpoint import save_atomic


def tiny_pretrained(path: Path) -> Path:
    torch.manual_seed(0)
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **TINY)
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 0, "args": {}}, path)
    return path


@pytest.mark.parametrize("launcher", [submitit_finetune, submitit_linprobe])
def test_launchers_validate_before_submitting(launcher, tmp_path, capsys):
    with pytest.raises(SystemExit):
        launcher.main(["--ngpus", "0", "--demo"])
    assert "--ngpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launcher.main(["--finetune", str(tmp_path / "missing.pth"), "--data_path", str(tmp_path)])
    assert "missing.pth" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_finetune_job_runs_on_local_executor(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    data = tmp_path / "data"
    write_image_folder(data / "train", 12, size=40, classes=3, seed=0)
    write_image_folder(data / "val", 6, size=40, classes=3, seed=1)
    job_dir = tmp_path / "job"
    job = submitit_finetune.main([
        "--finetune", str(tiny_pretrained(tmp_path / "pretrained.pth")), "--data_path", str(data),
        "--nb_classes", "3", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
        "--device", "cpu", "--job_dir", str(job_dir), "--cluster", "local", "--ngpus", "1", "--nodes", "1",
        "--timeout", "10",
    ])
    stats = job.result()
    assert "acc1" in stats
    log = [json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines()]
    assert log and "test_acc1" in log[-1]
    assert (job_dir / "checkpoint-last.pth").exists() or any(job_dir.glob("checkpoint-*.pth"))
