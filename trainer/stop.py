"""How a training run stops, and what its exit code tells a script.

    0    trained to max_steps (or, asked to resume, already there)
    2    refused before training, or failed to write, with one sentence (any command)
    3    stopped by non-finite losses (`train.nan_policy`, `train.max_bad_steps`), a checkpoint of the last
         good weights saved
    130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM, 129 by SIGHUP (the terminal went away) (under torchrun,
         to this rank or another): the step finished, a checkpoint was saved, `--resume` continues; a second
         signal exits at once, unsaved (under torchrun, the same signal again within REPEAT_S is the same request)
    141  stopped because its standard output or error was closed (`mlmtrain train ... | head`): the same stop
         as a signal's, after the step, saved; later lines go nowhere
    2    also when a write to its standard output or error failed (`> file` on a full disk): the same stop,
         saved, said in one sentence on the other stream

A second signal exits without cleaning up; the next start removes what it left half-written. A signal the run
was started with ignored (`nohup` ignores SIGHUP, a shell's background job SIGINT) stays ignored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time

EXIT_NON_FINITE = 3
OUTPUT_FAILED = "unwritable output"  # the stop request of a failed write to stdout or stderr (exit 2)
REPEAT_S = 2.0  # under torchrun, the same signal again within this is one delivery, not "exit at once"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each asks for a stop after the step, saved
EXIT_SIGNAL = {sig.name: 128 + sig for sig in (*SIGNALS, signal.SIGPIPE)}


def handled(signals=SIGNALS) -> list[signal.Signals]:
    """The signals of `signals` this process has not been told to ignore: `nohup` starts a command with SIGHUP
    ignored, a non-interactive shell its background jobs with SIGINT ignored; overriding that would let the
    hangup or the Ctrl-C they were shielded from stop them."""
    return [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]


def exit_code(stopped_by_signal: str | None, stop_reason: str | None) -> int:
    """The exit code of a run that stopped for `stopped_by_signal` (a signal's name), or for `stop_reason`
    (non-finite steps), or ran to the end (both None)."""
    if stopped_by_signal == OUTPUT_FAILED:
        return 2
    if stopped_by_signal is not None:
        return EXIT_SIGNAL.get(stopped_by_signal, EXIT_SIGNAL["SIGTERM"])
    return EXIT_NON_FINITE if stop_reason else 0


class StopSignal:
    """First SIGTERM/SIGINT/SIGHUP (those not ignored: `handled`), or output closed ("SIGPIPE") or unwritable
    (OUTPUT_FAILED) under `guard_output`: finish the step, save, exit. Second signal: exit at once."""

    def __init__(self):
        self.requested, self.at = _output["closed"] or None, 0.0  # this process's request
        self.stop = None  # the stop every rank agreed on (`join`): what the run stops for and exits with
        self.previous = {sig: signal.signal(sig, self._handle) for sig in handled()}
        _output["listeners"].append(self)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == self.requested and time.monotonic() - self.at < REPEAT_S and "LOCAL_RANK" in os.environ:
            return  # the same signal twice at once: the job's scheduler sent it to every process, torchrun passed it on
        if self.requested is not None:
            print(f"\nsecond {name}: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.requested, self.at = name, time.monotonic()
        if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for the job
            print(f"\n{self.requested} received: finishing this step and saving a checkpoint "
                  "(send it again to exit at once)", file=sys.stderr)  # fmt: skip

    def join(self, agreed: str | None) -> None:
        """Take the stop every rank agreed on (`parallel.agree_stop`): another rank's signal is this one's too
        (and its own copy of that signal, arriving just after, is the same request)."""
        self.stop = agreed
        if agreed is not None and self.requested is None:
            self.requested, self.at = agreed, time.monotonic()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        _output["listeners"].remove(self)


_output = {"closed": None, "listeners": []}  # guard_output's state: the stop an output asked for; live StopSignals


STREAM_NAMES = ("standard output", "standard error")


class NamedStream:
    """sys.stdout or sys.stderr while a command runs: a failed write (not a reader gone away, which has its own
    handling) names the stream, so that it is not taken for a write into the command's own files."""

    def __init__(self, stream, name: str):
        self._stream, self._name = stream, name

    def write(self, text):
        return self._named(self._stream.write, text)

    def flush(self):
        return self._named(self._stream.flush)

    def _named(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            if e.filename is None:
                e.filename = self._name
            raise

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self._stream, name)


class _Guarded:
    """sys.stdout or sys.stderr under `guard_output`: the first BrokenPipeError points the file descriptor at
    /dev/null (what the stream still buffers, and every later line, goes there) and asks for a stop. A terminal
    that hung up (EIO) goes to /dev/null the same way without asking: its SIGHUP asks, unless the run was started
    to outlive it (`nohup`, `setsid`), and then it trains on. Any other failed write (a full disk under `> log`)
    goes to /dev/null too and asks for a stop as OUTPUT_FAILED: the run saves, then exits 2."""

    def __init__(self, stream):
        self._stream = stream
        self._tty = _isatty(stream)  # asked now: a hung-up terminal may no longer say it is one

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            if not self._gone(e):
                raise
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            if not self._gone(e):
                raise

    def _gone(self, error: OSError) -> bool:
        """Handles `error` as the class says; False for one that is not about the stream (then raised)."""
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return False  # not a file descriptor's stream: nothing to point at /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
        if error.errno == errno.EIO and self._tty:
            return True
        stop = "SIGPIPE" if error.errno == errno.EPIPE else OUTPUT_FAILED
        first, _output["closed"] = _output["closed"] is None, _output["closed"] or stop
        for stopper in _output["listeners"]:
            stopper.requested = stopper.requested or stop
        if first:  # to the other stream, if it is still open (a closed one drops it the same way)
            other = sys.stderr if self is sys.stdout else sys.stdout
            name = STREAM_NAMES[self is not sys.stdout]
            why = ("was closed (the reader of its pipe went away)" if stop == "SIGPIPE"
                   else f"could not be written ({error.strerror or error})")  # fmt: skip
            print(f"\nmlmtrain train: {name} {why}: finishing this step and saving a checkpoint; exit "
                  f"{exit_code(stop, None)}", file=other)  # fmt: skip
        return True

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the stream's own
        return getattr(self._stream, name)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def _devnull_on(fd: int) -> None:
    """/dev/null on a closed standard descriptor, so that no file opened later takes its number (a write meant
    for the terminal, from C code too, would land in that file)."""
    try:
        os.fstat(fd)
        return  # in use: not ours to replace
    except OSError:
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


@contextlib.contextmanager
def guard_output():
    """While inside: a stdout or stderr closed while the run writes to it (the reader of a pipe went away) stops
    the run as SIGPIPE would stop a plain program, but after the step and with a checkpoint (exit 141), instead of
    killing it unsaved at its next line. One closed before the start is taken as not wanted: /dev/null."""
    saved = sys.stdout, sys.stderr
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:  # closed before the start (`>&-`): its lines are not wanted, they go nowhere
            _devnull_on(fd)
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - lives with the process
    sys.stdout, sys.stderr = _Guarded(sys.stdout), _Guarded(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        _output["closed"] = None


@contextlib.contextmanager
def signals_deferred(what: str | None):
    """While `what` (a command's finished output) is renamed into place: SIGINT, SIGTERM and SIGHUP wait, so a
    stop never lands between the renames or says the output is not there; after, each one that came is said
    ("... came while WHAT: it is complete") and delivered, to whatever handles it then (a command exits 130, a
    demo stops before its next stage). None: nothing deferred. Main thread only (where handlers are set)."""
    if what is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def defer(signum, frame):
        if signum not in arrived:
            arrived.append(signum)

    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    previous = {sig: handler for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)}

    def restore():  # ignored stays ignored; None (a handler not set from Python) is left alone
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    done = False
    try:
        for sig in previous:
            signal.signal(sig, defer)
        yield
        done = True
    finally:
        try:
            restore()
        except BaseException:  # a signal's exception from a handler already back: the others back too, then on
            restore()
            raise
        if arrived and done:
            names = " and ".join(signal.Signals(sig).name for sig in arrived)
            with contextlib.suppress(OSError):  # its reader gone (the same Ctrl-C ended a `| tee`): said nowhere
                print(f"{names} came while {what}: it is complete", file=sys.stderr)
        for sig in arrived:
            signal.raise_signal(sig)


_left_running: list[threading.Thread] = []  # work a stop could not end (`leave_running`)


def leave_running(thread: threading.Thread) -> None:
    """A stop could not end `thread`: native work that takes no signal (tokenizers' training, whose own threads
    may still be reading the corpus through Python). The command's cleanups run as for any stop; the program then
    exits at once (`cli.main`: `exit_now`): the interpreter's shutdown would wait for the thread, or abort the
    process when one of tokenizers' threads reached for the interpreter during it (exit 134, seen on this box)."""
    _left_running.append(thread)


def exit_now(code: int) -> int:
    """The stopped program's end: with work left running, its output flushed and the process gone with `code`;
    otherwise `code`, returned."""
    if _left_running:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed or gone: nothing more can be said
                stream.flush()
        os._exit(code)
    return code
