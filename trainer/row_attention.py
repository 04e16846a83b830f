"""Row attention (data.layout = "rows", packing.RowPacker): the T tokens of a batch are R rows of L, each row
whole segments back to back and a [PAD] tail; a token attends to the tokens of its own segment, which
`segment_ids` (R, L) names. Three ways to run it, with the same math as the model's packed attention on the
same segments:
- `flex_row_attention`: FlexAttention with a block-diagonal mask function. A row of 128 is one 128 x 128 tile
  holding ~4-5 sentences, where flash varlen gives each ~27-token sentence a tile of its own (~5-8% of it
  useful): about 4.7x fewer tiles for the same tokens. Fused only under torch.compile (eager FlexAttention
  materializes the scores; on the CPU it has no backward at all).
- `triton_row_attention`: the segment-attention Triton kernel (kernels/segment_attention.py) for rows of at
  most 128 tokens: one program per (row, head) holds the whole tile, and its backward is one pass.
- `row_sdpa_attention`: the reference, SDPA with the dense (R, 1, L, L) mask; runs anywhere, with dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from mlmtrain.kernels.segment_attention import segment_attention


def row_sdpa_attention(q, k, v, segment_ids, dropout_p: float):
    """Reference row attention: q, k, v (T, H, D) as (R, L, H, D), SDPA with the dense block-diagonal mask."""
    R, L = segment_ids.shape
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, L, L)
    q, k, v = (t.unflatten(0, (R, L)).transpose(1, 2) for t in (q, k, v))  # (R, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=same_segment[:, None], dropout_p=dropout_p)
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


def triton_row_attention(qkv, segment_ids, dropout_p: float = 0.0):
    """Row attention with the segment-attention Triton kernel (kernels/segment_attention.py; rows of at most 128
    tokens): qkv (T, 3, H, D), the fused projection's output, -> (T, H, D); its gradient comes back as one
    (T, 3, H, D) tensor (no stacking of three). No dropout, as on the flex and flash varlen paths."""
    return segment_attention(qkv, segment_ids, backend="triton")
