"""Device kernels (Triton), each with its pure-torch reference. Imported as `mlmtrain.kernels`."""

from __future__ import annotations

import contextlib
import functools

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, n):  # (n,) int32: a loop whose bound is a runtime scalar, as the kernels here have
        for i in range(0, n):
            tl.store(x_ptr + i, i)

    # TRITON_INTERPRET=1 set before triton was first imported makes every kernel run on the CPU interpreter
    INTERPRETED = type(_probe).__name__ == "InterpretedFunction"
except ImportError:  # no Triton wheel for this platform: every kernel's torch reference serves the calls
    triton, tl, INTERPRETED = None, None, False  # the kernel files import triton and tl from here


def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None. Triton 3.6's interpreter (torch 2.11's)
    turns a loop bound into `int(array)`, which numpy >= 2.4 refuses (triton-lang/triton#9171)."""
    if triton is None:
        return "triton is not installed"
    if not INTERPRETED:
        return "the Triton interpreter is off (set TRITON_INTERPRET=1 before triton is imported)"
    import numpy
    import torch

    try:
        _probe[(1,)](torch.zeros(2, dtype=torch.int32), 2)
    except Exception as e:  # the interpreter wraps what it hit in its own error type
        return f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} ({e}): " + (
            "pip install 'numpy<2.4', or a newer triton"
        )
    return None


# The persistent backward loops (residual LayerNorm, bias+GELU: a few programs per SM, each walking its rows a
# tile at a time) software-pipeline their loads: 3 stages keep the next two tiles' loads in flight (cp.async
# into shared memory on sm_80+) while one tile is computed. Without it a program issued a tile's loads and
# waited on them, 2-4 programs per SM (sm_90 SASS). Not yet timed on a GPU. (A constexpr: kernels read it.)
LOOP_STAGES = tl.constexpr(3) if triton is not None else 3

# why the CPU cannot run the kernels (None: it can, through the interpreter); decided once, at import, since
# triton_runs_on is also traced inside compiled code
INTERPRETER_PROBLEM = _interpreter_problem()


def triton_problem(device) -> str | None:
    """Why Triton kernels cannot run on `device`, or None: they run on a CUDA GPU, and on the CPU under a working
    interpreter (how the tests run the kernels without a GPU)."""
    if triton is None:
        return "triton is not installed"
    if device.type == "cpu":
        return INTERPRETER_PROBLEM
    return None if device.type == "cuda" else "Triton runs on CUDA GPUs (and the CPU's interpreter)"


def triton_runs_on(device) -> bool:
    return triton_problem(device) is None


def on_device(t):
    """Triton launches on the current CUDA device: make it the tensor's (a no-op context on the CPU)."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def use_triton(backend: str, device, error: type[Exception] = ValueError) -> bool:
    """Whether a kernel's wrapper runs its Triton kernels for a call: backend "triton" (refused where Triton cannot
    run), "torch" (the pure-torch reference), or "auto" (Triton where it runs, else the reference)."""
    if backend not in ("auto", "triton", "torch"):
        raise error(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}.")
    runs = triton_runs_on(device)
    if backend == "triton" and not runs:
        raise error(
            f"the Triton kernels cannot run on {device} here (needs CUDA, or TRITON_INTERPRET=1 set before triton "
            "is imported for the CPU); use backend='torch'."
        )
    return runs and backend != "torch"


@functools.cache
def num_sms(device) -> int:
    """The CUDA device's streaming multiprocessors (launch grids size themselves by it)."""
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def split_rows(N: int, block_n: int, programs: int) -> tuple[int, int]:
    """(rows per program, P) for a persistent loop over N rows in tiles of block_n: whole tiles per program (no tile
    straddles two, so each program's partial sums own their rows), `programs` of them at most."""
    tiles = -(-N // block_n)
    rows = -(-tiles // max(1, min(programs, tiles))) * block_n
    return rows, -(-N // rows)
