"""The code base's layers (README "Code map"), top to bottom:

    entry scripts (main_*, submitit_*) -> engines (engine_*) -> targets, analysis, segmentation, detection -> models
    (models_*) -> util

A module imports only from layers below its own; entry scripts never import each other, except that a submitit
launcher imports the entry script it launches; tools/ and benchmarks/ sit on top and nothing of the project imports
them. import-linter checks the packages (its contracts are in pyproject.toml, so `lint-imports` at the repository
root gives the same answer); top-level modules are not packages, so `ast` checks them here.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("util", "targets", "analysis", "segmentation", "detection")
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"


def layer_of(name: str) -> int | None:
    """Layer of a top-level project module or package (0 = util); None for anything outside the project."""
    if name == "util":
        return 0
    if name.startswith("models_"):
        return 1
    if name in ("targets", "analysis", "segmentation", "detection"):
        return 2
    if name.startswith("engine_"):
        return 3
    if name.startswith("main_"):
        return 4
    if name.startswith("submitit_"):
        return 5
    if name in ("tools", "benchmarks"):
        return 6
    return None


def project_modules() -> list[str]:
    return sorted(p.stem for p in ROOT.glob("*.py")) + list(PACKAGES)


def imported_top_levels(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (absolute imports, at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def run_import_linter(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_linter_contracts_are_kept():
    result = run_import_linter(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_import_linter_contracts_name_every_module_above_them():
    """A new entry script or engine must be added to the contracts (else util could import it unnoticed)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = {tuple(c["source_modules"]): set(c["forbidden_modules"]) for c in contracts if c["type"] == "forbidden"}
    for package in PACKAGES:
        above = {m for m in project_modules() if layer_of(m) is not None and layer_of(package) < layer_of(m) < 6}
        named = set().union(*(f for sources, f in forbidden.items() if package in sources))
        assert above <= named, f"{package} may import {sorted(above - named)}: add them to pyproject.toml"


def test_import_linter_finds_a_broken_layer(tmp_path):
    """The contracts catch util importing a model (on a copy of the packages with one bad import added)."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "models_vit.py").write_text("")
    with open(tmp_path / "util" / "patches.py", "a") as f:
        f.write("\nimport models_vit  # noqa\n")
    result = run_import_linter(tmp_path)
    assert result.returncode != 0 and "util.patches -> models_vit" in result.stdout


@pytest.mark.parametrize("module", [p.name for p in sorted(ROOT.glob("*.py"))])
def test_top_level_modules_import_only_lower_layers(module):
    own = layer_of(Path(module).stem)
    assert own is not None, f"{module}: a top-level module of no layer; place it in layer_of() and the README map"
    for name in imported_top_levels(ROOT / module) - {Path(module).stem}:
        other = layer_of(name)
        if other is None:
            continue
        launched = own == 5 and name == "main_" + Path(module).stem.removeprefix("submitit_")
        assert other < own or (own == other == 1) or launched, f"{module} imports {name} (layer {other} >= {own})"


def test_no_project_code_imports_tools_or_benchmarks():
    """Scripts of tools/ and benchmarks/ import their siblings by bare name: no project module may import one."""
    folders = ("tools", "benchmarks")
    scripts = set(folders) | {p.stem for folder in folders for p in (ROOT / folder).glob("*.py")}
    for path in [*ROOT.glob("*.py"), *(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))]:
        wrong = imported_top_levels(path) & scripts
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
