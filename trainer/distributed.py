"""Data-parallel training on PyTorch's own engine, launched by torchrun. Outside torchrun every function
here is a no-op for one process, so the training loop reads the same either way.

    torchrun --standalone --nproc-per-node N -m mlmtrain.cli train ...   (or: mlmtrain train --nproc N ...)

- DDP (default): each rank holds the model, gradients are all-reduced (NCCL on GPUs, gloo on CPU).
- FSDP2 (`train.shard = "fsdp"`): `fully_shard` on every encoder layer, then the root (embeddings and
  the tied MLM head stay in the root group, so decoder.weight stays the word-embedding parameter), with a
  MixedPrecisionPolicy that follows `train.precision` (bf16 compute, fp32 gradient reduction).
- Checkpoints are world-size independent: rank 0 writes the same files a one-process run writes
  (full weights in model.safetensors, optimizer state keyed by parameter index) plus every rank's RNG
  state; FSDP gathers full state dicts first (`torch.distributed.checkpoint.state_dict`,
  full_state_dict=True). Any world size, DDP or FSDP, resumes any of them: every rank reads the full files
  and FSDP re-shards them; at the saved world size each rank also gets its own RNG back (exact resume).
- Rank 0 alone logs and writes. A failing rank names itself on stderr and in torchrun's error file;
  torchrun then ends the other workers; a rank stuck in a collective gives up after MLMTRAIN_DIST_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys

import torch
import torch.distributed as tdist

from mlmtrain import checkpoint as ckpt
from mlmtrain.errors import UserError
from mlmtrain.model import TIED_KEYS

TIMEOUT_ENV = "MLMTRAIN_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 300)
CRASH_RANK_ENV, CRASH_STEP_ENV = "MLMTRAIN_TEST_CRASH_RANK", "MLMTRAIN_TEST_CRASH_STEP"  # test hook


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
    return tdist.is_available() and tdist.is_initialized()


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


def init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by torchrun: NCCL for a CUDA device, gloo for the CPU (the
    default device: CUDA if available). Returns (rank, world)."""
    if launched() and not tdist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if not cuda:
            tdist.init_process_group("gloo", timeout=timeout())
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
        tdist.init_process_group("nccl", timeout=timeout(), device_id=gpu)
    return rank(), world_size()


def is_fsdp(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync") and not hasattr(model, "no_sync")


def check_shard(shard: str, precision: str) -> None:
    if shard not in ("ddp", "fsdp"):
        raise UserError(f"train.shard must be ddp or fsdp, got {shard!r}")
    if shard == "fsdp" and precision == "fp16" and launched():
        raise UserError(
            "fp16 loss scaling is not wired for FSDP (its gradients are sharded DTensors); "
            "use --precision bf16 (or fp32) with --shard fsdp"
        )


def wrap(model: torch.nn.Module, shard: str, device: torch.device, precision: str = "fp32") -> torch.nn.Module:
    """DDP or FSDP2 around the model under torchrun (unchanged for one process). Build the optimizer
    AFTER this: fully_shard replaces every parameter with a sharded DTensor parameter."""
    if not active():
        return model
    if shard == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # compute in the run's precision, reduce gradients in fp32; the sharded master weights stay fp32
        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
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
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
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
        tdist.all_reduce(t)
    return t


def sum_over_ranks(device: torch.device, *values: float) -> list[float]:
    """Host numbers summed over ranks in one small all-reduce (a sync: call it where every rank is anyway,
    e.g. at a log step). Used for job-wide throughput and for decisions every rank must take together."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()  # sync


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor, e.g. FSDP's gradient norm; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def barrier() -> None:
    if active():
        tdist.barrier()


def shutdown() -> None:
    """Free the model, then leave the process group. An FSDP2 model sits in a reference cycle (its hooks
    and state point back at it) that only the garbage collector frees; left to interpreter teardown, it
    keeps the gloo process group and its worker threads alive there, and a worker freeing its last tensor
    then aborts the process ("terminate called without an active exception", seen 2 runs in ~30 on CPU)."""
    if active():
        gc.collect()
        tdist.destroy_process_group()


def test_crash_hook(step: int) -> None:
    """MLMTRAIN_TEST_CRASH_RANK=r MLMTRAIN_TEST_CRASH_STEP=s: rank r raises at the start of step s."""
    if os.environ.get(CRASH_RANK_ENV) == str(rank()) and os.environ.get(CRASH_STEP_ENV) == str(step):
        raise RuntimeError(f"test crash ({CRASH_RANK_ENV}={rank()}, {CRASH_STEP_ENV}={step})")


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
        if world_size() > 1:
            print(
                f"mlmtrain train: rank {rank()} of {world_size()} failed: {type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(e)  # no-op outside torchrun (no TORCHELASTIC_ERROR_FILE)
        raise


# ---- checkpoints: one format for every world size ------------------------------------------------------


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified name of every optimizer parameter, in the optimizer's order: the order that gives
    the integer ids of `optimizer.state_dict()`. A tied parameter gets its first name (the embedding)."""
    names: dict[int, str] = {}
    for name, p in ckpt.unwrap(model).named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _fsdp_full_state(model, optimizer) -> tuple[dict, dict] | tuple[None, None]:
    """Full model and optimizer state of an FSDP model, gathered to rank 0 on the CPU (a collective: every
    rank calls it). On rank 0: (weights without tied aliases, optimizer.state_dict()-style dict keyed by
    parameter index); elsewhere (None, None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if rank() != 0:
        return None, None
    weights = {k: v.contiguous() for k, v in weights.items() if k not in TIED_KEYS}  # ties stored once
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups, first = [], 0
    for group in optim["param_groups"]:
        groups.append({**group, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    state = {index[name]: value for name, value in optim["state"].items()}
    return weights, {"state": state, "param_groups": groups}


def _rng_of_every_rank(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's CPU generator state (and its own GPU's), gathered to all (a collective), as
    "rank{r}.cpu" / "rank{r}.cuda": what dropout needs to continue exactly after a resume."""
    own = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for name, state in own.items():
        local = state.to(device)  # NCCL moves CUDA tensors only
        parts = [torch.empty_like(local) for _ in range(world_size())]
        tdist.all_gather(parts, local)
        out.update({f"rank{r}.{name}": part.cpu() for r, part in enumerate(parts)})
    return out


def save_checkpoint(run_dir, step, model, run_config, state, optimizer, scaler_state, keep) -> None:
    """Rank 0 writes a full, world-size-independent checkpoint; the other ranks wait for it."""
    state = {**state, "world_size": world_size()}
    if not active():
        ckpt.save_checkpoint(run_dir, step, model, run_config, state, optimizer, scaler_state, keep)
        return
    rng = _rng_of_every_rank(next(model.parameters()).device)
    weights, optim_state = _fsdp_full_state(model, optimizer) if is_fsdp(model) else (None, None)
    if rank() == 0:
        ckpt.save_checkpoint(
            run_dir,
            step,
            model,
            run_config,
            state,
            None if is_fsdp(model) else optimizer,
            scaler_state,
            keep,
            model_state=weights,
            optimizer_state=optim_state,
            extra_rng=rng,
        )
    barrier()


def restore_rng(checkpoint, state: dict, device: torch.device) -> None:
    """Every rank takes rank 0's saved generator states; at the world size the checkpoint was written with,
    each rank then takes its own, so dropout continues exactly as if the run had not stopped."""
    ckpt.restore_rng(checkpoint)
    if not active() or state.get("world_size") != world_size():
        return
    from safetensors.torch import load_file

    rng = load_file(checkpoint / "rng.safetensors")
    if f"rank{rank()}.cpu" in rng:
        torch.set_rng_state(rng[f"rank{rank()}.cpu"])
    if device.type == "cuda" and f"rank{rank()}.cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{rank()}.cuda"], device)


def load_optimizer_state(model, optimizer, checkpoint, state: dict) -> None:
    """Restore the optimizer from a checkpoint written at any world size. Plain/DDP: as saved. FSDP: every
    rank reads the full state and `set_optimizer_state_dict` keeps its own shard of each tensor."""
    if not (active() and is_fsdp(model)):
        ckpt.load_optimizer_state(optimizer, checkpoint, state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = ckpt.read_optimizer_state(checkpoint, state)  # keyed by parameter index
    names = _param_names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in full["param_groups"]):
        raise UserError(f"the optimizer state in {checkpoint} does not fit this model's parameters")
    by_name = {
        "state": {names[i]: value for i, value in full["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in full["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# ---- launching -----------------------------------------------------------------------------------------


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line for `mlmtrain <argv>` with `--nproc N` taken out. --standalone picks a free
    port for the rendezvous, so two jobs on one machine do not collide."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "mlmtrain.cli",
        *args,
    ]


def exec_torchrun(nproc: int) -> int:
    """`mlmtrain train --nproc N ...` replaces itself with `torchrun --nproc-per-node N -m mlmtrain.cli train ...`."""
    cmd = torchrun_command(sys.argv[1:], nproc)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached
