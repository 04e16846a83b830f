"""`mlmtrain train`: how a run starts, and the exit code it ends with.

One process: `train.train` here. `--nproc N` first checks, once, everything that needs no device (the inputs for
N processes, the run folder and the checkpoint a resume takes, the settings and the model's shape as rank 0
resolves them: a refusal is one sentence, not N), then runs the N processes under torch's elastic agent (what
`torchrun --standalone` runs) inside this process, and exits with the code the ranks agree on: 0, 3 (stopped by
non-finite steps), 130 / 143 / 141 (a signal, saved), 2 (a rank refused its input) or 1 (a rank crashed: its
traceback is above). torchrun itself exits 1 for any of them but 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from mlmtrain import parallel, run_folder
from mlmtrain.config_load import flag_overrides, load_config
from mlmtrain.errors import UserError
from mlmtrain.metrics import closing_lines
from mlmtrain.stop import EXIT_NON_FINITE, EXIT_SIGNAL, guard_output
from mlmtrain.train import check_inputs, lr_at, plan_run, start_check, train

COMMAND_ENV = "MLMTRAIN_COMMAND"  # the command line as typed, for the ranks to record (the model card shows it)
AGREED = {EXIT_NON_FINITE, *EXIT_SIGNAL.values()}  # ends every rank takes together, at one step, after saving


def main(args) -> int:
    """Exit code: 0 trained to max_steps (or already there); 2 refused with one sentence; 3 stopped by
    non-finite steps; 130/143/141 stopped by SIGINT/SIGTERM/a closed output after saving a checkpoint."""
    cfg = load_config(args.config, flag_overrides(args), args.set)
    if args.nproc is not None and not parallel.launched():
        if args.nproc < 1:
            raise UserError(f"--nproc must be at least 1, got {args.nproc}")
        preflight(cfg, args)
        if args.nproc > 1 or cfg.train.shard == "fsdp":  # FSDP runs under the agent, one process included
            return run_ranks(args.argv, args.nproc)
    with parallel.name_failing_rank(), run_folder.write_failures_said(cfg.out_dir), guard_output():
        summary = train(cfg, resume=args.resume, change_max_steps=args.change_max_steps)
        if parallel.rank() == 0:
            print(closing_lines(Path(cfg.out_dir), summary))
    parallel.shutdown(final=True)
    return summary["exit_code"]


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


def run_ranks(argv: list[str], nproc: int) -> int:
    """`mlmtrain <argv>` in `nproc` processes under torch's elastic agent in this process, as torchrun runs
    them (the agent passes SIGINT/SIGTERM on to them and waits for their saves); the ranks' exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[COMMAND_ENV] = " ".join(["mlmtrain", *argv])
    # how long the agent waits for the ranks' checkpoint after passing a signal on (torch >= 2.13 reads it;
    # before, 30 s): as long as a collective may wait for rank 0's save
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(parallel.timeout().total_seconds())))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what happened
    try:
        run(parse_args(torchrun_argv(argv, nproc)))
    except ChildFailedError as e:
        return ranks_exit_code({rank: failure.exitcode for rank, failure in e.failures.items()}, nproc)
    except SignalException as e:  # this process got it: the agent passed it on, the ranks saved and stopped
        return 128 + int(e.sigval)
    return 0


def ranks_exit_code(codes: dict[int, int], nproc: int) -> int:
    """The command's exit code from the failed ranks' (`codes`; the others exited 0)."""
    if 2 in codes.values():  # a rank refused its input in one sentence; the others stopped because it left
        return 2
    if codes.get(0) in AGREED:
        return codes[0]
    if len(set(codes.values())) == 1 and set(codes.values()) <= AGREED:
        return next(iter(codes.values()))
    rank, code = min(codes.items())
    how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
    print(f"mlmtrain train: rank {rank} of {nproc} {how}; what it said is above", file=sys.stderr)
    return 1
