"""The shape of the code: no import cycles, no test hooks in the package, files a reader can hold, a training loop
that fits a screen, one format. Cheap static checks, so a change that breaks the layout fails CI."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"trainer": "mlmtrain", "kernels": "mlmtrain.kernels", "benchmarks": "mlmtrain.benchmarks"}
MAX_LINES = 500
MAX_LOOP_LINES = 140


def modules() -> dict[str, Path]:
    """Import name -> file, for every module of the package."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules `path` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def test_no_import_cycles():
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    graph = {name: deps - {"mlmtrain"} for name, deps in graph.items()}  # the root package holds only a version
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_test_hooks_in_the_package():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in PACKAGES
        for path in (ROOT / folder).glob("*.py")
        if "MLMTRAIN_TEST_" in path.read_text(encoding="utf-8")
    ]
    assert not offenders, f"test-only hooks belong in tests/ (tests/faults.py): {offenders}"


def test_files_fit_a_reader():
    long = {
        str(path.relative_to(ROOT)): n
        for folder in PACKAGES
        for path in (ROOT / folder).glob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: split by responsibility: {long}"


def test_the_training_loop_fits_a_screen():
    tree = ast.parse((ROOT / "trainer" / "train.py").read_text(encoding="utf-8"))
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= MAX_LOOP_LINES


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (it is in the test extra)")
def test_formatted_and_linted():
    folders = [*PACKAGES, "tests"]
    fmt = subprocess.run(["ruff", "format", "--check", *folders], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(["ruff", "check", *folders], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
