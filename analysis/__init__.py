"""The paper's analyses of what each layer learned, as library code for `tools/` and the benchmarks.

- `analysis.loading`: a model from any checkpoint (pre-training, classifier, `.safetensors` export, released weights);
- `analysis.features`: per-block encoder features and per-head attention outputs on unmasked images;
- `analysis.images`: the fixed set of evaluation images and the masking noise shared by every model;
- `analysis.cli`: the flags, checks and checkpoint loading the tools share;
- `analysis.cka`: linear CKA between layers (Fig. 4, Fig. 5);
- `analysis.head_diversity`: cosine similarity between attention heads (Fig. 6);
- `analysis.visualize`: reconstruction figures of every decoder;
- `analysis.flops`: the analytic FLOP count of a pre-training step (model FLOP utilisation).

Layer: above the models, below the engines and entry scripts.
"""
