"""The architecture as checks: stages import downward only and no package has an import circle (import-linter
contracts in pyproject.toml), the code passes ruff, the search imports without torch, and the stated Python range
is one the code runs on."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_contracts_hold():
    """`lint-imports` on pyproject.toml's contracts: the layers (cli > ... > errors) and acyclic siblings."""
    proc = _run("-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout, proc.stdout[-2000:]


def test_ruff_finds_nothing():
    proc = _run("-m", "ruff", "check", "allocopt", "tests", "benchmarks", "plots")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_search_and_the_config_import_without_torch():
    """Optimizers, the space, racing and the run configuration are plain numpy/pymoo/optuna code: a machine that
    coordinates a search (or a plugin author's test) needs no torch to import them."""
    proc = _run("-c", "import sys; sys.modules['torch'] = None\n"
                      "import allocopt.search, allocopt.search.optimizers, allocopt.search.fidelity, allocopt.config\n"
                      "from allocopt.search.optimizers import available_optimizers, get_optimizer\n"
                      "[get_optimizer(name) for name in available_optimizers()]\n"
                      "print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_requires_python_admits_only_versions_with_tomllib():
    """Problem files are parsed with tomllib, in the standard library from Python 3.11."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    spec = SpecifierSet(requires)
    assert "3.10.14" not in spec and "3.11.0" in spec and "3.13.1" in spec
