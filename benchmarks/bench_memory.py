"""Training memory of ViT-B DeepMIM and MAE per image and at batch 128 per GPU (issue: GPU readiness).

Activations are the tensors autograd saves for the backward, measured (not modelled) with
`torch.autograd.graph.saved_tensors_hooks` and counted once per storage (`util/memory.py`), from two training-mode
forwards at small batches under the training autocast, with and without `set_grad_checkpointing(True)`. Weights,
gradients, AdamW's two float32 moments and DDP's gradient buckets follow from the parameter count. Saved tensors
are the same bytes on a CPU and a GPU for the same ops; the one difference is attention: run with `--attn sdpa`
(the default here, as on CUDA) the CPU's fused kernel saves what the flash kernel saves (q, k, v, output, log-sum-exp).

    python benchmarks/bench_memory.py                      # ViT-B DeepMIM and MAE, 224 px, bf16, probes of 2 and 4
    python benchmarks/bench_memory.py --batch_size 64 --gpu_gib 32

On a GPU the peak reserved memory of real steps is measured by benchmarks/gpu_check.py (section memory).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models_deepmim  # noqa: E402
from util import memory  # noqa: E402

V100_16GB = 16_945_512_448  # bytes a 16 GB V100 reports (torch.cuda.get_device_properties(0).total_memory)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Training memory per image", add_help=False)
    parser.add_argument("--model", default=["deepmim_vit_base_patch16", "mae_vit_base_patch16"], nargs="+")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"))
    parser.add_argument("--probe_batch", default=2, type=int, help="images of the smaller measuring forward")
    parser.add_argument("--batch_size", default=128, type=int, help="per-GPU batch of the totals")
    parser.add_argument("--gpu_gib", default=V100_16GB / 2**30, type=float,
                        help="GPU memory for the advice column (default: a 16 GB V100, 15.8 GiB)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "math"),
                        help="timm attention path (sdpa: what CUDA runs)")
    parser.add_argument("--device", default="cpu")
    return parser


def part_bytes_per_image(model: models_deepmim.MaskedAutoencoderDeepMIM, amp: str, input_size: int,
                         probe: int, device: torch.device) -> int:
    """Saved bytes per image inside the decoders (the rest is the encoder, the loss and the input)."""

    def decoders_at(batch: int) -> int:
        meter = memory.SavedTensorMeter([*model.parameters(), *model.buffers()])
        inside, starts = [0], {}
        handles = []
        for decoder in model.decoders.values():
            handles.append(decoder.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), meter.total)))
            handles.append(decoder.register_forward_hook(
                lambda m, a, o: inside.__setitem__(0, inside[0] + meter.total - starts[id(m)])))
        imgs = memory.image_batch(input_size, device)(batch)[0]
        try:
            with meter.record(), memory.autocast_for(device, amp):
                out = model(imgs)
            del out
        finally:
            for handle in handles:
                handle.remove()
        return inside[0]

    return (decoders_at(2 * probe) - decoders_at(probe)) // probe


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per checkpointing mode for one registered model."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = models_deepmim.create_model(name, img_size=args.input_size, norm_pix_loss=True).to(device)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = args.attn == "sdpa"
    start = time.perf_counter()
    estimate = memory.estimate_training_memory(model, args.batch_size, input_size=args.input_size, amp=args.amp,
                                               device=device, probe_batch=args.probe_batch)
    decoders = part_bytes_per_image(model, args.amp, args.input_size, args.probe_batch, device)
    seconds = time.perf_counter() - start
    rows = []
    for mode in (estimate, estimate.with_grad_ckpt()):
        ddp = mode.with_ddp()
        rows.append(dict(
            model=name, grad_ckpt=mode.grad_ckpt, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            saved_mib=mode.activations_per_image / 2**20, recompute_mib=mode.recompute_per_image / 2**20,
            decoder_share=decoders / estimate.activations_per_image_plain if not mode.grad_ckpt else None,
            fixed_gib=mode.fixed_activations / 2**30,
            states_gib=(mode.weights + mode.grads + mode.optimizer) / 2**30,
            activations_gib=mode.activations / 2**30, total_gib=mode.total / 2**30, ddp_total_gib=ddp.total / 2**30,
            advice=memory.memory_advice(ddp, int(args.gpu_gib * 2**30), device_name="V100 16GB"), seconds=seconds,
        ))
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    b = args.batch_size
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {args.device}, "
          f"amp {args.amp}, attention {args.attn}, {args.input_size} px, probes {args.probe_batch} and "
          f"{2 * args.probe_batch} images")
    print(f"\n| model | --grad_ckpt | saved for backward, MiB / image | + recomputed block | in decoders | "
          f"weights + grads + AdamW, GiB | activations at {b}, GiB* | total at {b}, GiB** | + DDP buckets | "
          f"fits {args.gpu_gib:.1f} GiB x 0.9 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['decoder_share']:.0f} %" if r["decoder_share"] is not None else "-"
        fit = "yes" if r["advice"] is None else "no"
        print(f"| {r['model']} | {'yes' if r['grad_ckpt'] else 'no'} | {r['saved_mib']:.1f} | {r['recompute_mib']:.1f} "
              f"| {share} | {r['states_gib']:.2f} | {r['activations_gib']:.2f} | {r['total_gib']:.2f} | "
              f"{r['ddp_total_gib']:.2f} | {fit} |")
    print(f"\n* {b} x (saved + recomputed block) + autocast's weight copies ({rows[0]['fixed_gib']:.2f} GiB for "
          f"the first model), + {100 * memory.DEFAULT_FRAGMENTATION:.0f} % allocator fragmentation.")
    print(f"** + weights, grads, AdamW and {memory.DEFAULT_RESERVE / 2**20:.0f} MiB for the CUDA context and "
          "workspaces; the DDP column adds one more copy of the gradients (DDP's buckets).")
    for r in rows:
        if r["advice"]:
            print(f"\n{r['model']}, --grad_ckpt {r['grad_ckpt']}, with DDP, on a {args.gpu_gib:.1f} GiB GPU:\n"
                  f"{r['advice']}")


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [row for name in args.model for row in measure(name, args)]
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main(argparse.ArgumentParser("Training memory per image", parents=[get_args_parser()]).parse_args())
