"""The command line the analysis tools (`tools/`) share: their common flags and checks, loading every `--ckpt`, and
running a tool with bad flags or files reported as usage errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from analysis.loading import LoadedModel, known_model_names, load_model
from util import amp
from util.cli import HelpFormatter, exit_with_error
from util.datasets import check_image_folder, default_num_workers
from util.misc import setup_logging


class UsageError(ValueError):
    """A bad flag or input file, found before any compute; `run_cli` prints it as a usage error."""


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], Any],
            argv: Sequence[str] | None = None) -> Any:
    """Parse `argv` (default sys.argv), set up logging and run `main`; a UsageError exits as the entry scripts' user
    errors do: one line `prog: error: message` and status 2 (`util.cli`)."""
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return main(args)
    except UsageError as err:
        exit_with_error(err, parser.prog)


def tool_parser(description: str | None, num_images: int, batch_size: int) -> argparse.ArgumentParser:
    """A tool's parser: its docstring as --help (`HelpFormatter`) and the common flags with the tool's defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_common_args(parser, num_images, batch_size)
    return parser


def add_checkpoint_args(group: argparse._ActionsContainer, ckpt_help: str, model_help: str) -> None:
    """--ckpt PATH..., --names (labels, default: the file names) and --model NAME... (for files without
    model_cfg), checked by `check_checkpoint_args`."""
    group.add_argument("--ckpt", nargs="+", required=True, metavar="PATH", help=ckpt_help)
    group.add_argument("--names", nargs="+", default=None,
                       help="label of each checkpoint in tables, figures and JSON (default: the file names)")
    group.add_argument("--model", nargs="+", default=None, metavar="NAME",
                       help=f"{model_help}: one for all, or one per --ckpt")


def add_common_args(parser: argparse.ArgumentParser, num_images: int, batch_size: int) -> None:
    """Flags every analysis tool takes: checkpoints, images, device, output folder."""
    add_checkpoint_args(parser.add_argument_group("checkpoints"),
                        "one or more checkpoints: this project's (pre-training; fine-tuned or probed ones, "
                        ".safetensors exports and timm Hub folders for the encoder analyses), or released "
                        "MAE/DeepMIM weights with --model",
                        "model name for checkpoints without model_cfg (e.g. mae_vit_base_patch16, or "
                        "vit_base_patch16 for fine-tuned weights)")
    data = parser.add_argument_group("images")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", default=None, help="ImageFolder root (its val/ subfolder if present)")
    source.add_argument("--demo_images", action="store_true", help="deterministic crops of scikit-image's photos")
    data.add_argument("--num_images", default=num_images, type=int, help="images to evaluate (evenly spaced)")
    data.add_argument("--batch_size", default=batch_size, type=int, help="images per forward pass")
    data.add_argument("--input_size", default=None, type=int, help="image size (default: the checkpoints')")
    data.add_argument("--num_workers", default=None, type=int,
                      help="data loading processes (default: this machine's CPUs - 2, as the training scripts)")
    data.add_argument("--seed", default=0, type=int, help="seed of the demo crops and of the masks")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None,
                     help="cpu, cuda or cuda:N (default: cuda when available, else cpu, as the training scripts)")
    run.add_argument("--output_dir", default="./output_dir/analysis", help="where the PNG and JSON files go")


def check_common_args(args: argparse.Namespace, unique_names: bool = True, min_batch: int = 1) -> None:
    """Validate the shared flags before anything is loaded; fills args.names. Raises UsageError naming the flag."""
    check_checkpoint_args(args, known_model_names(), unique_names)
    if args.data_path is not None:
        try:
            check_image_folder(args.data_path, prefer="val")
        except ValueError as err:
            raise UsageError(str(err)) from None
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    for flag, value, low in (("--num_images", args.num_images, 1), ("--batch_size", args.batch_size, min_batch),
                             ("--num_workers", args.num_workers, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.input_size is not None and args.input_size <= 0:
        raise UsageError(f"--input_size must be positive, got {args.input_size}")
    args.device = resolve_device(args.device)


def check_checkpoint_args(args: argparse.Namespace, known_models: Sequence[str], unique_names: bool = True) -> None:
    """--ckpt (each an existing file or folder: whatever `analysis.loading.read_checkpoint` reads), --names (one per
    --ckpt, filled with `default_names` when absent), --model (one name, or one per --ckpt, from `known_models`).
    Raises UsageError naming the flag; nothing is read."""
    missing = [p for p in args.ckpt if not Path(p).exists()]
    if missing:
        raise UsageError(f"--ckpt: not found: {', '.join(missing)} (give a checkpoint file, a .safetensors export or "
                         "a timm Hub folder of tools/export_encoder.py)")
    if args.names is None:
        args.names = default_names(args.ckpt)
    if len(args.names) != len(args.ckpt):
        raise UsageError(f"--names has {len(args.names)} values for {len(args.ckpt)} --ckpt files")
    if unique_names and len(set(args.names)) != len(args.names):
        raise UsageError(f"--names must be distinct, got {args.names}")
    if args.model is not None:
        if len(args.model) not in (1, len(args.ckpt)):
            raise UsageError(f"--model takes 1 name or one per --ckpt ({len(args.ckpt)}), got {len(args.model)}")
        unknown = [m for m in args.model if m not in known_models]
        if unknown:
            raise UsageError(f"--model {unknown} unknown; known: {', '.join(known_models)}")


def add_mask_ratio_arg(group: argparse._ActionsContainer) -> None:
    """--mask_ratio of the decoder tools (reconstructions, validation loss); checked by `check_mask_ratio`."""
    group.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed (MAE: 0.75)")


def check_mask_ratio(args: argparse.Namespace) -> None:
    """Raise UsageError unless 0 < --mask_ratio < 1."""
    if not 0 < args.mask_ratio < 1:
        raise UsageError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")


def default_names(paths: Sequence[str]) -> list[str]:
    """File stems; file names when stems repeat (deepmim.pth, deepmim.safetensors); parent/stem when those repeat
    too (run_a/checkpoint-last.pth, run_b/checkpoint-last.pth)."""
    for names in ([Path(p).stem for p in paths], [Path(p).name for p in paths]):
        if len(set(names)) == len(names):
            return names
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
