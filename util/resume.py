"""Resume a run from a checkpoint (`util.checkpoint`), after checking that the checkpoint belongs to this experiment.

Before anything is loaded: every result-changing flag stored in the checkpoint's `args` must equal the current one
(`check_resume_compatible`; differences can be accepted by name with --resume_allow_changes), and a mid-epoch
checkpoint needs the same world size, --batch_size and --accum_iter, because its step count is in per-process
batches (`check_mid_epoch_compatible`, not overridable); the stored weights must fit the model
(`check_model_fits`). Then model, optimizer, grad scaler, schedule position and every rank's RNG are restored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from util import distributed
from util.checkpoint import find_resumable, list_checkpoints, load_checkpoint, plain_args, restore_rng

logger = logging.getLogger(__name__)


# -- compatibility of a checkpoint with this run ----------------------------------------------------------------

#: Stored flags that never change results, so resume does not compare them: paths (a moved dataset or a new output
#: folder is the same experiment), resume bookkeeping (and --overwrite), logging, evaluation and checkpoint cadence,
#: data loading, the process group and device, the precision (an A100 -> V100 requeue is legitimate; its change is
#: logged), and launcher flags.
IGNORED_SETTINGS = frozenset({
    "output_dir", "log_dir", "job_dir", "data_path",
    "resume", "start_epoch", "resume_allow_changes",
    "print_freq", "save_freq", "save_every_iters", "save_every_minutes", "vis_freq", "eval_freq", "max_bad_images",
    "eval", "dist_eval", "num_workers", "pin_mem", "dist_url", "dist_backend", "dist_timeout", "device", "amp",
    "ngpus", "nodes", "timeout", "partition", "use_volta32", "comment", "cluster", "max_requeues", "cpus_per_task",
    "mem_gb",
    "config", "print_config", "overwrite", "grad_ckpt", "compile", "compile_backend", "local_rank", "world_size",
    "dist_on_itp",
})
#: How a fixed --global_batch_size is split over processes: not compared when the global batch is the same.
SPLIT_OF_GLOBAL_BATCH = frozenset({"batch_size", "accum_iter"})
#: Ignored settings whose change is still logged on resume.
LOGGED_SETTINGS = ("amp",)
#: Flags compared only when the current run gives them: the pre-trained source of fine-tuning / probing, which a
#: resumed run need not name again (its weights come from the checkpoint) but which must match when it does.
COMPARED_WHEN_GIVEN = frozenset({"finetune"})


def allowed_changes(value: str | Iterable[str] | None) -> set[str]:
    """--resume_allow_changes as flag names: a list or a comma-separated string, names with or without '--'."""
    if not value:
        return set()
    items = [value] if isinstance(value, str) else list(value)
    names = {part.strip().lstrip("-") for item in items for part in str(item).split(",")}
    return {name for name in names if name}


def changed_settings(saved_args: Mapping[str, Any], args: Any,
                     defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """The result-changing flags that differ: {name: (stored, current)}, in the current run's flag order.

    `saved_args` is a checkpoint's "args" (plain values), `args` a Namespace or dict. Every key present on both sides
    is compared, except IGNORED_SETTINGS (and COMPARED_WHEN_GIVEN when the current value is empty); a key the
    checkpoint lacks (a flag added by newer code) is compared with its code default in `defaults` (the script's
    parser defaults, `util.config.flag_defaults`): a new flag's default keeps the old behaviour, so the older run ran
    with it. Without `defaults`, or for a key without one, it is not compared. Values compare as plain values: a
    tuple equals its list.
    """
    saved, current = plain_args(dict(saved_args)), plain_args(args)
    saved = {**{k: v for k, v in plain_args(dict(defaults or {})).items() if k in current}, **saved}
    ignored = IGNORED_SETTINGS
    if current.get("global_batch_size") is not None and saved.get("global_batch_size") == current["global_batch_size"]:
        ignored = ignored | SPLIT_OF_GLOBAL_BATCH  # the same global batch on another number of GPUs
    return {
        key: (saved[key], value) for key, value in current.items()
        if key in saved and key not in ignored and saved[key] != value
        and not (key in COMPARED_WHEN_GIVEN and value in (None, ""))
    }


def check_resume_compatible(saved_args: Mapping[str, Any], args: Any, allowed: str | Iterable[str] | None = None, *,
                            saved_world_size: int | None = None, world_size: int | None = None,
                            source: str = "the checkpoint", defaults: Mapping[str, Any] | None = None) -> None:
    """Raise ValueError unless the checkpoint's stored flags match the current ones (see `changed_settings`, which
    compares a flag the checkpoint lacks with its code default in `defaults`).

    The error lists every differing flag as `--flag: old -> new` and says how to proceed (another --output_dir, or
    --resume_allow_changes). Flags named in `allowed` (--resume_allow_changes) pass, each logged with a warning;
    naming a flag that did not change is harmless. With both world sizes known, an --lr change is explained by the
    effective batch (lr is derived from it), and a changed effective batch at an unchanged --lr is logged.
    """
    names = allowed_changes(allowed)
    changes = changed_settings(saved_args, args, defaults)
    batches = _effective_batches(saved_args, args, saved_world_size, world_size)
    refused = {key: change for key, change in changes.items() if key not in names}
    if refused:
        raise ValueError(_refusal(refused, batches, source))
    for key, (old, new) in changes.items():
        logger.warning("resume: --%s changed %s -> %s%s (accepted by --resume_allow_changes)", key, _fmt(old),
                       _fmt(new), _lr_note(key, batches))
    _log_tolerated(saved_args, args, batches)
    _warn_unknown(names, saved_args, args)


def checkpoint_world_size(state: Mapping[str, Any]) -> int | None:
    """Processes of the run that wrote `state`: its "world_size", else (older files) the length of its per-rank RNG."""
    if state.get("world_size") is not None:
        return int(state["world_size"])
    rng = state.get("rng")
    return len(rng) if isinstance(rng, (list, tuple)) and rng else None


def check_mid_epoch_compatible(state: Mapping[str, Any], args: Any, world_size: int,
                               path: str | os.PathLike | None = None) -> None:
    """Refuse a mid-epoch checkpoint (iter > 0) under another world size, --batch_size or --accum_iter.

    Its step count is in per-process batches, so under another layout the resumed epoch would skip the wrong samples.
    Raises ValueError naming old and new values; --resume_allow_changes cannot accept it. Epoch-end checkpoints pass.
    """
    step = int(state.get("iter", 0) or 0)
    if step <= 0:
        return
    saved, current = state.get("args") or {}, plain_args(args)
    layout = {
        "world size (processes)": (checkpoint_world_size(state), world_size),
        "--batch_size": (saved.get("batch_size"), current.get("batch_size")),
        "--accum_iter": (saved.get("accum_iter"), current.get("accum_iter")),
    }
    differ = {name: pair for name, pair in layout.items() if None not in pair and pair[0] != pair[1]}
    if differ:
        lines = "\n".join(f"  {name}: {old} -> {new}" for name, (old, new) in differ.items())
        raise ValueError(
            f"{_source(path)} was taken mid-epoch (epoch {state.get('epoch')}, after {step} steps of each process) "
            f"and its step count is in per-process batches, so under this run's layout the resumed epoch would skip "
            f"the wrong samples:\n{lines}\nResume it with the same number of processes, --batch_size and "
            f"--accum_iter, or resume from an epoch-end checkpoint: --resume <output_dir>/checkpoint-<epoch>.pth"
            f"{_epoch_end_hint(path)}. (--resume_allow_changes cannot accept this.)"
        )


def _effective_batches(saved_args: Mapping[str, Any], args: Any, saved_world_size: int | None,
                       world_size: int | None) -> tuple[int, int] | None:
    """(stored, current) batch_size x accum_iter x world size, when all of them are known."""
    current = plain_args(args)
    try:
        old = saved_args["batch_size"] * (saved_args.get("accum_iter") or 1) * saved_world_size
        new = current["batch_size"] * (current.get("accum_iter") or 1) * world_size
    except (KeyError, TypeError):
        return None
    return old, new


def _lr_note(key: str, batches: tuple[int, int] | None) -> str:
    if key != "lr":
        return ""
    if batches is None:
        return " (lr = blr x effective batch / 256 unless --lr is given; the effective batch counts every process)"
    if batches[0] != batches[1]:
        return (f" (effective batch = batch_size x accum_iter x processes: {batches[0]} -> {batches[1]}; "
                f"lr = blr x effective batch / 256 unless --lr is given)")
    return ""


def _refusal(refused: dict[str, tuple[Any, Any]], batches: tuple[int, int] | None, source: str) -> str:
    lines = "\n".join(f"  --{key}: {_fmt(old)} -> {_fmt(new)}{_lr_note(key, batches)}"
                      for key, (old, new) in refused.items())
    return (f"{source} was written by a run with other settings; resuming it would continue a different experiment:\n"
            f"{lines}\nUse another --output_dir for the new run, or pass --resume_allow_changes "
            f"{','.join(refused)} to continue this run with the new values.")


def _log_tolerated(saved_args: Mapping[str, Any], args: Any, batches: tuple[int, int] | None) -> None:
    """Log changes that never block: LOGGED_SETTINGS (--amp) and the effective batch at an unchanged --lr."""
    saved, current = plain_args(dict(saved_args)), plain_args(args)
    for key in LOGGED_SETTINGS:
        if key in saved and key in current and saved[key] != current[key]:
            logger.warning("resume: --%s changed %s -> %s (allowed: it does not change the experiment)", key,
                           _fmt(saved[key]), _fmt(current[key]))
    if batches is not None and batches[0] != batches[1] and saved.get("lr") == current.get("lr"):
        logger.warning("resume: effective batch (batch_size x accum_iter x processes) changed %d -> %d at an "
                       "unchanged --lr", *batches)


def _warn_unknown(names: set[str], saved_args: Mapping[str, Any], args: Any) -> None:
    known = set(saved_args) | set(plain_args(args))
    for name in sorted(names - known):
        logger.warning("--resume_allow_changes names %r, which is no flag of this run or of the checkpoint", name)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _source(path: str | os.PathLike | None) -> str:
    return f"checkpoint {path}" if path else "the checkpoint"


def _epoch_end_hint(path: str | os.PathLike | None) -> str:
    """' (newest here: .../checkpoint-7.pth)' when the checkpoint's folder holds epoch-end files."""
    if not path:
        return ""
    numbered = [p for p in list_checkpoints(Path(path).parent) if p.stem.split("-")[-1].isdigit()]
    if not numbered:
        return ""
    newest = max(numbered, key=lambda p: int(p.stem.split("-")[-1]))
    return f" (newest here: {newest})"


# -- restoring a run ---------------------------------------------------------------------------------------------


def load_resume_state(args: Any) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint --resume names, as (path, state); (None, None) when --resume is empty.

    'auto' takes the newest loadable checkpoint in --output_dir ((None, None), logged, when there is none); a path
    raises FileNotFoundError / ValueError as `load_checkpoint` does.
    """
    resume = getattr(args, "resume", "") or ""
    if not resume:
        return None, None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    path, state = find_resumable(args.output_dir)
    if state is None:
        logger.info("resume auto: no checkpoint in %s, starting from scratch", args.output_dir)
    return path, state


def restore_training_state(state: Mapping[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None, args: Any,
                           path: str | os.PathLike | None = None, *, world_size: int | None = None,
                           check_args: bool = True, defaults: Mapping[str, Any] | None = None) -> int:
    """Continue from `state`: checks first, then model, optimizer, scaler, schedule position and this rank's RNG.

    Before anything is loaded: `check_mid_epoch_compatible` and `check_resume_compatible` (with
    args.resume_allow_changes and the script's flag `defaults`), skipped with check_args=False (e.g. --eval of a
    checkpoint), and a check that the stored weights fit `model`; each raises ValueError. `optimizer` / `scaler`
    None are skipped. `world_size` defaults to the process group's. Sets args.start_epoch and returns the steps of
    that epoch already done.
    """
    world_size = distributed.get_world_size() if world_size is None else world_size
    if check_args:
        check_mid_epoch_compatible(state, args, world_size, path)
        check_resume_compatible(state.get("args") or {}, args, getattr(args, "resume_allow_changes", None),
                                saved_world_size=checkpoint_world_size(state), world_size=world_size,
                                source=_source(path), defaults=defaults)
    check_model_fits(model, state, path)
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    restore_scaler(scaler, state.get("scaler"))
    step = int(state.get("iter", 0) or 0)
    args.start_epoch = state["epoch"] if step > 0 else state["epoch"] + 1
    _restore_rank_rng(state.get("rng") or [], world_size)
    logger.info("resumed from %s: epoch %d, step %d", path, args.start_epoch, step)
    return step


def resume_run(state: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, args: Any, defaults: Mapping[str, Any] | None = None) -> int:
    """An entry script's --resume: the weights only under --eval, else everything (`restore_training_state`, after
    its same-experiment checks). Returns the steps of args.start_epoch already done (0 under --eval). Raises
    ValueError naming --resume when the checkpoint's weights do not fit `model` (e.g. a pre-trained encoder given to
    --resume instead of --finetune)."""
    try:
        check_model_fits(model, state, args.resume)
    except ValueError as err:
        raise ValueError(f"--resume {args.resume} is not a checkpoint of this script (pre-trained encoders go to "
                         f"--finetune): {err}") from err
    if args.eval:
        model.load_state_dict(state["model"])
        return 0
    return restore_training_state(state, model, optimizer, scaler, args, path=args.resume, defaults=defaults)


def check_model_fits(model: torch.nn.Module, state: Mapping[str, Any], path: str | os.PathLike | None = None) -> None:
    """Raise ValueError (naming the file and the differing entries) unless state["model"] loads strictly into `model`.

    Checked before loading, since a failing `load_state_dict` leaves the tensors that did fit already copied.
    """
    if "model" not in state:
        raise ValueError(f"{_source(path)} holds no model weights (no 'model' entry)")
    own, saved = model.state_dict(), state["model"]
    problems = [f"missing {k}" for k in sorted(own.keys() - saved.keys())]
    problems += [f"unexpected {k}" for k in sorted(saved.keys() - own.keys())]
    problems += [f"{k}: {tuple(saved[k].shape)} stored, {tuple(own[k].shape)} here" for k in own
                 if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"{_source(path)} holds another architecture than this run builds{_cfg_diff(model, state)}: "
                         f"{shown}. Use another --output_dir for a new model, or the flags of the stored run.")


def _cfg_diff(model: torch.nn.Module, state: Mapping[str, Any]) -> str:
    saved, own = state.get("model_cfg"), getattr(model, "config", None)
    if not isinstance(saved, Mapping) or not isinstance(own, Mapping):
        return ""
    diff = [f"{k}: {_fmt(saved.get(k))} -> {_fmt(own.get(k))}" for k in sorted(set(saved) | set(own))
            if saved.get(k) != own.get(k)]
    return f" (model_cfg {', '.join(diff)})" if diff else ""


def restore_scaler(scaler: torch.amp.GradScaler | None, saved: Mapping[str, Any] | None) -> None:
    """Load a GradScaler state across precisions.

    A disabled scaler (bf16 / fp32 run) saves {}: an fp16 run resuming it keeps its fresh scaler (logged). An fp16
    checkpoint's scale is ignored (logged) by a run without a scaler. Same precision: loaded as is.
    """
    if scaler is None:
        return
    if scaler.is_enabled() and not saved:
        logger.warning("resume: the checkpoint has no grad-scaler state (written by a bf16 or fp32 run); this fp16 "
                       "run starts a fresh scaler at scale %g", scaler.get_scale())
    elif not scaler.is_enabled() and saved:
        logger.warning("resume: ignoring the checkpoint's grad-scaler state (scale %s, an fp16 run): this run uses "
                       "no scaler (bf16 or fp32)", saved.get("scale"))
    elif scaler.is_enabled():
        scaler.load_state_dict(dict(saved))


def _restore_rank_rng(rng: list[dict[str, Any]], world_size: int) -> None:
    if len(rng) == world_size:
        restore_rng(rng[distributed.get_rank()])
    else:
        logger.warning("resume: checkpoint has RNG for %d ranks, run has %d; RNG not restored", len(rng), world_size)


def resume_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    args: Any, defaults: Mapping[str, Any] | None = None) -> int:
    """Restore everything from --resume (a path, or 'auto': the newest loadable one in --output_dir).

    `load_resume_state` + `restore_training_state`: sets args.start_epoch and returns the number of steps of that
    epoch already done (0, and nothing changed, when 'auto' finds no checkpoint). Raises ValueError for a checkpoint
    of another experiment or layout (see `restore_training_state`).
    """
    path, state = load_resume_state(args)
    if state is None:
        return 0
    return restore_training_state(state, model, optimizer, scaler, args, path=path, defaults=defaults)
