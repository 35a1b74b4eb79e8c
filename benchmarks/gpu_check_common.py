"""What every section of benchmarks/gpu_check.py shares: the context a section sees, the runner that turns a
section's failure or skip into a result, and the helpers for data, subprocesses and logs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# ------------------------------------------------------------------------------------------------------------------
# Running sections
# ------------------------------------------------------------------------------------------------------------------


class Skip(Exception):
    """Raised by a section that cannot run here; the message is the reason ("no CUDA", ...)."""


@dataclass
class Context:
    """What every section sees: the flags, the device, the work folder, the deadline and the sizes."""

    args: argparse.Namespace
    device: torch.device
    work: Path
    deadline: float
    sizes: dict[str, Any]
    data: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def image_folder(self) -> Path:
        """The generated ImageFolder (made once)."""
        if self.data is None:
            self.data = write_image_folder(self.work / "images", self.sizes["images"])
        return self.data


def run_section(name: str, fn: Callable[[Context], dict[str, Any]], ctx: Context, needs_s: float) -> dict[str, Any]:
    """Run one section; never raises. Result: status (passed / failed / skipped), reason, seconds, numbers."""
    start = time.monotonic()
    if ctx.remaining() < needs_s:
        result: dict[str, Any] = {"status": "skipped", "reason": f"time budget ({ctx.remaining():.0f} s left, "
                                                                 f"needs ~{needs_s:.0f} s)"}
    else:
        print(f"== {name}", flush=True)
        try:
            result = fn(ctx)
            result.setdefault("status", "passed")
        except Skip as why:
            result = {"status": "skipped", "reason": str(why), **getattr(why, "numbers", {})}
        except Exception as err:  # noqa: BLE001 - a failed section is a result, the next one still runs
            result = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.monotonic() - start, 1)
    print(f"   {name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""), flush=True)
    return result


def skip(reason: str, **numbers: Any) -> Skip:
    """A Skip that still carries the numbers measured on the way (the CPU dry run's code path)."""
    err = Skip(reason)
    err.numbers = numbers  # type: ignore[attr-defined]
    return err


def check(condition: bool, result: dict[str, Any], reason: str) -> None:
    """Mark the section failed (keeping its numbers) when `condition` is False; reasons accumulate."""
    if not condition:
        result["status"] = "failed"
        result["reason"] = "; ".join(filter(None, [result.get("reason"), reason]))


# ------------------------------------------------------------------------------------------------------------------
# Helpers: data, subprocesses, logs
# ------------------------------------------------------------------------------------------------------------------


def write_image_folder(root: Path, num_images: int, size: int = 48, classes: int = 2, seed: int = 0) -> Path:
    """An ImageFolder of JPEG crops of scikit-image's colour photographs."""
    from util.datasets import demo_photos

    rng = np.random.default_rng(seed)
    photos = [np.asarray(p) for p in demo_photos()]
    for i in range(num_images):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + size, x:x + size]).save(folder / f"img{i}.jpg", quality=90)
    return root


def subprocess_env() -> dict[str, str]:
    """The children's environment; OMP_NUM_THREADS follows this process's torch threads (1 in a CPU dry run: on a
    shared machine a tiny model's step with two threads waits for a descheduled one and takes 10-50x longer)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::DeprecationWarning",
            "OMP_NUM_THREADS": str(torch.get_num_threads())}


CHILDREN: set[int] = set()  # the commands running now (stopped with their descendants on SIGTERM: kill_children)
STOP_GRACE_S = 10.0  # SIGTERM first: torchrun forwards it to its workers, which it started in sessions of their own


def start_child(cmd: list[str], **popen: Any) -> subprocess.Popen:
    """Start a command in its own process group, inside this check's session."""
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), text=True, **group, **popen)
    CHILDREN.add(proc.pid)
    return proc


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (Linux /proc), wherever its session: torchrun starts its workers with
    start_new_session, so neither a process group nor a session reaches them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(pids: list[int], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM `pids` and all their descendants (listed first: a child whose parent dies moves away), wait up to
    `grace` seconds, then SIGKILL whatever is left. No process of the check survives it holding the GPU."""
    tree = [*pids, *(d for pid in pids for d in descendants(pid))]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(pid) for pid in tree):
            time.sleep(0.1)


def kill_children() -> None:
    """Stop every command still running, with its descendants."""
    stop_tree(sorted(CHILDREN))
    CHILDREN.clear()


def run_command(cmd: list[str], timeout: float) -> tuple[int, str]:
    """(return code, stdout + stderr); a command past its time-out is stopped with its descendants (rc -9)."""
    proc = start_child(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        stop_tree([proc.pid])
        output, _ = proc.communicate()
        return -9, output + f"\n[killed after {timeout:.0f} s]"
    finally:
        CHILDREN.discard(proc.pid)
    return proc.returncode, output


def epoch_losses(output_dir: Path) -> list[float]:
    """train_loss of every epoch from main_pretrain's log.txt (JSON lines)."""
    log = output_dir / "log.txt"
    if not log.exists():
        return []
    return [json.loads(line)["train_loss"] for line in log.read_text().splitlines() if line.strip()]


def pretrain_flags(ctx: Context, out: Path, batch: int, epochs: int, *extra: str) -> list[str]:
    return ["--data_path", str(ctx.image_folder()), "--output_dir", str(out), *ctx.sizes["train_flags"],
            "--batch_size", str(batch), "--epochs", str(epochs), "--warmup_epochs", "1", "--blr", "5e-3",
            "--norm_pix_loss", "--num_workers", str(ctx.sizes["workers"]), "--print_freq", "2",
            "--device", ctx.device.type, *extra]
