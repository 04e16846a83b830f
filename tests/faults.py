"""Fault injection for the tests: patch the real code at a seam, then run the real CLI. Nothing here runs in a
normal training run; the package has no test hooks.

    python tests/faults.py [--nan-steps 2,3] [--crash-rank R --crash-step S] [--pause-in-checkpoint SECONDS] \\
        -- train --data ...
    torchrun --standalone --nproc-per-node 2 tests/faults.py --crash-rank 1 --crash-step 3 -- train ...

In-process tests call the same functions with pytest's `monkeypatch.setattr`.

Seams: `train.lr_at` is called once at the start of every optimizer step (so it knows the step), and
`train.forward_loss` once per micro-batch (eager runs: these tests do not compile); `checkpoint.file_entries`
runs while a checkpoint's files are written and its manifest is not.
"""

from __future__ import annotations

import argparse
import sys
import time


def inject_nan(setattr, steps: set[int]) -> None:
    """Optimizer steps `steps` (1-based) get a non-finite loss, as a numeric fault would give them."""
    from mlmtrain import train

    current = {"step": 0}
    lr_at, forward_loss = train.lr_at, train.forward_loss

    def lr_at_recording(step, cfg):
        current["step"] = step + 1
        return lr_at(step, cfg)

    def forward_loss_nan(*args, **kwargs):
        loss_sum, targets = forward_loss(*args, **kwargs)
        return (loss_sum * float("nan") if current["step"] in steps else loss_sum), targets

    setattr(train, "lr_at", lr_at_recording)
    setattr(train, "forward_loss", forward_loss_nan)


def crash_at(setattr, rank: int, step: int) -> None:
    """Rank `rank` raises at the start of optimizer step `step` (1-based), as a crashing process would."""
    from mlmtrain import parallel, train

    lr_at = train.lr_at

    def lr_at_crashing(s, cfg):
        if parallel.rank() == rank and s + 1 == step:
            raise RuntimeError(f"test crash (rank {rank}, step {step})")
        return lr_at(s, cfg)

    setattr(train, "lr_at", lr_at_crashing)


def pause_in_checkpoint(setattr, seconds: float) -> None:
    """Sleep after a checkpoint's files are written and before its manifest is, so a test can kill -9 there."""
    from mlmtrain import checkpoint

    file_entries = checkpoint.file_entries

    def file_entries_after_a_pause(*args, **kwargs):
        time.sleep(seconds)
        return file_entries(*args, **kwargs)

    setattr(checkpoint, "file_entries", file_entries_after_a_pause)


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="faults.py", description="run the mlmtrain CLI with faults injected")
    p.add_argument("--nan-steps", default="", help="comma-separated optimizer steps with a non-finite loss")
    p.add_argument("--crash-rank", type=int)
    p.add_argument("--crash-step", type=int)
    p.add_argument("--pause-in-checkpoint", type=float)
    args = p.parse_args(argv[:split])
    if args.nan_steps:
        inject_nan(setattr, {int(s) for s in args.nan_steps.split(",")})
    if args.crash_rank is not None:
        crash_at(setattr, args.crash_rank, args.crash_step)
    if args.pause_in_checkpoint:
        pause_in_checkpoint(setattr, args.pause_in_checkpoint)
    from mlmtrain.cli import main as cli_main

    return cli_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
