"""Export a checkpoint's ViT encoder to safetensors with timm's key names.

    python tools/export_encoder.py output_dir/checkpoint-last.pth deepmim_vit_base.safetensors

Then, anywhere timm is used:

    timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="deepmim_vit_base.safetensors"))

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

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import Tensor  # noqa: E402

import models_vit  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402

logger = logging.getLogger("export_encoder")

LINPROBE_HEAD_PREFIX = ("head.0.", "head.1.")  # BatchNorm1d + Linear of main_linprobe.py


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


def timm_call(state: Mapping[str, Tensor], out_path: str) -> str:
    """The `timm.create_model(...)` call that loads the exported file (for the log)."""
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = state["pos_embed"].shape[1] - 1
    img = int(round(grid**0.5)) * patch
    kwargs = [f"pretrained_cfg_overlay=dict(file={out_path!r}"]
    if "head.weight" in state:
        classes = state["head.weight"].shape[0]
        kwargs[0] += f", num_classes={classes})"
        kwargs.append(f"num_classes={classes}")
    else:
        kwargs[0] += ")"
        kwargs.append("num_classes=0")
    if "fc_norm.weight" in state:
        kwargs.append("global_pool='avg'")
    kwargs.append(f"img_size={img}, patch_size={patch}, embed_dim={dim}, depth={depth}, num_heads=<as pre-trained>")
    return f"timm.create_model('vit_base_patch16_224', pretrained=True, {', '.join(kwargs)})"


def export(checkpoint_path: str, out_path: str) -> dict[str, Tensor]:
    """Read `checkpoint_path` (weights_only), write its encoder to `out_path` (safetensors); return what was written."""
    checkpoint = load_checkpoint(checkpoint_path)
    state = export_state_dict(checkpoint)
    metadata = {"format": "pt", "source": str(checkpoint_path)}
    if checkpoint.get("model_cfg"):
        metadata["model_cfg"] = json.dumps(checkpoint["model_cfg"])
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out_path, metadata=metadata)
    logger.info("wrote %d tensors (%.1f M parameters) to %s", len(state),
                sum(v.numel() for v in state.values()) / 1e6, out_path)
    logger.info("load with: %s", timm_call(state, out_path))
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint (.pth) of this project, MAE or the released DeepMIM")
    parser.add_argument("output", help="output .safetensors file")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error(f"output {args.output} must end in .safetensors")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
