"""What a command prints while it works, decided once per command (`--no-progress`, `--quiet`, `TQDM_DISABLE`,
and whether the output is a terminal), so that a script or a log file gets plain lines and never a `\\r` update.

    bars        tqdm (and the tokenizers trainer's bar) only on a terminal, and only without --no-progress,
                --quiet or TQDM_DISABLE. tqdm reads TQDM_DISABLE only when `disable=` is not passed, so the
                decision is taken here and the bar is not created at all when it is off.
    lines       the train loop prints a plain progress line per log window where there is no bar (every tenth
                window under a bar, which shows the rest); --quiet drops them. A command's result (stdout) and its
                notes, warnings and errors (stderr) are printed under --quiet too.

No torch import: `mlmtrain --help` and the argument parser use it.
"""

from __future__ import annotations

import os
import sys

_settings = {"no_progress": False, "quiet": False}


def add_args(p) -> None:
    """The flags every subcommand takes (cli.py adds them)."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines instead)")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars and no periodic lines: warnings, errors and results only"
    )


def configure(no_progress: bool = False, quiet: bool = False) -> None:
    _settings.update(no_progress=no_progress, quiet=quiet)


def flags() -> list[str]:
    """The current settings as command-line flags, for a command that runs another (demo -> export)."""
    return [f"--{k.replace('_', '-')}" for k, v in _settings.items() if v]


def quiet() -> bool:
    return _settings["quiet"]


def bars_enabled(stream=None) -> bool:
    """Whether to draw a progress bar on `stream` (default stderr, where tqdm draws)."""
    if _settings["no_progress"] or _settings["quiet"] or os.environ.get("TQDM_DISABLE"):
        return False  # any non-empty TQDM_DISABLE, as tqdm itself reads it
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


class StepProgress:
    """The train loop's progress: a tqdm bar over the steps where bars are enabled, plain lines otherwise.
    `log` prints a line (the loop's logger); `enabled` is False on every rank but 0."""

    def __init__(self, total: int, initial: int, enabled: bool, log):
        self.log, self.lines = log, enabled and not quiet()
        self.bar = None
        if enabled and bars_enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def window(self, line: str, short: str, every_tenth: bool) -> None:
        """A closed log window: `short` goes to the bar, `line` is printed where there is no bar, and under a
        bar on every tenth window (`every_tenth`), so the scrollback keeps a record."""
        if self.bar is not None:
            self.bar.set_postfix_str(short)
        if self.lines and (self.bar is None or every_tenth):
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
