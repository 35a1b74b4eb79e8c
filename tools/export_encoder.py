"""Export a checkpoint's ViT encoder to safetensors with timm's key names, and/or to a folder in timm's Hub layout.

    python tools/export_encoder.py output_dir/checkpoint-last.pth deepmim_vit_base.safetensors
    python tools/export_encoder.py output_dir/checkpoint-last.pth --hub_dir deepmim_vit_base

Then, anywhere timm is used (the export prints the exact line for its file, to paste as is):

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="deepmim_vit_base.safetensors"))
    timm.create_model("local-dir:deepmim_vit_base", pretrained=True)  # no architecture arguments needed

`--hub_dir` writes timm's own Hub layout with `timm.models.save_for_hf` (config.json: architecture, model_args,
pretrained_cfg with MAE's evaluation preprocessing; model.safetensors), so the folder can also be uploaded to a
model hub unchanged and loaded with `timm.create_model("hf-hub:USER/NAME", pretrained=True)`.

Accepts this project's pre-training, fine-tuning and linear-probing checkpoints, MAE's released
`mae_pretrain_vit_*.pth` and the released DeepMIM checkpoints. Decoders, teachers and generators are dropped.
Fine-tuned checkpoints keep their head (and fc_norm when they pooled globally: load those with
`global_pool="avg"`, and give timm the class count both as `num_classes` and in the overlay, otherwise timm discards
a head whose size differs from its default 1000). Linear-probe heads (BatchNorm + Linear) are not timm modules and
are left out; probes of an intermediate block (`--probe_block`) hold a truncated encoder and are refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import Tensor  # noqa: E402

import models_vit  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402
from util.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

logger = logging.getLogger("export_encoder")

LINPROBE_HEAD_PREFIX = ("head.0.", "head.1.")  # BatchNorm1d + Linear of main_linprobe.py
TIMM_ARCHITECTURES = models_vit.TIMM_ARCHITECTURES  # our classifier names -> timm architectures (the Hub reader's)
# pretrained_cfg entries of timm's default weights that do not describe ours (their source, tag and licence).
FOREIGN_CFG_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "tag", "license", "label_names",
                    "label_descriptions", "notes", "paper_ids", "paper_name", "origin_url")


def export_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The encoder (and a fine-tuned linear head) of `checkpoint` under timm's VisionTransformer key names.

    Our encoder keys are already timm's (patch_embed.proj, cls_token, pos_embed (1, 1 + L, D), blocks.N.*, norm,
    fc_norm, head); this removes everything else and makes the tensors contiguous for safetensors.
    """
    cfg = checkpoint.get("model_cfg") or {}
    if cfg.get("probe_block") is not None:
        raise ValueError(f"this linear probe reads block {cfg['probe_block']} and holds a truncated encoder; "
                         "export the pre-training checkpoint it was built from instead")
    state = models_vit.encoder_state_dict(checkpoint)
    dropped = [k for k in state if models_vit.DROPPED_KEY.match(k) or k.startswith(LINPROBE_HEAD_PREFIX)]
    if any(k.startswith(LINPROBE_HEAD_PREFIX) for k in dropped):
        logger.warning("linear-probe head (BatchNorm + Linear) left out: it is not a timm module")
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if k not in dropped}
    missing = [k for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight")
               if k not in out]
    if missing:
        raise ValueError(f"no ViT encoder in this checkpoint (missing {missing})")
    return out


def timm_architecture(state: Mapping[str, Tensor], model_cfg: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The timm architecture name and `create_model` arguments that hold `state` exactly.

    Sizes come from the tensors; the number of heads (invisible in the weights) from the checkpoint's "model_cfg",
    else from the registry size with the same patch, width and depth (MAE's and DeepMIM's released files).
    """
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    img = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * patch
    sizes = dict(patch_size=patch, embed_dim=dim, depth=depth)
    name = models_vit.encoder_config(model_cfg)["name"] if model_cfg and model_cfg.get("name") else None
    heads = models_vit.encoder_config(model_cfg)["num_heads"] if name else None
    if name is None or heads is None:
        same = [n for n, s in models_vit.VIT_SIZES.items() if s[:3] == (patch, dim, depth)]
        if not same:
            raise ValueError(f"no stored model_cfg and no registered ViT with patch {patch}, width {dim}, depth "
                             f"{depth}: the number of heads is unknown")
        name, heads = same[0], models_vit.VIT_SIZES[same[0]][3]
    kwargs = dict(img_size=img, **sizes, num_heads=heads,
                  num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
                  global_pool="avg" if "fc_norm.weight" in state else "token")
    return TIMM_ARCHITECTURES[name], kwargs


def timm_call(state: Mapping[str, Tensor], out_path: str, model_cfg: Mapping[str, Any] | None = None) -> str:
    """Python that loads the exported file, to paste as is anywhere: `import timm; model = timm.create_model(...)`
    with every architecture argument spelled out (heads from model_cfg or the registry, no placeholders) and the
    file's absolute path, so it works from any folder."""
    arch, kwargs = timm_architecture(state, model_cfg)
    overlay = f"dict(file={str(Path(out_path).resolve())!r}, num_classes={kwargs['num_classes']})"
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    call = f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay={overlay}, {args})"
    return f"import timm; model = {call}"


def local_dir_call(hub_dir: str | Path) -> str:
    """Python that loads a `--hub_dir` folder, to paste as is (absolute path)."""
    name = f"local-dir:{Path(hub_dir).resolve()}"
    return f"import timm; model = timm.create_model({name!r}, pretrained=True)"


def eval_preprocessing(img_size: int) -> dict[str, Any]:
    """MAE's evaluation transform (util.cls_data.eval_transform) as timm's pretrained_cfg entries."""
    return dict(input_size=(3, img_size, img_size), interpolation="bicubic", crop_mode="center",
                crop_pct=224 / 256 if img_size <= 224 else 1.0, mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD))


def write_hub_dir(state: Mapping[str, Tensor], hub_dir: str | Path,
                  model_cfg: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Write `state` as a folder in timm's Hub layout with `timm.models.save_for_hf` (config.json with the
    architecture, model_args and pretrained_cfg; model.safetensors); `timm.create_model('local-dir:DIR',
    pretrained=True)` rebuilds it with no other argument. Returns the timm model that was saved."""
    arch, kwargs = timm_architecture(state, model_cfg)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise ValueError(f"the exported weights do not fit timm's {arch} {kwargs}: {err}") from None
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in FOREIGN_CFG_KEYS}
    model.pretrained_cfg = {**cfg, **eval_preprocessing(kwargs["img_size"]), "num_classes": kwargs["num_classes"]}
    timm.models.save_for_hf(model, str(hub_dir), safe_serialization=True)
    logger.info("wrote timm Hub folder %s (%s)", hub_dir, arch)
    logger.info("load with: %s", local_dir_call(hub_dir))
    return model


def export(checkpoint_path: str, out_path: str | None, hub_dir: str | None = None) -> dict[str, Tensor]:
    """Read `checkpoint_path` (weights_only), write its encoder to `out_path` (safetensors) and/or to `hub_dir`
    (timm's Hub layout); return the exported state dict."""
    checkpoint = load_checkpoint(checkpoint_path)
    state = export_state_dict(checkpoint)
    model_cfg = checkpoint.get("model_cfg") or None
    if out_path:
        metadata = {"format": "pt", "source": str(checkpoint_path)}
        if model_cfg:
            metadata["model_cfg"] = json.dumps(model_cfg)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, out_path, metadata=metadata)
        logger.info("wrote %d tensors (%.1f M parameters) to %s", len(state),
                    sum(v.numel() for v in state.values()) / 1e6, out_path)
        logger.info("load with: %s", timm_call(state, out_path, model_cfg))
    if hub_dir:
        write_hub_dir(state, hub_dir, model_cfg)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint (.pth) of this project, MAE or the released DeepMIM")
    parser.add_argument("output", nargs="?", default=None, help="output .safetensors file (optional with --hub_dir)")
    parser.add_argument("--hub_dir", default=None, metavar="DIR",
                        help="also write DIR in timm's Hub layout (config.json + model.safetensors): "
                             "timm.create_model('local-dir:DIR', pretrained=True)")
    args = parser.parse_args(argv)
    if args.output is None and args.hub_dir is None:
        parser.error("give an output .safetensors file, --hub_dir DIR, or both")
    if args.output is not None and not args.output.endswith(".safetensors"):
        parser.error(f"output {args.output} must end in .safetensors")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.checkpoint, args.output, args.hub_dir)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
