"""Launch fine-tuning on SLURM with submitit (MAE's launcher flags); requeued on preemption / time-out.

    python submitit_finetune.py --nodes 4 --ngpus 8 --partition learnfair \\
        --config configs/finetune/vit_base_after_800e_1600e.yaml --batch_size 32 \\
        --finetune out/deepmim_vitb/checkpoint-1599.pth --data_path /datasets/imagenet

A requeued job resumes exactly, mid-epoch included, from the newest valid checkpoint of its job folder
(`--resume auto`). The job asks for
--ngpus GPUs per node (none with --device cpu); device and precision are chosen inside the job (util/amp.py).
"""

from __future__ import annotations

import main_finetune
from util import submit


def main(argv: list[str] | None = None):
    """Submit (with --cluster debug: run here); returns the submitit job."""
    return submit.classification_launcher(main_finetune, "deepmim_finetune", argv)


if __name__ == "__main__":
    main()
