"""Shared helpers of the analysis tools (`tools/`): load a model from any checkpoint, extract per-block token
features and per-head attention outputs of the encoder on unmasked images, load a fixed set of evaluation images,
and the command-line flags every tool shares.

Checkpoints written by `main_pretrain.py`, `main_finetune.py` and `main_linprobe.py` and the `.safetensors` exports
of `tools/export_encoder.py` carry "model_cfg", from which the architecture is rebuilt; released MAE / DeepMIM files
carry weights only, so the tools take `--model NAME` for them. The encoder analyses (CKA, head diversity) take any
of these; reconstructions and the validation loss need a pre-training checkpoint with its decoders.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from timm.layers import resample_abs_pos_embed
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

import models_deepmim
import models_vit
from models_deepmim import MaskedAutoencoderDeepMIM
from util import amp
from util.checkpoint import load_checkpoint
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, check_image_folder, demo_photos
from util.misc import setup_logging

logger = logging.getLogger(__name__)

TokenPooling = Literal["flatten", "mean", "cls"]
TOKEN_POOLINGS = ("flatten", "mean", "cls")
EVAL_CROP_RATIO = 224 / 256  # MAE's evaluation transform: resize to 256, center-crop 224


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


class LoadedModel(NamedTuple):
    model: MaskedAutoencoderDeepMIM
    name: str  # label in figures and JSON
    path: str
    epoch: int | None  # the checkpoint's "epoch" when it has one


DECODER_TOOLS = ("tools/visualize.py", "tools/eval_recon_loss.py")  # need a pre-training checkpoint's decoders
ENCODER_TOOLS = ("tools/cka.py", "tools/head_diversity.py")  # take any checkpoint that holds the encoder
CLASSIFIER_READOUT = ("head.", "fc_norm.")  # keys of a fine-tuned / probed classifier the analyses do not use


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint as a dict with "model" (and "model_cfg", "epoch" when stored): a torch file
    (`util.checkpoint.load_checkpoint`, weights_only) or a `.safetensors` export of `tools/export_encoder.py`,
    whose metadata holds the source's "model_cfg" as JSON. Raises ValueError naming the file when it is unreadable."""
    if not str(path).endswith(".safetensors"):
        return load_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    checkpoint: dict[str, Any] = {"model": state}
    if "model_cfg" in metadata:
        checkpoint["model_cfg"] = json.loads(metadata["model_cfg"])
    return checkpoint


def is_classifier_config(cfg: Mapping[str, Any]) -> bool:
    """True for the "model_cfg" of a fine-tuned or linear-probe classifier (main_finetune.py, main_linprobe.py:
    name 'vit_base_patch16', ...), False for a pre-training one ('deepmim_vit_base_patch16', 'mae_...')."""
    return str(cfg.get("name")) in models_vit.VIT_SIZES


def encoder_from_classifier_config(cfg: Mapping[str, Any], img_size: int | None = None) -> MaskedAutoencoderDeepMIM:
    """The encoder of a classifier config as a `MaskedAutoencoderDeepMIM` (same patch embedding, cls/pos slots and
    timm blocks, so its keys load as they are), with one minimal decoder that no encoder analysis reads. A linear
    probe of block K (`probe_block`) holds blocks 1..K only, so the encoder is built K blocks deep."""
    depth = cfg.get("probe_block") or cfg.get("depth")
    return models_deepmim.create_model(
        f"mae_{cfg['name']}", img_size=img_size or cfg.get("img_size"), patch_size=cfg.get("patch_size"),
        embed_dim=cfg.get("embed_dim"), depth=depth, num_heads=cfg.get("num_heads"), decoder_depth=1)


def _resample_learned_pos_embed(state: dict[str, Tensor], model: MaskedAutoencoderDeepMIM) -> dict[str, Tensor]:
    """A fine-tuned position embedding is learned, not sin-cos: resample it to the model's grid (bicubic, timm, cls
    slot kept) rather than recompute it."""
    old = state.get("pos_embed")
    if old is None or old.shape == model.pos_embed.shape:
        return state
    new = resample_abs_pos_embed(old, new_size=list(model.grid_size), num_prefix_tokens=1)
    logger.info("resampled the learned pos_embed %s -> %s", tuple(old.shape), tuple(new.shape))
    return {**state, "pos_embed": new}


def _state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    state = checkpoint["model"] if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def load_model(
    path: str | os.PathLike,
    model_name: str | None = None,
    img_size: int | None = None,
    norm_pix_loss: bool | None = None,
    require_decoders: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[MaskedAutoencoderDeepMIM, int | None]:
    """Build the model a checkpoint describes and load its weights; returns (model in eval mode, epoch or None).

    Accepts pre-training checkpoints (main_pretrain.py), fine-tuned and linear-probe classifiers (main_finetune.py,
    main_linprobe.py: their encoder, with the read-out left out), `.safetensors` exports (tools/export_encoder.py)
    and released MAE / DeepMIM weights. The architecture comes from the checkpoint's "model_cfg"; files without one
    need `model_name` (a registered name, e.g. 'mae_vit_base_patch16', or a classifier name such as
    'vit_base_patch16' for fine-tuned weights), and `norm_pix_loss` says whether their decoders predict
    per-patch-normalised pixels. img_size rebuilds the model for another input size: fixed sin-cos position
    embeddings are recomputed for the new grid, learned (fine-tuned) ones resampled.

    Raises ValueError naming the file when encoder weights are missing or misshapen, or when `require_decoders`
    and the file holds no decoder (a classifier, an export, MAE's encoder-only `mae_pretrain_*.pth`).
    """
    checkpoint = read_checkpoint(path)
    cfg = checkpoint.get("model_cfg")
    if cfg is None and model_name is None:
        raise ValueError(f"{path} has no 'model_cfg' (a released MAE/DeepMIM file?): pass --model with one of "
                         f"{', '.join(known_model_names())}")
    if cfg is not None and model_name is not None and model_name != cfg.get("name"):
        logger.warning("%s has a model_cfg (%s); ignoring --model %s", path, cfg.get("name"), model_name)
    cfg = dict(cfg) if cfg is not None else {"name": model_name, "norm_pix_loss": norm_pix_loss}
    classifier = is_classifier_config(cfg)
    state = _state_dict(checkpoint)
    if classifier:
        if require_decoders:
            raise ValueError(no_decoder_message(path, f"a classifier checkpoint (model_cfg name {cfg['name']!r}, "
                                                      "from main_finetune.py or main_linprobe.py)"))
        model = encoder_from_classifier_config(cfg, img_size)
        state = _resample_learned_pos_embed(state, model)
    else:
        model = models_deepmim.model_from_config(dict(cfg, **({"img_size": img_size} if img_size else {})))
    report = models_deepmim.load_pretrained(model, state)
    _check_load_report(path, report, require_decoders, classifier)
    epoch = checkpoint.get("epoch")
    return model.eval().to(device), int(epoch) if isinstance(epoch, (int, float)) else None


def known_model_names() -> list[str]:
    """Values `--model` takes: registered pre-training models, then classifier (fine-tuned) names."""
    return sorted(models_deepmim.MODELS) + sorted(models_vit.VIT_SIZES)


def no_decoder_message(path: str | os.PathLike, what: str) -> str:
    """The error of a decoder tool given an encoder-only file; names the file and the tools that accept it."""
    return (f"{path}: {what}: it holds the encoder only, no decoder. Reconstructions and the validation loss "
            f"({', '.join(DECODER_TOOLS)}) need a pre-training checkpoint of main_pretrain.py with its decoders; "
            f"{' and '.join(ENCODER_TOOLS)} accept encoder-only files")


def _is_pos_embed(key: str) -> bool:
    # Fixed sin-cos buffers (MAE): rebuilt by the model for its grid, never learned.
    return key == "pos_embed" or (key.startswith("decoders.") and key.endswith(".pos_embed"))


def _check_load_report(path: str | os.PathLike, report: models_deepmim.LoadReport, require_decoders: bool,
                       classifier: bool = False) -> None:
    """Raise on missing encoder weights (or decoders when required); otherwise log what did not load, once.

    A classifier's final norm may be absent (global pooling, probes) and its pos_embed is learned, so must load;
    its head / fc_norm are expected leftovers. Only block outputs are analysed, never the final norm."""
    tolerated = (lambda k: k.startswith("norm.")) if classifier else _is_pos_embed
    missing = [k for k in report.missing if not tolerated(k)]
    encoder_missing = [k for k in missing if not k.startswith("decoders.")]
    if encoder_missing:
        raise ValueError(f"{path}: encoder weights missing or of another shape: {encoder_missing[:5]}"
                         f"{' ...' if len(encoder_missing) > 5 else ''} ({len(encoder_missing)} keys); "
                         "is --model (or the checkpoint's model_cfg) the right architecture?")
    decoder_missing = [k for k in missing if k.startswith("decoders.")]
    if decoder_missing and require_decoders:
        raise ValueError(no_decoder_message(path, f"decoder weights missing ({', '.join(decoder_missing[:3])} ...; "
                                                  "an export or an encoder-only release?)"))
    surprising = [k for k in report.unexpected if not (classifier and k.startswith(CLASSIFIER_READOUT))]
    level = logging.WARNING if surprising else logging.INFO
    if classifier:
        logger.log(level, "%s: loaded the encoder of a classifier; unused keys in the file (its read-out is not "
                   "analysed): %d %s", path, len(report.unexpected), report.unexpected[:5])
    elif decoder_missing or report.unexpected:
        logger.log(level, "%s: loaded; not in the file: %d decoder keys; unused keys in the file: %d %s", path,
                   len(decoder_missing), len(report.unexpected), report.unexpected[:5])


# --------------------------------------------------------------------------------------------------------------
# Features of the encoder on unmasked images
# --------------------------------------------------------------------------------------------------------------


def embed_unmasked(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> Tensor:
    """imgs: (N, 3, H, W) -> (N, 1 + L, D): patch embedding + position embedding with the cls token, no masking."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def iter_block_features(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> Iterator[Tensor]:
    """Yield the token features of encoder blocks 1..depth on the whole (unmasked) image, one block at a time (a
    consumer that reduces each block, e.g. to a Gram matrix, holds one block's features at a time).

    imgs: (N, 3, H, W) ImageNet-normalised. Yields (N, 1 + L, D), cls token first: the raw output (residual stream)
    of each block; the final norm is not applied, so every block is measured alike.
    """
    x = embed_unmasked(model, imgs)
    for blk in model.blocks:
        x = blk(x)
        yield x


def encoder_block_features(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> list[Tensor]:
    """imgs: (N, 3, H, W) -> `depth` tensors (N, 1 + L, D): every block's output, unmasked (`iter_block_features`)."""
    return list(iter_block_features(model, imgs))


@contextlib.contextmanager
def capture_head_outputs(model: MaskedAutoencoderDeepMIM) -> Iterator[list[Tensor]]:
    """Within the context, every encoder forward appends each block's per-head attention output to the yielded list.

    The output of head h is softmax(Q_h K_h^T / sqrt(d)) V_h, i.e. the input of `attn.proj` (timm's Attention
    concatenates the heads there), read by a forward pre-hook on each block's `attn.proj`: (N, H, T, d) per block.
    Hooks are removed on exit; nothing global is patched.
    """
    outputs: list[Tensor] = []
    handles = []
    for blk in model.blocks:
        attn = blk.attn
        if not isinstance(attn.norm, torch.nn.Identity) or getattr(attn, "gate", None) is not None:
            raise ValueError("capture_head_outputs needs plain timm attention (no scale_norm, no gate)")

        def hook(_module, inputs, heads=attn.num_heads):
            x = inputs[0]  # (N, T, H * d)
            outputs.append(x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2))

        handles.append(attn.proj.register_forward_pre_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def attention_head_outputs(model: MaskedAutoencoderDeepMIM, imgs: Tensor) -> list[Tensor]:
    """imgs: (N, 3, H, W) -> `depth` tensors (N, H, 1 + L, d): each block's per-head attention output, unmasked."""
    with capture_head_outputs(model) as outputs:
        for _ in iter_block_features(model, imgs):
            pass
    return list(outputs)


def pool_tokens(x: Tensor, pooling: TokenPooling = "flatten") -> Tensor:
    """One feature vector per image from block tokens x: (N, 1 + L, D).

    flatten: all tokens concatenated, (N, (1 + L) D) — each image is one example and the spatial layout is kept
        (as minibatch CKA of Nguyen et al. 2021 treats conv feature maps); the default of `tools/cka.py`.
    mean: average of the L patch tokens, (N, D). cls: the cls token, (N, D).
    """
    if pooling == "flatten":
        return x.reshape(x.shape[0], -1)
    if pooling == "mean":
        return x[:, 1:].mean(dim=1)
    if pooling == "cls":
        return x[:, 0]
    raise ValueError(f"pooling must be one of {', '.join(TOKEN_POOLINGS)}, got {pooling!r}")


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def eval_transform(input_size: int) -> transforms.Compose:
    """Fixed evaluation view (MAE's): bicubic resize of the short side to input_size / 0.875, center crop,
    ImageNet normalisation. Returns float (3, input_size, input_size)."""
    return transforms.Compose([
        transforms.Resize(int(round(input_size / EVAL_CROP_RATIO)), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class DemoCrops(Dataset):
    """Deterministic crops of the photographs scikit-image ships (`util.datasets.demo_photos`).

    Image i comes from photo i mod P (P photos); the first P images are the evaluation view of each photo, later
    ones square crops of 25-100 % of the short side at positions drawn from a generator seeded by (seed, i).
    """

    def __init__(self, input_size: int, num_images: int, seed: int = 0):
        self.photos = demo_photos()
        self.num_images, self.seed = num_images, seed
        self.transform = eval_transform(input_size)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = index % len(self.photos)
        photo = self.photos[label]
        if index >= len(self.photos):
            photo = self._random_square(photo, np.random.default_rng((self.seed, index)))
        return self.transform(photo), label

    @staticmethod
    def _random_square(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
        side = int(min(photo.size) * np.sqrt(rng.uniform(0.25, 1.0)))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        return photo.crop((left, top, left + side, top + side))


def build_image_dataset(data_path: str | None, num_images: int, input_size: int, seed: int = 0) -> Dataset:
    """A fixed set of `num_images` evaluation images: evenly spaced over the ImageFolder at `data_path` (its `val/`
    subfolder when there is one), or demo crops when data_path is None. Fewer when the folder holds fewer."""
    if data_path is None:
        return DemoCrops(input_size, num_images, seed)
    root = Path(data_path) / "val" if (Path(data_path) / "val").is_dir() else Path(data_path)
    dataset = datasets.ImageFolder(str(root), transform=eval_transform(input_size))
    if num_images >= len(dataset):
        if num_images > len(dataset):
            logger.info("%s holds %d images (< --num_images %d): using all", root, len(dataset), num_images)
        return dataset
    # Evenly spaced indices cover every class of a sorted ImageFolder; the spacing is >= 1, so no repeats.
    indices = torch.linspace(0, len(dataset) - 1, num_images).round().long().tolist()
    return Subset(dataset, indices)


def build_image_loader(args: argparse.Namespace, input_size: int) -> DataLoader:
    """DataLoader over `build_image_dataset` for the flags of `add_common_args`, in a fixed order."""
    dataset = build_image_dataset(args.data_path, args.num_images, input_size, args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                      pin_memory=torch.device(args.device).type == "cuda")


def mask_noise(num_images: int, num_patches: int, seed: int) -> Tensor:
    """(num_images, num_patches) masking noise from a generator seeded by `seed`: row i masks image i the same way
    whatever the batch size, and every model with the same patch grid sees the same masks."""
    return torch.rand(num_images, num_patches, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# Command line shared by the tools
# --------------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the tool's docstring as written (with its example commands) and each flag's default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class UsageError(ValueError):
    """A bad flag or input file, found before any compute; `run_cli` prints it as a usage error."""


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], Any]) -> Any:
    """Parse sys.argv, set up logging and run `main`; a UsageError exits with the parser's usage message."""
    args = parser.parse_args()
    setup_logging()
    try:
        return main(args)
    except UsageError as err:
        parser.error(str(err))


def add_common_args(parser: argparse.ArgumentParser, num_images: int, batch_size: int) -> None:
    """Flags every analysis tool takes: checkpoints, images, device, output folder."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--ckpt", nargs="+", required=True, metavar="PATH",
                       help="one or more checkpoints: this project's (pre-training; fine-tuned or probed ones and "
                            ".safetensors exports for the encoder analyses), or released MAE/DeepMIM weights with "
                            "--model")
    group.add_argument("--names", nargs="+", default=None,
                       help="label of each checkpoint in figures and JSON (default: the file names)")
    group.add_argument("--model", nargs="+", default=None, metavar="NAME",
                       help="model name for checkpoints without model_cfg (e.g. mae_vit_base_patch16, or "
                            "vit_base_patch16 for fine-tuned weights): one for all, or one per --ckpt")
    data = parser.add_argument_group("images")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", default=None, help="ImageFolder root (its val/ subfolder if present)")
    source.add_argument("--demo_images", action="store_true", help="deterministic crops of scikit-image's photos")
    data.add_argument("--num_images", default=num_images, type=int, help="images to evaluate (evenly spaced)")
    data.add_argument("--batch_size", default=batch_size, type=int, help="images per forward pass")
    data.add_argument("--input_size", default=None, type=int, help="image size (default: the checkpoints')")
    data.add_argument("--num_workers", default=4, type=int, help="data loading processes")
    data.add_argument("--seed", default=0, type=int, help="seed of the demo crops and of the masks")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None,
                     help="cpu, cuda or cuda:N (default: cuda when available, else cpu, as the training scripts)")
    run.add_argument("--output_dir", default="./output_dir/analysis", help="where the PNG and JSON files go")


def check_common_args(args: argparse.Namespace, unique_names: bool = True, min_batch: int = 1) -> None:
    """Validate the shared flags before anything is loaded; fills args.names. Raises UsageError naming the flag."""
    missing = [p for p in args.ckpt if not Path(p).is_file()]
    if missing:
        raise UsageError(f"--ckpt: checkpoint file(s) not found: {', '.join(missing)}")
    if args.names is None:
        args.names = default_names(args.ckpt)
    if len(args.names) != len(args.ckpt):
        raise UsageError(f"--names has {len(args.names)} values for {len(args.ckpt)} --ckpt files")
    if unique_names and len(set(args.names)) != len(args.names):
        raise UsageError(f"--names must be distinct, got {args.names}")
    if args.model is not None:
        if len(args.model) not in (1, len(args.ckpt)):
            raise UsageError(f"--model takes 1 name or one per --ckpt ({len(args.ckpt)}), got {len(args.model)}")
        unknown = [m for m in args.model if m not in known_model_names()]
        if unknown:
            raise UsageError(f"--model {unknown} unknown; known: {', '.join(known_model_names())}")
    if args.data_path is not None:
        try:
            check_image_folder(args.data_path)
        except ValueError as err:
            raise UsageError(str(err)) from None
    for flag, value, low in (("--num_images", args.num_images, 1), ("--batch_size", args.batch_size, min_batch),
                             ("--num_workers", args.num_workers, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.input_size is not None and args.input_size <= 0:
        raise UsageError(f"--input_size must be positive, got {args.input_size}")
    args.device = resolve_device(args.device)


def default_names(paths: Sequence[str]) -> list[str]:
    """File stems, or parent/stem when stems repeat (run_a/checkpoint-last.pth, run_b/checkpoint-last.pth)."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]


def resolve_device(name: str | None) -> str:
    """`--device` by the training scripts' rule (`util.amp.resolve_device`): None -> cuda when available, else cpu;
    cpu, cuda and cuda:N are accepted. Raises UsageError naming the flag."""
    try:
        return amp.resolve_device(name)
    except ValueError as err:
        raise UsageError(str(err)) from None


def load_models(args: argparse.Namespace, require_decoders: bool = False) -> tuple[list[LoadedModel], int]:
    """Load every --ckpt at --input_size (default: the checkpoints' own, which must then agree); returns the
    models and the input size. Raises UsageError naming the flag or file on any mismatch."""
    models = []
    for i, (path, name) in enumerate(zip(args.ckpt, args.names)):
        model_name = None if args.model is None else args.model[i if len(args.model) > 1 else 0]
        try:
            model, epoch = load_model(path, model_name, args.input_size, getattr(args, "norm_pix_loss", None) or None,
                                      require_decoders, args.device)
        except ValueError as err:
            raise UsageError(f"--ckpt {path}: {err}") from err
        models.append(LoadedModel(model, name, str(path), epoch))
    sizes = {m.name: m.model.patch_embed.img_size[0] for m in models}
    if args.input_size is None and len(set(sizes.values())) > 1:
        raise UsageError(f"the checkpoints use different input sizes {sizes}: pass --input_size")
    input_size = args.input_size or next(iter(sizes.values()))
    for m in models:
        if input_size % m.model.patch_size:
            raise UsageError(f"--input_size {input_size} is not a multiple of the patch size {m.model.patch_size} "
                             f"of {m.name}")
    return models, input_size


def check_pixel_decoders(models: Sequence[LoadedModel]) -> None:
    """Raise UsageError unless every model's decoders predict pixels (MSE on p*p*3 values), which is what the
    reconstruction tools compare and draw; HOG / teacher-feature checkpoints need their own targets."""
    for m in models:
        pixel_dim = m.model.patch_size**2 * m.model.in_chans
        if m.model.pred_dim != pixel_dim or m.model.loss_type != "mse":
            raise UsageError(f"--ckpt {m.path}: its decoders predict {m.model.pred_dim}-d {m.model.loss_type} "
                             f"targets, not {pixel_dim} pixels; this tool handles pixel-target checkpoints only")
