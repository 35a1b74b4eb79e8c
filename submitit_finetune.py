"""Launch fine-tuning on SLURM with submitit (MAE's launcher flags); requeued on preemption / time-out.

    python submitit_finetune.py --nodes 4 --ngpus 8 --partition learnfair \\
        --finetune out/deepmim_vitb/checkpoint-1599.pth --data_path /datasets/imagenet \\
        --batch_size 32 --epochs 100 --blr 2e-4 --layer_decay 0.6 --dist_eval

A requeued job resumes from the newest checkpoint of its job folder (epoch granularity).
"""

from __future__ import annotations

import argparse

import main_finetune
from util import submit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Submitit for DeepMIM fine-tuning", parents=[main_finetune.get_args_parser()])
    submit.add_launcher_args(parser)
    args = parser.parse_args(argv)
    try:
        submit.validate_launcher_args(args)
        main_finetune.resolve_args(argparse.Namespace(**vars(args)))  # validation only; the job resolves again
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    job = submit.submit(main_finetune.main, args, name="deepmim_finetune", auto_resume=False)
    print(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    return job


if __name__ == "__main__":
    main()
