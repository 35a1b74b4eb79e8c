"""The analytic FLOP counter (analysis/flops.py): a hand computation for the tiny config, torch's own FlopCounterMode
on real forward and backward passes, and the scaling of encoder FLOPs with the number of visible tokens."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY, write_vqkd_file
from torch.utils.flop_counter import FlopCounterMode

import models_deepmim as M
from analysis import flops
from targets.build import CodebookTarget, TeacherTarget
from targets.hybrid import HybridGenerator
from targets.teachers import FrozenTeacher
from targets.tokenizers import build_tokenizer


def unfused_attention(module: torch.nn.Module) -> torch.nn.Module:
    """FlopCounterMode does not see inside CPU fused attention; the explicit q @ k^T and attn @ v it does see."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return module


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_tiny_config_matches_hand_computation(tiny_deepmim):
    # TINY: 32x32 images, patch 8 -> L = 16, mask 0.75 -> 4 visible, 12 masked; encoder D = 64, 4 blocks,
    # MLP 256; taps (2, 3, 4); each decoder: width 32, 1 block, MLP 128, head 8*8*3 = 192.
    L, vis, masked, D, Dd, C = 16, 4, 12, 64, 32, 192

    def block(tokens: int, dim: int) -> int:
        linears = 2 * tokens * (dim * 3 * dim + dim * dim + dim * 4 * dim + 4 * dim * dim)  # qkv, proj, fc1, fc2
        return linears + 2 * 2 * tokens * tokens * dim  # q k^T and attn v

    encoder = 2 * L * (8 * 8 * 3) * D + 4 * block(1 + vis, D)
    decoder = 2 * (1 + vis) * D * Dd + block(1 + L, Dd) + 2 * masked * Dd * C
    assert (encoder, decoder) == (2_384_896, 622_720)  # the arithmetic written out once

    parts = flops.mim_forward_flops(tiny_deepmim, 0.75)
    assert parts == {"encoder": encoder, "decoder_b2": decoder, "decoder_b3": decoder, "decoder_b4": decoder}
    step = flops.step_flops(tiny_deepmim, batch_size=5, mask_ratio=0.75)
    assert step.trained_forward == 5 * (encoder + 3 * decoder)
    assert step.frozen_forward == 0
    assert step.total == 3 * step.trained_forward


def test_forward_and_backward_match_torch_flop_counter(tiny_deepmim):
    model = unfused_attention(tiny_deepmim)
    imgs = torch.randn(3, 3, 32, 32)
    noise = model.make_noise(3, "cpu")
    step = flops.step_flops(model, batch_size=3, mask_ratio=0.75)
    assert counted(lambda: model(imgs, 0.75, noise)) == step.trained_forward

    total = counted(lambda: model(imgs, 0.75, noise)[0].backward())
    # The only difference: the patch embedding computes no gradient for the images (one conv-sized product
    # less per image, see analysis/flops.py).
    assert total == step.total - 3 * flops.patch_embed_flops(model.patch_embed.proj, model.num_patches)


@pytest.mark.parametrize("name", ["mae_vit_small_patch16", "deepmim_vit_small_patch16"])
def test_shared_and_single_decoder_models_are_counted_per_pass(name):
    model = unfused_attention(M.create_model(name, **TINY, shared_decoder=name.startswith("deepmim") or None))
    imgs = torch.randn(2, 3, 32, 32)
    assert counted(lambda: model(imgs, 0.75)) == flops.step_flops(model, 2, 0.75).trained_forward


def test_encoder_flops_scale_with_visible_tokens(tiny_deepmim):
    model = tiny_deepmim
    patch = flops.patch_embed_flops(model.patch_embed.proj, model.num_patches)
    per_token = 2 * sum(p.numel() for n, p in model.blocks.named_parameters() if n.endswith("weight") and p.ndim == 2)
    for visible in (1, 4, 8, 12, 15):
        tokens = 1 + visible
        expected = patch + tokens * per_token + model.depth * 4 * tokens**2 * 64
        assert flops.encoder_flops(model, visible) == expected
    # fewer visible tokens -> fewer encoder FLOPs; the decoder blocks always see all tokens
    low, high = flops.mim_forward_flops(model, 0.75), flops.mim_forward_flops(model, 0.5)
    assert low["encoder"] < high["encoder"]
    dec = model.decoder_for(4)
    blocks_only = sum(flops.block_flops(b, 1 + model.num_patches) for b in dec.blocks)
    for parts, visible in ((low, 4), (high, 8)):
        head = flops.linear_flops(16 - visible, dec.pred)
        assert parts["decoder_b4"] == flops.linear_flops(1 + visible, dec.embed) + blocks_only + head


def test_teacher_and_generator_forward_counted_once(tiny_deepmim):
    imgs = torch.randn(2, 3, 32, 32)
    vit = unfused_attention(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=48))
    teacher = FrozenTeacher(vit, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), project=True)
    target = TeacherTarget("clip", teacher)
    assert counted(lambda: target(imgs)) == 2 * flops.frozen_forward_flops(target=target)

    mae = unfused_attention(M.create_model("mae_vit_small_patch16", **TINY))
    generator = HybridGenerator(mae, generator_norm_pix=True, student_norm_pix=True)
    noise = tiny_deepmim.make_noise(2, "cpu")
    assert counted(lambda: generator.reconstruct(imgs, noise, 0.75)) == 2 * flops.frozen_forward_flops(
        generator=generator, mask_ratio=0.75
    )

    step = flops.step_flops(tiny_deepmim, 2, 0.75, target=target, generator=generator)
    frozen = 2 * (flops.frozen_forward_flops(target=target) + flops.frozen_forward_flops(generator=generator))
    assert step.frozen_forward == step.parts["frozen"] == frozen
    assert step.total == 3 * step.trained_forward + frozen  # frozen parts: forward only


def test_codebook_tokenizer_forward_counted_once(tmp_path):
    """VQ-KD: encoder ViT, projection of every patch token, and every token against all 40 codes (8 wide)."""
    tokenizer = build_tokenizer(write_vqkd_file(tmp_path / "vqkd.pth"), grid_size=(4, 4), model_name="test_vit")
    unfused_attention(tokenizer.encoder.model)
    target = CodebookTarget(tokenizer)
    assert counted(lambda: target(torch.randn(2, 3, 32, 32))) == 2 * flops.frozen_forward_flops(target=target)
    assert flops.tokenizer_forward_flops(tokenizer) - flops.vit_forward_flops(tokenizer.encoder.model) == \
        2 * 16 * (64 * 64 + 64 * 8) + 2 * 16 * 40 * 8


def test_bad_arguments_fail_before_counting(tiny_deepmim):
    with pytest.raises(ValueError, match="batch_size"):
        flops.step_flops(tiny_deepmim, 0)
    with pytest.raises(ValueError, match="mask_ratio"):
        flops.step_flops(tiny_deepmim, 2, mask_ratio=1.0)
