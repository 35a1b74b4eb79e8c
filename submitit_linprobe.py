"""Launch linear probing on SLURM with submitit (MAE's launcher flags); requeued on preemption / time-out.

    python submitit_linprobe.py --nodes 2 --ngpus 8 --partition learnfair \\
        --finetune out/deepmim_vitb/checkpoint-1599.pth --data_path /datasets/imagenet \\
        --batch_size 1024 --epochs 90 --blr 0.1 --dist_eval [--probe_block 8]

A requeued job resumes from the newest checkpoint of its job folder (epoch granularity).
"""

from __future__ import annotations

import argparse

import main_linprobe
from util import submit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Submitit for DeepMIM linear probing", parents=[main_linprobe.get_args_parser()])
    submit.add_launcher_args(parser)
    args = parser.parse_args(argv)
    try:
        submit.validate_launcher_args(args)
        main_linprobe.resolve_args(argparse.Namespace(**vars(args)))  # validation only; the job resolves again
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    job = submit.submit(main_linprobe.main, args, name="deepmim_linprobe", auto_resume=False)
    print(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    return job


if __name__ == "__main__":
    main()
