"""A run's output folder: a new run never writes over a started or finished one.

Starting a run (no --resume) in an --output_dir that already holds a run's results (checkpoints or log.txt) would
overwrite its checkpoint-last.pth, run_info.json and figures, append a second epoch 0 to its log.txt and leave its
other checkpoints beside the new ones (where `--resume auto` would later mix the two). That is refused, naming the
two ways on: `--resume auto` continues that run, a fresh --output_dir starts another. `--overwrite` says to start
over in that folder: the old run's files are deleted first, so the folder holds one run.

Every rank checks before the process group starts (`check_output_dir`, read-only); after it, `prepare_output_dir`
waits for every rank to have checked, and rank 0 deletes the old files when asked: nothing is written before every
rank has looked at the folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from util import distributed
from util.checkpoint import CHECKPOINT_PATTERN

logger = logging.getLogger(__name__)

BEST_CHECKPOINT = "checkpoint-best.pth"
LOG_FILE = "log.txt"
#: Files of a run besides its checkpoints and log: arguments, console, figures, --eval records, TensorBoard events.
OTHER_RUN_FILES = ("run_info.json", "console.log", "reconstructions.png")
OTHER_RUN_PATTERNS = ("eval_*.json", "events.out.tfevents.*")


def add_overwrite_arg(group: argparse._ActionsContainer) -> None:
    """`--overwrite`: start a new run in an --output_dir that holds one, deleting that run's files first."""
    group.add_argument("--overwrite", action="store_true",
                       help="start a new run in an --output_dir that already holds one, deleting its checkpoints, "
                            "logs and figures first (without it such a folder is refused: --resume auto continues "
                            "the run there)")


def run_results(folder: str | Path) -> list[Path]:
    """The files that show `folder` holds a run: its checkpoints and its log.txt (epochs trained)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if CHECKPOINT_PATTERN.match(p.name) or p.name in (BEST_CHECKPOINT, LOG_FILE))


def run_files(folder: str | Path) -> list[Path]:
    """Every file a run writes into `folder` (results, arguments, console, figures, eval records, events)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    others = [folder / name for name in OTHER_RUN_FILES if (folder / name).is_file()]
    others += [p for pattern in OTHER_RUN_PATTERNS for p in folder.glob(pattern) if p.is_file()]
    return sorted(set(run_results(folder)) | set(others))


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse (ValueError naming the folder and the ways on) a new run in an --output_dir that holds a run, unless
    --overwrite. A run that resumes, an --eval and a run without --output_dir pass. Reads, never writes."""
    if args.resume or getattr(args, "eval", False) or not args.output_dir or getattr(args, "overwrite", False):
        return
    found = run_results(args.output_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ValueError(f"--output_dir {args.output_dir} already holds a run ({names}): continue it with --resume "
                         "auto, start the new run in a fresh --output_dir, or pass --overwrite to delete that run's "
                         "files and start over")


def prepare_output_dir(args: argparse.Namespace) -> None:
    """After the process group is up, before anything is written: wait until every rank has run `check_output_dir`,
    then (rank 0, with --overwrite, no --resume, no --eval) delete the previous run's files in --output_dir and
    --log_dir."""
    distributed.barrier()
    if (args.resume or getattr(args, "eval", False) or not getattr(args, "overwrite", False)
            or not distributed.is_main_process()):
        return
    folders = {Path(d) for d in (args.output_dir, getattr(args, "log_dir", None)) if d}
    deleted = [p for folder in sorted(folders) for p in run_files(folder)]
    for path in deleted:
        path.unlink(missing_ok=True)
    if deleted:
        logger.warning("--overwrite: deleted the previous run's %d files in %s (%s)", len(deleted),
                       ", ".join(map(str, sorted(folders))), ", ".join(p.name for p in deleted[:6]))
