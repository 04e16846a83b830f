"""Data-parallel training on PyTorch's own engine, launched by torchrun. Outside torchrun every function
here is a no-op for one process, so the training loop reads the same either way.

- DDP (default): each rank holds the model, gradients are all-reduced (NCCL on GPUs, gloo on CPU).
- FSDP2 (`train.shard = "fsdp"`): `fully_shard` on every encoder layer and the root; checkpoints gather a
  full state dict to rank 0 and are written as ordinary safetensors, so any world size can resume them.
Rank 0 alone logs and writes; a failing rank prints its rank with the error, and torchrun ends the others.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as tdist

from mlmtrain import checkpoint as ckpt

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("MLMTRAIN_DIST_TIMEOUT", "120")))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> tuple[int, int]:
    """Join the process group when launched by torchrun (NCCL with CUDA, else gloo). Returns (rank, world)."""
    if world_size() > 1 and not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        tdist.init_process_group(backend, timeout=TIMEOUT)
    return rank(), world_size()


def wrap(model: torch.nn.Module, shard: str, device: torch.device) -> torch.nn.Module:
    if world_size() == 1:
        return model
    if shard == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                      reduce_dtype=torch.float32)
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if world_size() == 1 or last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

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
    if world_size() > 1:
        t = t.clone()
        tdist.all_reduce(t)
    return t


def barrier() -> None:
    if world_size() > 1 and tdist.is_initialized():
        tdist.barrier()


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def save_checkpoint(run_dir, step, model, run_config, state, optimizer, scaler_state, keep) -> None:
    """Rank 0 writes a full, world-size-independent checkpoint; the other ranks wait for it."""
    if world_size() > 1 and hasattr(model, "set_requires_gradient_sync") and not hasattr(model, "no_sync"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank() == 0:
            ckpt.save_full_state(run_dir, step, model, full, run_config, state, keep)
    elif rank() == 0:
        ckpt.save_checkpoint(run_dir, step, model, run_config, state, optimizer, scaler_state, keep)
    barrier()


def exec_torchrun(nproc: int) -> int:
    """`mlmtrain train --nproc N ...` re-runs itself as `torchrun --nproc-per-node N -m mlmtrain.cli train ...`."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "mlmtrain.cli", *argv]
    os.execv(sys.executable, cmd)
    return 0  # not reached
