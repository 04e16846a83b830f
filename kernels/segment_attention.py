"""Attention within the segments of short rows (data.layout = rows, rows of at most 128 tokens): Triton kernels
(forward, backward) that give each (row, head) one program holding the row's whole score tile, and their
pure-torch reference.

Contract, for qkv (T, 3, H, D) (the fused q/k/v projection's output; T = R * L, row r is tokens r*L .. r*L + L-1)
and segment_ids (R, L) int32 >= 0: token i of a row attends to the tokens j of the same row with
segment_ids[r, i] == segment_ids[r, j] (itself always):
  out[i] = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j,  out (T, H, D) in qkv's dtype.
The gradient comes back as one (T, 3, H, D) tensor, written where q, k and v were read: the fused projection's
backward takes it as it is, where three gradients would first be stacked (a copy of 3 T H D elements per layer).
No dropout (as FlexAttention and flash varlen here). L <= 128 and D <= 128; longer rows take FlexAttention.

Why a kernel of its own: at L = 128 a row is one 128 x 128 tile, so the segment mask is one comparison of two
id vectors, nothing is skipped or tabled, and the backward needs no second pass. Per program the forward loads
K and V once, then per block of BLOCK_M queries: S = Q K^T (fp32), the mask, softmax in base 2, O = P V, and
it stores O and the row's log-sum-exp (R, H, L) fp32. The backward loads K and V once, then per query block
recomputes P from the saved log-sum-exp and forms dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
dQ = dS K (stored), dK += dS^T Q: one pass where FlexAttention's backward runs a dO.O pre-pass and two loops
(dK/dV over query blocks, dQ over key blocks) that each recompute S. P and dS are rounded to the input dtype
for their matmuls, as flash attention does; everything else accumulates in fp32. fp32 inputs multiply in full
fp32 ("ieee"), not TF32.

torch.compile: custom ops `mlmtrain::segment_attention_fwd` / `..._bwd` with fake functions and an autograd
formula, as in residual_layer_norm.py.
"""

from __future__ import annotations

import math

import torch

from mlmtrain.kernels import INTERPRETED, on_device, tl, triton, use_triton

MAX_ROW = 128  # tokens per row the kernels hold in one tile
MAX_HEAD_DIM = 128

# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32. UPCAST: the operands as fp32 first, for Triton's CPU interpreter, whose dot
        multiplies bf16 values as their raw 16-bit patterns (the launcher sets it there only)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _offsets(first, index, in_bounds, column, stride_t, dims, D):
        """Offsets (int64: first is) and in-bounds mask of a (len(index), BLOCK_D) tile: tokens first + index, the
        D elements from `column` within each token's stride_t."""
        offsets = (first + index)[:, None] * stride_t + column + dims[None, :]
        return offsets, in_bounds[:, None] & (dims < D)[None, :]

    @triton.jit
    def _tile(ptr, first, index, in_bounds, column, stride_t, dims, D):
        """The (len(index), BLOCK_D) tile at those offsets, 0 outside."""
        offsets, inside = _offsets(first, index, in_bounds, column, stride_t, dims, D)
        return tl.load(ptr + offsets, mask=inside, other=0.0)

    @triton.jit
    def _segment_attention_fwd_kernel(
        qkv_ptr,  # (T, 3, H, D) contiguous: q, k, v of every token
        segment_ptr,  # (R, L) int32
        out_ptr,  # (T, H, D) contiguous, written
        lse_ptr,  # (R, H, L) fp32, written: log2 of each query's softmax denominator, in base-2 score units
        H,
        L,
        D,
        scale_log2,  # log2(e) / sqrt(D): scores in base-2 units
        BLOCK_M: tl.constexpr,  # queries per inner block
        BLOCK_L: tl.constexpr,  # >= L: the whole row of keys
        BLOCK_D: tl.constexpr,  # >= D
        PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32 inputs
        UPCAST: tl.constexpr,  # bf16 dots in fp32 (the CPU interpreter)
    ):
        """Grid (R, H): one program per row and head."""
        row, head = tl.program_id(0), tl.program_id(1)
        first = row.to(tl.int64) * L  # the row's first token
        keys, dims = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)  # (BLOCK_L,), (BLOCK_D,)
        key_in = keys < L
        stride_t, q_col = 3 * H * D, head * D  # k and v: one and two H * D further
        k = _tile(qkv_ptr, first, keys, key_in, q_col + H * D, stride_t, dims, D)  # (BLOCK_L, BLOCK_D)
        v = _tile(qkv_ptr, first, keys, key_in, q_col + 2 * H * D, stride_t, dims, D)  # (BLOCK_L, BLOCK_D)
        key_segment = tl.load(segment_ptr + first + keys, mask=key_in, other=-1)  # (BLOCK_L,)
        for start in range(0, L, BLOCK_M):
            queries = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            query_in = queries < L
            q = _tile(qkv_ptr, first, queries, query_in, q_col, stride_t, dims, D)  # (BLOCK_M, BLOCK_D)
            query_segment = tl.load(segment_ptr + first + queries, mask=query_in, other=-2)  # never a key's id
            same = query_segment[:, None] == key_segment[None, :]  # (BLOCK_M, BLOCK_L)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2  # (BLOCK_M, BLOCK_L) fp32
            s = tl.where(same, s, float("-inf"))
            m = tl.where(query_in, tl.max(s, 1), 0.0)  # (BLOCK_M,): a real query sees itself, so m is finite
            p = tl.exp2(s - m[:, None])  # 0 where masked
            denominator = tl.where(query_in, tl.sum(p, 1), 1.0)  # (BLOCK_M,)
            out = _dot(p.to(v.dtype), v, PRECISION, UPCAST) / denominator[:, None]  # (BLOCK_M, BLOCK_D)
            out_offsets, out_inside = _offsets(first, queries, query_in, head * D, H * D, dims, D)
            tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=out_inside)
            lse_offsets = (row.to(tl.int64) * H + head) * L + queries
            tl.store(lse_ptr + lse_offsets, m + tl.log2(denominator), mask=query_in)

    @triton.jit
    def _segment_attention_bwd_kernel(
        qkv_ptr,  # (T, 3, H, D) contiguous
        out_ptr,  # (T, H, D) contiguous: the forward's output
        dout_ptr,  # (T, H, D) contiguous
        lse_ptr,  # (R, H, L) fp32: the forward's
        segment_ptr,  # (R, L) int32
        dqkv_ptr,  # (T, 3, H, D) contiguous, written: dq, dk, dv where q, k, v are
        H,
        L,
        D,
        scale,  # 1 / sqrt(D)
        scale_log2,  # log2(e) / sqrt(D)
        BLOCK_M: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Grid (R, H): one program per row and head; dK and dV accumulate over the query blocks in registers."""
        row, head = tl.program_id(0), tl.program_id(1)
        first = row.to(tl.int64) * L
        keys, dims = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
        key_in = keys < L
        stride_t, q_col = 3 * H * D, head * D
        k = _tile(qkv_ptr, first, keys, key_in, q_col + H * D, stride_t, dims, D)  # (BLOCK_L, BLOCK_D)
        v = _tile(qkv_ptr, first, keys, key_in, q_col + 2 * H * D, stride_t, dims, D)
        key_segment = tl.load(segment_ptr + first + keys, mask=key_in, other=-1)
        dk = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for start in range(0, L, BLOCK_M):
            queries = start + tl.arange(0, BLOCK_M)
            query_in = queries < L
            q_offsets, q_inside = _offsets(first, queries, query_in, q_col, stride_t, dims, D)  # dq's too
            q = tl.load(qkv_ptr + q_offsets, mask=q_inside, other=0.0)  # (BLOCK_M, BLOCK_D)
            out = _tile(out_ptr, first, queries, query_in, head * D, H * D, dims, D)
            dout = _tile(dout_ptr, first, queries, query_in, head * D, H * D, dims, D)
            query_segment = tl.load(segment_ptr + first + queries, mask=query_in, other=-2)
            lse = tl.load(lse_ptr + (row.to(tl.int64) * H + head) * L + queries, mask=query_in, other=0.0)
            same = query_segment[:, None] == key_segment[None, :]  # (BLOCK_M, BLOCK_L)
            s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
            p = tl.where(same, tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_L): the forward's softmax
            dv += _dot(tl.trans(p.to(dout.dtype)), dout, PRECISION, UPCAST)  # (BLOCK_L, BLOCK_D)
            dp = _dot(dout, tl.trans(v), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_L) fp32
            delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), 1)  # (BLOCK_M,) = rowsum(P * dP)
            ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_L): dL/dS, before the scale
            dq = _dot(ds.to(k.dtype), k, PRECISION, UPCAST) * scale  # (BLOCK_M, BLOCK_D)
            tl.store(dqkv_ptr + q_offsets, dq.to(dqkv_ptr.dtype.element_ty), mask=q_inside)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)  # (BLOCK_L, BLOCK_D)
        k_offsets, kv_inside = _offsets(first, keys, key_in, q_col + H * D, stride_t, dims, D)
        tl.store(dqkv_ptr + k_offsets, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=kv_inside)
        tl.store(dqkv_ptr + k_offsets + H * D, dv.to(dqkv_ptr.dtype.element_ty), mask=kv_inside)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
# queries per inner block, warps, pipeline stages: at rows of 128 and heads of 64 in bf16, the largest query blocks
# whose sm_90 build (nearly) spills no registers: static SASS, local loads and stores counted, Triton 3.9 / 3.6:
# forward 0 / 0 (64 queries at 4 warps: 70); backward 0 / 4 (64 queries: ~290-360 at any stage count or warps).
# Chosen without a GPU: not yet timed.
FWD_LAUNCH = dict(BLOCK_M=64, num_warps=8, num_stages=3)
BWD_LAUNCH = dict(BLOCK_M=32, num_warps=8, num_stages=1)


def _launch(kernel: dict, L: int, D: int, dtype: torch.dtype) -> dict:
    """A kernel's launch arguments: the whole row of keys, kernel's queries per block (tl.dot needs >= 16 per side),
    its warps and stages, and the dot precision."""
    block_l = max(16, triton.next_power_of_2(L))
    return dict(
        kernel,
        BLOCK_M=min(kernel["BLOCK_M"], block_l),
        BLOCK_L=block_l,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION="ieee" if dtype == torch.float32 else "tf32",  # tf32: ignored for 16-bit inputs
        UPCAST=INTERPRETED and dtype == torch.bfloat16,
    )


def segment_attention_fwd_triton(qkv, segment_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        qkv: (T, 3, H, D) contiguous. segment_ids: (R, L) int32 contiguous, R * L = T.
    Returns:
        out: (T, H, D) contiguous, qkv's dtype; lse: (R, H, L) fp32 (base-2 units, for the backward).
    """
    (T, _, H, D), (R, L) = qkv.shape, segment_ids.shape
    out = torch.empty((T, H, D), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((R, H, L), dtype=torch.float32, device=qkv.device)
    if R:
        _segment_attention_fwd_kernel[(R, H)](
            qkv, segment_ids, out, lse, H, L, D, math.log2(math.e) / math.sqrt(D),
            **_launch(FWD_LAUNCH, L, D, qkv.dtype),
        )  # fmt: skip
    return out, lse


def segment_attention_bwd_triton(dout, qkv, out, lse, segment_ids) -> torch.Tensor:
    """Launch the backward kernel. dout and out: (T, H, D) contiguous; the rest as given to the forward.
    Returns dqkv: (T, 3, H, D) contiguous, qkv's dtype (dq, dk, dv where q, k, v are: no stacking after)."""
    (_, _, H, D), (R, L) = qkv.shape, segment_ids.shape
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    if R:
        _segment_attention_bwd_kernel[(R, H)](
            qkv, out, dout, lse, segment_ids, dqkv, H, L, D, 1 / math.sqrt(D), math.log2(math.e) / math.sqrt(D),
            **_launch(BWD_LAUNCH, L, D, qkv.dtype),
        )  # fmt: skip
    return dqkv


# ---------------------------------------------------------------------------------------------------
# Autograd wrapper: two custom ops (opaque to torch.compile, no graph break) and their autograd formula
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("mlmtrain::segment_attention_fwd", mutates_args=())
def _fwd_op(qkv: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(qkv):  # the kernels index every tensor as contiguous: a strided input is copied
        return segment_attention_fwd_triton(qkv.contiguous(), segment_ids.contiguous())


@_fwd_op.register_fake
def _(qkv, segment_ids):
    (T, _, H, D), (R, L) = qkv.shape, segment_ids.shape
    return qkv.new_empty((T, H, D)), qkv.new_empty((R, H, L), dtype=torch.float32)


@torch.library.custom_op("mlmtrain::segment_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    with on_device(qkv):
        tensors = (t.contiguous() for t in (dout, qkv, out, lse, segment_ids))
        return segment_attention_bwd_triton(*tensors)


@_bwd_op.register_fake
def _(dout, qkv, out, lse, segment_ids):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, segment_ids = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse, segment_ids)


def _backward(ctx, dout, _dlse):
    qkv, out, lse, segment_ids = ctx.saved_tensors
    return _bwd_op(dout, qkv, out, lse, segment_ids), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def segment_attention(qkv, segment_ids, *, backend: str = "auto") -> torch.Tensor:
    """Attention within the segments of each row (module docstring): qkv (T, 3, H, D) (the fused projection's
    output: q, k, v of every token), segment_ids (R, L) with R * L = T. Returns (T, H, D) in qkv's dtype,
    differentiable in qkv (its gradient comes back as one (T, 3, H, D) tensor).
    backend: "triton", "torch" (the reference), or "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch)."""
    (R, L), (T, three, _, D) = segment_ids.shape, qkv.shape
    if R * L != T or three != 3:
        raise ValueError(f"qkv must be (R*L, 3, H, D) for segment_ids (R, L) = {(R, L)}, got {tuple(qkv.shape)}")
    if L > MAX_ROW or D > MAX_HEAD_DIM:
        raise ValueError(f"rows of at most {MAX_ROW} tokens and heads of at most {MAX_HEAD_DIM}, got L={L}, D={D}")
    if not use_triton(backend, qkv.device):
        return segment_attention_reference(qkv, segment_ids)
    return _fwd_op(qkv.contiguous(), segment_ids.to(torch.int32).contiguous())[0]


# ---------------------------------------------------------------------------------------------------
# Pure-torch reference (also the fallback where Triton cannot run)
# ---------------------------------------------------------------------------------------------------
def segment_attention_reference(qkv, segment_ids) -> torch.Tensor:
    """The kernels' function in torch ops (fp32 scores and softmax over a dense (R, H, L, L) mask), differentiable
    by torch's autograd."""
    (R, L), dtype, D = segment_ids.shape, qkv.dtype, qkv.shape[-1]
    q, k, v = qkv.float().unflatten(0, (R, L)).unbind(2)  # 3 x (R, L, H, D)
    scores = torch.einsum("rihd,rjhd->rhij", q, k) / math.sqrt(D)  # (R, H, L, L)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (R, 1, L, L)
    probs = scores.masked_fill(~same, float("-inf")).softmax(-1)
    return torch.einsum("rhij,rjhd->rihd", probs, v).flatten(0, 1).to(dtype)  # (R, L, H, D) -> (T, H, D)
