"""No host syncs between logging steps of pre-training, checked on a GPU with torch's sync debugger.

    python benchmarks/sync_check.py --device cuda        # benchmarks/gpu_check.sh runs it

Runs a few real pre-training steps (main_pretrain's own builders, `engine_pretrain.train_one_epoch` with the update
hook that checks stop signals and the checkpoint timer at every update, a tiny model on the demo photographs, pixel
and HOG targets) with `torch.cuda.set_sync_debug_mode("error")` over the steps between the first and the last (those
two read the losses back for logging, a deliberate sync every `--print_freq` steps), so any synchronising call in the
step raises. Then the same steps under fp16 with the GradScaler (the V100 path), with the debugger set to "warn":
the synchronising calls per step are counted and printed (`fp16: N host syncs in K steps`; 0 expected). Exit status
0 when every check passes. The step runner is shared with tests/test_host_syncs.py, whose CPU proxy checks that no
step builds a tensor from Python data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main_pretrain  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util.amp import configure_backends, resolve_machine  # noqa: E402
from util.preemption import GracefulStop  # noqa: E402
from util.training import UpdateHook  # noqa: E402

STEPS = 5
# main_pretrain.py's flags of the tiny model (the same as tests/conftest.py's TINY_FLAGS)
TINY_FLAGS = ["--input_size", "32", "--patch_size", "8", "--embed_dim", "64", "--depth", "4", "--num_heads", "4",
              "--decoder_embed_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "4"]


class Steps:
    """The first `steps` batches of a loader; `on_step(i)` runs right before batch i is handed to the engine, after
    the loader has produced it (the loader's own work is not part of the checked step)."""

    def __init__(self, loader: Iterable, steps: int, on_step: Callable[[int], None]):
        self.loader, self.steps, self.on_step = loader, steps, on_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        for step, batch in zip(range(self.steps), self.loader):
            self.on_step(step)
            yield batch
        self.on_step(-1)


def pretrain_args(target: str, device: str, output_dir: Path, print_freq: int,
                  amp: str | None = None) -> argparse.Namespace:
    """main_pretrain's flags for a tiny DeepMIM on the demo photographs, resolved for this machine."""
    parser = main_pretrain.get_args_parser()
    argv = ["--demo", *TINY_FLAGS, "--target", target, "--device", device, "--batch_size", "4", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", str(print_freq),
            "--output_dir", str(output_dir), *(["--amp", amp] if amp else [])]
    args = main_pretrain.resolve_args(parser.parse_args(argv), parser)
    main_pretrain.validate_args(args)
    resolve_machine(args)
    return args


def run_steps(args: argparse.Namespace, on_step: Callable[[int], None]) -> dict[str, float]:
    """`STEPS` pre-training steps of epoch 0, built as main_pretrain builds a run."""
    device = torch.device(args.device)
    configure_backends(device)
    dataset = main_pretrain.build_dataset(args)
    loader = main_pretrain.build_loader(dataset, args)
    loader.sampler.set_epoch(0)
    target = main_pretrain.build_target(args, device)
    model = main_pretrain.build_model(args, target.pred_dim, target.loss_type).to(device)
    args.lr, args.max_bad_images = args.blr * args.batch_size / 256, 0
    optimizer = main_pretrain.build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    targets_fn = main_pretrain.build_targets_fn(args, target, model, device)
    hook = UpdateHook(lambda epoch, step: None, GracefulStop(), args.accum_iter, args.save_every_iters,
                      args.save_every_minutes)  # the per-update stop / timer check of a real run
    return train_one_epoch(model, Steps(loader, STEPS, on_step), optimizer, scaler, device, 0, args, targets_fn,
                           on_update=hook)


def check_no_sync(target: str, device: str, output_dir: Path,
                  set_mode: Callable[[str], None] = torch.cuda.set_sync_debug_mode) -> dict[str, float]:
    """`STEPS` steps with the sync debugger set to "error" between the first and the last step (raises on a
    synchronising call there); the debugger is back at "default" afterwards, whatever happened."""
    args = pretrain_args(target, device, output_dir, print_freq=100)  # logs (and syncs) at the first and last step
    try:
        return run_steps(args, lambda step: set_mode("error" if 1 <= step < STEPS - 1 else "default"))
    finally:
        set_mode("default")


def count_syncs(target: str, device: str, output_dir: Path, amp: str,
                set_mode: Callable[[str], None] = torch.cuda.set_sync_debug_mode) -> int:
    """Synchronising calls in the `STEPS - 2` steps between the first and the last, with the debugger at "warn"
    (each such call warns once per call site and step; all warnings are kept)."""
    args = pretrain_args(target, device, output_dir, print_freq=100, amp=amp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run_steps(args, lambda step: set_mode("warn" if 1 <= step < STEPS - 1 else "default"))
        finally:
            set_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="a CUDA device (the sync debugger is CUDA's)")
    args = parser.parse_args(argv)
    failed = []
    for target in ("pixel", "hog"):
        with tempfile.TemporaryDirectory() as out:
            try:
                stats = check_no_sync(target, args.device, Path(out))
                print(f"{target}: no host sync between logging steps (loss {stats['loss']:.4f})")
            except RuntimeError as err:
                failed.append(target)
                print(f"{target}: FAILED: {err}")
    with tempfile.TemporaryDirectory() as out:
        syncs = count_syncs("pixel", args.device, Path(out), amp="fp16")
    print(f"fp16: {syncs} host syncs in {STEPS - 2} steps")
    return 1 if failed or syncs else 0


if __name__ == "__main__":
    sys.exit(main())
