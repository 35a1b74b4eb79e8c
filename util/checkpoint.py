"""Checkpoints: atomic save, safe load (`weights_only=True`), RNG capture, newest-checkpoint lookup, the training
state every entry script saves, a background writer, and run_info.json. Resuming from them is `util.resume`.

A checkpoint is a plain dict: {"model", "model_cfg", "optimizer", "scaler", "epoch", "iter", "world_size", "rng",
"args", "git_sha"} plus any extra plain values of the caller (fine-tuning: "best_acc"); `args` is a dict of plain
values, never an argparse Namespace, so every file loads under `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

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


def _process_umask() -> int:
    """The process's umask (read once, at import: reading it means setting it, which would race with threads)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never a truncated file. The file ends
    with the permissions a plain `open()` gives under the process umask (0644 under umask 022), not the temporary
    file's 0600, so teammates on shared cluster storage can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
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

    A `.safetensors` file (tools/export_encoder.py) loads as {"model": its tensors} plus the "model_cfg" its
    metadata holds (JSON). Raises FileNotFoundError for a missing file and ValueError naming the file for one that
    is not a checkpoint, is damaged, or would need arbitrary unpickling (`unloadable_message`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or broken files
        raise ValueError(unloadable_message(path, err)) from err


def unloadable_message(path: Path, err: Exception) -> str:
    """Why `path` did not load, in the project's words: not a checkpoint at all, a damaged one, or one holding
    pickled objects. torch's own text is not quoted: it suggests `weights_only=False`, which would run whatever
    code the file carries."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive; older files are a pickle
        return (f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; this file is "
                f"neither{', it is empty' if not head else ''}): check the path, or copy the file again")
    found = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if found:
        return (f"{path} holds pickled Python objects besides tensors and plain containers (here {found.group(1)});"
                " checkpoints are loaded with weights_only=True because unpickling other objects can run code. "
                "Re-save its weights as plain tensors (e.g. torch.save({'model': state_dict}) where you trust the "
                "file), or export them to .safetensors")
    return (f"{path} is not a loadable checkpoint ({type(err).__name__}: truncated or corrupt, e.g. an interrupted "
            "copy or a full disk): copy it again, or use an earlier checkpoint of the run")


def load_safetensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A `.safetensors` file as a checkpoint: {"model": tensors} plus "model_cfg" when its metadata holds one
    (as JSON: tools/export_encoder.py writes the source checkpoint's). Raises ValueError naming a damaged file."""

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    checkpoint: dict[str, Any] = {"model": state}
    if "model_cfg" in metadata:
        try:
            checkpoint["model_cfg"] = json.loads(metadata["model_cfg"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: its metadata 'model_cfg' is not JSON: {err}") from err
    return checkpoint


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


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   epoch: int, step: int, args: Any, **extra: Any) -> dict[str, Any]:
    """Everything needed to continue the run; plain containers and tensors only (loads with weights_only=True).

    (epoch, iter): taken after `iter` steps (per process) of `epoch`; iter 0 means the whole epoch is done (MAE's
    convention). "model_cfg" is `model.config` when the model has one; `extra` plain values (best_acc, or a
    "model_cfg" of the caller's) are added. Raises TypeError for an extra value that would not load with
    weights_only=True and ValueError for an extra key that would replace a core entry.
    """
    state = {
        "model": model.state_dict(), "model_cfg": getattr(model, "config", None), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "epoch": epoch, "iter": step,
        "world_size": distributed.get_world_size(), "rng": gather_rng(), "args": plain_args(args),
        "git_sha": git_sha(),
    }
    clash = sorted(set(extra) & (set(state) - {"model_cfg"}))
    if clash:
        raise ValueError(f"training_state: extra entries {clash} would replace the checkpoint's own")
    for key, value in extra.items():
        _check_plain(key, value)
    state.update(extra)
    return state


def _check_plain(key: str, value: Any) -> None:
    """TypeError unless `value` is a tensor or plain value (or a list/tuple/dict of those); exact types, since
    subclasses such as numpy.float64 would not load with weights_only=True."""
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(key, item)
        return
    if isinstance(value, dict):
        for name, item in value.items():
            _check_plain(key, name)
            _check_plain(key, item)
        return
    raise TypeError(f"training_state: extra value {key!r} holds a {type(value).__name__}, which would not load with "
                    f"weights_only=True; pass str, int, float, bool, None, tensors, or lists/dicts of those")


def gather_rng() -> list[dict[str, Any]]:
    """RNG states of every rank (index = rank), so a resumed run draws the same crops and masks."""
    state = capture_rng()
    if not distributed.is_dist():
        return [state]
    states: list[Any] = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def checkpoint_files(output_dir: str, epoch: int, step: int, save_freq: int, epochs: int,
                     refresh_last: bool = True) -> list[Path]:
    """The files a save after `step` steps of `epoch` writes: checkpoint-<epoch>.pth at every `save_freq`-th epoch
    end and the last one, and checkpoint-last.pth when `refresh_last` (or mid-epoch, always)."""
    out = Path(output_dir)
    paths = [out / "checkpoint-last.pth"] if refresh_last or step != 0 else []
    if step == 0 and ((epoch + 1) % save_freq == 0 or epoch + 1 == epochs):
        paths.insert(0, out / f"checkpoint-{epoch}.pth")
    return paths


def save_training_checkpoint(state: dict[str, Any], output_dir: str, save_freq: int, epochs: int,
                             writer: BackgroundWriter | None = None, refresh_last: bool = True) -> None:
    """Rank 0 writes `checkpoint_files` (atomically): checkpoint-last.pth unless `refresh_last` is False at an epoch
    end, and checkpoint-<epoch>.pth at every `save_freq`-th epoch end.

    With a `writer`, the files are written in its background thread from a CPU copy taken now, so the other ranks
    do not wait for rank 0's disk; without one (mid-epoch saves, stop signals) they are on disk when this returns,
    after any background write still in flight."""
    if not distributed.is_main_process():
        return
    paths = checkpoint_files(output_dir, state["epoch"], state["iter"], save_freq, epochs, refresh_last)
    write_checkpoint(state, paths, writer)


def write_checkpoint(state: dict[str, Any], paths: list[Path], writer: BackgroundWriter | None = None) -> None:
    """Write `state` atomically to every path (call on rank 0 only): in `writer`'s background thread when given, else
    now (after any background write still in flight, so files land in order). Nothing to write: nothing done."""
    if not paths:
        return
    if writer is not None:
        writer.submit(state, paths)
        return
    for path in paths:
        save_atomic(state, path)


def cpu_copy(value: Any) -> Any:
    """A deep copy of a checkpoint state with every tensor copied to host memory (the live weights and optimizer
    state keep changing while a background thread writes the copy)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(item) for item in value)
    return value


class BackgroundWriter:
    """Writes checkpoints atomically in one background thread, one state at a time.

    `submit` waits for the previous write, copies the state to host memory and returns; `wait` blocks until the
    last write is on disk and raises if it failed. Call `wait` before any synchronous save (order on disk), before
    exiting on a stop signal, and at the end of a run; `close` does the same but only logs a failure (for `finally`
    blocks where another error may be propagating).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], paths: list[Path]) -> None:
        self.wait()
        state = cpu_copy(state)
        self._thread = threading.Thread(target=self._write, args=(state, paths), name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict[str, Any], paths: list[Path]) -> None:
        try:
            for path in paths:
                save_atomic(state, path)
        except BaseException as err:  # reported by the next submit / wait, in the training thread
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint in the background failed: {error}") from error

    def close(self) -> None:
        try:
            self.wait()
        except RuntimeError as err:
            logger.error("%s", err)


def run_info(args: Any) -> dict[str, Any]:
    """What reproduces a run: resolved arguments, git SHA, command line, world size and library versions."""
    import platform
    import sys

    import timm

    return {
        "args": plain_args(args), "git_sha": git_sha(), "command": [sys.executable, *sys.argv],
        "world_size": distributed.get_world_size(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "timm": timm.__version__, "numpy": np.__version__},
    }


def write_run_info(args: Any) -> None:
    """`run_info.json` beside the checkpoints, the same name and content for every entry script (rank 0)."""
    if distributed.is_main_process():
        (Path(args.output_dir) / "run_info.json").write_text(json.dumps(run_info(args), indent=2))
