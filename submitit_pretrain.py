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
from util.cli import script_parser, user_errors
from util.config import derive_accum_iter, maybe_print_config, parse_with_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate on the submitting machine. Nothing here depends on that machine: --amp stays as given (None
    by default) and is resolved inside the job, on the compute node; util.submit turns a default --device into cuda
    when GPUs are requested."""
    parser = script_parser(__doc__, [main_pretrain.get_args_parser()])
    submit.add_launcher_args(parser)
    args = main_pretrain.resolve_args(parse_with_config(parser, argv), parser)
    with user_errors(parser.prog):
        submit.validate_launcher_args(args)
        maybe_print_config(args, partial(main_pretrain.validate_args, check_files=False), parser,
                           world_size=args.nodes * args.ngpus)
        main_pretrain.validate_args(args)
        if args.global_batch_size is not None:  # fail now, not after the queue: the job derives --accum_iter
            derive_accum_iter(args.global_batch_size, args.batch_size, args.nodes * args.ngpus)
    return args


def main(argv: list[str] | None = None):
    """Submit pre-training (with --cluster debug: run it here); returns the submitit job."""
    return submit.launch(main_pretrain.main, parse_args(argv), name="deepmim_pretrain")


if __name__ == "__main__":
    main()
