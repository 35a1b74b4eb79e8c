"""Experiment config files (YAML) for the entry scripts, timm's `train.py -c args.yaml` convention.

A config file is a flat YAML mapping from flag names (argparse `dest`s: `batch_size`, not `--batch-size`) to
values. It sets the parser's defaults; flags given on the command line override it. Unknown keys and values of
the wrong type are errors naming the key and the file. `config_yaml` writes the fully resolved arguments back as
a file that `--config` accepts, so `--print_config` output is a dry run a user can diff and re-run.

Configs state the *global* batch (`global_batch_size`); the entry script derives `--accum_iter` from it, the
per-process `--batch_size` and the number of processes (`derive_accum_iter`), so one file runs on 8 or 32 GPUs.

This module knows nothing of the entry scripts: every function takes the parser (or the parsed arguments).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from util.cli import exit_with_error

# Flags that describe how a run was invoked, not what it computes: never written to, nor read from, a config;
# `overwrite` deletes a run's files: a config file (or a printed one fed back) must never do that unasked.
NOT_IN_CONFIG = ("config", "print_config", "overwrite", "help")


class ConfigError(ValueError):
    """A config file that cannot be applied; the message names the file and the key."""


# ------------------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE.yaml` and `--print_config` to `parser`."""
    group = parser.add_argument_group("Config file")
    group.add_argument("--config", default=None, type=str, metavar="FILE.yaml",
                       help="YAML file of flag values (keys as in `--print_config`); flags on the command line "
                            "override it (see configs/README.md)")
    group.add_argument("--print_config", action="store_true",
                       help="validate and resolve the arguments (--accum_iter from the global batch, --lr from --blr) "
                            "for --nproc processes (default: $WORLD_SIZE, else 1), print them as YAML that --config "
                            "accepts and exit; reads no file (data, checkpoints, teachers)")


def add_global_batch_arg(parser: argparse.ArgumentParser) -> None:
    """Add `--global_batch_size` (images per optimizer update over all processes; derives --accum_iter)."""
    parser.add_argument("--global_batch_size", default=None, type=int, metavar="N",
                        help="images per optimizer update over all processes; sets --accum_iter to "
                             "N / (--batch_size x processes), which must be a whole number (default: unset, "
                             "--accum_iter as given)")


# ------------------------------------------------------------------------------------------------------------------
# Reading a config
# ------------------------------------------------------------------------------------------------------------------


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default: sys.argv[1:]) with the file of `--config` as defaults.

    The command line is parsed once for `--config`; the file's values become the parser's defaults
    (`parser.set_defaults`), then the command line is parsed again and overrides them. A bad file exits with
    status 2 and one line naming the file and the key (`util.cli.exit_with_error`). `parser` must have `--config`
    (`add_config_args`); its defaults are changed in place, so use a fresh parser per parse.
    """
    known, _ = parser.parse_known_args(argv)
    if not hasattr(known, "config"):
        raise TypeError("parse_with_config needs a parser with --config: call util.config.add_config_args first")
    if known.config:
        try:
            parser.set_defaults(**load_config(known.config, parser))
        except ConfigError as err:
            exit_with_error(err, parser.prog)
    return parser.parse_args(argv)


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read the YAML file at `path` and check it against `parser`: every key a flag of it, every value of the
    flag's type (converted as argparse converts the command line). Raises ConfigError naming the file and key."""
    values = _read_mapping(Path(path))
    actions = flag_actions(parser)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in NOT_IN_CONFIG:
            raise ConfigError(f"{path}: key {key!r} cannot be set in a config file (give --{key} on the command line)")
        if key not in actions:
            raise ConfigError(f"{path}: unknown key {key!r}: not a flag of {parser.prog}{_suggest(key, actions)}")
        out[key] = _convert(actions[key], value, f"{path}: key {key!r}")
    return out


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by destination name (the first action of each dest), without --help."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if action.dest not in (argparse.SUPPRESS, "help"):
            actions.setdefault(action.dest, action)
    return actions


def flag_defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The code's default of every flag (what a run that predates a flag ran with: a new flag's default keeps the
    old behaviour); `util.resume` compares a flag a checkpoint lacks with it."""
    return {dest: action.default for dest, action in flag_actions(parser).items()}


def apply_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> None:
    """Set `values` (e.g. a script's --demo settings) on every flag the user left at the parser's default, so
    `--demo --iters 100` keeps its 100."""
    for name, value in values.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _suggest(key: str, actions: Mapping[str, argparse.Action]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_").lstrip("_"), list(actions), n=3)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """`value` as the command line would give it to `action`: bools for switches, lists for nargs, each item
    converted by the flag's `type` (YAML strings such as `1e-4` included) and checked against its choices."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {flag} is a switch: give true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return _convert_list(action, value, where, flag)
    return _convert_scalar(action, value, where, flag)


def _convert_list(action: argparse.Action, value: Any, where: str, flag: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: {flag} takes a list (e.g. [6, 8, 10, 12]), got {value!r}")
    if action.nargs == "+" and not value:
        raise ConfigError(f"{where}: {flag} takes at least one value, got an empty list")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ConfigError(f"{where}: {flag} takes {action.nargs} values, got {len(value)}: {value!r}")
    return [_convert_scalar(action, item, where, flag) for item in value]


def _convert_scalar(action: argparse.Action, value: Any, where: str, flag: str) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{where}: {flag} takes a single value, got {value!r}")
    if action.type in (None, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {flag} takes a string, got {value!r} ({type(value).__name__}); quote it")
        converted = value
    else:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {flag} takes a {_type_name(action)}, got {value!r}")
        try:  # argparse's own conversion of the text the command line would carry (int('2.5') fails)
            converted = action.type(value if isinstance(value, str) else repr(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{where}: invalid {_type_name(action)} value {value!r} for {flag} ({err})") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{where}: {flag} must be one of {choices}, got {converted!r}")
    return converted


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", repr(action.type))


# ------------------------------------------------------------------------------------------------------------------
# Writing the resolved arguments
# ------------------------------------------------------------------------------------------------------------------


def config_yaml(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> str:
    """The arguments as a YAML config that `--config` accepts (without `config` and `print_config`).

    With `parser`, only its flags are written (attributes a script added to `args` are left out). Feeding the
    result back through `--config` (and the same resolution) gives identical arguments.
    """
    keep = set(flag_actions(parser)) if parser is not None else None
    values = {key: _plain(value, key) for key, value in vars(args).items()
              if key not in NOT_IN_CONFIG and (keep is None or key in keep)}
    return yaml.dump(values, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, width=120)


class _ConfigDumper(yaml.SafeDumper):
    """Block style for the mapping, one line per list (`supervised_blocks: [6, 8, 10, 12]`)."""

    def represent_list(self, data: list) -> yaml.Node:
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def _plain(value: Any, key: str) -> Any:
    """A YAML-safe copy of an argument value (tuples as lists, paths as strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError(f"argument {key!r} is NaN and cannot be written to a config")
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    raise ValueError(f"argument {key!r} = {value!r} ({type(value).__name__}) cannot be written to a config")


def maybe_print_config(args: argparse.Namespace, validate: Callable[[argparse.Namespace], None],
                       parser: argparse.ArgumentParser | None = None, world_size: int | None = None) -> None:
    """With `--print_config`: run `validate(args)` (its ValueError propagates; it must read no file), resolve what
    depends on the number of processes for `world_size` (default: `print_world_size`): --accum_iter from
    --global_batch_size (which must divide) and --lr from --blr, then print `config_yaml(args, parser)` and exit
    with status 0. Without it: do nothing."""
    if not getattr(args, "print_config", False):
        return
    validate(args)
    world_size = world_size or print_world_size(args)
    apply_global_batch(args, world_size)
    if hasattr(args, "blr"):
        resolve_lr(args, world_size)
    print(config_yaml(args, parser), end="", flush=True)
    raise SystemExit(0)


def print_world_size(args: argparse.Namespace) -> int:
    """The processes `--print_config` resolves for: --nproc (MAE's --world_size; a run counts its own processes),
    else $WORLD_SIZE (set by torchrun), else 1."""
    nproc = getattr(args, "world_size", None)
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc (--world_size) must be >= 1, got {nproc}")
        return nproc
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else 1


# ------------------------------------------------------------------------------------------------------------------
# Global batch
# ------------------------------------------------------------------------------------------------------------------


def derive_accum_iter(global_batch: int, batch_size: int, world_size: int) -> int:
    """Gradient-accumulation steps so that batch_size x world_size x accum_iter == global_batch.

    Raises ValueError naming --global_batch_size, --batch_size and the world size when it does not divide.
    """
    for name, value in (("--global_batch_size", global_batch), ("--batch_size", batch_size),
                        ("the world size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_step = batch_size * world_size
    if global_batch % per_step:
        hint = _batch_size_hint(global_batch, world_size, batch_size)
        raise ValueError(f"--global_batch_size {global_batch} is not a multiple of --batch_size {batch_size} x "
                         f"world size {world_size} (processes) = {per_step}{hint}")
    return global_batch // per_step


def _batch_size_hint(global_batch: int, world_size: int, batch_size: int) -> str:
    if global_batch % world_size:
        return f"; {global_batch} images cannot be split evenly over {world_size} processes"
    per_process = global_batch // world_size
    fits = [b for b in range(1, per_process + 1) if per_process % b == 0]
    nearest = sorted(fits, key=lambda b: (abs(b - batch_size), -b))[:3]
    return f"; --batch_size values that divide {per_process} images per process: {', '.join(map(str, nearest))}"


def apply_global_batch(args: argparse.Namespace, world_size: int) -> None:
    """Set `args.accum_iter` from `args.global_batch_size` (when set) and the world size, in place.

    An `--accum_iter` other than 1 that disagrees with the derived value is an error (both were asked for).
    """
    if getattr(args, "global_batch_size", None) is None:
        return
    accum_iter = derive_accum_iter(args.global_batch_size, args.batch_size, world_size)
    if args.accum_iter not in (1, accum_iter):
        raise ValueError(f"--accum_iter {args.accum_iter} contradicts --global_batch_size {args.global_batch_size} "
                         f"= --batch_size {args.batch_size} x world size {world_size} x {accum_iter}; give one of "
                         "them")
    args.accum_iter = accum_iter


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """MAE (paper Appendix A): absolute lr = base lr x effective batch / 256, effective batch = --batch_size x
    --accum_iter x processes; an --lr given on the command line is kept. Sets and returns args.lr."""
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
    return args.lr


def check_range(args: argparse.Namespace, name: str, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise ValueError naming --`name` unless its value (None: not set) lies in the interval; the bounds are
    closed unless `low_open` / `high_open`."""
    value = getattr(args, name)
    if value is None:
        return
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"--{name} must be in {interval}, got {value}")

