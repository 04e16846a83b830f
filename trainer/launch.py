"""`mlmtrain train`: how a run starts, and the exit code it ends with.

One process: `train.train` here. `--nproc N` first checks, once, everything that needs no device (the inputs for
N processes, the run folder and the checkpoint a resume takes, the settings and the model's shape as rank 0
resolves them: a refusal is one sentence, not N), then runs the N processes under torch's elastic agent (what
`torchrun --standalone` runs) inside this process, and exits with the code the ranks agree on: 0, 3 (stopped by
non-finite steps), 130 / 143 / 129 / 141 (a signal, saved), 2 (a rank refused its input) or 1 (a rank crashed: its
traceback is above). torchrun itself exits 1 for any of them but 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from mlmtrain import parallel, run_folder
from mlmtrain.checkpoint import run_folder_of
from mlmtrain.config_load import flag_overrides, load_config
from mlmtrain.errors import UserError
from mlmtrain.files import folder_state
from mlmtrain.metrics import closing_lines
from mlmtrain.plan import check_inputs, plan_run, start_check
from mlmtrain.stop import EXIT_NON_FINITE, EXIT_SIGNAL, guard_output, handled
from mlmtrain.train import lr_at, train

AGREED = {EXIT_NON_FINITE, *EXIT_SIGNAL.values()}  # ends every rank takes together, at one step, after saving


def main(args) -> int:
    """Exit code: 0 trained to max_steps (or already there); 2 refused with one sentence; 3 stopped by
    non-finite steps; 130/143/129/141 stopped by SIGINT/SIGTERM/SIGHUP/a closed output after saving a checkpoint."""
    cfg = load_config(args.config or resumed_run_config(args), flag_overrides(args), args.set)
    if args.nproc is not None and not parallel.launched():
        if args.nproc < 1:
            raise UserError(f"--nproc must be at least 1, got {args.nproc}")
        preflight(cfg, args)
        if args.nproc > 1 or cfg.train.shard == "fsdp":  # FSDP runs under the agent, one process included
            return run_ranks(args.argv, args.nproc, Path(cfg.out_dir) / "summary.json")
    with parallel.name_failing_rank(), run_folder.write_failures_said(cfg.out_dir), guard_output(), typed(args.argv):
        summary = train(cfg, resume=args.resume, change_max_steps=args.change_max_steps)
        if parallel.rank() == 0:
            print(closing_lines(Path(cfg.out_dir), summary))
    parallel.shutdown(final=True)
    return summary["exit_code"]


def resumed_run_config(args) -> Path | None:
    """The settings a `--resume` without `--config` continues under: the config.json of the run it resumes
    (`--out RUN --resume`, `--resume RUN`, `--resume RUN/checkpoints/step_N`), the flags given on top of it (a
    resume in the run's own folder refuses those that change its history: plan.check_resume_compatible). None for
    any other command line, which starts from the defaults as before."""
    if args.resume is None or args.config:
        return None
    source = getattr(args, "out_dir", None) if args.resume == "auto" else args.resume
    if not source:
        return None
    run = run_folder_of(Path(source)) or Path(source)
    config = run / "config.json"
    mine = folder_state(run, run_folder.RUN_LAYOUT)[0] == "mine"  # a run folder's (one with no checkpoint yet too)
    return config if mine and config.is_file() else None


@contextlib.contextmanager
def typed(argv: list[str]):
    """The command the run records (its card shows it) is `mlmtrain ARGV` as typed, not the host program's
    sys.argv (a script calling `cli.main`); one the launcher already set for its ranks is kept."""
    before = os.environ.get(parallel.COMMAND_ENV)
    os.environ[parallel.COMMAND_ENV] = before or shlex.join(["mlmtrain", *argv])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(parallel.COMMAND_ENV, None)


def preflight(cfg, args) -> None:
    """What every rank would refuse, refused here once, before the N processes start."""
    meta, vocab = check_inputs(cfg, world=args.nproc)
    check_checkpoint = start_check(cfg, meta, vocab)

    def check_start(ckpt: Path) -> None:
        check_checkpoint(ckpt)
        with contextlib.suppress(run_folder.RunFinished):  # a finished run: the ranks say so and exit 0
            run_folder.resume_step(ckpt, cfg, args.change_max_steps, lr_at, lambda _: None)

    start = run_folder.check_run_folder(Path(cfg.out_dir), args.resume, check_start)
    plan_run(cfg, meta, vocab, start, parallel.rank_device(cfg.train.device), args.nproc)  # as rank 0


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """torchrun's arguments for `mlmtrain <argv>` with `--nproc N` taken out. --standalone picks a free port
    for the rendezvous, so two jobs on one machine do not collide."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "mlmtrain.cli", *args]


def run_ranks(argv: list[str], nproc: int, summary: Path) -> int:
    """`mlmtrain <argv>` in `nproc` processes under torch's elastic agent in this process, as `torchrun
    --standalone` runs them (the agent passes SIGINT/SIGTERM on and waits for the ranks' save); the ranks' exit
    code. The environment, signal handlers and loggers the agent changes are put back after."""
    import signal
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(torchrun_argv(argv, nproc))
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())  # --standalone
    args.master_port = args.master_port or 29500
    if hasattr(args, "signals_to_handle"):  # torch >= 2.9: the signals the agent catches and passes on to the ranks
        # one the launcher was started with ignored (`nohup`'s SIGHUP) stays ignored, here and in the ranks
        wanted = [signal.Signals[name.strip()] for name in args.signals_to_handle.split(",") if name.strip()]
        args.signals_to_handle = ",".join(sig.name for sig in handled(wanted))
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
               if name.startswith("torch.distributed") and isinstance(logger, logging.Logger)}  # fmt: skip
    levels = {name: logger.level for name, logger in loggers.items()}
    os.environ[parallel.COMMAND_ENV] = shlex.join(["mlmtrain", *argv])
    # how long the agent waits for the ranks' checkpoint after passing a signal on (torch >= 2.13 reads it;
    # before, 30 s): as long as a collective may wait for rank 0's save
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(parallel.timeout().total_seconds())))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for several processes, without its banner
    for logger in loggers.values():
        logger.setLevel(logging.CRITICAL)  # the ranks say what happened, and the line below who failed
    started = time.time()
    try:
        config, entrypoint, entry_args = config_from_args(args)
        elastic_launch(config, entrypoint)(*entry_args)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in sorted(e.failures.items())}
        return ranks_exit_code(codes, nproc, culprit=first_failed(e.failures))
    except SignalException as e:  # this process got it: the agent passed it on, the ranks saved and stopped
        code = finished_code(summary, started)  # 0 when the run had finished: not `or`, 0 is an answer
        return 128 + int(e.sigval) if code is None else code
    except RendezvousError as e:
        raise UserError(f"could not start the {nproc} processes (torch's rendezvous failed: {e})") from None
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for name, level in levels.items():
            loggers[name].setLevel(level)
    return 0


def first_failed(failures: dict) -> int | None:
    """The rank that failed first, where torch knows it: one that recorded its error (torch's error file) or was
    killed by a signal; else the earliest failure, ties to the lowest rank."""
    known = [rank for rank, f in failures.items() if f.exitcode < 0 or f.error_file not in (None, "", "<N/A>")]
    if known:
        return min(known)
    return min(failures, key=lambda rank: (failures[rank].timestamp, rank)) if failures else None


def finished_code(summary: Path, since: float) -> int | None:
    """The exit code rank 0 wrote into this run's summary.json (written after `since`), or None: a signal that
    reached the launcher after the last step stops nothing, as for one process."""
    try:
        if summary.stat().st_mtime >= since:
            return int(json.loads(summary.read_text(encoding="utf-8"))["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def ranks_exit_code(codes: dict[int, int], nproc: int, culprit: int | None = None) -> int:
    """The command's exit code from the failed ranks' (`codes`; the others exited 0). `culprit`: the rank that
    failed first where known (it recorded its error, or a signal killed it), else the lowest failed rank."""
    if 2 in codes.values():  # a rank refused its input in one sentence; the others stopped because it left
        return 2
    if codes.get(0) in AGREED:
        return codes[0]
    if len(set(codes.values())) == 1 and set(codes.values()) <= AGREED:
        return next(iter(codes.values()))
    rank = culprit if culprit in codes else min(codes)
    code = codes[rank]
    how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
    print(f"mlmtrain train: rank {rank} of {nproc} {how}; what it said is above", file=sys.stderr)
    return 1
