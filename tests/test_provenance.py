"""Provenance: a report or a run's summary names the commit that measured it (git, or MLMTRAIN_SOURCE_COMMIT for a
copy without .git, or "not known"), the library versions, and a --merge'd report the commits of its kept rows."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from mlmtrain import provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def checkout(tmp_path):
    """A repository laid out as mlmtrain's (trainer/ beside .git), one commit; returns (root, commit)."""
    root = tmp_path / "repo"
    (root / "trainer").mkdir(parents=True)
    (root / "trainer" / "provenance.py").write_text("# code\n", encoding="utf-8")
    (root / "notes.txt").write_text("a user's notes\n", encoding="utf-8")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return root, commit


@needs_git
def test_a_checkout_names_its_commit_and_whether_its_code_has_changes(tmp_path, monkeypatch):
    root, commit = checkout(tmp_path)
    monkeypatch.setattr(provenance, "__file__", str(root / "trainer" / "provenance.py"))
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "f" * 40)  # git wins where there is a checkout
    assert provenance.source() == {
        "mlmtrain": provenance.__version__,
        "commit": commit,
        "uncommitted_changes": False,
        "commit_from": "git",
    }
    (root / "notes.txt").write_text("edited: not code\n", encoding="utf-8")
    (root / "scratch.py").write_text("x = 1\n", encoding="utf-8")
    assert provenance.source()["uncommitted_changes"] is False
    (root / "trainer" / "new_kernel.py").write_text("x = 1\n", encoding="utf-8")  # a new file in the code counts
    assert provenance.source()["uncommitted_changes"] is True
    (root / "trainer" / "new_kernel.py").unlink()
    (root / "trainer" / "provenance.py").write_text("# changed\n", encoding="utf-8")
    src = provenance.source()
    assert src["uncommitted_changes"] is True
    assert provenance.describe(src) == f"mlmtrain {src['mlmtrain']}, commit {commit[:12]} (with uncommitted changes)"


def test_a_copy_without_git_takes_the_commit_it_is_given_or_says_it_is_not_known(tmp_path, monkeypatch):
    (tmp_path / "trainer").mkdir()
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "trainer" / "provenance.py"))
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    src = provenance.source()
    assert src["commit"] is None and src["uncommitted_changes"] is None and src["commit_from"] is None
    assert provenance.describe(src).endswith(f"commit not known (not a git checkout; set {provenance.COMMIT_VARIABLE})")
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, " 1a2b3c4d5e6f7a8b \n")
    src = provenance.source()
    assert src["commit"] == "1a2b3c4d5e6f7a8b" and src["commit_from"] == provenance.COMMIT_VARIABLE
    assert provenance.describe(src).endswith(f"commit 1a2b3c4d5e6f (given by {provenance.COMMIT_VARIABLE})")


def test_versions_name_torch_its_cuda_build_and_the_libraries_without_importing_them():
    found = provenance.versions()
    assert found["torch"] == torch.__version__ and found["cuda"] == torch.version.cuda
    assert set(provenance.LIBRARIES) <= set(found)
    assert found["tokenizers"] and found["numpy"]  # installed: the package needs them
    if torch.version.cuda is None:
        assert found["cudnn"] is None


def test_a_report_names_its_commit_and_the_commits_of_rows_it_kept(tmp_path):
    """Rows measured now carry this call's commit; rows kept from an earlier call (--merge) keep theirs, and the
    header counts them by commit (a row from before reports named commits: not recorded)."""
    from mlmtrain.benchmarks import report
    from mlmtrain.benchmarks.suite import Bench

    bench = Bench.__new__(Bench)
    bench.command, bench.commit = "mlmtrain bench --merge", "b" * 40
    measured = {"benchmark": "x", "name": "new"}
    kept = [{"name": "old", "reused_from": "an earlier run (--merge)", "command": "earlier", "commit": "a" * 40},
            {"name": "older", "reused_from": "an earlier run (--merge)", "command": "earliest"}]  # fmt: skip
    rows = bench.tagged("ablation", [measured, *kept])
    assert [r["commit"] for r in rows] == ["b" * 40, "a" * 40, None]
    assert [r["command"] for r in rows] == ["mlmtrain bench --merge", "earlier", "earliest"]
    src = {"mlmtrain": "0.1.0", "commit": "b" * 40, "uncommitted_changes": False, "commit_from": "git"}
    results = {"command": "x", "environment": {"device": "CPU", "source": src}, "sections": [{"section": "s",
               "wall_s": 1.0, "rows": [*rows, *rows[1:]]}]}  # fmt: skip
    header = report.source_lines(results)
    assert header == [
        f"- source: mlmtrain 0.1.0, commit {'b' * 12}",
        f"- rows kept from earlier calls (--merge): 2 at {'a' * 12}; 2 at a commit not recorded",
    ]
    results["sections"][0]["rows"] = rows[:1]
    assert report.source_lines(results) == [f"- source: mlmtrain 0.1.0, commit {'b' * 12}"]
    del results["environment"]["source"]  # a report written before reports named their commit
    assert report.source_lines(results) == ["- source: not recorded"]


def test_the_report_header_lines_come_from_the_results_environment(tmp_path):
    from mlmtrain.benchmarks import report

    env = provenance.environment(torch.device("cpu"))
    assert {"device", "versions", "source", "date", "command"} <= set(env)
    md = report.render({"command": "x", "environment": env, "sections": []}, tmp_path)
    assert f"- source: {provenance.describe(env['source'])}" in md
    assert json.loads(json.dumps(env)) == env  # results.json holds it as it is


@needs_git
def test_a_worktree_of_a_checkout_names_its_commit(tmp_path, monkeypatch):
    """A `git worktree` (or a submodule) has a .git *file*, not a folder: it is a checkout all the same."""
    root, commit = checkout(tmp_path)
    tree = tmp_path / "tree"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(tree)], check=True)
    assert (tree / ".git").is_file()
    monkeypatch.setattr(provenance, "__file__", str(tree / "trainer" / "provenance.py"))
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    src = provenance.source()
    assert (src["commit"], src["uncommitted_changes"], src["commit_from"]) == (commit, False, "git")


@needs_git
def test_a_checkout_git_cannot_read_takes_the_commit_it_is_given(tmp_path, monkeypatch):
    """A .git that git cannot read (here a repository without commits: `rev-parse HEAD` fails) is no error: the
    commit comes from MLMTRAIN_SOURCE_COMMIT as for a copy without .git, or is not known."""
    root = tmp_path / "repo"
    (root / "trainer").mkdir(parents=True)
    subprocess.run(["git", "-C", str(root), "init", "-q"], check=True)
    monkeypatch.setattr(provenance, "__file__", str(root / "trainer" / "provenance.py"))
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    assert provenance.source()["commit"] is None
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "c" * 40)
    src = provenance.source()
    assert (src["commit"], src["uncommitted_changes"]) == ("c" * 40, None)
    assert src["commit_from"] == provenance.COMMIT_VARIABLE


def test_versions_say_none_for_a_library_not_installed_and_give_cudnns_version_where_it_is(monkeypatch):
    """A library not installed is None (not a guess); a build with cuDNN names its version."""
    monkeypatch.setattr(provenance, "LIBRARIES", ("numpy", "no_such_library_mlmtrain_test"))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    found = provenance.versions()
    assert found["no_such_library_mlmtrain_test"] is None and found["numpy"]
    assert found["cudnn"] == 91002


def test_a_merged_report_counts_rows_from_before_reports_named_commits_as_not_recorded():
    """A --merge onto a results.json written before rows carried a commit keeps its sections as they are: their
    rows have no "commit" key, and the header says they were measured at a commit not recorded (not this call's)."""
    from mlmtrain.benchmarks import report

    src = {"mlmtrain": "0.1.0", "commit": "b" * 40, "uncommitted_changes": False, "commit_from": "git"}
    old = {"section": "ceilings", "wall_s": 1.0, "rows": [{"benchmark": "x", "name": "old"}] * 3}
    new = {"section": "train", "wall_s": 1.0, "rows": [{"benchmark": "x", "name": "new", "commit": "b" * 40}]}
    previous = {"command": "before", "sections": [old]}
    results = report.merged({"command": "x", "environment": {"device": "CPU", "source": src}, "sections": [new]},
                            previous)  # fmt: skip
    assert report.source_lines(results) == [
        f"- source: mlmtrain 0.1.0, commit {'b' * 12}",
        "- rows kept from earlier calls (--merge): 3 at a commit not recorded",
    ]


def test_the_report_names_cuda_cudnn_and_torchao_only_where_the_run_had_them(tmp_path):
    """The versions line adds the CUDA and cuDNN torch was built with and torchao, each only where it is known: a
    CPU build's None is left out, not printed."""
    from mlmtrain.benchmarks import report

    v = {"torch": "2.11.0", "python": "3.11.7", "cuda": "12.8", "cudnn": 91002, "torchao": None}
    md = report.render({"command": "x", "environment": {"device": "GPU", "versions": v}, "sections": []}, tmp_path)
    (line,) = [line for line in md.splitlines() if line.startswith("- versions: ")]
    assert line.endswith(", python 3.11.7, cuda 12.8, cudnn 91002"), line
    v.update(cuda=None, cudnn=None, torchao="0.13.0")
    md = report.render({"command": "x", "environment": {"device": "CPU", "versions": v}, "sections": []}, tmp_path)
    (line,) = [line for line in md.splitlines() if line.startswith("- versions: ")]
    assert line.endswith(", python 3.11.7, torchao 0.13.0") and "None" not in line.split("python")[1], line
