"""Packed batches: fill rate, whole sentences, positions, rank sharding, determinism, document packing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mlmtrain.packing import Packer
from mlmtrain.prepare import load_split, read_meta
from mlmtrain.tokenizer import CLS_ID, PAD_ID, SEP_ID


def segments(batch):
    cu = batch.cu_seqlens.numpy()
    return [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:]) if b > a]


def sentences_of(batch):
    """The sentences of a batch's real segments, as tuples of token ids."""
    ids = batch.input_ids.numpy()
    out = []
    for a, b in segments(batch)[: batch.num_segments]:
        seg = ids[a:b]
        assert seg[0] == CLS_ID and seg[-1] == SEP_ID
        body, start = seg[1:], 0
        for end in np.flatnonzero(body == SEP_ID):
            out.append(tuple(body[start:end]))
            start = end + 1
    return out


def all_sentences(shard):
    return [tuple(shard.tokens[shard.offsets[i] : shard.offsets[i + 1]]) for i in range(len(shard.offsets) - 1)]


def test_fill_rate_at_64k_on_sample_corpus(data_dir):
    shard = load_split(data_dir, "train")
    packer = Packer(shard, 65536, read_meta(data_dir)["max_seq_len"], seed=0)
    it = packer.batches()
    fills = [next(it).num_real_tokens / 65536 for _ in range(6)]
    print("fill rates:", fills)
    assert min(fills) >= 0.99


def test_batches_hold_whole_sentences_with_restarting_positions(data_dir):
    shard = load_split(data_dir, "train")
    max_seq_len = read_meta(data_dir)["max_seq_len"]
    packer = Packer(shard, 2048, max_seq_len, seed=3)
    known = Counter(all_sentences(shard))
    it = packer.batches()
    for _ in range(5):
        b = next(it)
        assert b.input_ids.shape == (2048,) and b.cu_seqlens.shape == (packer.segment_capacity + 1,)
        pos, ids = b.position_ids.numpy(), b.input_ids.numpy()
        segs = segments(b)
        assert segs[0][0] == 0 and segs[-1][1] == 2048
        for a, e in segs:
            assert e - a <= max_seq_len
            np.testing.assert_array_equal(pos[a:e], np.arange(e - a))
        assert (ids[segs[b.num_segments][0] :] == PAD_ID).all() if b.num_segments < len(segs) else True
        assert b.num_real_tokens == segs[b.num_segments - 1][1]
        for sentence in sentences_of(b):
            assert known[sentence] > 0, "a packed sentence is not a whole sentence of the shard"


def test_one_epoch_covers_every_sentence_once_across_ranks(data_dir):
    """3 ranks over one epoch (loop=False): together they hold every sentence exactly once, and each rank
    gets only its own global batch indices."""
    shard = load_split(data_dir, "train")
    max_seq_len = read_meta(data_dir)["max_seq_len"]
    world, seen, indices = 3, Counter(), []
    for rank in range(world):
        for b in Packer(shard, 1024, max_seq_len, seed=7, rank=rank, world_size=world, loop=False).batches():
            assert b.index % world == rank
            indices.append(b.index)
            seen.update(sentences_of(b))
    assert seen == Counter(all_sentences(shard))
    assert sorted(indices) == list(range(len(indices)))


def test_order_is_deterministic_and_seeded(data_dir):
    shard = load_split(data_dir, "train")
    a = next(Packer(shard, 1024, 128, seed=1).batches()).input_ids
    b = next(Packer(shard, 1024, 128, seed=1).batches()).input_ids
    c = next(Packer(shard, 1024, 128, seed=2).batches()).input_ids
    assert a.equal(b) and not a.equal(c)


def test_resume_from_cursor_continues_the_stream(data_dir):
    shard = load_split(data_dir, "train")
    stream = Packer(shard, 1024, 128, seed=1).batches(batches_per_step=2)
    first = [next(stream) for _ in range(6)]
    restarted = Packer(shard, 1024, 128, seed=1).batches(first[3].cursor_after, start_index=4, batches_per_step=2)
    for expected in first[4:]:
        got = next(restarted)
        assert got.index == expected.index and got.input_ids.equal(expected.input_ids)


def test_document_packing_joins_neighbours_within_max_seq_len(data_dir):
    shard = load_split(data_dir, "train")
    packer = Packer(shard, 4096, 128, seed=0, pack="document")
    sentence_packer = Packer(shard, 4096, 128, seed=0, pack="sentence")
    assert len(packer.units) < len(sentence_packer.units)  # neighbours were joined
    b = next(packer.batches())
    known = Counter(all_sentences(shard))
    assert all(e - a <= 128 for a, e in segments(b))
    assert all(known[s] > 0 for s in sentences_of(b))


def test_unit_longer_than_budget_is_refused(data_dir):
    shard = load_split(data_dir, "train")
    with pytest.raises(ValueError, match="exceeds"):
        Packer(shard, 16, 128, seed=0)


def synthetic_shard(lengths, first_id=10):
    """Sentence i holds `lengths[i]` copies of id `first_id + i` (so a packed sentence says which it is); one
    document per sentence."""
    from mlmtrain.prepare import TokenShard

    tokens = np.concatenate([np.full(n, first_id + i, dtype=np.uint16) for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenShard(tokens, offsets, np.arange(len(lengths) + 1, dtype=np.int64))


def test_each_epoch_is_shuffled_anew_and_holds_every_sentence_once():
    """Over three epochs of a looping stream, every epoch holds each sentence exactly once (none is dropped where
    one epoch runs into the next), and the epochs are in different orders."""
    shard = synthetic_shard([5, 9, 3, 14, 7, 2, 11, 6, 8, 4, 10, 13])
    packer = Packer(shard, 64, 16, seed=5)
    order, stream, epochs = [], packer.batches(), 3
    while len(order) < epochs * shard.num_sentences:
        order += [s[0] - 10 for s in sentences_of(next(stream))]
    per_epoch = [order[e * shard.num_sentences : (e + 1) * shard.num_sentences] for e in range(epochs)]
    for e in per_epoch:
        assert sorted(e) == list(range(shard.num_sentences))
    assert len({tuple(e) for e in per_epoch}) == epochs


def test_segments_never_exceed_max_seq_len_in_a_partly_filled_batch():
    """The last batch of a non-looping pass (what validation packs) is mostly [PAD]: its tail is cut into
    segments of at most max_seq_len, each with positions from 0."""
    shard = synthetic_shard([5, 6])  # 15 real tokens of 256
    batch = next(Packer(shard, 256, 16, seed=0, loop=False, static_shapes=False).batches())
    cu, pos = batch.cu_seqlens.numpy(), batch.position_ids.numpy()
    assert cu[-1] == 256 and batch.num_real_tokens == 15
    assert max(np.diff(cu)) <= 16 and pos.max() < 16
    for a, e in segments(batch):
        np.testing.assert_array_equal(pos[a:e], np.arange(e - a))


def test_a_sentence_longer_than_max_seq_len_is_refused_even_when_the_batch_would_hold_it():
    shard = synthetic_shard([5, 30])  # 32 tokens with [CLS] and [SEP]: over 16, under 256
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        Packer(shard, 256, 16, seed=0)


def test_never_masked_ids_are_not_counted_as_maskable():
    """num_maskable_tokens (the FLOPs/MFU figures' masked count) leaves out the leading specials and any
    never-mask id past them."""
    from mlmtrain.tokenizer import SpecialTokens

    shard = synthetic_shard([4, 3, 5])  # ids 10 (x4), 11 (x3), 12 (x5)
    specials = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4, never_mask=((0, 4), (11, 11)))  # 11 never masked
    batch = next(Packer(shard, 64, 16, seed=0, loop=False, specials=specials).batches())
    assert batch.num_maskable_tokens == 4 + 5


def test_the_packers_maskable_count_is_what_the_masker_selects_at_mask_prob_one():
    """The packer counts maskable tokens on the host (for the FLOPs); the masker decides on the device from the
    table evaluate.masker builds: at mask_prob = 1 they must agree, leading specials and later never-mask ids
    alike (Google's layout: [unused*] rows past the first real ids)."""
    from mlmtrain.config import MaskSpec
    from mlmtrain.evaluate import masker
    from mlmtrain.kernels.mlm_mask import IGNORE_INDEX
    from mlmtrain.tokenizer import SpecialTokens

    shard = synthetic_shard([4, 3, 5, 7, 2])  # ids 10, 11, 12, 13, 14
    specials = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4, never_mask=((0, 4), (11, 11), (13, 14)))
    batch = next(Packer(shard, 64, 16, seed=0, loop=False, specials=specials).batches())
    mask = masker(specials, 20, MaskSpec(mask_prob=1.0), seed=0, max_masked=64, device=torch.device("cpu"))
    out = mask(batch.input_ids, step=0, backend="torch")
    assert batch.num_maskable_tokens == int((out.masked_labels != IGNORE_INDEX).sum()) == 4 + 5


def test_the_segment_capacity_is_a_quarter_over_the_mean_count_plus_the_pad_tails_and_the_bench_uses_it():
    """A batch holds at most ceil(1.25 x T / mean unit length) real segments (at least 1), plus one [PAD] tail per
    row of max_seq_len started (ceil(T / max_seq_len)); the attention bench's flat layout takes the same count."""
    from mlmtrain.benchmarks.bench_attention import flat_capacity
    from mlmtrain.packing import unit_capacity

    assert unit_capacity(1000, 10.0) == 125 and unit_capacity(1001, 10.0) == 126  # 125.125: rounded up
    assert unit_capacity(64, 1000.0) == 1
    packer = Packer(synthetic_shard([5, 9, 3, 14, 7, 2, 11, 6, 8, 4, 10, 13]), 100, 16, seed=0)
    assert packer.unit_lens.mean() == pytest.approx(9 + 2 / 3)  # [CLS] and [SEP] on each: 1.25 x 100 / 9.67 = 12.9
    assert (packer.max_units, packer.segment_capacity) == (13, 13 + 7)  # 100 / 16 = 6.25: 7 rows' tails
    assert flat_capacity(packer.unit_lens, 100, 16) == packer.segment_capacity
