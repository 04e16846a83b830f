"""How a training run stops, and what its exit code tells a script.

    0    trained to max_steps (or, asked to resume, already there)
    2    refused before training, or failed to write, with one sentence (any command)
    3    stopped by non-finite losses (`train.nan_policy`, `train.max_bad_steps`), a checkpoint of the last
         good weights saved
    130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM (or, under torchrun, a signal to another rank): the step
         finished, a checkpoint was saved, `--resume` continues; a second signal exits at once, unsaved

A second signal exits without cleaning up; the next start removes what it left half-written.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_NON_FINITE = 3
EXIT_SIGNAL = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def exit_code(stopped_by_signal: str | None, stop_reason: str | None) -> int:
    """The exit code of a run that stopped for `stopped_by_signal` (a signal's name, or "a signal to another
    rank"), or for `stop_reason` (non-finite steps), or ran to the end (both None)."""
    if stopped_by_signal is not None:
        return EXIT_SIGNAL.get(stopped_by_signal, EXIT_SIGNAL["SIGTERM"])
    return EXIT_NON_FINITE if stop_reason else 0


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, save, exit. Second: exit at once."""

    def __init__(self):
        self.requested = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step and saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr)  # fmt: skip

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
