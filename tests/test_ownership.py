"""Nothing lost, nothing mixed: every folder mlmtrain makes carries a marker; a command replaces or deletes only
its own kind of folder, holding only files it wrote, and refuses anything else in one sentence without
suggesting to force it; a write that fails (a real full disk, a read-only filesystem, no permission) leaves
the previous folder and no temporary one; what a killed process left half-written goes at the next start.
The real CLI, in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_run import assert_refused, in_process, run_cli, snapshot, train_args

import mlmtrain
from mlmtrain import files
from mlmtrain.errors import UserError

COMMAND = {"tokenizer": "tokenizer", "shards": "prepare", "run": "train", "export": "export"}


@pytest.fixture(scope="module")
def made(tmp_path_factory, sample_corpus) -> dict[str, Path]:
    """One folder of each kind, made by the CLI: a tokenizer, shards, a 2-step run, an export of it."""
    root = tmp_path_factory.mktemp("made")
    folders = {"tokenizer": root / "tok", "shards": root / "data", "run": root / "run", "export": root / "export"}
    tok, data, run, export = folders.values()
    for args in (
        ["tokenizer", "--input", sample_corpus, "--out", tok, "--vocab-size", 1000],
        ["prepare", "--input", sample_corpus, "--tokenizer", tok, "--out", data, "--valid-fraction", 0.05],
        train_args(data, tok, run),
        ["export", "--checkpoint", run, "--out", export, "--no-verify"],
    ):
        done = run_cli(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    return folders


def copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to, symlinks=True)
    return to


def dead_pid() -> int:
    """The pid of a process that has ended (so a temporary folder named after it is stale)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_every_folder_carries_a_marker_of_what_made_it(made):
    for kind, folder in made.items():
        marker = json.loads((folder / files.MARKER).read_text())
        assert marker["kind"] == kind and marker["made_by"] == f"mlmtrain {COMMAND[kind]}", marker
        assert marker["mlmtrain_version"] == mlmtrain.__version__


def test_overwrite_never_touches_another_kind_or_a_folder_it_did_not_make(
    made, tmp_path, sample_corpus, capsys, monkeypatch
):
    """The campaign's cases: `export --overwrite` onto a run folder, a tokenizer folder or `.`; `prepare
    --overwrite` onto a folder holding `train/` and the input corpus; `demo --force` onto a user's folder.
    (The refusals run in this process: they come before any work, and a new interpreter each costs seconds.)"""
    user = tmp_path / "user"
    (user / "train").mkdir(parents=True)
    corpus = shutil.copy(sample_corpus, user / "train" / "corpus.txt")
    (user / "notes.txt").write_text("my notes")
    before = {name: snapshot(folder) for name, folder in {**made, "user": user}.items()}
    tok, data, run = made["tokenizer"], made["shards"], made["run"]
    cases = [
        (["export", "--checkpoint", run, "--out", run, "--overwrite", "--no-verify"], None, "made by `mlmtrain train`"),
        (["export", "--checkpoint", run, "--out", tok, "--overwrite", "--no-verify"], None, "`mlmtrain tokenizer`"),
        (["export", "--checkpoint", run, "--out", ".", "--overwrite", "--no-verify"], user, "is the current folder"),
        (["prepare", "--input", corpus, "--tokenizer", tok, "--out", user, "--overwrite"], None, "not made by"),
        (["prepare", "--input", corpus, "--tokenizer", tok, "--out", tok, "--overwrite"], None, "`mlmtrain tokenizer`"),
        (["tokenizer", "--input", corpus, "--out", data, "--overwrite"], None, "made by `mlmtrain prepare`"),
        (["tokenizer", "--input", corpus, "--out", user, "--overwrite"], None, "not made by"),
        (["demo", "--out", user, "--force"], None, "not made by `mlmtrain demo`"),
    ]
    for args, cwd, phrase in cases:
        with monkeypatch.context() as here:
            here.chdir(cwd or tmp_path)
            line = assert_refused(in_process(capsys, *args), phrase)
        assert "--overwrite" not in line and "--force" not in line, line  # never a suggestion to force it
    assert {name: snapshot(folder) for name, folder in {**made, "user": user}.items()} == before


@pytest.mark.parametrize("marker", ['{"kind": "export", "made_by": "mlm', '["export"]'])
def test_a_folder_whose_marker_is_damaged_is_not_ours(made, tmp_path, capsys, marker):
    """A marker cut short (a disk that filled, a hand edit) or not an object says nothing of who made the folder:
    it reads as another program's, so `export --overwrite` and a run's resume refuse it whole, naming the marker."""
    export, run = copy(made["export"], tmp_path / "export"), copy(made["run"], tmp_path / "run")
    for folder in (export, run):
        (folder / files.MARKER).write_text(marker)
    before = {folder: snapshot(folder) for folder in (export, run)}
    args = ["export", "--checkpoint", made["run"], "--out", export, "--overwrite", "--no-verify"]
    assert_refused(in_process(capsys, *args), f"an unknown program (unreadable {files.MARKER})")
    tok, data = made["tokenizer"], made["shards"]
    line = assert_refused(in_process(capsys, *train_args(data, tok, run), "--resume", "auto"), "not `mlmtrain train`")
    assert f"made by `an unknown program (unreadable {files.MARKER})`" in line, line
    assert {folder: snapshot(folder) for folder in (export, run)} == before


def test_a_folder_of_its_own_kind_is_replaced_only_when_it_holds_nothing_else(made, tmp_path, sample_corpus):
    data = copy(made["shards"], tmp_path / "data")
    (data / "README.txt").write_text("what these shards are")
    before = snapshot(data)
    prepare = ["prepare", "--input", sample_corpus, "--tokenizer", made["tokenizer"], "--out", data, "--seed", 1]
    assert_refused(run_cli(*prepare), "already holds token shards", "--overwrite")  # ours: --overwrite is the way
    assert_refused(run_cli(*prepare, "--overwrite"), "did not write (README.txt)", "nothing was replaced")
    assert snapshot(data) == before
    (data / "README.txt").unlink()
    done = run_cli(*prepare, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((data / "meta.json").read_text())["seed"] == 1 and (data / files.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the old folder went, no temporary left
    # an --out that passes through itself: `data/..` no longer resolves once data is moved aside, and the new
    # folder was left hidden with the old one, "unchanged" said of neither
    done = run_cli(*prepare[:-1], 2, "--out", data / ".." / "data", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((data / "meta.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (data / "subfolder").mkdir()  # empty, but not the command's: replacing the folder would delete it unsaid
    assert_refused(run_cli(*prepare, "--overwrite"), "did not write (subfolder/)", "nothing was replaced")


def test_folders_from_before_markers_are_recognised_only_by_their_exact_files(made, tmp_path, sample_corpus):
    tok = copy(made["tokenizer"], tmp_path / "tok")
    (tok / files.MARKER).unlink()  # as an older mlmtrain wrote it
    done = run_cli("tokenizer", "--input", sample_corpus, "--out", tok, "--vocab-size", 900, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((tok / files.MARKER).read_text())["kind"] == "tokenizer"
    data = copy(made["shards"], tmp_path / "data")
    (data / files.MARKER).unlink()
    (data / "train" / "extra.npy").write_bytes(b"not ours")  # plausible, but not a file prepare writes
    (data / "valid" / "offsets.npy").rename(data / "offsets.npy")
    before = snapshot(data)
    args = ["prepare", "--input", sample_corpus, "--tokenizer", tok, "--out", data, "--overwrite"]
    assert_refused(run_cli(*args), "is not empty and was not made by `mlmtrain prepare`")
    assert snapshot(data) == before


def test_a_run_folder_from_before_markers_is_ours_only_while_it_holds_nothing_else(tmp_path):
    from mlmtrain.run_folder import RUN_LAYOUT

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({k: {} for k in ("model", "data", "optim", "train")}))
    (run / "metrics.jsonl").write_text("")
    assert files.folder_state(run, RUN_LAYOUT)[0] == "mine"
    (run / "notes.txt").write_text("the user's")
    assert files.folder_state(run, RUN_LAYOUT)[0] == "foreign"


def test_a_file_is_replaced_all_at_once(tmp_path):
    """write_bytes renames a finished temporary into place: a reader that opened the file before reads the old
    file whole, never a mix, and no temporary is left."""
    path = tmp_path / "state.json"
    path.write_bytes(b"old " * 4096)
    with open(path, "rb") as reader:
        assert reader.read(4) == b"old "
        files.write_bytes(path, b"new")
        assert reader.read() == b"old " * 4095
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_demo_force_deletes_only_a_demo_holding_nothing_else(made, tmp_path, capsys):
    """(Refused in this process, as above: the lock below is another open file, which flock refuses as it would
    another process's.)"""
    from mlmtrain.demo import demo_layout

    demo = tmp_path / "demo"
    copy(made["tokenizer"], demo / "tokenizer")
    copy(made["run"], demo / "run")
    (demo / "demo_result.json").write_text("{}")
    files.write_marker(demo, demo_layout())
    (demo / "run" / "notes.txt").write_text("my notes on the demo run")
    before = snapshot(demo)
    assert_refused(in_process(capsys, "demo", "--out", demo), "already holds a demo", "--force")
    assert_refused(in_process(capsys, "demo", "--out", demo, "--force"), "did not write (run/notes.txt)")
    assert snapshot(demo) == before
    (demo / "run" / "notes.txt").unlink()
    assert files.check_out_folder(demo, demo_layout(), replace=True, replace_flag="--force") is True
    # a demo still running there holds the folder's lock: --force waits for it rather than delete it under it
    from mlmtrain.run_folder import RunLock

    lock = RunLock(demo, print)
    before = snapshot(demo)
    assert_refused(in_process(capsys, "demo", "--out", demo, "--force"), "is in use by another training process")
    assert snapshot(demo) == before
    lock.release()


def test_files_named_like_ours_are_not_ours(made, tmp_path):
    """Names alone never make a folder mlmtrain's: a transformers tokenizer (the four files, no record), a
    user's config.json + metrics.jsonl, and in a marked run or demo, files under checkpoints/ or profile/
    that `train` does not write, or a hidden folder that is not one of its temporary siblings."""
    from mlmtrain.demo import demo_layout
    from mlmtrain.run_folder import RUN_LAYOUT
    from mlmtrain.tokenizer import TOKENIZER_LAYOUT, TOKENIZER_RECORD

    hf_tok = copy(made["tokenizer"], tmp_path / "hf_tok")
    (hf_tok / files.MARKER).unlink()
    (hf_tok / TOKENIZER_RECORD).unlink()
    assert files.folder_state(hf_tok, TOKENIZER_LAYOUT)[0] == "foreign"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "hyperparams"}')
    (mine / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert files.folder_state(mine, RUN_LAYOUT)[0] == "foreign"
    (mine / "config.json").write_text((made["run"] / "config.json").read_text())  # an older mlmtrain's run
    assert files.folder_state(mine, RUN_LAYOUT)[0] == "mine"

    run = copy(made["run"], tmp_path / "run")
    host, dead = files._host(), dead_pid()
    user = ["checkpoints/NOTES.txt", "checkpoints/step_00000002/model.bin", "profile/analysis.md", ".tmp_mine/a.txt",
            f".tmp_notes_{host}_{dead}", f"checkpoints/.tmp_draft_{host}_{dead}/a.txt"]  # fmt: skip
    ours = [f"checkpoints/.tmp_step_00000003_{host}_{dead}/model.safetensors", f".tmp_config.json_{host}_{dead}",
            f".tmp_.mlmtrain.json_{host}_{dead}", f"profile/.tmp_phases.json_{host}_{dead}",
            f"checkpoints/.tmp_step_00000004_{host}_{dead}/.tmp_state.json_{host}_{dead}"]  # fmt: skip
    for name in user + ours:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    # a folder the run makes no file in is listed whole, as are an empty one and one that cannot be listed
    (run / "checkpoints" / "kept_by_hand").mkdir()
    locked = run / "checkpoints" / "step_00000009"  # a name the run writes, so only its listing can tell
    locked.mkdir()
    (locked / "notes.txt").write_text("x")
    listed = {".tmp_mine/a.txt": ".tmp_mine/", f"checkpoints/.tmp_draft_{host}_{dead}/a.txt":
              f"checkpoints/.tmp_draft_{host}_{dead}/"}  # fmt: skip
    scandir = os.scandir

    def unreadable(path="."):  # chmod 0300, for any user (root reads anything)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", unreadable)
        assert files.foreign_files(run, RUN_LAYOUT) == sorted(
            [listed.get(name, name) for name in user] + ["checkpoints/kept_by_hand/", "checkpoints/step_00000009/"]
        )
    (run / "checkpoints" / "kept_by_hand").rmdir()
    shutil.rmtree(locked)  # (a folder named as a checkpoint, without one: a resume would skip it as damaged)
    from mlmtrain.run_folder import _ours_in

    files.remove_stale_tmp(run, any_host=True, owns=_ours_in())  # what a run's start cleans up: only its own
    files.remove_stale_tmp(run / "checkpoints", any_host=True, owns=_ours_in("checkpoints"))
    assert all((run / name).exists() for name in user)
    assert not any((run / name).exists() for name in ours if "profile/" not in name)
    for name in ours:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    demo = tmp_path / "demo"
    copy(run, demo / "run")
    (demo / "demo_result.json").write_text("{}")
    files.write_marker(demo, demo_layout())
    (demo / f".tmp_export_{host}_{dead}").mkdir()  # a killed demo's export, killed inside a JSON write
    (demo / f".tmp_export_{host}_{dead}" / f".tmp_config.json_{host}_{dead}").write_text("x")
    assert files.foreign_files(demo, demo_layout()) == sorted(f"run/{listed.get(name, name)}" for name in user)


def test_the_current_folder_as_out_is_refused_before_any_work(tmp_path, sample_corpus):
    """`--out .` (or '') cannot be written by renaming a new folder into its place (the temporary sibling landed
    inside it, and the tokenizer trained before the refusal): one sentence first, nothing written."""
    empty = tmp_path / "here"
    empty.mkdir()
    for out in (".", ""):
        done = run_cli("tokenizer", "--input", sample_corpus, "--out", out, cwd=empty)
        assert_refused(done, "is the current folder: pass a folder in it, e.g. --out out.")
    assert not any(empty.iterdir())


def test_a_symbolic_link_as_out_is_refused_before_any_work(tmp_path):
    from mlmtrain.tokenizer import TOKENIZER_LAYOUT

    target = tmp_path / "target"
    target.mkdir()
    for link, to in ((tmp_path / "link", target), (tmp_path / "dangling", tmp_path / "nowhere")):
        link.symlink_to(to)
        with pytest.raises(UserError, match="is a symbolic link: pass the folder it points to"):
            files.check_out_folder(link, TOKENIZER_LAYOUT, replace=True)  # what every command asks before work
        assert link.is_symlink()
    assert not any(target.iterdir())


def test_temporary_sibling_names_are_read_one_way(tmp_path):
    """`.tmp_data_old_H_P` is the half-written folder `data_old`, never a moved-aside copy of `data`: only a
    `.mlmtrain-old_` sibling is ever put back in place of its folder."""
    host, dead = files._host(), dead_pid()
    half = tmp_path / f".tmp_data_old_{host}_{dead}"
    half.mkdir()
    assert files.remove_stale_tmp(tmp_path, "data") == [] and half.exists()
    assert files.remove_stale_tmp(tmp_path, "data_old") == [f"removed {half}, left by a killed process"]
    aside = tmp_path / f".mlmtrain-old_data_{host}_{dead}"
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    assert files.remove_stale_tmp(tmp_path, "data_old") == [] and aside.exists()
    assert "put back" in files.remove_stale_tmp(tmp_path, "data")[0]
    assert (tmp_path / "data" / "meta.json").is_file() and not aside.exists()
    # an older mlmtrain moved a complete checkpoint aside as .tmp_step_N_old_H_P: it is left, never deleted
    legacy = tmp_path / "checkpoints" / f".tmp_step_00000004_old_{host}_{dead}"
    legacy.mkdir(parents=True)
    (legacy / "manifest.json").write_text("{}")
    assert "may have moved step_00000004 aside" in files.remove_stale_tmp(legacy.parent, any_host=True)[0]
    assert (legacy / "manifest.json").is_file()


def test_what_a_killed_process_left_is_cleaned_up_at_the_next_start(made, tmp_path, sample_corpus):
    """A half-written checkpoint is removed; a complete one a killed process had moved aside (to save the same
    step again) is put back, never deleted; a killed prepare's half folder goes; a live process's stays."""
    run = copy(made["run"], tmp_path / "run")
    host, dead = files._host(), dead_pid()
    checkpoints = run / "checkpoints"
    half = checkpoints / f".tmp_step_00000003_{host}_{dead}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half a checkpoint")
    os.replace(checkpoints / "step_00000002", checkpoints / f".mlmtrain-old_step_00000002_{host}_{dead}")
    done = run_cli(*train_args(made["shards"], made["tokenizer"], run, 3, "--resume", "--change-max-steps"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "put back" in done.stdout and "removed" in done.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000003"]

    stale = tmp_path / f".tmp_data_{host}_{dead}"
    live = tmp_path / f".tmp_data_{host}_{os.getpid()}"  # this test process: alive, so not stale
    for folder in (stale, live):
        folder.mkdir()
        (folder / "meta.json").write_text("{")
    done = run_cli("prepare", "--input", sample_corpus, "--tokenizer", made["tokenizer"], "--out", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and live.exists()


def _namespaces_work() -> bool:
    try:
        probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0 and shutil.which("setpriv") is not None


@pytest.mark.skipif(not _namespaces_work(), reason="needs unprivileged user+mount namespaces (unshare -Urm)")
def test_full_disk_read_only_and_no_permission_fail_cleanly_for_every_command(made, tmp_path, sample_corpus):
    """On a real 16 MiB tmpfs (tests/tmpfs_driver.py): filled to its last 16 KiB, then read-only, then without
    permission. Every command exits 2 with one sentence naming the folder and what is intact, leaves the
    previous folder (for `train`, its checkpoint) exactly as it was, and no temporary file."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    spec = {
        "mount": str(mount),
        "copies": {
            "tok": str(made["tokenizer"]),
            "data": str(made["shards"]),
            "run": str(made["run"]),
            "export": str(made["export"]),
        },  # fmt: skip
        "commands": {
            "tokenizer": [
                "tok",
                ["tokenizer", "--input", str(sample_corpus), "--out", "{M}/tok", "--overwrite", "--vocab-size", "1500"],
            ],  # fmt: skip
            "prepare": [
                "data",
                [
                    "prepare",
                    "--input",
                    str(sample_corpus),
                    "--tokenizer",
                    "{M}/tok",
                    "--out",
                    "{M}/data",
                    "--overwrite",
                    "--seed",
                    "3",
                ],
            ],  # fmt: skip
            "train": [
                "run/checkpoints",
                [str(a) for a in train_args("{M}/data", "{M}/tok", "{M}/run", 3, "--resume", "--change-max-steps")],
            ],  # fmt: skip
            "export": [
                "export",
                ["export", "--checkpoint", "{M}/run", "--out", "{M}/export", "--overwrite", "--no-verify"],
            ],  # fmt: skip
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = Path(__file__).with_name("tmpfs_driver.py")
    cmd = ["unshare", "-Urm", sys.executable, str(driver), str(tmp_path / "spec.json"), str(tmp_path / "out.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "out.json").read_text())
    reasons = {"full": "No space left on device", "ro": "Read-only file system", "noperm": "Permission denied"}
    for case, r in results.items():
        mode, command = case.split("/")
        line = assert_refused(subprocess.CompletedProcess([], r["rc"], r["stdout"], r["stderr"]), reasons[mode])
        kept = "is intact" if command == "train" else "is unchanged"
        assert kept in line and str(mount) in line, (case, line)
        assert r["unchanged"], (case, line)
        assert r["temporary"] == [], (case, r["temporary"])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_prepare_exits_128_plus_it_and_leaves_no_temporary_folder(name, made, tmp_path):
    """The CLI turns SIGTERM (and SIGHUP, a terminal that went away) into an exception in every command, so their
    cleanups run (`train` saves instead); the exit code is 128 + the signal's number."""
    import signal
    import time

    sig = signal.Signals[name]
    corpus = tmp_path / "big.txt"
    corpus.write_text("대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.\n" * 400_000, encoding="utf-8")
    args = ["prepare", "--input", corpus, "--tokenizer", made["tokenizer"], "--out", tmp_path / "data"]
    proc = subprocess.Popen([sys.executable, "-m", "mlmtrain.cli", *map(str, args)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".tmp_data_*/train/tokens.npy")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and f"stopped by {name}" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


NOTE = files.Layout("note", "a note", "mlmtrain note", ("a.txt",), ("a.txt",))  # a command's folder, for the tests


def _write_note(final: Path, text: str) -> None:
    """A NOTE folder at `final` holding a.txt = text, written as the command would."""
    with files.atomic_dir(final, layout=NOTE) as folder:
        (folder / "a.txt").write_text(text)


def test_a_folder_another_run_replaced_meanwhile_is_not_replaced_again(tmp_path):
    """Two `--overwrite` runs into one folder: the second to finish would replace the first's output and both
    would say they wrote it. The folder must still be the one this run found."""
    final = tmp_path / "out"
    _write_note(final, "old")
    with pytest.raises(UserError, match="was replaced by another process while this one wrote it"):
        with files.atomic_dir(final, replace=True, layout=NOTE) as folder:
            (folder / "a.txt").write_text("mine")
            theirs = tmp_path / "theirs"  # another run's: built aside and renamed into place, as atomic_dir does
            shutil.copytree(final, theirs)
            (theirs / "a.txt").write_text("theirs")
            final.rename(tmp_path / "gone")
            theirs.rename(final)
    assert (final / "a.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "out"]  # no temporary of this run left
    fresh = tmp_path / "fresh"  # absent when this run started: another run's folder there is never replaced
    with pytest.raises(UserError, match="appeared while it was being written"):
        with files.atomic_dir(fresh, replace=True, layout=NOTE) as folder:
            (folder / "a.txt").write_text("mine")
            shutil.copytree(final, fresh)
    assert (fresh / "a.txt").read_text() == "theirs"


def test_a_signal_while_the_output_is_put_in_place_waits_for_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the old folder is deleted (seconds, for large shards): it waits until the new folder is in
    place, which is said, then stops as Ctrl-C does (a demo before its next stage; the command exits 130)."""
    import signal

    final = tmp_path / "out"
    _write_note(final, "old")
    remove = files._remove

    def interrupted(path):
        if path.name.startswith(files.OLD_PREFIX):
            os.kill(os.getpid(), signal.SIGINT)
        remove(path)

    monkeypatch.setattr(files, "_remove", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_dir(final, replace=True, layout=NOTE) as folder:
            (folder / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"SIGINT came while {final} was put in place: it is complete" in capsys.readouterr().err


def test_a_mount_point_as_out_is_refused_before_any_work(tmp_path, monkeypatch):
    """A mounted volume (`docker -v`) cannot have a folder renamed into its place: the whole output was built
    first, on the parent's disk, then the rename failed."""
    mount = tmp_path / "volume"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mount)
    with pytest.raises(UserError, match=rf"--out {mount} is a mount point: pass a folder in it, e.g. --out {mount}/"):
        files.check_out_folder(mount, NOTE, replace=False)


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_siblings_are_judged_by_host_pid_and_what_stands_in_their_place(tmp_path):
    """remove_stale_tmp: this process's own temporary is never stale, even with any_host (kills F15); another
    host's is kept unless the caller holds the folder's lock (any_host) (kills F16); a moved-aside folder whose
    place was taken since is removed, not put back over the new one (kills F17); an older mlmtrain's
    `.tmp_X_old_` that is half written (no marker, no manifest) is removed (kills F18)."""
    host, dead = files._host(), _dead_pid()
    mine = tmp_path / f".tmp_data_{host}_{os.getpid()}"
    mine.mkdir()
    assert files.remove_stale_tmp(tmp_path, any_host=True) == [] and mine.exists()
    mine.rmdir()
    elsewhere = tmp_path / f".tmp_data_otherhost_{dead}"
    elsewhere.mkdir()
    assert files.remove_stale_tmp(tmp_path, "data") == [] and elsewhere.exists()
    assert files.remove_stale_tmp(tmp_path, "data", any_host=True) == [f"removed {elsewhere}, left by a killed process"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("new")
    aside = tmp_path / f".mlmtrain-old_data_{host}_{dead}"
    aside.mkdir()
    (aside / "meta.json").write_text("old")
    assert files.remove_stale_tmp(tmp_path, "data") == [f"removed {aside}, left by a killed process"]
    assert (tmp_path / "data" / "meta.json").read_text() == "new" and not aside.exists()
    half_old = tmp_path / f".tmp_step_00000004_old_{host}_{dead}"
    half_old.mkdir()
    (half_old / "model.safetensors").write_bytes(b"half")
    assert files.remove_stale_tmp(tmp_path, any_host=True) == [f"removed {half_old}, left by a killed process"]


def test_a_write_failure_names_the_folder_above_every_temporary(tmp_path):
    """The sentence names where the user's folder is, never a temporary one however deep the file was in it
    (kills F20: only one level climbed)."""
    import errno

    error = OSError(errno.ENOSPC, "No space left on device", "/runs/.tmp_run_h_1/checkpoints/.tmp_step_h_1/x.bin")
    assert files.write_failure(error) == "No space left on device (/runs)"


def test_json_text_writes_every_non_finite_float_as_null():
    """Infinity too (an overflowed gradient norm), and inside tuples (kills F02: only NaN; F03: tuples kept)."""
    text = files.json_text({"grad_norm": float("inf"), "pair": (1.5, float("nan")), "low": float("-inf")})
    assert json.loads(text) == {"grad_norm": None, "pair": [1.5, None], "low": None}


def test_a_file_put_in_the_folder_while_it_is_rewritten_is_not_lost(tmp_path):
    """--overwrite checks the folder again just before the rename: a file of the user's that appeared there
    meanwhile is refused, not deleted with the old folder (kills F22)."""
    final = tmp_path / "out"
    _write_note(final, "old")
    with pytest.raises(UserError, match="did not write"):
        with files.atomic_dir(final, replace=True, layout=NOTE) as folder:
            (folder / "a.txt").write_text("new")
            (final / "notes.txt").write_text("the user's notes")
    assert (final / "notes.txt").read_text() == "the user's notes" and (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """The new folder cannot be renamed into place after the old one was moved aside: the old one goes back,
    whole, and the error says it is unchanged (kills F25)."""
    import errno

    final = tmp_path / "out"
    _write_note(final, "old")
    replace = os.replace

    def refuse_the_new_folder(src, dst):  # the folder's rename into place only (not the files written in it)
        if Path(dst).name == "out" and Path(src).name.startswith(files.TMP_PREFIX):
            raise OSError(errno.EACCES, "Permission denied", str(src))
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", refuse_the_new_folder)
    with pytest.raises(UserError, match="the previous .* is unchanged"):
        with files.atomic_dir(final, replace=True, layout=NOTE) as folder:
            (folder / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _demo_folder(tmp_path: Path) -> Path:
    from mlmtrain.demo import demo_layout

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo_result.json").write_text("{}")
    files.write_marker(demo, demo_layout())
    return demo


def test_demo_force_keeps_the_lock_it_holds_while_it_clears_the_folder(tmp_path, capsys, monkeypatch):
    """--force deletes the earlier demo's files but not .mlmtrain.lock, which this process holds: deleting it
    would let a second demo take a new lock file and run in the same folder (kills D05). The pipeline is
    stopped at its first stage, once the folder is cleared."""
    pytest.importorskip("transformers")
    from mlmtrain import text

    demo = _demo_folder(tmp_path)
    seen = {}

    def first_stage():
        seen["lock"] = (demo / files.LOCK).is_file()
        seen["names"] = sorted(p.name for p in demo.iterdir())
        raise UserError("stopped here by the test")

    monkeypatch.setattr(text, "sample_corpus_path", first_stage)
    assert_refused(in_process(capsys, "demo", "--out", demo, "--force"), "stopped here by the test")
    assert seen == {"lock": True, "names": sorted([files.LOCK, files.MARKER])}


def test_demo_curves_that_cannot_be_drawn_are_said_not_raised(tmp_path):
    """A demo whose run has no metrics to plot says why, and goes on to export (kills D08)."""
    pytest.importorskip("matplotlib")
    from mlmtrain.demo import draw_curves

    (tmp_path / "run").mkdir()
    assert draw_curves(tmp_path / "run").startswith("not drawn: ")


def test_a_demo_whose_training_stopped_exits_with_the_run_s_code(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the demo's training: the run saved and stopped (exit 130); the demo says so and exits 130,
    not 0, without exporting (kills D06). The tokenizer and shards are made for real (small vocabulary)."""
    pytest.importorskip("transformers")
    from mlmtrain import train as train_module

    monkeypatch.setattr(train_module, "train", lambda cfg: {"exit_code": 130, "stopped_by": "SIGINT"})
    done = in_process(capsys, "demo", "--out", tmp_path / "demo", "--vocab-size", 1000, "--quiet")
    assert done.returncode == 130, done.stdout + done.stderr
    assert "demo stopped (SIGINT)" in done.stdout and not (tmp_path / "demo" / "export").exists()


@pytest.mark.parametrize("count", [5, 7])
def test_a_replace_refusal_names_five_foreign_files_and_counts_the_rest(tmp_path, count):
    """The sentence lists at most five of the user's files and says how many more (kills F13: "and 0 more" at
    exactly five; F14: the rest not counted)."""
    final = tmp_path / "out"
    _write_note(final, "old")
    for i in range(count):
        (final / f"user{i}.txt").write_text("mine")
    with pytest.raises(UserError) as refused:
        files.check_out_folder(final, NOTE, replace=True)
    message = str(refused.value)
    assert message.count("user") == 5 and ("and 2 more" in message) == (count == 7) and "and 0 more" not in message
    assert all((final / f"user{i}.txt").exists() for i in range(count))


def test_written_files_take_the_umask_s_mode(tmp_path):
    """Files mlmtrain writes get 0666 minus the umask, as any tool's new files (0640 under umask 027: a group
    that should not read them cannot); the export's files, which safetensors creates 0600, are set to that mode,
    never a fixed 0644 (kills F04)."""
    old = os.umask(0o027)
    try:
        files.write_json(tmp_path / "a.json", {"a": 1})
        mode = files.file_mode()
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640 and mode == 0o640


def test_a_file_named_as_a_folder_the_run_owns_whole_is_the_user_s(tmp_path):
    """`wandb/**` owns everything below a `wandb` folder, not a file named `wandb` beside config.json: replacing
    the run would delete the user's file (kills F05: a path as deep as the pattern's folder read as below it)."""
    from mlmtrain.run_folder import RUN_LAYOUT

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "wandb").write_text("my W&B notes")  # a file, where W&B writes a folder
    assert files.owned("wandb/run-1/files/config.yaml", "wandb/**")
    assert files.foreign_files(run, RUN_LAYOUT) == ["wandb"]


def test_an_empty_folder_as_out_is_written_into(tmp_path):
    """An empty folder (made by hand before the command) is as good as an absent one: written without
    --overwrite, nothing refused (kills F06: an empty folder read as one mlmtrain did not make)."""
    final = tmp_path / "out"
    final.mkdir()
    assert files.folder_state(final, NOTE) == ("empty", "")
    _write_note(final, "new")
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_link_named_as_a_folder_of_ours_is_the_user_s(tmp_path):
    """`run/checkpoints` as a symbolic link (the user's checkpoints on another disk) is not a folder the run
    made: it is listed, as the link, among what replacing the run would lose (kills F09: links read as
    folders, so an owned name passed unlisted)."""
    from mlmtrain.run_folder import RUN_LAYOUT

    elsewhere = tmp_path / "bigdisk"
    (elsewhere / "step_00000002").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    assert files.foreign_files(run, RUN_LAYOUT) == ["checkpoints"]


def test_a_demo_part_made_by_another_command_is_listed_whole(tmp_path):
    """demo/run holding a tokenizer's marker is not the demo's run, even when every file in it has a name a run
    writes: `demo --force` must not delete it (kills F11: every part folder judged by its file names alone)."""
    from mlmtrain.demo import demo_layout
    from mlmtrain.tokenizer import TOKENIZER_LAYOUT

    demo = _demo_folder(tmp_path)
    (demo / "run").mkdir()
    files.write_marker(demo / "run", TOKENIZER_LAYOUT)
    (demo / "run" / "config.json").write_text("{}")  # a name RUN_LAYOUT owns
    assert files.foreign_files(demo, demo_layout()) == ["run/"]


def test_a_safetensors_write_failure_is_said_in_the_system_s_words():
    """Both forms safetensors raises a full disk in (its I/O error line, and older versions' Rust debug text)
    read as the system's sentence, as an OSError does (kills F21: the whole SafetensorError text)."""
    from safetensors import SafetensorError

    new = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    old = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    assert files.write_failure(new) == files.write_failure(old) == "No space left on device"


def test_a_folder_with_the_same_inode_on_another_filesystem_is_another_folder(tmp_path, monkeypatch):
    """An inode number is unique on one filesystem only: a folder that took `out`'s place from another one (a
    volume mounted there meanwhile) may carry the same number and is still not the folder this run found, so
    it is not replaced (kills F32: the inode alone compared). The mount is faked: once "mounted", `out` reads
    as the same inode on another device."""
    final = tmp_path / "out"
    _write_note(final, "old")
    stat, mounted = Path.stat, []

    def stat_after_mount(path, *, follow_symlinks=True):
        st = stat(path, follow_symlinks=follow_symlinks)
        if mounted and path.name == "out":  # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime)
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *st[3:10]))
        return st

    monkeypatch.setattr(Path, "stat", stat_after_mount)
    with pytest.raises(UserError, match="was replaced by another process while this one wrote it"):
        with files.atomic_dir(final, replace=True, layout=NOTE) as folder:
            (folder / "a.txt").write_text("new")
            mounted.append(final)
    assert (final / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _faked_demo(tmp_path, capsys, monkeypatch, *, valid_loss=3.0, baseline=5.0, export_rc=0, argvs=None):
    """`mlmtrain demo` (through the CLI's entry point) with every stage faked, so none costs seconds: the
    tokenizer, the shards, the unigram numbers (`baseline`: the unigram model's valid loss), the training
    (`valid_loss`), the curves, the export and upload (`cli.main`, exit `export_rc` for the export) and
    fill-mask. Returns (exit code, the stages run after training, stdout); `argvs` (a list) gets their argv."""
    pytest.importorskip("transformers")
    from mlmtrain import cli, demo, evaluate, prepare, tokenizer
    from mlmtrain import train as train_module

    main, stages = cli.main, []
    meta = {"vocab_size": 100, "train": {"sentences": 9}, "valid": {"sentences": 1}}
    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a, **k: 100)
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: meta)
    monkeypatch.setattr(prepare, "load_split", lambda *a: SimpleNamespace(tokens=[5, 6]))
    monkeypatch.setattr(prepare, "shard_specials", lambda m: ())
    monkeypatch.setattr(evaluate, "unigram_entropy", lambda *a: 4.0)
    monkeypatch.setattr(evaluate, "unigram_cross_entropy", lambda *a: baseline)
    summary = {"exit_code": 0, "stopped_by": None, "valid_loss": valid_loss, "valid_accuracy": 0.5,
               "tokens_per_s": 1000.0}  # fmt: skip
    monkeypatch.setattr(train_module, "train", lambda cfg: summary)
    monkeypatch.setattr(demo, "draw_curves", lambda run: "not drawn: faked")
    monkeypatch.setattr(demo, "fill_mask", lambda folder, text: stages.append("fill-mask") or [])
    calls = argvs if argvs is not None else []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or stages.append(argv[0]) or
                        (export_rc if argv[0] == "export" else 0))  # fmt: skip
    capsys.readouterr()
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "--quiet"])
    return rc, stages, capsys.readouterr().out


@pytest.mark.parametrize(("valid_loss", "verdict"), [(3.0, "is below"), (6.0, "is NOT below")])
def test_the_demo_says_whether_its_loss_is_below_the_unigram_model_s(
    valid_loss, verdict, tmp_path, capsys, monkeypatch
):
    """The closing line compares the validation loss with the unigram model's on the same split (5.0 here):
    a lower loss is "below", a higher one "NOT below" (kills D07: the comparison reversed)."""
    rc, stages, out = _faked_demo(tmp_path, capsys, monkeypatch, valid_loss=valid_loss, baseline=5.0)
    assert rc == 0 and stages == ["export", "fill-mask", "upload"], out
    assert f"validation MLM loss {valid_loss:.3f} {verdict} the unigram model's 5.000" in out, out
    assert "[1/6]" not in out and "[6/6]" not in out, out  # --quiet: the result, not the stages' headers


def test_the_demos_card_names_the_repo_its_upload_dry_run_goes_to(tmp_path, capsys, monkeypatch):
    """The export's --name is the upload's --repo-id: the card's usage example loads that repo, not PATH_OR_REPO_ID."""
    argvs = []
    rc, stages, out = _faked_demo(tmp_path, capsys, monkeypatch, argvs=argvs)
    assert rc == 0 and stages == ["export", "fill-mask", "upload"], out
    export, upload = argvs
    name, repo_id = export[export.index("--name") + 1], upload[upload.index("--repo-id") + 1]
    assert "/" in name and name == repo_id, (export, upload)


def test_a_demo_whose_export_failed_exits_with_its_code(tmp_path, capsys, monkeypatch):
    """The export stage refused (exit 2): the demo ends there with 2, runs neither fill-mask nor the upload dry
    run on an export that is not there, and writes no result (kills D09: the export's exit code ignored)."""
    rc, stages, out = _faked_demo(tmp_path, capsys, monkeypatch, export_rc=2)
    assert rc == 2 and stages == ["export"], out
    assert not (tmp_path / "demo" / "demo_result.json").exists()
