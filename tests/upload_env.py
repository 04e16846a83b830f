"""What the upload tests share: the tokens the fake Hub knows, a valid export folder (a tiny transformers
BertForMaskedLM, the shared test tokenizer, a model card, the manifest; the fixtures in conftest.py build it),
and `upload`, which runs the real CLI as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fake_hub import FakeHub

from mlmtrain.export_check import EXPORT_MANIFEST

WRITE_TOKEN = "hf_fakeWriteTokenA1b2C3d4E5f6G7h8I9j0"
READ_TOKEN = "hf_fakeReadTokenZ9y8X7w6V5u4T3s2R1q0"
EXPORT_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
CARD = """---
language: ko
license: apache-2.0
library_name: transformers
pipeline_tag: fill-mask
mask_token: "[MASK]"
tags: [bert, fill-mask, mlmtrain]
widget:
  - text: "산악 자전거 경기는 상대적으로 새로운 [MASK] 1990년대에 활성화 되었다."
---
# test-run

A tiny BERT for tests.
"""


def write_manifest(folder: Path, run="/home/someone/runs/test-run", step=1234, verified=True) -> None:
    files = {
        name: {
            "size": (folder / name).stat().st_size,
            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
        }
        for name in EXPORT_FILES
    }
    manifest = {"files": files, "run": run, "step": step, "verified": verified, "mlmtrain_version": "0.1.0"}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))


def list_another_file(folder: Path, name: str, data: bytes) -> None:
    """A file beside the export, listed in a manifest consistent with every file: what an edit could make."""
    (folder / name).write_bytes(data)
    write_manifest(folder)
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest))


def make_export(folder: Path, tokenizer_dir) -> Path:
    """A valid export folder in `folder`, as `mlmtrain export` promises to write it (docs/ARCHITECTURE.md)."""
    from transformers import BertConfig, BertForMaskedLM

    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_dir) / name, folder / name)
    with open(folder / "vocab.txt", encoding="utf-8") as f:
        vocab_size = len(f.readlines())
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(folder)  # model.safetensors + config.json (~150 KB: goes inline)
    (folder / "README.md").write_text(CARD, encoding="utf-8")
    write_manifest(folder)
    return folder


def upload(tmp_path: Path, *args: str, endpoint: str, token: str | None = WRITE_TOKEN, code=None, **env: str):
    """Run `mlmtrain upload ARGS` as a user would, with a private HF_HOME and only the HF_* variables given
    (`code`: a Python program that runs the CLI instead of `-m mlmtrain.cli`)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    full_env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )  # a CI proxy must not intercept
    if token is not None:
        full_env["HF_TOKEN"] = token
    full_env.update(env)
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "mlmtrain.cli"]), "upload", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=60)


def upload_in_process(monkeypatch, capsys, *args: str, endpoint: str, token: str | None = WRITE_TOKEN):
    """`mlmtrain upload ARGS` through the CLI's entry point in this process, for the tests of refusals and of how
    the Hub's answers are told (the fake Hub's endpoint set where huggingface_hub reads it at each call, the token
    in HF_TOKEN; None: no HF_TOKEN, which leaves a saved login to count, so give such a test --token-file):
    a subprocess would pay ~7 s of importing torch and transformers again for each. The hub's progress-bar
    switch, which the command turns off under pytest's capture, is put back."""
    from cli_run import in_process
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    bars_off = are_progress_bars_disabled()
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    try:
        return in_process(capsys, "upload", *args)
    finally:
        if not bars_off:
            enable_progress_bars()


def assert_clean_error(result, *phrases: str) -> str:
    """Exit 2 with one `mlmtrain upload: error: ...` sentence and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("mlmtrain upload: error:"))
    for phrase in phrases:
        assert phrase in line, line
    return line


def api_requests(hub: FakeHub):
    return [r for r in hub.requests if r.path != "/api/agent-harnesses"]  # a registry fetch, not ours
