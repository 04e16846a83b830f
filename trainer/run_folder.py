"""The run folder (`mlmtrain train --out RUN`): one run, one folder, one process at a time.

- A new run needs a new or empty folder, or a run folder with no checkpoint and no summary.json (a start that
  failed). A run with checkpoints continues only with `--resume`; a folder another command made, or one mlmtrain
  did not make, is refused and left as it is.
- The training process holds an exclusive `flock` on RUN/.mlmtrain.lock while it runs, and writes into that
  file who it is (pid, host, start time): a second process is refused with one sentence naming the holder.
  The kernel drops the lock when its process ends, however it ends (kill -9 too), so a lock is never stale.
  Over NFS, Linux takes `flock` as a lock on the server (NFSv4, or NLM with v3); on a filesystem without
  locks (ENOLCK) training goes on with a warning, and nothing stops a second process.
- `--resume` continues from RUN's newest complete checkpoint; `--resume PATH` from this run's own newest one
  does the same, from an older one of this run is refused (the later checkpoints and metrics would mix two
  histories), and from another run's checkpoint starts a new run in RUN, which must then be new.
- `max_steps` shapes the learning-rate schedule, so a resume may change it only when asked to
  (`--change-max-steps`), and says how the schedule changes; a run already at max_steps is finished.
- Under the lock, what killed processes left half-written in RUN is cleaned up before anything else.

Only rank 0 writes here; every rank finds the same checkpoint to start from. No device work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mlmtrain.checkpoint import (
    CHECKPOINT_FILES,
    CHECKPOINTS,
    complete_checkpoints,
    latest_checkpoint,
    read_state,
    run_folder_of,
    train_command,
)
from mlmtrain.config import RunConfig
from mlmtrain.config_load import config_from_dict
from mlmtrain.errors import UserError
from mlmtrain.files import (
    LOCK,
    MARKER,
    TMP,
    WRITE_ERRNOS,
    Layout,
    folder_state,
    holder_of,
    lock_holder,
    owns_name,
    read_marker,
    refuse_unless_mine,
    remove_stale_tmp,
    write_failure,
    write_marker,
)

PROFILE_FILES = ("trace*.json", "categories*.json", "phases*.json", "memory_snapshot*.pickle")  # profiling.py
# what `train` writes in RUN (W&B's folder is all W&B's); a user's file among them makes the folder not ours
RUN_FILES = (
    "config.json", "metrics.jsonl", "summary.json", "curves.png", LOCK, TMP,
    *(f"{CHECKPOINTS}/step_*/{name}" for name in CHECKPOINT_FILES), f"{CHECKPOINTS}/{TMP}/**",
    *(f"profile/{name}" for name in (*PROFILE_FILES, TMP)), "tensorboard/events.out.tfevents.*", "wandb/**",
)  # fmt: skip
RUN_LAYOUT = Layout(
    "run", "a training run", "mlmtrain train", RUN_FILES, ("config.json", "metrics.jsonl"),
    legacy_json=("config.json", ("model", "data", "optim", "train")),  # a run's resolved RunConfig
)  # fmt: skip


class RunFinished(Exception):
    """The run asked to resume has reached max_steps: there is nothing to train (not an error). `summary` is
    its summary.json, left as it is."""

    def __init__(self, message: str, run_dir: Path, step: int):
        super().__init__(message)
        path = run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            summary = {}
        empty = {"final_loss": None, "valid_loss": None, "tokens_per_s": None}  # what the closing lines read
        self.summary = {**empty, **(summary if isinstance(summary, dict) else {}), "steps": step, "stopped_by": None}
        self.summary["exit_code"] = 0


class RunLock:
    """An exclusive flock on RUN/.mlmtrain.lock, held until `release()` or the end of the process."""

    def __init__(self, run_dir: Path, log):
        self.fd: int | None = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(self.fd)
            self.release()
            raise in_use(run_dir, holder) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                self.release()
                raise
            log(f"warning: the filesystem of {run_dir} cannot lock files ({e.strerror}); nothing stops a second "
                "process from training in it")  # fmt: skip
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{holder}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(
        f"{run_dir} is in use by another training process ({holder}): wait for it to end, or choose another --out."
    )


@dataclass
class RunFolder:
    dir: Path
    start: Path | None  # the checkpoint the run resumes from; None: from scratch
    step: int  # its step (0 from scratch)
    lock: RunLock | None = None  # rank 0's
    found: str = ""  # what rank 0 found there: "absent" or "empty" (it made the folder a run's), or "mine"

    def close(self, failed: bool = False) -> None:
        """Release the lock. A start that failed before writing anything (a refusal found on the device, say)
        takes back what it made: the marker and the lock file, and the folder if it was not there."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if failed and self.found in ("absent", "empty") and {p.name for p in self.dir.iterdir()} <= {MARKER, LOCK}:
                for name in (MARKER, LOCK):
                    (self.dir / name).unlink(missing_ok=True)
                if self.found == "absent":
                    self.dir.rmdir()


def open_run_folder(
    cfg: RunConfig, resume: str | None, *, main: bool, log, change_max_steps: bool, lr_at, check_start
) -> RunFolder:
    """Refuse every mix-up without writing anything, then (rank 0, `main`) take the folder: create it, lock
    it, clean up after killed processes, mark it. Every rank gets the checkpoint to start from and its step
    (`resume_step`, which may raise RunFinished). `check_start(ckpt)` refuses a checkpoint this run's data,
    model or data order does not continue."""
    run_dir = Path(cfg.out_dir)
    if not main:
        start = None if resume is None else latest_checkpoint(_source(run_dir, resume), log=_quiet)
        if start is not None:
            check_start(start)
        return RunFolder(run_dir, start, resume_step(start, cfg, change_max_steps, lr_at, _quiet) if start else 0)
    holder = lock_holder(run_dir)
    if holder is not None:  # said first: whatever else is wrong, the other process is the one to wait for
        raise in_use(run_dir, holder)
    found = folder_state(run_dir, RUN_LAYOUT)[0]
    done = remove_stale_tmp(run_dir / CHECKPOINTS, owns=_ours_in(CHECKPOINTS)) if found == "mine" else []
    start = plan_start(run_dir, resume, log=_quiet)  # refuse before creating anything
    if start is not None:
        check_start(start)
        resume_step(start, cfg, change_max_steps, lr_at, log)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not any(run_dir.iterdir()):
            write_marker(run_dir, RUN_LAYOUT)  # before the lock file, so the folder never looks foreign
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
    folder = RunFolder(run_dir, start, 0, RunLock(run_dir, log), found)
    try:
        done += remove_stale_tmp(run_dir / CHECKPOINTS, any_host=True, owns=_ours_in(CHECKPOINTS))
        done += remove_stale_tmp(run_dir, any_host=True, owns=_ours_in())
        for note in done:
            log(note)
        folder.start = plan_start(run_dir, resume, log)  # again: now no other process can change the folder
        if folder.start is not None and folder.start != start:
            check_start(folder.start)
        folder.step = resume_step(folder.start, cfg, change_max_steps, lr_at, _quiet) if folder.start else 0
        if read_marker(run_dir) is None:
            write_marker(run_dir, RUN_LAYOUT)
    except BaseException:
        folder.close(failed=True)
        raise
    return folder


def _ours_in(*parents: str):
    """Which hidden siblings in the run's folder `parents` may be cleaned up: those of names a run writes there."""
    return lambda name: owns_name(RUN_LAYOUT, list(parents), name)


def check_run_folder(run_dir: Path, resume: str | None, check_start) -> Path | None:
    """What `open_run_folder` would refuse, found without writing anything (`--nproc`: before the processes
    start); the checkpoint the run would start from."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise in_use(run_dir, holder)
    start = plan_start(run_dir, resume, log=_quiet)
    if start is not None:
        check_start(start)
    return start


def plan_start(run_dir: Path, resume: str | None, log) -> Path | None:
    """The checkpoint a run in `run_dir` starts from (None: from scratch), or one sentence saying why it
    may not run there. Reads only."""
    state, made_by = folder_state(run_dir, RUN_LAYOUT)
    refuse_unless_mine(run_dir, RUN_LAYOUT, state, made_by)
    saved = sorted((run_dir / CHECKPOINTS).glob("step_*")) if state == "mine" else []
    if state == "mine" and not saved and (run_dir / "summary.json").is_file() and resume != "auto":
        raise UserError(  # a run that ended (train.checkpoint_at_end = false) is a result, not a failed start
            f"{run_dir} holds a run that ended (its summary.json) and saved no checkpoint: a new run there would "
            "replace its metrics and summary; choose a new --out."
        )
    if resume is None:
        if saved:
            raise UserError(
                f"{run_dir} already holds a training run (checkpoints up to {saved[-1].name}): continue it with "
                f"`{train_command(run_dir)}`, or choose a new --out."
            )
        return None
    if resume == "auto" and state != "mine":
        raise UserError(f"--resume: {run_dir} holds no training run to resume; start one without --resume.")
    ckpt = latest_checkpoint(_source(run_dir, resume), log=log)
    run_of_ckpt = run_folder_of(ckpt)
    if run_of_ckpt is not None and run_of_ckpt.resolve() == run_dir.resolve():
        newest = latest_checkpoint(run_dir, log=_quiet)
        if newest.resolve() != ckpt.resolve():
            raise UserError(
                f"{ckpt.name} is older than this run's newest checkpoint {newest.name}: resuming from it in "
                f"{run_dir} would mix two histories in one folder; resume from it into a new --out."
            )
    elif saved:
        raise UserError(
            f"{run_dir} already holds another training run; --resume {resume} starts a new run from that "
            "checkpoint, in a new or empty --out."
        )
    return ckpt


def resume_step(start: Path, cfg: RunConfig, allow_change: bool, lr_at, log) -> int:
    """The step the run resumes at. A max_steps other than the checkpoint's needs `allow_change` and is said
    with its effect on the learning rate; a run already at max_steps raises RunFinished, and a new run from
    another run's checkpoint with nothing left to train is refused."""
    saved_config, state = read_state(start)
    step, saved = state["step"], config_from_dict(saved_config.get("run") or {})
    old, new = saved.train.max_steps, cfg.train.max_steps
    if old != new:
        if not allow_change:
            raise UserError(
                f"the run was set to {old} steps and this command asks for {new}, which changes the "
                f"learning-rate schedule from step {step} on: pass --change-max-steps to accept it, or --max-steps "
                f"{old}."
            )
        rising = "rising through its warmup, then " if lr_at(step + 1, cfg) > lr_at(step, cfg) else ""
        now = f"{lr_at(step, saved):.3g} -> {lr_at(step, cfg):.3g} now"
        if step < new:  # else nothing trains under it: said below
            log(f"max_steps {old} -> {new}: from step {step} the learning rate follows the new schedule ({now}, "
                f"{rising}decaying until step {new})")  # fmt: skip
    run = run_folder_of(start) or start
    if step >= new and run.resolve() != Path(cfg.out_dir).resolve():  # a new run in --out, from another's step
        raise UserError(
            f"{start} is at step {step} and this run would stop at max_steps {new}: nothing to train in "
            f"{cfg.out_dir}; pass --max-steps above {step} (and --change-max-steps, as it changes the schedule)."
        )
    if step >= new:
        reached = f"step {step} of {new}" if step == new else f"step {step}, past --max-steps {new}"
        raise RunFinished(
            f"{run} is finished ({reached}): nothing to train. Export it with `mlmtrain export "
            f"--checkpoint {run} --out EXPORT`, or train on with --max-steps N --change-max-steps.",
            run,
            step,
        )
    return step


@contextlib.contextmanager
def write_failures_said(run_dir: str | Path):
    """A write into the run folder that the system refuses (disk full, read-only, no permission), said in one
    sentence with what is intact. (A checkpoint that fails says so itself, and leaves no partial folder.)"""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        saved = complete_checkpoints(Path(run_dir))
        kept = f"its newest checkpoint {saved[-1].name} is intact" if saved else "it holds no checkpoint yet"
        raise UserError(f"could not write in {run_dir}: {write_failure(e)}; {kept}") from None


def _source(run_dir: Path, resume: str) -> Path:
    return run_dir if resume == "auto" else Path(resume)


def _quiet(_message: str) -> None:
    pass
