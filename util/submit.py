"""SLURM (or local) launch through submitit, shared by the submitit_*.py launchers.

What is decided where:
  * on the submitting (login) node, nothing machine-dependent: the job asks for --ngpus GPUs per node unless the
    user passed --device cpu, and then submits --device cuda (a job given GPUs never trains on the CPU: if the node's
    torch cannot use them it stops, `util.amp.resolve_device`); --amp stays as given (None by default);
  * inside the job, on every task: submitit's `TorchDistributedEnvironment` exports MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE and LOCAL_RANK from the SLURM environment and the process group joins with --dist_url env:// (a
    fresh rendezvous for every incarnation of the job, with no file shared between them); the entry script's
    `main` resolves device and amp on the compute node (`util.amp.resolve_machine`); the process group is
    destroyed however `main` ends.

The job is checkpointable: on preemption or time-out, submitit calls `Job.checkpoint`, which requeues the same
job (with the args as submitted, not as resolved on the node) with `--resume auto`, so the new job continues from
the newest valid checkpoint in the job folder. SLURM sends submitit's USR2 SIGNAL_DELAY_S before the time limit
(util/preemption.py requeues from a watchdog if the loop does not reach a stop check in time).

srun runs with --kill-on-bad-exit=1: a task that fails ends the whole step at once (and the job can be requeued or
resubmitted) instead of leaving the other ranks waiting in a collective until the timeout.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from util import distributed
from util.checkpoint import list_checkpoints
from util.cli import script_parser, user_errors
from util.config import derive_accum_iter, maybe_print_config, parse_with_config
from util.preemption import SIGNAL_DELAY_S

CLUSTERS = ("slurm", "local", "debug")
# Per task (GPU): 8 CPUs and 32 GB fit 8-GPU nodes with 64 cores and 256 GB, the smallest common 8-GPU node; 24 h is
# a usual partition limit (a longer --timeout than the partition allows leaves the job pending for ever; a time-out
# requeues and resumes anyway).
DEFAULT_CPUS_PER_TASK = 8
DEFAULT_MEM_GB_PER_GPU = 32
DEFAULT_TIMEOUT_MIN = 24 * 60
SRUN_ARGS = ("--kill-on-bad-exit=1",)


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """MAE's submitit flags."""
    group = parser.add_argument_group("SLURM / submitit")
    group.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    group.add_argument("--nodes", default=2, type=int, help="number of nodes")
    group.add_argument("--timeout", default=DEFAULT_TIMEOUT_MIN, type=int,
                       help="job duration in minutes (at most the partition's limit; a time-out requeues)")
    group.add_argument("--cpus_per_task", default=DEFAULT_CPUS_PER_TASK, type=int,
                       help="CPUs per task (one task per GPU): its data-loading workers are this minus 2, at most 16")
    group.add_argument("--mem_gb", default=None, type=int,
                       help=f"memory per node in GB (default {DEFAULT_MEM_GB_PER_GPU} x --ngpus)")
    group.add_argument("--job_dir", default="", type=str, help="job folder (logs, checkpoints); default ./jobs/%%j")
    group.add_argument("--partition", default="", type=str, help="SLURM partition")
    group.add_argument("--use_volta32", action="store_true",
                       help="request 32 GB V100s (constraint volta32gb); sm_70 needs a torch build for CUDA 12.6 "
                            "(CUDA 13 wheels have no V100 kernels)")
    group.add_argument("--comment", default="", type=str, help="SLURM comment")
    group.add_argument("--cluster", default=None, choices=CLUSTERS,
                       help="submitit backend (default: slurm when available, else local)")
    group.add_argument("--max_requeues", default=30, type=int, help="time-outs/preemptions before giving up")


def validate_launcher_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for launcher flags that cannot work."""
    for flag in ("ngpus", "nodes", "timeout", "cpus_per_task"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.mem_gb is not None and args.mem_gb < 1:
        raise ValueError(f"--mem_gb must be >= 1, got {args.mem_gb}")


class Job:
    """A picklable callable that submitit runs on every task; `main` is the training entry point.

    auto_resume: `main` understands `--resume auto` (pre-training); otherwise a requeue points --resume at the
    newest checkpoint file of the job folder. `main` gets a copy of the submitted args, so what it resolves on the
    node (device, amp, lr, ...) never leaks into the requeued job.
    """

    def __init__(self, main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, auto_resume: bool = True):
        self.main, self.args, self.auto_resume = main, args, auto_resume

    def __call__(self) -> Any:
        self._setup_job_folder()
        export_rendezvous()
        try:
            return self.main(copy.deepcopy(self.args))
        finally:
            distributed.cleanup()  # every exit: return, error, or the SystemExit of a preemption / requeue

    def checkpoint(self) -> Any:
        """Called by submitit on preemption / time-out: requeue the same job, resuming automatically."""
        import submitit

        if self.auto_resume:
            self.args.resume = "auto"
        else:
            newest = list_checkpoints(self.args.output_dir)
            if newest:
                self.args.resume = str(newest[0])
        return submitit.helpers.DelayedSubmission(type(self)(self.main, self.args, self.auto_resume))

    def _setup_job_folder(self) -> None:
        import submitit

        env = submitit.JobEnvironment()
        job_dir = Path(str(self.args.job_dir).replace("%j", str(env.job_id)))
        self.args.output_dir = self.args.log_dir = str(job_dir)


def export_rendezvous() -> None:
    """Inside a submitit job: export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE) for
    `init_process_group('env://')`, from submitit's view of the SLURM (or local) job.

    Overwrites what the job inherited (a job submitted from within another job must not reuse its rendezvous);
    CUDA_VISIBLE_DEVICES is left alone: the entry scripts pick the GPU of their LOCAL_RANK."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def requested_device(args: argparse.Namespace) -> str | None:
    """--device for the job: cuda when GPUs are requested and none was given (the job then refuses to fall back to
    the CPU), else as given."""
    return "cuda" if getattr(args, "device", None) is None and requested_gpus(args) else args.device


def requested_gpus(args: argparse.Namespace) -> int:
    """GPUs per node to ask SLURM for: --ngpus, unless the user explicitly passed --device cpu. Never looks at the
    submitting machine (a login node usually has no GPU)."""
    return 0 if getattr(args, "device", None) == "cpu" else args.ngpus


def detect_cluster(cluster: str | None) -> str:
    """--cluster, or submitit's guess (slurm where sbatch exists, else local)."""
    import submitit

    return cluster or submitit.AutoExecutor.which()


def job_folder(job_dir: str, cluster: str) -> str:
    """--job_dir (default ./jobs/%j). Only SLURM expands %j in a folder name; elsewhere it is replaced at once by a
    unique name, so no folder literally named '%j' is ever created."""
    job_dir = job_dir or str(Path("jobs") / "%j")
    if cluster != "slurm" and "%j" in job_dir:
        job_dir = job_dir.replace("%j", f"{cluster}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}")
    return job_dir


def submit(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str, auto_resume: bool = True):
    """Submit `main(args)` on `args.nodes` x `args.ngpus` tasks; returns the submitit job."""
    import submitit

    cluster = detect_cluster(args.cluster)
    args.job_dir = job_folder(args.job_dir, cluster)
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=cluster, slurm_max_num_timeout=args.max_requeues)
    extra: dict[str, Any] = {}
    if args.use_volta32:
        extra["slurm_constraint"] = "volta32gb"
    if args.comment:
        extra["slurm_comment"] = args.comment
    if args.partition:
        extra["slurm_partition"] = args.partition
    if args.mem_gb is None:
        args.mem_gb = DEFAULT_MEM_GB_PER_GPU * args.ngpus  # recorded in the job's args (run_info.json)
    executor.update_parameters(
        name=name, mem_gb=args.mem_gb, gpus_per_node=requested_gpus(args), tasks_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task, nodes=args.nodes, timeout_min=args.timeout,
        slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_srun_args=list(SRUN_ARGS), **extra,
    )
    args.device = requested_device(args)
    args.dist_url = "env://"  # the job exports MASTER_ADDR/PORT etc. (export_rendezvous), fresh on every requeue
    if args.resume == "" and auto_resume:
        args.resume = "auto"  # a requeued or re-submitted job continues where its folder left off
    return executor.submit(Job(main, args, auto_resume))


def launch(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str, auto_resume: bool = True):
    """Submit and report where the job writes. With --cluster debug, run the job here and now (submitit's debug
    executor only runs on `result()`)."""
    job = submit(main, args, name=name, auto_resume=auto_resume)
    print(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    if args.cluster == "debug":
        job.result()
    return job


def classification_launcher(module: Any, name: str, argv: list[str] | None = None):
    """Parse, validate and submit a fine-tuning / linear-probing job (`module` has get_args_parser, resolve_args,
    main); a requeue resumes from the job folder's newest checkpoint. Validation is machine-independent (device
    and amp are resolved in the job)."""
    parser = script_parser(f"Submit {name} to SLURM (submitit)", [module.get_args_parser()])
    add_launcher_args(parser)
    args = parse_with_config(parser, argv)
    with user_errors(parser.prog):
        validate_launcher_args(args)
        resolved = argparse.Namespace(**vars(args))
        maybe_print_config(resolved, partial(module.resolve_args, read_files=False), parser,
                           world_size=args.nodes * args.ngpus)
        module.resolve_args(resolved)  # validation only; the job resolves again
        if args.global_batch_size is not None:  # fail now, not after the queue: the job derives --accum_iter
            derive_accum_iter(args.global_batch_size, args.batch_size, args.nodes * args.ngpus)
    return launch(module.main, args, name=name)  # fine-tuning and probing understand --resume auto too
