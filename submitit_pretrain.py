"""Launch DeepMIM pre-training on SLURM with submitit (MAE's launcher flags), preemption-safe.

    python submitit_pretrain.py --nodes 4 --ngpus 8 --partition learnfair --use_volta32 \\
        --model deepmim_vit_base_patch16 --batch_size 128 --norm_pix_loss --epochs 1600 --data_path /imagenet

On preemption or time-out the job saves, requeues itself and resumes from the newest valid checkpoint in its
job folder (`--resume auto`), with no change of flags.
"""

from __future__ import annotations

import argparse
import logging

import main_pretrain
from util import submit

logger = logging.getLogger("submitit_pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Submitit for DeepMIM pre-training", parents=[main_pretrain.get_args_parser()])
    submit.add_launcher_args(parser)
    args = main_pretrain.resolve_args(parser.parse_args(argv))
    try:
        submit.validate_launcher_args(args)
        main_pretrain.validate_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    job = submit.submit(main_pretrain.main, args, name="deepmim_pretrain")
    print(f"Submitted job {job.job_id}; logs and checkpoints in {args.job_dir.replace('%j', str(job.job_id))}")
    return job


if __name__ == "__main__":
    main()
