"""Frozen teachers: CLIP against open_clip (an independent implementation), DINO, file formats, bad files."""

import os
import pickle
import warnings
import zipfile

import open_clip  # test-only dependency: the reference CLIP implementation
import pytest
import timm
import torch
import torch.nn.functional as F

from targets.teachers import (
    CLIP_MEAN,
    CLIP_STD,
    build_teacher,
    load_teacher_weights,
    read_torchscript_weights,
)
from util.datasets import IMAGENET_MEAN, IMAGENET_STD


def imagenet_normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


class OpenAIArchive(torch.nn.Module):
    """Holds a CLIP image tower as `visual`, like OpenAI's full CLIP model, so its keys read `visual.*`."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.visual.proj  # any traceable forward: the archive stores every parameter anyway


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    """open_clip's ViT-B-16 (QuickGELU) with random weights, rounded to fp16 as OpenAI ships them, every parameter
    perturbed (LayerNorms included); its features for one image; the weights written as an OpenAI state dict
    (`visual.*` keys, fp16; the text tower's keys are left out, the loader ignores them) and as a TorchScript
    archive."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    visual = model.visual.eval()
    with torch.no_grad():
        for p in visual.parameters():
            if p.ndim <= 1:  # LayerNorms and biases start constant; the matrices are already random
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.half().float())
    pixels = torch.rand(1, 3, 224, 224)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    visual.output_tokens = True
    with torch.no_grad():
        _, tokens = visual((pixels - mean) / std)  # patch tokens after ln_post, cls dropped
        expected = tokens @ visual.proj  # the released DeepMIM code projects every token
    folder = tmp_path_factory.mktemp("clip")
    state_path = folder / "ViT-B-16-state.pt"
    torch.save({f"visual.{k}": v.half() for k, v in visual.state_dict().items()}, state_path)
    archive_path = folder / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's file still is one
        archive = torch.jit.trace(OpenAIArchive(visual).half(), torch.randn(1, 768).half(), check_trace=False)
        torch.jit.save(archive, str(archive_path))
    visual.float()
    return dict(pixels=pixels, expected=expected, state_path=state_path, archive_path=archive_path)


@pytest.mark.parametrize("file", ["state_path", "archive_path"])
def test_clip_teacher_matches_open_clip_per_token_features(openai_clip, file):
    teacher = build_teacher("clip", openai_clip[file], grid_size=(14, 14))
    out = teacher(imagenet_normalise(openai_clip["pixels"]))  # re-normalised from ImageNet to CLIP statistics
    assert out.shape == (1, 196, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, openai_clip["expected"], rtol=1e-4, atol=1e-4)


def test_torchscript_reader_equals_jit_load_without_running_the_archive(openai_clip):
    ours = read_torchscript_weights(openai_clip["archive_path"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference = torch.jit.load(str(openai_clip["archive_path"]), map_location="cpu").state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) and ours[k].dtype == torch.float16 for k in reference)


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_torchscript_reader_refuses_code(tmp_path):
    """A zip shaped like a TorchScript archive whose pickle calls os.system: refused, and nothing runs."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Exploit(str(marker)), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(ValueError, match=f"{path}.*refusing to load (posix|os|nt).system"):
        load_teacher_weights(path)
    assert not marker.exists()


def tiny_vit(**kwargs) -> timm.models.VisionTransformer:
    """timm's test ViT (patch 16, width 64): stands in for ViT-B in fast tests."""
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, **kwargs).eval()


def test_dino_teacher_from_official_layout_resizes_to_the_student_grid(tmp_path):
    reference = tiny_vit(num_classes=0, img_size=64)
    path = tmp_path / "dino_vit_tiny_pretrain.pth"
    torch.save(reference.state_dict(), path)  # DINO's .pth: a plain state dict with timm key names
    teacher = build_teacher("dino", path, grid_size=(4, 4), model_name="test_vit")
    assert teacher.input_size == (64, 64) and teacher.out_dim == 64
    pixels = torch.rand(2, 3, 32, 32)  # a 32-px student with patch 8: grid 4x4, the teacher sees 64 px
    out = teacher(imagenet_normalise(pixels))
    resized = F.interpolate(imagenet_normalise(pixels), size=(64, 64), mode="bicubic", antialias=True)
    with torch.no_grad():
        expected = reference.forward_features(resized)[:, 1:]  # DINO keeps ImageNet statistics; cls dropped
    assert out.shape == (2, 16, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_teacher_is_frozen_and_not_a_module(tmp_path):
    path = tmp_path / "clip_tiny.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_vit(num_classes=24, img_size=64).state_dict(), str(path))  # timm layout, head = projection
    teacher = build_teacher("clip", path, grid_size=(4, 4), model_name="test_vit")
    assert not isinstance(teacher, torch.nn.Module)  # cannot become a submodule of the student
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    out = teacher(torch.randn(2, 3, 32, 32, requires_grad=True))
    assert out.shape == (2, 16, 24) and not out.requires_grad


def test_clip_statistics_are_openai_values():
    assert CLIP_MEAN == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert CLIP_STD == pytest.approx((0.26862954, 0.26130258, 0.27577711))


def test_mismatched_file_names_file_layout_and_keys(tmp_path):
    path = tmp_path / "dino_as_clip.pth"
    torch.save(tiny_vit(num_classes=0, img_size=64).state_dict(), path)  # no projection head
    expected = rf"{path}.*clip teacher.*OpenAI/open_clip keys.*missing: head\.bias, head\.weight"
    with pytest.raises(ValueError, match=expected):
        build_teacher("clip", path, grid_size=(4, 4), model_name="test_vit")
    other = tmp_path / "not_a_vit.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match=rf"{other}.*dino.*unexpected: encoder\.weight"):
        build_teacher("dino", other, grid_size=(4, 4), model_name="test_vit")


def test_missing_and_unsafe_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_teacher("clip", tmp_path / "nowhere.pt", grid_size=(14, 14))
    unsafe, marker = tmp_path / "pickled.pth", tmp_path / "pwned"
    torch.save({"model": {"args": _Exploit(str(marker))}}, unsafe)
    with pytest.raises(ValueError, match=str(unsafe)):
        build_teacher("dino", unsafe, grid_size=(4, 4), model_name="test_vit")
    assert not marker.exists()


def test_weights_for_another_grid_are_resampled(tmp_path):
    path = tmp_path / "dino_224.pth"
    torch.save(tiny_vit(num_classes=0, img_size=224).state_dict(), path)  # 14x14 position embedding
    teacher = build_teacher("dino", path, grid_size=(4, 4), model_name="test_vit")
    assert teacher.model.pos_embed.shape == (1, 1 + 16, 64) and not teacher.model.pos_embed.is_meta
    assert torch.isfinite(teacher(torch.randn(1, 3, 32, 32))).all()


def test_nested_and_prefixed_checkpoints_are_unwrapped(tmp_path):
    """DINO's full checkpoints keep the backbone under 'teacher' with a 'backbone.' prefix next to its head."""
    path = tmp_path / "dino_full.pth"
    cls_token = torch.randn(1, 1, 64)
    torch.save({"teacher": {"backbone.cls_token": cls_token, "head.last_layer.weight": torch.zeros(2)}}, path)
    weights = load_teacher_weights(path)
    assert weights.keys() == {"cls_token"} and torch.equal(weights["cls_token"], cls_token)
