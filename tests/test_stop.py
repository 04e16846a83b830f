"""How a stop request is taken, in-process (the CLI runs of test_runs.py send real signals to real runs): a signal
deferred across a step says the step is complete only when it completed, an output closed before the loop set up
its handler is a stop all the same, and outside torchrun a second signal exits at once."""

from __future__ import annotations

import pytest


def test_a_signal_deferred_during_a_failed_step_does_not_say_it_is_complete(capsys):
    """A signal deferred across a step that then fails (disk full) is delivered after it, and nothing says the
    step's output is complete."""
    import signal

    from mlmtrain.stop import signals_deferred

    got = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: got.append(signum))
    try:
        with pytest.raises(OSError, match="disk full"), signals_deferred("the export was renamed into place"):
            signal.raise_signal(signal.SIGHUP)
            assert got == []  # deferred
            raise OSError("disk full")
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert got == [signal.SIGHUP]  # delivered after, all the same
    assert "it is complete" not in capsys.readouterr().err


def test_an_output_closed_before_the_stop_handler_is_a_stop_request(monkeypatch):
    """An output whose reader went away before the loop set up its stop handler (`mlmtrain train | head`) is a stop
    request (SIGPIPE: the run saves and exits 141) all the same, as one that goes away during training is; it once
    trained on into /dev/null and exited 0."""
    import os
    import sys

    from mlmtrain.stop import StopSignal, guard_output

    reader, writer = os.pipe()
    stream = os.fdopen(writer, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stream)
    os.close(reader)  # the reader went away
    try:
        with guard_output():
            print("setting up")  # EPIPE: the stream goes to /dev/null
            stopper = StopSignal()
            try:
                assert stopper.requested == "SIGPIPE"
            finally:
                stopper.restore()
    finally:
        stream.close()


def test_a_second_signal_outside_torchrun_exits_at_once(monkeypatch):
    """Outside torchrun a second Ctrl-C exits at once (130); the repeat window that swallows torchrun's echo of
    the first applies under torchrun only."""
    import os
    import signal

    from mlmtrain.stop import StopSignal

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stopper = StopSignal()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stopper.requested == "SIGINT" and exits == []
        signal.raise_signal(signal.SIGINT)  # the user's second Ctrl-C, right after the first
        assert exits == [130]
    finally:
        stopper.restore()
