"""Checkpoints: atomic save, safe load (`weights_only=True`), RNG capture, newest-checkpoint lookup.

A checkpoint is a plain dict: {"model", "optimizer", "scaler", "epoch", "iter", "rng", "args", "git_sha"}; `args`
is a dict of plain values, never an argparse Namespace, so every file loads under `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util import distributed

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+|last)\.pth$")


def plain_args(args: Any) -> dict[str, Any]:
    """argparse Namespace (or dict) -> dict of plain values (str, int, float, bool, None, lists of those)."""
    items = vars(args).items() if not isinstance(args, dict) else args.items()

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)

    return {k: plain(v) for k, v in items}


def git_sha() -> str:
    """The commit this code runs from ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only; pickled code is refused.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for one that is corrupt or would
    need arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
        raise ValueError(
            f"cannot load {path} safely (weights_only=True): it is corrupt, truncated, or contains pickled objects "
            f"other than tensors and plain containers, which are refused because unpickling them can run code. "
            f"Cause: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in `folder`, newest first by modification time."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)


# -- random number generator state -----------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def find_resumable(folder: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint in `folder` that loads; corrupt ones are skipped with a warning naming them."""
    for path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except ValueError as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
    return None, None


# -- training state ---------------------------------------------------------------------------------------------


def training_state(model, optimizer, scaler, epoch: int, step: int, args: Any) -> dict[str, Any]:
    """Everything needed to continue the run; plain containers and tensors only (loads with weights_only=True).

    (epoch, iter): taken after `iter` steps of `epoch`; iter 0 means the whole epoch is done (MAE's convention).
    """
    return {
        "model": model.state_dict(), "model_cfg": model.config, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "epoch": epoch, "iter": step, "rng": gather_rng(),
        "args": plain_args(args), "git_sha": git_sha(),
    }


def gather_rng() -> list[dict[str, Any]]:
    """RNG states of every rank (index = rank), so a resumed run draws the same crops and masks."""
    state = capture_rng()
    if not distributed.is_dist():
        return [state]
    states: list[Any] = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def save_training_checkpoint(state: dict[str, Any], output_dir: str, save_freq: int, epochs: int) -> None:
    """Rank 0 writes checkpoint-last.pth, and checkpoint-<epoch>.pth at every `save_freq`-th epoch end."""
    if not distributed.is_main_process():
        return
    out, epoch = Path(output_dir), state["epoch"]
    epoch_end = state["iter"] == 0
    if epoch_end and ((epoch + 1) % save_freq == 0 or epoch + 1 == epochs):
        save_atomic(state, out / f"checkpoint-{epoch}.pth")
    save_atomic(state, out / "checkpoint-last.pth")


def resume_training(model, optimizer, scaler, args: Any) -> int:
    """Restore model, optimizer, scaler, schedule position and this rank's RNG from `--resume`.

    Sets args.start_epoch and returns the number of steps of that epoch already done.
    """
    path, state = find_resumable(args.output_dir) if args.resume == "auto" else \
        (args.resume, load_checkpoint(args.resume))
    if state is None:
        logger.info("resume auto: no checkpoint in %s, starting from scratch", args.output_dir)
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    mid_epoch = state.get("iter", 0) > 0
    args.start_epoch = state["epoch"] if mid_epoch else state["epoch"] + 1
    rng = state.get("rng") or []
    if len(rng) == distributed.get_world_size():
        restore_rng(rng[distributed.get_rank()])
    else:
        logger.warning("resume: checkpoint has RNG for %d ranks, run has %d; RNG not restored", len(rng),
                       distributed.get_world_size())
    logger.info("resumed from %s: epoch %d, step %d", path, args.start_epoch, state.get("iter", 0))
    return state.get("iter", 0)


def write_run_info(args: Any) -> None:
    """The resolved arguments and the git SHA beside the checkpoints (STYLE habit 11)."""
    if distributed.is_main_process():
        info = {"args": plain_args(args), "git_sha": git_sha()}
        (Path(args.output_dir) / "run_info.json").write_text(json.dumps(info, indent=2))
