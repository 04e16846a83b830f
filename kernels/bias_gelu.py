"""BERT's intermediate activation, `y = gelu(x + bias)` with the exact (erf) GELU: fused Triton kernels (forward,
backward) and their pure-torch reference, for a matmul run without its bias.

Contract, for x [..., C] (viewed as [N, C], rows contiguous) and bias [C]:
  h = x + bias in fp32;  y = h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2));  dy/dh = Phi(h) + h * phi(h),
  phi(h) = exp(-h^2 / 2) / sqrt(2 pi).
x is fp32, bf16 or fp16 and y has x's dtype (bias is a parameter, fp32 under autocast: its dtype does not
promote the activation). bias is any float dtype, read as fp32. dx comes back in x's dtype, dbias in bias's,
summed in fp32 inside the backward (per-program partial sums [P, C], then a torch sum), so the bias gradient
costs no extra pass over dx. Saved for backward: references to x and bias (h is recomputed, in fp32).

Traffic (s-byte activations): forward reads x and writes y (2 N C s), the same as gelu after a matmul that
adds its own bias in the epilogue; the backward reads dy and x and writes dx (3 N C s) where unfused torch
also re-reads dx for dbias (4 N C s). The gain is in the backward only.

torch.compile: custom ops `mlmtrain::bias_gelu_fwd` / `mlmtrain::bias_gelu_bwd` with fake functions and an
autograd formula, as in residual_layer_norm.py (no graph break, the interpreter included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlmtrain.kernels import LOOP_STAGES, num_sms, on_device, split_rows, tl, triton, use_triton

# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_h(x_ptr, bias, rows, row_end, cols, C):
        """h = x + bias in fp32 on a (BLOCK_N, BLOCK_C) tile, with its offsets and in-bounds mask."""
        inside = (rows < row_end)[:, None] & (cols < C)[None, :]  # (BLOCK_N, BLOCK_C)
        offsets = rows[:, None].to(tl.int64) * C + cols[None, :]  # (BLOCK_N, BLOCK_C): N * C may pass 2^31
        h = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) + bias[None, :]
        return h, offsets, inside

    @triton.jit
    def _phi(h, ERF: tl.constexpr):
        """Phi(h) = (1 + erf(h / sqrt 2)) / 2 in fp32. ERF "libdevice": CUDA's erff (the default); "as7128":
        Abramowitz-Stegun 7.1.28, erfc(z) = 1 / p(z)^16 with one reciprocal, |error| <= 3e-7 on erf (about 1.5 fp32
        ulp of GELU at worst); sm_90 SASS of the kernels at 3072 bf16: forward 288 instructions against 360, backward
        568 against 648 (Triton 3.9; 280 / 576 against 360 / 656 on 3.6). A launch option bench_bias_gelu times."""
        if ERF == "as7128":
            z = tl.abs(h) * 0.7071067811865476
            p = 0.0002765672 + z * 0.0000430638  # the polynomial 1 + a1 z + ... + a6 z^6, Horner from a6
            p = 0.0092705272 + z * (0.0001520143 + z * p)
            p = 1.0 + z * (0.0705230784 + z * (0.0422820123 + z * p))
            p2 = p * p
            p4 = p2 * p2
            p8 = p4 * p4
            half_erfc = tl.math.fdiv(0.5, p8 * p8, ieee_rounding=False)  # 0 once p^16 overflows: the limit
            return tl.where(h >= 0, 1.0 - half_erfc, half_erfc)
        return 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))  # the constant is 1 / sqrt(2)

    @triton.jit
    def _bias_gelu_fwd_kernel(
        x_ptr,  # (N, C) x dtype
        bias_ptr,  # (C,)
        y_ptr,  # (N, C) x dtype, written
        N,
        C,
        rows_per_program,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        STAGES: tl.constexpr,  # 1: one tile per program, as launched by default; > 1: loads pipelined over the loop
        ERF: tl.constexpr,  # _phi's erf
    ):
        """Grid (P, column tiles): rows [pid * rows_per_program, ...) in (BLOCK_N, BLOCK_C) tiles."""
        pid = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        bias = tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)  # (BLOCK_C,)
        first = pid * rows_per_program
        end = tl.minimum(first + rows_per_program, N)
        for start in tl.range(first, end, BLOCK_N, num_stages=STAGES):
            rows = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            h, offsets, inside = _load_h(x_ptr, bias, rows, end, cols, C)
            y = h * _phi(h, ERF)
            tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _bias_gelu_bwd_kernel(
        dy_ptr,  # (N, C) x dtype
        x_ptr,  # (N, C)
        bias_ptr,  # (C,)
        dx_ptr,  # (N, C) x dtype, written
        dbias_partial_ptr,  # (P, C) fp32, written: this program's rows' sum of dx, for its columns
        N,
        C,
        rows_per_program,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ERF: tl.constexpr,
    ):
        """Grid (P, column tiles): rows [pid * rows_per_program, ...) in (BLOCK_N, BLOCK_C) tiles, dbias summed in
        registers and stored once per program (no atomics)."""
        pid = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        bias = tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)  # (BLOCK_C,)
        dbias = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)  # reduced over rows once, after the loop
        first = pid * rows_per_program
        end = tl.minimum(first + rows_per_program, N)
        for start in tl.range(first, end, BLOCK_N, num_stages=LOOP_STAGES):  # loads pipelined
            rows = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            h, offsets, inside = _load_h(x_ptr, bias, rows, end, cols, C)
            cdf = _phi(h, ERF)
            pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # phi(h) = exp(-h^2/2) / sqrt(2 pi)
            dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            dx = dy * (cdf + h * pdf)  # 0 outside the matrix, where dy was loaded as 0
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            dbias += dx
        tl.store(dbias_partial_ptr + pid * C + cols, tl.sum(dbias, axis=0), mask=cols < C)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def _tile(C: int, block_n: int | None = None, num_warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps): 2048-element tiles at most 512 columns wide, 8 elements per thread (the
    residual LayerNorm's choice; not tuned by timing: bench_bias_gelu --sweep times other tiles through `block_n`
    and `num_warps`)."""
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    block_c = min(triton.next_power_of_2(C), 512)
    block_n = block_n or max(1, 2048 // block_c)
    return block_n, block_c, num_warps or (8 if block_n * block_c >= 2048 else 4)


def bias_gelu_fwd_triton(
    x: torch.Tensor,
    bias: torch.Tensor,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_programs: int | None = None,
    stages: int = 1,
    erf: str = "libdevice",
) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        x: (N, C) contiguous, fp32 / bf16 / fp16. bias: (C,) any float dtype.
        block_n, num_warps: the tile (default `_tile`). num_programs: P, row groups per column tile (default: one
        tile each, the grid covering the matrix once); stages > 1 pipelines each program's loads over its tiles.
        erf: "libdevice" or "as7128" (`_phi`).
    Returns:
        y: (N, C) in x's dtype.
    """
    N, C = x.shape
    y = torch.empty_like(x)
    if N == 0:
        return y
    BLOCK_N, BLOCK_C, warps = _tile(C, block_n, num_warps)
    rows_per_program, P = split_rows(N, BLOCK_N, num_programs or triton.cdiv(N, BLOCK_N))
    _bias_gelu_fwd_kernel[(P, triton.cdiv(C, BLOCK_C))](
        x, bias, y, N, C, rows_per_program, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, STAGES=stages, ERF=erf, num_warps=warps
    )
    return y


def bias_gelu_bwd_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_programs: int | None = None,
    erf: str = "libdevice",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel, then sum the per-program dbias partials.

    Args:
        dy: (N, C) contiguous, x's dtype. x, bias: as given to the forward.
        block_n, num_warps: the tile (default `_tile`). erf: as in the forward.
        num_programs: P, row groups per column tile (default: ~4 programs per SM in all on CUDA, 4 otherwise).
    Returns:
        dx: (N, C) in x's dtype; dbias: (C,) fp32.
    """
    N, C = x.shape
    dx = torch.empty_like(x)
    if N == 0:
        return dx, bias.new_zeros(C, dtype=torch.float32)
    BLOCK_N, BLOCK_C, warps = _tile(C, block_n, num_warps)
    col_tiles = triton.cdiv(C, BLOCK_C)
    # ~4 programs per SM in all, one wave (56 registers and 16 KB of pipeline buffers at 3072 bf16, sm_90: 4 programs
    # of 8 warps fit an SM)
    programs = num_programs or (triton.cdiv(4 * num_sms(x.device), col_tiles) if x.is_cuda else 4)
    rows_per_program, P = split_rows(N, BLOCK_N, programs)
    dbias_partial = torch.empty((P, C), dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(P, col_tiles)](
        dy,
        x,
        bias,
        dx,
        dbias_partial,
        N,
        C,
        rows_per_program,
        BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C,
        ERF=erf,
        num_warps=warps,
    )
    return dx, dbias_partial.sum(0)


# ---------------------------------------------------------------------------------------------------
# Autograd wrapper: two custom ops (opaque to torch.compile, no graph break) and their autograd formula
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("mlmtrain::bias_gelu_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    with on_device(x):  # the kernels index rows as contiguous: a strided input (from a compiled graph) is copied
        return bias_gelu_fwd_triton(x.contiguous(), bias)


@_fwd_op.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("mlmtrain::bias_gelu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(x):
        return bias_gelu_bwd_triton(dy.contiguous(), x.contiguous(), bias)


@_bwd_op.register_fake
def _(dy, x, bias):
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _bwd_op(dy.contiguous(), x, bias)
    return dx, dbias.to(bias.dtype)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """gelu(x + bias), exact erf GELU, over the last dimension (see the module docstring).

    x: (..., C) fp32 / bf16 / fp16; bias: (C,). Returns y (..., C) in x's dtype, differentiable in x and bias.
    backend: "triton", "torch" (the reference), or "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch).
    """
    C = x.shape[-1]
    if bias.shape != (C,):
        raise ValueError(f"bias must be ({C},) for x of shape {tuple(x.shape)}, got {tuple(bias.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be fp32, bf16 or fp16, got {x.dtype}")
    if not use_triton(backend, x.device):
        return bias_gelu_reference(x, bias)
    return _fwd_op(x.contiguous().view(-1, C), bias).view(x.shape)  # (N, C) -> (..., C)


# ---------------------------------------------------------------------------------------------------
# Pure-torch reference (also the fallback where Triton cannot run)
# ---------------------------------------------------------------------------------------------------
def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The kernels' function in torch ops, differentiable by torch's autograd; exactly F.gelu(x + bias) in fp32."""
    return F.gelu(x.float() + bias.float()).to(x.dtype)
