"""The DeepMIM model: masking, decoders, Eq. 2, gradient flow, registry, released-checkpoint keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY

import models_deepmim as M
from util import patches as P


def test_shapes(tiny_deepmim):
    imgs = torch.randn(3, 3, 32, 32)
    loss, losses, preds, mask = tiny_deepmim(imgs, mask_ratio=0.75)
    assert tiny_deepmim.supervised_blocks == (2, 3, 4)  # depth 4 * {1/2, 2/3, 5/6, 1}, rounded and distinct
    assert loss.ndim == 0 and set(losses) == set(preds) == {2, 3, 4}
    assert mask.shape == (3, 16)
    for pred in preds.values():
        assert pred.shape == (3, 12, 8 * 8 * 3)


def test_default_blocks_match_paper():
    assert M.default_supervised_blocks(12) == (6, 8, 10, 12)  # paper Sec. 3, Tab. 8
    assert M.default_supervised_blocks(24) == (12, 16, 20, 24)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_visible_tokens_and_one_mask_for_all_decoders(tiny_deepmim, ratio):
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].shape[1], args[1].clone(), args[2].clone()))

    for decoder in tiny_deepmim.decoders.values():
        decoder.register_forward_pre_hook(record, with_kwargs=True)
    _, _, _, mask = tiny_deepmim(torch.randn(2, 3, 32, 32), mask_ratio=ratio)
    visible = int(16 * (1 - ratio))
    assert len(seen) == 3
    for tokens, ids_restore, ids_masked in seen:
        assert tokens == 1 + visible  # cls + visible patches
        assert torch.equal(ids_restore, seen[0][1]) and torch.equal(ids_masked, seen[0][2])
    assert torch.all(mask.sum(1) == 16 - visible)
    # the predicted positions are exactly the removed ones
    assert torch.equal(mask.bool().nonzero()[:, 1].view(2, -1), seen[0][2])


def test_noise_makes_mask_deterministic(tiny_deepmim):
    tiny_deepmim.eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out1, out2 = tiny_deepmim(imgs, noise=noise), tiny_deepmim(imgs, noise=noise)
    assert torch.equal(out1[3], out2[3]) and torch.equal(out1[0], out2[0])
    # the smallest noise values are the visible patches (MAE's argsort rule)
    keep = noise.argsort(1)[:, :4]
    assert torch.all(out1[3].gather(1, keep) == 0)


def test_total_loss_is_weighted_sum():
    model = M.create_model("deepmim_vit_small_patch16", loss_weights=[0.5, 2.0, 3.0], **TINY)
    loss, losses, _, _ = model(torch.randn(2, 3, 32, 32))
    expected = 0.5 * losses[2] + 2.0 * losses[3] + 3.0 * losses[4]
    torch.testing.assert_close(loss, expected)


def test_block_k_loss_reaches_blocks_up_to_k_only(tiny_deepmim):
    imgs = torch.randn(2, 3, 32, 32)
    for k in tiny_deepmim.supervised_blocks:
        tiny_deepmim.zero_grad(set_to_none=True)
        _, losses, _, _ = tiny_deepmim(imgs, noise=torch.rand(2, 16))
        losses[k].backward()
        for index, block in enumerate(tiny_deepmim.blocks, start=1):
            grads = [p.grad for p in block.parameters()]
            if index <= k:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), f"block {index} (loss {k})"
            else:
                assert all(g is None for g in grads), f"block {index} got gradient from loss {k}"
        norm_has_grad = tiny_deepmim.norm.weight.grad is not None
        assert norm_has_grad == (k == tiny_deepmim.depth)  # only the last tap passes the final norm
        for block, decoder in tiny_deepmim.decoders.items():
            assert (decoder.pred.weight.grad is not None) == (int(block) == k)


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_shared_decoder_has_one_decoder():
    shared = M.create_model("deepmim_vit_small_patch16", shared_decoder=True, **TINY)
    independent = M.create_model("deepmim_vit_small_patch16", **TINY)
    assert list(shared.decoders) == ["shared"]
    one_decoder = _num_params(shared.decoders["shared"])
    assert _num_params(shared) + 2 * one_decoder == _num_params(independent)
    _, losses, _, _ = shared(torch.randn(2, 3, 32, 32))
    assert set(losses) == {2, 3, 4}


def test_independent_decoders_have_distinct_parameters(tiny_deepmim):
    decoders = list(tiny_deepmim.decoders.values())
    assert len(decoders) == 3
    pointers = [p.data_ptr() for d in decoders for p in d.parameters()]
    assert len(pointers) == len(set(pointers))
    assert not torch.equal(decoders[0].embed.weight, decoders[1].embed.weight)


def mae_vit_base_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of MAE's mae_vit_base_patch16 (ViT-B/16 encoder, 8-block 512-d decoder), by MAE's names."""
    d, dd, hidden, dhidden = 768, 512, 3072, 2048
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
              "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "mask_token": (1, 1, dd),
              "decoder_pos_embed": (1, 197, dd), "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
              "decoder_pred.weight": (768, dd), "decoder_pred.bias": (768,)}

    def block(prefix, width, mlp):
        return {f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
                f"{prefix}.attn.qkv.weight": (3 * width, width), f"{prefix}.attn.qkv.bias": (3 * width,),
                f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
                f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
                f"{prefix}.mlp.fc1.weight": (mlp, width), f"{prefix}.mlp.fc1.bias": (mlp,),
                f"{prefix}.mlp.fc2.weight": (width, mlp), f"{prefix}.mlp.fc2.bias": (width,)}

    for i in range(12):
        shapes.update(block(f"blocks.{i}", d, hidden))
    for i in range(8):
        shapes.update(block(f"decoder_blocks.{i}", dd, dhidden))
    return shapes


def test_mae_baseline_has_mae_parameter_shapes():
    model = M.create_model("mae_vit_base_patch16")
    expected = mae_vit_base_shapes()
    # Load a state dict written with MAE's names: every MAE key must land, with MAE's shape, and nothing be left.
    state = {k: torch.zeros(shape) for k, shape in expected.items()}
    report = M.load_pretrained(model, state)
    assert report == M.LoadReport([], [], [])
    assert sum(math.prod(s) for s in expected.values()) == sum(v.numel() for v in model.state_dict().values())
    assert _num_params(model) == 111_907_840  # MAE ViT-B with decoder (incl. the fixed pos-embeds)


def _released_deepmim_state(model_depth: int, dim: int, ddim: int, pred: int, tokens: int) -> dict[str, torch.Tensor]:
    """A state dict laid out like the released DeepMIM code (suffixes 1-4, one shared decoder_pos_embed)."""
    g = torch.Generator().manual_seed(0)
    state = {"cls_token": torch.randn(1, 1, dim, generator=g), "pos_embed": torch.randn(1, tokens, dim, generator=g),
             "patch_embed.proj.weight": torch.randn(dim, 3, 8, 8, generator=g),
             "patch_embed.proj.bias": torch.randn(dim, generator=g), "norm.weight": torch.randn(dim, generator=g),
             "norm.bias": torch.randn(dim, generator=g),
             "decoder_pos_embed": torch.randn(1, tokens, ddim, generator=g)}
    for i in range(model_depth):
        for name, shape in [("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("attn.qkv.weight", (3 * dim, dim)),
                            ("attn.qkv.bias", (3 * dim,)), ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
                            ("norm2.weight", (dim,)), ("norm2.bias", (dim,)), ("mlp.fc1.weight", (4 * dim, dim)),
                            ("mlp.fc1.bias", (4 * dim,)), ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,))]:
            state[f"blocks.{i}.{name}"] = torch.randn(*shape, generator=g)
    for s in range(1, 5):
        state[f"decoder_embed{s}.weight"] = torch.randn(ddim, dim, generator=g)
        state[f"decoder_embed{s}.bias"] = torch.randn(ddim, generator=g)
        state[f"mask_token{s}"] = torch.randn(1, 1, ddim, generator=g)
        state[f"decoder_norm{s}.weight"] = torch.randn(ddim, generator=g)
        state[f"decoder_norm{s}.bias"] = torch.randn(ddim, generator=g)
        state[f"decoder_pred{s}.weight"] = torch.randn(pred, ddim, generator=g)
        state[f"decoder_pred{s}.bias"] = torch.randn(pred, generator=g)
        for name, shape in [("norm1.weight", (ddim,)), ("norm1.bias", (ddim,)), ("attn.qkv.weight", (3 * ddim, ddim)),
                            ("attn.qkv.bias", (3 * ddim,)), ("attn.proj.weight", (ddim, ddim)),
                            ("attn.proj.bias", (ddim,)), ("norm2.weight", (ddim,)), ("norm2.bias", (ddim,)),
                            ("mlp.fc1.weight", (4 * ddim, ddim)), ("mlp.fc1.bias", (4 * ddim,)),
                            ("mlp.fc2.weight", (ddim, 4 * ddim)), ("mlp.fc2.bias", (ddim,))]:
            state[f"decoder_blocks{s}.0.{name}"] = torch.randn(*shape, generator=g)
    return state


def test_load_released_deepmim_keys():
    model = M.create_model("deepmim_vit_small_patch16", supervised_blocks=[1, 2, 3, 4], **TINY)
    state = _released_deepmim_state(4, 64, 32, 192, 17)
    report = M.load_pretrained(model, {"model": state})
    assert report.missing == [] and report.unexpected == []
    own = model.state_dict()
    for suffix, block in zip(range(1, 5), model.supervised_blocks):  # suffix k -> k-th supervised block
        ours, released = f"decoders.{block}.blocks.0.attn.qkv.weight", f"decoder_blocks{suffix}.0.attn.qkv.weight"
        assert torch.equal(own[ours], state[released])
        assert torch.equal(own[f"decoders.{block}.pos_embed"], state["decoder_pos_embed"])
    assert torch.equal(own["blocks.3.mlp.fc2.weight"], state["blocks.3.mlp.fc2.weight"])


def test_load_released_deepmim_clip_layout_reports_head_mismatch_only():
    """DeepMIM-CLIP heads predict 512-d features; a pixel model keeps its own heads and reports them."""
    model = M.create_model("deepmim_vit_small_patch16", supervised_blocks=[1, 2, 3, 4], **TINY)
    report = M.load_pretrained(model, _released_deepmim_state(4, 64, 32, 512, 17))
    heads = sorted(f"decoders.{b}.pred.{p}" for b in (1, 2, 3, 4) for p in ("weight", "bias"))
    assert sorted(report.mismatched) == heads
    clip_model = M.create_model("deepmim_vit_small_patch16", supervised_blocks=[1, 2, 3, 4], pred_dim=512, **TINY)
    assert M.load_pretrained(clip_model, _released_deepmim_state(4, 64, 32, 512, 17)) == M.LoadReport([], [], [])


def test_load_own_checkpoint_roundtrip(tiny_deepmim):
    other = M.model_from_config(tiny_deepmim.config)
    assert M.load_pretrained(other, {"model": tiny_deepmim.state_dict()}) == M.LoadReport([], [], [])
    for key, value in tiny_deepmim.state_dict().items():
        assert torch.equal(value, other.state_dict()[key])


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="deepmim_vit_base_patch16"):
        M.create_model("deepmim_vit_giant")


@pytest.mark.parametrize("blocks", [[0, 4], [2, 5], [2, 2, 4], [2, 3]])
def test_bad_supervised_blocks(blocks):
    with pytest.raises(ValueError, match="supervised_blocks"):
        M.create_model("deepmim_vit_small_patch16", supervised_blocks=blocks, **TINY)


def mae_numpy_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's formula, written out: [sin(w w_k), cos(w w_k), sin(h w_k), cos(h w_k)], w_k = 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    h, w = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    h, w = h.reshape(-1, 1) * omega, w.reshape(-1, 1) * omega
    emb = np.concatenate([np.sin(w), np.cos(w), np.sin(h), np.cos(h)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_sincos_pos_embed_matches_mae_layout():
    ours = P.sincos_pos_embed((4, 4), 64)[0].numpy()
    np.testing.assert_allclose(ours, mae_numpy_pos_embed(64, 4), atol=1e-6)


def test_masked_only_head_equals_full_prediction_loss(tiny_deepmim):
    """Predicting only the masked tokens gives MAE's loss (all tokens predicted, loss weighted by the mask)."""
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, losses, _, mask = tiny_deepmim(imgs, noise=noise)
    latents, masking = tiny_deepmim.forward_encoder(imgs, 0.75, noise)
    target = P.patchify(imgs, 8)
    for block, latent in latents.items():
        full = tiny_deepmim.decoder_for(block)(latent, masking.ids_restore)  # (N, L, C)
        mae_loss = (((full - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        torch.testing.assert_close(losses[block], mae_loss)


def test_patchify_roundtrip_and_scatter():
    imgs = torch.randn(2, 3, 32, 32)
    patches = P.patchify(imgs, 8)
    assert torch.equal(P.unpatchify(patches, 8, (4, 4)), imgs)
    mask = torch.zeros(2, 16)
    mask[:, [1, 5]] = 1
    full = P.scatter_masked(patches[:, [1, 5]], mask, fill=torch.zeros_like(patches))
    assert torch.equal(full[:, [1, 5]], patches[:, [1, 5]]) and full[:, 0].abs().sum() == 0


def test_norm_pix_targets():
    model = M.create_model("deepmim_vit_small_patch16", norm_pix_loss=True, **TINY)
    t = model.pixel_targets(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(tiny_deepmim):
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)

    def loss_and_grads():
        tiny_deepmim.zero_grad()
        saved = []  # elements of every tensor autograd keeps for the backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = tiny_deepmim(imgs, 0.75, noise=noise)[0]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny_deepmim.named_parameters() if p.grad is not None}
        return loss.detach(), grads, sum(saved)

    plain_loss, plain, plain_saved = loss_and_grads()
    tiny_deepmim.set_grad_checkpointing(True)
    ckpt_loss, ckpt, ckpt_saved = loss_and_grads()
    assert ckpt_saved < plain_saved / 3  # block activations are recomputed, not kept
    assert torch.equal(plain_loss, ckpt_loss) and plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_targets_are_float32_under_autocast(norm_pix):
    model = M.create_model("deepmim_vit_small_patch16", **TINY, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32) * 3 + 1
    reference = model.pixel_targets(imgs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = model.pixel_targets(imgs)
        half = model.pixel_targets(imgs.bfloat16())  # even a bf16 image gives float32 statistics
    assert targets.dtype == torch.float32 and torch.equal(targets, reference)
    assert half.dtype == torch.float32


# -- the codebook target (Tab. 11): V logits per patch, cross-entropy on the masked patches -----------------------

VOCAB = 10


def codebook_model(**kwargs) -> M.MaskedAutoencoderDeepMIM:
    torch.manual_seed(0)
    return M.create_model("deepmim_vit_small_patch16", **TINY, pred_dim=VOCAB, loss_type="cross_entropy", **kwargs)


def test_codebook_cross_entropy_counts_masked_patches_only_per_block():
    model = codebook_model(loss_weights=[0.5, 2.0, 3.0])
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    ids = torch.randint(0, VOCAB, (2, 16))
    loss, losses, preds, mask = model(imgs, noise=noise, targets=ids)
    masked = mask.bool()
    for block, pred in preds.items():  # each decoder: mean cross-entropy of its logits on the masked patches' codes
        assert pred.shape == (2, 12, VOCAB)
        expected = torch.nn.functional.cross_entropy(pred.flatten(0, 1), ids[masked])  # masked, ascending order
        torch.testing.assert_close(losses[block], expected)
    torch.testing.assert_close(loss, 0.5 * losses[2] + 2.0 * losses[3] + 3.0 * losses[4])  # Eq. 2 unchanged
    other = torch.where(masked, ids, (ids + 1) % VOCAB)  # other codes on the visible patches: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(losses.values(), model(imgs, noise=noise, targets=other)[1].values()))
    first_masked = masked[0].nonzero()[0, 0]
    other[0, first_masked] = (other[0, first_masked] + 1) % VOCAB  # another code on one masked patch: every block moves
    changed = model(imgs, noise=noise, targets=other)[1]
    assert all(not torch.equal(changed[b], losses[b]) for b in losses)


def test_codebook_decoders_that_output_the_true_codes_score_zero():
    model = codebook_model()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    ids = torch.randint(0, VOCAB, (2, 16))

    def one_hot_of(codes: torch.Tensor):
        """A decoder whose logits are (a large multiple of) the one-hot of `codes` at the positions it predicts."""
        return lambda latent, ids_restore, ids_predict: 100.0 * torch.nn.functional.one_hot(
            codes.gather(1, ids_predict), VOCAB).float()

    for decoder in model.decoders.values():
        decoder.forward = one_hot_of(ids)
    _, losses, _, _ = model(imgs, noise=noise, targets=ids)
    assert all(float(v) < 1e-6 for v in losses.values())
    for decoder in model.decoders.values():
        decoder.forward = one_hot_of((ids + 1) % VOCAB)  # confidently wrong everywhere: ~100 nats
    _, losses, _, _ = model(imgs, noise=noise, targets=ids)
    assert all(float(v) > 99 for v in losses.values())
