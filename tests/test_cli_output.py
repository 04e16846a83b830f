"""What the commands print, for people and for scripts: a progress bar only on a terminal, never with
TQDM_DISABLE, --no-progress or --quiet; plain lines (no `\\r`) in a pipe or a log file; the resolved config
printed readably; `train` ending with the checkpoint and the next command.

The terminal is a real pseudo-terminal with output newline translation off, so every `\\r` seen was written
by the program."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import statistics
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminals as Linux has them")


def run_cli(argv, *, terminal: bool, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """`python -m mlmtrain.cli ARGV` with stdout and stderr on a terminal (or a pipe); (exit code, output)."""
    inherited = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "mlmtrain.cli", *argv]
    if not terminal:
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        return done.returncode, (done.stdout + done.stderr).decode(errors="replace")
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # no "\n" -> "\r\n": a "\r" in the output is the program's
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the program closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def train_args(data_dir, tokenizer_dir, run, steps=3):
    return [
        "train", "--data", str(data_dir), "--tokenizer", str(tokenizer_dir), "--out", str(run), "--model", "tiny",
        "--tokens-per-batch", "1024", "--max-steps", str(steps), "--set", "train.log_every=1",
        "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "train.device=cpu",
    ]  # fmt: skip


def test_a_terminal_gets_bars_and_TQDM_DISABLE_or_no_progress_remove_them(
    sample_corpus, data_dir, tokenizer_dir, tmp_path
):
    commands = {
        "tokenizer": ["tokenizer", "--input", str(sample_corpus), "--vocab-size", "500", "--out"],
        "prepare": ["prepare", "--input", str(sample_corpus), "--tokenizer", str(tokenizer_dir), "--out"],
        "train": [*train_args(data_dir, tokenizer_dir, tmp_path / "unused"), "--out"],  # the last --out wins
    }
    for name, argv in commands.items():
        for how, env, flags in (("bar", {}, []), ("env", {"TQDM_DISABLE": "1"}, []), ("flag", {}, ["--no-progress"])):
            rc, out = run_cli([*argv, str(tmp_path / name / how), *flags], terminal=True, env=env)
            assert rc == 0, out
            if how == "bar":  # the control: on a terminal the bar is there
                assert "\r" in out, f"{name} drew no bar on a terminal: {out!r}"
            else:
                assert "\r" not in out, f"{name} with {how}: {out!r}"
    assert "step 3: loss" in out  # no bar: a plain line per log window instead


def test_a_pipe_gets_plain_lines_the_resolved_config_and_the_next_command(data_dir, tokenizer_dir, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out = run_cli(train_args(data_dir, tokenizer_dir, run), terminal=False)
    assert rc == 0 and "\r" not in out, out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")][:3] == [
        "step 1",
        "step 2",
        "step 3",
    ]
    assert "config (resolved):" in out and "precision=fp32 (auto)" in out and "compile=off (auto)" in out
    checkpoint = run / "checkpoints" / "step_00000003"
    assert f"checkpoint {checkpoint}; summary {run / 'summary.json'}" in out
    assert out.rstrip().endswith(f"next: mlmtrain export --checkpoint {checkpoint} --out {run}-export")
    # summary.json is for scripts: every key it has is in the README, and the README names no other
    summary = json.loads((run / "summary.json").read_text())
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("`RUN/summary.json` holds the numbers for scripts")
    documented = set(re.findall(r"`(\w+)`", readme[start : readme.index("\n\n", start)]))
    assert summary["schema"] == "mlmtrain.summary/3" and set(summary) <= documented, set(summary) - documented
    assert documented - set(summary) == {"null", "min", "median", "max", "resolved", "auto"}, documented
    assert set(summary["step_time_s"]) == {"min", "median", "max"} and "resolved" in summary["config"]
    assert summary["environment"]["device"].startswith("CPU (") and summary["environment"]["versions"]["torch"]
    assert set(summary["environment"]) == {"device", "device_type", "versions", "source", "date"}
    assert summary["attention_dropout"] == 0.1 and "on hidden states only" not in out  # CPU: SDPA applies it
    # one measurement: every rate is the median over the windows after the first (the compile's), here steps 2, 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r][1:]
    assert len(windows) == 2 and summary["step_time_s"]["min"] < summary["step_time_s"]["max"]
    for key, summary_key in (("tokens_per_s", "tokens_per_s"), ("tflops", "achieved_tflops")):
        assert summary[summary_key] == pytest.approx(statistics.median(r[key] for r in windows)), key
    from cli_run import in_process  # --quiet, in this process (its output captured, as a pipe takes it)

    quiet = in_process(capsys, *train_args(data_dir, tokenizer_dir, tmp_path / "quiet"), "--quiet")
    assert quiet.returncode == 0 and "done: 3 steps" in quiet.stdout
    assert "config (resolved)" not in quiet.stdout + quiet.stderr and "step 1:" not in quiet.stdout + quiet.stderr
    # export says what it wrote and what it verified, and nothing else: not what the libraries it loads log
    # (transformers imports an installed torchao, which logged four lines of its own here)
    pytest.importorskip("transformers")
    export = ["export", "--checkpoint", str(run), "--out", str(tmp_path / "export"), "--name", "me/tiny"]
    rc, out = run_cli(export, terminal=False)  # named: no note about the card's usage example
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == ["exported", "verified"], out


def test_the_next_command_is_one_shell_line_even_with_spaces_in_paths(tmp_path):
    import shlex

    from mlmtrain.metrics import closing_lines

    run = tmp_path / "my runs" / "ko bert"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003" / "manifest.json").write_text("{}")
    summary = {"final_loss": 1.0, "valid_loss": None, "tokens_per_s": 0, "steps": 3, "stopped_by": None}
    next_line = closing_lines(run, summary).splitlines()[-1]
    argv = shlex.split(next_line.removeprefix("next: "))
    assert argv == ["mlmtrain", "export", "--checkpoint", str(run / "checkpoints" / "step_00000003"), "--out",
                    f"{run}-export"]  # fmt: skip


class _Terminal:
    """A stderr that says it is a terminal (tqdm draws to it)."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass


@pytest.fixture
def progress_settings(monkeypatch):
    from mlmtrain import progress

    monkeypatch.setattr(progress, "_settings", {"no_progress": False, "quiet": False})
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    return progress


def test_quiet_draws_no_bar_even_on_a_terminal(progress_settings):
    """--quiet means no bars and no periodic lines, on a terminal too (kills P02: quiet not read by bars_enabled)."""
    progress = progress_settings
    assert progress.bars_enabled(_Terminal())
    progress.configure(quiet=True)
    assert not progress.bars_enabled(_Terminal())
    progress.configure(no_progress=True)
    assert not progress.bars_enabled(_Terminal())


def test_under_a_bar_every_tenth_window_is_also_a_line(progress_settings, monkeypatch):
    """On a terminal the bar shows each window's short form; the full line is printed only on every tenth window,
    so the scrollback keeps a record (kills P05: never under a bar; P06: the bar's postfix not set)."""
    progress = progress_settings
    monkeypatch.setattr(sys, "stderr", _Terminal())
    logged = []
    bar = progress.StepProgress(100, 0, True, logged.append)
    assert bar.bar is not None
    bar.window("step 1: the full line", "loss=1", every_tenth=False)
    assert logged == [] and "loss=1" in bar.bar.postfix
    bar.window("step 10: the full line", "loss=2", every_tenth=True)
    assert logged == ["step 10: the full line"]
    bar.close()


def test_flags_give_a_command_run_by_another_the_same_output_settings(progress_settings):
    """demo runs export and upload with `progress.flags()`: the flags that are on, and only those (kills P07)."""
    progress = progress_settings
    assert progress.flags() == []
    progress.configure(no_progress=True)
    assert progress.flags() == ["--no-progress"]
    progress.configure(quiet=True)
    assert progress.flags() == ["--quiet"]


def test_a_resumed_run_s_bar_starts_at_its_step_only_rank_0_draws_it_and_close_ends_it(progress_settings, monkeypatch):
    """A run resumed at step 40 of 100 shows 40/100, not 0/100; a rank other than 0 (enabled False) draws no bar and
    prints no lines even on a terminal; close() closes the bar, so the terminal line is finished before the summary
    (kills P08: initial 0; P09: close does nothing; P10: `enabled` ignored)."""
    progress = progress_settings
    monkeypatch.setattr(sys, "stderr", _Terminal())
    logged = []
    bar = progress.StepProgress(100, 40, True, logged.append)
    assert bar.bar.n == 40 and bar.bar.total == 100
    bar.update()
    assert bar.bar.n == 41
    bar.close()
    assert bar.bar.disable  # tqdm's mark of a closed bar
    other_rank = progress.StepProgress(100, 40, False, logged.append)
    other_rank.window("step 50: the full line", "loss=1", every_tenth=True)
    assert other_rank.bar is None and logged == []
