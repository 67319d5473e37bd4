"""The package's layout holds: the import-linter contract (pyproject.toml), no import cycle, small modules."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from import_graph import ROOT as PACKAGE_ROOT
from import_graph import cycles, graph

MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def _lint_imports() -> str | None:
    """The lint-imports beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "lint-imports"
    return str(beside) if beside.exists() else shutil.which("lint-imports")


@pytest.mark.skipif(_lint_imports() is None, reason="import-linter is not installed (pip install import-linter)")
def test_import_contract_is_kept() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([_lint_imports(), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_import_cycle() -> None:
    """Function-local imports count: a lazy import that dodges a circle is still a circle."""
    assert cycles(graph()) == []


def test_cycle_finder_sees_local_imports(tmp_path) -> None:
    pkg = tmp_path / "hidden_signatures"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    assert cycles(graph(pkg)) == [["hidden_signatures.a", "hidden_signatures.b"]]


def _modules() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


def test_no_module_is_long() -> None:
    long = {str(p.relative_to(PACKAGE_ROOT)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_long() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE_ROOT)}:{node.name}"] = n
    assert long == {}


def test_same_results_compares_metrics_and_pngs_byte_for_byte(tmp_path) -> None:
    """tests/same_results.py (the before/after check of a refactor) flags a changed, missing or extra file."""
    from same_results import differences, digests

    for side in ("before", "after"):
        (tmp_path / side / "results" / "pair" / "middle").mkdir(parents=True)
        (tmp_path / side / "results" / "pair" / "middle" / "metrics.json").write_text('{"sharedness": 0.5}')
        (tmp_path / side / "figures").mkdir()
        (tmp_path / side / "figures" / "a.png").write_bytes(b"\x89PNG same")
        (tmp_path / side / "cache").mkdir()
        (tmp_path / side / "cache" / "x.png").write_bytes(side.encode())  # caches are not results
    before, after = digests(tmp_path / "before"), digests(tmp_path / "after")
    assert len(before) == 2 and differences(before, after) == []
    (tmp_path / "after" / "figures" / "a.png").write_bytes(b"\x89PNG other")
    (tmp_path / "after" / "figures" / "b.png").write_bytes(b"\x89PNG new")
    assert differences(before, digests(tmp_path / "after")) == ["differs:     figures/a.png",
                                                                "only after:  figures/b.png"]
