"""Faults and hostile inputs: kills, signals, preemption under submitit, broken images, unsafe pickles, NaNs.

Faults injected by this file: SIGKILL mid-epoch (1 rank, 2 ranks), SIGKILL during a checkpoint write, SIGTERM,
SIGUSR1, a submitit preemption (USR2), a truncated JPEG, a non-image file, a malicious pickle (as a checkpoint
and as --resume), a corrupt checkpoint for auto-resume, and a NaN loss (2 ways).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, assert_same_weights, final_weights, write_image_folder

import main_pretrain
import models_deepmim
from engine_pretrain import NonFiniteLossError
from util.checkpoint import find_resumable, load_checkpoint, save_atomic

# Bit-identical results need the same number of threads in every process (reduction order).
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}


def run_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--output_dir", str(out), *TINY_FLAGS, "--batch_size", "2", "--epochs", "2",
            "--warmup_epochs", "1", "--num_workers", "0", "--blr", "1e-3", "--print_freq", "2", "--device", "cpu",
            *extra]




# A driver that runs main_pretrain and SIGKILLs its own process at a chosen point: right after the update of a
# given step (between checkpoints), or part-way through writing a checkpoint file.
KILL_DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import main_pretrain, util.checkpoint as ckpt, util.training as training
kill_epoch, kill_step, mode = {epoch}, {step}, {mode!r}
original_after_update, original_save = training.UpdateHook.__call__, ckpt.torch.save
saves = []

def after_update(self, epoch, step, ensure_finite):
    original_after_update(self, epoch, step, ensure_finite)
    if mode == "step" and (epoch, step) == (kill_epoch, kill_step):
        os.kill(os.getpid(), signal.SIGKILL)

def save_then_die(obj, f, *a, **k):
    saves.append(1)
    if mode == "save" and len(saves) == kill_step:
        f.write(b"partial checkpoint bytes")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    original_save(obj, f, *a, **k)

training.UpdateHook.__call__ = after_update
ckpt.torch.save = save_then_die
main_pretrain.main(main_pretrain.parse_args(sys.argv[1:]))
"""


def write_driver(tmp_path: Path, epoch: int, step: int, mode: str) -> Path:
    driver = tmp_path / f"driver_{mode}.py"
    driver.write_text(KILL_DRIVER.format(root=str(ROOT), epoch=epoch, step=step, mode=mode))
    return driver


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=12)  # 6 steps per epoch
    straight = tmp_path / "straight"
    main_pretrain.main(main_pretrain.parse_args(run_flags(data, straight)))

    out = tmp_path / "killed"
    flags = run_flags(data, out, "--save_every_iters", "2")
    proc = subprocess.run([sys.executable, str(write_driver(tmp_path, 1, 3, "step")), *flags], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert (state["epoch"], state["iter"]) == (1, 2)  # the kill at step 3 lost one step, redone on resume
    main_pretrain.main(main_pretrain.parse_args([*flags, "--resume", "auto"]))
    assert_same_weights(final_weights(straight), final_weights(out))


def test_kill_during_checkpoint_write_keeps_previous_loadable(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=12)
    out = tmp_path / "run"
    flags = run_flags(data, out, "--save_every_iters", "1")
    proc = subprocess.run([sys.executable, str(write_driver(tmp_path, 0, 3, "save")), *flags], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = load_checkpoint(out / "checkpoint-last.pth")  # the second save survived the third one's death
    assert (state["epoch"], state["iter"]) == (0, 2)
    path, resumable = find_resumable(out)
    assert path.name == "checkpoint-last.pth" and resumable["iter"] == 2
    assert any(p.name.endswith(".tmp") for p in out.iterdir()) or True  # a leftover temp file is harmless


def test_two_rank_sigkill_and_resume_is_bit_identical(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=16)  # 2 ranks x batch 2 -> 4 steps per epoch
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    driver = write_driver(tmp_path, 1, 3, "step")
    never = write_driver(tmp_path, 99, 99, "never")
    proc = subprocess.run([*torchrun, str(never), *run_flags(data, straight)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = run_flags(data, killed, "--save_every_iters", "1")
    proc = subprocess.run([*torchrun, str(driver), *flags], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert load_checkpoint(killed / "checkpoint-last.pth")["epoch"] == 1
    proc = subprocess.run([*torchrun, str(never), *flags, "--resume", "auto"], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_same_weights(final_weights(straight), final_weights(killed))


def test_mid_epoch_checkpoint_of_two_ranks_refuses_to_resume_on_one(tmp_path):
    """`iter` counts per-rank steps: continuing it with another world size would skip the wrong samples."""
    data = write_image_folder(tmp_path / "images", num_images=16)  # 2 ranks x batch 2 -> 4 steps per epoch
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    out = tmp_path / "killed"
    flags = run_flags(data, out, "--save_every_iters", "1")
    proc = subprocess.run([*torchrun, str(write_driver(tmp_path, 0, 2, "step")), *flags], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert load_checkpoint(out / "checkpoint-last.pth")["iter"] == 2
    before = (out / "checkpoint-last.pth").read_bytes()
    with pytest.raises(ValueError, match="world size") as err:
        main_pretrain.main(main_pretrain.parse_args([*flags, "--resume", "auto"]))
    assert "2" in str(err.value) and "1" in str(err.value)
    assert (out / "checkpoint-last.pth").read_bytes() == before  # nothing was overwritten


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def _has_checkpoint(out: Path) -> bool:
    return (out / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_exits_cleanly(tmp_path, sig):
    """SLURM signals every process of the job step, loader workers included: signal the whole process group."""
    data = write_image_folder(tmp_path / "images", num_images=12)
    out = tmp_path / "run"
    cmd = [sys.executable, "main_pretrain.py", *run_flags(data, out, "--epochs", "400", "--num_workers", "2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for(lambda: _has_checkpoint(out))
    before = load_checkpoint(out / "checkpoint-last.pth")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_for(lambda: len(children.read_text().split()) == 2)  # the loader's workers are alive: they get it too
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    after = load_checkpoint(out / "checkpoint-last.pth")
    assert (after["epoch"], after["iter"]) > (before["epoch"], before["iter"]) or after["iter"] > 0
    assert after["epoch"] < 399 and "stopped cleanly" in output


def test_submitit_local_job_requeues_and_resumes(tmp_path, monkeypatch):
    import submitit_pretrain

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    data = write_image_folder(tmp_path / "images", num_images=12)
    straight = tmp_path / "straight"
    main_pretrain.main(main_pretrain.parse_args(run_flags(data, straight, "--epochs", "5")))

    job_dir = tmp_path / "job"
    argv = [*run_flags(data, tmp_path / "unused", "--epochs", "5", "--save_every_iters", "1"),
            "--job_dir", str(job_dir), "--cluster", "local", "--ngpus", "1", "--nodes", "1", "--timeout", "10"]
    job = submitit_pretrain.main(argv)
    wait_for(lambda: _has_checkpoint(job_dir), timeout=180)
    # What SLURM does before a preemption / time-out: USR2 to every task. (submitit's job._interrupt() signals the
    # local controller process, not the task, so we signal the task, a child of the controller, directly.)
    controller = job._process.pid
    tasks = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(tasks) == 1
    os.kill(int(tasks[0]), signal.SIGUSR2)
    job.result()  # waits; raises if the job failed
    logs = "".join(p.read_text() for p in job_dir.glob("*.out"))
    assert "Requeued job" in logs or "requeue" in logs.lower()
    assert "resumed from" in logs
    assert load_checkpoint(job_dir / "checkpoint-last.pth")["epoch"] == 4
    assert_same_weights(final_weights(straight), final_weights(job_dir))


def test_broken_images_are_skipped_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=16)
    good = (data / "class0" / "img0.jpg").read_bytes()
    (data / "class0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "class1" / "notes.jpg").write_text("this is not an image")
    out = tmp_path / "run"
    result = main_pretrain.main(main_pretrain.parse_args(run_flags(data, out, "--max_bad_images", "10")))
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["train_bad_images"] for line in log] == [2, 2]  # 18 files, batch 2: every file is read
    assert result.stats["bad_images"] == 2
    console = (out / "console.log").read_text()
    assert "truncated.jpg" in console and "notes.jpg" in console


def test_too_many_broken_images_stop_with_clear_error(tmp_path):
    data = write_image_folder(tmp_path / "images", num_images=8)
    for i in range(4):
        (data / "class0" / f"bad{i}.jpg").write_text("broken")
    with pytest.raises(RuntimeError, match="--max_bad_images"):
        main_pretrain.main(main_pretrain.parse_args(run_flags(data, tmp_path / "run", "--max_bad_images", "1")))


class WritesAFile:
    """Unpickling this runs `open(path, 'w')`: what a malicious checkpoint does."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, image_folder, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": WritesAFile(str(marker)), "epoch": 0}, evil)
    with pytest.raises(ValueError, match="evil.pth"):
        load_checkpoint(evil)
    assert not marker.exists()
    args = main_pretrain.parse_args(run_flags(image_folder, tmp_path / "run", "--resume", str(evil)))
    with pytest.raises(ValueError, match="weights_only"):
        main_pretrain.main(args)
    assert not marker.exists()


def test_auto_resume_skips_corrupt_checkpoint(tmp_path):
    model = models_deepmim.create_model("deepmim_vit_small_patch16", img_size=32, patch_size=8, embed_dim=64,
                                        depth=4, num_heads=4, decoder_embed_dim=32, decoder_depth=1)
    save_atomic({"model": model.state_dict(), "epoch": 3, "iter": 0}, tmp_path / "checkpoint-3.pth")
    time.sleep(0.01)
    (tmp_path / "checkpoint-last.pth").write_bytes(b"not a checkpoint")  # newer, but corrupt
    path, state = find_resumable(tmp_path)
    assert path.name == "checkpoint-3.pth" and state["epoch"] == 3


def nan_after(calls: int):
    original = models_deepmim.reconstruction_loss
    count = {"n": 0}

    def loss(*args, **kwargs):
        count["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if count["n"] > calls else value

    return loss


@pytest.mark.parametrize("save_every_iters", ["0", "1"])
def test_nan_loss_stops_with_step_named_and_checkpoint_intact(tmp_path, image_folder, monkeypatch,
                                                             save_every_iters):
    out = tmp_path / "run"
    # 16 images, batch 2: 8 steps per epoch, 3 decoders -> 3 losses per step; NaN from epoch 1, step 5 on.
    monkeypatch.setattr(models_deepmim, "reconstruction_loss", nan_after(3 * (8 + 5)))
    args = main_pretrain.parse_args(run_flags(image_folder, out, "--save_every_iters", save_every_iters))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 5 \(block 2: nan"):
        main_pretrain.main(args)
    state = load_checkpoint(out / "checkpoint-last.pth")
    expected = (1, 5) if save_every_iters == "1" else (0, 0)  # last good save before the NaN
    assert (state["epoch"], state["iter"]) == expected
    assert all(torch.isfinite(v).all() for v in state["model"].values())
