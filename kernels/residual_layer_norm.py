"""BERT's post-LN sublayer output, `y = LayerNorm(dropout(x + x_bias, p) + residual)`, one pass each way: fused
Triton kernels (forward, backward) and their pure-torch reference.

Contract, for x, residual [..., C] (viewed as [N, C], rows contiguous), weight, bias [C] and x_bias [C] or none:
  h = dropout(x + x_bias) + residual in fp32 (never rounded to the input dtype);
  y = (h - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps), biased variance over C, in fp32.
x and residual are fp32, bf16 or fp16 (they may differ); y has their promoted dtype, so bf16 in gives bf16 out
(a bf16 residual stream). weight, bias, x_bias: any float dtype, read as fp32. Each gradient comes back in its
input's dtype; dweight, dbias and dx_bias accumulate in fp32 (per-program partial sums [k, P, C], one torch sum).
x_bias is the sublayer matmul's bias, run here instead of in its epilogue so that its gradient needs no pass
over dx of its own. Saved for backward: references to x, x_bias, residual, weight and seed, mean and rstd [N]
fp32; the backward recomputes h (the same bytes in all as saving it, the same memory held, and h stays fp32).

Dropout, counter based: element (row, col) takes 16 bits of Philox4x32-10 (`tl.philox`, curand's generator) with
key = seed and counter = (col // 8, row, 0, 0): column 8g + 2k + b gets half b (0 low, 1 high) of word k of
call g. It is dropped iff those bits < round(p * 2^16) (p is quantised to 1/65536: p = 0.1 drops with
probability 0.1000061) and kept values are scaled by 1 / (1 - p_eff), so E[dropout(x)] = x exactly. No mask
is stored: the backward draws the same bits again (~15 SASS instructions per element on sm_90), so any launch
geometry and the reference draw the same mask. The seed is one int64 on x's device, read by the kernel: no
host-device sync or recompilation per value, and a CUDA graph replay reads the seed its tensor holds then.
`seed=None` draws it with `torch.randint` on x's device (torch's generator for that device): torch.manual_seed,
checkpointed generator states and torch.utils.checkpoint's replay all cover it, as they cover torch's dropout.
Do not change a seed tensor in place between a forward and its backward (autograd's version check raises).

torch.compile: the kernels are `torch.library.custom_op`s (`mlmtrain::residual_layer_norm_fwd`, `..._bwd`)
with fake (shape) functions and a registered autograd formula, so compiled graphs call them without a graph
break, on the CPU interpreter too (a `torch.library.triton_op` would reuse its body as the fake function, which
the interpreter's kernels cannot run under). The forward also returns y's gradient port, through which the next
LayerNorm's backward hands its residual gradient to this one: `residual_layer_norm_routed` says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mlmtrain.kernels import LOOP_STAGES, num_sms, on_device, split_rows, tl, triton, use_triton
from mlmtrain.kernels.philox import philox4x32_torch

RANDOM_BITS = 16  # bits of a Philox word per element: 8 elements per 4-word call
COLS_PER_CALL = 4 * 32 // RANDOM_BITS

# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _keep_mask(seed, rows, drop_threshold, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """(BLOCK_N, BLOCK_C) bool, True where the element survives dropout (module docstring: the bit layout)."""
        groups = tl.arange(0, BLOCK_C // 8)  # (G,) counter word 0: which 8 columns
        zero = tl.zeros((BLOCK_N, BLOCK_C // 8), tl.uint32)
        c0 = zero + groups[None, :].to(tl.uint32)  # (BLOCK_N, G)
        c1 = zero + rows[:, None].to(tl.uint32)  # (BLOCK_N, G) counter word 1: the row
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)  # (BLOCK_N, G) uint32 each
        # Column 8g + 2k + half <- half `half` of word k of group g. Built with interleaves (join + reshape of a
        # last dimension held in registers) rather than a 3-D select, which costs shared-memory layout changes.
        lo0, lo1, lo2, lo3 = r0 & 0xFFFF, r1 & 0xFFFF, r2 & 0xFFFF, r3 & 0xFFFF  # (BLOCK_N, G) each
        hi0, hi1, hi2, hi3 = r0 >> 16, r1 >> 16, r2 >> 16, r3 >> 16
        lo = tl.interleave(tl.interleave(lo0, lo2), tl.interleave(lo1, lo3))  # (BLOCK_N, 4G): 4g + k <- word k
        hi = tl.interleave(tl.interleave(hi0, hi2), tl.interleave(hi1, hi3))
        bits = tl.interleave(lo, hi)  # (BLOCK_N, BLOCK_C): 8g + 2k + half
        return bits.to(tl.int32) >= drop_threshold

    @triton.jit
    def _load_h(
        x_ptr, x_bias_ptr, residual_ptr, seed_ptr, rows, row_end, C, drop_threshold, keep_scale,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_X_BIAS: tl.constexpr,
    ):  # fmt: skip
        """h = dropout(x + x_bias) + residual in fp32 on rows `rows` (those < row_end), 0 outside; with the keep
        mask, the offsets and the in-bounds mask: the one definition the forward and the backward share."""
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        inside = (rows < row_end)[:, None] & (cols < C)[None, :]  # (BLOCK_N, BLOCK_C)
        offsets = rows[:, None].to(tl.int64) * C + cols[None, :]  # (BLOCK_N, BLOCK_C): N * C may pass 2^31
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_X_BIAS:  # the sublayer matmul's bias, added here instead of in its epilogue
            x += tl.load(x_bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        keep = inside
        if HAS_DROPOUT:
            keep = _keep_mask(tl.load(seed_ptr), rows, drop_threshold, BLOCK_N, BLOCK_C) & inside
            x = tl.where(keep, x * keep_scale, 0.0)
        h = x + tl.load(residual_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        return h, keep, offsets, inside

    @triton.jit
    def _residual_layer_norm_fwd_kernel(
        x_ptr,  # (N, C) x dtype
        x_bias_ptr,  # (C,) read when HAS_X_BIAS
        residual_ptr,  # (N, C) residual dtype
        weight_ptr,  # (C,)
        bias_ptr,  # (C,)
        seed_ptr,  # (1,) int64
        y_ptr,  # (N, C) promoted dtype, written
        mean_ptr,  # (N,) fp32, written
        rstd_ptr,  # (N,) fp32, written
        N, C, eps, drop_threshold, keep_scale,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_X_BIAS: tl.constexpr,
    ):  # fmt: skip
        """One (BLOCK_N, BLOCK_C) tile of whole rows per program: load, normalise, store."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        h, _, offsets, inside = _load_h(
            x_ptr, x_bias_ptr, residual_ptr, seed_ptr, rows, N, C, drop_threshold, keep_scale,
            BLOCK_N, BLOCK_C, HAS_DROPOUT, HAS_X_BIAS,
        )  # fmt: skip
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        col_ok = cols < C
        mean = tl.sum(h, axis=1) / C  # (BLOCK_N,)
        centered = tl.where(col_ok[None, :], h - mean[:, None], 0.0)  # (BLOCK_N, BLOCK_C)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)  # (BLOCK_N,)
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centered * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + rows, mean, mask=rows < N)
        tl.store(rstd_ptr + rows, rstd, mask=rows < N)

    @triton.jit
    def _residual_layer_norm_bwd_kernel(
        dy_ptr,  # (N, C) y dtype
        dy2_ptr,  # (N, C) y dtype, read when HAS_DY2: the gradient that came through the port (added to dy)
        x_ptr,  # (N, C)
        x_bias_ptr,  # (C,) read when HAS_X_BIAS
        residual_ptr,  # (N, C)
        weight_ptr,  # (C,)
        seed_ptr,  # (1,) int64
        mean_ptr,  # (N,) fp32
        rstd_ptr,  # (N,) fp32
        dresidual_ptr,  # (N, C) residual dtype, written: dL/dh
        dx_ptr,  # (N, C) x dtype, written when WRITE_DX (else dx is dresidual itself)
        dweight_partial_ptr,  # (P, C) fp32, written: this program's rows' sum of dy * xhat
        dbias_partial_ptr,  # (P, C) fp32, written: this program's rows' sum of dy
        dx_bias_partial_ptr,  # (P, C) fp32, written when HAS_X_BIAS: this program's rows' sum of dx
        N, C, rows_per_program, drop_threshold, keep_scale,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_DX: tl.constexpr,
        HAS_DY2: tl.constexpr, HAS_X_BIAS: tl.constexpr,
    ):  # fmt: skip
        """Rows [pid * rows_per_program, ...) in (BLOCK_N, BLOCK_C) tiles; dweight and dbias accumulate in
        registers and are stored once per program (P programs, a few per SM), so no atomics are needed."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        col_ok = cols < C
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
        dweight = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)  # reduced over rows once, after the loop
        dbias = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        dx_bias = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        first = pid * rows_per_program
        end = tl.minimum(first + rows_per_program, N)
        for start in tl.range(first, end, BLOCK_N, num_stages=LOOP_STAGES):  # loads pipelined
            rows = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
            row_ok = rows < end
            h, keep, offsets, inside = _load_h(
                x_ptr, x_bias_ptr, residual_ptr, seed_ptr, rows, end, C, drop_threshold, keep_scale,
                BLOCK_N, BLOCK_C, HAS_DROPOUT, HAS_X_BIAS,
            )  # fmt: skip
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(inside, (h - mean[:, None]) * rstd[:, None], 0.0)  # (BLOCK_N, BLOCK_C)
            dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            if HAS_DY2:
                dy += tl.load(dy2_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            wdy = dy * weight[None, :]
            # dL/dh = rstd * (w dy - mean_C(w dy xhat) xhat - mean_C(w dy)): LayerNorm's backward over one row
            c1 = tl.sum(wdy * xhat, axis=1) / C  # (BLOCK_N,)
            c2 = tl.sum(wdy, axis=1) / C
            dh = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dresidual_ptr + offsets, dh.to(dresidual_ptr.dtype.element_ty), mask=inside)
            dx = dh
            if HAS_DROPOUT:
                dx = tl.where(keep, dh * keep_scale, 0.0)
            if WRITE_DX:
                tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            dweight += dy * xhat
            dbias += dy
            if HAS_X_BIAS:
                dx_bias += dx
        tl.store(dweight_partial_ptr + pid * C + cols, tl.sum(dweight, axis=0), mask=col_ok)
        tl.store(dbias_partial_ptr + pid * C + cols, tl.sum(dbias, axis=0), mask=col_ok)
        if HAS_X_BIAS:
            tl.store(dx_bias_partial_ptr + pid * C + cols, tl.sum(dx_bias, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
def dropout_threshold(p: float) -> tuple[int, float]:
    """(drop threshold on 16 random bits, scale of the kept values): element dropped iff bits < threshold."""
    threshold = round(p * (1 << RANDOM_BITS))
    keep = (1 << RANDOM_BITS) - threshold
    return threshold, ((1 << RANDOM_BITS) / keep if keep else 0.0)


def _writes_dx(p: float, x_dtype: torch.dtype, residual_dtype: torch.dtype) -> bool:
    """Whether the backward writes dx, or dx is dresidual itself (no dropout, same dtype)."""
    return dropout_threshold(p)[0] > 0 or x_dtype != residual_dtype


def _tile(C: int, block_n: int | None, num_warps: int | None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps): whole rows (BLOCK_C >= C, a power of two), 2048-element tiles on 8 warps,
    i.e. 8 elements per thread per tensor: at C = 768 bf16 ptxas (sm_90) reports 39-40 registers forward, 113-119
    backward with every option on (dropout, x_bias, the port's dy2; its loads pipelined; Triton 3.9 / 3.6), no
    spills, where 4096-element tiles took 125-255 and spilled. Not tuned by timing yet: the benchmark's --sweep
    times other tiles through `block_n` / `num_warps`."""
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    block_c = max(triton.next_power_of_2(C), COLS_PER_CALL)
    block_n = block_n or max(1, min(64, 2048 // block_c))
    return block_n, block_c, num_warps or (8 if block_n * block_c >= 2048 else 4)


def residual_layer_norm_fwd_triton(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, seed: Tensor, eps: float, p: float, *,
    x_bias: Tensor | None = None, block_n: int | None = None, num_warps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Launch the forward kernel.

    Args:
        x: (N, C) contiguous, fp32 / bf16 / fp16.
        residual: (N, C) contiguous, fp32 / bf16 / fp16.
        weight, bias: (C,) any float dtype.
        seed: (1,) int64 on x's device (read only when p > 0).
        eps: LayerNorm epsilon. p: dropout probability on x, in [0, 1].
        x_bias: (C,) any float dtype, or None: added to x before the dropout (the sublayer matmul's bias).
        block_n, num_warps: launch overrides (benchmark sweeps); default from `_tile`.
    Returns:
        y: (N, C) in promote_types(x.dtype, residual.dtype); mean, rstd: (N,) fp32.
    """
    N, C = x.shape
    y = torch.empty((N, C), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, mean, rstd
    BLOCK_N, BLOCK_C, warps = _tile(C, block_n, num_warps)
    threshold, scale = dropout_threshold(p)
    _residual_layer_norm_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        x, x if x_bias is None else x_bias, residual, weight, bias, seed, y, mean, rstd, N, C, eps, threshold, scale,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, HAS_DROPOUT=threshold > 0, HAS_X_BIAS=x_bias is not None, num_warps=warps,
    )  # fmt: skip
    return y, mean, rstd


def residual_layer_norm_bwd_triton(
    dy: Tensor, x: Tensor, residual: Tensor, weight: Tensor, seed: Tensor, mean: Tensor, rstd: Tensor, p: float, *,
    dy2: Tensor | None = None, x_bias: Tensor | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_programs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Launch the backward kernel, then sum the per-program dweight / dbias (/ dx_bias) partials in one reduction.

    Args:
        dy: (N, C) contiguous, gradient of y. x, residual, weight, seed, p: as given to the forward.
        dy2: (N, C) contiguous or None: the gradient that came through y's port, summed with dy in fp32.
        x_bias: as given to the forward.
        mean, rstd: (N,) fp32 from the forward.
        num_programs: P, the number of partial sums (default: 2 per SM on CUDA, 4 on the interpreter).
    Returns:
        dresidual: (N, C) residual dtype; dx: (N, C) x dtype, or an empty (0,) tensor when it would equal
        dresidual (p == 0 and same dtype: one write saved, the caller passes dresidual for both);
        sums: (2, C) fp32, dweight and dbias, or (3, C) with x_bias: then dx_bias (dx summed over rows) too.
    """
    N, C = x.shape
    threshold, scale = dropout_threshold(p)
    write_dx = _writes_dx(p, x.dtype, residual.dtype)
    dresidual = torch.empty((N, C), dtype=residual.dtype, device=x.device)
    dx = torch.empty((N, C) if write_dx else (0,), dtype=x.dtype, device=x.device)
    partials = 2 if x_bias is None else 3  # dweight, dbias (, dx_bias): (partials, P, C) fp32, summed over P
    if N == 0:
        return dresidual, dx, weight.new_zeros((partials, C), dtype=torch.float32)
    BLOCK_N, BLOCK_C, warps = _tile(C, block_n, num_warps)
    # Equal shares in one wave: 2 programs of 8 warps fit an SM at <= 128 registers (<= 119 at C = 768 bf16); a
    # grid of 1.3 waves would leave most SMs idle while the last third runs.
    programs = num_programs or (2 * num_sms(x.device) if x.is_cuda else 4)
    rows_per_program, P = split_rows(N, BLOCK_N, programs)
    partial = torch.empty((partials, P, C), dtype=torch.float32, device=x.device)
    _residual_layer_norm_bwd_kernel[(P,)](
        dy, dy if dy2 is None else dy2, x, x if x_bias is None else x_bias, residual, weight, seed, mean, rstd,
        dresidual, dx, partial[0], partial[1], partial[-1], N, C, rows_per_program, threshold, scale,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, HAS_DROPOUT=threshold > 0, WRITE_DX=write_dx, HAS_DY2=dy2 is not None,
        HAS_X_BIAS=x_bias is not None, num_warps=warps,
    )  # fmt: skip
    return dresidual, dx, partial.sum(1)  # (partials, C)


# ---------------------------------------------------------------------------------------------------
# Autograd wrapper: two custom ops (opaque to torch.compile, no graph break) and their autograd formula
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("mlmtrain::residual_layer_norm_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, x_bias: Tensor | None, residual: Tensor, residual_port: Tensor | None, weight: Tensor, bias: Tensor,
    seed: Tensor | None, eps: float, p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    with on_device(x):  # the kernels index rows as contiguous: a strided input (from a compiled graph) is copied
        x, residual, seed = x.contiguous(), residual.contiguous(), x if seed is None else seed
        y, mean, rstd = residual_layer_norm_fwd_triton(x, residual, weight, bias, seed, eps, p, x_bias=x_bias)
        return y, mean, rstd, _port(y)


def _port(y: torch.Tensor) -> torch.Tensor:
    """y's gradient port: y's shape and dtype over one zero element (stride 0), never read; residual_layer_norm_routed
    says why."""
    return y.new_zeros((1, 1)).expand(y.shape)


@_fwd_op.register_fake
def _(x, x_bias, residual, residual_port, weight, bias, seed, eps, p):
    N, C = x.shape
    y = x.new_empty((N, C), dtype=torch.promote_types(x.dtype, residual.dtype))
    return y, x.new_empty((N,), dtype=torch.float32), x.new_empty((N,), dtype=torch.float32), _port(y)


@torch.library.custom_op("mlmtrain::residual_layer_norm_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor, dy2: Tensor | None, x: Tensor, x_bias: Tensor | None, residual: Tensor, weight: Tensor,
    seed: Tensor | None, mean: Tensor, rstd: Tensor, p: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    with on_device(x):
        dy, x, residual = dy.contiguous(), x.contiguous(), residual.contiguous()
        dy2, seed = None if dy2 is None else dy2.contiguous(), x if seed is None else seed
        return residual_layer_norm_bwd_triton(dy, x, residual, weight, seed, mean, rstd, p, dy2=dy2, x_bias=x_bias)


@_bwd_op.register_fake
def _(dy, dy2, x, x_bias, residual, weight, seed, mean, rstd, p):
    N, C = x.shape
    dx = x.new_empty((N, C) if _writes_dx(p, x.dtype, residual.dtype) else (0,))
    return residual.new_empty((N, C)), dx, x.new_empty((2 if x_bias is None else 3, C), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, x_bias, residual, residual_port, weight, bias, seed, eps, p = inputs
    _, mean, rstd, _ = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused port (the last layer's) brings None, not a tensor of zeros
    ctx.save_for_backward(x, x_bias, residual, weight, seed, mean, rstd)
    ctx.p, ctx.bias_dtype, ctx.routed = p, bias.dtype, residual_port is not None


def _backward(ctx, dy, _dmean, _drstd, dport):
    if dy is None and dport is None:  # neither y nor its port got a gradient (grads are not materialised)
        return (None,) * 9
    x, x_bias, residual, weight, seed, mean, rstd = ctx.saved_tensors
    dy = torch.zeros_like(x, dtype=dport.dtype) if dy is None else dy  # y unused: only its port carried a gradient
    dresidual, dx, sums = _bwd_op(dy.contiguous(), dport, x, x_bias, residual, weight, seed, mean, rstd, ctx.p)
    if not _writes_dx(ctx.p, x.dtype, residual.dtype):  # h = x + residual: both get dL/dh
        # one buffer for both only where the residual's share goes to its port: its producer's backward kernel
        # reads it and makes its own gradients, so at most x's side can hand it on to a .grad. Else a copy: two
        # leaves reached through pass-through ops (`a + 0.0`, a view) would keep one buffer as both .grad, and a
        # second backward (gradient accumulation) would add each gradient into both. In the model every
        # LayerNorm but the first layer's first takes a port.
        dx = dresidual if ctx.routed else dresidual.clone()
    dx_bias = None if x_bias is None else sums[2].to(x_bias.dtype)
    # the residual's gradient goes back through its port when it came with one (then its producer adds it to the
    # gradient of its y inside its own backward kernel), else to the residual itself (autograd adds it)
    to_residual, to_port = (None, dresidual) if ctx.routed else (dresidual, None)
    dweight, dbias = sums[0].to(weight.dtype), sums[1].to(ctx.bias_dtype)
    return dx, dx_bias, to_residual, to_port, dweight, dbias, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """(1,) int64 dropout seed drawn on `device` from torch's generator for it (no sync, CUDA-graph safe)."""
    return torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=device, generator=generator)


def residual_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm(dropout(x, p) + residual) over the last dimension (see the module docstring).

    x, residual: (..., C), same shape, fp32 / bf16 / fp16. weight, bias: (C,). Returns y (..., C) in
    promote_types(x.dtype, residual.dtype). p: dropout on x, applied only when `training`. seed: (1,) int64 on
    x's device keying the dropout bits; None draws one with `draw_seed` (only when dropout is on).
    backend: "triton", "torch" (the reference), or "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else
    torch). Both are differentiable in x, residual, weight and bias and give the same mask for the same seed.
    """
    routed = residual_layer_norm_routed(
        x, residual, None, weight, bias, eps, p, seed, training=training, backend=backend
    )
    return routed[0]


def residual_layer_norm_routed(
    x, residual, residual_port, weight, bias, eps=1e-12, p=0.0, seed=None, *, x_bias=None, training=True, backend="auto"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`residual_layer_norm` that also returns y's gradient port, and takes the residual's (`residual_port`: the
    port its producer returned, or None), and adds `x_bias` (C,) to x before the dropout: the sublayer matmul's
    bias, whose gradient the backward kernel then sums as it goes (no reduction over dx after it; the matmul runs
    without it). Returns (y, port); port is None on the torch reference.

    Why: y feeds two consumers, the next sublayer's matmul and the next LayerNorm's residual, and autograd adds
    their two gradients before this backward reads the sum: inductor makes that add an addmm into a new buffer,
    which copies one gradient first (a (N, C) device-to-device copy per LayerNorm: 1.16 ms per BERT-base step on
    the H200, 2026-11-30). Through the port the next LayerNorm hands its residual gradient to this backward
    instead, and the kernel adds the two as it loads them. The port is y's shape over one element: no memory, never
    read; only its gradient is. Each gradient reaches this backward once, through y or through the port, so pass
    the port that came with this very residual (nothing can check that). A hook on y sees only the gradient that
    came through y (the next matmul's share).
    """
    C = x.shape[-1]
    if x.shape != residual.shape:
        raise ValueError(f"x and residual must have the same shape, got {tuple(x.shape)} and {tuple(residual.shape)}")
    if weight.shape != (C,) or bias.shape != (C,) or (x_bias is not None and x_bias.shape != (C,)):
        shapes = [tuple(t.shape) for t in (weight, bias, x_bias) if t is not None]
        raise ValueError(f"weight and bias (and x_bias) must be ({C},), got {', '.join(map(str, shapes))}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in floats or residual.dtype not in floats:
        raise TypeError(f"x and residual must be fp32, bf16 or fp16, got {x.dtype} and {residual.dtype}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout p must be in [0, 1], got {p}")
    triton_call = use_triton(backend, x.device)
    p = p if training else 0.0
    if dropout_threshold(p)[0] == 0:
        seed = None
    elif seed is None:
        seed = draw_seed(x.device)
    elif seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
        raise ValueError(f"seed must be one int64 on {x.device}, got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
    if residual_port is not None and residual_port.shape != residual.shape:
        raise ValueError(f"residual_port must have the residual's shape {tuple(residual.shape)}: it is its port")
    if not residual.requires_grad:  # a detached residual: its gradient must reach no port
        residual_port = None
    if not triton_call:  # a port from a Triton call then gets no gradient: its producer's y gets the whole sum
        return residual_layer_norm_reference(x, residual, weight, bias, eps, p, seed, x_bias=x_bias), None
    x2 = x.contiguous().view(-1, C)  # (N, C)
    residual2 = residual.contiguous().view(-1, C)  # (N, C)
    port2 = None if residual_port is None else residual_port.view(-1, C)
    seed = None if seed is None else seed.view(1)
    y, _, _, port = _fwd_op(x2, x_bias, residual2, port2, weight, bias, seed, eps, p)
    return y.view(x.shape), port.view(x.shape)  # (..., C)


# ---------------------------------------------------------------------------------------------------
# Pure-torch reference (also the fallback where Triton cannot run; no host sync, so it is CUDA-safe too)
# ---------------------------------------------------------------------------------------------------
def dropout_keep_mask(seed: torch.Tensor, n_rows: int, n_cols: int, p: float) -> torch.Tensor:
    """(n_rows, n_cols) bool, True where the kernels keep an element: the same Philox bits, in torch ops."""
    threshold, _ = dropout_threshold(p)
    groups = -(-n_cols // COLS_PER_CALL)
    c0 = torch.arange(groups, device=seed.device, dtype=torch.int64)[None, :].expand(n_rows, groups)  # (N, G)
    c1 = torch.arange(n_rows, device=seed.device, dtype=torch.int64)[:, None].expand(n_rows, groups)  # (N, G)
    zero = torch.zeros_like(c0)
    words = torch.stack(philox4x32_torch(c0, c1, zero, zero, seed.reshape(1)), -1)  # (N, G, 4), key a tensor
    halves = torch.stack((words & 0xFFFF, words >> 16), -1)  # (N, G, 4, 2): column 8g + 2w + half
    bits = halves.reshape(n_rows, groups * COLS_PER_CALL)[:, :n_cols]  # (N, C)
    return bits >= threshold


def residual_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    p: float = 0.0,
    seed: torch.Tensor | None = None,
    *,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernels' function in torch ops, differentiable by torch's autograd. At p = 0 with fp32 inputs and no
    x_bias it is exactly F.layer_norm(x + residual, (C,), weight, bias, eps)."""
    C = x.shape[-1]
    h = x.float() if x_bias is None else x.float() + x_bias.float()
    threshold, scale = dropout_threshold(p)
    if threshold > 0:
        if seed is None:
            raise ValueError("dropout needs a seed tensor")
        keep = dropout_keep_mask(seed, x.numel() // C, C, p).view(x.shape)  # (..., C)
        h = torch.where(keep, h * scale, 0.0)
    h = h + residual.float()
    y = F.layer_norm(h, (C,), weight.float(), bias.float(), eps)
    return y.to(torch.promote_types(x.dtype, residual.dtype))
