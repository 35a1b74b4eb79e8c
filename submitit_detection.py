"""Launch detection (Mask R-CNN on COCO) on SLURM with submitit (MAE's launcher flags); requeued on preemption /
time-out.

    python submitit_detection.py --nodes 1 --ngpus 8 --partition learnfair --use_volta32 \\
        --config configs/detection/mask_rcnn_deepmim_clip_vit_base_100ep.yaml --batch_size 2 \\
        --finetune out/deepmim_clip/checkpoint-1599.pth --data_path /datasets/coco

A requeued job resumes exactly, mid-interval included, from the newest valid checkpoint of its job folder
(`--resume auto`). The job asks for --ngpus GPUs per node (none with --device cpu); device and precision are chosen
inside the job (util/amp.py).
"""

from __future__ import annotations

import main_detection
from util import submit


def main(argv: list[str] | None = None):
    """Submit (with --cluster debug: run here); returns the submitit job."""
    return submit.classification_launcher(main_detection, "deepmim_detection", argv)


if __name__ == "__main__":
    main()
