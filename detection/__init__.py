"""Object detection and instance segmentation (paper Tab. 3, Appendix A): Mask R-CNN on a pre-trained ViT, as the
ViT detection benchmark (Li et al. 2021) that MAE and DeepMIM follow, built on torchvision's detection models and
pycocotools. The pyramid adapter and the loading of pre-trained encoders are shared with segmentation
(`models_backbone`); the iteration-based run is the project's one (`util.iteration`).

- `detection.backbone`: the windowed-attention ViT (14x14 windows, global blocks 3, 6, 9, 12, relative position
  biases, no class token) and its stride 4/8/16/32 pyramid (multi-block, or ViTDet's simple pyramid).
- `detection.model`: torchvision's Mask R-CNN with the v2 heads and an input transform that keeps the 1024 pipeline;
  loading; layer-wise lr decay groups.
- `detection.data`, `detection.transforms`: the COCO 2017 layout through pycocotools, checks, large-scale jitter
  with transforms.v2 on boxes and masks.
- `detection.evaluation`: COCO results files (boxes, RLE masks) gathered from every rank, COCOeval box and mask AP.
- `detection.demo`: the CPU demo's COCO-format set from scikit-image's `coins` and its figure.
"""
