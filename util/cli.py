"""The command line every script shares: `--help` that shows each flag's default, and user errors reported as
argparse reports a bad flag.

Bad flags, files and data raise ValueError naming the flag or file and the fix (the project's convention, from flag
validation before any compute to checks that need the data or a checkpoint). A script runs under `user_errors`,
which turns such an error into one line, `prog: error: message`, on stderr and exit status 2: no traceback, and no
usage block (the usage of a script with a hundred flags is forty lines that push the one that matters off the
screen). argparse's own errors (an unknown flag, a value of the wrong type) keep argparse's format.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written (with its example commands) and each flag's default, unless
    the default is None / False (an unset flag) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def script_parser(description: str | None, parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The parser a script runs with: named after the script (as argparse's own errors are), its docstring as
    --help, every default shown (`HelpFormatter`), the flags of `parents`."""
    return argparse.ArgumentParser(description=description, parents=list(parents), formatter_class=HelpFormatter)


def prog_name() -> str:
    """The script's name, as argparse calls it by default (`main_pretrain.py`)."""
    return Path(sys.argv[0]).name or "python"


def exit_with_error(message: object, prog: str | None = None) -> NoReturn:
    """Print `prog: error: message` on stderr and exit with status 2 (argparse's format and status)."""
    print(f"{prog or prog_name()}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextmanager
def user_errors(prog: str | None = None) -> Iterator[None]:
    """Run the block; a ValueError (a bad flag, file or data set, named in its message) exits as a usage error:
    `prog: error: message` on stderr, status 2, no traceback."""
    try:
        yield
    except ValueError as err:
        exit_with_error(err, prog)
