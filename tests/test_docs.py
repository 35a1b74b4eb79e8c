"""What README.md and docs/*.md point at exists in the repository (issue 24, items 14 and 15): every relative link
and image, every backticked or command-line path into the repository's own folders, every script named without its
folder (found at the root or in a folder named on the same line), nothing outside the clone (`../`); and the
set-up commands: .ci/run's torch install, with the CPU-only and V100 (CUDA 12.6) variants beside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
WORD = re.compile(r"[\w.*/<>-]+")
SCRIPT_SUFFIXES = (".py", ".sh")
FILE_SUFFIXES = (*SCRIPT_SUFFIXES, ".md", ".yaml", ".yml", ".json", ".png", ".txt", ".toml")


def top_level_entries() -> set[str]:
    """Files and folders at the repository root that git tracks (a clone's), or on disk without git."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return {line.split("/")[0] for line in listed.splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {p.name for p in ROOT.iterdir()}


TOP = top_level_entries()


def code_units(text: str) -> list[list[str]]:
    """The words of each fenced code block, then of the inline code spans of each other line: a script named without
    its folder must be found at the root or in a folder named in the same unit (a line, a table row, a block)."""
    units = [WORD.findall(m.group(1)) for m in FENCE.finditer(text)]
    for line in FENCE.sub("", text).splitlines():
        units.append([w for span in CODE.findall(line) for w in WORD.findall(span)])
    return [[w.rstrip(".,;:") for w in unit] for unit in units]


def exists(path: str, *bases: Path) -> bool:
    """`path` (a glob when it holds '*') under any of `bases`."""
    return any(list(base.glob(path)) if "*" in path else (base / path).exists() for base in bases)


def broken_paths(doc: Path) -> list[str]:
    text = doc.read_text()
    problems = [f"link {target}" for target in (m.group(1) for m in LINK.finditer(text))
                if not re.match(r"^(https?:|mailto:|#)", target)
                and not (doc.parent / target.split("#")[0]).exists()]
    for unit in code_units(text):
        found = [w for w in unit if "<" not in w and ">" not in w]
        folders = {Path(w).parent for w in found if "/" in w} | {Path(w) for w in found if w.endswith("/")}
        for word in found:
            if word.startswith("../"):
                problems.append(f"{word} (outside the repository)")
            elif "/" in word and not word.startswith("/") and word.split("/")[0] in TOP:
                if not exists(word, ROOT, doc.parent):
                    problems.append(word)
            elif "/" not in word and word.endswith(SCRIPT_SUFFIXES):
                if not exists(word, ROOT, doc.parent, *(ROOT / f for f in folders)):
                    problems.append(f"{word} (not at the root nor in a folder named beside it)")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_path_exists(doc):
    assert broken_paths(doc) == []


def test_the_checker_catches_what_issue_24_found(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("Paper: `../shared/paper/DeepMIM.txt`.\n\nMeasured by `benchmarks/bench_memory.py`;\nthe check: "
                   "`gpu_check.sh` does it.\n\n"
                   "| top | `benchmarks/` | `gpu_check.sh`, `bench_data.py` |\n\n"
                   "See [the study](docs/nowhere.md) and `tools/no_such_tool.py`.\n")
    assert broken_paths(doc) == ["link docs/nowhere.md", "../shared/paper/DeepMIM.txt (outside the repository)",
                                 "gpu_check.sh (not at the root nor in a folder named beside it)",
                                 "tools/no_such_tool.py"]


def test_set_up_block_is_what_ci_runs_with_the_cpu_and_v100_variants_beside_it():
    ci_install = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                      if "pip install" in line and "torch==" in line)
    packages = " ".join(w for w in ci_install.split() if "==" in w)  # torch==X torchvision==Y
    readme = (ROOT / "README.md").read_text()
    set_up = FENCE.search(readme[readme.index("## Set-up and tests"):]).group(1)
    assert f"pip install {packages}\n" in set_up or f"pip install {packages} " in set_up
    assert re.search(rf"pip install {re.escape(packages)} --index-url https://download\.pytorch\.org/whl/cpu", set_up)
    assert "--index-url https://download.pytorch.org/whl/cu126" in set_up
    assert "pip install -r requirements-test.txt" in set_up and "python -m pytest -q tests" in set_up
