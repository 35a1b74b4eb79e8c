"""Launch DeepMIM pre-training on SLURM with submitit (MAE's launcher flags), preemption-safe.

    python submitit_pretrain.py --nodes 4 --ngpus 8 --partition learnfair \\
        --config configs/pretrain/deepmim_vit_base_1600e.yaml --batch_size 128 --data_path /imagenet

On preemption or time-out the job saves, requeues itself and resumes from the newest valid checkpoint in its
job folder (`--resume auto`), with no change of flags. The job asks for --ngpus GPUs per node (none with
--device cpu) and then trains on them or stops (--device cuda: no silent CPU fallback); the precision is chosen
inside the job, on the compute node (util/amp.py).
"""

from __future__ import annotations

import argparse
from functools import partial

import main_pretrain
from util import submit
from util.config import derive_accum_iter, maybe_print_config, parse_with_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate on the submitting machine. Nothing here depends on that machine: --amp stays as given (None
    by default) and is resolved inside the job, on the compute node; util.submit turns a default --device into cuda
    when GPUs are requested."""
    parser = argparse.ArgumentParser("Submitit for DeepMIM pre-training", parents=[main_pretrain.get_args_parser()])
    submit.add_launcher_args(parser)
    args = main_pretrain.resolve_args(parse_with_config(parser, argv), parser)
    try:
        submit.validate_launcher_args(args)
        maybe_print_config(args, partial(main_pretrain.validate_args, check_data=False), parser)
        main_pretrain.validate_args(args)
        if args.global_batch_size is not None:  # fail now, not after the queue: the job derives --accum_iter
            derive_accum_iter(args.global_batch_size, args.batch_size, args.nodes * args.ngpus)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None):
    """Submit pre-training (with --cluster debug: run it here); returns the submitit job."""
    return submit.launch(main_pretrain.main, parse_args(argv), name="deepmim_pretrain")


if __name__ == "__main__":
    main()
