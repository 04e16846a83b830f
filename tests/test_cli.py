"""The command line answers scripts at once: help, version and argument errors without importing torch; train's
flags set the config keys they name, and every key is listed with its default and meaning."""

from __future__ import annotations

import errno
import functools
import os
import re
import subprocess
import sys
import time
import tomllib

import pytest

from mlmtrain.cli import TRAIN_FLAGS, build_parser, main
from mlmtrain.config import field_docs
from mlmtrain.config_load import flag_overrides, load_config

NO_TORCH = "import sys; sys.argv = ['mlmtrain', *sys.argv[1:]]; from mlmtrain.cli import main\n" + (
    "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
    "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\nsys.exit(code)"
)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["train", "--help"], 0),
        (["train", "--help-config"], 0),
        (["export", "--help"], 0),
        (["train", "--lr", "fast"], 2),  # an argument error
        (["train", "--model", "huge"], 2),
        (["nonsense"], 2),
        (["upload", "--folder", "no-such-export", "--repo-id", "tiny-bert"], 2),  # a flag upload itself refuses
    ],
)
def test_help_version_and_argument_errors_do_not_import_torch(argv, code):
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert done.returncode == code, done.stdout + done.stderr
    assert done.stderr.strip().endswith("NO_TORCH"), done.stderr
    assert "Traceback" not in done.stderr
    assert seconds < 10, seconds  # well under a second on an idle machine; the bound allows a busy CI box


def test_a_flag_a_command_does_not_know_is_refused_by_that_command(capsys):
    """`mlmtrain COMMAND: error: ...` as every other usage error of COMMAND (it said `mlmtrain: error:`)."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--bogus", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "mlmtrain train: error: unrecognized arguments: --bogus 1 (see `mlmtrain train --help`)\n"
    )


@pytest.mark.parametrize("unbuffered", [False, True])
def test_help_to_a_reader_that_went_away_exits_1_without_a_traceback(unbuffered):
    """`mlmtrain train --help-config | head -1`: a closed output is no bug to report (README, exit codes). Buffered,
    the flush at the end fails (cli._flush_or_exit); unbuffered (`python -u`, PYTHONUNBUFFERED=1, as scripts and CI
    set it) argparse's own write fails first, which argparse ignores (exit 0, before 2026-12-01):
    Parser._print_message lets it reach main."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    for argv in (["train", "--help-config"], ["--help"], ["tokenizer", "--help"], ["--version"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first line
        try:
            done = subprocess.run([sys.executable, "-m", "mlmtrain.cli", *argv], stdout=write_end, env=env,
                                  stderr=subprocess.PIPE, timeout=60)  # fmt: skip
        finally:
            os.close(write_end)
        assert done.returncode == 1 and done.stderr == b"", (argv, done.returncode, done.stderr)


def test_help_and_usage_errors_with_stdout_closed_keep_their_exit_codes():
    """A daemon or cron job may start a command with its stdout closed (`>&-`): Python's sys.stdout is then None."""
    for argv, code in ((["--help"], 0), (["--version"], 0), (["train", "--bogus"], 2)):
        done = subprocess.run([sys.executable, "-m", "mlmtrain.cli", *argv], preexec_fn=lambda: os.close(1),
                              stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
        assert done.returncode == code and "Traceback" not in done.stderr, (argv, done.returncode, done.stderr)


def test_the_data_commands_run_without_torch(tmp_path, sample_corpus, tokenizer_dir):
    """tokenizer and prepare need no torch: its import costs a data box seconds and (a CUDA build) ~400 MB."""
    text = tmp_path / "few.txt"
    text.write_text("".join(sample_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), "utf-8")
    for argv in (
        ["tokenizer", "--input", str(text), "--out", str(tmp_path / "tok"), "--vocab-size", "300"],
        ["prepare", "--input", str(text), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "data")],
    ):
        done = subprocess.run([sys.executable, "-c", NO_TORCH, *argv, "--quiet"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stderr.strip().endswith("NO_TORCH"), done.stdout + done.stderr


def test_every_train_flag_sets_the_key_it_names():
    parser = build_parser()
    args = parser.parse_args(
        ["train", "--data", "d", "--tokenizer", "t", "--out", "o", "--lr", "3e-4", "--warmup-steps", "7",
         "--grad-accum", "2", "--eval-every", "5", "--checkpoint-every", "9", "--no-compile", "--whole-word-mask"]
    )  # fmt: skip
    overrides = flag_overrides(args)
    assert overrides["optim.lr"] == 3e-4 and overrides["optim.warmup_steps"] == 7
    assert overrides["optim.grad_accum"] == 2 and overrides["train.eval_every"] == 5
    assert overrides["train.checkpoint_every"] == 9 and overrides["train.compile"] == "off"
    assert overrides["mask.whole_word"] is True and "train.max_steps" not in overrides  # not given: not set
    cfg = load_config(None, overrides, ["optim.weight_decay=0.1"])
    assert (cfg.optim.lr, cfg.train.checkpoint_every, cfg.optim.weight_decay) == (3e-4, 9, 0.1)
    docs = field_docs()
    assert all(key in docs for key, _ in TRAIN_FLAGS.values())


def test_help_config_lists_every_key_with_its_default_and_meaning():
    done = subprocess.run(
        [sys.executable, "-m", "mlmtrain.cli", "train", "--help-config"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    docs = field_docs()
    assert len(docs) > 50 and all(meaning for _, meaning in docs.values())
    whole = tomllib.loads(done.stdout)  # the whole text is a TOML file of the defaults
    for key, (default, _) in docs.items():  # as a TOML file writes it: each line pastes into one
        line = next(x.strip() for x in done.stdout.splitlines() if x.strip().startswith(f"{key} = "))
        expected = list(default) if isinstance(default, tuple) else default
        assert tomllib.loads(line.split(".", 1)[-1])[key.split(".")[-1]] == expected, line
        assert functools.reduce(lambda table, part: table[part], key.split("."), whole) == expected, key


TOKEN = "hf_FAKEabcdefghijklmnopqrstuvwxyz1234"


@pytest.mark.parametrize(
    "error, code",
    [
        (OSError(errno.EACCES, "Permission denied", f"/runs/{TOKEN}/curves.png"), 2),  # a refused write
        (FileNotFoundError(errno.ENOENT, "No such file or directory", f"/proc/{TOKEN}.png"), 1),
        (RuntimeError(f"a bug near {TOKEN}"), 1),
    ],
)
def test_no_message_shows_a_token(error, code, monkeypatch, capsys):
    """README: every error message of every command shows a token as hf_***; a refused write's sentence and
    the traceback of a bug too, not only a UserError's sentence."""
    import mlmtrain.plot

    def fail(args):
        raise error

    monkeypatch.setattr(mlmtrain.plot, "main", fail)
    assert main(["plot", "run"]) == code
    err = capsys.readouterr().err
    assert TOKEN not in err and "hf_***" in err, err
    assert ("Traceback" in err) == (code == 1), err


def test_a_signal_after_the_command_ended_does_not_change_its_exit_code(tmp_path):
    """The exit code is decided when the command returns; a SIGTERM during the interpreter's shutdown (about a
    second with torch loaded) turned a finished `export --overwrite` into 143."""
    code = (
        "import os, signal, sys, time\n"
        "from mlmtrain import cli\n"
        "sys.argv = ['mlmtrain', 'export', '--checkpoint', 'nowhere', '--out', 'x']\n"
        "rc = cli.main()\n"
        "for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n"
        "    os.kill(os.getpid(), sig)\n"
        "    time.sleep(0.2)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # the refusal's code ("nowhere does not exist"), not 143/129/130
    assert "does not exist" in done.stderr


def test_only_token_shaped_words_are_tokens():
    """A real token is "hf_" + 34 letters and digits; hf_transfer, a path's hf_experiments or a repo named
    bert-hf_finetuned are not, and are neither refused nor garbled."""
    from mlmtrain.errors import UserError, redact_tokens, refuse_tokens

    token = "hf_fakeWriteTokenA1b2C3d4E5f6G7h8I9j0"
    fine = {"repo_id": "acme/bert-small-hf_finetuned", "commit_message": "from run hf_baseline1",
            "card_extra": "Fetch faster with hf_transfer.", "name": "/data/hf_experiments/export"}  # fmt: skip
    refuse_tokens(**fine)
    assert all(redact_tokens(text) == text for text in fine.values())
    for text in (token, f"release {token}", f"alice/{token}", f"path/{token}.png"):
        assert redact_tokens(text) == text.replace(token, "hf_***")
        with pytest.raises(UserError, match="looks like a Hugging Face token"):
            refuse_tokens(commit_message=text)


def test_flags_override_the_config_file_and_set_overrides_both(tmp_path):
    """Precedence: the TOML file, then the flags, then --set."""
    from mlmtrain.config_load import load_config

    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nlr = 1e-3\nweight_decay = 0.05\n")
    cfg = load_config(toml, {"optim.lr": 5e-4, "optim.weight_decay": None})
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (5e-4, 0.05)  # a flag not given (None) leaves the file's
    assert load_config(toml, {"optim.lr": 5e-4}, ["optim.lr=2e-4"]).optim.lr == 2e-4


def test_true_is_not_an_integer_setting(tmp_path):
    """`--set train.max_steps=true` (and `max_steps = true` in TOML) is refused: Python counts True as 1."""
    from mlmtrain.config_load import load_config
    from mlmtrain.errors import UserError

    with pytest.raises(UserError, match="train.max_steps must be an integer"):
        load_config(None, None, ["train.max_steps=true"])
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nmax_steps = true\n")
    with pytest.raises(UserError, match="train.max_steps must be an integer"):
        load_config(toml)


def test_help_config_heads_each_section_once_and_no_top_level_key(capsys):
    """`--help-config`: one `[section]` heading per config section; out_dir, a top-level key, is no section
    (kills C16)."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help-config"])
    assert exit_.value.code == 0
    headings = [line for line in capsys.readouterr().out.splitlines() if re.fullmatch(r"# \w+", line)]
    sections = list(dict.fromkeys(k.split(".")[0] for k in field_docs() if "." in k))
    assert headings == [f"# {s}" for s in sections]


def test_a_usage_error_never_echoes_a_token(capsys):
    """A token pasted where a flag's value goes (`--model hf_...`) or as a stray argument: argparse's error
    message quotes it; the Parser hides it as hf_*** (kills C02: Parser.error without redact_tokens)."""
    token = "hf_FAKEabcdefghijklmnopqrstuvwxyz1234"
    for argv in (["train", "--model", token], ["plot", "run", token]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and token not in err and "hf_***" in err, err


def test_no_command_prints_the_help_and_exits_2(capsys):
    """`mlmtrain` alone is a usage error a script must see (exit 2), with the commands listed (kills C04: exit 0)."""
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(command in out for command in ("tokenizer", "prepare", "train", "export", "upload", "demo"))


@pytest.mark.parametrize("raised, code, said", [(KeyboardInterrupt(), 130, "interrupted"), (None, 143, "SIGTERM")])
def test_a_command_stopped_by_a_signal_exits_128_plus_it(monkeypatch, capsys, raised, code, said):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (cli.Terminated) inside any command but train: 130 or 143 and one line,
    so `... && next` stops (kills C06: Ctrl-C exiting 1)."""
    import signal

    from mlmtrain import cli, plot

    def stopped(args):
        raise raised if raised is not None else cli.Terminated(signal.SIGTERM)

    monkeypatch.setattr(plot, "main", stopped)
    assert main(["plot", "run"]) == code
    assert f"mlmtrain plot: {'stopped by ' if code == 143 else ''}{said}" in capsys.readouterr().err


def test_train_flags_show_their_short_metavar():
    """`--max-steps MAX_STEPS`, not the config key (`TRAIN.MAX_STEPS`) argparse would make from dest (kills C20)."""
    text = build_parser().commands["train"].format_help()
    assert "--max-steps MAX_STEPS" in text and "--lr LR" in text and "TRAIN." not in text


def test_a_name_in_another_encoding_is_refused_before_any_work(tmp_path, capsys):
    """A cp949 file name (unzipped from a Windows-made archive) reached the end of the work, then crashed writing
    meta.json or a tokenizer's settings (lone surrogates are no UTF-8); now one sentence, nothing written."""
    name = os.fsencode(tmp_path) + b"/\xc7\xd1\xb1\xb9\xbe\xee.txt"  # 한국어 in cp949
    with open(name, "wb") as f:
        f.write(b"the cat sat on the mat\n" * 20)
    out = tmp_path / "tok"
    assert main(["tokenizer", "--input", os.fsdecode(name), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    shown = name.decode("utf-8", "backslashreplace")  # what can be shown: the bytes that are not UTF-8 as \xNN
    assert f"error: '{shown}' is not valid UTF-8 (a name in another encoding" in err
    assert "convmv -f cp949 -t utf-8" in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("byte", [b"\x80", b"\xff"], ids=["euro_cp1252", "y_diaeresis_latin1"])
def test_every_byte_that_is_no_utf8_in_a_name_is_refused(tmp_path, capsys, byte):
    """os.fsdecode turns each byte that is not UTF-8 into U+DC80 ... U+DCFF: both ends are refused (a Windows-1252
    '€' is 0x80, a Latin-1 'ÿ' 0xFF), in any argument, not only an --input."""
    out = os.fsdecode(os.fsencode(tmp_path) + b"/tok" + byte)
    assert main(["tokenizer", "--input", str(tmp_path / "none.txt"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"\\x{byte[0]:x}' is not valid UTF-8 (a name in another encoding" in err and not os.path.exists(out)
