"""`mlmtrain upload`, tested with no network.

Every upload runs the real CLI in a subprocess (so HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are read
by huggingface_hub at import, as for a user) against `tests/fake_hub.py`, a local HTTP server that stands
in for the real Hub and speaks the subset of its API a small upload uses (repo creation, branch creation,
the pre-upload check answering "regular", the NDJSON commit, pull requests, whoami, repo info). The export
folder is built here (a tiny transformers BertForMaskedLM + the shared test tokenizer + a model card +
the manifest), so these tests do not depend on `mlmtrain export`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, Token

from mlmtrain.export_check import EXPORT_MANIFEST, check_export_folder

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


@pytest.fixture(scope="module")
def clean_export(tmp_path_factory, tokenizer_dir) -> Path:
    """A valid export folder, as `mlmtrain export` promises to write it (docs/ARCHITECTURE.md)."""
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("export")
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


@pytest.fixture
def export_dir(clean_export, tmp_path) -> Path:
    """A fresh copy per test, with the strays a run folder collects: none of them may be uploaded."""
    folder = tmp_path / "export"
    shutil.copytree(clean_export, folder)
    (folder / "checkpoints" / "step_00000010").mkdir(parents=True)
    (folder / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"old weights")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "notes.txt").write_text("stray")
    return folder


@pytest.fixture
def hub():
    tokens = {WRITE_TOKEN: Token("alice"), READ_TOKEN: Token("alice", role="read")}
    with FakeHub(tokens=tokens, orgs={"alice": ["alice-lab"]}) as server:
        yield server


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


# -- the upload itself ----------------------------------------------------------------------------


def test_upload_sends_exactly_the_export_and_is_idempotent(hub, export_dir, tmp_path):
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert result.returncode == 0, result.stderr

    assert hub.unknown == []  # the client stayed inside the subset the fake covers
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == "alice/tiny-bert" and commit["revision"] == "main" and not commit["create_pr"]
    assert commit["summary"] == "Upload test-run at step 1234 (mlmtrain 0.1.0)"  # the run's name, not its path
    assert sorted(commit["files"]) == sorted(EXPORT_FILES)  # no manifest, checkpoints, optimizer or strays
    for name, data in commit["files"].items():
        assert data == (export_dir / name).read_bytes(), f"{name} differs from the export"
    assert hub.repos["alice/tiny-bert"].private is False
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body)["name"] == "tiny-bert"
    for r in api_requests(hub):
        assert r.headers.get("Authorization") == f"Bearer {WRITE_TOKEN}", (r.method, r.path)
    oid = hub.repos["alice/tiny-bert"].heads["main"]
    assert f"{hub.endpoint}/alice/tiny-bert" in result.stdout and f"commit: {oid}" in result.stdout

    # The same command again: the Hub already has every file, so no new commit, and the same commit id.
    again = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert again.returncode == 0, again.stderr
    assert len(hub.commits) == 1 and f"commit: {oid}" in again.stdout


def test_upload_private_to_a_new_branch_with_a_message(hub, export_dir, tmp_path):
    result = upload(
        tmp_path,
        "--folder",
        str(export_dir),
        "--repo-id",
        "alice-lab/tiny-bert",
        "--private",
        "--revision",
        "experiment-1",
        "--commit-message",
        "step 1234, lr 5e-4",
        endpoint=hub.endpoint,
    )
    assert result.returncode == 0, result.stderr
    repo = hub.repos["alice-lab/tiny-bert"]
    assert repo.private is True
    (commit,) = hub.commits
    assert commit["revision"] == "experiment-1" and commit["summary"] == "step 1234, lr 5e-4"
    assert repo.refs["main"] == {} and sorted(repo.refs["experiment-1"]) == sorted(EXPORT_FILES)
    assert f"{hub.endpoint}/alice-lab/tiny-bert/tree/experiment-1" in result.stdout
    assert f"commit: {repo.heads['experiment-1']}" in result.stdout


def test_private_refuses_an_existing_public_repo(hub, export_dir, tmp_path):
    hub.add_repo("alice/tiny-bert", owner="alice", private=False)
    result = upload(
        tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--private", endpoint=hub.endpoint
    )
    assert_clean_error(result, "already exists and is public")
    assert hub.commits == []


def test_create_pr(hub, export_dir, tmp_path):
    hub.add_repo("alice/tiny-bert", owner="alice", files={"README.md": b"old card"})
    result = upload(
        tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--create-pr", endpoint=hub.endpoint
    )
    assert result.returncode == 0, result.stderr
    commit = hub.commits[-1]
    assert commit["revision"] == "refs/pr/1"
    assert hub.files("alice/tiny-bert", "main") == {"README.md": b"old card"}  # main untouched
    assert "pull request:" in result.stdout and "/discussions/1" in result.stdout
    assert "are in a pull request against alice/tiny-bert's main" in result.stdout and "model:" not in result.stdout


def test_create_pr_again_finds_its_open_pull_request(hub, export_dir, tmp_path):
    """A re-run (a lost reply, a script's retry) opens no second pull request with the same files; a changed,
    closed or other user's pull request is no reason not to open one."""
    hub.add_repo("alice/tiny-bert", owner="alice", files={"README.md": b"old card"})
    args = ("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--create-pr")
    first = upload(tmp_path, *args, endpoint=hub.endpoint)
    again = upload(tmp_path, *args, endpoint=hub.endpoint)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert len(hub.commits) == 1 and len(hub.repos["alice/tiny-bert"].prs) == 1
    assert "already in your open pull request #1 against alice/tiny-bert's main; no new one was opened" in again.stdout
    assert "/discussions/1" in again.stdout
    assert f"commit: {hub.repos['alice/tiny-bert'].heads['refs/pr/1']}" in again.stdout

    hub.repos["alice/tiny-bert"].refs["refs/pr/1"]["config.json"] = b"{}"  # its head no longer holds the export
    assert upload(tmp_path, *args, endpoint=hub.endpoint).returncode == 0
    hub.set_pr_status("alice/tiny-bert", 2, "closed")
    assert upload(tmp_path, *args, endpoint=hub.endpoint).returncode == 0
    hub.repos["alice/tiny-bert"].prs[2]["author"] = "bob"
    assert upload(tmp_path, *args, endpoint=hub.endpoint).returncode == 0
    assert [c["revision"] for c in hub.commits] == [f"refs/pr/{n}" for n in (1, 2, 3, 4)]
    assert hub.unknown == []


def test_create_pr_when_main_holds_the_export_names_no_pull_request(hub, export_dir, tmp_path):
    """Every pull request's head holds main's files: with the export on main, an unrelated open pull request of
    the user's is not "the one with these files", and no commit is made."""
    hub.add_repo("alice/tiny-bert", owner="alice")
    args = ("--folder", str(export_dir), "--repo-id", "alice/tiny-bert")
    assert upload(tmp_path, *args, endpoint=hub.endpoint).returncode == 0
    hub.open_pr("alice/tiny-bert", "alice", "an unrelated change")
    again = upload(tmp_path, *args, "--create-pr", endpoint=hub.endpoint)
    assert again.returncode == 0, again.stderr
    assert len(hub.commits) == 1 and "pull request" not in again.stdout
    assert "files of the export are on alice/tiny-bert" in again.stdout


@pytest.mark.skipif(
    __import__("huggingface_hub").__version__.startswith("0."),
    reason="huggingface_hub < 1.0 does not retry the pre-upload call",
)
def test_transient_5xx_is_retried_by_the_library(hub, export_dir, tmp_path):
    hub.fail_next("preupload", 503)
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert result.returncode == 0, result.stderr
    assert len([r for r in hub.requests if "/preupload/" in r.path]) == 2 and len(hub.commits) == 1


# -- where the token comes from, and that it never leaks -----------------------------------------


@pytest.mark.parametrize("source", ["env", "saved_login", "token_file"])
def test_token_sources_and_no_leak(source, hub, export_dir, tmp_path):
    home = tmp_path / "hf_home"
    home.mkdir()
    written_by_test = set()
    args = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert"]
    token = WRITE_TOKEN if source == "env" else None
    if source == "saved_login":  # what `hf auth login` leaves behind
        (home / "token").write_text(WRITE_TOKEN)
        written_by_test.add(home / "token")
    if source == "token_file":
        (tmp_path / "hf.token").write_text(WRITE_TOKEN + "\n")
        written_by_test.add(tmp_path / "hf.token")
        args += ["--token-file", str(tmp_path / "hf.token")]
    runs = [
        upload(tmp_path, *args, endpoint=hub.endpoint, token=token),
        upload(tmp_path, *args, "--dry-run", endpoint=hub.endpoint, token=token),
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert [r.headers.get("Authorization") for r in api_requests(hub)] == [f"Bearer {WRITE_TOKEN}"] * len(
        api_requests(hub)
    )
    for r in runs:
        assert WRITE_TOKEN not in r.stdout + r.stderr
    for path in [*tmp_path.rglob("*"), *export_dir.rglob("*")]:
        if path.is_file() and path not in written_by_test:
            assert WRITE_TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def test_token_is_refused_on_the_command_line_without_echoing_it(export_dir, capsys):
    from mlmtrain.cli import main

    for flag in (["--token", WRITE_TOKEN], [f"--token={WRITE_TOKEN}"]):
        assert main(["upload", "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", *flag]) == 2
        out, err = capsys.readouterr()
        assert "not accepted on the command line" in err and WRITE_TOKEN not in out + err


# -- errors a user will meet: one sentence each ---------------------------------------------------


def test_no_token(hub, export_dir, tmp_path):
    result = upload(
        tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint, token=None
    )
    assert_clean_error(result, "no Hugging Face token", "HF_TOKEN", "--token-file")
    assert api_requests(hub) == []


@pytest.mark.parametrize(
    "case",
    ["read_only", "someone_elses_repo", "someone_elses_namespace", "missing_namespace", "bad_token", "server_error"],
)
def test_hub_errors(case, hub, export_dir, tmp_path):
    repo_id, token = "alice/tiny-bert", WRITE_TOKEN
    if case == "read_only":
        token, phrases = READ_TOKEN, ["read-only", "403"]
    elif case == "someone_elses_repo":  # exists and is public: create_repo passes, the upload is refused
        hub.add_repo("bob/tiny-bert", owner="bob")
        repo_id, phrases = "bob/tiny-bert", ["neither your account", "alice/tiny-bert"]
    elif case == "someone_elses_namespace":
        hub.add_repo("bob/other", owner="bob")
        repo_id, phrases = "bob/tiny-bert", ["neither your account", "403"]
    elif case == "missing_namespace":
        repo_id, phrases = "no-such-org/tiny-bert", ["namespace 'no-such-org' does not exist", "404"]
    elif case == "bad_token":
        token, phrases = "hf_revokedToken0000000000000000000", ["rejected the token", "401"]
    else:  # repo creation is not retried by the library: the user is told to re-run
        hub.fail_next("create", 502)
        phrases = ["502", "run the same command again"]
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", repo_id, endpoint=hub.endpoint, token=token)
    assert_clean_error(result, *phrases)
    assert hub.commits == [] and token not in result.stdout + result.stderr


def test_network_down(export_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=closed)
    assert_clean_error(result, "cannot reach the Hub", closed)


def test_offline_mode(hub, export_dir, tmp_path):
    result = upload(
        tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint, HF_HUB_OFFLINE="1"
    )
    assert_clean_error(result, "HF_HUB_OFFLINE")
    assert api_requests(hub) == []


def test_bad_arguments(export_dir, tmp_path, capsys):
    from mlmtrain.cli import main

    base = ["upload", "--folder", str(export_dir)]
    cases = [
        (["--repo-id", "tiny-bert"], "is not NAME/REPO"),
        (["--repo-id", "alice/tiny bert"], "is not NAME/REPO"),
        (["--repo-id", "alice/tiny-bert", "--create-pr", "--revision", "dev"], "cannot be combined with --revision"),
        (["--repo-id", "alice/tiny-bert", "--token-file", str(tmp_path / "nope")], "does not exist"),
        (["--repo-id", "alice/tiny-bert", "--token-file", str(tmp_path)], "is not a file"),
        (["--repo-id", "alice/tiny-bert", "--revision", ""], "--revision '' is not a branch name"),
        (["--repo-id", "alice/tiny-bert", "--revision", "bad rev.."], "is not a branch name"),
    ]
    for extra, phrase in cases:
        assert main(base + extra) == 2
        assert phrase in capsys.readouterr().err


# -- dry run --------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_sends_nothing(hub, export_dir, tmp_path):
    result = upload(
        tmp_path,
        "--folder",
        str(export_dir),
        "--repo-id",
        "alice/tiny-bert",
        "--private",
        "--revision",
        "dev",
        "--dry-run",
        endpoint=hub.endpoint,
        token=None,
    )
    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    out = result.stdout
    assert "alice/tiny-bert" in out and "private" in out and "dev (branch created" in out
    assert "Upload test-run at step 1234" in out and "token:      none found" in out
    for name in EXPORT_FILES:
        assert f"{(export_dir / name).stat().st_size:,}  {name}" in out
    assert "optimizer.pt" in out.split("not sent:")[1].splitlines()[0]  # strays listed as not sent
    assert "pipeline_tag: fill-mask" in out and 'mask_token: "[MASK]"' in out


# -- refusing broken folders ----------------------------------------------------------------------


def _rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


BREAKAGES = {  # name -> (how to break the folder, whether to refresh the manifest after, expected problem)
    "no_weights": (lambda f: (f / "model.safetensors").unlink(), False, "model.safetensors is missing"),
    "no_card": (lambda f: (f / "README.md").unlink(), False, "README.md is missing"),
    "no_tokenizer": (lambda f: (f / "tokenizer.json").unlink(), False, "tokenizer.json is missing"),
    "no_manifest": (lambda f: (f / EXPORT_MANIFEST).unlink(), False, "mlmtrain_export.json is missing"),
    "edited_after_export": (lambda f: (f / "README.md").write_text(CARD + "edit\n"), False, "changed after export"),
    "edited_same_size": (lambda f: (f / "README.md").write_text(CARD.replace("tiny", "tinY")), False, "sha256"),
    "vocab_mismatch": (
        lambda f: _rewrite_config(f, vocab_size=json.loads((f / "config.json").read_text())["vocab_size"] + 1),
        True,
        "vocab_size is",
    ),
    "weights_do_not_match_config": (
        lambda f: _rewrite_config(f, intermediate_size=48),
        True,
        "intermediate.dense.weight has shape (32, 16), config.json implies (48, 16)",
    ),
    "truncated_weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
        True,
        "model.safetensors is unreadable",
    ),
    "card_without_header": (lambda f: (f / "README.md").write_text("# model\n"), True, "no YAML header"),
    "card_not_utf8": (lambda f: (f / "README.md").write_bytes(CARD.encode("cp949")), True, "is not UTF-8 text"),
    "vocab_not_utf8": (lambda f: (f / "vocab.txt").write_bytes(b"\xff\xfe[PAD]\n"), True, "vocab.txt is not UTF-8"),
    "weights_header_not_a_table": (
        lambda f: (f / "model.safetensors").write_bytes(len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]"),
        True,
        "its header is not a table of tensors",
    ),
    "card_without_pipeline_tag": (
        lambda f: (f / "README.md").write_text(CARD.replace("pipeline_tag: fill-mask\n", "")),
        True,
        "lacks pipeline_tag",
    ),
    "vocab_files_disagree": (
        lambda f: (f / "vocab.txt").write_text(
            "\n".join(reversed((f / "vocab.txt").read_text(encoding="utf-8").splitlines())) + "\n", encoding="utf-8"
        ),
        True,
        "disagree",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_check_export_folder_names_the_problem(breakage, export_dir):
    assert check_export_folder(export_dir) == []
    break_it, refresh_manifest, expected = BREAKAGES[breakage]
    break_it(export_dir)
    if refresh_manifest:  # a folder that is consistent with its manifest but wrong inside
        write_manifest(export_dir)
    problems = check_export_folder(export_dir)
    assert any(expected in p for p in problems), problems


def test_broken_or_unverified_folder_is_refused_and_nothing_sent(hub, export_dir, tmp_path):
    write_manifest(export_dir, verified=False)
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export", "nothing was sent")
    assert "not verified" in result.stderr
    _rewrite_config(export_dir, vocab_size=7)
    (export_dir / "README.md").unlink()
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export")
    assert "README.md is missing" in result.stderr and "config.json is" in result.stderr
    run = tmp_path / "run"  # not an export at all (a run folder, say): one sentence, not a list of every file
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = upload(tmp_path, "--folder", str(run), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "is not an export of `mlmtrain export`", "export a checkpoint first")
    assert "\n  - " not in result.stderr
    assert hub.requests == []


# -- what the upload does not take on trust ---------------------------------------------------------


def test_a_token_pasted_in_the_wrong_place_is_never_echoed(export_dir, tmp_path):
    unreachable = "http://127.0.0.1:9"  # nothing may be sent anyway
    base = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert"]
    cases = [
        ([*base, "--token-file", WRITE_TOKEN], "looks like the token itself"),
        ([*base, WRITE_TOKEN], "unrecognized arguments: hf_***"),  # a stray positional: argparse's own error
        # what goes into the repo's public history: refused before anything is sent (tests/test_export.py:
        # the same for what an export writes into the card)
        (["--folder", str(export_dir), "--repo-id", WRITE_TOKEN], "looks like a Hugging Face token"),
        ([*base, "--commit-message", f"release {WRITE_TOKEN}", "--dry-run"], "looks like a Hugging Face token"),
        ([*base, "--revision", WRITE_TOKEN], "looks like a Hugging Face token"),
    ]
    for args, phrase in cases:
        result = upload(tmp_path, *args, endpoint=unreachable, token=None)
        assert result.returncode == 2 and phrase in result.stderr, result.stderr
        assert WRITE_TOKEN not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_only_regular_files_with_plain_names_are_sent(hub, export_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(export_dir / "model.safetensors", outside)
    (export_dir / "model.safetensors").symlink_to(outside)
    write_manifest(export_dir)  # consistent with what the link points to
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export", "nothing was sent")
    assert "model.safetensors is a symbolic link" in result.stderr

    (export_dir / "model.safetensors").unlink()
    shutil.move(outside, export_dir / "model.safetensors")
    list_another_file(export_dir, "*.json", b"{}")  # as a pattern, it would select every JSON file
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export")
    assert "a name with wildcard characters" in result.stderr
    assert api_requests(hub) == []


def test_verified_is_checked_again_not_taken_from_the_manifest(hub, export_dir, tmp_path):
    """A folder edited after its export, its manifest rewritten to match and to say "verified": the files and
    shapes are consistent, but transformers no longer computes what we do, so nothing is sent."""
    _rewrite_config(export_dir, hidden_act="relu")
    write_manifest(export_dir, verified=True)
    assert check_export_folder(export_dir) == []
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "does not pass verification with transformers again", "nothing was sent")
    assert "logits differ" in result.stderr and api_requests(hub) == []


EDITED_DURING_THE_UPLOAD = """
import pathlib, sys
import mlmtrain.export as export

real = export.verify_export


def verify_then_edit(folder, texts, **kw):  # the user's folder changes once the checks have passed
    report = real(folder, texts, **kw)
    original = pathlib.Path(sys.argv[sys.argv.index("--folder") + 1])
    with open(original / "README.md", "a", encoding="utf-8") as f:
        f.write("edited during the upload")
    return report


export.verify_export = verify_then_edit
from mlmtrain.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_what_is_sent_is_what_was_checked_even_if_the_folder_changes(hub, export_dir, tmp_path):
    card = (export_dir / "README.md").read_bytes()
    args = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert"]
    (tmp_path / "tmp").mkdir()
    tmpdir = str(tmp_path / "tmp")
    result = upload(tmp_path, *args, endpoint=hub.endpoint, code=EDITED_DURING_THE_UPLOAD, TMPDIR=tmpdir)
    assert result.returncode == 0, result.stderr
    assert b"edited during the upload" in (export_dir / "README.md").read_bytes()
    assert hub.files("alice/tiny-bert")["README.md"] == card  # the checked copy, not the edited file
    assert not any(name.startswith("mlmtrain_upload_") for name in os.listdir(tmpdir))  # the copy is gone


def test_refused_before_sending(hub, export_dir, tmp_path):
    """An export made for another repo, a token file with characters no token has, a manifest that lists a file
    `mlmtrain export` does not write: one sentence each, nothing sent, no token shown."""
    manifest = json.loads((export_dir / EXPORT_MANIFEST).read_text())
    (export_dir / EXPORT_MANIFEST).write_text(json.dumps({**manifest, "name": "alice/other-name"}))
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "was exported for alice/other-name", "--name alice/tiny-bert")
    (export_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest))

    token_file = tmp_path / "token"
    token_file.write_text("\ufeff" + WRITE_TOKEN + "\n", encoding="utf-8")  # a Windows editor's byte-order mark
    args = ["--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--token-file", str(token_file)]
    assert upload(tmp_path, *args, "--dry-run", endpoint=hub.endpoint, token=None).returncode == 0
    token_file.write_text(WRITE_TOKEN + "\x00", encoding="utf-8")
    result = upload(tmp_path, *args, endpoint=hub.endpoint, token=None)
    assert_clean_error(result, "holds characters a token cannot have")
    assert WRITE_TOKEN not in result.stdout + result.stderr

    list_another_file(export_dir, "id_rsa", b"private key")
    result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=hub.endpoint)
    assert_clean_error(result, "not a complete, verified export")
    assert "lists 'id_rsa', which `mlmtrain export` does not write" in result.stderr
    assert api_requests(hub) == []


def test_an_endpoint_that_does_not_answer_as_the_hub_is_one_sentence(export_dir, tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class EmptyJson(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_PUT = do_HEAD = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), EmptyJson)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        result = upload(tmp_path, "--folder", str(export_dir), "--repo-id", "alice/tiny-bert", endpoint=endpoint)
    finally:
        server.shutdown()
    assert_clean_error(result, "did not answer as the Hugging Face Hub does", "check HF_ENDPOINT")


def test_verification_leaves_the_hubs_progress_bars_as_they_were(export_dir):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from mlmtrain.export import verify_export

    disable_progress_bars()  # as the upload does for a log file or --quiet
    try:
        verify_export(export_dir, ["[MASK]"])
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()
