"""Head diversity (analysis/head_diversity.py) and the feature extraction it relies on (analysis/features.py): per-head
attention outputs and per-block token features of the unmasked encoder."""

import numpy as np
import pytest
import torch

from analysis.features import (
    attention_head_outputs,
    capture_head_outputs,
    embed_unmasked,
    encoder_block_features,
    pool_tokens,
)
from analysis.head_diversity import HeadSimilarity, head_cosine_similarity, mean_pairwise, pairwise_values
from models_deepmim import create_model


def tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=4)
    return create_model("deepmim_vit_small_patch16", **{**cfg, **overrides}).eval()


def test_identical_heads_give_one():
    head = torch.randn(3, 1, 10, 8)
    sim = head_cosine_similarity(head.expand(3, 4, 10, 8))
    assert torch.allclose(pairwise_values(sim), torch.ones(6, dtype=sim.dtype))
    assert mean_pairwise(sim).item() == pytest.approx(1.0)


def test_orthogonal_heads_give_zero():
    # Head h writes only to token h: the flattened outputs have disjoint supports.
    heads = torch.zeros(2, 4, 6, 8)
    for h in range(4):
        heads[:, h, h] = torch.randn(2, 8)
    sim = head_cosine_similarity(heads)
    assert torch.allclose(pairwise_values(sim), torch.zeros(6, dtype=sim.dtype))
    assert torch.allclose(sim.diagonal(), torch.ones(4, dtype=sim.dtype))


def test_similarity_matches_cosine_of_flattened_outputs():
    heads = torch.randn(5, 3, 7, 4)
    sim = head_cosine_similarity(heads)
    flat = [heads[:, h].reshape(-1).numpy() for h in range(3)]
    expected = [np.dot(flat[i], flat[j]) / (np.linalg.norm(flat[i]) * np.linalg.norm(flat[j]))
                for i in range(3) for j in range(i + 1, 3)]  # row-major pairs (0,1), (0,2), (1,2)
    assert np.allclose(pairwise_values(sim).numpy(), expected)
    assert mean_pairwise(sim).item() == pytest.approx(float(np.mean(expected)))


def test_streaming_over_batches_equals_one_pass():
    layers = [torch.randn(10, 4, 5, 3) for _ in range(2)]
    acc = HeadSimilarity(num_layers=2, num_heads=4)
    acc.update([layer[:6] for layer in layers])
    acc.update([layer[6:] for layer in layers])
    expected = torch.stack([head_cosine_similarity(layer) for layer in layers])
    assert torch.allclose(acc.compute(), expected)
    assert acc.num_images == 10
    with pytest.raises(ValueError, match="expected 2 layers"):
        acc.update(layers[:1])


@torch.no_grad()
def test_head_outputs_are_softmax_qk_v_of_each_block():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    heads = attention_head_outputs(model, imgs)
    blocks = encoder_block_features(model, imgs)
    assert len(heads) == model.depth
    inputs = [embed_unmasked(model, imgs), *blocks[:-1]]  # the input of each block
    for blk, x, out in zip(model.blocks, inputs, heads):
        n, t, d = x.shape
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(n, t, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        expected = torch.softmax(q @ k.transpose(-2, -1) * (d // 4) ** -0.5, dim=-1) @ v
        assert out.shape == (2, 4, 1 + 16, 16)
        assert torch.allclose(out, expected, atol=1e-5)
    # Hooks are gone afterwards: a plain forward records nothing.
    with capture_head_outputs(model) as outputs:
        pass
    encoder_block_features(model, imgs)
    assert outputs == [] and all(not blk.attn.proj._forward_pre_hooks for blk in model.blocks)


@torch.no_grad()
def test_block_features_are_the_unmasked_encoder():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    feats = encoder_block_features(model, imgs)
    assert [f.shape for f in feats] == [torch.Size([2, 17, 64])] * 4
    # forward_encoder with nothing masked and identity-order noise keeps the token order: same features.
    noise = torch.arange(16.0).expand(2, 16)
    latents, _ = model.forward_encoder(imgs, mask_ratio=0.0, noise=noise)
    for block, latent in latents.items():
        expected = model.norm(feats[block - 1]) if block == model.depth else feats[block - 1]
        assert torch.allclose(latent, expected, atol=1e-6)


def test_pool_tokens():
    x = torch.randn(3, 5, 4)
    assert pool_tokens(x, "flatten").shape == (3, 20)
    assert torch.allclose(pool_tokens(x, "mean"), x[:, 1:].mean(1))
    assert torch.equal(pool_tokens(x, "cls"), x[:, 0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_tokens(x, "max")
