"""BERT masked-language-model masking in one pass on the device: a fused Triton kernel and its pure-torch reference.

What it computes, for flat token ids [T] (a packed batch):
  1. selection: each maskable token is selected with probability `mask_prob` (BERT: 15%). Special ids
     (< num_special, or True in `never_mask`), padding (a special) and ids outside [0, vocab_size) never are.
     Whole-word mode: a token is selected iff the draw of its word's first piece says so, so every piece
     of a word (a start piece and its `##` continuations) goes together.
  2. replacement, per selected token (BERT's 80/10/10): [MASK] with probability mask_frac, a random id with
     probability random_frac (uniform over the maskable ids), else left unchanged.
  3. outputs: masked ids [T]; and for the model's masked-only head the selected positions in ascending order,
     compacted into a fixed [max_masked] buffer with their labels (padded slots: position 0, label -100). No
     dense [T] labels: nothing reads them (the head and the loss see only the compacted slots).

Randomness is counter based: Philox4x32-10 (the generator of Triton's tl.randint and of curand), key =
seed (64 bit), counter = (group (64 bit, stream id in its top bit), step (64 bit)), where a group is a run
of consecutive global token indices g = offset + i. Two streams:
  - selection: group g // 4, word g % 4 of the call: selected iff (word >> 8) < round(mask_prob * 2^24).
  - replacement: group g // 2, words (2 (g % 2), 2 (g % 2) + 1) = (choice, r): [MASK] iff
    (choice >> 8) < round(mask_frac * 2^24), a random id iff below round((mask_frac + random_frac) * 2^24);
    random id = allowed[(r * n_allowed) >> 32] (multiply-shift: bias below n_allowed / 2^32).
At step 0 the selection stream is exactly tl.randint4x(seed, g // 4). Whole-word mode uses the selection
word of the word's first piece (found inside this call, see below) and the replacement words of the piece
itself, so a batch of single-piece words masks exactly as token-level masking does. Nothing is stateful: the
same (ids, seed, step, offset) gives the same bits on any rank, after any resume, on the kernel and on the
reference; there is no RNG state to checkpoint and no host-device sync (all scalars are python ints).

Kernels, deterministic compaction (count -> cumsum -> apply):
  - `_mask_count_kernel` decides the selection once (Philox, whole-word scan) and writes it as a bitmask
    (32 tokens per int32) plus a count per block; a torch cumsum over the counts gives each block its base.
  - `_mask_apply_kernel` reads ids and bits, ranks each selection as base + popcount of the earlier bits,
    writes ids, positions and masked labels (dense, vectorised, no random draws), then, over its
    own compacted slots only, draws the replacement and overwrites the ids that change; last, it pads its
    share of the unused slots (position 0, label -100).
  Selections whose slot would be >= max_masked are de-selected (id left as is), so the three outputs always
  agree. Blocks start at global indices divisible by 4 (the first one SHIFT = offset % 4
  lanes early), so each block computes whole Philox groups.

Whole-word: word start of token i = the last j <= i (within this call) whose id starts a word
(`word_start_table`); if there is none, index 0 of the call. Inside a block this is a scan; for the tokens
before a block's first start, the kernel walks back through the preceding ids, LOOKBACK tokens at a time,
until it meets a start (one short step for real text; a run of k continuation pieces costs k/LOOKBACK loads).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from mlmtrain.errors import UserError
from mlmtrain.kernels import num_sms, tl, triton, use_triton
from mlmtrain.kernels.philox import split64, stream_words

IGNORE_INDEX = -100
MAX_TOKENS = 1 << 30  # int32 in-kernel indices with room to spare

# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    from mlmtrain.kernels.philox import as_u32, philox_words  # Triton functions: defined where Triton is

    @triton.jit
    def _last_start(a, b):
        """Scan combine: the rightmost entry that is a word start (>= 0)."""
        return tl.where(b >= 0, b, a)

    @triton.jit
    def _popcount(x):
        """Set bits of each int32 (SWAR; Triton has no portable popcount)."""
        x = x.to(tl.uint32, bitcast=True)  # no-op for uint32
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24).to(tl.int32)

    # Per-call keys vary every step: never specialise on their values (1, multiples of 16), or each new step
    # value could compile a new kernel. Shape-like scalars (n_tokens, max_masked) stay specialised.
    _KEYS = ["vocab_size", "num_special", "q4_lo", "q4_hi", "step_lo", "step_hi", "seed_lo", "seed_hi", "select_thr"]

    @triton.jit(do_not_specialize=_KEYS)
    def _mask_count_kernel(
        ids_ptr,         # (T,) int32 | int64 token ids
        word_start_ptr,  # (V,) uint8: 1 where an id starts a word (whole-word mode only)
        never_mask_ptr,  # (V,) uint8: 1 where an id is never selected (HAS_NEVER_MASK only)
        counts_ptr,      # (n_blocks + 1,) int32 out: selections per block, after a leading 0
        bits_ptr,        # (n_blocks * BLOCK / 32,) int32 out: the selection bitmask
        n_tokens, vocab_size, num_special,
        q4_lo, q4_hi, step_lo, step_hi, seed_lo, seed_hi, select_thr,
        BLOCK: tl.constexpr, SHIFT: tl.constexpr, LOOKBACK: tl.constexpr,
        WHOLE_WORD: tl.constexpr, HAS_NEVER_MASK: tl.constexpr,
    ):  # fmt: skip
        """Decide the selection once: bits[pid] = the block's selections, 32 per int32 word (token 32w + b is
        bit b of word w), and counts[pid + 1] = how many (counts[0] = 0, so a cumsum gives exclusive bases)."""
        pid = tl.program_id(0)
        q4_lo, q4_hi = as_u32(q4_lo), as_u32(q4_hi)
        step_lo, step_hi, seed_lo, seed_hi = as_u32(step_lo), as_u32(step_hi), as_u32(seed_lo), as_u32(seed_hi)
        # Blocks are aligned to the global index (offset + i): block pid holds aligned positions
        # [pid * BLOCK, (pid + 1) * BLOCK), i.e. call-local indices shifted by SHIFT = offset % 4.
        idx = pid * BLOCK - SHIFT + tl.arange(0, BLOCK)  # (BLOCK,) int32 call-local token index
        in_range = (idx >= 0) & (idx < n_tokens)
        ids = tl.load(ids_ptr + idx, mask=in_range, other=0)
        in_vocab = in_range & (ids >= 0) & (ids < vocab_size)
        maskable = in_vocab & (ids >= num_special)
        if HAS_NEVER_MASK:
            maskable = maskable & (tl.load(never_mask_ptr + ids, mask=maskable, other=1) == 0)
        # Selection stream: one Philox call per 4 consecutive global indices, one 32-bit word each.
        k4 = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # (BLOCK/4,) group index past q4
        w0, w1, w2, w3 = philox_words(q4_lo, q4_hi, k4, 0, step_lo, step_hi, seed_lo, seed_hi)
        lane = tl.arange(0, 4)[None, :]  # (1, 4)
        words = tl.where(
            lane == 0, w0[:, None], tl.where(lane == 1, w1[:, None], tl.where(lane == 2, w2[:, None], w3[:, None]))
        )  # (BLOCK/4, 4)
        words = tl.reshape(words, (BLOCK,))  # (BLOCK,) token 4g + l gets word l of group g
        own = ((words >> 8).to(tl.int32) < select_thr).to(tl.int32)  # (BLOCK,) this token's own selection bit
        if WHOLE_WORD:
            starts = (tl.load(word_start_ptr + ids, mask=in_vocab, other=1) != 0) & (idx >= 0)  # ids outside
            # the vocabulary start words, like specials; the SHIFT lanes before the call start none
            word = tl.associative_scan(tl.where(starts, own, -1), 0, _last_start)  # (BLOCK,) -1 before 1st start
            # Tokens before this block's first start continue a word begun earlier: walk back to its start.
            found = tl.where(tl.min(word) < 0, -1, 0)  # 0 = nothing to find (and index 0 is the fallback)
            end = pid * BLOCK - SHIFT
            while (found < 0) & (end > 0):
                j = end - LOOKBACK + tl.arange(0, LOOKBACK)  # (LOOKBACK,) the window just before `end`
                ok = j >= 0
                prev = tl.load(ids_ptr + j, mask=ok, other=0)
                prev_in_vocab = ok & (prev >= 0) & (prev < vocab_size)
                prev_start = tl.load(word_start_ptr + prev, mask=prev_in_vocab, other=1) != 0
                found = tl.max(tl.where(ok & prev_start, j, -1))
                end = end - LOOKBACK
            at = tl.maximum(found, 0) + SHIFT  # aligned position of the word's first piece
            c0, c1, c2, c3 = philox_words(q4_lo, q4_hi, at // 4, 0, step_lo, step_hi, seed_lo, seed_hi)
            carry_word = tl.where(at % 4 == 0, c0, tl.where(at % 4 == 1, c1, tl.where(at % 4 == 2, c2, c3)))
            carry = ((carry_word >> 8).to(tl.int32) < select_thr).to(tl.int32)
            selected = maskable & (tl.where(word >= 0, word, carry) == 1)
        else:
            selected = maskable & (own == 1)
        sel = selected.to(tl.int32)
        bits = tl.reshape(sel, (BLOCK // 32, 32)) << tl.arange(0, 32)[None, :]  # (BLOCK/32, 32) disjoint bits
        tl.store(bits_ptr + pid * (BLOCK // 32) + tl.arange(0, BLOCK // 32), tl.sum(bits, axis=1))
        tl.store(counts_ptr + pid + 1, tl.sum(sel, axis=0))
        if pid == 0:
            tl.store(counts_ptr, 0)

    _APPLY_KEYS = ["vocab_size", "num_special", "mask_id", "q2_lo", "q2_hi", "step_lo", "step_hi", "seed_lo", "seed_hi"]

    @triton.jit(do_not_specialize=[*_APPLY_KEYS, "mask_thr", "random_thr"])
    def _mask_apply_kernel(
        ids_ptr,            # (T,) token ids
        bits_ptr,           # (n_blocks * BLOCK / 32,) int32: the count kernel's selection bitmask
        base_ptr,           # (n_blocks + 1,) int32: exclusive cumsum of the counts; base_ptr[n_blocks] = total
        allowed_ptr,        # (V,) int64: ids a random replacement may take, first (HAS_NEVER_MASK only)
        n_allowed_ptr,      # (1,) int64: how many of them (HAS_NEVER_MASK only)
        out_ids_ptr,        # (T,) out: masked ids, the input's dtype
        positions_ptr,      # (max_masked,) int64 out: selected positions, ascending, padded with 0
        masked_labels_ptr,  # (max_masked,) int64 out: their labels, padded with -100
        n_tokens, n_blocks, max_masked, slots_per_block, vocab_size, num_special, mask_id,
        q2_lo, q2_hi, step_lo, step_hi, seed_lo, seed_hi, mask_thr, random_thr,
        BLOCK: tl.constexpr, SHIFT: tl.constexpr, HAS_NEVER_MASK: tl.constexpr,
    ):  # fmt: skip
        """Write the ids and scatter the selections to base + in-block rank (dense, no random draws);
        then, over this block's compacted slots only, draw 80/10/10 and overwrite the ids that change; last,
        fill this block's share of the unused slots of the compacted buffers."""
        pid = tl.program_id(0)
        idx = pid * BLOCK - SHIFT + tl.arange(0, BLOCK)  # (BLOCK,) call-local index, as in the count kernel
        in_range = (idx >= 0) & (idx < n_tokens)
        ids = tl.load(ids_ptr + idx, mask=in_range, other=0)
        words = tl.load(bits_ptr + pid * (BLOCK // 32) + tl.arange(0, BLOCK // 32))  # (BLOCK/32,)
        bit = tl.arange(0, 32)[None, :]  # (1, 32)
        sel = (words[:, None] >> bit) & 1  # (BLOCK/32, 32) 0/1
        word_count = _popcount(words)
        before = tl.cumsum(word_count, axis=0) - word_count  # (BLOCK/32,) selections in earlier words
        lower = (tl.full((1, 32), 1, tl.uint32) << bit.to(tl.uint32)) - 1  # (1, 32) bits below bit b
        rank = before[:, None] + _popcount(words.to(tl.uint32, bitcast=True)[:, None] & lower)  # (BLOCK/32, 32)
        sel = tl.reshape(sel, (BLOCK,))  # (BLOCK,)
        base = tl.load(base_ptr + pid)
        slot = base + tl.reshape(rank, (BLOCK,))  # (BLOCK,) exclusive rank in the batch
        keep = (sel == 1) & (slot < max_masked)  # past the bound: de-selected, outputs stay consistent
        tl.store(out_ids_ptr + idx, ids, mask=in_range)
        tl.store(positions_ptr + slot, idx.to(tl.int64), mask=keep)
        tl.store(masked_labels_ptr + slot, ids.to(tl.int64), mask=keep)
        tl.debug_barrier()  # this block's positions and ids are now visible to all its threads

        # Replacement, on the ~15% kept tokens only (read back compacted): the Philox pair of global index g is
        # g // 2 (stream tag in the top bit); (choice, random) are its words (0, 1) for even g, (2, 3) for odd.
        n_kept = tl.maximum(tl.minimum(tl.load(base_ptr + pid + 1), max_masked) - base, 0)
        q2_lo, q2_hi = as_u32(q2_lo), as_u32(q2_hi)
        step_lo, step_hi = as_u32(step_lo), as_u32(step_hi)
        seed_lo, seed_hi = as_u32(seed_lo), as_u32(seed_hi)
        for c in range(0, n_kept, BLOCK // 4):
            k = c + tl.arange(0, BLOCK // 4)  # (BLOCK/4,) rank within the block's kept tokens
            live = k < n_kept
            pos = tl.load(positions_ptr + base + k, mask=live, other=0).to(tl.int32)  # (BLOCK/4,) call-local index
            aligned = pos + SHIFT  # position from the block-aligned start of the call
            w0, w1, w2, w3 = philox_words(q2_lo, q2_hi, aligned // 2, 0x80000000, step_lo, step_hi, seed_lo, seed_hi)
            odd = (aligned % 2) == 1
            choice = (tl.where(odd, w2, w0) >> 8).to(tl.int32)
            r = tl.where(odd, w3, w1)
            if HAS_NEVER_MASK:
                n_allowed = tl.load(n_allowed_ptr).to(tl.uint32)
                random_ids = tl.load(allowed_ptr + tl.umulhi(r, n_allowed), mask=live, other=0).to(tl.int32)
            else:
                random_ids = num_special + tl.umulhi(r, (vocab_size - num_special).to(tl.uint32)).to(tl.int32)
            new = tl.where(choice < mask_thr, mask_id, random_ids)
            tl.store(out_ids_ptr + pos, new.to(out_ids_ptr.dtype.element_ty), mask=live & (choice < random_thr))

        # Unused slots [min(total, max_masked), max_masked): position 0 (a valid index), label -100.
        used = tl.minimum(tl.load(base_ptr + n_blocks), max_masked)
        lo = pid * slots_per_block
        hi = tl.minimum(lo + slots_per_block, max_masked)
        for s0 in range(lo, hi, BLOCK):
            s = s0 + tl.arange(0, BLOCK)  # (BLOCK,) slot index
            fill = (s < hi) & (s >= used)
            tl.store(positions_ptr + s, tl.zeros((BLOCK,), tl.int64), mask=fill)
            tl.store(masked_labels_ptr + s, tl.full((BLOCK,), -100, tl.int64), mask=fill)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------
class MaskOutput(NamedTuple):
    masked_ids: torch.Tensor  # (T,) input dtype
    masked_positions: torch.Tensor  # (max_masked,) int64, ascending, padded with 0
    masked_labels: torch.Tensor  # (max_masked,) int64, IGNORE_INDEX in padded slots


def _thresholds(mask_prob: float, mask_frac: float, random_frac: float) -> tuple[int, int, int]:
    """24-bit integer thresholds the kernel and the reference compare the top 24 bits of a Philox word to."""
    one = 1 << 24
    return round(mask_prob * one), round(mask_frac * one), round((mask_frac + random_frac) * one)


def _block_size(num_tokens: int, device: torch.device) -> int:
    """Wide blocks for bandwidth, but enough of them to fill the GPU (~4 per SM) at small batches."""
    if device.type != "cuda":
        return 1024  # the interpreter: fewer, wider programs are faster
    return min(4096, max(1024, triton.next_power_of_2(max(1, num_tokens // (4 * num_sms(device))))))


def mlm_mask_triton(
    ids, *, vocab_size, mask_id, num_special, never_mask, mask_prob, mask_frac, random_frac, seed,
    step, offset, max_masked, word_start, block_size=None, lookback=64,
) -> MaskOutput:  # fmt: skip
    """Launch count kernel -> cumsum -> apply kernel. Arguments already validated by `mlm_mask`."""
    T = ids.numel()
    BLOCK = block_size or _block_size(T, ids.device)
    shift = offset % 4  # blocks start at global indices divisible by 4 (whole Philox groups)
    n_blocks = triton.cdiv(T + shift, BLOCK)
    select_thr, mask_thr, random_thr = _thresholds(mask_prob, mask_frac, random_frac)
    aligned = offset - shift
    q4, q2 = split64(aligned >> 2), split64(aligned >> 1)  # first selection group, first replacement pair
    step_seed = (*split64(step), *split64(seed))
    whole_word, has_never = word_start is not None, never_mask is not None
    word_start_u8 = word_start.view(torch.uint8) if whole_word else ids  # unused pointer when not whole-word
    if has_never:
        never_u8, allowed, n_allowed = _allowed_ids(never_mask, num_special)
    else:
        never_u8 = allowed = n_allowed = ids
    num_warps = 4 if BLOCK <= 1024 else 8

    counts = torch.empty(n_blocks + 1, dtype=torch.int32, device=ids.device)
    bits = torch.empty(n_blocks * (BLOCK // 32), dtype=torch.int32, device=ids.device)
    _mask_count_kernel[(n_blocks,)](
        ids, word_start_u8, never_u8, counts, bits, T, vocab_size, num_special, *q4, *step_seed, select_thr,
        BLOCK=BLOCK, SHIFT=shift, LOOKBACK=lookback, WHOLE_WORD=whole_word, HAS_NEVER_MASK=has_never,
        num_warps=num_warps,
    )  # fmt: skip
    base = torch.cumsum(counts, 0, dtype=torch.int32)  # (n_blocks + 1,) exclusive block bases, then the total

    out_ids = torch.empty_like(ids)
    positions = torch.empty(max_masked, dtype=torch.int64, device=ids.device)
    masked_labels = torch.empty(max_masked, dtype=torch.int64, device=ids.device)
    _mask_apply_kernel[(n_blocks,)](
        ids, bits, base, allowed, n_allowed, out_ids, positions, masked_labels,
        T, n_blocks, max_masked, triton.cdiv(max_masked, n_blocks), vocab_size, num_special, mask_id,
        *q2, *step_seed, mask_thr, random_thr,
        BLOCK=BLOCK, SHIFT=shift, HAS_NEVER_MASK=has_never, num_warps=num_warps,
    )  # fmt: skip
    return MaskOutput(out_ids, positions, masked_labels)


_ALLOWED = WeakIdKeyDictionary()  # never_mask -> ((its version, num_special), _allowed_ids' tables)


def _allowed_ids(never_mask: torch.Tensor, num_special: int):
    """(blocked table as uint8 [V], maskable ids ascending then the blocked ones [V], count of maskable [1]).
    Device-side only (a stable argsort instead of nonzero): no sync, static shapes. Built once per table (a run
    passes the same one at every call) and kept with it; an in-place change to the table builds them again."""
    try:
        key = (never_mask._version, num_special)
    except RuntimeError:  # an inference-mode tensor keeps no version: its tables are built at every call
        key = None
    cached = _ALLOWED.get(never_mask) if key else None
    if cached is not None and cached[0] == key:
        return cached[1]
    blocked = never_mask.clone()
    blocked[:num_special] = True
    blocked_u8 = blocked.view(torch.uint8)
    allowed = torch.argsort(blocked_u8, stable=True)  # (V,) int64: ids with blocked == 0 first, ascending
    n_allowed = (~blocked).sum(dtype=torch.int64).reshape(1)
    if key:
        _ALLOWED[never_mask] = (key, (blocked_u8, allowed, n_allowed))
    return blocked_u8, allowed, n_allowed


# ---------------------------------------------------------------------------------------------------
# Wrapper
# ---------------------------------------------------------------------------------------------------
def max_masked_bound(num_tokens: int, mask_prob: float = 0.15, pieces_per_word: float = 1.0) -> int:
    """Static size of the compacted masked buffers for a batch of `num_tokens`: the mean T*p plus 8 standard
    deviations of Binomial(T, p), rounded up to a multiple of 128. The number selected exceeds it with
    probability < 1e-15 per batch (selections past it are de-selected, never out of bounds). Whole-word
    masking selects words, which widens the spread: pass the batch's E[k^2]/E[k] over word lengths k in
    pieces as `pieces_per_word` (E[k^2]/E[k] of word lengths k: ~1.9 on the Korean sample) to keep the same
    margin."""
    if num_tokens < 0 or not 0.0 <= mask_prob <= 1.0 or pieces_per_word < 1.0:
        raise UserError(
            f"max_masked_bound needs num_tokens >= 0, 0 <= mask_prob <= 1 and pieces_per_word >= 1, "
            f"got {num_tokens}, {mask_prob}, {pieces_per_word}."
        )
    mean = num_tokens * mask_prob
    spread = 8.0 * math.sqrt(num_tokens * mask_prob * (1.0 - mask_prob) * pieces_per_word)
    return -(-math.ceil(mean + spread) // 128) * 128


def word_start_table(vocab: list[str], prefix: str = "##") -> torch.Tensor:
    """(V,) bool: True where the id begins a word, i.e. is not a `##` continuation piece (specials included)."""
    return torch.tensor([not piece.startswith(prefix) for piece in vocab], dtype=torch.bool)


def pieces_per_word(tokens, vocab: list[str], sample: int = 1 << 20) -> float:
    """E[k^2]/E[k] of word lengths k (in WordPiece pieces) over a prefix of a token shard: `max_masked_bound`'s
    `pieces_per_word` for whole-word masking."""
    import numpy as np

    is_start = word_start_table(vocab).numpy()[np.asarray(tokens[:sample], dtype=np.int64)]
    k = np.diff(np.flatnonzero(is_start)).astype(np.float64)
    return max(1.0, float((k * k).mean() / k.mean())) if k.size else 1.0


def _check_table(name: str, table, ids: torch.Tensor, vocab_size: int) -> None:
    if table is None:
        return
    if not isinstance(table, torch.Tensor) or table.dtype != torch.bool or table.shape != (vocab_size,):
        got = f"{tuple(table.shape)} {table.dtype}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise UserError(f"{name} must be a bool tensor of shape ({vocab_size},) (one entry per id), got {got}.")
    if table.device != ids.device:
        raise UserError(f"{name} is on {table.device} but input_ids are on {ids.device}; move it with .to().")


def mlm_mask(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    num_special: int = 5,
    never_mask: torch.Tensor | None = None,
    mask_prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    seed: int,
    step: int,
    offset: int = 0,
    max_masked: int | None = None,
    word_start: torch.Tensor | None = None,
    backend: str = "auto",
) -> MaskOutput:
    """Mask a flat batch of token ids [T] for MLM (see the module docstring for the exact function).

    never_mask: optional (V,) bool, True for ids never selected (in addition to ids < num_special); random
    replacements are then drawn from the other ids. word_start: optional (V,) bool from `word_start_table`;
    given, masking is whole-word. seed, step, offset: python ints keying the draws (token i uses counter
    offset + i). max_masked: size of the compacted buffers, default `max_masked_bound(T, mask_prob)`.
    backend: "triton", "torch" (the reference), or "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch).
    """
    ids = input_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise UserError(f"input_ids must be a 1-D int32 or int64 tensor (a flat packed batch), got {got}.")
    if ids.numel() >= MAX_TOKENS:
        raise UserError(f"input_ids has {ids.numel()} tokens; one call masks at most {MAX_TOKENS - 1}.")
    if not 0 <= num_special < vocab_size:
        raise UserError(f"need 0 <= num_special < vocab_size, got num_special={num_special}, vocab_size={vocab_size}.")
    if not 0 <= mask_id < vocab_size:
        raise UserError(f"mask_id {mask_id} is outside the vocabulary [0, {vocab_size}).")
    if not 0.0 <= mask_prob <= 1.0:
        raise UserError(f"mask_prob must be in [0, 1], got {mask_prob}.")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0 + 1e-9:
        raise UserError(f"mask_frac and random_frac must be >= 0 with a sum <= 1, got {mask_frac} and {random_frac}.")
    for name, value in (("seed", seed), ("step", step), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(
                f"{name} must be a python int (no tensors: reading one would sync), got {type(value).__name__}."
            )
    if not 0 <= step < 1 << 64 or not 0 <= offset <= (1 << 63) - ids.numel():
        raise UserError(f"step must be in [0, 2^64) and offset in [0, 2^63 - T), got step={step}, offset={offset}.")
    _check_table("never_mask", never_mask, ids, vocab_size)
    _check_table("word_start", word_start, ids, vocab_size)
    max_masked = max_masked_bound(ids.numel(), mask_prob) if max_masked is None else max_masked
    if isinstance(max_masked, bool) or not isinstance(max_masked, int) or max_masked < 0:
        raise UserError(f"max_masked must be an int >= 0, got {max_masked!r}.")
    triton_call = use_triton(backend, ids.device, UserError)
    args = dict(vocab_size=vocab_size, mask_id=mask_id, num_special=num_special, never_mask=never_mask,
                mask_prob=mask_prob, mask_frac=mask_frac, random_frac=random_frac, seed=seed & ((1 << 64) - 1),
                step=step, offset=offset, max_masked=max_masked, word_start=word_start)  # fmt: skip
    if triton_call and ids.numel() > 0:
        if ids.is_cuda:
            with torch.cuda.device(ids.device):  # Triton launches on the current device
                return mlm_mask_triton(ids.contiguous(), **args)
        return mlm_mask_triton(ids.contiguous(), **args)
    return mlm_mask_reference(ids, **args)


# ---------------------------------------------------------------------------------------------------
# Pure-torch reference (also the fallback where Triton cannot run; no host sync, so it is CUDA-safe too)
# ---------------------------------------------------------------------------------------------------
def mlm_mask_reference(
    ids, *, vocab_size, mask_id, num_special, never_mask, mask_prob, mask_frac, random_frac, seed,
    step, offset, max_masked, word_start,
) -> MaskOutput:  # fmt: skip
    """The same function as the kernels, in plain torch ops on whole tensors.

    Traffic (int64 temporaries, ~200 elementwise passes for Philox): read T ids, write T masked ids + max_masked
    positions + max_masked labels; the kernel moves only those (plus one re-read of the ids)."""
    T, device = ids.numel(), ids.device
    select_thr, mask_thr, random_thr = _thresholds(mask_prob, mask_frac, random_frac)
    idx = torch.arange(T, device=device, dtype=torch.int64)  # (T,) call-local index
    select_word = stream_words(offset, T, 4, 0, step, seed, device)  # (T,) one word per token
    choice, random_word = stream_words(offset, T, 2, 1 << 31, step, seed, device).unbind(1)  # (T,) each

    ids64 = ids.long()
    in_vocab = (ids64 >= 0) & (ids64 < vocab_size)
    safe_ids = torch.where(in_vocab, ids64, 0)  # (T,) valid table index everywhere
    maskable = in_vocab & (ids64 >= num_special)
    if never_mask is not None:
        blocked_u8, allowed, n_allowed = _allowed_ids(never_mask, num_special)
        maskable &= blocked_u8[safe_ids] == 0
    own = (select_word >> 8) < select_thr  # (T,) each token's own selection draw
    if word_start is None:
        selected = maskable & own
    else:
        starts = word_start[safe_ids] | ~in_vocab  # ids outside the vocab count as word starts, like specials
        last_start = torch.cummax(torch.where(starts, idx, -1), 0).values  # (T,) -1 before the first start
        selected = maskable & own[last_start.clamp(min=0)]

    rank = torch.cumsum(selected, 0) - 1  # (T,) slot of each selected token
    keep = selected & (rank < max_masked)
    choice = choice >> 8
    if never_mask is not None:
        random_ids = allowed[(random_word * n_allowed) >> 32]  # n_allowed < 2^31: the product fits int64
    else:
        random_ids = num_special + ((random_word * (vocab_size - num_special)) >> 32)
    out = torch.where(keep & (choice < mask_thr), mask_id, torch.where(keep & (choice < random_thr), random_ids, ids64))

    # Compaction by scatter into one spare slot (no nonzero(): that would sync on CUDA).
    slot = torch.where(keep, rank, max_masked)
    positions = torch.zeros(max_masked + 1, dtype=torch.int64, device=device).scatter_(0, slot, idx)
    masked_labels = torch.full((max_masked + 1,), IGNORE_INDEX, dtype=torch.int64, device=device)
    masked_labels.scatter_(0, slot, ids64)
    return MaskOutput(out.to(ids.dtype), positions[:max_masked], masked_labels[:max_masked])
