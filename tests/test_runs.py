"""One run, one folder, and exit codes a script can rely on: an existing run is continued only with --resume; a
second process is refused naming the one that trains there; a checkpoint of another run starts a new run
in --out only; a copied run resumes where it is, from any directory; max_steps changes only when asked;
a finished run is left as it is; signals save and exit 130/143/129, non-finite stops exit 3; metrics.jsonl has
every step once across a crash and a resume; 30 runs in a row all exit 0. The real CLI, mostly in
subprocesses."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import faults
import pytest
from cli_run import TINY, assert_refused, in_process, run_cli, snapshot, train_args

from mlmtrain import checkpoint as ckpt
from mlmtrain.config_load import load_config
from mlmtrain.train import train


def start(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlmtrain.cli", *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def holds_lock(run: Path, pid: int) -> bool:
    path = run / ".mlmtrain.lock"
    return path.is_file() and f"pid {pid} " in path.read_text()


def test_an_existing_run_is_continued_only_with_resume(data_dir, tokenizer_dir, tmp_path, capsys):
    """(The refusals, here and below, run in this process: they come before any training, and a new interpreter
    each would cost seconds.)"""
    run = tmp_path / "run"
    assert run_cli(*train_args(data_dir, tokenizer_dir, run)).returncode == 0
    before = snapshot(run)
    refused = in_process(capsys, *train_args(data_dir, tokenizer_dir, run))
    line = assert_refused(refused, "already holds a training run")
    assert f"--config {run / 'config.json'} --resume" in line
    assert_refused(
        in_process(capsys, *train_args(data_dir, tokenizer_dir, run, 0)), "train.max_steps must be at least 1"
    )
    assert snapshot(run) == before
    ended = tmp_path / "ended"  # a run that saved no checkpoint but ended is a result, not a start that failed
    no_end_checkpoint = ("--set", "train.checkpoint_at_end=false")
    assert in_process(capsys, *train_args(data_dir, tokenizer_dir, ended, 2, *no_end_checkpoint)).returncode == 0
    before = snapshot(ended)
    for extra in ((), ("--lr", "1e-3")):
        refused = in_process(capsys, *train_args(data_dir, tokenizer_dir, ended, 3, *extra))
        assert_refused(refused, "holds a run that ended (its summary.json) and saved no checkpoint", "new --out")
    assert snapshot(ended) == before
    (ended / "summary.json").unlink()  # now as a start killed before its first checkpoint leaves it
    for resume in (("--out", ended, "--resume"), ("--resume", ended)):  # the short forms read its config.json
        line = assert_refused(in_process(capsys, "train", *resume), "the run saved none yet")
        assert f"--config {ended / 'config.json'}` starts it again" in line


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_one_holds_nothing(
    data_dir, tokenizer_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    first = start(*train_args(data_dir, tokenizer_dir, run, 5000))
    try:
        wait_for(lambda: holds_lock(run, first.pid) and (run / "metrics.jsonl").is_file())
        for extra in ((), ("--resume",)):
            refused = in_process(capsys, *train_args(data_dir, tokenizer_dir, run, 5000, *extra))
            line = assert_refused(refused, "is in use")
            assert f"pid {first.pid} on " in line and "started " in line
        first.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel still drops the lock
        first.wait(timeout=60)
    finally:
        first.kill()
    assert not list((run / "checkpoints").glob("step_*"))  # it never saved: the folder may start over
    done = run_cli(*train_args(data_dir, tokenizer_dir, run, 2))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2]


def test_a_checkpoint_of_another_run_starts_a_new_run_in_out_only(data_dir, tokenizer_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    done = run_cli(*train_args(data_dir, tokenizer_dir, a, 2, "--set", "train.checkpoint_every=1"))
    assert done.returncode == 0, done.stderr
    before = snapshot(a)
    first = a / "checkpoints" / "step_00000001"
    done = run_cli("train", "--config", a / "config.json", "--resume", first, "--out", b)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in ckpt.complete_checkpoints(b)] == ["step_00000002"]
    assert [r["step"] for r in rows(b) if "loss" in r] == [2]
    # without --out the run is a's own folder, where an older checkpoint would mix two histories
    resume = ("train", "--config", a / "config.json", "--resume")
    assert_refused(in_process(capsys, *resume, first), "older than this run's newest")
    assert_refused(in_process(capsys, *resume, first, "--out", b), "another training")
    # a's last checkpoint is at its max_steps: a new run from it would train nothing, and says so (not exit 0)
    last, c = a / "checkpoints" / "step_00000002", tmp_path / "c"
    assert_refused(in_process(capsys, *resume, last, "--out", c), "nothing to train in")
    assert not c.exists()
    assert snapshot(a) == before


def test_a_copied_run_resumes_and_exports_where_it_is_from_any_directory(data_dir, tokenizer_dir, tmp_path):
    a, elsewhere = tmp_path / "a", tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = [os.path.relpath(p, tmp_path) for p in (data_dir, tokenizer_dir, a)]
    assert run_cli(*train_args(*relative), cwd=tmp_path).returncode == 0
    config = json.loads((a / "config.json").read_text())
    assert config["out_dir"] == str(a) and config["data"]["data_dir"] == str(data_dir)  # stored absolute
    copy = shutil.copytree(a, tmp_path / "copy")
    before = snapshot(a)
    done = run_cli("train", "--config", copy / "config.json", "--resume", "--max-steps", 3, "--change-max-steps",
                   cwd=elsewhere)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max_steps 2 -> 3: from step 2 the learning rate follows the new schedule" in done.stdout
    assert ckpt.latest_checkpoint(copy).name == "step_00000003"
    done = run_cli("export", "--checkpoint", copy, "--out", "exported", "--no-verify", cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert snapshot(a) == before


def test_every_checkpoint_counts_the_real_tokens_its_weights_saw(data_dir, tokenizer_dir, tmp_path):
    """The count the card states ("N real tokens seen"): a checkpoint between log steps counted none of the open
    window's tokens (0 at step 2 here), and a resumed run adds its own to its checkpoint's."""
    from test_train import tiny_config

    def seen(run, step):
        return json.loads((run / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())["real_tokens"]

    settings = {"train.max_steps": 4, "train.log_every": 10, "train.checkpoint_every": 2, "train.keep_checkpoints": 0}
    full = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "full", **settings), log=lambda msg: None)
    assert 0 < seen(tmp_path / "full", 2) < seen(tmp_path / "full", 4) == full["real_tokens"]
    shutil.rmtree(shutil.copytree(tmp_path / "full", tmp_path / "resumed") / "checkpoints" / "step_00000004")
    resumed_cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / "resumed", **settings)
    resumed = train(resumed_cfg, resume=str(tmp_path / "resumed"), log=lambda msg: None)
    assert resumed["real_tokens"] == full["real_tokens"] == full["real_tokens_this_run"]  # summary.json: the weights'
    assert resumed["real_tokens_this_run"] == full["real_tokens"] - seen(tmp_path / "full", 2)
    assert seen(tmp_path / "resumed", 4) == seen(tmp_path / "full", 4)


def test_a_checkpoint_counts_the_same_real_tokens_with_deferred_log_reads(data_dir, tokenizer_dir, tmp_path):
    """With train.async_log_reads a window's numbers are read one window later: a save between log steps reads the
    window still in flight first (a save's count is the closed windows' sum, nothing open): the same count as
    without, at every checkpoint."""
    from test_train import tiny_config

    def seen(run, step):
        return json.loads((run / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())["real_tokens"]

    settings = {"train.max_steps": 4, "train.log_every": 10, "train.checkpoint_every": 2, "train.keep_checkpoints": 0}
    for name, deferred in (("sync", False), ("deferred", True)):
        cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / name, **settings, **{"train.async_log_reads": deferred})
        train(cfg, log=lambda msg: None)
    assert 0 < seen(tmp_path / "deferred", 2) == seen(tmp_path / "sync", 2) < seen(tmp_path / "deferred", 4)
    assert seen(tmp_path / "deferred", 4) == seen(tmp_path / "sync", 4)


def test_a_stops_checkpoint_counts_the_steps_of_its_open_window(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """A stop between log steps closes the open window before its save: the checkpoint counts the real tokens of
    every step it holds, as one from a run that logs at every step (each window closed at once)."""
    from test_train import tiny_config

    from mlmtrain import parallel

    def stop_after(steps):
        calls = []
        return lambda requested, due: (calls.append(1) or ("SIGTERM" if len(calls) == steps else None), due)

    counts = {}
    for log_every in (10, 1):
        monkeypatch.setattr(parallel, "agree_stop", stop_after(3))  # a SIGTERM in step 3, as every rank takes it
        cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / f"log{log_every}", **{"train.max_steps": 8,
                          "train.log_every": log_every, "train.checkpoint_every": 0})  # fmt: skip
        summary = train(cfg, log=lambda msg: None)
        state = tmp_path / f"log{log_every}" / "checkpoints" / "step_00000003" / "state.json"
        counts[log_every] = json.loads(state.read_text())["real_tokens"]
        assert summary["real_tokens"] == counts[log_every]
    assert counts[10] == counts[1] > 0


def test_keep_checkpoints_retires_only_older_checkpoints_of_its_own(data_dir, tokenizer_dir, tmp_path, capsys):
    """train.keep_checkpoints counts back from the step just saved: a later step's folder (here a damaged copy the
    resume skipped) is neither counted nor deleted, a checkpoint holding a file of the user's is kept and said, and
    the closing lines name this run's newest checkpoint."""
    from test_train import tiny_config

    from mlmtrain.metrics import closing_lines

    settings = {"train.max_steps": 3, "train.log_every": 1, "train.checkpoint_every": 1, "train.keep_checkpoints": 0}
    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **settings), log=lambda msg: None)
    root = run / "checkpoints"
    later = shutil.copytree(root / "step_00000003", root / "step_00000009")
    (later / "model.safetensors").write_bytes(b"damaged")
    (root / "step_00000002" / "eval.txt").write_text("mine")
    settings = {**settings, "train.max_steps": 5, "train.keep_checkpoints": 1}
    summary = train(tiny_config(data_dir, tokenizer_dir, run, **settings), resume=str(run), log=lambda msg: None,
                    change_max_steps=True)  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000005", "step_00000009"]
    assert (root / "step_00000002" / "eval.txt").read_text() == "mine"
    assert "past train.keep_checkpoints: it holds files mlmtrain did not write (eval.txt)" in capsys.readouterr().err
    assert f"checkpoint {root / 'step_00000005'};" in closing_lines(run, summary)


def test_a_resume_that_would_change_the_data_order_or_the_starting_model_is_refused(
    data_dir, tokenizer_dir, tmp_path, capsys, monkeypatch
):
    """The data cursor is a position in the packer's order: another data.pack or seed reads other sentences from
    it (pack=document crashed the packer thread, and config.json already said document, so even the plain resume
    crashed after). A resume's weights are its checkpoint's: an --init-from beside it would have been written
    into the state, and the card, as the base model. (The refusals run in this process: they come before any
    training, and a new interpreter each would cost seconds.)"""
    run = tmp_path / "run"
    assert run_cli(*train_args(data_dir, tokenizer_dir, run)).returncode == 0
    before = snapshot(run)
    resume = ("train", "--config", run / "config.json", "--resume", "--max-steps", 3, "--change-max-steps")
    pack = ("--set", "data.pack=document")
    assert_refused(
        in_process(capsys, *resume, *pack), "data.pack is 'document' here but 'sentence' in the checkpoint's run"
    )
    assert_refused(in_process(capsys, *resume, "--seed", 7), "train.seed is 7 here but 0")
    assert_refused(
        in_process(capsys, *resume, "--init-from", "klue/bert-base"), "started from scratch", "drop --init-from"
    )
    assert_refused(
        in_process(capsys, *resume, "--tokens-per-batch", 2048), "data.tokens_per_batch is 2048 here but 1024"
    )
    two = in_process(
        capsys, *resume, *pack, "--nproc", 2, "--set", "optim.grad_accum=2"
    )  # refused before torchrun starts
    assert "rank" not in assert_refused(two, "data.pack is 'document'", "optim.grad_accum is 2 here but 1")
    # what each rank would refuse in its own words, refused once before the processes start
    on_two = ("--nproc", 2, "--set", "optim.grad_accum=2")
    more_steps = ("train", "--config", run / "config.json", "--resume", "--max-steps", 4, "--nproc", 1)
    assert "rank" not in assert_refused(in_process(capsys, *more_steps), "--change-max-steps")
    with monkeypatch.context() as env:
        env.setenv("MLMTRAIN_DIST_TIMEOUT", "soon")
        timeout = in_process(capsys, *train_args(data_dir, tokenizer_dir, tmp_path / "new"), *on_two)
    assert "rank" not in assert_refused(timeout, "MLMTRAIN_DIST_TIMEOUT must be a positive number")
    short = in_process(
        capsys,
        *train_args(data_dir, tokenizer_dir, tmp_path / "new"),
        *on_two,
        "--set",
        "model.max_position_embeddings=64",
    )
    assert "rank" not in assert_refused(short, "max_position_embeddings")
    assert not (tmp_path / "new").exists() and snapshot(run) == before


def test_a_resume_keeps_the_runs_settings_in_its_folder_and_a_new_run_from_its_checkpoint_may_change_them(
    data_dir, tokenizer_dir, tmp_path, capsys
):
    """A resume without --config takes the run's own settings (RUN/config.json, found from --out, a run folder or
    one of its checkpoints), the flags given on top. In the run's folder another learning rate, masking or dropout
    is refused: the original command run again without its --lr used to go on at the default rate and rewrite
    config.json, and with it the card, silently. A new run from the checkpoint, in another folder, may change them."""
    run, copies = tmp_path / "run", [tmp_path / f"copy{i}" for i in range(3)]
    first = (*train_args(data_dir, tokenizer_dir, run, 4), "--set", "train.checkpoint_every=2")
    assert run_cli(*first, "--lr", "2e-3").returncode == 0
    lrs = {r["step"]: r["lr"] for r in rows(run) if "lr" in r}  # steps 1-4 at 2e-3's schedule
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if stopped after step 2
    for copy in copies:
        shutil.copytree(run, copy)
    before = snapshot(run)
    other = ("--lr", "1e-4", "--set", "mask.mask_prob=0.2", "--set", "model.dropout=0")
    refused = [("train", "--out", run), ("train", "--config", run / "config.json"), first]
    for resume in refused:
        assert_refused(
            in_process(capsys, *resume, "--resume", *other),
            "optim.lr is 0.0001 here but 0.002 in the run",
            "mask.mask_prob is 0.2 here but 0.15 in the run",
            "model.dropout is 0.0 here but 0.1 in the run",
            "--out NEW_RUN",
        )
    assert snapshot(run) == before
    # the first command again without its --lr, a run folder, a checkpoint: each goes on at the run's rate
    resumes = [
        (*first, "--resume"),
        ("train", "--resume", copies[0]),
        ("train", "--resume", copies[1] / "checkpoints" / "step_00000002"),
    ]
    for folder, resume in zip((run, *copies[:2]), resumes):
        assert in_process(capsys, *resume).returncode == 0
        assert {r["step"]: r["lr"] for r in rows(folder) if "lr" in r} == lrs, folder
        assert json.loads((folder / "config.json").read_text())["optim"]["lr"] == 2e-3
        commands = ckpt.read_state(folder / "checkpoints" / "step_00000004")[1]["commands"]  # the card shows each
        assert [shlex.split(c)[1:] for c in commands] == [[*map(str, first), "--lr", "2e-3"], [*map(str, resume)]]
    branch = tmp_path / "branch"
    new_run = ("train", "--resume", copies[2] / "checkpoints" / "step_00000002", "--out", branch, *other)
    assert in_process(capsys, *new_run).returncode == 0
    saved = json.loads((branch / "config.json").read_text())
    assert (saved["optim"]["lr"], saved["mask"]["mask_prob"], saved["model"]["dropout"]) == (1e-4, 0.2, 0.0)


def test_max_steps_changes_only_when_asked_and_a_finished_run_is_left_as_it_is(
    data_dir, tokenizer_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    assert run_cli(*train_args(data_dir, tokenizer_dir, run)).returncode == 0
    before = snapshot(run)
    refused = in_process(capsys, *train_args(data_dir, tokenizer_dir, run, 4, "--resume"))
    line = assert_refused(refused, "--change-max-steps")
    assert "set to 2 steps" in line and "asks for 4" in line
    done = in_process(capsys, *train_args(data_dir, tokenizer_dir, run, 2, "--resume"))
    assert done.returncode == 0, done.stdout + done.stderr  # finished: the goal holds, so `&& export` may go on
    assert "is finished (step 2 of 2): nothing to train" in done.stdout
    assert "done: 2 steps" in done.stdout and "next: mlmtrain export" in done.stdout
    # fewer steps than it has: finished too, without a schedule 'decaying until step 1' that nothing trains under
    fewer = in_process(capsys, *train_args(data_dir, tokenizer_dir, run, 1, "--resume", "--change-max-steps"))
    assert fewer.returncode == 0 and "is finished (step 2, past --max-steps 1)" in fewer.stdout, fewer
    assert "max_steps 2 -> 1" not in fewer.stdout + fewer.stderr
    assert snapshot(run) == before  # decided before taking the folder: not even the lock file was written


def signalled(run: Path, sig: signal.Signals, data_dir, tokenizer_dir, ignored=()) -> tuple[int, str]:
    """A long run, sent `sig` once it has logged two windows, started with the signals `ignored` ignored (as
    `nohup` starts a command): (exit code, output). A run that ignores `sig` is then stopped by SIGINT."""
    cmd = [sys.executable, "-m", "mlmtrain.cli", *map(str, train_args(data_dir, tokenizer_dir, run, 5000))]

    def start_ignoring():
        for ignore in ignored:
            signal.signal(ignore, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=start_ignoring)  # fmt: skip
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and len(rows(run)) >= 2)
        proc.send_signal(sig)
        if sig in ignored:
            trained = len(rows(run))
            wait_for(lambda: len(rows(run)) >= trained + 2)  # still training
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_a_signal_saves_and_exits_128_plus_it_unless_started_ignored(sig, data_dir, tokenizer_dir, tmp_path):
    """Ctrl-C, and SIGHUP (the terminal went away), stop a run after its step with a checkpoint; a run started
    with SIGHUP ignored, as `nohup` starts one, trains on through it. The resume commands it prints work when pasted
    into a shell, in a folder whose name has a space."""
    run = tmp_path / "a run"
    code, out = signalled(run, sig, data_dir, tokenizer_dir)
    assert code == 128 + sig and f"{sig.name} received" in out and "Traceback" not in out, out
    resumes = [shlex.split(line[line.index("mlmtrain train") :]) for line in out.splitlines() if "--resume" in line]
    assert len(resumes) == 2 and all(r == ["mlmtrain", "train", "--config", str(run / "config.json"), "--resume"]
                                      for r in resumes), out  # fmt: skip
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(run)) is None
    assert json.loads((run / "summary.json").read_text())["exit_code"] == 128 + sig
    if sig == signal.SIGHUP:
        code, out = signalled(tmp_path / "nohup", sig, data_dir, tokenizer_dir, ignored=[sig])
        assert code == 130 and "SIGHUP" not in out, out


def test_a_non_finite_stop_exits_3(data_dir, tokenizer_dir, tmp_path):
    launcher = [sys.executable, Path(__file__).with_name("faults.py"), "--nan-steps", "2", "--"]
    done = run_cli(*train_args(data_dir, tokenizer_dir, tmp_path / "nan", 4, "--set", "train.nan_policy=stop"),
                   launcher=launcher)  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "consecutive non-finite steps" in json.loads((tmp_path / "nan" / "summary.json").read_text())["stopped_by"]


def test_a_terminal_that_hung_up_is_dropped_without_asking_for_a_stop(monkeypatch):
    """Lines to a terminal that hung up (EIO) go to /dev/null: the hangup's own SIGHUP asks for the stop, and a
    run started to outlive it (`nohup`, `setsid`) trains on. EIO from a file (a failing disk) is an error."""
    import errno
    import io

    from mlmtrain.stop import StopSignal, guard_output

    main, terminal = os.openpty()
    stream = os.fdopen(terminal, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        with guard_output():
            stopper = StopSignal()
            try:
                print("step 1: before the hangup")
                os.close(main)  # the terminal hangs up: writes to it fail with EIO
                print("step 2: after it")
                print("step 3: and later")
                assert stopper.requested is None
            finally:
                stopper.restore()
        assert os.path.samestat(os.fstat(terminal), os.stat(os.devnull))
    finally:
        stream.close()

    class FailingDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sys, "stdout", FailingDisk())  # no file descriptor to point elsewhere: raised
    with guard_output(), pytest.raises(OSError, match="Input/output"):
        print("step 1")


def test_an_unwritable_output_stops_the_run_saved_with_exit_2(monkeypatch, capsys):
    """`mlmtrain train > log` on a full disk (/dev/full answers every write with ENOSPC): the run stops after the
    step with a checkpoint and exits 2, saying so on stderr; it once died unsaved, blaming the run folder."""
    from mlmtrain.stop import OUTPUT_FAILED, StopSignal, exit_code, guard_output

    with open("/dev/full", "w", buffering=1) as full:
        monkeypatch.setattr(sys, "stdout", full)
        with guard_output():
            stopper = StopSignal()
            try:
                print("step 1: loss 9.9")
                print("step 2: later lines go nowhere")
                assert stopper.requested == OUTPUT_FAILED
            finally:
                stopper.restore()
        assert os.path.samestat(os.fstat(full.fileno()), os.stat(os.devnull))
    err = capsys.readouterr().err
    assert "standard output could not be written (No space left on device)" in err and "exit 2" in err, err
    assert exit_code(OUTPUT_FAILED, None) == 2


def test_a_closed_output_stops_after_the_step_saved_and_exits_141(data_dir, tokenizer_dir, tmp_path):
    """`mlmtrain train ... | head`: the reader goes away; the run must not die unsaved at its next line."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlmtrain.cli", *map(str, train_args(data_dir, tokenizer_dir, run, 5000))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("step 1:"):
            pass
        proc.stdout.close()  # as `head` exits
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "standard output was closed" in err and "exit 141" in err, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["exit_code"] == 141 and summary["stopped_by"] == "SIGPIPE"
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(run)) is None
    assert summary["steps"] < 5000 and ckpt.latest_checkpoint(run).name == f"step_{summary['steps']:08d}"


def test_a_signal_after_the_last_step_stops_nothing(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """SIGTERM while the final checkpoint is written: the run trained to max_steps, so it exits 0, saying it is
    done (no "stopped", no --resume advice)."""
    from mlmtrain import train as train_module

    save = train_module.Run.save

    def save_then_signal(self, step, *args):
        save(self, step, *args)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_module.Run, "save", save_then_signal)
    logged = []
    summary = train(config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 3}), log=logged.append)
    assert summary["exit_code"] == 0 and summary["stopped_by"] is None and summary["steps"] == 3
    assert not any("stopped by" in line for line in logged), logged


def test_a_finished_run_gives_its_caller_ctrl_c_back(data_dir, tokenizer_dir, tmp_path):
    """In-process `cli.main(["train", ...])`: the loop ignores SIGINT once the run is done (its exit code is
    decided); the caller's handler is back after, and the run records the command it was given (its card shows
    it), not the host program's sys.argv."""
    from mlmtrain.cli import main

    before = signal.getsignal(signal.SIGINT), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    args = [str(a) for a in train_args(data_dir, tokenizer_dir, tmp_path / "run")]
    assert main(args) == 0
    assert (signal.getsignal(signal.SIGINT), {s: signal.getsignal(s) for s in before[1]}) == before
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["command"] == shlex.join(["mlmtrain", *args]) and "MLMTRAIN_COMMAND" not in os.environ


def test_a_stdout_closed_before_the_start_is_not_wanted(data_dir, tokenizer_dir, tmp_path):
    """`mlmtrain train ... >&-`: nothing reads the lines, the run trains to the end (exit 0), and no file the run
    opens takes the closed descriptor's number."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlmtrain.cli", *map(str, train_args(data_dir, tokenizer_dir, run, 3))]
    done = subprocess.run(cmd, preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert json.loads((run / "summary.json").read_text())["exit_code"] == 0
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def config(data_dir, tokenizer_dir, out, **overrides):
    base = {"out_dir": str(out), "data.data_dir": str(data_dir), "data.tokenizer_dir": str(tokenizer_dir),
            "model.size": "tiny", "data.tokens_per_batch": 1024, "train.eval_every": 0, "train.eval_batches": 1,
            "train.device": "cpu", "train.compile": "off", "optim.warmup_steps": 1}  # fmt: skip
    return load_config(None, {**base, **overrides})


def test_the_first_window_after_a_resume_counts_its_non_finite_steps(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """Resumed at step 3 with log_every 2, the first window holds step 4 alone; a non-finite step 4 must be
    reported there (not averaged in as 0) and fire nan_policy=stop."""
    run = tmp_path / "run"
    settings = {"train.log_every": 2, "train.nan_policy": "stop", "train.max_steps": 6}
    train(config(data_dir, tokenizer_dir, run, **{**settings, "train.max_steps": 3}))
    faults.inject_nan(monkeypatch.setattr, {4})
    summary = train(config(data_dir, tokenizer_dir, run, **settings), resume="auto", change_max_steps=True)
    window = [r for r in rows(run) if r["step"] == 4]
    assert window and window[0]["bad_steps"] == 1 and window[0]["loss"] is None, window
    assert summary["exit_code"] == 3 and summary["bad_steps"] == 1 and summary["steps"] == 4


@pytest.mark.parametrize(
    "log_every, checkpoint_every, saved, before, logged",
    [(1, 2, [2, 4], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]), (2, 3, [3], [2, 3, 4], [2, 3, 4, 6])],
)
def test_metrics_hold_every_step_once_across_a_crash_and_a_resume(
    data_dir, tokenizer_dir, tmp_path, monkeypatch, log_every, checkpoint_every, saved, before, logged
):
    """A crash at step 6, a line torn by the crash: the resume from the last checkpoint drops the rows after it and
    the torn line, and the file ends as the uninterrupted run's, loss for loss. A window closes at every save, so
    a checkpoint between log steps (3 here, logging every 2) has its row: the resume redoes whole windows."""
    settings = {"train.log_every": log_every, "train.checkpoint_every": checkpoint_every, "train.max_steps": 6}
    straight = train(config(data_dir, tokenizer_dir, tmp_path / "straight", **settings))
    run = tmp_path / "run"
    faults.crash_at(monkeypatch.setattr, 0, 6)
    with pytest.raises(RuntimeError, match="test crash"):
        train(config(data_dir, tokenizer_dir, run, **settings))
    monkeypatch.undo()
    assert [r["step"] for r in rows(run)] == before
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # a kill in the middle of a line
    assert [p.name for p in ckpt.complete_checkpoints(run)] == [f"step_{s:08d}" for s in saved]
    train(config(data_dir, tokenizer_dir, run, **settings), resume="auto")
    assert [(r["step"], r["loss"]) for r in rows(run) if "loss" in r] == straight["losses"]
    assert [r["step"] for r in rows(run)] == [*logged, 6]  # the last: the final evaluation


def test_an_eval_or_a_save_closes_the_log_window_so_its_time_is_in_none(data_dir, tokenizer_dir, tmp_path):
    """A window restarts its clock after an eval or a save: if it did not close first, the steps it held before
    lost their time but kept their tokens (tokens/s doubled at eval_every 2, log_every 4): so a window closes at
    every log step, eval and save."""
    settings = {"train.log_every": 4, "train.eval_every": 2, "train.checkpoint_every": 3, "train.max_steps": 8}
    train(config(data_dir, tokenizer_dir, tmp_path / "run", **settings))
    training = [r for r in rows(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in training] == [2, 3, 4, 6, 8]  # log steps 4, 8; evals 2, 4, 6, 8; saves 3, 6
    evals = [r["step"] for r in rows(tmp_path / "run") if "valid_loss" in r]
    assert evals == [2, 4, 6, 8]


@pytest.mark.slow
def test_short_trainings_in_a_row_all_exit_0(data_dir, tokenizer_dir, tmp_path):
    """Whole processes end cleanly, one after the other: a daemon packer thread still inside torch at interpreter
    teardown once aborted about 1 run in 20-30 ("terminate called without an active exception", exit 134). Its
    cause is checked deterministically (test_train.test_no_helper_of_a_run_outlives_it); these six are the smoke
    test of the exit itself (twelve took ~40 s of CI's 20 minutes). Two at a time, one step each: nearly all the
    time is starting Python and torch."""
    codes, running = [], []
    for i in range(6):
        args = ["train", "--data", data_dir, "--tokenizer", tokenizer_dir, "--out", tmp_path / f"r{i}",
                "--max-steps", 1, *TINY, "--set", "train.checkpoint_at_end=false"]  # fmt: skip
        running.append(start(*args))
        if len(running) == 2:
            for proc in running:
                out, _ = proc.communicate(timeout=300)
                codes.append(proc.returncode)
                assert "terminate called" not in out, out
            running = []
    assert codes == [0] * 6, codes


def _train_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_timed_checkpoint_is_saved_checkpoint_minutes_after_the_last_save(
    data_dir, tokenizer_dir, tmp_path, monkeypatch
):
    """train.checkpoint_minutes is minutes of wall time since the *last* save (not since the start), and a timed
    save closes the log window first. The loop's clock is faked: 20 s pass at each reading, the period is 30 s,
    so saves fall at steps 2 and 4 of 5 (kills T02: minutes read as hours; T16: the clock not restarted at a
    save; T07: a timed save that does not close the window)."""
    from mlmtrain import train as train_module

    clock = itertools.count(0.0, 20.0)
    monkeypatch.setattr(train_module, "time", SimpleNamespace(time=lambda: next(clock)))
    saved = []
    save = train_module.Run.save
    monkeypatch.setattr(train_module.Run, "save", lambda self, step, *a: (saved.append(step), save(self, step, *a)))
    settings = {"train.max_steps": 5, "train.log_every": 10, "train.checkpoint_minutes": 0.5,
                "train.checkpoint_at_end": False, "train.keep_checkpoints": 0}  # fmt: skip
    summary = train_module.train(config(data_dir, tokenizer_dir, tmp_path / "run", **settings), log=lambda m: 0)
    assert summary["exit_code"] == 0
    assert saved == [2, 4]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in _train_rows(tmp_path / "run") if "loss" in r] == [2, 4, 5]


def test_the_last_step_closes_its_log_window_between_log_steps(data_dir, tokenizer_dir, tmp_path):
    """max_steps 3 with log_every 2: the last window (step 3 alone) is logged, and counted in the summary and the
    final checkpoint (kills T05: the last step not closing the window)."""
    run = tmp_path / "run"
    summary = train(config(data_dir, tokenizer_dir, run, **{"train.max_steps": 3, "train.log_every": 2}),
                    log=lambda m: 0)  # fmt: skip
    rows = [r for r in _train_rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 3]
    state = json.loads((ckpt.latest_checkpoint(run) / "state.json").read_text())
    assert summary["real_tokens"] == state["real_tokens"] > 0
    assert summary["steps"] == 3


def test_a_stop_between_log_steps_logs_the_steps_it_saves(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """SIGTERM during step 3 with log_every 10: the run saves step 3 and exits 143, and metrics.jsonl holds the
    window it closed there (steps 1-3): a resume starts after step 3, so no later run logs them (kills T06: a
    stop that does not close the log window)."""
    from mlmtrain import train as train_module

    lr_at = train_module.lr_at

    def signal_in_step_3(step, cfg):
        if step == 2:  # the lr of step 3 (0-based 2) is set as it starts
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, cfg)

    monkeypatch.setattr(train_module, "lr_at", signal_in_step_3)
    run = tmp_path / "run"
    settings = {"train.max_steps": 8, "train.log_every": 10}
    summary = train_module.train(config(data_dir, tokenizer_dir, run, **settings), log=lambda m: 0)
    assert summary["exit_code"] == 128 + signal.SIGTERM and summary["steps"] == 3
    assert ckpt.latest_checkpoint(run).name == "step_00000003"
    rows = [r for r in _train_rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == [3]


def test_a_signal_during_the_last_step_stops_nothing(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """SIGTERM while the last step runs (so the stop is agreed at that step, before the final save): the run is
    done, exits 0 with no "stopped by" line or resume advice (kills T11: the stop logged at the last step; T12:
    the agreed stop kept after the last step, exit 143)."""
    from mlmtrain import train as train_module

    lr_at = train_module.lr_at

    def signal_in_the_last_step(step, cfg):
        if step == 2:  # step 3 of 3 starts
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, cfg)

    monkeypatch.setattr(train_module, "lr_at", signal_in_the_last_step)
    logged = []
    summary = train_module.train(config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 3}),
                                 log=logged.append)  # fmt: skip
    assert summary["exit_code"] == 0 and summary["stopped_by"] is None and summary["steps"] == 3
    assert not any("stopped by" in line or "--resume" in line for line in logged), logged
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000003"


def test_train_called_from_python_gives_back_the_signal_handlers_it_took(data_dir, tokenizer_dir, tmp_path):
    """`train()` from Python (a notebook, the demo, the bench; not through cli.main, which restores them itself):
    Ctrl-C, SIGTERM and SIGHUP have the caller's handlers again after the run, and no finished run is left
    listening for a closed output (kills T18: no stopper.restore())."""
    from mlmtrain import stop

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in sigs}
    summary = train(config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 1}), log=lambda m: 0)
    assert summary["exit_code"] == 0
    assert {s: signal.getsignal(s) for s in sigs} == before
    assert stop._output["listeners"] == []


def test_checkpoint_at_end_off_saves_nothing_at_the_end(data_dir, tokenizer_dir, tmp_path):
    """train.checkpoint_at_end = false (the benchmarks' setting: a base checkpoint is ~1.3 GB): a run that ends
    at max_steps with no cadence saves no checkpoint (kills T09: the last step always saved)."""
    run = tmp_path / "run"
    settings = {"train.max_steps": 2, "train.log_every": 1, "train.checkpoint_at_end": False}
    summary = train(config(data_dir, tokenizer_dir, run, **settings), log=lambda m: 0)
    assert summary["exit_code"] == 0 and summary["steps"] == 2
    assert ckpt.complete_checkpoints(run) == []


@pytest.mark.parametrize("tail", ['{"step": 3, "lo', "[3]\n", '{"step": 2, "loss": 1.0}'])
def test_metrics_are_cut_at_the_first_line_that_is_not_a_whole_row(tmp_path, tail):
    """Right after the checkpoint's last row: a line torn by a kill (not JSON), a line that is not an object, a
    row without its newline (its write was cut after the text): each is cut with everything after it, in one
    truncate, and counted."""
    from mlmtrain.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    whole = '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n'
    path.write_text(whole + tail + ('\n{"step": 4}\n' if tail.endswith("lo") else ""))
    assert truncate_metrics(path, 2) == (2 if tail.endswith("lo") else 1)
    assert path.read_text() == whole
    assert truncate_metrics(tmp_path / "absent.jsonl", 2) == 0


def test_a_resume_says_how_many_metrics_lines_of_redone_steps_it_cut(data_dir, tokenizer_dir, tmp_path):
    """A run killed after logging step 2 (and tearing a line of step 3) but before saving past step 1: the resume
    from step 1 cuts those two lines from metrics.jsonl, so each step is logged once, and says so, so the file
    never shrinks unsaid (kills T26: no line)."""
    run = tmp_path / "run"
    train(config(data_dir, tokenizer_dir, run, **{"train.max_steps": 1, "train.log_every": 1}), log=lambda m: 0)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 9.0}\n{"step": 3, "lo')  # logged after the step-1 checkpoint; torn by the kill
    logged = []
    summary = train(config(data_dir, tokenizer_dir, run, **{"train.max_steps": 2, "train.log_every": 1}),
                    resume=str(run), change_max_steps=True, log=logged.append)  # fmt: skip
    assert summary["exit_code"] == 0
    assert "metrics.jsonl: dropped 2 lines of steps after 1, which this run redoes" in logged, logged
    losses = [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]
    assert [step for step, _ in losses] == [1, 2] and losses[-1][1] != 9.0
