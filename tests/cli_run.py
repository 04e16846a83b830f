"""The real `mlmtrain` command in a subprocess, as a script runs it, and what a refusal must look like: exit 2,
one `mlmtrain CMD: error: ...` line, no traceback, and nothing changed on disk."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

# a tiny CPU run: two steps take ~3 s on 2 cores, nearly all of it importing torch
TINY = ("--model", "tiny", "--tokens-per-batch", "1024", "--seed", "0", "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "optim.warmup_steps=1",
        "--set", "train.device=cpu")  # fmt: skip


def run_cli(*args, cwd=None, env=None, prefix=(), launcher=None, timeout=300) -> subprocess.CompletedProcess:
    """`mlmtrain ARGS` as a script runs it, output captured. `launcher`: what runs the CLI instead of `python -m
    mlmtrain.cli` (tests/faults.py); `prefix`: what runs that (e.g. setpriv)."""
    launcher = launcher or [sys.executable, "-m", "mlmtrain.cli"]
    cmd = [*map(str, prefix), *map(str, launcher), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_args(data_dir, tokenizer_dir, out, steps: int = 2, *extra) -> list[str]:
    return ["train", "--data", data_dir, "--tokenizer", tokenizer_dir, "--out", out, "--max-steps", steps, *TINY,
            *extra]  # fmt: skip


def assert_refused(result: subprocess.CompletedProcess, *phrases: str, rc: int = 2) -> str:
    """Exit `rc`, one error line naming every phrase, no traceback; returns the line."""
    out = result.stdout + result.stderr
    assert result.returncode == rc, out
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("mlmtrain ") and ": error: " in line]
    assert len(errors) == 1, out
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def snapshot(root) -> dict[str, str]:
    """Relative path -> sha256 of every file (or "dir", or "-> target" for a link) under `root`."""
    root, out = Path(root), {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`mlmtrain ARGS` through the CLI's own entry point in this process (no torch import to pay again), as a
    CompletedProcess for `assert_refused`."""
    from mlmtrain.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)
