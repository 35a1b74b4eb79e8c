"""DeepMIM† hybrid targets: Eq. 1 blending, the frozen MAE generator, target spaces, checkpoint layouts."""

import logging

import pytest
import torch

from models_deepmim import create_model, reconstruction_loss
from targets import hybrid
from targets.hybrid import (
    DEFAULT_ALPHAS,
    HybridGenerator,
    blend_targets,
    check_hybrid_args,
    infer_mae_config,
    to_target_space,
)
from util.checkpoint import save_atomic
from util.patches import gather_tokens, normalize_patches, patchify

STUDENT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
               decoder_num_heads=4)
# A generator whose head count follows MAE's rule (width / 64), so a released-layout file rebuilds it exactly.
GENERATOR = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=16)


def imgs_and_noise(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(n, 3, 32, 32), torch.rand(n, 16)


def save_project_generator(path, norm_pix_loss: bool, **overrides) -> torch.nn.Module:
    torch.manual_seed(2)
    model = create_model("mae_vit_base_patch16", **{**GENERATOR, **overrides}, norm_pix_loss=norm_pix_loss)
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 0, "args": {}}, path)
    return model


def released_mae_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This project's MAE weights under the released MAE key names (decoder_embed, decoder_blocks.N, ...)."""
    prefix = f"decoders.{model.supervised_blocks[-1]}."
    names = {"embed": "decoder_embed", "mask_token": "mask_token", "blocks": "decoder_blocks", "norm": "decoder_norm",
             "pred": "decoder_pred", "pos_embed": "decoder_pos_embed"}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            part, _, rest = key[len(prefix):].partition(".")
            key = names[part] + (f".{rest}" if rest else "")
        out[key] = value
    return out


@pytest.fixture
def generator_path(tmp_path):
    path = tmp_path / "mae_tiny.pth"
    save_project_generator(path, norm_pix_loss=False)
    return path


# -- arguments ----------------------------------------------------------------------------------------------------


def test_check_hybrid_args(tmp_path, generator_path):
    blocks = (6, 8, 10, 12)
    assert check_hybrid_args(None, None, blocks) == (1, 1, 1, 1)  # plain DeepMIM
    assert check_hybrid_args(str(generator_path), None, blocks) == DEFAULT_ALPHAS == (0, 1 / 3, 2 / 3, 1)
    missing = tmp_path / "mae_visualize_vit_base.pth"
    with pytest.raises(ValueError, match=f"--hybrid_generator {missing} does not exist"):
        check_hybrid_args(str(missing), None, blocks)
    with pytest.raises(ValueError, match=r"--hybrid_alphas needs one value per supervised block \[6, 8, 10, 12\]"):
        check_hybrid_args(str(generator_path), (0, 0.5, 1), blocks)
    with pytest.raises(ValueError, match=r"--hybrid_alphas must lie in \[0, 1\]"):
        check_hybrid_args(str(generator_path), (0, 0.5, 1, 1.5), blocks)
    with pytest.raises(ValueError, match="--hybrid_alphas .* needs --hybrid_generator"):
        check_hybrid_args(None, (0, 0.5, 1, 1), blocks)


def test_blend_targets_is_eq1_with_exact_endpoints():
    x, x_hat = torch.randn(2, 16, 192), torch.randn(2, 16, 192)
    out = blend_targets(x, x_hat, (0, 1 / 3, 1), (2, 3, 4))
    assert torch.equal(out[4], x) and torch.equal(out[2], x_hat)
    torch.testing.assert_close(out[3], x / 3 + 2 * x_hat / 3)
    with pytest.raises(ValueError, match="2 alphas for 3 blocks"):
        blend_targets(x, x_hat, (0, 1), (2, 3, 4))


# -- the generator -----------------------------------------------------------------------------------------------


def test_generator_sees_the_students_mask_and_alpha0_targets_its_prediction(generator_path):
    imgs, noise = imgs_and_noise()
    generator = HybridGenerator.from_file(generator_path, student_norm_pix=False)
    seen = {}
    forward_encoder = generator.model.forward_encoder

    def spy(*args, **kwargs):
        latents, masking = forward_encoder(*args, **kwargs)
        seen["mask"] = masking.mask
        return latents, masking

    generator.model.forward_encoder = spy
    x_hat = generator.reconstruct(imgs, noise, mask_ratio=0.75)
    assert x_hat.shape == (2, 16, 192) and not x_hat.requires_grad

    torch.manual_seed(3)
    student = create_model("deepmim_vit_small_patch16", **STUDENT, supervised_blocks=(2, 4))
    pixels = patchify(imgs, 8)
    targets = blend_targets(pixels, x_hat, (0, 1), (2, 4))
    _, losses, preds, mask = student(imgs, 0.75, noise=noise, targets=targets)
    assert torch.equal(seen["mask"], mask)  # the generator reconstructed the image the student sees
    ids_masked = mask.nonzero()[:, 1].view(2, -1)  # ascending masked positions, as the predictions are ordered
    assert torch.equal(losses[2], reconstruction_loss(preds[2], gather_tokens(x_hat, ids_masked)))  # alpha = 0
    _, plain_losses, _, _ = student(imgs, 0.75, noise=noise)  # plain pixel targets
    assert torch.equal(losses[4], plain_losses[4])  # alpha = 1


def test_reconstruction_is_the_mae_forward_with_the_same_noise(generator_path):
    imgs, noise = imgs_and_noise()
    generator = HybridGenerator.from_file(generator_path, student_norm_pix=False)
    latents, masking = generator.model.forward_encoder(imgs, 0.75, noise)
    expected = generator.model.decoder_for(2)(latents[2], masking.ids_restore)
    assert torch.equal(generator.reconstruct(imgs, noise, 0.75), expected)
    other = generator.reconstruct(imgs, torch.rand(2, 16), 0.75)
    assert not torch.equal(other, expected)  # another mask, another reconstruction


def test_target_space_conversion_uses_the_true_patch_statistics(tmp_path):
    imgs, noise = imgs_and_noise()
    patches = patchify(imgs, 8)
    # A perfect raw prediction of x becomes exactly the norm-pix target of x, and the two maps invert each other.
    torch.testing.assert_close(to_target_space(patches, patches, False, True), normalize_patches(patches))
    pred = torch.randn_like(patches)
    roundtrip = to_target_space(to_target_space(pred, patches, True, False), patches, False, True)
    torch.testing.assert_close(roundtrip, pred, rtol=1e-5, atol=1e-5)

    path = tmp_path / "mae_normpix.pth"
    save_project_generator(path, norm_pix_loss=True)
    native = HybridGenerator.from_file(path, student_norm_pix=True).reconstruct(imgs, noise, 0.75)  # no conversion
    raw = HybridGenerator.from_file(path, student_norm_pix=False).reconstruct(imgs, noise, 0.75)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    torch.testing.assert_close(raw, native * (var + 1e-6) ** 0.5 + mean)


def test_generator_is_frozen_and_outside_the_student(generator_path):
    imgs, noise = imgs_and_noise()
    generator = HybridGenerator.from_file(generator_path, student_norm_pix=False)
    before = {k: v.clone() for k, v in generator.model.state_dict().items()}
    student = create_model("deepmim_vit_small_patch16", **STUDENT)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    targets = blend_targets(patchify(imgs, 8), generator.reconstruct(imgs, noise, 0.75), DEFAULT_ALPHAS[1:],
                            student.supervised_blocks)
    loss, *_ = student(imgs, 0.75, noise=noise, targets=targets)
    loss.backward()
    optimizer.step()
    assert not isinstance(generator, torch.nn.Module) and not generator.model.training
    assert all(not p.requires_grad and p.grad is None for p in generator.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in generator.model.state_dict().items())
    generator_params = {id(p) for p in generator.model.parameters()}
    assert not any(id(p) in generator_params for group in optimizer.param_groups for p in group["params"])
    assert set(student.state_dict()) == set(create_model("deepmim_vit_small_patch16", **STUDENT).state_dict())


# -- files ------------------------------------------------------------------------------------------------------


def test_released_mae_layout_rebuilds_the_same_generator(tmp_path):
    reference = create_model("mae_vit_base_patch16", **GENERATOR)
    path = tmp_path / "mae_pretrain_vit_tiny_full.pth"
    save_atomic({"model": released_mae_state_dict(reference)}, path)
    generator = HybridGenerator.from_file(path, student_norm_pix=True)  # released files: norm-pix assumed (MAE)
    assert generator.generator_norm_pix
    imgs, noise = imgs_and_noise()
    expected = HybridGenerator(reference, generator_norm_pix=True, student_norm_pix=True).reconstruct(imgs, noise, 0.75)
    assert torch.equal(generator.reconstruct(imgs, noise, 0.75), expected)
    assert not HybridGenerator.from_file(path, student_norm_pix=True, generator_norm_pix=False).generator_norm_pix
    visualize = tmp_path / "mae_visualize_vit_tiny.pth"  # MAE's visualisation files predict raw pixels
    save_atomic({"model": released_mae_state_dict(reference)}, visualize)
    assert not HybridGenerator.from_file(visualize, student_norm_pix=True).generator_norm_pix


def test_infer_mae_config_uses_registered_head_counts():
    def shapes(patch, dim, depth, grid=14):
        keys = {"patch_embed.proj.weight": (dim, 3, patch, patch), "pos_embed": (1, grid * grid + 1, dim),
                "decoder_embed.weight": (512, dim), "blocks.0.mlp.fc1.weight": (4 * dim, dim)}
        keys.update({f"blocks.{i}.norm1.weight": (dim,) for i in range(depth)})
        keys.update({f"decoder_blocks.{i}.norm1.weight": (512,) for i in range(8)})
        return {k: torch.empty(s, device="meta") for k, s in keys.items()}

    base = infer_mae_config(shapes(16, 768, 12))
    assert base == dict(name="mae_vit_base_patch16", img_size=224, patch_size=16, embed_dim=768, depth=12,
                        num_heads=12, mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    huge = infer_mae_config(shapes(14, 1280, 32, grid=16))
    assert (huge["name"], huge["num_heads"], huge["img_size"]) == ("mae_vit_huge_patch14", 16, 224)  # not 1280/64


def test_bad_generator_files_are_named(tmp_path):
    reference = create_model("mae_vit_base_patch16", **GENERATOR)
    state = released_mae_state_dict(reference)
    del state["decoder_pred.weight"]
    path = tmp_path / "mae_truncated.pth"
    save_atomic({"model": state}, path)
    with pytest.raises(ValueError, match=rf"--hybrid_generator {path} .*decoders\.2\.pred\.weight"):
        HybridGenerator.from_file(path, student_norm_pix=False)
    encoder_only = tmp_path / "mae_pretrain_vit_base.pth"  # MAE's release without decoder
    save_atomic({"model": {k: v for k, v in state.items() if not k.startswith("decoder")}}, encoder_only)
    with pytest.raises(ValueError, match=rf"--hybrid_generator {encoder_only} is not an MAE .* decoder_embed\.weight"):
        HybridGenerator.from_file(encoder_only, student_norm_pix=False)
    clip_mae = tmp_path / "mae_clip.pth"
    save_project_generator(clip_mae, norm_pix_loss=False, pred_dim=24, loss_type="cosine")
    with pytest.raises(ValueError, match=rf"--hybrid_generator {clip_mae} predicts 24-d features, not pixels"):
        HybridGenerator.from_file(clip_mae, student_norm_pix=False)


def test_student_mismatch_is_rejected(generator_path):
    generator = HybridGenerator.from_file(generator_path, student_norm_pix=False)
    with pytest.raises(ValueError, match=f"--hybrid_generator {generator_path} uses patch 8 on a \\(4, 4\\) grid"):
        generator.check_student(16, (14, 14))
    with pytest.raises(ValueError, match="--hybrid_generator"):
        generator.reconstruct(torch.randn(1, 3, 64, 64), torch.rand(1, 64), 0.75)


# -- the generator's grid, checked from the file before any compute (issue 13, item 7) ----------------------------


def test_generator_grid_is_checked_from_the_file_without_building_a_model(tmp_path, generator_path, monkeypatch):
    released = tmp_path / "mae_visualize_tiny.pth"  # no model_cfg: the grid comes from the tensor shapes
    save_atomic({"model": released_mae_state_dict(create_model("mae_vit_base_patch16", **GENERATOR))}, released)
    bare_cfg = tmp_path / "mae_default.pth"  # a model_cfg without sizes: the registry's patch 16 at 224 px
    save_atomic({"model": {}, "model_cfg": {"name": "mae_vit_base_patch16"}}, bare_cfg)

    def no_model(*args, **kwargs):
        raise AssertionError("the check must not build a model")

    monkeypatch.setattr(hybrid, "create_model", no_model)
    monkeypatch.setattr(hybrid, "model_from_config", no_model)
    assert hybrid.generator_geometry(generator_path) == hybrid.generator_geometry(released) == (8, (4, 4))
    assert hybrid.generator_geometry(bare_cfg) == (16, (14, 14))
    for path in (generator_path, released):
        hybrid.check_generator_file(path, patch_size=8, input_size=32)  # the student's grid: accepted
        with pytest.raises(ValueError) as error:  # student --input_size 64 with a 32-px generator
            hybrid.check_generator_file(path, patch_size=8, input_size=64)
        message = str(error.value)
        assert message.startswith(f"--hybrid_generator {path} uses patch 8 on a (4, 4) grid (32 px images)")
        assert "the student uses patch 8 on a (8, 8) grid (--input_size 64 --patch_size 8)" in message
    with pytest.raises(ValueError, match=r"--hybrid_generator .* on a \(14, 14\) grid .* \(2, 2\) grid"):
        hybrid.check_generator_file(bare_cfg, patch_size=16, input_size=32)


def test_generator_grid_check_names_bad_files(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"--hybrid_generator {broken}: {broken} is not a PyTorch checkpoint"):
        hybrid.check_generator_file(broken, patch_size=8, input_size=32)
    encoder_only = tmp_path / "mae_pretrain_vit_base.pth"
    save_atomic({"model": {"pos_embed": torch.zeros(1, 17, 8)}}, encoder_only)
    with pytest.raises(ValueError, match=f"--hybrid_generator {encoder_only} is not an MAE checkpoint with a decoder"):
        hybrid.check_generator_file(encoder_only, patch_size=8, input_size=32)
    classifier = tmp_path / "finetuned.pth"
    save_atomic({"model": {}, "model_cfg": {"name": "vit_base_patch16"}}, classifier)
    with pytest.raises(ValueError, match=f"--hybrid_generator {classifier}: unknown model 'vit_base_patch16'"):
        hybrid.check_generator_file(classifier, patch_size=8, input_size=32)


# -- the load report is logged once (issue 13, item 9) -------------------------------------------------------------


def test_generator_load_report_is_logged_once(tmp_path, caplog):
    model = create_model("mae_vit_base_patch16", **GENERATOR)
    path = tmp_path / "mae_extra.pth"
    save_atomic({"model": {**model.state_dict(), "teacher.proj.weight": torch.zeros(2)}, "model_cfg": model.config},
                path)
    with caplog.at_level(logging.DEBUG):
        HybridGenerator.from_file(path, student_norm_pix=False)
    lines = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage() or "missing" in r.getMessage()]
    assert len(lines) == 1 and "teacher.proj.weight" in lines[0], lines
