"""engine_pretrain: every reconstruction target is computed in float32 with autocast off, in one place."""

from __future__ import annotations

import pytest
import torch

from engine_pretrain import compute_targets
from targets.build import HogTarget
from targets.hybrid import blend_targets
from util.patches import normalize_patches, patchify


def teacher_like(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A frozen network that opens its own bf16 autocast (as targets/teachers.py does) and normalises its output."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8 * 8 * 3, 16)
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
        features = layer(patchify(imgs, 8))
    return torch.nn.functional.layer_norm(features, (16,))


def hybrid_like(imgs: torch.Tensor, noise: torch.Tensor) -> dict[int, torch.Tensor]:
    """Eq. 1 blend of per-patch normalised pixels and a reconstruction."""
    pixels = normalize_patches(patchify(imgs, 8))
    x_hat = normalize_patches(patchify(imgs.flip(-1), 8))
    return blend_targets(pixels, x_hat, (0.0, 1 / 3, 1.0), (2, 3, 4))


@pytest.mark.parametrize("targets_fn", [lambda imgs, noise: HogTarget(8)(imgs), teacher_like, hybrid_like],
                         ids=["hog", "teacher", "hybrid"])
def test_targets_under_bf16_autocast_equal_float32_ones(targets_fn):
    imgs, noise = torch.randn(2, 3, 32, 32) * 2, torch.rand(2, 16)
    reference = compute_targets(targets_fn, imgs, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = compute_targets(targets_fn, imgs, noise)
        unguarded = targets_fn(imgs, noise)
    as_dict = (lambda t: t) if isinstance(reference, dict) else (lambda t: {0: t})
    for block, target in as_dict(inside).items():
        assert target.dtype == torch.float32
        assert torch.equal(target, as_dict(reference)[block]), block
    if targets_fn is teacher_like:  # its own autocast would hand bf16 features to the loss without the cast
        assert unguarded.dtype == torch.bfloat16


def test_no_targets_means_the_models_own_pixels():
    assert compute_targets(None, torch.zeros(1, 3, 32, 32), torch.zeros(1, 16)) is None


def test_codebook_ids_stay_integers_under_autocast():
    """Token ids are exact in any precision: only floating-point targets are cast to float32."""
    ids = torch.randint(0, 8192, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compute_targets(lambda imgs, noise: ids, torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    assert out.dtype == torch.int64 and torch.equal(out, ids)


@pytest.mark.parametrize("target", ["hog", "clip", "codebook"])
def test_start_up_memory_estimate_feeds_the_runs_own_targets(target, image_folder, tmp_path, monkeypatch, caplog):
    """The estimate on CUDA crashed for every HOG / CLIP run (108- / 24-wide predictions met 192-wide pixel
    targets). It now runs the run's targets function and masking strategy on its dummy batches and counts the
    frozen teacher (or tokenizer: integer code ids, cross-entropy). Device queries mocked; the model and the teacher
    are real."""
    import timm
    from conftest import TINY_FLAGS, vqkd_state, write_vqkd_file

    import engine_pretrain
    import main_pretrain
    from targets import masking

    flags = ["--data_path", str(image_folder), *TINY_FLAGS, "--target", target, "--batch_size", "64"]
    teacher = None
    if target == "clip":  # timm's test ViT as a CLIP teacher with a 24-d projection (tests/test_masking.py)
        teacher = timm.create_model("test_vit", pretrained=False, num_classes=24, img_size=64)
        torch.save(teacher.state_dict(), tmp_path / "clip.pth")
        flags += ["--teacher_path", str(tmp_path / "clip.pth"), "--teacher_model", "test_vit",
                  "--mask_strategy", "semantic_aware"]
    if target == "codebook":  # BEiT v2's VQ-KD with the release's key names (tests/conftest.py)
        flags += ["--teacher_path", str(write_vqkd_file(tmp_path / "vqkd.pth")), "--teacher_model", "test_vit"]
    args = main_pretrain.parse_args(flags)
    args.device, args.amp = "cpu", "none"
    device = torch.device("cpu")
    built = engine_pretrain.build_target(args, device)
    model = engine_pretrain.build_model(args, built.pred_dim, built.loss_type)
    targets_fn = engine_pretrain.build_targets_fn(args, built, model, device)
    mask_fn = masking.build_mask_strategy(args.mask_strategy, masking.mask_teacher_from_args(args),
                                          grid_size=model.grid_size, target=built, device=device)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    with caplog.at_level("WARNING"):
        estimate = engine_pretrain.warn_if_memory_short(model, args, device, 1, targets_fn, mask_fn,
                                                        frozen_owners=[built])
    assert estimate is not None and "failed" not in caplog.text
    expected_frozen = sum(t.numel() * 4 for t in teacher.state_dict().values()) if teacher is not None else 0
    if target == "codebook":  # the tokenizer's encoder, projection and codebook (its decoder is never built)
        read = ("encoder.", "encode_task_layer.", "quantize.embedding.weight")
        expected_frozen = sum(v.numel() * 4 for k, v in vqkd_state().items() if k.startswith(read))
    assert estimate.frozen == pytest.approx(expected_frozen, rel=0.02)  # the teacher, counted once
    assert estimate.activations_per_image > 0
