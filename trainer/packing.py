"""Packed, unpadded batches: a fixed budget of `tokens_per_batch` tokens made of whole segments.

A segment is `[CLS] sentence [SEP]` (pack="sentence"), or consecutive sentences of one document joined as
`[CLS] s1 [SEP] s2 [SEP] ...` up to `max_seq_len` (pack="document"). A batch is flat:

    input_ids    [T] int32   segments back to back, the tail filled with [PAD]
    position_ids [T] int32   0, 1, 2, ... restarting in every segment
    cu_seqlens   [S+1] int32 segment starts; S is a fixed capacity, so unused entries repeat T (empty
                             segments) and every batch has the same shapes (torch.compile, CUDA graphs);
                             with static_shapes=False (eager CPU runs) S is just the segments used

The [PAD] tail is cut into segments of at most `max_seq_len`, so no segment is longer than the model's
positions or the attention kernel's `max_seqlen`. [PAD] is special, so it is never masked, and the
masked-only MLM head never reads it: padding costs encoder FLOPs on the tail only.

Order: the units (sentences or document chunks) of each epoch are shuffled by a permutation drawn from
(seed, epoch); batches are cut greedily from that stream and the stream runs on into the next epoch, so
no batch is short and no unit is split. Global micro-batch b goes to rank b % world_size. The cursor
(epoch, position of the next unit) is all a resume needs.

`RowPacker` (data.layout = "rows") lays the same stream's units into rows of `max_seq_len` instead: the batch
also carries `segment_ids` [R, L], for attention per row (see the class).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mlmtrain.config import check_rows_fit
from mlmtrain.errors import UserError
from mlmtrain.tokenizer import DEFAULT_SPECIALS, SpecialTokens


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int32
    position_ids: torch.Tensor  # [T] int32
    cu_seqlens: torch.Tensor  # [S+1] int32
    num_real_tokens: int  # tokens of real segments ([CLS]/[SEP] included, [PAD] tail not)
    num_segments: int  # real segments
    index: int  # global micro-batch index in the stream
    cursor_after: tuple[int, int]  # (epoch, position) of the next unit after this batch's optimizer step
    max_segment_len: int = 0  # longest segment (the padded tail included): a tighter max_seqlen for eager runs
    segment_ids: torch.Tensor | None = None  # [R, L] int32, layout "rows" only: the segment of every token
    segment_lengths: np.ndarray | None = None  # rows only: the real segments' lengths (not a prefix of cu_seqlens)
    num_maskable_tokens: int = 0  # real tokens the masker may select (no special id: [CLS], [SEP], [UNK], ...)

    def to(self, device: torch.device) -> PackedBatch:
        """The batch on `device`; from pinned memory the copy is asynchronous."""
        return self._with(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> PackedBatch:
        return self._with(torch.Tensor.pin_memory)

    def _with(self, fn) -> PackedBatch:
        tensors = (fn(self.input_ids), fn(self.position_ids), fn(self.cu_seqlens))
        segment_ids = None if self.segment_ids is None else fn(self.segment_ids)
        return dataclasses.replace(
            self, input_ids=tensors[0], position_ids=tensors[1], cu_seqlens=tensors[2], segment_ids=segment_ids
        )


def document_units(offsets: np.ndarray, doc_offsets: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Greedy chunks of consecutive sentences of one document whose `[CLS] s1 [SEP] s2 [SEP] ...` fits in
    max_seq_len. Returns int64 [U, 2] (first sentence, end sentence) pairs."""
    lengths = np.diff(offsets) + 1  # each sentence brings its [SEP]
    units = []
    for d in range(len(doc_offsets) - 1):  # one pass per document, done once per run
        start, used = int(doc_offsets[d]), 1  # [CLS]
        for s in range(int(doc_offsets[d]), int(doc_offsets[d + 1])):
            if used + lengths[s] > max_seq_len and s > start:
                units.append((start, s))
                start, used = s, 1
            used += int(lengths[s])
        if int(doc_offsets[d + 1]) > start:
            units.append((start, int(doc_offsets[d + 1])))
    return np.asarray(units, dtype=np.int64).reshape(-1, 2)


def unit_capacity(tokens_per_batch: int, mean_unit_len: float) -> int:
    """The real segments a batch may hold, fixed per run: 1.25x the mean count (a batch that would exceed it closes
    early, slightly less full). The varlen attention kernel launches blocks for every entry of cu_seqlens, empty
    ones included, so a loose bound costs real time (a worst-case T // shortest-unit bound made ~16k mostly-empty
    segments at 64k tokens)."""
    return max(1, math.ceil(1.25 * tokens_per_batch / mean_unit_len))


class Packer:
    """Cuts the shuffled unit stream of one split into fixed-size packed batches."""

    def __init__(
        self,
        shard,
        tokens_per_batch: int,
        max_seq_len: int,
        seed: int,
        pack: str = "sentence",
        rank: int = 0,
        world_size: int = 1,
        loop: bool = True,
        static_shapes: bool = True,
        specials: SpecialTokens = DEFAULT_SPECIALS,  # the ids of [PAD] [CLS] [SEP] in the shards' vocabulary
    ):
        self.tokens = shard.tokens  # memory-mapped flat ids
        self.specials = specials
        self.never_mask = np.asarray(specials.never_mask_ids(), dtype=np.int64)  # past the leading block of specials
        self.offsets = np.asarray(shard.offsets, dtype=np.int64)
        self.T, self.max_seq_len, self.seed = tokens_per_batch, max_seq_len, seed
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.static_shapes = static_shapes  # False: cu_seqlens holds only the used segments (eager CPU path)
        num_sentences = len(self.offsets) - 1
        if pack == "sentence":
            self.units = np.stack([np.arange(num_sentences), np.arange(1, num_sentences + 1)], 1)
        elif pack == "document":
            self.units = document_units(self.offsets, np.asarray(shard.doc_offsets), max_seq_len)
        else:
            raise ValueError(f"pack must be 'sentence' or 'document', got {pack!r}")
        sent_lens = np.diff(self.offsets)
        # unit length = [CLS] + sum(sentence + [SEP]) via a cumsum over sentences
        csum = np.concatenate([[0], np.cumsum(sent_lens + 1)])
        self.unit_lens = csum[self.units[:, 1]] - csum[self.units[:, 0]] + 1  # [U]
        if len(self.units) == 0:
            raise ValueError("the split holds no sentences")
        if self.unit_lens.max() > min(max_seq_len, tokens_per_batch):
            raise ValueError(
                f"a segment of {self.unit_lens.max()} tokens exceeds max_seq_len={max_seq_len} "
                f"or tokens_per_batch={tokens_per_batch}"
            )
        self.max_units = unit_capacity(tokens_per_batch, float(self.unit_lens.mean()))
        self.segment_capacity = self.max_units + -(-tokens_per_batch // max_seq_len)  # and the [PAD] tail's
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit permutation, exclusive cumsum of unit lengths in that order) for one epoch."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
            csum = np.concatenate([[0], np.cumsum(self.unit_lens[order])])
            self._epoch_cache = (epoch, order, csum)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _cut(self, cursor: tuple[int, int]) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Units of the batch starting at `cursor` (greedy: as many whole units as fit), and the next cursor."""
        epoch, pos = cursor
        parts, space, slots = [], self.T, self.max_units
        while True:
            order, csum = self.epoch_order(epoch)
            end = int(np.searchsorted(csum, csum[pos] + space, side="right")) - 1  # units pos..end-1 fit
            end = min(end, pos + slots)  # and the segment capacity
            if end > pos:
                parts.append(order[pos:end])
                space -= int(csum[end] - csum[pos])
                slots -= end - pos
            if end < len(order) or not self.loop or slots == 0:
                return parts, (epoch, end)
            epoch, pos = epoch + 1, 0  # epoch exhausted: the stream runs on into the next one

    def _build(self, unit_ids: np.ndarray, index: int, cursor_after: tuple[int, int]) -> PackedBatch:
        T = self.T
        units = self.units[unit_ids]  # [n, 2]
        n_sent = units[:, 1] - units[:, 0]  # sentences per unit
        sent = np.repeat(units[:, 0], n_sent) + (
            np.arange(n_sent.sum()) - np.repeat(np.cumsum(n_sent) - n_sent, n_sent)
        )
        sent_len = self.offsets[sent + 1] - self.offsets[sent]  # [N] tokens per sentence
        unit_len = self.unit_lens[unit_ids]
        cu = np.zeros(len(units) + 1, dtype=np.int64)
        np.cumsum(unit_len, out=cu[1:])
        used = int(cu[-1])
        # out position of each sentence's first token: its unit's start + [CLS] + earlier sentences (+[SEP]s)
        step = sent_len + 1
        excl = np.cumsum(step) - step  # exclusive cumsum over all sentences
        first_of_unit = np.repeat(np.cumsum(n_sent) - n_sent, n_sent)
        sent_out = np.repeat(cu[:-1], n_sent) + 1 + excl - excl[first_of_unit]
        ids = np.full(T, self.specials.pad, dtype=np.int32)
        ids[cu[:-1]] = self.specials.cls
        ids[sent_out + sent_len] = self.specials.sep
        total = int(sent_len.sum())
        within = np.arange(total) - np.repeat(np.cumsum(sent_len) - sent_len, sent_len)
        words = self.tokens[np.repeat(self.offsets[sent], sent_len) + within]  # the sentences' ids
        ids[np.repeat(sent_out, sent_len) + within] = words
        maskable = words >= self.specials.num_leading  # the masker's rule (kernels/mlm_mask.py), on the host
        if len(self.never_mask):
            maskable &= ~np.isin(words, self.never_mask)
        # [PAD] tail as segments of at most max_seq_len; then repeat T up to the fixed capacity
        tail = np.arange(used + self.max_seq_len, T, self.max_seq_len) if used < T else np.zeros(0, np.int64)
        starts = np.concatenate([cu, tail, [T] if used < T else []]).astype(np.int64)
        capacity = self.segment_capacity if self.static_shapes else len(starts) - 1
        cu_seqlens = np.full(capacity + 1, T, dtype=np.int32)
        cu_seqlens[: len(starts)] = starts
        seg_lens = np.diff(starts)
        positions = (np.arange(T) - np.repeat(starts[:-1], seg_lens)).astype(np.int32)
        return PackedBatch(
            torch.from_numpy(ids),
            torch.from_numpy(positions),
            torch.from_numpy(cu_seqlens),
            used,
            len(units),
            index,
            cursor_after,
            int(seg_lens.max()),
            num_maskable_tokens=int(np.count_nonzero(maskable)),
        )

    def batches(
        self, cursor: tuple[int, int] = (0, 0), start_index: int = 0, batches_per_step: int = 1
    ) -> Iterator[PackedBatch]:
        """This rank's batches from the global stream, starting at `cursor` (global batch `start_index`).
        The stream is cut one optimizer step (`batches_per_step` global micro-batches) at a time, so every
        batch carries the cursor at the end of its step: what a checkpoint after that step records. Every
        rank cuts the whole stream (a searchsorted per batch; RowPacker also places each batch in its rows, ~2
        best-fit passes) but builds only its own batches."""
        index = start_index
        while True:
            cuts = []
            for _ in range(batches_per_step):
                parts, cursor = self._cut(cursor)
                if not parts:
                    break
                cuts.append((index, parts))
                index += 1
            for i, parts in cuts:
                if i % self.world_size == self.rank:
                    yield self._build(np.concatenate(parts), i, cursor)
            if len(cuts) < batches_per_step:
                return  # loop=False and the split is exhausted


# ---------------------------------------------------------------------------------------------------- rows


def best_fit_decreasing(lengths: list[int], rows: int, row_len: int) -> np.ndarray:
    """The row each item goes to (-1: it did not fit), items taken longest first (ties in the given order),
    each into the row it fills most tightly. Rows are bucketed by free space, so a step costs a bisect over at
    most row_len + 1 distinct free-space values, not a scan of the rows; and items of one length are placed a
    row at a time: the tightest row that takes one takes as many as fit (what placing them one by one does, as
    the rows between it and its new free space were empty), so a step places ~row_len / length items, not one
    (~3x fewer steps on a 64k batch of sentences; `test_rows` checks it against the item-by-item rule)."""
    free = [[] for _ in range(row_len + 1)]  # free[c]: rows with c tokens left, last one taken first
    free[row_len] = list(range(rows - 1, -1, -1))  # so row 0 fills first
    spaces = [row_len] if rows else []  # sorted distinct c with free[c] non-empty
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in stream order
    sorted_lengths = lengths[order]
    run_starts = np.flatnonzero(np.diff(sorted_lengths, prepend=-1))  # where each run of one length begins
    runs = zip(sorted_lengths[run_starts].tolist(), run_starts.tolist(), [*run_starts[1:].tolist(), len(order)])
    placed = []  # (first sorted position, count, row): consecutive items of one run that went to one row
    bisect_left, insort = bisect.bisect_left, bisect.insort
    for need, first, end in runs:
        while first < end:
            k = bisect_left(spaces, need)
            if k == len(spaces):
                break  # no row takes this length: nor the rest of its run
            space = spaces[k]
            bucket = free[space]
            row = bucket.pop()
            if not bucket:
                del spaces[k]
            taken = space // need  # as many of the run as the row takes, in stream order
            taken = taken if taken < end - first else end - first
            placed.append((first, taken, row))
            first += taken
            left = space - taken * need
            if left:
                bucket = free[left]
                if not bucket:
                    insort(spaces, left)
                bucket.append(row)
    sorted_row = np.full(len(order), -1, dtype=np.int64)
    if placed:
        firsts, counts, placed_rows = np.array(placed, dtype=np.int64).T
        at = np.repeat(firsts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())  # sorted positions
        sorted_row[at] = np.repeat(placed_rows, counts)
    row_of = np.empty_like(sorted_row)
    row_of[order] = sorted_row
    return row_of


PLACED_CUTS = 256  # the placements RowPacker keeps: every global batch of a step, up to 256 (more are placed again)


class RowPacker(Packer):
    """Whole units bin-packed into R = tokens_per_batch / max_seq_len rows of max_seq_len tokens, for attention
    per row with a block-diagonal segment mask (data.layout = "rows").

    Each batch takes the longest prefix of the same shuffled unit stream that best-fit decreasing places
    whole into the rows (the greedy prefix, shortened by the units that did not fit until all do), so the
    cursor stays one position in the stream, as for Packer, and a resume continues it exactly. The tokens
    are Packer's own layout of those units, moved into their rows; each row's [PAD] tail is one more
    segment. The batch carries both views: `cu_seqlens` over the flat [R*L] tokens (model.attention = varlen
    runs on it) and `segment_ids` [R, L] (the segment of every token: every other rows path reads it)."""

    def __init__(self, shard, tokens_per_batch: int, max_seq_len: int, seed: int, pack: str = "sentence", **kwargs):
        check_rows_fit(tokens_per_batch, max_seq_len)
        super().__init__(shard, tokens_per_batch, max_seq_len, seed, pack, **kwargs)
        self.rows = tokens_per_batch // max_seq_len
        self.segment_capacity = self.max_units + self.rows  # units, and at most one [PAD] tail per row
        # (unit ids, their rows) of the latest cuts, a step's at least: _build places nothing again
        self.placed = collections.deque(maxlen=PLACED_CUTS)

    def _cut(self, cursor: tuple[int, int]) -> tuple[list[np.ndarray], tuple[int, int]]:
        parts, cursor_after = super()._cut(cursor)  # as many whole units as the token budget holds
        while parts:
            unit_ids = np.concatenate(parts)
            row_of = self._place(unit_ids)
            lengths = self.unit_lens[unit_ids]
            unplaced = int(lengths[row_of < 0].sum())
            if not unplaced:
                self.placed.append((unit_ids, row_of))
                break
            # give back at least as many tokens as did not fit, from the end of the stream: ~2 placements per
            # batch, 99.6% full at 64k tokens of sentences (dropping one unit per unplaced unit gave 98.7%)
            n = int(np.searchsorted(np.cumsum(lengths[::-1]), unplaced)) + 1
            parts, cursor_after = self._drop_last(parts, cursor_after, n)
        return parts, cursor_after

    def _place(self, unit_ids: np.ndarray) -> np.ndarray:
        return best_fit_decreasing(self.unit_lens[unit_ids].tolist(), self.rows, self.max_seq_len)

    def _drop_last(self, parts: list[np.ndarray], cursor: tuple[int, int], n: int):
        """`parts` without its last n units, and the stream position after what is left. Each part is one
        epoch's run of units; a part emptied from the start of its epoch moves the cursor to the end of the
        epoch before (which _cut reads as the start of the next)."""
        epoch, end = cursor
        parts = list(parts)
        while n:
            k = min(n, len(parts[-1]))
            parts[-1] = parts[-1][: len(parts[-1]) - k]
            end, n = end - k, n - k
            if not len(parts[-1]):
                parts.pop()
                if end == 0 and parts:
                    epoch, end = epoch - 1, len(self.units)
        return parts, (epoch, end)

    def _build(self, unit_ids: np.ndarray, index: int, cursor_after: tuple[int, int]) -> PackedBatch:
        R, L = self.rows, self.max_seq_len
        # the host runs this per batch: each batch is placed once, when it is cut (a step's batches are cut first)
        row_of = next((rows for ids, rows in self.placed if np.array_equal(ids, unit_ids)), None)
        if row_of is None:  # a step of more than PLACED_CUTS global batches
            row_of = self._place(unit_ids)
        by_row = np.lexsort((np.arange(len(unit_ids)), row_of))  # row by row, stream order within a row
        unit_ids, row_of = unit_ids[by_row], row_of[by_row]
        flat = super()._build(unit_ids, index, cursor_after)  # the units back to back, in Packer's token layout
        lengths = self.unit_lens[unit_ids]  # [n]
        flat_start = np.cumsum(lengths) - lengths  # [n] where each unit starts in `flat`
        row_first = np.searchsorted(row_of, row_of)  # [n] the first unit of the same row
        unit_start = row_of * L + flat_start - flat_start[row_first]  # [n] where it starts in the rows
        used = int(lengths.sum())
        dest = np.arange(used) + np.repeat(unit_start - flat_start, lengths)  # [used] flat position -> row position
        ids = np.full(R * L, self.specials.pad, dtype=np.int32)
        positions = np.zeros(R * L, dtype=np.int32)
        ids[dest] = flat.input_ids.numpy()[:used]
        positions[dest] = flat.position_ids.numpy()[:used]
        # segments: the units, and each row's [PAD] tail (its positions restart at 0, like Packer's tail)
        row_used = np.bincount(row_of, weights=lengths, minlength=R).astype(np.int64)  # [R]
        tail_rows = np.flatnonzero(row_used < L)
        tail_start = tail_rows * L + row_used[tail_rows]
        starts = np.sort(np.concatenate([unit_start, tail_start]))  # [S]
        seg_lens = np.diff(np.append(starts, R * L))  # [S]
        in_tail = np.repeat(np.isin(starts, tail_start), seg_lens)  # [R*L]
        positions[in_tail] = (np.arange(R * L) - np.repeat(starts, seg_lens))[in_tail]
        capacity = self.segment_capacity if self.static_shapes else len(starts)
        cu_seqlens = np.full(capacity + 1, R * L, dtype=np.int32)
        cu_seqlens[: len(starts)] = starts
        segment_ids = np.repeat(np.arange(len(starts), dtype=np.int32), seg_lens).reshape(R, L)
        return dataclasses.replace(
            flat,
            input_ids=torch.from_numpy(ids),
            position_ids=torch.from_numpy(positions),
            cu_seqlens=torch.from_numpy(cu_seqlens),
            max_segment_len=int(seg_lens.max()),
            segment_ids=torch.from_numpy(segment_ids),
            segment_lengths=lengths,
        )


def check_ids(batch: PackedBatch, vocab_size: int, data_dir) -> PackedBatch:
    """Every id of a batch inside the vocabulary, before a device sees it (loading a split checks sampled blocks
    only: an id beyond them would be an index error, or a device-side assert, mid-run)."""
    biggest = int(batch.input_ids.max())
    if biggest >= vocab_size:
        raise UserError(
            f"the shards in {data_dir} hold token id {biggest}, outside the vocabulary of {vocab_size}: they are "
            "damaged; run `mlmtrain prepare` again"
        )
    return batch


@dataclass(frozen=True)
class BatchStream:
    """This rank's training batches from a shard folder, each checked: what the prefetch thread iterates, or a
    pickled copy of it in the packer process (data.packer = process). Every batch's ids are checked against the
    vocabulary on the way (the check at start reads only a sample of the shards), so no id out of range reaches
    the GPU as an opaque device-side assert."""

    data_dir: str
    rows: bool  # RowPacker (data.layout = rows), else Packer
    tokens_per_batch: int
    max_seq_len: int
    seed: int
    pack: str
    rank: int
    world_size: int
    static_shapes: bool
    specials: SpecialTokens
    cursor: tuple[int, int]  # where the stream starts (Packer.batches)
    start_index: int  # the global micro-batch index there
    batches_per_step: int
    vocab_size: int

    def __iter__(self) -> Iterator[PackedBatch]:
        from mlmtrain.prepare import load_split

        shard = load_split(self.data_dir, "train", check=False)
        packer = (RowPacker if self.rows else Packer)(
            shard, self.tokens_per_batch, self.max_seq_len, self.seed, self.pack, rank=self.rank,
            world_size=self.world_size, static_shapes=self.static_shapes, specials=self.specials,
        )  # fmt: skip
        for batch in packer.batches(self.cursor, self.start_index, self.batches_per_step):
            yield check_ids(batch, self.vocab_size, self.data_dir)

    def batch_bytes(self) -> int:
        """A bound on one batch's array bytes: ids, positions, segment ids (T int32 each), cu_seqlens (at most
        T + 1 int32) and segment lengths (at most T / 2 int64), each rounded up to 64 bytes."""
        return 20 * self.tokens_per_batch + 5 * 64
