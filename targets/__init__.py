"""Reconstruction targets: what each DeepMIM decoder learns to predict (paper Sec. 3, Tab. 2, Tab. 7, Tab. 11).

- `targets.build`: one small class per kind (pixel, HOG, CLIP/DINO teacher tokens) behind one interface, and
  `build_target` for `--target`;
- `targets.hog`: MaskFeat's HOG descriptor on the patch grid;
- `targets.teachers`: frozen CLIP / DINO teachers whose per-token features are targets;
- `targets.hybrid`: DeepMIM-dagger's frozen MAE generator and the blend of Eq. 1.

Layer: above the models (the generator is a `models_deepmim` MAE), below the engines and entry scripts.
"""
