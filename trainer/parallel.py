"""Data-parallel training on PyTorch's own engine, launched by torchrun. Outside torchrun every function
here is a no-op for one process, so the training loop reads the same either way.

    torchrun --standalone --nproc-per-node N -m mlmtrain.cli train ...   (or: mlmtrain train --nproc N ..., launch.py)

- DDP (default): each rank holds the model, gradients are all-reduced (NCCL on GPUs, gloo on CPU).
- FSDP2 (`train.shard = "fsdp"`): `fully_shard` on every encoder layer, then the root (embeddings and
  the tied MLM head stay in the root group, so decoder.weight stays the word-embedding parameter), with a
  MixedPrecisionPolicy that follows `train.precision` (bf16 compute, fp32 gradient reduction).
- Checkpoints are world-size independent (trainer/checkpoint.py): any world size resumes any of them.
- Rank 0 alone logs and writes. A failing rank names itself on stderr and in torchrun's error file;
  torchrun then ends the other workers; a rank stuck in a collective gives up after MLMTRAIN_DIST_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import shlex
import signal
import sys

import torch
import torch.distributed as dist

from mlmtrain import stop
from mlmtrain.config import torch_dtype
from mlmtrain.errors import UserError

TIMEOUT_ENV = "MLMTRAIN_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 300)
STOPS = (stop.OUTPUT_FAILED, "SIGPIPE", "SIGHUP", "SIGINT", "SIGTERM")  # stop requests, the later winning
_host = {"group": None}  # the gloo group host-side decisions are all-reduced in (None: the default group)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Started by torchrun (it sets LOCAL_RANK), even with one process: `--nproc-per-node 1` runs the DDP /
    FSDP code paths on one GPU, which is how they are checked on a single-GPU machine."""
    return "LOCAL_RANK" in os.environ


def active() -> bool:
    """In a process group: collectives and wrappers are real (else every function here is a no-op)."""
    return dist.is_available() and dist.is_initialized()


def timeout() -> datetime.timedelta:
    """The process-group timeout: long enough for rank 0 to write a large checkpoint while the others wait
    at the barrier, short enough that a lost rank ends the job instead of hanging it."""
    text = os.environ.get(TIMEOUT_ENV, "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def rank_device(name: str) -> torch.device:
    """The device `train.device` names for this process: "auto" and "cuda" mean this rank's GPU."""
    if name == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    return torch.device("cuda", local_rank()) if device.type == "cuda" and device.index is None else device


def init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun: NCCL for a CUDA device, gloo for the CPU (the
    default device: CUDA if available). Returns (rank, world)."""
    if launched() and not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if not cuda:
            dist.init_process_group("gloo", timeout=timeout())
            return rank(), world_size()
        if local_rank() >= torch.cuda.device_count():
            raise UserError(
                f"{os.environ.get('LOCAL_WORLD_SIZE', world_size())} processes on this machine "
                f"need as many GPUs, but only {torch.cuda.device_count()} are visible; "
                f"lower --nproc / --nproc-per-node"
            )
        gpu = torch.device("cuda", device.index if device is not None and device.index is not None else local_rank())
        torch.cuda.set_device(gpu)
        # device_id: NCCL connects at once and knows this rank's GPU (barriers never guess a device)
        dist.init_process_group("nccl", timeout=timeout(), device_id=gpu)
        _host["group"] = dist.new_group(backend="gloo", timeout=timeout())  # host numbers: no device sync
    return rank(), world_size()


def is_fsdp(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync") and not hasattr(model, "no_sync")


def check_shard(shard: str, precision: str, world: int = 1) -> None:
    """`world`: the processes the run has, or (`--nproc`, before starting them) will have (`shard` is one of
    config.validate's)."""
    if shard == "fsdp" and precision == "fp16" and (launched() or world > 1):
        raise UserError(
            "fp16 loss scaling is not wired for FSDP (its gradients are sharded DTensors); "
            "use --precision bf16 (or fp32) with --set train.shard=fsdp"
        )


def wrap(model: torch.nn.Module, shard: str, device: torch.device, precision: str = "fp32") -> torch.nn.Module:
    """DDP or FSDP2 around the model under torchrun (unchanged for one process). Build the optimizer
    AFTER this: fully_shard replaces every parameter with a sharded DTensor parameter."""
    if not active():
        return model
    if shard == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # compute in the run's precision, reduce gradients in fp32; the sharded master weights stay fp32
        param_dtype = None if precision == "fp32" else torch_dtype(precision)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # root: embeddings + MLM head, tied weight managed once
        if model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight:
            raise RuntimeError("fully_shard untied decoder.weight from word_embeddings.weight")
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step: wrap its forward and its backward
    (DDP reads the flag in the forward, FSDP2 in its post-backward hook)."""
    if not active() or last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: keep unsharded gradients until the last one

        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on the device (no host sync)."""
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def sum_over_ranks(*values: float) -> list[float]:
    """Host numbers summed over ranks in one small all-reduce on the host (gloo): it waits for every rank to
    reach it (call it where every rank is anyway, e.g. at a log step), not for any device. Used for job-wide
    throughput and token counts."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, group=_host["group"])
    return t.tolist()


def agree_stop(requested: str | None, due: bool) -> tuple[str | None, bool]:
    """(stop request, timed save due) as every rank takes them, at the same step: a two-number all-reduce on
    the host (gloo), no device sync, at every step, so a signal stops the job after the step it arrives in
    (torchrun kills its workers 30 s after passing one on: a log window may be longer)."""
    if not active():
        return requested, due
    code = 0 if requested is None else (STOPS.index(requested) + 1 if requested in STOPS else len(STOPS))
    t = torch.tensor([code, int(due)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host["group"])
    code, due = t.tolist()
    return (STOPS[code - 1] if code else None), bool(due)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor, e.g. FSDP's gradient norm; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown(final: bool = False) -> None:
    """Free the model, then leave the process group. An FSDP2 model sits in a reference cycle (its hooks
    and state point back at it) that only the garbage collector frees; left to interpreter teardown, it
    keeps the gloo process group and its worker threads alive there, and a worker freeing its last tensor
    then aborts the process ("terminate called without an active exception", seen 2 runs in ~30 on CPU).
    `final`: the command has its exit code; no stop signal (SIGINT, SIGTERM, SIGHUP) changes it any more."""
    if final:
        for sig in stop.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if active():
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def name_failing_rank():
    """Under torchrun, an error says which rank raised it: a UserError gets a "rank r of N" prefix (the CLI
    prints it as one sentence); anything else is printed with the rank and recorded in torchrun's error
    file, so its failure summary shows this rank's traceback as the root cause."""
    try:
        yield
    except UserError as e:
        if world_size() > 1:
            raise UserError(f"rank {rank()} of {world_size()}: {e}") from e
        raise
    except Exception as e:
        if world_size() > 1 and peer_left(e):  # a consequence, not a cause: one line, the cause is the other's
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(
                f"mlmtrain train: rank {rank()} of {world_size()} stopped: another rank left ({first})", file=sys.stderr
            )
            raise SystemExit(1) from None
        if world_size() > 1:
            print(
                f"mlmtrain train: rank {rank()} of {world_size()} failed: {type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(e)  # no-op outside torchrun (no TORCHELASTIC_ERROR_FILE)
        raise


def peer_left(e: BaseException) -> bool:
    """A collective failed because another rank is gone (it failed or was stopped first)."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")) or (
        isinstance(e, getattr(dist, "DistNetworkError", ())) and "timed out" not in text
    )


# ---- launching -----------------------------------------------------------------------------------------

COMMAND_ENV = "MLMTRAIN_COMMAND"  # `mlmtrain train` sets it: the command line as typed, for every rank to record


def command_line() -> str:
    """The command that started this run, as the user typed it (under `--nproc`, not the elastic agent's)."""
    return os.environ.get(COMMAND_ENV) or shlex.join(sys.argv)
