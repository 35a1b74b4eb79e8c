"""Frozen tokenizers of the codebook target (targets/tokenizers.py): nearest-code search against brute force, BEiT v2's
VQ-KD against timm's BEiT (an independent implementation with the release's key names), strict file checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VQKD_TINY, vqkd_state, write_vqkd_file
from timm.models.beit import Beit

from targets.tokenizers import build_tokenizer, nearest_code
from util.datasets import normalize_on_device


def brute_force_cosine(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """For each vector, the code with the largest cosine, one pair at a time."""
    best = []
    for vector in z:
        scores = [float(torch.dot(vector, code) / (vector.norm() * code.norm())) for code in codebook]
        best.append(max(range(len(scores)), key=scores.__getitem__))
    return torch.tensor(best)


def test_codebook_nearest_code_equals_brute_force_cosine():
    torch.manual_seed(0)
    z, codebook = torch.randn(50, 8), torch.randn(40, 8) * torch.rand(40, 1)  # codes of unequal length
    expected = brute_force_cosine(z, codebook)
    assert torch.equal(nearest_code(z, codebook), expected)
    assert torch.equal(nearest_code(z, codebook, chunk=7), expected)  # the memory-bounded search is the same
    # the release's rule (norm_ema_quantizer.py): smallest squared distance between l2-normalised vectors
    zn, en = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    distance = zn.pow(2).sum(1, keepdim=True) + en.pow(2).sum(1) - 2 * zn @ en.T
    assert torch.equal(distance.argmin(dim=1), expected)


def reference_vqkd_tokens(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """What the release computes for [0, 1] images (VQKD.get_tokens): [-1, 1] input, BEiT encoder patch tokens
    after fc_norm, Linear-Tanh-Linear, nearest code by cosine (brute force); run by timm's BEiT."""
    encoder = Beit(img_size=pixels.shape[-1], num_classes=0, global_pool="avg", use_abs_pos_emb=True,
                   use_rel_pos_bias=False, init_values=None, **VQKD_TINY).eval()
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    with torch.no_grad():
        tokens = encoder.fc_norm(encoder.forward_features(pixels * 2 - 1)[:, 1:])
        hidden = torch.tanh(F.linear(tokens, state["encode_task_layer.0.weight"], state["encode_task_layer.0.bias"]))
        z = F.linear(hidden, state["encode_task_layer.2.weight"], state["encode_task_layer.2.bias"])
    return brute_force_cosine(z.flatten(0, 1), state["quantize.embedding.weight"]).view(z.shape[:2])


def test_codebook_vqkd_file_with_the_release_keys_gives_the_releases_tokens(tmp_path):
    path = write_vqkd_file(tmp_path / "vqkd_encoder_base_decoder_3x768x12_clip.pth")
    tokenizer = build_tokenizer(path, grid_size=(4, 4), model_name="test_vit")
    assert (tokenizer.vocab_size, tokenizer.grid_size, tokenizer.encoder.input_size) == (40, (4, 4), (64, 64))
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    imgs = normalize_on_device(pixels, "cpu").requires_grad_(True)  # what the training step hands to targets
    ids = tokenizer(imgs)
    assert ids.dtype == torch.int64 and ids.shape == (3, 16) and not ids.requires_grad
    assert torch.equal(ids, reference_vqkd_tokens(vqkd_state(), pixels.float() / 255))
    assert len(ids.unique()) > 1  # a test on a constant output would prove little
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast reaches neither projection nor search
        assert torch.equal(tokenizer(imgs), ids)
    assert all(not p.requires_grad for p in (*tokenizer.encoder.model.parameters(), *tokenizer.projection.parameters()))


def test_codebook_tokenizer_of_another_grid_resamples_its_position_embedding(tmp_path):
    path = write_vqkd_file(tmp_path / "vqkd_224.pth", grid=14)  # the release's 14 x 14 grid
    tokenizer = build_tokenizer(path, grid_size=(4, 4), model_name="test_vit")
    assert tokenizer.encoder.model.pos_embed.shape == (1, 17, 64)
    ids = tokenizer(torch.randn(2, 3, 32, 32))  # a 32-px student with patch 8: the tokenizer sees 64 px
    assert ids.shape == (2, 16) and 0 <= int(ids.min()) and int(ids.max()) < 40


def test_codebook_file_of_another_tokenizer_is_refused_naming_the_missing_keys(tmp_path):
    vqgan = tmp_path / "vqgan_imagenet_f16_16384.ckpt"  # taming-transformers' VQGAN layout (PeCo's family)
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                               "quant_conv.weight": torch.zeros(256, 256, 1, 1),
                               "quantize.embedding.weight": torch.zeros(16, 256)}}, vqgan)
    with pytest.raises(ValueError, match=rf"{vqgan} does not match the VQ-KD tokenizer.*missing: encode_task_layer"
                                         r".*encoder\.blocks\.0\.attn\.q_bias.*unexpected: encoder\.conv_in\.weight"):
        build_tokenizer(vqgan, grid_size=(4, 4), model_name="test_vit")

    layer_scale = vqkd_state()  # a BEiT encoder with layer scale is another architecture
    layer_scale["encoder.blocks.0.gamma_1"] = torch.ones(64)
    torch.save(layer_scale, tmp_path / "gamma.pth")
    with pytest.raises(ValueError, match=r"unexpected: encoder\.blocks\.0\.gamma_1"):
        build_tokenizer(tmp_path / "gamma.pth", grid_size=(4, 4), model_name="test_vit")

    narrow = vqkd_state()  # a codebook narrower than the projection
    narrow["quantize.embedding.weight"] = torch.randn(40, 4)
    torch.save(narrow, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"wrong shape: encode_task_layer\.2\.bias \(8,\) vs \(4,\)"):
        build_tokenizer(tmp_path / "narrow.pth", grid_size=(4, 4), model_name="test_vit")

    odd_grid = vqkd_state()  # 17 patch positions: no square grid to resample from
    odd_grid["encoder.pos_embed"] = torch.randn(1, 18, 64)
    torch.save(odd_grid, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth .*wrong shape: encoder\.pos_embed \(1, 18, 64\) vs \(1, 17, 64\)"):
        build_tokenizer(tmp_path / "odd.pth", grid_size=(4, 4), model_name="test_vit")

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_tokenizer(tmp_path / "nowhere.pth", grid_size=(4, 4))
