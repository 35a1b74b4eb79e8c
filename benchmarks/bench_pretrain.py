"""Pre-training step benchmark: images/s, step time, peak memory and model FLOP utilisation (issue 6).

Each configuration runs the real training step (`engine_pretrain.train_one_epoch`: on-device normalisation of a
uint8 batch, one masking noise for every decoder, autocast, targets, backward, AdamW) on a synthetic uint8 batch
that stays in host memory, as a loader would hand it over. Model FLOPs come from the analytic count in
analysis/flops.py (encoder on visible tokens, every decoder on all tokens, heads on masked tokens, frozen teacher /
generator forward once); the utilisation divides them by the machine's matrix-multiply peak for the autocast dtype,
measured in the same run with large square matmuls.

    # the issue's CPU setting: ViT-B DeepMIM and MAE, bf16, batch 16, + DeepMIM-dagger (defaults: the training
    # script's choices, i.e. explicit-matmul attention on the CPU and fused AdamW)
    python benchmarks/bench_pretrain.py --model deepmim_vit_base_patch16 mae_vit_base_patch16 --batch_size 16 \\
        --amp bf16 --hybrid --steps 3 --warmup 1 --frozen_amp
    # the options: --attn sdpa|math, --adamw foreach|fused
    # where the time goes (torch.profiler, one step of the first configuration)
    python benchmarks/bench_pretrain.py --model deepmim_vit_base_patch16 --batch_size 16 --amp bf16 --profile
    # per target (CLIP / DINO teachers and the codebook's VQ-KD tokenizer with random weights: the real ones' cost)
    python benchmarks/bench_pretrain.py --model deepmim_vit_base_patch16 --target pixel hog clip dino codebook
    # one GPU: see benchmarks/gpu_check.sh

On a CPU shared with other jobs add `--threads 1`: with more threads than free cores every parallel region waits
for a descheduled thread and step times vary 2x (benchmarks/RESULTS.md).

The options are applied here by setting module attributes, so that a measured gain can be moved into the training
code as is: `--attn` sets timm's `Attention.fused_attn` (explicit q k^T, softmax, attn v instead of
scaled_dot_product_attention; main_pretrain.py does it with `timm.layers.set_fused_attn`), `--adamw` picks torch's
AdamW implementation, `--frozen_amp` lets a frozen teacher / generator run under the same autocast as the student on
every device (targets/teachers.frozen_autocast keeps them in float32 on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from timm.optim import param_groups_weight_decay

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_profile import print_profile, profile_step  # noqa: E402

import models_deepmim  # noqa: E402
from analysis import flops  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util import amp as amp_util  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}
TARGETS = ("pixel", "hog", "clip", "dino", "codebook")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Pre-training step benchmark", add_help=False)
    parser.add_argument("--model", default=["deepmim_vit_base_patch16", "mae_vit_base_patch16"], nargs="+",
                        help="registered model names; a DeepMIM and an MAE of one size also give their ratios")
    parser.add_argument("--batch_size", default=16, type=int, help="images per step")
    parser.add_argument("--amp", default="bf16", choices=tuple(AMP_DTYPES), help="autocast dtype ('none': float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time excluded)")
    parser.add_argument("--target", default=["pixel"], nargs="+", choices=TARGETS,
                        help="reconstruction targets to time (clip/dino/codebook: randomly initialised teachers "
                             "and tokenizer, same cost)")
    parser.add_argument("--hybrid", action="store_true",
                        help="also time DeepMIM-dagger (a frozen ViT-B MAE generator, Eq. 1) for each DeepMIM model")
    parser.add_argument("--device", default=None, type=str, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", default=3, type=int, help="timed steps per configuration")
    parser.add_argument("--warmup", default=1, type=int, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--attn", default="auto", choices=("auto", "sdpa", "math"),
                        help="attention: fused scaled_dot_product_attention or explicit matmuls (auto: sdpa on CUDA, "
                             "math elsewhere, as main_pretrain.py)")
    parser.add_argument("--adamw", default="fused", choices=("foreach", "fused"),
                        help="AdamW implementation (main_pretrain.py: fused)")
    parser.add_argument("--frozen_amp", action="store_true",
                        help="run teacher / generator under the student's autocast on every device")
    parser.add_argument("--no_norm_pix_loss", dest="norm_pix_loss", action="store_false",
                        help="raw pixel targets (default: MAE's --norm_pix_loss)")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--profile", default=None, nargs="?", const="-", metavar="FILE",
                        help="profile one step of the first configuration with torch.profiler; print the summary "
                             "(and write the full op table to FILE)")
    parser.add_argument("--peak_sizes", default=None, type=int, nargs="+",
                        help="square matmul sizes for the peak (default: 1024 2048 3072 on CPU, 8192 on CUDA)")
    parser.add_argument("--threads", default=None, type=int, help="torch CPU threads (default: torch's)")
    return parser


def validate(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for arguments that cannot work, before anything is built."""
    unknown = [m for m in args.model if m not in models_deepmim.MODELS]
    if unknown:
        raise ValueError(f"--model {unknown} unknown; choose from {', '.join(sorted(models_deepmim.MODELS))}")
    for flag in ("batch_size", "steps", "input_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.mask_ratio < 1:
        raise ValueError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.hybrid and not any(m.startswith("deepmim") for m in args.model):
        raise ValueError("--hybrid times DeepMIM-dagger: give a deepmim_* --model")


# ------------------------------------------------------------------------------------------------------------------
# Machine peak
# ------------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: list[int], seconds: float = 1.0) -> float:
    """Best FLOP/s of square matmuls of the given sizes in `dtype` (the denominator of the utilisation)."""
    return max(matmul_rates(device, dtype, sizes, seconds).values())


def matmul_rates(device: torch.device, dtype: torch.dtype, sizes: list[int], seconds: float = 1.0) -> dict[int, float]:
    """FLOP/s of square matmuls of each size in `dtype`."""
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm up (oneDNN / cuBLAS kernel selection)
        synchronize(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
            synchronize(device)
        rates[n] = 2 * n**3 * reps / (time.perf_counter() - start)
    return rates


# ------------------------------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------------------------------


def set_attention(module: torch.nn.Module, attn: str) -> None:
    """timm's switch between fused scaled_dot_product_attention ('sdpa') and the explicit matmul path ('math')."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = attn == "sdpa"


def resolve_attn(attn: str, device: torch.device) -> str:
    """'auto' -> what main_pretrain.py picks: fused SDPA on CUDA, explicit matmuls elsewhere."""
    if attn != "auto":
        return attn
    return "sdpa" if device.type == "cuda" else "math"


@contextlib.contextmanager
def frozen_under_student_autocast(enabled: bool):
    """Let teacher / generator forwards inherit the caller's autocast (instead of float32 on the CPU)."""
    if not enabled:
        yield
        return
    import targets.hybrid
    import targets.teachers

    saved = targets.teachers.frozen_autocast, targets.hybrid.frozen_autocast
    targets.teachers.frozen_autocast = targets.hybrid.frozen_autocast = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        targets.teachers.frozen_autocast, targets.hybrid.frozen_autocast = saved


def build_teacher_target(name: str, grid: tuple[int, int], device: torch.device, attn: str):
    """A teacher target with randomly initialised weights: the cost of CLIP / DINO without their files."""
    import timm

    from targets.build import TeacherTarget
    from targets.teachers import TEACHERS, FrozenTeacher

    spec = TEACHERS[name]
    vit = timm.create_model(spec.model, pretrained=False, num_classes=512 if spec.project else 0,
                            img_size=(grid[0] * 16, grid[1] * 16))
    set_attention(vit, attn)
    return TeacherTarget(name, FrozenTeacher(vit.to(device), mean=spec.mean, std=spec.std, project=spec.project))


def build_codebook_target(grid: tuple[int, int], device: torch.device, attn: str):
    """BEiT v2's VQ-KD tokenizer with random weights: ViT-B/16 encoder, 768 -> 768 -> 32 projection, 8,192 codes."""
    import timm

    from targets.build import CodebookTarget
    from targets.teachers import FrozenTeacher
    from targets.tokenizers import VQKD_CODE_DIM, VQKD_ENCODER, VQKD_MEAN, VQKD_STD, VQKD_VOCAB, VQKDTokenizer

    vit = timm.create_model(VQKD_ENCODER, pretrained=False, num_classes=0, global_pool="avg",
                            img_size=(grid[0] * 16, grid[1] * 16))
    set_attention(vit, attn)
    width = vit.embed_dim
    projection = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(),
                                     torch.nn.Linear(width, VQKD_CODE_DIM))
    encoder = FrozenTeacher(vit.to(device), mean=VQKD_MEAN, std=VQKD_STD, project=False)
    return CodebookTarget(VQKDTokenizer(encoder, projection, torch.randn(VQKD_VOCAB, VQKD_CODE_DIM)))


def build_generator(student: models_deepmim.MaskedAutoencoderDeepMIM, args, device: torch.device):
    """DeepMIM-dagger's frozen MAE (ViT-B encoder, 8-block decoder) for the student's grid; random weights."""
    from targets.hybrid import HybridGenerator

    mae = models_deepmim.create_model(f"mae_vit_base_patch{student.patch_size}", img_size=args.input_size,
                                      patch_size=student.patch_size, norm_pix_loss=True)
    set_attention(mae, args.attn)
    return HybridGenerator(mae.to(device), generator_norm_pix=True, student_norm_pix=args.norm_pix_loss)


def make_targets_fn(model, target, generator, mask_ratio: float):
    """What main_pretrain.py's targets function does: model's own pixels (None), a target, or Eq. 1 blends."""
    if generator is not None:
        from targets.hybrid import DEFAULT_ALPHAS, blend_targets

        def hybrid(imgs, noise):
            pixels = model.pixel_targets(imgs)
            x_hat = generator.reconstruct(imgs, noise, mask_ratio)
            return blend_targets(pixels, x_hat, DEFAULT_ALPHAS, model.supervised_blocks)

        return hybrid
    if target is None:
        return None
    return lambda imgs, noise: target(imgs)


def build_optimizer(model: torch.nn.Module, choice: str, device: torch.device) -> torch.optim.Optimizer:
    """main_pretrain.build_optimizer's AdamW with an explicit implementation."""
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    fused = choice == "fused"
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=fused or None, foreach=None if fused else True)


def run_config(
    args, name: str, target_name: str, hybrid: bool, device: torch.device, peak_size: int, profile: bool = False
) -> dict[str, Any]:
    """Build one configuration, run warm-up and timed steps with the engine; return its measurements.

    On the CPU a short matmul burst of `peak_size` precedes each timed step, and the utilisation of each step is
    taken against that adjacent peak (the median over steps is reported): on a machine shared with other jobs
    both see the same share of the cores.
    """
    torch.manual_seed(0)
    patch = models_deepmim.encoder_patch_size(name)
    grid = (args.input_size // patch, args.input_size // patch)
    target = None
    if target_name == "hog":
        from targets.build import HogTarget

        target = HogTarget(patch)
    elif target_name in ("clip", "dino"):
        target = build_teacher_target(target_name, grid, device, args.attn)
    elif target_name == "codebook":
        target = build_codebook_target(grid, device, args.attn)
    pred_dim = None if target is None else target.pred_dim
    loss_type = None if target is None or target.loss_type == "mse" else target.loss_type
    model = models_deepmim.create_model(name, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                        pred_dim=pred_dim, loss_type=loss_type).to(device)
    set_attention(model, args.attn)
    generator = build_generator(model, args, device) if hybrid else None
    optimizer = build_optimizer(model, args.adamw, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    train_model = torch.compile(model) if args.compile else model
    targets_fn = make_targets_fn(model, target, generator, args.mask_ratio)
    batch = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8)
    if device.type == "cuda":
        batch = batch.pin_memory()
    labels, bad = torch.zeros(args.batch_size, dtype=torch.long), torch.zeros(args.batch_size, dtype=torch.long)
    engine_args = SimpleNamespace(accum_iter=1, print_freq=10**9, lr=1e-4, min_lr=0.0, warmup_epochs=1, epochs=2,
                                  mask_ratio=args.mask_ratio, amp=args.amp, max_bad_images=0)

    def epoch(steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        batches = [(batch, labels, bad)] * steps
        train_one_epoch(train_model, batches, optimizer, scaler, device, 0, engine_args, targets_fn)
        synchronize(device)
        return time.perf_counter() - start

    with frozen_under_student_autocast(args.frozen_amp):
        if args.warmup:
            epoch(args.warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # one step at a time (synchronised), so that the median drops a step slowed by another process
        times, peaks = [], []
        for _ in range(args.steps):
            if device.type == "cpu":
                peaks.append(matmul_peak(device, AMP_DTYPES[args.amp], [peak_size], seconds=0.5))
            times.append(epoch(1))
        profile_result = profile_step(epoch) if profile else None
    step = statistics.median(times)
    count = flops.step_flops(model, args.batch_size, args.mask_ratio, target=target, generator=generator)
    label = ("deepmim_dagger" if hybrid else name.split("_vit")[0]) + name[name.index("_vit"):]
    adjacent_mfu = statistics.median(count.total / t / p for t, p in zip(times, peaks)) if peaks else None
    return dict(
        config=f"{label} / {target_name}", model=name, target=target_name, hybrid=hybrid, step=step,
        step_min=min(times), images_per_s=args.batch_size / step, flops=count.total, tflops=count.total / step / 1e12,
        peak_mem_gib=peak_memory_gib(device), profile=profile_result, adjacent_mfu=adjacent_mfu,
    )


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated in the timed steps. CPU: the process's peak resident set so far (covers every
    configuration run before, so only the largest one is meaningful)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def print_report(rows: list[dict[str, Any]], peak: float, args, device: torch.device) -> None:
    dtype = AMP_DTYPES[args.amp]
    mem = "peak GiB" if device.type == "cuda" else "peak RSS GiB*"
    print(f"\ndevice {device_name(device)}, batch {args.batch_size}, amp {args.amp}, attn {args.attn}, "
          f"adamw {args.adamw}, compile {args.compile}, steps {args.steps} (median) after {args.warmup} warm-up")
    print(f"measured {str(dtype).removeprefix('torch.')} matmul peak: {peak / 1e12:.3f} TFLOP/s\n")
    adjacent = device.type == "cpu"
    print(f"| configuration | images/s | step s | {mem} | model TFLOP/step | TFLOP/s | MFU |"
          + (" MFU vs adjacent peak |" if adjacent else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if adjacent else ""))
    for r in rows:
        print(f"| {r['config']} | {r['images_per_s']:.2f} | {r['step']:.3f} | {r['peak_mem_gib']:.1f} | "
              f"{r['flops'] / 1e12:.3f} | {r['tflops']:.3f} | {100 * r['tflops'] * 1e12 / peak:.1f} % |"
              + (f" {100 * r['adjacent_mfu']:.1f} % |" if adjacent else ""))
    if device.type != "cuda":
        print("* CPU: the process's peak resident set up to that row (cumulative). MFU vs adjacent peak: median "
              "over steps of each step's FLOP/s over a matmul burst run just before it.")
    print_ratios(rows)
    for r in rows:
        if r["profile"]:
            print_profile(r, args.profile)


def print_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {(r["model"], r["target"], r["hybrid"]): r for r in rows}
    lines = []
    for (name, target, hybrid), r in by_key.items():
        if name.startswith("deepmim") and not hybrid:
            mae = by_key.get((name.replace("deepmim", "mae", 1), target, False))
            if mae:
                lines.append(_ratio_line(f"DeepMIM / MAE ({name.split('_', 1)[1]}, {target})", r, mae))
            dagger = by_key.get((name, target, True))
            if dagger:
                lines.append(_ratio_line(f"DeepMIM-dagger / DeepMIM ({name.split('_', 1)[1]}, {target})", dagger, r))
    if lines:
        print("\n| ratio | step time | FLOPs | time / FLOP ratio |\n|---|---|---|---|")
        print("\n".join(lines))


def _ratio_line(title: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    time_ratio, flop_ratio = a["step"] / b["step"], a["flops"] / b["flops"]
    return f"| {title} | {time_ratio:.3f} | {flop_ratio:.3f} | {time_ratio / flop_ratio:.3f} |"



def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"cpu ({torch.get_num_threads()} threads)"


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    args.device = amp_util.resolve_device(args.device)  # the training scripts' rule: no silent CPU fallback
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.attn = resolve_attn(args.attn, device)
    if device.type == "cuda":
        amp_util.set_tf32(True)
    sizes = args.peak_sizes or ([8192] if device.type == "cuda" else [1024, 2048, 3072])
    rates = matmul_rates(device, AMP_DTYPES[args.amp], sizes)
    peak, peak_size = max(rates.values()), max(rates, key=rates.get)
    configs = [(name, target, False) for name in args.model for target in args.target]
    configs += [(name, "pixel", True) for name in args.model if args.hybrid and name.startswith("deepmim")]
    rows = []
    for i, (name, target, hybrid) in enumerate(configs):
        rows.append(run_config(args, name, target, hybrid, device, peak_size, profile=bool(args.profile) and i == 0))
        print(f"{rows[-1]['config']}: {rows[-1]['step']:.3f} s/step", flush=True)
    peak_after = matmul_peak(device, AMP_DTYPES[args.amp], sizes)  # machine noise shows as a change
    if not math.isclose(peak, peak_after, rel_tol=0.1):
        print(f"note: the matmul peak moved from {peak / 1e12:.3f} to {peak_after / 1e12:.3f} TFLOP/s during the run")
    print_report(rows, max(peak, peak_after), args, device)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Pre-training step benchmark", parents=[get_args_parser()])
    cli_args = parser.parse_args()
    cli_args.device = cli_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        validate(cli_args)
    except ValueError as err:
        parser.error(str(err))
    main(cli_args)
