"""The SLURM launchers: argument checks, what is asked of SLURM from a GPU-less login node, the job wrapper
(rendezvous, process-group clean-up), real jobs on submitit's local executor, and a 2-rank job requeued twice."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch
import torch.distributed as dist
from conftest import ROOT, TINY, TINY_FLAGS, write_image_folder

import models_deepmim
import submitit_detection
import submitit_finetune
import submitit_linprobe
import submitit_pretrain
import submitit_segmentation
from detection import demo as detection_demo
from segmentation.demo import write_demo_dataset
from util import submit
from util.checkpoint import load_checkpoint, save_atomic


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


# ---- what the launchers ask of SLURM from a login node without a GPU ------------------------------------------------


class RecordingExecutor:
    """Stands in for submitit.AutoExecutor: records the parameters and the submitted callable, runs nothing."""

    def __init__(self, folder, cluster=None, **kwargs) -> None:
        self.folder, self.cluster, self.kwargs = str(folder), cluster, kwargs
        self.parameters: dict = {}
        self.submitted = None

    @staticmethod
    def which() -> str:
        return "slurm"

    def update_parameters(self, **params) -> None:
        self.parameters.update(params)

    def submit(self, fn, *args, **kwargs):
        self.submitted = fn
        return SimpleNamespace(job_id="4242", result=lambda: None)


@pytest.fixture
def login_node(monkeypatch):
    """No CUDA here, and a recording executor instead of SLURM; yields the executors created."""
    executors: list[RecordingExecutor] = []

    def make(*args, **kwargs) -> RecordingExecutor:
        executors.append(RecordingExecutor(*args, **kwargs))
        return executors[-1]

    make.which = RecordingExecutor.which
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(submitit, "AutoExecutor", make)
    return executors


def launcher_argv(name: str, tmp_path: Path) -> list[str]:
    """Valid flags for each launcher (tiny model, small image folders)."""
    if name == "pretrain":
        return ["--data_path", str(write_image_folder(tmp_path / "images", 4)), *TINY_FLAGS]
    if name == "segmentation":
        data = write_demo_dataset(tmp_path / "ade", n_train=2, n_val=1)
        return ["--data_path", str(data), "--num_classes", "4", "--input_size", "64", "--patch_size", "8",
                "--embed_dim", "64", "--depth", "4", "--num_heads", "4", "--slide_stride", "43",
                "--output_dir", str(tmp_path / "seg")]
    if name == "detection":
        return ["--data_path", str(detection_demo.write_demo_dataset(tmp_path / "coco")), "--input_size", "64",
                "--patch_size", "8", "--embed_dim", "64", "--depth", "4", "--num_heads", "4", "--window_size", "4",
                "--output_dir", str(tmp_path / "det")]
    data = tmp_path / "data"
    write_image_folder(data / "train", 4, size=40, classes=2, seed=0)
    write_image_folder(data / "val", 2, size=40, classes=2, seed=1)
    return ["--finetune", str(tiny_pretrained(tmp_path / "pretrained.pth")), "--data_path", str(data),
            "--nb_classes", "2"]


LAUNCHERS = {"pretrain": submitit_pretrain, "finetune": submitit_finetune, "linprobe": submitit_linprobe,
             "segmentation": submitit_segmentation, "detection": submitit_detection}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_gpus_are_requested_even_from_a_login_node_without_cuda(name, tmp_path, login_node):
    """Waits on the entry-script contract: --device/--amp default to None and resolve_args never resolves them."""
    job_dir = str(tmp_path / "jobs" / "%j")
    LAUNCHERS[name].main([*launcher_argv(name, tmp_path), "--nodes", "2", "--ngpus", "8", "--job_dir", job_dir,
                          "--cluster", "slurm"])
    (executor,) = login_node
    assert executor.cluster == "slurm" and executor.folder == job_dir  # SLURM expands %j itself
    assert executor.parameters["gpus_per_node"] == 8
    assert executor.parameters["tasks_per_node"] == 8 and executor.parameters["nodes"] == 2
    job = executor.submitted
    assert isinstance(job, submit.Job)
    # GPUs requested: the job may not fall back to the CPU (util.amp.resolve_device); amp is resolved in the job
    assert job.args.device == "cuda" and job.args.amp is None
    assert job.args.dist_url == "env://"
    # one failing task ends the step at once instead of leaving the others in a collective until the timeout
    assert "--kill-on-bad-exit=1" in executor.parameters["slurm_srun_args"]
    assert executor.parameters["cpus_per_task"] == submit.DEFAULT_CPUS_PER_TASK == job.args.cpus_per_task
    assert executor.parameters["mem_gb"] == 8 * submit.DEFAULT_MEM_GB_PER_GPU == job.args.mem_gb  # recorded
    assert executor.parameters["slurm_signal_delay_s"] == 120
    assert not (tmp_path / "jobs").exists()


def test_slurm_resources_are_flags(tmp_path, login_node):
    submitit_pretrain.main([*launcher_argv("pretrain", tmp_path), "--nodes", "1", "--ngpus", "4", "--cluster", "slurm",
                            "--cpus_per_task", "12", "--mem_gb", "500", "--timeout", "120",
                            "--job_dir", str(tmp_path / "job")])
    (executor,) = login_node
    assert (executor.parameters["cpus_per_task"], executor.parameters["mem_gb"]) == (12, 500)
    assert executor.parameters["timeout_min"] == 120 and executor.submitted.args.cpus_per_task == 12
    for bad in (["--cpus_per_task", "0"], ["--mem_gb", "0"]):
        with pytest.raises(SystemExit):
            submitit_pretrain.main([*launcher_argv("pretrain", tmp_path), "--cluster", "slurm", *bad])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_device_cpu_asks_for_no_gpu(name, tmp_path, login_node):
    LAUNCHERS[name].main([*launcher_argv(name, tmp_path), "--nodes", "1", "--ngpus", "4", "--device", "cpu",
                          "--cluster", "slurm", "--job_dir", str(tmp_path / "job")])
    (executor,) = login_node
    assert executor.parameters["gpus_per_node"] == 0 and executor.parameters["tasks_per_node"] == 4
    assert executor.submitted.args.device == "cpu"


def test_requested_gpus_ignores_the_submitting_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert submit.requested_gpus(argparse.Namespace(device=None, ngpus=8)) == 8
    assert submit.requested_gpus(argparse.Namespace(device="cuda", ngpus=2)) == 2
    assert submit.requested_gpus(argparse.Namespace(device="cpu", ngpus=2)) == 0


def test_no_folder_named_percent_j_outside_slurm(tmp_path):
    assert submit.job_folder(str(tmp_path / "%j"), "slurm") == str(tmp_path / "%j")
    for cluster in ("local", "debug"):
        folder = submit.job_folder(str(tmp_path / "%j"), cluster)
        assert "%j" not in folder and folder.startswith(str(tmp_path / cluster))
    assert "%j" not in submit.job_folder("", "local")
    assert submit.job_folder(str(tmp_path / "mine"), "local") == str(tmp_path / "mine")


def test_debug_cluster_trains_in_the_launcher(tmp_path, capsys):
    """submitit's debug executor runs only on result(): the launcher calls it, so --cluster debug trains."""
    data = write_image_folder(tmp_path / "images", 4)
    job = submitit_pretrain.main(["--data_path", str(data), *TINY_FLAGS, "--batch_size", "2", "--epochs", "1",
                                  "--warmup_epochs", "0", "--num_workers", "0", "--device", "cpu", "--cluster", "debug",
                                  "--nodes", "1", "--ngpus", "1", "--job_dir", str(tmp_path / "%j")])
    assert f"Submitted job {job.job_id}" in capsys.readouterr().out
    (folder,) = [path for path in tmp_path.iterdir() if path.name.startswith("debug_")]
    assert load_checkpoint(folder / "checkpoint-last.pth")["epoch"] == 0
    assert not dist.is_initialized()
    assert not any("%j" in str(path) for path in tmp_path.rglob("*"))


# ---- the job wrapper: rendezvous from submitit's environment, process group destroyed on every exit ---------------


@pytest.fixture
def local_task_env(monkeypatch, tmp_path):
    """This process pretends to be task 0 of a 1-task submitit local job (the environment submitit gives a task);
    the rendezvous variables the job exports are restored afterwards."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown removes what the job exports (delenv of an
        monkeypatch.delenv(name)  # absent variable records nothing)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))
    for key, value in dict(JOB_ID=str(os.getpid()), NTASKS="1", JOB_NUM_NODES="1", NODEID="0", GLOBALID="0",
                           LOCALID="0").items():
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{key}", value)


def join_group_then(exit_with: BaseException | None):
    """A stand-in `main` that joins the process group as the entry scripts do, then ends as told."""

    def main(args: argparse.Namespace) -> str:
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and "MASTER_PORT" in os.environ
        dist.init_process_group("gloo", init_method=args.dist_url)
        args.device, args.amp = "cpu", "none"  # what resolve_machine does in the job: must not reach a requeue
        if exit_with is not None:
            raise exit_with
        return "done"

    return main


@pytest.mark.parametrize("exit_with", [None, RuntimeError("boom"), SystemExit(3)], ids=["return", "error", "exit"])
def test_job_destroys_the_process_group_on_every_exit(exit_with, local_task_env, tmp_path):
    args = argparse.Namespace(job_dir=str(tmp_path / "%j"), dist_url="env://", device=None, amp=None, resume="auto")
    job = submit.Job(join_group_then(exit_with), args)
    if exit_with is None:
        assert job() == "done"
    else:
        with pytest.raises(type(exit_with)):
            job()
    assert not dist.is_initialized()
    assert os.environ["MASTER_ADDR"] and os.environ["RANK"] == "0"  # what the job exported for env://
    assert args.output_dir == str(tmp_path / str(os.getpid()))
    requeued = job.checkpoint().function
    assert requeued.args.device is None and requeued.args.amp is None and requeued.args.resume == "auto"


# ---- a real 2-rank job on submitit's local executor, preempted and requeued twice --------------------------------


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def task_pids(job) -> list[int]:
    """The tasks of a local job: the children of submitit's controller process."""
    controller = job._process.pid
    return [int(pid) for pid in Path(f"/proc/{controller}/task/{controller}/children").read_text().split()]


def rank0_log(job_dir: Path) -> str:
    return "".join(path.read_text() for path in sorted(job_dir.glob("*_0_log.out")))


def preempt(job, job_dir: Path, resumed: int) -> None:
    """Once the incarnation that resumed `resumed` times has saved a step, send USR2 to every task, as SLURM does
    before a preemption or time-out."""
    wait_until(lambda: rank0_log(job_dir).count("resumed from") == resumed, 60, f"resume #{resumed}")
    seen = time.time()
    last = job_dir / "checkpoint-last.pth"
    wait_until(lambda: last.exists() and last.stat().st_mtime > seen, 60, "a checkpoint after the resume")
    pids = task_pids(job)
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    wait_until(lambda: not set(pids) & set(task_pids(job)), 60, "the preempted tasks to exit")


def pretrain_argv(data: Path, job_dir: Path) -> list[str]:
    return ["--data_path", str(data), *TINY_FLAGS, "--batch_size", "2", "--epochs", "8", "--warmup_epochs", "1",
            "--num_workers", "0", "--blr", "1e-3", "--print_freq", "100", "--save_every_iters", "1",
            "--device", "cpu", "--job_dir", str(job_dir), "--cluster", "local", "--nodes", "1", "--ngpus", "2",
            "--timeout", "10"]


def test_two_rank_local_job_requeued_twice_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """Each incarnation joins a fresh env:// rendezvous (the same port: the job id is kept) and the previous one
    left no process group behind; the result is bit-identical to a run never interrupted."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same reduction order in every process of both jobs
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # an inherited port would be shared by both jobs (submitit keeps it)
        monkeypatch.delenv(name, raising=False)
    data = write_image_folder(tmp_path / "images", num_images=12)  # 2 ranks x batch 2: 3 steps per epoch
    straight = submitit_pretrain.main(pretrain_argv(data, tmp_path / "straight"))
    job_dir = tmp_path / "job"
    job = submitit_pretrain.main(pretrain_argv(data, job_dir))
    preempt(job, job_dir, resumed=0)
    preempt(job, job_dir, resumed=1)
    job.results()  # waits; raises if a task failed
    straight.results()
    log = rank0_log(job_dir)
    assert log.count("- Requeued job") == 2 and log.count("resumed from") == 2
    assert log.count("eff. batch 4") == 3  # every incarnation trained with 2 ranks
    assert "Traceback" not in log
    weights = load_checkpoint(job_dir / "checkpoint-last.pth")
    reference = load_checkpoint(tmp_path / "straight" / "checkpoint-last.pth")
    assert weights["epoch"] == reference["epoch"] == 7
    for key, value in reference["model"].items():
        assert torch.equal(weights["model"][key], value), key
