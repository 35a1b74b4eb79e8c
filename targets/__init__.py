"""Reconstruction targets: what each DeepMIM decoder learns to predict (paper Sec. 3, Tab. 2, Tab. 7, Tab. 11), and
the masking strategies that pick what it predicts from (Tab. 12).

- `targets.build`: one small class per kind (pixel, HOG, CLIP/DINO teacher tokens, codebook ids) behind one
  interface, and `build_target` for `--target`;
- `targets.hog`: MaskFeat's HOG descriptor on the patch grid;
- `targets.teachers`: frozen CLIP / DINO teachers whose per-token features are targets;
- `targets.tokenizers`: frozen visual tokenizers (BEiT v2's VQ-KD) whose per-patch codes are the codebook target;
- `targets.hybrid`: DeepMIM-dagger's frozen MAE generator and the blend of Eq. 1;
- `targets.masking`: which patches the encoder sees (Tab. 12): MAE's random masking, MILAN's semantic-aware masking
  by a frozen teacher's class-token attention.

Layer: above the models (the generator is a `models_deepmim` MAE), below the engines and entry scripts.
"""
