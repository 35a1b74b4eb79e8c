"""Launch semantic segmentation on SLURM with submitit (MAE's launcher flags); requeued on preemption / time-out.

    python submitit_segmentation.py --nodes 1 --ngpus 8 --partition learnfair \\
        --config configs/segmentation/upernet_deepmim_clip_vit_base_160k.yaml --batch_size 2 \\
        --finetune out/deepmim_clip/checkpoint-1599.pth --data_path /datasets/ADEChallengeData2016

A requeued job resumes exactly, mid-interval included, from the newest valid checkpoint of its job folder
(`--resume auto`). The job asks for --ngpus GPUs per node (none with --device cpu); device and precision are chosen
inside the job (util/amp.py).
"""

from __future__ import annotations

import main_segmentation
from util import submit


def main(argv: list[str] | None = None):
    """Submit (with --cluster debug: run here); returns the submitit job."""
    return submit.classification_launcher(main_segmentation, "deepmim_segmentation", argv)


if __name__ == "__main__":
    main()
