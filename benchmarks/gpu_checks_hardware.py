"""benchmarks/gpu_check.py's sections on the machine and what training takes of it: machine (capability, arch list,
util/amp.py's decisions), memory (peak reserved memory against util/memory.py's estimate) and throughput (img/s and
MFU against spec-sheet and measured peaks)."""

from __future__ import annotations

import gc
import re
from types import SimpleNamespace
from typing import Any

import torch
from gpu_check_common import Context, GiB, check, skip

import models_deepmim
from util import amp as amp_util
from util import memory

V100_16GB = 16_945_512_448  # total_memory a 16 GB V100 reports
CUDA_CONTEXT = 512 * 2**20  # what the CUDA context takes of a V100's memory besides torch's allocator (approx.)

# Dense (no sparsity) tensor-core peak in TFLOP/s for bf16 (fp16 on V100, which has no bf16 tensor cores), per GPU,
# from NVIDIA's data sheets. Patterns are matched against torch.cuda.get_device_name(), most specific first.
SPEC_PEAKS: tuple[tuple[str, float, str], ...] = (
    # "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979 TFLOPS (SXM) / 1,513 (PCIe) / 1,671 (NVL), "with sparsity"
    (r"H100.*PCIe", 756.0, "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity (PCIe), dense = half"),
    (r"H100.*NVL", 835.0, "NVIDIA H100 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL), dense = half"),
    # "NVIDIA H200 Tensor Core GPU" datasheet: BF16 1,979 TFLOPS (SXM) / 1,671 (NVL), with sparsity
    (r"H200.*NVL", 835.0, "NVIDIA H200 datasheet: 1,671 TFLOPS bf16 with sparsity (NVL), dense = half"),
    (r"GH200", 989.0, "NVIDIA GH200 Grace Hopper datasheet: 1,979 TFLOPS bf16 with sparsity, dense = half"),
    (r"H200", 989.0, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM), dense = half"),
    (r"H100", 989.0, "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity (SXM), dense = half"),
    # "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 TFLOPS (624 with sparsity), SXM and PCIe
    (r"A100", 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    # "NVIDIA A30" datasheet: BF16 165 TFLOPS (330 with sparsity)
    (r"\bA30\b", 165.0, "NVIDIA A30 datasheet: BF16 165 TFLOPS dense (330 with sparsity)"),
    # "NVIDIA L40S" datasheet: BF16 362.05 TFLOPS (733 with sparsity)
    (r"L40S", 362.0, "NVIDIA L40S datasheet: BF16 362 TFLOPS dense (733 with sparsity)"),
    # "NVIDIA A10" datasheet: BF16 125 TFLOPS (250 with sparsity)
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: BF16 125 TFLOPS dense (250 with sparsity)"),
    # "NVIDIA L4" datasheet: BF16 121 TFLOPS (242 with sparsity)
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: BF16 121 TFLOPS dense (242 with sparsity)"),
    # "NVIDIA V100 Tensor Core GPU" datasheet: tensor performance 125 TFLOPS (SXM2), 112 (PCIe), V100S 130
    (r"V100S", 130.0, "NVIDIA V100S datasheet: 130 TFLOPS fp16 tensor"),
    (r"V100.*PCIE", 112.0, "NVIDIA V100 datasheet: 112 TFLOPS fp16 tensor (PCIe)"),
    (r"V100", 125.0, "NVIDIA V100 datasheet: 125 TFLOPS fp16 tensor (SXM2)"),
)


def spec_peak(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 / fp16 tensor peak in FLOP/s, its source) for a GPU name; (None, why) when unknown."""
    for pattern, tflops, source in SPEC_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops * 1e12, source
    return None, f"no spec-sheet peak known for {device_name!r}"


def section_machine(ctx: Context) -> dict[str, Any]:
    """GPU, capability, arch list of this build, and util/amp.py's decisions (the cluster path)."""
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                              "driver": amp_util.nvidia_driver_version(), "gpus_requested": amp_util.gpus_requested(),
                              "arch_list": list(torch.cuda.get_arch_list()) if torch.cuda.is_available() else []}
    if not ctx.cuda:
        result.update(default_amp_cpu=amp_util.default_amp("cpu"))
        raise skip("no CUDA", **result)
    capability = amp_util.cuda_capability(ctx.device)
    props = torch.cuda.get_device_properties(ctx.device)
    result.update(gpu=torch.cuda.get_device_name(ctx.device), capability=f"{capability[0]}.{capability[1]}",
                  total_memory_gib=props.total_memory / GiB, default_amp=amp_util.default_amp(str(ctx.device)),
                  autocast_dtype=str(amp_util.autocast_dtype_for(ctx.device)),
                  is_bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    try:
        amp_util.check_cuda_arch(str(ctx.device))
        result["check_cuda_arch"] = "ok"
    except RuntimeError as err:
        result["check_cuda_arch"] = str(err)
        check(False, result, "this torch build has no kernels for the GPU")
    result["decision"] = amp_util.describe_machine(ctx.device, result["default_amp"])  # what a run logs at start
    expected = "bf16" if capability >= amp_util.NATIVE_BF16_CAPABILITY else "fp16"
    check(result["default_amp"] == expected, result, f"default amp {result['default_amp']}, expected {expected}")
    return result


def train_steps(model: torch.nn.Module, device: torch.device, amp: str, batch: int, input_size: int,
                steps: int, targets_fn: Any = None) -> None:
    """`steps` real pre-training steps (engine_pretrain.train_one_epoch, fused AdamW) on a synthetic uint8 batch,
    with the run's `targets_fn` (None: pixels)."""
    from bench_pretrain import build_optimizer

    from engine_pretrain import train_one_epoch

    optimizer = build_optimizer(model, "fused", device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    samples = torch.randint(0, 256, (batch, 3, input_size, input_size), dtype=torch.uint8)
    labels = torch.zeros(batch, dtype=torch.long)
    engine_args = SimpleNamespace(accum_iter=1, print_freq=10**9, lr=1e-4, min_lr=0.0, warmup_epochs=1, epochs=2,
                                  mask_ratio=0.75, amp=amp, max_bad_images=0)
    train_one_epoch(model, [(samples, labels, labels)] * steps, optimizer, scaler, device, 0, engine_args, targets_fn)


def release_cuda(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_run(ctx: Context, grad_ckpt: bool, cap_bytes: int | None, amp: str,
               clip: bool = False) -> dict[str, Any]:
    """Peak reserved / allocated memory of 3 training steps in a fresh model, optionally under a memory cap; `clip`:
    a CLIP-target model with its frozen teacher (built inside, so that the teacher counts in the peak)."""
    torch.manual_seed(0)
    release_cuda(ctx.device)
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    if cap_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), ctx.device)
    run: dict[str, Any] = {"grad_ckpt": grad_ckpt, "cap_gib": None if cap_bytes is None else cap_bytes / GiB}
    try:
        if clip:
            model, targets_fn, _ = clip_run(ctx, amp)[:3]
        else:
            model, targets_fn = models_deepmim.create_model(ctx.sizes["mem_model"], img_size=ctx.sizes["mem_input"],
                                                            norm_pix_loss=True).to(ctx.device), None
        model.set_grad_checkpointing(grad_ckpt)
        train_steps(model, ctx.device, amp, ctx.sizes["mem_batch"], ctx.sizes["mem_input"], steps=3,
                    targets_fn=targets_fn)
        torch.cuda.synchronize(ctx.device)
        run.update(fits=True, peak_reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / GiB,
                   peak_allocated_gib=torch.cuda.max_memory_allocated(ctx.device) / GiB)
    except torch.OutOfMemoryError:
        run.update(fits=False, peak_reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / GiB)
    finally:
        model = targets_fn = None  # noqa: F841 - drop the model and the teacher before emptying the cache
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        release_cuda(ctx.device)
    return run


def clip_run(ctx: Context, amp: str) -> tuple[torch.nn.Module, Any, Any, Any]:
    """(model, targets_fn, mask_fn, target) of a CLIP-target run at the memory section's size, built as
    main_pretrain builds a run, with the check's random-weight CLIP teacher."""
    from gpu_checks_cluster import teacher_file

    import engine_pretrain
    import main_pretrain
    from targets import masking

    flags = ["--data_path", str(ctx.image_folder()), "--model", ctx.sizes["mem_model"], "--input_size",
             str(ctx.sizes["mem_input"]), "--batch_size", str(ctx.sizes["mem_batch"]), *teacher_file(ctx)[1]]
    args = main_pretrain.parse_args(flags)
    args.device, args.amp = str(ctx.device), amp
    target = engine_pretrain.build_target(args, ctx.device)
    model = engine_pretrain.build_model(args, target.pred_dim, target.loss_type).to(ctx.device)
    targets_fn = engine_pretrain.build_targets_fn(args, target, model, ctx.device)
    mask_fn = masking.build_mask_strategy(args.mask_strategy, None, grid_size=model.grid_size, target=target,
                                          device=ctx.device)
    return model, targets_fn, mask_fn, (args, target)


def clip_estimate(ctx: Context, amp: str) -> memory.MemoryEstimate:
    """util/memory.py's estimate of the CLIP-target run, through the start-up check's own probe (the run's targets,
    the frozen teacher counted)."""
    import engine_pretrain

    model, targets_fn, mask_fn, (args, target) = clip_run(ctx, amp)
    make_batch, frozen = engine_pretrain.memory_probe(model, args, ctx.device, targets_fn, mask_fn, [target])
    return memory.estimate_training_memory(model, ctx.sizes["mem_batch"], make_batch=make_batch, amp=amp,
                                           device=ctx.device, frozen=frozen)


def section_memory(ctx: Context) -> dict[str, Any]:
    """Peak reserved memory at batch 128 (ViT-B DeepMIM), with / without --grad_ckpt and under a 16 GB cap, against
    util/memory.py's estimate and advice."""
    amp = amp_util.default_amp(str(ctx.device)) if ctx.cuda else "none"
    torch.manual_seed(0)
    probe = models_deepmim.create_model(ctx.sizes["mem_model"], img_size=ctx.sizes["mem_input"],
                                        norm_pix_loss=True).to(ctx.device)
    estimate = memory.estimate_training_memory(probe, ctx.sizes["mem_batch"], input_size=ctx.sizes["mem_input"],
                                               amp=amp, device=ctx.device)
    del probe
    cap = V100_16GB - CUDA_CONTEXT
    estimates = {False: estimate, True: estimate.with_grad_ckpt()}
    clip = clip_estimate(ctx, amp)
    release_cuda(ctx.device)
    result: dict[str, Any] = {"model": ctx.sizes["mem_model"], "batch": ctx.sizes["mem_batch"], "amp": amp,
                              "estimate": {str(k): v.summary() for k, v in estimates.items()},
                              "estimate_clip": clip.summary(),
                              "advice_16gb": memory.memory_advice(estimate, V100_16GB, device_name="V100 16GB")}
    check(clip.frozen > 0, result, "the CLIP teacher's weights are not counted")
    if not ctx.cuda:
        if result.get("status") == "failed":
            return result
        raise skip("no CUDA (estimate only)", **result)
    runs = {}
    for grad_ckpt in (False, True):
        for cap_bytes in (None, cap):
            run = memory_run(ctx, grad_ckpt, cap_bytes, amp)
            est = estimates[grad_ckpt]
            run["estimate_gib"] = est.total / GiB
            if run["fits"] and cap_bytes is None:  # the allocator's peak: the estimate without the CUDA context
                run["estimate_over_measured"] = (est.total - est.reserve) / (run["peak_reserved_gib"] * GiB)
            run["advice_says_fits"] = memory.memory_advice(est, V100_16GB) is None
            runs[f"ckpt={grad_ckpt} cap={'16GB' if cap_bytes else 'none'}"] = run
    clip_measured = memory_run(ctx, False, None, amp, clip=True)
    if clip_measured["fits"]:
        peak = clip_measured["peak_reserved_gib"] * GiB
        clip_measured["estimate_over_measured"] = (clip.total - clip.reserve) / peak
    runs["clip ckpt=False cap=none"] = clip_measured
    result["runs"] = runs
    plain, ckpt = runs["ckpt=False cap=none"], runs["ckpt=True cap=none"]
    check(plain["fits"] and ckpt["fits"], result, "batch 128 does not fit the whole GPU")
    if plain["fits"] and ckpt["fits"]:
        check(ckpt["peak_reserved_gib"] < plain["peak_reserved_gib"], result, "--grad_ckpt did not lower the peak")
        for run in (plain, ckpt, clip_measured) if clip_measured["fits"] else (plain, ckpt):
            ratio = run["estimate_over_measured"]
            check(0.75 <= ratio <= 1.33, result, f"estimate / measured = {ratio:.2f} (grad_ckpt={run['grad_ckpt']})")
    check(runs["ckpt=True cap=16GB"]["fits"], result, "--grad_ckpt does not fit a 16 GB cap")
    for key in ("ckpt=False cap=16GB", "ckpt=True cap=16GB"):
        run = runs[key]
        run["advice_consistent"] = run["fits"] or not run["advice_says_fits"]  # an OOM must have been warned about
        check(run["advice_consistent"], result, f"{key}: out of memory although memory_advice predicted a fit")
    return result


def bench_args(ctx: Context, compile_model: bool, amp: str) -> SimpleNamespace:
    """The namespace benchmarks/bench_pretrain.run_config reads."""
    return SimpleNamespace(input_size=ctx.sizes["bench_input"], norm_pix_loss=True, attn="sdpa" if ctx.cuda else "math",
                           adamw="fused", amp=amp, compile=compile_model, batch_size=ctx.sizes["bench_batch"],
                           mask_ratio=0.75, warmup=ctx.sizes["bench_warmup"], steps=ctx.sizes["bench_steps"],
                           frozen_amp=False)


def section_throughput(ctx: Context) -> dict[str, Any]:
    """img/s and MFU (vs spec sheet and vs measured matmul peak), eager (the one compile is the `compile` section)."""
    import bench_pretrain

    amp = amp_util.default_amp(str(ctx.device)) if ctx.cuda else "none"  # CPU: bf16 is slow on tiny shapes
    dtype = bench_pretrain.AMP_DTYPES[amp]
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else bench_pretrain.device_name(ctx.device)
    spec, source = spec_peak(name) if ctx.cuda else (None, "CPU: no spec-sheet peak")
    measured = bench_pretrain.matmul_peak(ctx.device, dtype, ctx.sizes["peak_sizes"], seconds=1.0 if ctx.cuda else 0.2)
    result: dict[str, Any] = {"device": name, "amp": amp, "spec_peak_tflops": spec and spec / 1e12,
                              "spec_source": source, "matmul_peak_tflops": measured / 1e12, "rows": []}
    configs = [(m, False) for m in ctx.sizes["bench_models"]]  # uncompiled: the check's one compile is `compile`
    for model_name, compiled in configs:
        if ctx.remaining() < 30:
            result.setdefault("not_run", []).append(f"{model_name} compile={compiled}: time budget")
            continue
        row = bench_pretrain.run_config(bench_args(ctx, compiled, amp), model_name, "pixel", False, ctx.device,
                                        ctx.sizes["peak_sizes"][0])
        flops_per_s = row["tflops"] * 1e12
        result["rows"].append({
            "model": model_name, "compile": compiled, "batch": ctx.sizes["bench_batch"],
            "images_per_s": row["images_per_s"], "step_s": row["step"], "model_tflop_per_step": row["flops"] / 1e12,
            "tflops": row["tflops"], "mfu_spec": spec and flops_per_s / spec, "mfu_measured": flops_per_s / measured,
            "peak_mem_gib": row["peak_mem_gib"],
        })
        del row
        release_cuda(ctx.device)
    check(bool(result["rows"]), result, "no configuration ran")
    if not ctx.cuda and result.get("status") != "failed":
        raise skip("no CUDA (CPU code path, no compile)", **result)
    return result
