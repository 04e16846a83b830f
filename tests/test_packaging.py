"""Packaging: one version string, declared dependencies that match the imports, and no Triton in a plain CPU
install (pyproject.toml holds the metadata; README.md, "The two commands", says what was run where)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import venv
from pathlib import Path

import pytest
import torch

import mlmtrain

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS = ("trainer", "kernels", "benchmarks")  # installed as mlmtrain, mlmtrain.kernels, mlmtrain.benchmarks
# modules whose distribution is named otherwise, for when that distribution is not installed here
MODULE_TO_DIST = {"yaml": "pyyaml"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _canon(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def _extra_names(extra: str, seen: frozenset = frozenset()) -> set[str]:
    """Distribution names an extra brings, following `mlmtrain[a,b]` self-references."""
    names = set()
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        if _req_name(req) == "mlmtrain":
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                if sub.strip() not in seen:
                    names |= _extra_names(sub.strip(), seen | {extra})
        else:
            names.add(_req_name(req))
    return names


RUNTIME = {_req_name(r) for r in PYPROJECT["project"]["dependencies"]}
EXTRAS = {e: _extra_names(e) for e in PYPROJECT["project"]["optional-dependencies"]}
DECLARED = RUNTIME.union(*EXTRAS.values())


# --------------------------------------------------------------------------------------------------------
# (a) one version


def test_version_is_defined_once():
    assert importlib.metadata.version("mlmtrain") == mlmtrain.__version__, (
        "the installed metadata is stale: reinstall with pip install -e ."
    )
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mlmtrain.__version__"}
    for name in ("setup.py", "pyproject.toml"):
        assert mlmtrain.__version__ not in (ROOT / name).read_text(encoding="utf-8"), f"a version copy in {name}"
    setup_calls = [n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(n, ast.Call)]
    assert all(not c.args and not c.keywords for c in setup_calls), "setup.py is a shim: setup() takes nothing"


# --------------------------------------------------------------------------------------------------------
# (c) imports == declared dependencies


def _third_party_imports(folders) -> dict[str, list[tuple[str, bool]]]:
    """module -> [(file:line, at module level)] for every absolute import that is not stdlib, mlmtrain, or
    (in tests/) a module of tests/ itself. "At module level" = a statement of the module body (not in a
    function, a try or an if): importing the file needs it."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for folder in folders:
        local = {p.stem for p in (ROOT / folder).glob("*.py")} if folder == "tests" else set()
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in {"mlmtrain", "__future__"} or top in local:
                        continue
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.setdefault(top, []).append((where, node in tree.body))
    return found


@functools.cache
def _installed_dists() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _dists_of(module: str) -> set[str]:
    installed = _installed_dists().get(module)
    return {_canon(d) for d in installed} if installed else {_canon(MODULE_TO_DIST.get(module, module))}


def test_every_third_party_import_is_declared():
    undeclared, not_runtime = [], []
    for module, uses in _third_party_imports(PACKAGE_DIRS).items():
        dists = _dists_of(module)
        if not dists & DECLARED:
            undeclared.append(f"{module} ({', '.join(w for w, _ in uses)})")
        elif not dists & RUNTIME:  # an extra: fine only where it is imported on use
            not_runtime += [f"{module} at {w}" for w, top in uses if top]
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not not_runtime, f"module-level imports of extras (import them where they are used): {not_runtime}"


def test_tests_need_only_runtime_and_the_test_extra():
    allowed = RUNTIME | EXTRAS["test"]
    missing = [m for m in _third_party_imports(["tests"]) if not _dists_of(m) & allowed]
    assert not missing, f"the tests import {missing}, which pip install -e '.[test]' does not bring"


# Declared for their command, not imported: each must be run by some test (checked below).
COMMANDS = {"ruff": "tests/test_layout.py"}


def test_every_declared_dependency_is_imported():
    imported = set()
    for module in _third_party_imports([*PACKAGE_DIRS, "tests"]):
        imported |= _dists_of(module)
    for command, test_file in COMMANDS.items():
        assert f'"{command}"' in (ROOT / test_file).read_text(encoding="utf-8"), f"{test_file} no longer runs {command}"
        imported.add(command)
    assert not DECLARED - imported, f"declared but imported nowhere: {sorted(DECLARED - imported)}"


def test_extras_split():
    assert "triton" not in RUNTIME and "triton" in EXTRAS["test"]
    assert "transformers" not in RUNTIME and "transformers" in EXTRAS["hf"]
    assert EXTRAS["hf"] | EXTRAS["bench"] | EXTRAS["plot"] | {"pytest", "triton"} <= EXTRAS["test"]


# --------------------------------------------------------------------------------------------------------
# (b) a fresh CPU install resolves no triton


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/pip/", method="HEAD"), timeout=5):
            return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def resolve(tmp_path_factory):
    """A function: pip requirement -> {distribution: version} that `pip install` in a fresh venv would
    install, read from `pip install --dry-run --ignore-installed --report`.

    Why this shape. The claim is about a CPU machine, so torch is pinned (a constraint, not a requirement)
    to the CPU build installed here, the one the README's first command installs: pip then reads that
    wheel's metadata instead of fetching PyPI's torch, which on Linux is the CUDA build that brings its own
    triton (that is why the README installs torch first). Everything else resolves as in a fresh install,
    transitively, from the index: `--no-deps` would hide a triton pulled in by any dependency. The build
    reads a copy of the sources (the checkout stays untouched). On an index that serves no PEP 658 metadata
    (this machine's), pip downloads each wheel it resolves, so the `[test]` run fetches the triton wheel
    (~290 MB, then served from pip's cache); on PyPI itself only the metadata is fetched."""
    if torch.version.cuda or torch.version.hip:
        pytest.skip(f"torch {torch.__version__} is a GPU build: this checks a CPU machine")
    if not _pypi_reachable():
        pytest.skip("PyPI is unreachable: the dry-run resolves from the index")
    tmp = tmp_path_factory.mktemp("pip_dry_run")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in PACKAGE_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    constraints = tmp / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    runs = {}  # requirement -> (pip, its report, its stderr): both started at once, as pip mostly waits on the index
    for i, requirement in enumerate((".", ".[test]")):
        report, stderr = tmp / f"report_{i}.json", tmp / f"stderr_{i}.txt"
        cmd = [str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), "--constraint", str(constraints), "--timeout", "30", "--retries", "2"]
        with open(stderr, "w") as err:
            pip = subprocess.Popen([*cmd, requirement], cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=err)
        runs[requirement] = pip, report, stderr

    def run(requirement: str) -> tuple[dict[str, str], dict]:
        pip, report, stderr = runs[requirement]
        returncode, err = pip.wait(timeout=600), stderr.read_text(errors="replace")
        if returncode != 0:
            if "No matching distribution found for torch" in err:
                pytest.skip(f"pip sees no index that holds the installed torch {torch.__version__}")
            if not _pypi_reachable():
                pytest.skip("PyPI became unreachable during the dry-run")
            pytest.fail(f"pip install --dry-run {requirement} failed:\n{err[-3000:]}")
        data = json.loads(report.read_text())
        installs = {_canon(i["metadata"]["name"]): i for i in data["install"]}
        return {name: i["metadata"]["version"] for name, i in installs.items()}, installs["mlmtrain"]["metadata"]

    yield run
    for pip, _, _ in runs.values():  # a test that failed early leaves its pip running
        pip.kill()
        pip.wait()


def test_cpu_install_without_extras_pulls_no_triton(resolve):
    resolved, metadata = resolve(".")
    assert resolved["torch"] == torch.__version__
    assert "triton" not in resolved, f"a plain install resolves triton {resolved.get('triton')}"
    assert not [d for d in resolved if d.startswith("nvidia-")], "a CUDA runtime in a CPU install"
    assert "transformers" not in resolved
    # the metadata pip resolved from: triton and transformers are there only behind an extra
    for req in metadata["requires_dist"]:
        if _req_name(req) in {"triton", "transformers"}:
            assert "extra ==" in req, req


def test_test_extra_pulls_triton(resolve):
    resolved, _ = resolve(".[test]")
    assert resolved["torch"] == torch.__version__
    assert {"triton", "transformers", "pytest", "accelerate", "matplotlib"} <= resolved.keys()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"Run the tests:\s*```bash\n(.+?)\n```", readme).group(1)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci, f".ci/run does not run the README's test command: {command}"


def test_a_machine_without_triton_trains_on_the_torch_references(data_dir, tokenizer_dir, tmp_path):
    """A CPU install without extras has no Triton (pyproject.toml): the package imports, trains on the kernels'
    torch references (the fused kernels' too, which it says at the start), and refuses the segment-attention
    kernel, which has no torch twin in training, in one sentence. (Importing the masking kernel once failed
    there: it took Triton functions from philox.py by name.)"""
    from cli_run import assert_refused, run_cli, train_args

    no_triton = "import sys; sys.modules['triton'] = sys.modules['triton.language'] = None; "
    launcher = [sys.executable, "-c", no_triton + "from mlmtrain.cli import main; sys.exit(main(sys.argv[1:]))"]
    done = run_cli(*train_args(data_dir, tokenizer_dir, tmp_path / "run", 2, "--set", "model.fused_ops=triton"),
                   launcher=launcher)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model.fused_ops = triton: the kernels cannot run on cpu (triton is not installed)" in done.stdout
    refused = run_cli(*train_args(data_dir, tokenizer_dir, tmp_path / "seg", 2, "--set", "data.layout=rows", "--set",
                                  "model.attention=triton"), launcher=launcher)  # fmt: skip
    assert_refused(refused, "model.attention = triton", "triton is not installed")
