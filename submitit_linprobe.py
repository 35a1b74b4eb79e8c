"""Launch linear probing on SLURM with submitit (MAE's launcher flags); requeued on preemption / time-out.

    python submitit_linprobe.py --nodes 2 --ngpus 8 --partition learnfair \\
        --config configs/linprobe/vit_base_90e.yaml --batch_size 1024 \\
        --finetune out/deepmim_vitb/checkpoint-1599.pth --data_path /datasets/imagenet [--probe_block 8]

A requeued job resumes exactly, mid-epoch included, from the newest valid checkpoint of its job folder
(`--resume auto`). The job asks for
--ngpus GPUs per node (none with --device cpu); device and precision are chosen inside the job (util/amp.py).
"""

from __future__ import annotations

import main_linprobe
from util import submit


def main(argv: list[str] | None = None):
    """Submit (with --cluster debug: run here); returns the submitit job."""
    return submit.classification_launcher(main_linprobe, "deepmim_linprobe", argv)


if __name__ == "__main__":
    main()
