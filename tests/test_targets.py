"""Reconstruction targets: argument checks, pixel/HOG values, and 2 training steps of a tiny model per target."""

import pytest
import timm
import torch
from conftest import write_vqkd_file

from models_deepmim import create_model
from targets.build import TARGETS, HogTarget, PixelTarget, build_target, check_target_args
from targets.hog import hog_targets
from util.datasets import normalize_on_device
from util.patches import normalize_patches, patchify

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=4)


def teacher_file(tmp_path, name: str) -> str:
    """A tiny teacher written the way the real files are: timm's test ViT (patch 16) at the 64-px input a 4x4 grid
    needs; CLIP in timm's layout with a 24-d projection head, DINO as a plain state dict without head."""
    torch.manual_seed(1)
    num_classes = 24 if name == "clip" else 0
    model = timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=64)
    path = tmp_path / f"{name}_tiny.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def make_target(name: str, tmp_path, norm_pix_loss: bool = False):
    teacher_path = teacher_file(tmp_path, name) if name in ("clip", "dino") else None
    if name == "codebook":  # BEiT v2's VQ-KD, 40 codes (tests/conftest.py)
        teacher_path = str(write_vqkd_file(tmp_path / "vqkd_tiny.pth"))
    return build_target(name, patch_size=8, img_size=32, norm_pix_loss=norm_pix_loss, teacher_path=teacher_path,
                        teacher_model="test_vit" if teacher_path else None)


def batch(n: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    return normalize_on_device(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), "cpu")


# -- argument checks ---------------------------------------------------------------------------------------------


def test_check_target_args_names_flags_and_values(tmp_path):
    with pytest.raises(ValueError, match="--target 'vq'.*pixel, hog, clip, dino"):
        check_target_args("vq", None)
    with pytest.raises(ValueError, match="--target clip needs --teacher_path"):
        check_target_args("clip", None)
    missing = tmp_path / "ViT-B-16.pt"
    with pytest.raises(ValueError, match=f"--teacher_path {missing} does not exist"):
        check_target_args("dino", str(missing))
    with pytest.raises(ValueError, match="--teacher_path is only read by --target clip / dino / codebook"):
        check_target_args("pixel", str(missing))
    with pytest.raises(ValueError, match=r"--target codebook needs --teacher_path .*tokenizer \(BEiT v2's VQ-KD\)"):
        check_target_args("codebook", None)
    with pytest.raises(ValueError, match="--target hog needs a patch size that is a multiple of 8"):
        check_target_args("hog", None, patch_size=14)
    check_target_args("hog", None, patch_size=16)  # fine


def test_wrong_teacher_file_is_named(tmp_path):
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": {"decoder_embed.weight": torch.zeros(2, 2)}}, path)  # an MAE file, not a teacher
    with pytest.raises(ValueError, match=rf"--teacher_path {path} does not match the dino teacher"):
        build_target("dino", patch_size=8, img_size=32, teacher_path=str(path), teacher_model="test_vit")


# -- values -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_pixel_target_is_the_models_own(norm_pix_loss):
    imgs = batch()
    target = PixelTarget(patch_size=8, norm_pix_loss=norm_pix_loss)
    model = create_model("deepmim_vit_small_patch16", **TINY, norm_pix_loss=norm_pix_loss)
    assert target.pred_dim == 192 == model.pred_dim and target.loss_type == "mse"
    expected = normalize_patches(patchify(imgs, 8)) if norm_pix_loss else patchify(imgs, 8)
    assert torch.equal(target(imgs), expected) and torch.equal(target(imgs), model.pixel_targets(imgs))


def test_hog_target_reads_the_8bit_pixels_behind_normalised_images():
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    target = HogTarget(patch_size=16)
    out = target(normalize_on_device(pixels, "cpu"))
    assert target.pred_dim == 108 and target.loss_type == "mse"  # 2x2 cells x 3 channels x 9 bins
    assert torch.equal(out, hog_targets(pixels.float(), 16, window=16))  # exact: no bin flips from rounding noise


def test_targets_have_no_gradient_and_the_right_shape(tmp_path):
    imgs = batch().requires_grad_(True)
    for name, dim, loss in (("pixel", 192, "mse"), ("hog", 27, "mse"), ("clip", 24, "cosine"), ("dino", 64, "cosine")):
        target = make_target(name, tmp_path)
        out = target(imgs)
        assert (target.name, target.pred_dim, target.loss_type) == (name, dim, loss)
        assert out.shape == (4, 16, dim) and not out.requires_grad and torch.isfinite(out).all()
        assert out.dtype == torch.float32
    codebook = make_target("codebook", tmp_path)  # one code id per patch out of V = 40, predicted as 40 logits
    ids = codebook(imgs)
    assert (codebook.name, codebook.pred_dim, codebook.loss_type) == ("codebook", 40, "cross_entropy")
    assert ids.shape == (4, 16) and ids.dtype == torch.int64 and not ids.requires_grad
    assert 0 <= int(ids.min()) and int(ids.max()) < 40


# -- training -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TARGETS)
def test_every_target_trains_two_steps(name, tmp_path):
    target = make_target(name, tmp_path)
    torch.manual_seed(0)
    model = create_model("deepmim_vit_small_patch16", **TINY, pred_dim=target.pred_dim, loss_type=target.loss_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    teacher = getattr(target, "teacher", None) or getattr(getattr(target, "tokenizer", None), "encoder", None)
    frozen = {k: v.clone() for k, v in teacher.model.state_dict().items()} if teacher else {}
    imgs = batch()
    for _ in range(2):
        loss, losses, preds, _ = model(imgs, mask_ratio=0.75, targets=target(imgs))
        assert torch.isfinite(loss) and set(losses) == {2, 3, 4}
        assert all(p.shape == (4, 12, target.pred_dim) for p in preds.values())  # 12 of 16 patches masked
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if teacher:  # frozen, outside the student's checkpoint and optimizer
        teacher_params = {id(p) for p in teacher.model.parameters()}
        assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in frozen.items())
        assert not any(id(p) in teacher_params for group in optimizer.param_groups for p in group["params"])
        assert len(model.state_dict()) == len(create_model("deepmim_vit_small_patch16", **TINY).state_dict())
