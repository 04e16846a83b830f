"""What made a number: the machine, this code (version and commit) and the libraries it ran with.

A run's summary.json and every benchmark report carry `environment()`, so a figure read later names what measured
it. Versions come from the installed packages' metadata (nothing is imported: transformers alone takes seconds)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from mlmtrain import __version__

# A copy of the source without .git (a tree synced to a GPU box) names its commit here; a git checkout needs none.
COMMIT_VARIABLE = "MLMTRAIN_SOURCE_COMMIT"
CODE = ("trainer", "kernels", "benchmarks", "scripts", "pyproject.toml")  # what a measurement runs
LIBRARIES = ("triton", "torchao", "transformers", "tokenizers", "huggingface_hub", "numpy")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def source() -> dict:
    """{"mlmtrain": version, "commit": hash or None, "uncommitted_changes": bool or None, "commit_from": where the
    commit was read: "git" (the package is a checkout's `trainer/`), COMMIT_VARIABLE, or None (an installed copy)}."""
    found = {"mlmtrain": __version__, "commit": None, "uncommitted_changes": None, "commit_from": None}
    root = Path(__file__).resolve().parent.parent  # the repository, for an editable install of a checkout
    if (root / ".git").exists():
        try:
            commit = _git(root, "rev-parse", "HEAD")
            changed = _git(root, "status", "--porcelain", "--", *CODE) != ""  # new files there count
            return {**found, "commit": commit, "uncommitted_changes": changed, "commit_from": "git"}
        except (OSError, subprocess.SubprocessError):  # no git, a foreign owner, a repository without commits
            pass
    given = os.environ.get(COMMIT_VARIABLE, "").strip()
    return {**found, "commit": given, "commit_from": COMMIT_VARIABLE} if given else found


def versions() -> dict:
    """Python, torch with the CUDA and cuDNN it was built with (None on a CPU build), and the libraries that shape
    a measurement (None: not installed)."""
    found = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(src: dict) -> str:
    """One line for a report's header: "mlmtrain 0.1.0, commit 1a2b3c4d5e6f (with uncommitted changes)"."""
    if not src.get("commit"):
        return f"mlmtrain {src.get('mlmtrain')}, commit not known (not a git checkout; set {COMMIT_VARIABLE})"
    changes = " (with uncommitted changes)" if src.get("uncommitted_changes") else ""
    given = f" (given by {COMMIT_VARIABLE})" if src.get("commit_from") == COMMIT_VARIABLE else ""
    return f"mlmtrain {src.get('mlmtrain')}, commit {src['commit'][:12]}{changes}{given}"


def device_name(device: torch.device) -> str:
    """The GPU's name; for a CPU its model (Linux: /proc/cpuinfo), architecture and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"CPU ({', '.join(filter(None, (model, platform.machine())))}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "source": source(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(sys.argv),
    }
