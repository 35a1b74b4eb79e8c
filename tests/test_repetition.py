"""The epoch loop exists once (util/training.py); the engines only say what one step's loss is. Their old
`train_one_epoch` wrappers repeated ten parameter lines (issue 24, item 22): no run of RUN identical lines may be
shared by two of these files again."""

from __future__ import annotations

import itertools

import pytest
from conftest import ROOT

FILES = ("engine_pretrain.py", "engine_finetune.py", "util/training.py")
RUN = 6  # as the developers' `duplicates` tool counts a repetition


def runs(path: str) -> dict[tuple[str, ...], int]:
    """Every run of RUN consecutive code lines (stripped; blank lines and lone brackets skipped) -> its first line."""
    lines = [(n, line.strip()) for n, line in enumerate((ROOT / path).read_text().splitlines(), start=1)]
    code = [(n, text) for n, text in lines if text and text not in (")", "]", "}", "):", ") -> None:")]
    return {tuple(t for _, t in code[i:i + RUN]): code[i][0] for i in range(len(code) - RUN + 1)}


@pytest.mark.parametrize("a, b", list(itertools.combinations(FILES, 2)))
def test_no_run_of_lines_is_shared(a, b):
    ours, theirs = runs(a), runs(b)
    shared = sorted((ours[r], theirs[r]) for r in set(ours) & set(theirs))
    assert not shared, f"{a} and {b} share {RUN}-line runs starting at lines {shared[:3]}"
