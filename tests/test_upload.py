"""`mlmtrain upload`, tested with no network.

The uploads run the real CLI in a subprocess (so HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are read
by huggingface_hub at import, as for a user), except the Hub's refusals, whose telling runs in this process
(`upload_in_process`), against `tests/fake_hub.py`, a local HTTP server that stands
in for the real Hub and speaks the subset of its API a small upload uses (repo creation, branch creation,
the pre-upload check answering "regular", the NDJSON commit, pull requests, whoami, repo info). The export
folder is built by tests/upload_env.py (a tiny transformers BertForMaskedLM + the shared test tokenizer + a
model card + the manifest), so these tests do not depend on `mlmtrain export`; tests/test_upload_refusals.py
holds what the upload refuses to send.
"""

from __future__ import annotations

import json

import pytest
from upload_env import (
    EXPORT_FILES,
    READ_TOKEN,
    WRITE_TOKEN,
    api_requests,
    assert_clean_error,
    upload,
    upload_in_process,
)

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


def test_json_output_for_scripts(hub, export_dir, tmp_path):
    """--json: stdout is one JSON object, for the upload and for its dry run (what would be sent, and what not)."""
    args = ("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--json")
    plan = upload(tmp_path, *args, "--dry-run", endpoint=hub.endpoint)
    assert plan.returncode == 0, plan.stderr
    plan = json.loads(plan.stdout)
    assert plan["schema"] == "mlmtrain.upload/1" and plan["dry_run"] and plan["revision"] == "main"
    assert plan["files"] == {name: (export_dir / name).stat().st_size for name in sorted(EXPORT_FILES)}
    assert {"notes.txt", "optimizer.pt", "mlmtrain_export.json"} <= set(plan["not_sent"]) and hub.commits == []
    assert WRITE_TOKEN not in json.dumps(plan)
    done = upload(tmp_path, *args, endpoint=hub.endpoint)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {
        "schema": "mlmtrain.upload/1",
        "dry_run": False,
        "repo_id": "alice/tiny-bert",
        "revision": "main",
        "url": f"{hub.endpoint}/alice/tiny-bert",
        "pull_request": None,
        "pull_request_reused": False,
        "commit": hub.repos["alice/tiny-bert"].heads["main"],
        "files": sorted(EXPORT_FILES),
    }


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


def test_private_refuses_an_existing_public_repo(hub, export_dir, monkeypatch, capsys):
    hub.add_repo("alice/tiny-bert", owner="alice", private=False)
    args = ("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--private")
    result = upload_in_process(monkeypatch, capsys, *args, endpoint=hub.endpoint)
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
    """A re-run (a lost reply, a script's retry) opens no second pull request with the same files."""
    hub.add_repo("alice/tiny-bert", owner="alice", files={"README.md": b"old card"})
    args = ("--folder", str(export_dir), "--repo-id", "alice/tiny-bert", "--create-pr")
    first = upload(tmp_path, *args, endpoint=hub.endpoint)
    again = upload(tmp_path, *args, endpoint=hub.endpoint)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert len(hub.commits) == 1 and len(hub.repos["alice/tiny-bert"].prs) == 1
    assert "already in your open pull request #1 against alice/tiny-bert's main; no new one was opened" in again.stdout
    assert "/discussions/1" in again.stdout
    assert f"commit: {hub.repos['alice/tiny-bert'].heads['refs/pr/1']}" in again.stdout
    assert hub.unknown == []


def test_only_an_open_pull_request_of_the_users_holding_every_file_is_taken(hub, export_dir):
    """What `--create-pr` looks for, asked in-process: not one whose head changed, a closed one, another
    user's, or any when main already holds the export (every pull request's head holds main's files)."""
    from huggingface_hub import HfApi

    from mlmtrain.upload import open_pull_request_with

    files = sorted(json.loads((export_dir / "mlmtrain_export.json").read_text())["files"])
    exported = {name: (export_dir / name).read_bytes() for name in files}
    hub.add_repo("alice/tiny-bert", owner="alice", files={"README.md": b"old card"})
    api = HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN)

    def found():
        pr = open_pull_request_with(api, "alice/tiny-bert", export_dir, files)
        return pr and pr.num

    assert found() is None
    for status, author in (("draft", "alice"), ("open", "alice"), ("closed", "alice"), ("open", "bob")):
        num = hub.open_pr("alice/tiny-bert", author, status=status)
        hub.repos["alice/tiny-bert"].refs[f"refs/pr/{num}"].update(exported)
    assert found() == 2  # the newest of alice's open or draft ones (the Hub lists the newest first)
    hub.repos["alice/tiny-bert"].refs["refs/pr/2"]["config.json"] = b"{}"  # its head no longer holds the export
    assert found() == 1
    hub.set_pr_status("alice/tiny-bert", 1, "merged")
    assert found() is None
    hub.repos["alice/tiny-bert"].refs["main"].update(exported)
    hub.open_pr("alice/tiny-bert", "alice")  # holds the export through main
    assert found() is None and hub.unknown == []


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
def test_hub_errors(case, hub, export_dir, monkeypatch, capsys):
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
    args = ("--folder", str(export_dir), "--repo-id", repo_id)
    result = upload_in_process(monkeypatch, capsys, *args, endpoint=hub.endpoint, token=token)
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


def test_bad_flags_are_refused_before_the_folder_is_read(tmp_path, capsys):
    """A bad --repo-id or --revision is said at once, before the folder is hashed and loaded (an export of
    BERT-large is 1.3 GB to hash): here the folder is not even a complete export, and the flag is what is named."""
    from mlmtrain.cli import main

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "mlmtrain_export.json").write_text("{}")
    cases = [(["--repo-id", "tiny-bert"], "is not NAME/REPO"),
             (["--repo-id", "alice/tiny-bert", "--revision", "bad rev.."], "is not a branch name")]  # fmt: skip
    for extra, phrase in cases:
        assert main(["upload", "--folder", str(folder), *extra]) == 2
        err = capsys.readouterr().err
        assert phrase in err and "complete, verified export" not in err, err


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


class _StubHub:
    """Just what `upload.open_pull_request_with` asks: whoami, get_paths_info (per revision), get_repo_discussions
    (which, unlike the fake Hub, may ignore its author filter, as a proxy or another Hub version may)."""

    def __init__(self, heads, prs):
        self.heads, self.prs = heads, prs

    def whoami(self):
        return {"name": "alice"}

    def get_paths_info(self, repo_id, paths, revision):
        return [f for f in self.heads.get(revision, []) if f.path in paths]

    def get_repo_discussions(self, repo_id, author=None, discussion_type=None):
        return iter(self.prs)


def _export_with_lfs_weights(folder):
    import hashlib
    import json

    from mlmtrain.upload import git_blob_id

    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    files = {n: {"size": (folder / n).stat().st_size, "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest()}
             for n in ("model.safetensors", "config.json")}  # fmt: skip
    (folder / "mlmtrain_export.json").write_text(json.dumps({"files": files}))

    def head(weights_sha256):
        from types import SimpleNamespace as NS

        return [NS(path="model.safetensors", blob_id="b1", lfs=NS(sha256=weights_sha256)),
                NS(path="config.json", blob_id=git_blob_id(folder / "config.json"), lfs=None)]  # fmt: skip

    return sorted(files), files["model.safetensors"]["sha256"], head


def _pr(num, author, status="draft"):
    from types import SimpleNamespace as NS

    return NS(num=num, author=author, status=status, git_reference=f"refs/pr/{num}", url=f"https://hub/pr/{num}")


def test_a_pull_request_with_other_lfs_weights_is_not_reused(tmp_path):
    """A pull request whose head holds other weights (the LFS file's sha256 differs, its pointer's blob id says
    nothing) is not reused: a re-run of `--create-pr` after a new export sends the new weights."""
    from mlmtrain.upload import open_pull_request_with

    files, sha, head = _export_with_lfs_weights(tmp_path / "export")
    assert open_pull_request_with(_StubHub({"refs/pr/1": head(sha)}, [_pr(1, "alice")]), "a/b", tmp_path / "export",
                                  files).num == 1  # fmt: skip
    stale = _StubHub({"refs/pr/1": head("0" * 64)}, [_pr(1, "alice")])
    assert open_pull_request_with(stale, "a/b", tmp_path / "export", files) is None


def test_another_users_pull_request_is_not_reused_even_if_listed(tmp_path):
    """Another user's pull request is never reused, even from a listing that ignores the author filter (a proxy,
    another Hub version)."""
    from mlmtrain.upload import open_pull_request_with

    files, sha, head = _export_with_lfs_weights(tmp_path / "export")
    hub = _StubHub({"refs/pr/4": head(sha)}, [_pr(4, "bob", "open")])
    assert open_pull_request_with(hub, "a/b", tmp_path / "export", files) is None


def test_the_dry_run_lists_the_strays_and_not_the_folders_marker(export_dir):
    """The dry run's "not sent" (text and --json) lists the strays beside the export, not the folder's own marker."""
    import json
    from types import SimpleNamespace

    from mlmtrain.files import MARKER
    from mlmtrain.upload import upload_plan

    if not (export_dir / MARKER).exists():
        (export_dir / MARKER).write_text("{}")
    files = sorted(json.loads((export_dir / "mlmtrain_export.json").read_text())["files"])
    args = SimpleNamespace(repo_id="alice/tiny-bert", private=False, revision=None, create_pr=False)
    plan = upload_plan(export_dir, files, args, "message", "none found")
    assert MARKER not in plan["not_sent"]
    assert {"optimizer.pt", "notes.txt", "checkpoints/step_00000010/model.safetensors"} <= set(plan["not_sent"])
