"""Reconstruction figures (analysis/visualize.py): panels, un-normalisation of per-patch-normalised predictions,
the TensorBoard grid and the labelled PNG."""

import pytest
import torch
from PIL import Image

from analysis.visualize import (
    TITLE_PX,
    estimate_patch_stats,
    grid_png_size,
    grid_tensor,
    patches_to_display,
    reconstruction_panels,
    save_grid_png,
)
from models_deepmim import create_model, random_masking
from util.datasets import denormalize
from util.patches import normalize_patches, patchify


def tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=4)
    return create_model("deepmim_vit_small_patch16", **{**cfg, **overrides}).eval()


def test_panels_one_per_decoder_with_visible_patches_pasted():
    model = tiny_model(norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    panels = reconstruction_panels(model, imgs, noise, mask_ratio=0.75)
    assert list(panels) == ["original", "masked", "block 2", "block 3", "block 4"]  # decoders on blocks 2, 3, 4
    mask = random_masking(noise, 0.75).mask.bool()
    original = patchify(denormalize(imgs), 8)
    for name, panel in panels.items():
        assert panel.shape == (2, 3, 32, 32) and panel.min() >= 0 and panel.max() <= 1
        shown = patchify(panel, 8)
        if name != "original":
            assert torch.allclose(shown[~mask], original[~mask], atol=1e-6)  # visible patches are the original
        if name.startswith("block"):
            assert not torch.allclose(shown[mask], original[mask], atol=1e-2)  # masked ones are predictions
    assert torch.allclose(patchify(panels["masked"], 8)[mask], torch.full_like(original[mask], 0.5))


@pytest.mark.parametrize("patch_stats", ["visible", "target"])
def test_unnormalising_a_perfect_prediction_recovers_the_image(patch_stats):
    # The prediction is the exact normalised target. With the true statistics ("target") any image comes back;
    # with statistics estimated from visible patches ("visible"), an image whose patches share mean and variance.
    model = tiny_model(norm_pix_loss=True)
    if patch_stats == "target":
        imgs = torch.randn(2, 3, 32, 32)
    else:
        imgs = torch.randn(1, 3, 8, 8).repeat(2, 1, 4, 4)  # one patch tiled: every patch has the same mean/var
    patches = patchify(imgs, 8)
    mask = random_masking(torch.rand(2, 16), 0.75).mask
    pred = normalize_patches(patches)[mask.bool()].reshape(2, 12, -1)
    shown = patches_to_display(pred, mask, patches, model, patch_stats)
    assert torch.allclose(shown, denormalize(imgs), atol=1e-4)


def test_visible_statistics_come_from_neighbours_or_the_whole_image():
    # 4x4 grid; patch k has mean k and a variance growing with k. Patch 0 is masked with visible neighbours 1, 4, 5;
    # patch 15 is masked and so are all its neighbours (10, 11, 14): it falls back to the visible patches' average.
    means = torch.arange(16.0)
    patches = means.view(1, 16, 1) + torch.tensor([-1.0, 1.0]).repeat(3).view(1, 1, 6) * means.sqrt().view(1, 16, 1)
    mask = torch.zeros(1, 16)
    mask[0, [0, 10, 11, 14, 15]] = 1
    mean, var = estimate_patch_stats(patches, mask, (4, 4))
    visible = [i for i in range(16) if i not in (0, 10, 11, 14, 15)]
    true_var = patches.var(-1)[0]
    assert mean[0, 0, 0].item() == pytest.approx((1 + 4 + 5) / 3)
    assert var[0, 0, 0].item() == pytest.approx(true_var[[1, 4, 5]].mean().item())
    assert mean[0, 15, 0].item() == pytest.approx(means[visible].mean().item())
    assert var[0, 15, 0].item() == pytest.approx(true_var[visible].mean().item())


def test_hybrid_targets_get_their_own_panels():
    model = tiny_model(norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    targets = {b: model.pixel_targets(imgs) for b in model.supervised_blocks}
    panels = reconstruction_panels(model, imgs, noise, 0.75, hybrid_targets=targets, patch_stats="target")
    assert [k for k in panels if k.startswith("target")] == ["target block 2", "target block 3", "target block 4"]
    # The pixel target itself, un-normalised with its own statistics, is the original image.
    assert torch.allclose(panels["target block 2"], panels["original"], atol=1e-4)


def test_pixel_models_only():
    model = tiny_model(pred_dim=10)
    with pytest.raises(ValueError, match="only for pixel targets"):
        reconstruction_panels(model, torch.randn(1, 3, 32, 32), torch.rand(1, 16), 0.75)
    with pytest.raises(ValueError, match="patch_stats"):
        reconstruction_panels(tiny_model(), torch.randn(1, 3, 32, 32), torch.rand(1, 16), 0.75, patch_stats="x")


def test_grid_tensor_has_a_row_per_image_and_a_column_per_panel():
    panels = {name: torch.rand(3, 3, 32, 32) for name in ("original", "masked", "block 2", "block 4")}
    grid = grid_tensor(panels, padding=2)
    assert grid.shape == (3, 3 * 34 + 2, 4 * 34 + 2)
    assert torch.equal(grid[:, 2:34, 2 + 34:34 + 34], panels["masked"][0])  # row 0, column 1


def test_png_has_the_expected_size_with_one_panel_per_decoder(tmp_path):
    model = tiny_model()
    panels = reconstruction_panels(model, torch.randn(3, 3, 32, 32), torch.rand(3, 16), 0.75)
    num_panels = 2 + len(model.supervised_blocks)
    path = save_grid_png(panels, tmp_path / "grid.png", panel_px=64)
    with Image.open(path) as png:
        assert png.size == grid_png_size(3, num_panels, 64) == (num_panels * 64, 3 * 64 + TITLE_PX)
        # Column c shows panel c: sample the middle of the first row's "original" panel against the tensor.
        pixel = torch.tensor(png.convert("RGB").getpixel((32, TITLE_PX + 32)), dtype=torch.float32) / 255
    assert torch.allclose(pixel, panels["original"][0, :, 16, 16], atol=0.02)
