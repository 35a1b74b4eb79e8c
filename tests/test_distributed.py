"""util/distributed.py: the GPU of a local rank, process-group timeouts, NCCL diagnostics, ranks agreeing on flags
without blocking a step, and a failing rank named in the log. CUDA and NCCL are mocked; real groups use gloo."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_FLAGS

import main_pretrain
from util import distributed

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               *distributed.NCCL_DIAGNOSTICS, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launcher_env(monkeypatch):
    """A clean launch environment; whatever the code under test exports is removed afterwards."""
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores the variable's absence
        monkeypatch.delenv(name)

    def torchrun(rank: int, world: int, local_rank: int, port: int = 29500) -> None:
        for name, value in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local_rank, MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=port, TORCHELASTIC_RUN_ID="test").items():
            monkeypatch.setenv(name, str(value))

    return torchrun


@pytest.fixture
def fake_nccl(monkeypatch):
    """CUDA with `count` visible GPUs and NCCL, recorded instead of run."""
    calls: dict[str, list] = {"set_device": [], "init": [], "new_group": []}
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls["set_device"].append(index))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls["init"].append((a, k)))
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: calls["new_group"].append(k) or "gloo-side-group")

    def gpus(count: int) -> dict[str, list]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        return calls

    yield gpus
    distributed._CPU_GROUP.clear()


@pytest.mark.parametrize(("gpus", "local_rank", "expected"), [(1, 5, 0), (8, 5, 5), (2, 3, 1)])
def test_local_rank_picks_its_gpu_modulo_the_visible_ones(launcher_env, fake_nccl, gpus, local_rank, expected):
    """A cluster that binds one GPU per task shows each task one device: local ranks 1-7 must use index 0."""
    calls = fake_nccl(gpus)
    launcher_env(rank=local_rank, world=8, local_rank=local_rank)
    info = distributed.init_distributed("cuda")
    assert calls["set_device"] == [expected]
    assert info.device("cuda") == torch.device("cuda", expected) and info.device("cpu") == torch.device("cpu")


def test_nccl_gets_a_long_start_up_timeout_diagnostics_and_a_gloo_side_group(launcher_env, fake_nccl, tmp_path,
                                                                              monkeypatch):
    calls = fake_nccl(8)
    launcher_env(rank=0, world=8, local_rank=0)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # the user's choice wins
    distributed.init_distributed("cuda", trace_dir=str(tmp_path))
    (args, kwargs), = calls["init"]
    assert args[0] == "nccl" and kwargs["timeout"] == distributed.INIT_TIMEOUT == datetime.timedelta(minutes=30)
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert os.environ["NCCL_DEBUG"] == "INFO"
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / "nccl_trace_rank_")
    assert calls["new_group"] == [{"backend": "gloo", "timeout": distributed.INIT_TIMEOUT}]
    assert distributed.cpu_group() == "gloo-side-group"


def test_gloo_on_cuda_is_allowed_and_nccl_on_cpu_is_refused(launcher_env, fake_nccl):
    calls = fake_nccl(1)
    launcher_env(rank=1, world=2, local_rank=1)
    distributed.init_distributed("cuda", backend="gloo")  # two ranks on one GPU: NCCL would refuse
    assert calls["init"][0][0][0] == "gloo" and calls["set_device"] == [0] and "NCCL_DEBUG" not in os.environ
    with pytest.raises(ValueError, match="--dist_backend nccl"):
        distributed.init_distributed("cpu", backend="nccl")


def group_timeout(group=None) -> datetime.timedelta:
    group = group or dist.group.WORLD
    return group._get_backend(torch.device("cpu")).options._timeout


def test_training_collectives_get_the_short_timeout(launcher_env):
    launcher_env(rank=0, world=1, local_rank=0, port=free_port())  # torchrun with one rank: a real gloo group
    try:
        distributed.init_distributed("cpu")
        assert group_timeout() == distributed.INIT_TIMEOUT
        distributed.set_training_timeout(5)
        assert group_timeout() == datetime.timedelta(minutes=5)
    finally:
        distributed.cleanup()


def lagged_ranks(rank: int, port: int, queue) -> None:
    """Rank `rank` of 2: the flag rises on rank 1 at call 3; every rank records what each call returned."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    agreement = distributed.LaggedAgreement(2)
    seen = [agreement.exchange([rank == 1 and call >= 3, False]) for call in range(6)]
    final = agreement.now([False, rank == 0])
    dist.destroy_process_group()
    queue.put((rank, seen, final))


def test_ranks_agree_on_a_flag_one_call_later(launcher_env):
    """The flag of one rank reaches every rank at the same call, one call after it rose (asynchronous all-reduce:
    no step waits for the others); `now` agrees at once, pending flags included."""
    context = multiprocessing.get_context("fork")
    queue, port = context.Queue(), free_port()
    procs = [context.Process(target=lagged_ranks, args=(rank, port, queue)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    results = dict((rank, (seen, final)) for rank, seen, final in (queue.get(timeout=60) for _ in procs))
    for proc in procs:
        proc.join(timeout=30)
    expected = [[False, False]] * 4 + [[True, False]] * 2  # rose at call 3, known to both at call 4
    assert results[0] == results[1] == (expected, [True, True])
    without_group = distributed.LaggedAgreement(1)
    assert without_group.exchange([True]) == [True]  # one process: at once


def test_the_failing_rank_is_named_in_the_log(image_folder, tmp_path, monkeypatch):
    def broken(args):
        raise OSError("disk gone")

    monkeypatch.setattr(main_pretrain, "build_dataset", broken)
    out = tmp_path / "run"
    args = main_pretrain.parse_args(["--data_path", str(image_folder), "--output_dir", str(out), *TINY_FLAGS,
                                     "--device", "cpu", "--num_workers", "0"])
    with pytest.raises(OSError, match="disk gone"):
        main_pretrain.main(args)
    assert f"rank 0 of 1 (local rank 0 on {socket.gethostname()}) failed: OSError: disk gone" in \
        (out / "console.log").read_text()
