"""Rank and world helpers; process-group set-up from torchrun (env://) or submitit/SLURM.

Backend: NCCL on CUDA, gloo on CPU. A plain `python main_*.py` runs as a single process with no process group.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False


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


def init_distributed(device: str, dist_url: str = "env://") -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE) or SLURM/submitit (SLURM_PROCID).

    `dist_url` is MAE's flag: 'env://' reads MASTER_ADDR/PORT (what torchrun and the submitit launchers export);
    a 'tcp://' URL works under a bare srun.
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
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(
        backend, init_method=dist_url, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
    )
    logger.info("distributed init: rank %d/%d (%s, %s)", rank, world, backend, dist_url)
    return DistInfo(rank, world, local_rank, True)


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
    try:
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - best effort at exit; the exit reason matters more
        logger.warning("could not destroy the process group: %s", err)


def add_legacy_launcher_args(parser) -> None:
    """MAE's `--local_rank` (also `--local-rank`, what `torch.distributed.launch` passes) and `--world_size`, so
    MAE's command lines run unchanged. The environment that torchrun / SLURM set always wins."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=None, type=int,
                        help="GPU index on this node (torch.distributed.launch passes it; LOCAL_RANK wins)")
    parser.add_argument("--world_size", "--nproc", dest="world_size", default=None, type=int,
                        help="number of processes (MAE's flag; WORLD_SIZE from the launcher wins); what "
                             "--print_config resolves for")


def apply_legacy_launcher_args(args) -> None:
    """Export `--local_rank` as LOCAL_RANK when the launcher did not (torch.distributed.launch without --use-env);
    warn when `--world_size` disagrees with the launcher's WORLD_SIZE."""
    local_rank = getattr(args, "local_rank", None)
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    world_size = getattr(args, "world_size", None)
    if world_size is not None and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != world_size:
        logger.warning("--world_size %d ignored: the launcher started %s processes", world_size,
                       os.environ["WORLD_SIZE"])
