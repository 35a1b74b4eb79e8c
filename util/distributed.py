"""Rank and world helpers; process-group set-up from torchrun (env://) or submitit/SLURM.

Backend: NCCL on CUDA, gloo on CPU (`--dist_backend gloo` also on CUDA: two ranks can share one GPU, which NCCL
refuses). A plain `python main_*.py` runs as a single process with no process group.

Failures on a cluster: joining the group may take long (ranks start minutes apart, datasets are scanned, checkpoints
read), so it gets `INIT_TIMEOUT`; once training starts (`set_training_timeout`) a collective that waits longer than
`--dist_timeout` minutes means a rank is stuck or gone, and the job should fail fast (and be requeued) rather than
hold every GPU for half an hour. Under NCCL, a timed-out collective dumps its flight recorder
(TORCH_NCCL_DUMP_ON_TIMEOUT) next to the run's output, and NCCL warnings are printed (NCCL_DEBUG=WARN), unless the
user set those variables. `failures_logged` names the rank whose exception ends the run.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
INIT_TIMEOUT = datetime.timedelta(minutes=30)  # rendezvous and start-up collectives (torch's default for gloo)
TRAINING_TIMEOUT_MIN = 10  # --dist_timeout default: torch's NCCL default; a stuck rank fails the job within it
NCCL_DIAGNOSTICS = {
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # a timed-out collective dumps what every rank was doing
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder's entries (0 turns it off)
    "NCCL_DEBUG": "WARN",
}
_CPU_GROUP: dict[str, object] = {}  # a gloo group beside an NCCL default group: host flags without CUDA syncs


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    def device(self, device: str) -> torch.device:
        """The torch.device this process trains on: 'cuda' becomes this rank's GPU (`cuda_index`)."""
        return torch.device("cuda", cuda_index(self.local_rank)) if device == "cuda" else torch.device(device)


def cuda_index(local_rank: int) -> int:
    """The GPU of a local rank: `local_rank % device_count()`, so that a cluster that binds one GPU per task (each
    task sees one device, index 0) and one that shows all GPUs to every task both work, as does more than one rank
    per GPU (`--dist_backend gloo`)."""
    return local_rank % max(1, torch.cuda.device_count())


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed(device: str, dist_url: str = "env://", backend: str | None = None,
                     trace_dir: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE) or SLURM/submitit (SLURM_PROCID).

    `dist_url` is MAE's flag: 'env://' reads MASTER_ADDR/PORT (what torchrun and the submitit launchers export);
    a 'tcp://' URL works under a bare srun. `backend`: --dist_backend (default NCCL on CUDA, gloo on the CPU).
    `trace_dir`: where NCCL's flight recorder dumps on a timeout (default: torch's, /tmp).
    """
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    # One process without a launcher trains alone; torchrun with one rank gets a real process group (and DDP), so
    # a one-GPU check exercises the multi-GPU path (NCCL, DDP's reducer) that 32 GPUs will use.
    if rank is None or world is None or (world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ):
        return DistInfo()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    _check_rendezvous(dist_url)
    use_cuda = device.startswith("cuda")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in BACKENDS or (backend == "nccl" and not use_cuda):
        raise ValueError(f"--dist_backend {backend}: use one of {BACKENDS} (nccl needs a CUDA --device)")
    if use_cuda:
        torch.cuda.set_device(cuda_index(local_rank))
    if backend == "nccl":
        set_nccl_diagnostics(trace_dir)
    dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world, timeout=INIT_TIMEOUT)
    if backend == "nccl":
        _CPU_GROUP["group"] = dist.new_group(backend="gloo", timeout=INIT_TIMEOUT)
    logger.info("distributed init: rank %d/%d (%s, %s)", rank, world, backend, dist_url)
    return DistInfo(rank, world, local_rank, True)


def set_nccl_diagnostics(trace_dir: str | None = None) -> dict[str, str]:
    """Set NCCL_DIAGNOSTICS (and the flight recorder's dump file in `trace_dir`) where the user has not; returns
    what was set. Must run before the NCCL group is created."""
    wanted = dict(NCCL_DIAGNOSTICS)
    if trace_dir:
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = os.path.join(os.path.abspath(trace_dir), "nccl_trace_rank_")
    added = {name: value for name, value in wanted.items() if name not in os.environ}
    os.environ.update(added)
    return added


def set_training_timeout(minutes: float) -> None:
    """From now on, a collective that waits more than `minutes` fails (NCCL aborts the process; gloo raises), so a
    stuck or dead rank ends the job instead of holding the others. Call on every rank when training starts (the
    start-up ran under INIT_TIMEOUT). No-op without a process group."""
    if not is_dist():
        return
    timeout = datetime.timedelta(minutes=minutes)
    set_timeout = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:  # torch < 2.3
        logger.warning("this torch cannot change a process group's timeout: collectives keep %s", INIT_TIMEOUT)
        return
    for group in {id(g): g for g in (dist.group.WORLD, cpu_group()) if g is not None}.values():
        set_timeout(timeout, group)
    logger.info("collective timeout during training: %g min (--dist_timeout)", minutes)


def cpu_group() -> object | None:
    """The group for small host-side flags: a gloo group beside an NCCL default group (no CUDA tensor, so reading
    the result never waits for the GPU), else the default group (None)."""
    return _CPU_GROUP.get("group")


class LaggedAgreement:
    """Flags that every rank agrees on one call late, without blocking a step.

    `exchange(flags)` sends this rank's flags in an asynchronous all-reduce (MAX over ranks, host tensors on
    `cpu_group()`) and returns the result of the previous call's reduce, waited for now: it was issued a whole step
    earlier, so it is normally complete, and every rank gets the same answer at the same call. Without a process
    group the flags come back at once."""

    def __init__(self, size: int):
        self.size = size
        self.pending: tuple[torch.Tensor, object] | None = None

    def _collect(self) -> list[bool]:
        if self.pending is None:
            return [False] * self.size
        values, work = self.pending
        self.pending = None
        work.wait()
        return [bool(v) for v in values.tolist()]

    def exchange(self, flags: Sequence[bool]) -> list[bool]:
        """This rank's flags in; the flags of the previous call, OR-ed over ranks, out (all False at the first)."""
        if not is_dist():
            return [bool(f) for f in flags]
        agreed = self._collect()
        values = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True)
        self.pending = (values, work)
        return agreed

    def now(self, flags: Sequence[bool]) -> list[bool]:
        """A blocking exchange: `flags` and any pending ones, OR-ed over ranks, agreed before returning."""
        merged = [bool(a) or bool(b) for a, b in zip(flags, self._collect())]
        if not is_dist():
            return merged
        values = torch.tensor([int(f) for f in merged], dtype=torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=cpu_group())
        return [bool(v) for v in values.tolist()]


@contextlib.contextmanager
def failures_logged() -> Iterator[None]:
    """Log the exception that ends this process, naming its rank and host, before it propagates: among the
    interleaved output of 32 ranks, the rank that failed first is the one to read. Every rank logs errors."""
    try:
        yield
    except SystemExit as err:
        if err.code not in (0, None):
            _log_failure(err)
        raise
    except BaseException as err:
        _log_failure(err)
        raise


def _log_failure(err: BaseException) -> None:
    rank = get_rank() if is_dist() else (_env_int("RANK", "SLURM_PROCID") or 0)
    world = get_world_size() if is_dist() else (_env_int("WORLD_SIZE", "SLURM_NTASKS") or 1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    logger.error("rank %d of %d (local rank %d on %s) failed: %s: %s", rank, world, local, socket.gethostname(),
                 type(err).__name__, err)


def _check_rendezvous(dist_url: str) -> None:
    """'env://' needs MASTER_ADDR and MASTER_PORT (torchrun and the submitit launchers export them; a bare srun
    does not): fail with the flag named rather than deep inside torch."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if dist_url == "env://" and missing:
        raise ValueError(f"--dist_url env:// needs {' and '.join(missing)} in the environment; launch with torchrun "
                         f"or the submitit_*.py launchers, or pass --dist_url tcp://HOST:PORT")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (returns a new tensor; identity without a process group)."""
    value = value.detach().clone()
    if is_dist():
        dist.all_reduce(value)
        value /= get_world_size()
    return value


def cleanup() -> None:
    """Destroy the process group if one is up. Idempotent and never raises, so it is safe in a `finally` (a
    failure here must not hide the error that ended the run, nor keep a requeued job from exiting)."""
    if not is_dist():
        return
    _CPU_GROUP.clear()
    try:
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - best effort at exit; the exit reason matters more
        logger.warning("could not destroy the process group: %s", err)


# --dist_on_itp (MAE's OpenMPI launch): the process-group variables it reads from OpenMPI's environment.
OMPI_VARIABLES = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
                  "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK"}


def add_legacy_launcher_args(parser) -> None:
    """MAE's `--local_rank` (also `--local-rank`, what `torch.distributed.launch` passes), `--world_size` and
    `--dist_on_itp`, so MAE's command lines run unchanged. The environment that torchrun / SLURM set always wins."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=None, type=int,
                        help="GPU index on this node (torch.distributed.launch passes it; LOCAL_RANK wins)")
    parser.add_argument("--world_size", "--nproc", dest="world_size", default=None, type=int,
                        help="number of processes (MAE's flag; WORLD_SIZE from the launcher wins); what "
                             "--print_config resolves for")
    parser.add_argument("--dist_on_itp", action="store_true",
                        help="MAE's flag for OpenMPI launches (mpirun, e.g. Microsoft's ITP cluster): rank, world "
                             "size and local rank come from OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK; MASTER_ADDR and "
                             "MASTER_PORT must be set, as in MAE. Not needed under torchrun or SLURM")


def add_dist_args(parser) -> None:
    """`--dist_backend` and `--dist_timeout`, shared by every entry script."""
    parser.add_argument("--dist_backend", default=None, choices=BACKENDS,
                        help="process-group backend (default: nccl on CUDA, gloo on the CPU; gloo on CUDA lets "
                             "several ranks share one GPU, e.g. a 2-rank check on one GPU)")
    parser.add_argument("--dist_timeout", default=TRAINING_TIMEOUT_MIN, type=float,
                        help="minutes a collective may wait once training runs before the job fails (start-up "
                             f"gets {INIT_TIMEOUT.seconds // 60})")


def apply_legacy_launcher_args(args) -> None:
    """With `--dist_on_itp`, export OpenMPI's rank, world size and local rank as RANK, WORLD_SIZE and LOCAL_RANK (as
    MAE's init_distributed_mode does; ValueError naming the variables when mpirun did not set them). Export
    `--local_rank` as LOCAL_RANK when the launcher did not (torch.distributed.launch without --use-env); warn when
    `--world_size` disagrees with the launcher's WORLD_SIZE."""
    if getattr(args, "dist_on_itp", False):
        missing = [name for name in OMPI_VARIABLES.values() if name not in os.environ]
        if missing:
            raise ValueError(f"--dist_on_itp reads {', '.join(missing)}, which OpenMPI's mpirun sets and this "
                             "environment lacks; launch with torchrun (or submitit_*.py on SLURM) without "
                             "--dist_on_itp")
        os.environ.update({ours: os.environ[theirs] for ours, theirs in OMPI_VARIABLES.items()})
    local_rank = getattr(args, "local_rank", None)
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    world_size = getattr(args, "world_size", None)
    if world_size is not None and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != world_size:
        logger.warning("--world_size %d ignored: the launcher started %s processes", world_size,
                       os.environ["WORLD_SIZE"])
