"""Profile of one pre-training step for benchmarks/bench_pretrain.py's `--profile`: torch.profiler's self time of
every op, grouped into categories (attention, matmul, casts, AdamW, ...), and the printed tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Where one op's self time goes: anything under the optimizer's step / zero_grad is AdamW; otherwise the innermost
# op (or enclosing op) whose name matches, plain copies last (a copy_ inside aten::to is a cast). "=name": exact.
OPTIMIZER_SCOPES = ("Optimizer.step", "Optimizer.zero_grad")
CATEGORIES = (
    ("attention (fused SDPA, fwd + bwd)", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("matmul (linear, conv, bmm)", ("addmm", "=aten::mm", "bmm", "=aten::matmul", "convolution", "mkldnn", "gemm")),
    ("softmax (math attention)", ("softmax",)),
    ("dtype casts (autocast)", ("=aten::to", "_to_copy")),
    ("LayerNorm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("masking, gathers, loss", ("gather", "scatter", "index", "sort", "mse", "cosine")),
    ("other copies (cat, clone, contiguous)", ("copy_", "contiguous", "clone", "=aten::cat")),
)


def categorise(chain: list[str]) -> str:
    """chain: the op's name, then its enclosing ops outwards."""
    if any(name.startswith(OPTIMIZER_SCOPES) for name in chain):
        return "AdamW (step + zero_grad)"
    for categories in (CATEGORIES[:-1], CATEGORIES[-1:]):  # plain copies last: a copy_ inside aten::to is a cast
        for name in chain:
            low = name.lower()
            for category, keys in categories:
                if any(low == k[1:] if k.startswith("=") else k in low for k in keys):
                    return category
    return "other elementwise (add, mul, sum, ...)"


def profile_step(epoch) -> dict[str, Any]:
    """Profile one training step; self time of every op, grouped by `categorise` and listed by op."""
    from torch.profiler import ProfilerActivity, profile

    use_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with profile(activities=activities) as prof:
        epoch(1)
    attr = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    shares: dict[str, float] = {}
    for event in prof.events():
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        category = categorise(chain)
        shares[category] = shares.get(category, 0.0) + getattr(event, attr)
    total = sum(shares.values()) or 1.0
    ops = prof.key_averages()
    top = sorted(ops, key=lambda e: getattr(e, attr), reverse=True)[:15]
    return dict(
        shares={k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
        top=[(e.key, getattr(e, attr) / total, e.count) for e in top],
        table=ops.table(sort_by=attr, row_limit=60),
        total_ms=total / 1e3,
    )


def print_profile(row: dict[str, Any], path: str) -> None:
    prof = row["profile"]
    print(f"\nprofile of one step of {row['config']} ({prof['total_ms']:.0f} ms of self time):")
    print("| category | share of step |\n|---|---|")
    for category, share in prof["shares"].items():
        print(f"| {category} | {100 * share:.1f} % |")
    print("\n| op | share | calls |\n|---|---|---|")
    for op, share, count in prof["top"]:
        print(f"| {op} | {100 * share:.1f} % | {count} |")
    if path != "-":
        Path(path).write_text(prof["table"])
        print(f"full table: {path}")
