"""Frozen teacher networks whose per-token features are reconstruction targets (paper Tab. 2, Tab. 11).

- clip: OpenAI's CLIP ViT-B/16 image tower, built with timm (`vit_base_patch16_clip_quickgelu_224`). Each token is
  taken after the final LayerNorm and the 768 -> 512 projection, as the released DeepMIM code does
  (`ln_post(x) @ proj` on every token). timm's converter stores OpenAI's `proj` as `head` (weight = proj^T, zero
  bias), so the projection here is `model.head` applied to every token, not only to the pooled one.
- dino: DINO's ViT-B/16 (`vit_base_patch16_224`, the layout of timm's `.dino` weights and of DINO's official
  `dino_vitbase16_pretrain.pth`), tokens after the final LayerNorm (768-d).

Teachers are plain objects, never `nn.Module` submodules of the student: their weights are not in the student's
state dict, checkpoint or optimizer. They run in eval mode with `requires_grad=False` under `torch.no_grad()` (not
`inference_mode`: inference tensors cannot enter the student's autograd graph) and, on CUDA, bf16/fp16 autocast.

Grids: the teacher sees the image at `student_grid * teacher_patch` pixels, so its token grid is the student's
patch grid (224 px with patch 16 for both: no resize). When that size differs from the student's input size the
images are resized (bicubic, antialiased) and timm resamples the teacher's position embedding once at load time.

Weights come only from a local file (`--teacher_path`): a TorchScript archive (OpenAI's `ViT-B-16.pt`), a
safetensors file (timm or open_clip), or a `torch.save` file (state dict with OpenAI/open_clip `visual.*` keys,
timm keys, or DINO's official `.pth`), read with `weights_only=True`.

TorchScript archives are NOT loaded with `torch.jit.load`: that compiles and may run code stored in the archive
(PyTorch itself refuses `weights_only=True` for them). `read_torchscript_weights` instead unpickles the archive's
`data.pkl` with an allow-list (TorchScript class stand-ins, tensor rebuilding, storages) and reads the raw storages
from the zip, so a file can only ever produce tensors; anything else is refused with an error naming the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.jit._pickle
import torch.nn.functional as F
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from util.amp import autocast_dtype_for
from util.checkpoint import load_checkpoint
from util.datasets import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

TeacherKind = Literal["clip", "dino"]

# CLIP's pixel statistics (OpenAI); the one place this project names them (timm defines the numbers).
CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
CLIP_PROJ_DIM = 512  # OpenAI ViT-B/16's joint embedding width, used when a file does not reveal it


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher kind is: its timm architecture, input statistics, whether tokens are projected, and the file
    layouts accepted (quoted in errors)."""

    model: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    project: bool
    layout: str


TEACHERS: dict[str, TeacherSpec] = {
    "clip": TeacherSpec(
        model="vit_base_patch16_clip_quickgelu_224",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        project=True,
        layout="a CLIP ViT image tower: OpenAI/open_clip keys (visual.conv1.weight, visual.class_embedding, "
        "visual.transformer.resblocks.N.*, visual.ln_post.*, visual.proj; e.g. OpenAI's ViT-B-16.pt) or timm keys "
        "(patch_embed.proj.weight, norm_pre.*, blocks.N.*, norm.*, head.weight)",
    ),
    "dino": TeacherSpec(
        model="vit_base_patch16_224",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        project=False,
        layout="a DINO ViT backbone with timm keys (cls_token, pos_embed, patch_embed.proj.weight, blocks.N.*, "
        "norm.*; e.g. DINO's dino_vitbase16_pretrain.pth or timm's vit_base_patch16_224.dino)",
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------------------------------


class _ScriptObject:
    """Stand-in for any TorchScript class in an archive: keeps the attribute dict the archive stores for it."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: tuple[torch.UntypedStorage, torch.dtype], offset: int, size: tuple, stride: tuple,
                    *_: Any) -> Tensor:
    """Stands in for torch._utils._rebuild_tensor_v2: a tensor viewing raw bytes read from the archive."""
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_TORCHSCRIPT_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    **{
        ("torch.jit._pickle", name): getattr(torch.jit._pickle, name)
        for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")
    },
}


class _TorchScriptWeightsUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl using only allow-listed globals; storages come from the zip."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a storage type names the dtype of the bytes it points to
        if (module, name) in _TORCHSCRIPT_GLOBALS:
            return _TORCHSCRIPT_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a tensor or TorchScript module")

    def persistent_load(self, pid: Any) -> tuple[torch.UntypedStorage, torch.dtype]:
        _, storage_type, key, _, numel = pid  # ('storage', dtype, record key, device, numel)
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if numel else torch.UntypedStorage(0)
        return untyped, storage_type  # a dtype, see find_class


def _torchscript_prefix(path: Path) -> str | None:
    """The record folder of a TorchScript archive (it holds constants.pkl next to data.pkl), else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    for name in names:
        folder = name.rsplit("/", 1)[0]
        if name.endswith("/data.pkl") and f"{folder}/constants.pkl" in names:
            return folder
    return None


def _script_tensors(obj: _ScriptObject, prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    state = obj.state if isinstance(getattr(obj, "state", None), Mapping) else {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            out.update(_script_tensors(value, f"{prefix}{key}."))
    return out


def read_torchscript_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The parameters and buffers of a TorchScript archive (e.g. OpenAI's ViT-B-16.pt), named as in its
    `state_dict()`, without compiling or running any of the archive's code (see the module docstring)."""
    path = Path(path)
    prefix = _torchscript_prefix(path)
    if prefix is None:
        raise ValueError(f"{path} is not a TorchScript archive")
    try:
        with zipfile.ZipFile(path) as archive:
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
                raise ValueError("big-endian archives are not supported")
            root = _TorchScriptWeightsUnpickler(archive, prefix).load()
    except Exception as err:  # refused globals, malformed records, corrupt zips: all reported with the file name
        raise ValueError(f"cannot read weights from the TorchScript archive {path}: {err}") from err
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"cannot read weights from the TorchScript archive {path}: it does not hold a module")
    return _script_tensors(root)


def _unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Find the tensors in a loaded file: nested under 'state_dict' / 'model' / 'teacher', prefixed 'module.' or
    'backbone.' (DDP / DINO checkpoints); non-tensor entries are dropped."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model", "teacher") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        return {}
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    for prefix in ("module.", "backbone."):
        if tensors and any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def load_teacher_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a teacher file: TorchScript archive, .safetensors, or torch.save file (weights_only=True).

    Raises FileNotFoundError for a missing file and ValueError naming the file when it cannot be read safely.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--teacher_path {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _unwrap_state_dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read the safetensors file {path}: {err}") from err
    if _torchscript_prefix(path) is not None:
        return read_torchscript_weights(path)
    return _unwrap_state_dict(load_checkpoint(path))


# --------------------------------------------------------------------------------------------------------------
# The frozen teacher
# --------------------------------------------------------------------------------------------------------------


def frozen_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast for frozen forward passes: bf16 on CUDA where native (compute capability >= 8.0), else fp16
    (`util.amp.autocast_dtype_for`); full precision elsewhere (it also switches off any CPU autocast the caller
    runs under, keeping CPU targets exact)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=autocast_dtype_for(device))
    return torch.autocast(device.type, enabled=False)


class FrozenTeacher:
    """A frozen timm ViT mapping ImageNet-normalised images to per-patch features on the student's grid.

    Call: imgs (N, 3, H, W), ImageNet-normalised -> (N, L, out_dim) float32, cls token dropped, row-major patch
    order (as `patchify`). Tokens are taken after the model's final norm: timm's `norm` before pooling, or its
    `fc_norm` for a mean-pooled ViT (`global_pool='avg'`, BEiT's layout, e.g. the VQ-KD tokenizer's encoder).
    """

    def __init__(
        self,
        model: VisionTransformer,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        project: bool,
    ):
        self.model = model.eval().requires_grad_(False)
        self.project = project
        self.input_size = tuple(model.patch_embed.img_size)
        self.grid_size = tuple(model.patch_embed.grid_size)
        # ImageNet-normalised -> [0, 1] -> the teacher's own normalisation, as one affine map per channel.
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self._scale = (in_std / torch.tensor(std)).view(1, 3, 1, 1)
        self._shift = ((in_mean - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1)
        self.to(next(model.parameters()).device)

    @property
    def out_dim(self) -> int:
        return self.model.num_classes if self.project else self.model.embed_dim

    def to(self, device: torch.device | str) -> FrozenTeacher:
        self.model.to(device)
        self._scale, self._shift = self._scale.to(device), self._shift.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, imgs: Tensor) -> Tensor:
        x = imgs.float() * self._scale + self._shift
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        with frozen_autocast(x.device):
            tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]
            tokens = getattr(self.model, "fc_norm", nn.Identity())(tokens)  # a mean-pooled ViT's final norm
            if self.project:
                tokens = self.model.head(tokens)  # CLIP's projection on every token (released DeepMIM code)
        return tokens.float()


def _projection_dim(weights: Mapping[str, Tensor]) -> int | None:
    """Width of CLIP's projection as stored in an OpenAI/open_clip (`visual.proj`: D x E) or timm (`head.weight`:
    E x D) file."""
    if "visual.proj" in weights:
        return weights["visual.proj"].shape[1]
    for key in ("head.weight", "visual.head.proj.weight"):
        if key in weights:
            return weights[key].shape[0]
    return None


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def key_mismatches(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, Tensor]) -> list[str]:
    """What keeps a file from loading into a network with `expected` {key: shape}: 'missing: ...', 'unexpected:
    ...', 'wrong shape: ...' (empty when it fits exactly)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k])}"
                        for k in set(expected) & set(weights) if tuple(expected[k]) != tuple(weights[k].shape))
    return [f"{name}: {_describe(keys)}" for name, keys in
            (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]


def _check_layout(path: Path, kind: str, model_name: str, model: VisionTransformer, weights: Mapping) -> None:
    """Raise ValueError naming the file, the expected layout and the keys that do not match."""
    problems = key_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()}, weights)
    if problems:
        raise ValueError(
            f"--teacher_path {path} does not match the {kind} teacher (timm {model_name!r}); expected "
            f"{TEACHERS[kind].layout}. Keys that did not match: {'; '.join(problems)}"
        )


def meta_vit(model_name: str, grid_size: tuple[int, int], **kwargs: Any) -> VisionTransformer:
    """The timm ViT `model_name` on the meta device (no memory, no initialisation), built for images of
    `grid_size` times its patch size, so that its token grid is `grid_size`."""
    with torch.device("meta"):
        patch = timm.create_model(model_name, pretrained=False).patch_embed.patch_size
        img_size = (grid_size[0] * patch[0], grid_size[1] * patch[1])
        return timm.create_model(model_name, pretrained=False, img_size=img_size, **kwargs)


def assign_weights(model: VisionTransformer, weights: Mapping[str, Tensor], model_name: str,
                   device: torch.device | str) -> VisionTransformer:
    """Load checked `weights` into a meta-device `model` as float32 (fp16 files too) and move it to `device`."""
    model.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(f"timm {model_name!r} holds tensors that no weight file provides; it cannot be a teacher")
    return model.to(device)


def build_teacher(
    kind: TeacherKind,
    path: str | os.PathLike,
    *,
    grid_size: tuple[int, int],
    device: torch.device | str = "cpu",
    model_name: str | None = None,
) -> FrozenTeacher:
    """Build a frozen teacher from a local weight file so that its token grid is `grid_size` (the student's).

    model_name: a timm architecture replacing the kind's default (e.g. 'vit_large_patch14_clip_quickgelu_224' for
    another CLIP, or a tiny one in tests); the file must match it. The OpenAI weights need the QuickGELU variant.
    """
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher {kind!r}; known: {', '.join(TEACHERS)}")
    spec, path = TEACHERS[kind], Path(path)
    model_name = model_name or spec.model
    weights = load_teacher_weights(path)
    num_classes = (_projection_dim(weights) or CLIP_PROJ_DIM) if spec.project else 0
    model = meta_vit(model_name, grid_size, num_classes=num_classes)  # every tensor comes from the file
    try:
        converted = checkpoint_filter_fn(dict(weights), model)  # OpenAI/open_clip -> timm keys; resamples pos_embed
    except Exception as err:  # the converter assumes a well-formed layout and fails in many ways otherwise
        raise ValueError(f"--teacher_path {path} cannot be converted to the {kind} layout ({spec.layout}): "
                         f"{type(err).__name__}: {err}") from err
    _check_layout(path, kind, model_name, model, converted)
    model = assign_weights(model, converted, model_name, device)
    teacher = FrozenTeacher(model, mean=spec.mean, std=spec.std, project=spec.project)
    logger.info("%s teacher %s from %s: input %s, grid %s, %d-d tokens", kind, model_name, path,
                teacher.input_size, teacher.grid_size, teacher.out_dim)
    return teacher
