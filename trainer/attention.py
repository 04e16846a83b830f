"""Attention over packed tokens: every way the model runs softmax(QK^T / sqrt(D)) V with the same math, and
the choice among them (`attention_for`, once per forward, from the run's `attn_impl`, device and dtype).

Flat batches (packing.Packer: T tokens of whole segments back to back, `cu_seqlens` marking their starts):
- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash, CUDA, fp16/bf16 only). Its dropout is fixed at 0,
  so attention-probability dropout is NOT applied on this path (hidden dropout still is).
- "sdpa": the reference. Gather tokens into a padded (S, L) grid (`packed_layout`), SDPA with a key-padding
  mask, gather back. Runs anywhere, with dropout. Tests compare the two.
Rows (data.layout = "rows", packing.RowPacker): the T tokens are R rows of L, each row whole segments back to
back and a [PAD] tail; a token attends to the tokens of its own segment, which `segment_ids` (R, L) names:
- "flex" (`flex_row_attention`): FlexAttention with a block-diagonal mask function. A row of 128 is one
  128 x 128 tile holding ~4-5 sentences (sentence packing), where flash varlen gives each ~27-token sentence a
  tile of its own (~5-8% of it useful): about 4.7x fewer tiles for the same tokens. Fused only under
  torch.compile (eager FlexAttention materializes the scores; on the CPU it has no backward at all), so an
  eager CUDA forward (evaluation's) takes the reference.
- "triton" (`triton_row_attention`): the segment-attention Triton kernel (kernels/segment_attention.py) for rows
  of at most 128 tokens: one program per (row, head) holds the whole tile, and its backward is one pass.
- "sdpa" (`row_sdpa_attention`): the reference, SDPA with the dense (R, 1, L, L) mask; runs anywhere.
The padded entry (`padded_attention`, transformers' (B, L) layout) is the reference's core and
`BertForMaskedLM.forward_padded`'s attention.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.attention.varlen import varlen_attn  # CUDA flash kernels (the import works on CPU builds too)

from mlmtrain.config import ATTENTION_IMPLS
from mlmtrain.kernels.segment_attention import segment_attention

# ----------------------------------------------------------------------------------------------------------
# flat batches


def padded_attention(q, k, v, key_mask, dropout_p: float):
    """q, k, v (B, L, H, D); key_mask (B, L) bool, True = real key. Returns (B, L, H, D)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=dropout_p)
    return out.transpose(1, 2)  # (B, L, H, D)


def packed_sdpa_attention(q, k, v, gather_index, key_mask, scatter_index, dropout_p: float):
    """Reference packed attention. q, k, v (T, H, D) -> gather to (S, L, H, D) -> SDPA -> back to (T, H, D).
    Indices come from `packed_layout` (computed once per forward, shared by every layer)."""
    S, L = gather_index.shape
    q, k, v = (t[gather_index] for t in (q, k, v))  # (S, L, H, D)
    out = padded_attention(q, k, v, key_mask, dropout_p)  # (S, L, H, D)
    return out.flatten(0, 1)[scatter_index]  # (S*L, H, D) -> (T, H, D)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int):
    """Flash varlen attention on (T, H, D). Called with the positional arguments common to torch 2.10-2.15
    (q, k, v, cu_seq_q, cu_seq_k, max_q, max_k); the default is non-causal with scale 1/sqrt(D)."""
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)  # (T, H, D)


def packed_layout(cu_seqlens, max_seqlen: int, num_tokens: int):
    """Index tensors that move packed tokens into a padded (S, L) grid and back; all shapes static.

    Empty segments (repeated cu_seqlens values) get one unmasked dummy key so softmax never sees an all-masked
    row (which would be NaN and, through backward, poison the gradients); their outputs are never read.
    Tokens past cu_seqlens[-1] (the packers never make them) are clamped rather than crash."""
    S, L, T = cu_seqlens.numel() - 1, max_seqlen, num_tokens
    starts = cu_seqlens[:-1].long()  # (S,)
    lengths = cu_seqlens[1:].long() - starts  # (S,)
    slot = torch.arange(L, device=cu_seqlens.device)  # (L,)
    gather_index = (starts[:, None] + slot[None, :]).clamp(max=T - 1)  # (S, L)
    key_mask = (slot[None, :] < lengths[:, None]) | (slot[None, :] == 0)  # (S, L)
    token = torch.arange(T, device=cu_seqlens.device)  # (T,)
    segment = (torch.searchsorted(cu_seqlens, token.to(cu_seqlens.dtype), right=True) - 1).clamp(0, S - 1)  # (T,)
    offset = (token - starts[segment]).clamp(0, L - 1)  # (T,)
    scatter_index = segment * L + offset  # (T,) row in the flattened (S*L) grid
    return gather_index, key_mask, scatter_index


# ----------------------------------------------------------------------------------------------------------
# rows


def row_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The dense block-diagonal mask of rows: segment_ids (R, L) -> (R, 1, L, L) bool, True = same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def row_sdpa_attention(q, k, v, same_segment, dropout_p: float):
    """Reference row attention: q, k, v (T, H, D) as (R, L, H, D), SDPA with the dense block-diagonal mask
    `same_segment` (R, 1, L, L) (`row_mask`)."""
    R, L = same_segment.shape[0], same_segment.shape[-1]
    q, k, v = (t.unflatten(0, (R, L)).transpose(1, 2) for t in (q, k, v))  # (R, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=same_segment, dropout_p=dropout_p)
    return out.transpose(1, 2).flatten(0, 1)  # (R, H, L, D) -> (T, H, D)


FLEX_BLOCK = 128  # FlexAttention's default sparse block: a row of L tokens is ceil(L / 128) blocks


def row_block_tables(segment_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The block tables of the row BlockMask, from this batch's segment ids (R, L), which the RowPacker lays
    non-decreasing along each row (one segment after another): the ids of a block of 128 tokens are then the
    range from its first to its last, and a (query block, key block) pair holds a same-segment pair iff their
    ranges overlap. Pairs that do not are skipped; pairs inside one segment are full (no mask function); the rest
    are partial. Returns (kv_num_blocks (R, 1, n), kv_indices (R, 1, n, n), full_kv_num_blocks, full_kv_indices),
    int32, n = ceil(L / 128): a few (R, n, n) tensor ops per forward, on the device, no sync; under torch.compile
    they are part of the graph, so a new batch changes values, not shapes (no recompile). At L <= 128 (n = 1)
    every row is one pair: partial, or full when the row is one segment."""
    R, L = segment_ids.shape
    n = -(-L // FLEX_BLOCK)
    ids = torch.cat([segment_ids, segment_ids[:, -1:].expand(R, n * FLEX_BLOCK - L)], 1)  # the last id repeated
    blocks = ids.view(R, n, FLEX_BLOCK)
    first, last = blocks[..., 0], blocks[..., -1]  # (R, n): the id range of each block
    q_first, q_last, k_first, k_last = first[:, :, None], last[:, :, None], first[:, None, :], last[:, None, :]
    overlap = (q_first <= k_last) & (k_first <= q_last)  # (R, n, n)
    full = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)  # one segment on both sides
    tables = []
    for visit in (overlap & ~full, full):
        count = visit.sum(-1, dtype=torch.int32)  # (R, n)
        keys = (~visit).to(torch.int32) * n + torch.arange(n, device=visit.device, dtype=torch.int32)  # distinct
        order = torch.argsort(keys, dim=-1).to(torch.int32)  # visited blocks first, each group in block order
        tables += [count[:, None], order[:, None]]
    return tuple(tables)


def flex_row_attention(q, k, v, segment_ids, block_tables, dropout_p: float = 0.0):
    """Row attention with FlexAttention: q, k, v (T, H, D) -> (T, H, D); FlexAttention has no dropout, so
    `dropout_p` is not applied (as on the flash varlen path). The mask function closes over this batch's
    `segment_ids` and `block_tables` come from them (row_block_tables); under torch.compile both are values in the
    graph, so a new batch does not recompile (tests/test_rows.py counts the graphs)."""
    R, L = segment_ids.shape

    def same_segment(b, h, q_idx, kv_idx):
        return segment_ids[b, q_idx] == segment_ids[b, kv_idx]

    block_mask = BlockMask.from_kv_blocks(
        *block_tables, BLOCK_SIZE=FLEX_BLOCK, mask_mod=same_segment, seq_lengths=(L, L)
    )
    q, k, v = (t.unflatten(0, (R, L)).transpose(1, 2) for t in (q, k, v))  # (R, H, L, D)
    return flex_attention(q, k, v, block_mask=block_mask).transpose(1, 2).flatten(0, 1)  # (T, H, D)


def triton_row_attention(qkv, segment_ids):
    """Row attention with the segment-attention Triton kernel (kernels/segment_attention.py; rows of at most 128
    tokens): qkv (T, 3, H, D), the fused projection's output, -> (T, H, D); its gradient comes back as one
    (T, 3, H, D) tensor (no stacking of three). No dropout, as on the flex and flash varlen paths."""
    return segment_attention(qkv, segment_ids, backend="triton")


# ----------------------------------------------------------------------------------------------------------
# the choice, once per forward


def choose_impl(attn_impl: str, device: torch.device, dtype: torch.dtype, rows: bool, compiled=None) -> str:
    """The attention a forward runs: `attn_impl` ("auto" picks the fastest that is fused here), refused by name
    where it cannot run. `dtype` is the compute dtype (flash needs fp16/bf16); `compiled`: whether the forward
    runs under torch.compile (None: as it runs now)."""
    compiled = torch.compiler.is_compiling() if compiled is None else compiled
    fused_flex = device.type == "cuda" and compiled  # eager, it materializes the scores
    if attn_impl == "auto":
        flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        return ("flex" if fused_flex else "sdpa") if rows else ("varlen" if flash_ok else "sdpa")
    if attn_impl == "varlen" and device.type != "cuda":
        raise ValueError("attn_impl='varlen' needs a CUDA device; use 'sdpa' (or 'auto')")
    if attn_impl not in ATTENTION_IMPLS or (attn_impl in ("flex", "triton") and not rows):
        raise ValueError(
            f"attn_impl must be auto, varlen, sdpa, or flex or triton (with segment_ids), not {attn_impl!r}"
        )
    eager_flex = attn_impl == "flex" and device.type == "cuda" and not fused_flex  # e.g. evaluation's
    return "sdpa" if eager_flex else attn_impl  # the reference: the same math, fused


def has_dropout(impl: str) -> bool:
    """Whether `impl` applies dropout to the attention probabilities: the SDPA references do; flash varlen
    (its dropout fixed at 0 here), FlexAttention and the segment kernel have none."""
    return impl == "sdpa"


def dropout_note(impl: str, p: float) -> str | None:
    """One line for a run whose dropout `p` the attention `impl` applies to the hidden states only."""
    if p > 0 and not has_dropout(impl):
        return f"dropout {p} on hidden states only: {impl} attention has none on its probabilities (sdpa has)"
    return None


def attention_for(impl: str, cu_seqlens, max_seqlen: int, num_tokens: int, segment_ids=None):
    """The `attend(q, k, v, dropout_p)` callable every layer of one forward calls, with this batch's layout bound
    (indices and block tables built once here, shared by the layers). "triton" takes qkv whole:
    `attend(qkv)` (`takes_qkv`)."""
    if impl == "varlen":

        def attend(q, k, v, dropout_p):
            return varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # dropout_p: not supported by varlen_attn

        return attend
    if impl == "flex":
        return functools.partial(
            flex_row_attention, segment_ids=segment_ids, block_tables=row_block_tables(segment_ids)
        )
    if impl == "triton":
        return functools.partial(triton_row_attention, segment_ids=segment_ids)
    if segment_ids is not None:
        return functools.partial(row_sdpa_attention, same_segment=row_mask(segment_ids))
    gather_index, key_mask, scatter_index = packed_layout(cu_seqlens, max_seqlen, num_tokens)
    return functools.partial(
        packed_sdpa_attention, gather_index=gather_index, key_mask=key_mask, scatter_index=scatter_index
    )


def takes_qkv(attend) -> bool:
    """Whether `attend` takes the fused projection's (..., 3, H, D) output whole (its gradient then comes back as
    one tensor: no stacking of three)."""
    return getattr(attend, "func", None) is triton_row_attention
