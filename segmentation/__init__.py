"""Semantic segmentation (paper Tab. 4, Appendix A): a pre-trained ViT as the released UperNet segmentor's backbone,
ADE20K data and its training / test pipelines, the UperNet and FCN heads, mmseg's mIoU protocol and sliding-window
inference. The backbone (`models_backbone`) and the iteration-based run (`util.iteration`) are shared with detection.

- `segmentation.data`: the ADEChallengeData2016 layout (and users' folders in it), label checks, datasets.
- `segmentation.transforms`: the released training pipeline (resize x [0.5, 2], 512 crop with cat_max_ratio, flip,
  photometric distortion, normalisation, padding with 255) and the test-time resize.
- `segmentation.heads`, `segmentation.segmentor`: UPerHead, FCNHead, the encoder-decoder, its loss and loading.
- `segmentation.metrics`, `segmentation.inference`: per-class areas, mIoU / mAcc / aAcc, slide inference, the
  exact distributed evaluation and the PNG predictions.
- `segmentation.demo`: the CPU demo's data (mosaics of scikit-image's texture photographs) and its figure.
"""
