"""Masking strategies (targets/masking.py, paper Tab. 12): random masking is exactly the masking of before; MILAN's
semantic-aware masking samples visible patches without replacement in proportion to a frozen teacher's class-token
attention, through the noise interface, in pre-training (main_pretrain.py) and in tools/visualize.py."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest
import timm
import torch
from conftest import ROOT, TINY, TINY_FLAGS, write_image_folder, write_vqkd_file
from PIL import Image

import main_pretrain
import models_deepmim
from analysis.visualize import MASK_GREY, grid_png_size
from engine_pretrain import reconstructions
from targets import masking, teachers
from targets.masking import (
    RandomMasking,
    SemanticAwareMasking,
    TeacherPass,
    build_mask_strategy,
    class_token_attention,
    last_block_qkv,
    resample_attention,
    resolve_mask_teacher,
    sampling_noise,
)
from util.checkpoint import load_checkpoint, save_atomic
from util.patches import patchify, random_masking

GRID = (4, 4)  # the tiny student: 32 px, patch 8
L = 16


def teacher_file(tmp_path, kind: str = "clip", seed: int = 1, model: torch.nn.Module | None = None) -> str:
    """A random-weight teacher as tests/test_targets.py writes them: timm's test ViT (patch 16, 64 wide, 6 blocks,
    2 heads) at the 64 px a 4x4 grid needs; CLIP with a 24-d projection head, DINO without head."""
    torch.manual_seed(seed)
    model = model or timm.create_model("test_vit", pretrained=False, num_classes=24 if kind == "clip" else 0,
                                       img_size=64)
    path = tmp_path / f"{kind}_{seed}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def fixed(weights: torch.Tensor) -> SemanticAwareMasking:
    """Semantic-aware masking whose 'teacher' returns these weights (N, L) for any batch."""
    return SemanticAwareMasking(lambda imgs: weights.expand(imgs.shape[0], -1), GRID, GRID)


# -- random: today's masks -----------------------------------------------------------------------------------------


def todays_noise(batch_size: int, num_patches: int) -> torch.Tensor:
    """A copy of the RNG call `MaskedAutoencoderDeepMIM.make_noise` made before masking strategies existed."""
    return torch.rand(batch_size, num_patches, device="cpu")


def test_random_strategy_makes_todays_noise_with_the_same_rng_calls(tiny_deepmim):
    torch.manual_seed(7)
    expected = [todays_noise(3, L) for _ in range(2)] + [torch.rand(1)]  # and the RNG state afterwards
    strategy = RandomMasking(L)
    for draw in (lambda: strategy(images(3)), lambda: tiny_deepmim.make_noise(3, "cpu")):
        torch.manual_seed(7)
        got = [draw(), draw(), torch.rand(1)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(random_masking(got[0], 0.75).mask, random_masking(expected[0], 0.75).mask)
    uniform = torch.rand(3, L)
    assert strategy(images(3), uniform) is uniform  # handed uniforms (seeded figures) pass through


def tiny_args(data, out, *extra: str):
    return main_pretrain.parse_args([
        "--data_path", str(data), "--output_dir", str(out), "--model", "deepmim_vit_small_patch16", *TINY_FLAGS,
        "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--blr", "1e-3",
        "--print_freq", "1", "--norm_pix_loss", *extra])


@pytest.fixture
def two_steps(tmp_path):
    return write_image_folder(tmp_path / "images", num_images=8)  # batch 4: two steps an epoch


def test_default_run_trains_exactly_as_the_models_own_noise(two_steps, tmp_path, monkeypatch):
    """The default (--mask_strategy random) against the engine's path of before (no strategy: model.make_noise)."""
    with_strategy = main_pretrain.main(tiny_args(two_steps, tmp_path / "a"))
    assert isinstance(masking.build_mask_strategy("random", None, grid_size=GRID), RandomMasking)
    monkeypatch.setattr(masking, "build_mask_strategy", lambda *args, **kwargs: None)
    before = main_pretrain.main(tiny_args(two_steps, tmp_path / "b"))
    assert with_strategy.stats == before.stats
    for key, value in before.model.state_dict().items():
        assert torch.equal(value, with_strategy.model.state_dict()[key]), key


def test_logged_reconstructions_use_the_runs_strategy(tiny_deepmim):
    """The TensorBoard / demo panels draw their seeded uniforms through the strategy: random gives the figure of
    before, semantic-aware the mask its weights pick."""
    dataset = [(img, 0) for img in images(3)]
    before = reconstructions(tiny_deepmim, dataset, None, 0.75)
    same = reconstructions(tiny_deepmim, dataset, None, 0.75, mask_noise_fn=RandomMasking(L))
    assert all(torch.equal(before[k], same[k]) for k in before)
    weights = torch.zeros(L)
    weights[:4] = 1  # all the weight on patches 0-3: exactly those are visible
    semantic = reconstructions(tiny_deepmim, dataset, None, 0.75, mask_noise_fn=fixed(weights / 4))
    grey = patchify(semantic["masked"], 8).eq(MASK_GREY).all(-1)  # (N, L) removed patches
    assert not grey[:, :4].any() and grey[:, 4:].all()


# -- semantic-aware: exact counts and sampling law ----------------------------------------------------------------


@pytest.mark.parametrize("mask_ratio", [0.75, 0.6, 0.5])
def test_semantic_aware_keeps_exactly_int_L_times_1_minus_r(mask_ratio):
    weights = torch.rand(4, L) ** 4
    weights[0] = 0
    weights[0, 3] = 1  # one patch holds all the attention: the others still fill the visible set
    weights = weights / weights.sum(-1, keepdim=True)
    for seed in range(5):
        torch.manual_seed(seed)
        kept = random_masking(fixed(weights)(images()), mask_ratio)
        visible = int(L * (1 - mask_ratio))
        assert ((1 - kept.mask).sum(1) == visible).all() and kept.ids_keep.shape == (4, visible)
        assert all(len(set(row.tolist())) == visible for row in kept.ids_keep)
        assert (kept.ids_keep[0] == 3).any()
    others = {tuple(random_masking(fixed(weights)(images()), 0.75).ids_keep[0].sort().values.tolist())
              for _ in range(20)}
    assert len(others) > 1  # the patches without attention are drawn at random, not in index order


CHI2_999 = {5: 20.515, 9: 27.877}  # chi-square quantiles at 0.999 (df 5, 9): a correct sampler fails 1 run in 1000


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_first_pick_frequency_is_proportional_to_the_weights():
    """k = 1 (6 patches, mask ratio 0.8): the visible patch is i with probability w_i / sum(w), exactly."""
    w = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.2, 0.3], dtype=torch.float64)
    draws = 120_000
    torch.manual_seed(0)
    noise = sampling_noise(torch.rand(draws, 6, dtype=torch.float64), w.expand(draws, -1))
    kept = random_masking(noise, 0.8).ids_keep  # the model's own selection: the smallest noise
    assert kept.shape == (draws, 1)
    counts = torch.bincount(kept[:, 0], minlength=6).double()
    assert chi_square(counts, w / w.sum()) < CHI2_999[5]
    wrong = torch.full((6,), 1 / 6, dtype=torch.float64)  # the test can tell: uniform picks are rejected
    assert chi_square(counts, wrong) > 100 * CHI2_999[5]


def sequential_pair_probabilities(w: torch.Tensor) -> dict[tuple[int, int], float]:
    """Exact law of the visible SET of k = 2 drawn one after the other without replacement, proportionally to w:
    P({i, j}) = w_i/W * w_j/(W - w_i) + w_j/W * w_i/(W - w_j)."""
    total = float(w.sum())
    return {(i, j): float(w[i] / total * w[j] / (total - w[i]) + w[j] / total * w[i] / (total - w[j]))
            for i, j in itertools.combinations(range(len(w)), 2)}


def test_visible_sets_follow_sequential_sampling_without_replacement():
    """k = 2 of 5: the frequency of every visible pair matches the exact enumeration; inclusion is not w itself."""
    w = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    draws = 100_000
    torch.manual_seed(1)
    noise = sampling_noise(torch.rand(draws, 5, dtype=torch.float64), w.expand(draws, -1))
    kept = random_masking(noise, 0.6).ids_keep.sort(dim=1).values  # int(5 * 0.4) = 2 visible
    exact = sequential_pair_probabilities(w)
    codes = kept[:, 0] * 5 + kept[:, 1]
    counts = torch.tensor([float((codes == i * 5 + j).sum()) for i, j in exact], dtype=torch.float64)
    assert chi_square(counts, torch.tensor(list(exact.values()), dtype=torch.float64)) < CHI2_999[9]
    inclusion = [sum(p for pair, p in exact.items() if i in pair) for i in range(5)]
    assert inclusion[0] < 2 * float(w[0]) - 0.05  # 0.69 < 0.8: sampling without replacement saturates


# -- the teacher's class-token attention ---------------------------------------------------------------------------


def test_class_token_attention_equals_a_naive_softmax_on_a_random_vit():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    block = model.blocks[-1]
    inputs, probs = [], []
    block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: probs.append(args[0]))
    with torch.no_grad(), last_block_qkv(model) as captured:
        features = model.forward_features(x)
        block.attn.fused_attn = False  # timm's explicit path: it forms softmax(q k^T * scale), seen at attn_drop
        assert torch.allclose(model.forward_features(x), features, atol=1e-5)
    ours = class_token_attention(block.attn, captured[0], model.num_prefix_tokens)
    # naive, from the block's input: LayerNorm, qkv as a matrix product, one head at a time
    h = block.norm1(inputs[0])
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    heads, d = block.attn.num_heads, 64 // block.attn.num_heads
    rows = []
    for head in range(heads):
        q = qkv[:, 0, head * d:(head + 1) * d]
        k = qkv[:, :, 64 + head * d:64 + (head + 1) * d]
        rows.append(torch.softmax(torch.einsum("nd,ntd->nt", q, k) / d**0.5, dim=-1))
    naive = torch.stack(rows).mean(0)[:, 1:]
    torch.testing.assert_close(ours, naive / naive.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    timm_rows = probs[0][:, :, 0].mean(1)[:, 1:]
    torch.testing.assert_close(ours, timm_rows / timm_rows.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert ours.shape == (3, 16) and torch.allclose(ours.sum(-1), torch.ones(3))


def attending_teacher(chosen: list[int], sharpness: float = 0.25) -> torch.nn.Module:
    """A DINO-layout test ViT whose class token attends to `chosen` patches in its last block, whatever the image:
    patch embedding zeroed (tokens = position embeddings), blocks 1-5 made identities, chosen patches' position
    embedding +u, the others -u, and in the last block q = sharpness * LayerNorm(u) for every token, k = its input."""
    torch.manual_seed(3)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64)
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_(), model.patch_embed.proj.bias.zero_()
        for block in model.blocks[:-1]:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_(), layer.bias.zero_()
        u = torch.randn(64)
        u = (u - u.mean()) / u.std(unbiased=False)
        signs = torch.tensor([1.0 if i in chosen else -1.0 for i in range(16)])
        model.pos_embed[0, 1:] = signs[:, None] * u
        last = model.blocks[-1]
        last.norm1.weight.fill_(1), last.norm1.bias.zero_()
        last.attn.qkv.weight.zero_(), last.attn.qkv.bias.zero_()
        last.attn.qkv.weight[64:128] = torch.eye(64)  # k = the normalised token
        last.attn.qkv.bias[:64] = sharpness * u  # q: the same for every token
    return model


def test_high_attention_patches_are_kept_more_often(tmp_path):
    chosen = [0, 5, 10, 15]
    path = teacher_file(tmp_path, "dino", model=attending_teacher(chosen))
    spec = resolve_mask_teacher("semantic_aware", "dino", path, "test_vit")
    strategy = build_mask_strategy("semantic_aware", spec, grid_size=GRID)
    imgs = images(1000)
    weights = strategy.weights(imgs)
    others = [i for i in range(16) if i not in chosen]
    assert torch.allclose(weights, weights[:1].expand_as(weights))  # the image does not matter here
    assert weights[0, chosen].min() > 10 * weights[0, others].max()
    torch.manual_seed(0)
    visible = 1 - random_masking(strategy(imgs), 0.75).mask  # 4 of 16 visible
    # weights 0.207 (chosen) vs 0.014: about 3 of the 4 visible patches are chosen ones (uniform masking: 1 of 4)
    assert visible[:, chosen].mean() > 0.6 and visible[:, others].mean() < 0.15
    torch.manual_seed(0)
    uniform = 1 - random_masking(RandomMasking(16)(imgs), 0.75).mask
    assert abs(float(uniform[:, chosen].mean()) - 0.25) < 0.03  # random masking does not prefer them


def test_attention_on_another_grid_is_resampled_to_the_students():
    uniform = torch.full((2, 64), 1 / 64)
    assert torch.allclose(resample_attention(uniform, (8, 8), GRID), torch.full((2, 16), 1 / 16))
    peaked = torch.zeros(1, 8, 8)
    peaked[0, 6:, 6:] = 1  # the bottom-right student patch's 2x2 teacher patches
    moved = resample_attention(peaked.flatten(1), (8, 8), GRID)
    assert moved.argmax() == 15 and moved[0, 15] > 0.5 and torch.allclose(moved.sum(), torch.tensor(1.0))
    wide = SemanticAwareMasking(lambda imgs: uniform[:1].expand(imgs.shape[0], -1), (8, 8), GRID)
    assert wide(images(3)).shape == (3, 16)


# -- one teacher forward serves target and mask ---------------------------------------------------------------------


def test_teacher_pass_gives_the_teachers_features_once_per_batch(tmp_path):
    teacher = teachers.build_teacher("clip", teacher_file(tmp_path), grid_size=GRID, model_name="test_vit")
    shared = TeacherPass(teacher)
    imgs = images()
    features, attention = shared.run(imgs)
    assert torch.equal(features, teacher(imgs)) and attention.shape == (4, 16)
    assert torch.equal(shared(imgs), features) and torch.equal(shared.attention(imgs), attention)
    assert shared.forwards == 1
    imgs.add_(1)  # changed in place: computed again
    assert not torch.equal(shared(imgs), features) and shared.forwards == 2


def count_teacher_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = teachers.FrozenTeacher.__call__

    def counted(self, imgs):
        calls[0] += 1
        return original(self, imgs)

    monkeypatch.setattr(teachers.FrozenTeacher, "__call__", counted)
    return calls


@pytest.mark.parametrize("target, same_file, forwards", [("clip", True, 2), ("clip", False, 4), ("pixel", False, 2),
                                                         ("codebook", False, 4)],
                         ids=["clip-target-shared", "clip-target-other-file", "pixel-target", "codebook-target"])
def test_two_steps_through_main_with_semantic_aware_masking(two_steps, tmp_path, monkeypatch, target, same_file,
                                                            forwards):
    clip = teacher_file(tmp_path)
    mask_flags = ["--mask_strategy", "semantic_aware"]
    if target == "clip":
        extra = ["--target", "clip", "--teacher_path", clip, "--teacher_model", "test_vit", *mask_flags]
        if not same_file:
            extra += ["--mask_teacher_path", teacher_file(tmp_path, seed=2)]
    else:
        extra = [*mask_flags, "--mask_teacher", "clip", "--mask_teacher_path", clip, "--mask_teacher_model", "test_vit"]
    if target == "codebook":  # the tokenizer's encoder is a FrozenTeacher too, never the masking one: 2 + 2 forwards
        extra += ["--target", "codebook", "--teacher_path", str(write_vqkd_file(tmp_path / "vqkd.pth")),
                  "--teacher_model", "test_vit"]
    calls = count_teacher_calls(monkeypatch)
    result = main_pretrain.main(tiny_args(two_steps, tmp_path / "run", *extra))
    assert calls[0] == forwards  # 2 steps: one teacher forward each when the target's teacher also masks
    assert all(torch.isfinite(torch.tensor(v)) for v in result.stats.values())
    state = load_checkpoint(tmp_path / "run" / "checkpoint-last.pth")
    assert state["args"]["mask_strategy"] == "semantic_aware"
    assert not any("teacher" in k for k in state["model"])
    if target == "pixel":  # a resume with another strategy is another experiment: refused, naming the flag
        with pytest.raises(ValueError, match="--mask_strategy: 'semantic_aware' -> 'random'"):
            main_pretrain.main(tiny_args(two_steps, tmp_path / "again", "--resume", str(tmp_path / "run" /
                                         "checkpoint-0.pth"), "--epochs", "2", "--resume_allow_changes", "epochs"))


BAD_FLAGS = [
    (["--mask_strategy", "semantic"], "--mask_strategy"),
    (["--mask_strategy", "semantic_aware"], "--mask_teacher"),
    (["--mask_strategy", "semantic_aware", "--mask_teacher", "dino"], "--mask_teacher_path"),
    (["--mask_strategy", "semantic_aware", "--mask_teacher", "clip", "--mask_teacher_path", "/nonexistent/c.pt"],
     "--mask_teacher_path /nonexistent/c.pt"),
    (["--mask_strategy", "semantic_aware", "--mask_teacher", "sift"], "--mask_teacher"),
    (["--mask_teacher", "clip"], "--mask_strategy semantic_aware"),
    (["--mask_teacher_path", "{clip}"], "--mask_strategy semantic_aware"),
    (["--teacher_model", "test_vit"], "--teacher_model is only read by --target clip / dino"),
    (["--mask_strategy", "semantic_aware", "--mask_teacher", "clip", "--mask_teacher_path", "{clip}",
      "--mask_teacher_model", "vit_nonexistent"], "--mask_teacher_model"),
    (["--target", "clip", "--teacher_path", "{clip}", "--mask_strategy", "semantic_aware", "--mask_teacher", "dino"],
     "--mask_teacher_path"),
    # a codebook's tokenizer is no masking teacher: semantic-aware masking names its own
    (["--target", "codebook", "--teacher_path", "{clip}", "--mask_strategy", "semantic_aware"],
     "needs --mask_teacher (one of clip, dino; pre-training defaults it to a clip / dino --target, not codebook)"),
]


@pytest.mark.parametrize("extra, flag", BAD_FLAGS)
def test_bad_masking_flags_exit_naming_the_flag(two_steps, tmp_path, capsys, extra, flag):
    clip = teacher_file(tmp_path)
    with pytest.raises(SystemExit) as stop:
        tiny_args(two_steps, tmp_path / "run", *[a.replace("{clip}", clip) for a in extra])
    assert stop.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_teacher_file_of_another_architecture_names_the_masking_flag(tmp_path):
    spec = resolve_mask_teacher("semantic_aware", "dino", teacher_file(tmp_path, "dino"))  # ViT-B expected
    with pytest.raises(ValueError, match="--mask_teacher_path .* does not match the dino teacher"):
        build_mask_strategy("semantic_aware", spec, grid_size=GRID)


# -- the figure ----------------------------------------------------------------------------------------------------


def test_visualize_draws_both_strategies_masks_on_the_same_images(tmp_path):
    spec = importlib.util.spec_from_file_location("tool_visualize", ROOT / "tools" / "visualize.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    model = models_deepmim.create_model("deepmim_vit_small_patch16", **TINY, norm_pix_loss=True)
    ckpt = tmp_path / "deepmim.pth"
    save_atomic({"model": model.state_dict(), "model_cfg": model.config, "epoch": 1, "args": {}}, ckpt)
    data = write_image_folder(tmp_path / "images", num_images=3)

    def run(out, *extra):
        argv = ["--ckpt", str(ckpt), "--names", "m", "--data_path", str(data), "--num_images", "3", "--device",
                "cpu", "--num_workers", "0", "--panel_px", "32", "--output_dir", str(tmp_path / out), *extra]
        return tool.main(tool.get_args_parser().parse_args(argv))

    plain = run("plain")["checkpoints"]["m"]
    both = run("both", "--mask_strategy", "random", "semantic_aware", "--mask_teacher", "dino",
               "--mask_teacher_path", teacher_file(tmp_path, "dino"), "--mask_teacher_model", "test_vit")
    result = both["checkpoints"]["m"]
    blocks = ["block 2", "block 3", "block 4"]
    assert result["panels"] == ["original", *[f"{p} (random)" for p in ["masked", *blocks]],
                                *[f"{p} (semantic_aware)" for p in ["attention", "masked", *blocks]]]
    with Image.open(tmp_path / "both" / "recon_m.png") as png:
        assert png.size == grid_png_size(3, 10, 32)
    assert both["mask_strategy"] == ["random", "semantic_aware"]
    by = result["by_strategy"]
    assert by["random"]["masked_patches"] == plain["masked_patches"] == result["masked_patches"]  # default kept
    assert by["semantic_aware"]["masked_patches"] != by["random"]["masked_patches"]
    assert all(len(p) == 12 for p in by["semantic_aware"]["masked_patches"])
    saved = json.loads((tmp_path / "both" / "recon.json").read_text())
    assert saved["checkpoints"]["m"]["by_strategy"].keys() == {"random", "semantic_aware"}
