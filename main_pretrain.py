"""DeepMIM pre-training (paper Sec. 3, Appendix A).

One process (CPU or one GPU):
    python main_pretrain.py --data_path /path/to/imagenet --batch_size 64
The paper's ViT-B recipe, batch 4096 = 4 nodes x 8 GPUs x 128 (or fewer GPUs with --accum_iter):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 main_pretrain.py \
        --model deepmim_vit_base_patch16 --batch_size 128 --norm_pix_loss --epochs 1600 --warmup_epochs 40 \
        --blr 1.5e-4 --weight_decay 0.05 --data_path /path/to/imagenet --output_dir out/deepmim_b
A one-minute CPU demo on real photographs shipped with scikit-image:
    python main_pretrain.py --demo
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

import models_deepmim
from analysis.visualize import grid_tensor, save_grid_png
from engine_pretrain import (
    TargetsFn,
    build_dataset,
    build_loader,
    build_model,
    build_optimizer,
    build_target,
    build_targets_fn,
    reconstructions,
    train_one_epoch,
    warn_if_memory_short,
)
from targets import masking
from targets.build import TARGETS, check_target_args
from targets.hybrid import check_generator_file, check_hybrid_args
from util import checkpoint as ckpt
from util import config, distributed, resume
from util.amp import AMP_CHOICES, configure_backends, describe_machine, resolve_machine
from util.cli import script_parser, user_errors
from util.datasets import check_image_folder
from util.misc import RunClock, append_json_log, log_summary, make_log_writer, seed_everything, setup_logging
from util.patches import num_visible
from util.preemption import GracefulStop
from util.run_folder import add_overwrite_arg, check_output_dir, prepare_output_dir
from util.training import UpdateHook, add_compile_args, maybe_compile, wrap_ddp

logger = logging.getLogger("main_pretrain")

# `--demo`: a small DeepMIM (the registry's demo encoder: patch 4, width 128, 6 blocks, 4 heads) on 32x32 crops of
# real photographs, a few minutes on two CPU cores.
DEMO_SETTINGS = dict(
    model="deepmim_vit_demo_patch4", input_size=32, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4,
    batch_size=32, epochs=20, warmup_epochs=2, blr=5e-3, norm_pix_loss=True, num_workers=0, save_freq=10,
    print_freq=10,
)
DEMO_OUTPUT_DIR = "./output_demo/pretrain"


def get_args_parser() -> argparse.ArgumentParser:
    """MAE's pre-training flags plus DeepMIM's; `add_help=False` so launchers can use it as a parent parser."""
    parser = argparse.ArgumentParser("DeepMIM pre-training", add_help=False)
    run = parser.add_argument_group("Run")
    run.add_argument("--batch_size", default=64, type=int, help="images per process per step (paper: 4096 total)")
    run.add_argument("--epochs", default=1600, type=int, help="paper Tab. 2: 1600; ablations: 300")
    run.add_argument("--accum_iter", default=1, type=int, help="steps of gradient accumulation per update")
    config.add_global_batch_arg(run)
    run.add_argument("--demo", action="store_true",
                     help="a small DeepMIM on crops of scikit-image's photographs (minutes on a CPU), into "
                          f"{DEMO_OUTPUT_DIR}; sets every flag left at its default: "
                          + " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in DEMO_SETTINGS.items()))

    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="deepmim_vit_base_patch16", type=str, help="registered model name")
    model.add_argument("--input_size", default=224, type=int, help="image size")
    model.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed (MAE: 0.75)")
    model.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised pixels as targets")
    model.add_argument("--patch_size", default=None, type=int, help="override the registry's patch size")
    model.add_argument("--embed_dim", default=None, type=int, help="override the encoder width")
    model.add_argument("--depth", default=None, type=int, help="override the encoder depth")
    model.add_argument("--num_heads", default=None, type=int, help="override the encoder heads")
    model.add_argument("--grad_ckpt", action="store_true",
                       help="activation checkpointing of encoder and decoder blocks: same result, far less memory, "
                            "~1/3 more compute (e.g. ViT-B DeepMIM at batch 128 on a 16 GB V100)")

    deepmim = parser.add_argument_group("DeepMIM")
    deepmim.add_argument("--supervised_blocks", default=None, type=int, nargs="+",
                         help="1-based encoder blocks with a decoder (default depth*{1/2,2/3,5/6,1}: 6 8 10 12)")
    deepmim.add_argument("--decoder_embed_dim", default=None, type=int, help="decoder width (DeepMIM/MAE: 512)")
    deepmim.add_argument("--decoder_depth", default=None, type=int, help="decoder blocks (DeepMIM: 4, MAE: 8)")
    deepmim.add_argument("--decoder_num_heads", default=None, type=int, help="decoder heads (16)")
    deepmim.add_argument("--shared_decoder", action="store_true", help="one decoder for every block (Tab. 10)")
    deepmim.add_argument("--loss_weights", default=None, type=float, nargs="+",
                         help="weight of each decoder's loss in Eq. 2 (default 1 each)")

    target = parser.add_argument_group("Targets (paper Eq. 1, Tab. 7, 9, 11)")
    target.add_argument("--target", default="pixel", choices=TARGETS,
                        help="what the decoders reconstruct: pixels, HOG, CLIP / DINO teacher features, or the "
                             "codes of a frozen tokenizer (codebook: V logits per patch, cross-entropy)")
    target.add_argument("--teacher_path", default=None, type=str,
                        help="local weights of the CLIP (OpenAI ViT-B-16.pt or safetensors) or DINO teacher, or of "
                             "the codebook's tokenizer (BEiT v2's VQ-KD)")
    target.add_argument("--teacher_model", default=None, type=str,
                        help="timm architecture of that teacher or tokenizer encoder (default ViT-B/16 of the kind); "
                             "the file must match")
    target.add_argument("--hybrid_generator", default=None, type=str,
                        help="DeepMIM+: a pre-trained MAE checkpoint (with decoder) that reconstructs x_hat")
    target.add_argument("--hybrid_alphas", default=None, type=float, nargs="+",
                        help="blend t = a x + (1-a) x_hat per supervised block (default with a generator: 0 1/3 2/3 1)")

    masking.add_mask_args(parser.add_argument_group("Masking (paper Tab. 12)"))

    optim = parser.add_argument_group("Optimizer (paper Appendix A)")
    optim.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay")
    optim.add_argument("--lr", default=None, type=float, help="absolute lr (default blr * eff_batch / 256)")
    optim.add_argument("--blr", default=1.5e-4, type=float, help="base lr: lr = blr * eff_batch / 256")
    optim.add_argument("--min_lr", default=0.0, type=float, help="floor of the cosine schedule")
    optim.add_argument("--warmup_epochs", default=40, type=int, help="linear warm-up epochs")

    system = parser.add_argument_group("System")
    system.add_argument("--data_path", default=None, type=str, help="ImageFolder root (or its parent with train/)")
    system.add_argument("--output_dir", default="./output_dir", type=str, help="checkpoints and log.txt")
    system.add_argument("--log_dir", default=None, type=str, help="TensorBoard folder (default: output_dir)")
    add_overwrite_arg(system)
    system.add_argument("--device", default=None, type=str,
                        help="cuda or cpu (default: cuda when available; decided in the job, on the compute node)")
    system.add_argument("--amp", default=None, choices=AMP_CHOICES,
                        help="autocast dtype (default: bf16 on GPUs with native bf16, compute capability >= 8.0; "
                             "fp16 + grad scaler on older GPUs such as V100; none on CPU)")
    system.add_argument("--seed", default=0, type=int)
    system.add_argument("--resume", default="", type=str,
                        help="checkpoint to resume from, or 'auto': the newest loadable one in --output_dir")
    system.add_argument("--resume_allow_changes", default=None, type=str, metavar="FLAG[,FLAG...]",
                        help="flags allowed to differ from the resumed checkpoint's run (e.g. epochs,blr); any "
                             "other result-changing difference stops the run")
    system.add_argument("--start_epoch", default=0, type=int, help="first epoch (overridden by --resume)")
    system.add_argument("--num_workers", default=None, type=int,
                        help="data-loading processes per GPU (default: this task's CPUs - 2, decided in the job)")
    system.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True, help="pin host memory")
    system.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="MAE's spelling of --no-pin_mem")
    system.add_argument("--dist_url", default="env://", type=str, help="process-group init URL")
    distributed.add_legacy_launcher_args(system)
    distributed.add_dist_args(system)
    system.add_argument("--save_freq", default=20, type=int, help="write checkpoint-<epoch>.pth every N epochs")
    system.add_argument("--save_every_iters", default=0, type=int,
                        help="also refresh checkpoint-last.pth every N optimizer updates (0: only at epoch ends)")
    system.add_argument("--save_every_minutes", default=15.0, type=float,
                        help="refresh checkpoint-last.pth (~1.7 GB for ViT-B with AdamW) at the first epoch end this "
                             "many minutes after its last write, and mid-epoch in longer epochs; also on a stop signal "
                             "and at the end (0: every epoch end)")
    system.add_argument("--max_bad_images", default=None, type=int,
                        help="unreadable images tolerated per epoch and rank (default: 1%% of the epoch)")
    system.add_argument("--print_freq", default=20, type=int, help="log (and read losses) every N steps")
    add_compile_args(system)
    system.add_argument("--vis_freq", default=20, type=int,
                        help="log a reconstruction grid to TensorBoard every N epochs (0: never)")
    config.add_config_args(parser)
    return parser


# ------------------------------------------------------------------------------------------------------------------
# Arguments: defaults that depend on the machine, then validation before anything is built
# ------------------------------------------------------------------------------------------------------------------


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Fill defaults that do not depend on the machine, in place: --demo settings (only for flags left at their
    defaults, so `--demo --epochs 3` runs 3 epochs) and --log_dir. Device and amp are resolved by `main`, inside
    the job, on the machine that trains (`util.amp.resolve_machine`)."""
    if args.demo:
        parser = parser or get_args_parser()
        for key, value in DEMO_SETTINGS.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        if args.output_dir == "./output_dir":
            args.output_dir = DEMO_OUTPUT_DIR
    if args.log_dir is None:
        args.log_dir = args.output_dir
    return args


def validate_args(args: argparse.Namespace, check_files: bool = True) -> None:
    """Raise ValueError naming the flag for any argument that cannot work. Runs before any model or data, and on
    a login node before submission: nothing here depends on the machine (device and amp may still be None). With
    `check_files` False (--print_config) no file or folder is required, checked or read."""
    if args.model not in models_deepmim.MODELS:
        raise ValueError(f"--model {args.model!r} is unknown; choose from {', '.join(sorted(models_deepmim.MODELS))}")
    for flag in ("batch_size", "epochs", "accum_iter", "input_size", "save_freq", "print_freq"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.mask_ratio < 1:
        raise ValueError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    patch = models_deepmim.encoder_patch_size(args.model, args.patch_size)
    if args.input_size % patch:
        raise ValueError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    num_patches = (args.input_size // patch) ** 2
    visible = num_visible(num_patches, args.mask_ratio)
    if not 0 < visible < num_patches:
        raise ValueError(f"--mask_ratio {args.mask_ratio} leaves {visible} of {num_patches} patches visible")
    _validate_blocks(args)
    _validate_targets(args, patch, check_files)
    if args.blr <= 0 or (args.lr is not None and args.lr <= 0):
        raise ValueError("--blr and --lr must be > 0")
    if args.weight_decay < 0 or args.min_lr < 0:
        raise ValueError("--weight_decay and --min_lr must be >= 0")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise ValueError(f"--warmup_epochs must be in [0, --epochs={args.epochs}] (the bound is --epochs), "
                         f"got {args.warmup_epochs}")
    if not 0 <= args.start_epoch < args.epochs:
        raise ValueError(f"--start_epoch must be in [0, --epochs={args.epochs}), got {args.start_epoch}")
    if args.amp is not None and args.amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {args.amp!r}")
    if min(args.save_every_iters, args.save_every_minutes) < 0 or (args.max_bad_images or 0) < 0:
        raise ValueError("--save_every_iters, --save_every_minutes and --max_bad_images must be >= 0")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist_timeout must be > 0 minutes, got {args.dist_timeout}")
    if not check_files:
        return
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise ValueError(f"--resume {args.resume}: no such file")
    if not args.demo:
        if args.data_path is None:
            raise ValueError("--data_path is required (or use --demo for the built-in photographs)")
        check_image_folder(args.data_path, prefer="train")


def _validate_blocks(args: argparse.Namespace) -> None:
    depth = models_deepmim.encoder_depth(args.model, args.depth)
    if args.supervised_blocks is not None:
        try:
            models_deepmim.check_supervised_blocks(args.supervised_blocks, depth)
        except ValueError as err:
            raise ValueError(f"--supervised_blocks: {err}") from None
    blocks = args.supervised_blocks or default_blocks(args.model, depth)
    if args.loss_weights is not None and len(args.loss_weights) != len(blocks):
        raise ValueError(f"--loss_weights has {len(args.loss_weights)} values for {len(blocks)} supervised blocks "
                         f"{list(blocks)}; give one weight per block")


def _validate_targets(args: argparse.Namespace, patch_size: int, check_files: bool = True) -> None:
    if args.hybrid_generator and args.target != "pixel":  # first, so that the message names both flags
        why = "; token ids are discrete and cannot be blended" if args.target == "codebook" else ""
        raise ValueError(f"--hybrid_generator blends reconstructed pixels (paper Eq. 1: a x + (1 - a) x_hat) and "
                         f"needs --target pixel, got --target {args.target}{why}")
    check_target_args(args.target, args.teacher_path, patch_size, args.teacher_model, check_files=check_files)
    masking.mask_teacher_from_args(args, check_files=check_files)
    depth = models_deepmim.encoder_depth(args.model, args.depth)
    check_hybrid_args(args.hybrid_generator, args.hybrid_alphas, args.supervised_blocks or
                      default_blocks(args.model, depth), check_files=check_files)
    if args.hybrid_generator and check_files:  # the generator must see the student's grid: from its file
        check_generator_file(args.hybrid_generator, input_size=args.input_size, patch_size=patch_size)


def default_blocks(model_name: str, depth: int) -> tuple[int, ...]:
    """The blocks a registered model supervises by default."""
    if model_name.startswith("deepmim"):
        return models_deepmim.default_supervised_blocks(depth)
    return (depth,)


class RunResult(NamedTuple):
    model: torch.nn.Module
    stats: dict[str, float]


def main(args: argparse.Namespace) -> RunResult:
    """Pre-train; returns the trained model and the last epoch's averaged stats. An exception is logged naming this
    process's rank before it propagates (the first failing rank of many is the one to read)."""
    with distributed.failures_logged():
        return _main(args)


def _main(args: argparse.Namespace) -> RunResult:
    resolve_args(args)
    validate_args(args)
    check_output_dir(args)  # every rank, before anything is written: a fresh run never writes over another one
    resolve_machine(args)  # device and amp of this machine (in a SLURM job: the compute node)
    distributed.apply_legacy_launcher_args(args)
    dist_info = distributed.init_distributed(args.device, args.dist_url, args.dist_backend, args.output_dir)
    prepare_output_dir(args)  # every rank has checked; --overwrite deletes the old run's files (rank 0)
    config.apply_global_batch(args, dist_info.world_size)  # a config's global batch -> --accum_iter here
    config.resolve_lr(args, dist_info.world_size)  # MAE / paper Appendix A: lr = blr x effective batch / 256
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    setup_logging(args.output_dir)
    device = dist_info.device(args.device)  # 'cuda': this rank's GPU, local rank modulo the GPUs it sees
    logger.info("%s", describe_machine(device, args.amp))  # decided before logging was set up
    if dist_info.distributed:  # logged again now that logging is set up (init ran before it)
        logger.info("distributed init: rank %d/%d (%s)", dist_info.rank, dist_info.world_size,
                    torch.distributed.get_backend())
    logger.info("resolved arguments (a file --config accepts):\n%s", config.config_yaml(args))
    seed_everything(args.seed + dist_info.rank)

    configure_backends(device)  # attention kernels, TF32, cuDNN: chosen per device in one place
    dataset = build_dataset(args)
    loader = build_loader(dataset, args)
    if len(loader) == 0:
        raise ValueError(f"--batch_size {args.batch_size} x {dist_info.world_size} processes exceeds the "
                         f"{len(dataset)} training images: an epoch would train nothing (incomplete batches are "
                         "dropped); lower --batch_size or add images")
    if args.max_bad_images is None:
        args.max_bad_images = max(1, len(loader.sampler) // 100)  # 1 % of this rank's epoch
    target = build_target(args, device)
    model = build_model(args, target.pred_dim, target.loss_type).to(device)
    model.set_grad_checkpointing(args.grad_ckpt)
    eff_batch = args.batch_size * args.accum_iter * dist_info.world_size
    logger.info("model %s, blocks %s, eff. batch %d, lr %.3g, amp %s", args.model, model.supervised_blocks,
                eff_batch, args.lr, args.amp)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    defaults = config.flag_defaults(get_args_parser())  # what runs that predate a flag ran with
    start_step = _resume(model, optimizer, scaler, args, defaults) if args.resume else 0
    targets_fn = build_targets_fn(args, target, model, device)
    mask_fn = masking.build_mask_strategy(args.mask_strategy, masking.mask_teacher_from_args(args),
                                          grid_size=model.grid_size, target=target, device=device)
    if device.type == "cuda":  # warn, naming the flags that fit, before the first step runs out of memory
        warn_if_memory_short(model, args, device, dist_info.world_size, targets_fn, mask_fn, frozen_owners=[target])
    train_model = wrap_ddp(maybe_compile(model, args.compile, args.compile_backend), device)
    ckpt.write_run_info(args)

    stopper = GracefulStop().install()
    log_writer = make_log_writer(args.log_dir)
    writer = ckpt.BackgroundWriter()
    save = partial(_save, model, optimizer, scaler, args, writer)
    on_update = UpdateHook(save, stopper, args.accum_iter, args.save_every_iters, args.save_every_minutes)
    stats: dict[str, float] = {}
    clock = RunClock(args.start_epoch, args.epochs)
    distributed.set_training_timeout(args.dist_timeout)  # start-up is over: a stuck rank now fails the job fast
    try:
        for epoch in range(args.start_epoch, args.epochs):
            clock.log_epoch_start(epoch)
            stats, stop = _train_epoch(train_model, model, loader, dataset, optimizer, scaler, device, epoch, args,
                                       targets_fn, log_writer, start_step, on_update, save, mask_fn)
            start_step = 0
            if stop:
                writer.wait()  # the epoch's checkpoint is on disk before the job exits
                stopper.finish()
        writer.wait()
    finally:
        writer.close()
    stopper.uninstall()
    if args.demo and args.target == "pixel" and distributed.is_main_process():
        panels = reconstructions(model, dataset, targets_fn, args.mask_ratio, mask_noise_fn=mask_fn)
        save_grid_png(panels, Path(args.output_dir) / "reconstructions.png")
    log_summary("pre-training finished", {
        "checkpoints": f"{args.output_dir} (checkpoint-last.pth, checkpoint-<epoch>.pth every {args.save_freq})",
        "log": str(Path(args.output_dir) / "log.txt"), "TensorBoard": args.log_dir or "off",
        "last epoch loss": f"{stats.get('loss', float('nan')):.4f}" if stats else "no epoch trained",
        "wall time": clock.elapsed(),
    })
    if log_writer is not None:
        log_writer.close()
    distributed.cleanup()
    return RunResult(model, stats)


def _resume(model, optimizer, scaler, args: argparse.Namespace, defaults) -> int:
    """`--resume`: after checking that the checkpoint is a pre-training one (`util.resume` then checks that it is
    this experiment's), restore it; returns the steps of the resumed epoch already done."""
    path, state = resume.load_resume_state(args)
    if state is None:
        return 0
    name = (state.get("model_cfg") or {}).get("name")
    if name is not None and name not in models_deepmim.MODELS:
        raise ValueError(f"--resume {path} is a fine-tuning or linear-probing checkpoint (model_cfg name {name!r}, "
                         "written by main_finetune.py or main_linprobe.py), not a pre-training one: continue it with "
                         "that script's --resume, or start pre-training in another --output_dir")
    return resume.restore_training_state(state, model, optimizer, scaler, args, path=path, defaults=defaults)


def _train_epoch(train_model, model, loader: DataLoader, dataset, optimizer, scaler, device: torch.device, epoch: int,
                 args: argparse.Namespace, targets_fn: TargetsFn | None, log_writer, start_step: int,
                 on_update: UpdateHook, save, mask_fn) -> tuple[dict[str, float], bool]:
    """One epoch (from `start_step` after a mid-epoch resume), its checkpoints (checkpoint-last when
    --save_every_minutes is due, on a stop and at the end), log line and reconstruction grid; (stats, stop)."""
    dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch)
    loader.sampler.set_start_step(start_step)
    stats = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch, args, targets_fn, log_writer,
                            start_step, on_update, mask_fn)
    stop, refresh_last = on_update.epoch_end(final=epoch + 1 == args.epochs)
    save(epoch, 0, refresh_last)
    append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
    if log_writer is not None and args.target == "pixel" and args.vis_freq and (epoch + 1) % args.vis_freq == 0:
        panels = reconstructions(model, dataset, targets_fn, args.mask_ratio, mask_noise_fn=mask_fn)
        log_writer.add_image("reconstructions", grid_tensor(panels), epoch)
    if log_writer is not None:
        log_writer.flush()
    return stats, stop


def _save(model, optimizer, scaler, args: argparse.Namespace, writer: ckpt.BackgroundWriter, epoch: int,
          step: int, refresh_last: bool = True) -> None:
    """Epoch ends are written in the background (ranks do not wait for rank 0's disk); mid-epoch saves (periodic,
    timed or on a stop signal) are on disk when this returns. Nothing when no file is due (every rank agrees)."""
    if not ckpt.checkpoint_files(args.output_dir, epoch, step, args.save_freq, args.epochs, refresh_last):
        return
    state = ckpt.training_state(model, optimizer, scaler, epoch, step, args)
    if step != 0:
        writer.wait()
    ckpt.save_training_checkpoint(state, args.output_dir, args.save_freq, args.epochs,
                                  writer=writer if step == 0 else None, refresh_last=refresh_last)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; bad arguments exit with status 2 and one line naming the flag (`util.cli`)."""
    parser = script_parser(__doc__, [get_args_parser()])
    args = resolve_args(config.parse_with_config(parser, argv), parser)
    with user_errors(parser.prog):
        config.maybe_print_config(args, partial(validate_args, check_files=False), parser)  # reads no file
        validate_args(args)
    warn_without_norm_pix(args)
    return args


def warn_without_norm_pix(args: argparse.Namespace) -> None:
    """MAE's parser leaves --norm_pix_loss off, but its recipe (and the paper's, and every file in configs/) uses
    it: say so when a hand-assembled pixel-target run starts without it."""
    if args.target == "pixel" and not args.norm_pix_loss and args.config is None and not args.demo:
        logging.getLogger("main_pretrain").warning(
            "pixel targets without --norm_pix_loss: MAE's and the paper's recipes normalise each target patch; "
            "use a file from configs/pretrain/ or add --norm_pix_loss")


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
