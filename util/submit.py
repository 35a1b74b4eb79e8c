"""SLURM (or local) launch through submitit, shared by the submitit_*.py launchers.

The job is checkpointable: on preemption or time-out, submitit calls `Job.checkpoint`, which requeues the same
job with `--resume auto`, so the new job continues from the newest valid checkpoint in the job folder.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from util.checkpoint import list_checkpoints

CLUSTERS = ("slurm", "local", "debug")


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """MAE's submitit flags."""
    group = parser.add_argument_group("SLURM / submitit")
    group.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    group.add_argument("--nodes", default=2, type=int, help="number of nodes")
    group.add_argument("--timeout", default=4320, type=int, help="job duration in minutes")
    group.add_argument("--job_dir", default="", type=str, help="job folder (logs, checkpoints); default ./jobs/%%j")
    group.add_argument("--partition", default="", type=str, help="SLURM partition")
    group.add_argument("--use_volta32", action="store_true", help="request 32 GB V100s (constraint volta32gb)")
    group.add_argument("--comment", default="", type=str, help="SLURM comment")
    group.add_argument("--cluster", default=None, choices=CLUSTERS,
                       help="submitit backend (default: slurm when available, else local)")
    group.add_argument("--max_requeues", default=30, type=int, help="time-outs/preemptions before giving up")


def validate_launcher_args(args: argparse.Namespace) -> None:
    for flag in ("ngpus", "nodes", "timeout"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")


class Job:
    """A picklable callable that submitit runs on every task; `main` is the training entry point.

    auto_resume: `main` understands `--resume auto` (pre-training); otherwise a requeue points --resume at the
    newest checkpoint file of the job folder.
    """

    def __init__(self, main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, auto_resume: bool = True):
        self.main, self.args, self.auto_resume = main, args, auto_resume

    def __call__(self) -> Any:
        self._setup_distributed()
        return self.main(self.args)

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

    def _setup_distributed(self) -> None:
        import submitit

        env = submitit.JobEnvironment()
        job_dir = Path(str(self.args.job_dir).replace("%j", str(env.job_id)))
        self.args.output_dir = self.args.log_dir = str(job_dir)
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))


def shared_init_url(job_dir: Path) -> str:
    """A file:// rendezvous in the job folder (readable by every node), unique per submission."""
    job_dir.mkdir(parents=True, exist_ok=True)
    init = job_dir / f"{uuid.uuid4().hex}_init"
    return init.absolute().as_uri()


def submit(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, name: str, auto_resume: bool = True):
    """Submit `main(args)` on `args.nodes` x `args.ngpus` tasks; returns the submitit job."""
    import submitit

    if not args.job_dir:
        args.job_dir = str(Path("jobs") / "%j")
    folder = Path(args.job_dir)
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    extra: dict[str, Any] = {}
    if args.use_volta32:
        extra["slurm_constraint"] = "volta32gb"
    if args.comment:
        extra["slurm_comment"] = args.comment
    if args.partition:
        extra["slurm_partition"] = args.partition
    executor.update_parameters(
        name=name, mem_gb=40 * args.ngpus, gpus_per_node=args.ngpus if args.device.startswith("cuda") else 0,
        tasks_per_node=args.ngpus, cpus_per_task=10, nodes=args.nodes, timeout_min=args.timeout,
        slurm_signal_delay_s=120, **extra,
    )
    args.dist_url = shared_init_url(Path(str(folder).replace("%j", "shared")))
    if args.resume == "" and auto_resume:
        args.resume = "auto"  # a requeued or re-submitted job continues where its folder left off
    return executor.submit(Job(main, args, auto_resume))


def classification_launcher(module: Any, name: str, argv: list[str] | None = None):
    """Parse, validate and submit a fine-tuning / linear-probing job (`module` has get_args_parser, resolve_args,
    main); a requeue resumes from the job folder's newest checkpoint."""
    parser = argparse.ArgumentParser(f"Submitit for {name}", parents=[module.get_args_parser()])
    add_launcher_args(parser)
    args = parser.parse_args(argv)
    try:
        validate_launcher_args(args)
        module.resolve_args(argparse.Namespace(**vars(args)))  # validation only; the job resolves again
    except ValueError as err:
        parser.error(str(err))
    job = submit(module.main, args, name=name, auto_resume=False)
    print(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    return job
