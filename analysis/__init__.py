"""The paper's analyses of what each layer learned, as library code for `tools/` and the benchmarks.

- `analysis.loading`: the tools' one reading path: a model from any checkpoint (pre-training, classifier,
  `.safetensors` export, timm Hub folder, released weights);
- `analysis.features`: per-block encoder features and per-head attention outputs and maps on unmasked images;
- `analysis.images`: the fixed set of evaluation images (and labelled train / val splits for probes) and the masking
  noise shared by every model;
- `analysis.cli`: the flags, checks and checkpoint loading the tools share;
- `analysis.cka`: linear CKA between layers (Fig. 4, Fig. 5);
- `analysis.head_diversity`: cosine similarity between heads' outputs, KL divergence between their attention maps
  (Fig. 6);
- `analysis.probes`: converged logistic-regression probe and weighted k-NN of every block;
- `analysis.robustness`: ImageNet-A/R/C evaluation and mCE (Tab. 6);
- `analysis.visualize`: reconstruction figures of every decoder;
- `analysis.flops`: the analytic FLOP count of a pre-training step (model FLOP utilisation).

Layer: above the models, below the engines and entry scripts.
"""
