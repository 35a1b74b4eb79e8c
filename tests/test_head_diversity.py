"""Head diversity (analysis/head_diversity.py: cosine of head outputs, KL divergence of attention maps) and the feature
extraction it relies on (analysis/features.py): per-head attention outputs and maps and per-block token features of
the unmasked encoder; tools/head_diversity.py --on maps|outputs."""

import importlib.util

import numpy as np
import pytest
import torch
from conftest import ROOT, write_image_folder

from analysis.features import (
    attention_head_outputs,
    attention_maps,
    capture_head_outputs,
    embed_unmasked,
    encoder_block_features,
    pool_tokens,
)
from analysis.head_diversity import (
    HeadKL,
    HeadSimilarity,
    head_cosine_similarity,
    head_kl_sums,
    mean_pairwise,
    pairwise_values,
)
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


# -- attention maps and Xie et al.'s KL divergence between heads (issue 24, item 20) ---------------------------------


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double().numpy(), q.double().numpy()
    return float(np.sum(p * np.log(p / q)))


def test_kl_between_heads_by_hand():
    # One image, one query row, three keys: head 0 uniform, head 1 peaked, head 2 a copy of head 0.
    rows = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.8, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    maps = rows.view(1, 3, 1, 3)
    sums = head_kl_sums(maps)
    assert sums[0, 1].item() == pytest.approx(kl(rows[0], rows[1])) and sums[0, 2].item() == pytest.approx(0.0)
    acc = HeadKL(num_layers=1, num_heads=3)
    acc.update([maps])
    symmetric = acc.compute()[0]
    assert symmetric[0, 1].item() == pytest.approx((kl(rows[0], rows[1]) + kl(rows[1], rows[0])) / 2)
    assert torch.allclose(symmetric, symmetric.T) and torch.all(symmetric.diagonal() == 0)
    assert pairwise_values(symmetric)[1].item() == pytest.approx(0.0)  # pair (0, 2): identical heads


def test_kl_is_the_mean_over_query_rows_and_streams_over_batches():
    maps = torch.softmax(torch.randn(6, 4, 5, 5) * 3, dim=-1)
    acc = HeadKL(num_layers=1, num_heads=4)
    acc.update([maps[:2]])
    acc.update([maps[2:]])
    p = maps.double()
    by_hand = torch.stack([torch.stack([(p[:, i] * (p[:, i] / p[:, j]).log()).sum(-1).mean() for j in range(4)])
                           for i in range(4)])
    torch.testing.assert_close(acc.compute()[0], (by_hand + by_hand.T) / 2)
    assert acc.num_images == 6 and acc.num_rows == 30
    with pytest.raises(RuntimeError, match="before any update"):
        HeadKL(1, 4).compute()


@torch.no_grad()
def test_attention_maps_are_the_probabilities_that_make_the_head_outputs():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    maps, heads = attention_maps(model, imgs), attention_head_outputs(model, imgs)
    inputs = [embed_unmasked(model, imgs), *encoder_block_features(model, imgs)[:-1]]
    for blk, x, m, out in zip(model.blocks, inputs, maps, heads, strict=True):
        assert m.shape == (2, 4, 17, 17) and torch.allclose(m.sum(-1), torch.ones(2, 4, 17))
        v = blk.attn.qkv(blk.norm1(x)).reshape(2, 17, 3, 4, 16)[:, :, 2].transpose(1, 2)  # (N, heads, T, d)
        torch.testing.assert_close(m @ v, out, atol=1e-5, rtol=1e-4)
    assert all(not blk.attn.qkv._forward_hooks for blk in model.blocks)


def test_tool_on_maps_and_on_outputs(tmp_path):
    spec = importlib.util.spec_from_file_location("hd_tool", ROOT / "tools" / "head_diversity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = tiny_model()
    ckpt = tmp_path / "m.pth"
    torch.save({"model": model.state_dict(), "model_cfg": model.config}, ckpt)
    images = write_image_folder(tmp_path / "images", num_images=6, size=40)
    runs = {}
    for on in ("maps", "outputs"):
        args = tool.get_args_parser().parse_args(["--ckpt", str(ckpt), "--data_path", str(images), "--on", on,
                                                  "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
                                                  "--output_dir", str(tmp_path / "out")])
        runs[on] = tool.main(args)
    dataset = tool.images.build_image_dataset(str(images), 6, 32)
    stack = torch.stack([dataset[i][0] for i in range(6)])
    with torch.no_grad():
        acc = HeadKL(4, 4)
        acc.update(attention_maps(model, stack))
    assert runs["maps"]["checkpoints"]["m"]["mean"] == pytest.approx(mean_pairwise(acc.compute()).tolist())
    assert runs["maps"]["on"] == "maps" and "KL" in runs["maps"]["definition"]
    assert runs["outputs"]["on"] == "outputs" and "cosine" in runs["outputs"]["definition"]
    assert runs["maps"]["checkpoints"]["m"]["mean"] != pytest.approx(runs["outputs"]["checkpoints"]["m"]["mean"])
    assert (tmp_path / "out" / "head_diversity_maps.png").is_file()
    assert (tmp_path / "out" / "head_diversity.png").is_file()
