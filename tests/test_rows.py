"""data.layout = "rows": the row packer (best-fit decreasing into rows of max_seq_len, whole units, a cursor in
the same stream as Packer's) and row attention (FlexAttention and its dense-mask SDPA reference) against the
packed SDPA reference on the very same segments: odd lengths, one-token segments, full rows, an empty tail."""

from __future__ import annotations

import itertools
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import CPU_RUNS_TRITON, requires_cpu_triton, requires_cuda
from test_model import ATOL, odd_config, random_biases, report
from test_packing import all_sentences, sentences_of

from mlmtrain.attention import (
    flex_row_attention,
    row_block_tables,
    row_mask,
    row_sdpa_attention,
    triton_row_attention,
)
from mlmtrain.errors import UserError
from mlmtrain.flops import model_flops_per_token, train_flops_per_batch
from mlmtrain.model import BertConfig, BertForMaskedLM, mlm_loss_sum
from mlmtrain.packing import PackedBatch, Packer, RowPacker, best_fit_decreasing
from mlmtrain.prepare import load_split, read_meta
from mlmtrain.tokenizer import PAD_ID

# ---------------------------------------------------------------------------------------------- bin packing


def test_best_fit_decreasing_fills_rows_and_never_overflows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 129, 300).tolist()
    row_of = best_fit_decreasing(lengths, 40, 128)
    used = np.bincount(row_of[row_of >= 0], weights=np.asarray(lengths)[row_of >= 0], minlength=40)
    assert used.max() <= 128 and (row_of >= 0).sum() < 300  # more than fits: some are left out
    assert used.sum() / (40 * 128) > 0.99
    assert np.array_equal(row_of, best_fit_decreasing(lengths, 40, 128))  # deterministic
    assert best_fit_decreasing([128, 1, 127], 2, 128).tolist() == [0, 1, 1]  # a full row, and a tight pair
    assert best_fit_decreasing([5], 0, 128).tolist() == [-1]


def best_fit_decreasing_item_by_item(lengths: list[int], rows: int, row_len: int) -> np.ndarray:
    """The rule, one item at a time: longest first (ties in order), each into the tightest row with room (the
    last-emptied of equally tight rows; row 0 first among empty ones)."""
    free = [row_len] * rows
    touched = [rows - r for r in range(rows)]  # higher: taken first among equally tight rows
    clock, row_of = rows, [-1] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(rows) if free[r] >= lengths[i]]
        if fits:
            row = min(fits, key=lambda r: (free[r], -touched[r]))
            free[row] -= lengths[i]
            clock += 1
            touched[row] = clock
            row_of[i] = row
    return np.array(row_of, dtype=np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_decreasing_places_as_item_by_item(seed):
    """A length's items are placed a row at a time: the same rows as the rule applied item by item, on few
    lengths (long runs), many lengths, more items than fit, and fewer."""
    rng = np.random.default_rng(seed)
    kinds = [rng.integers(1, 129, 400), rng.choice([3, 16, 17, 40, 64], 400), rng.integers(1, 20, 150),
             np.exp(rng.normal(2.77, 0.68, 600)).clip(3, 128).astype(int)]  # fmt: skip
    for lengths in kinds:
        for rows in (1, 7, 40):
            expect = best_fit_decreasing_item_by_item(lengths.tolist(), rows, 128)
            assert np.array_equal(best_fit_decreasing(lengths.tolist(), rows, 128), expect), (seed, rows)


# ---------------------------------------------------------------------------------------------- the packer


def row_segments(batch):
    cu = batch.cu_seqlens.numpy()
    return [(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:]) if b > a]


@pytest.mark.parametrize("pack", ["sentence", "document"])
def test_rows_hold_whole_units_and_agree_with_cu_seqlens(data_dir, pack):
    shard = load_split(data_dir, "train")
    L = read_meta(data_dir)["max_seq_len"]
    known = Counter(all_sentences(shard))
    it = RowPacker(shard, 2048, L, seed=3, pack=pack).batches()
    for _ in range(4):
        b = next(it)
        assert b.input_ids.shape == (2048,) and b.segment_ids.shape == (16, L)
        ids, pos, seg = b.input_ids.numpy(), b.position_ids.numpy(), b.segment_ids.numpy().ravel()
        segs = row_segments(b)
        assert [a for a, _ in segs] == np.flatnonzero(np.diff(np.r_[-1, seg])).tolist()  # the same segments
        assert (np.diff(seg) >= 0).all()  # ids never decrease along the rows: what the flex block tables rely on
        for a, e in segs:
            assert a // L == (e - 1) // L, "a segment crosses a row"
            assert (pos[a:e] == np.arange(e - a)).all()
        assert sum(ids[a] != PAD_ID for a, _ in segs) == b.num_segments
        assert (ids != PAD_ID).sum() == b.num_real_tokens
        for s in sentences_of_rows(b):
            assert known[s] > 0, "a sentence that is not in the shard"


def sentences_of_rows(batch):
    """The sentences of every real segment, wherever it sits in the rows (a real segment starts with [CLS])."""
    ids = batch.input_ids.numpy()
    real = [(a, e) for a, e in row_segments(batch) if ids[a] != PAD_ID]
    packed = torch.from_numpy(np.concatenate([ids[a:e] for a, e in real]))
    cu = torch.from_numpy(np.cumsum([0] + [e - a for a, e in real]).astype(np.int32))
    return sentences_of(PackedBatch(packed, packed, cu, 0, len(real), 0, (0, 0)))


def test_one_pass_covers_every_sentence_once_and_resume_continues(data_dir):
    shard = load_split(data_dir, "train")
    L = read_meta(data_dir)["max_seq_len"]
    packer = RowPacker(shard, 1024, L, seed=1, loop=False)
    batches = list(packer.batches())
    seen = Counter(s for b in batches for s in sentences_of_rows(b))
    assert seen == Counter(all_sentences(shard))
    # the cursor after batch 3 restarts the stream exactly where it was
    again = list(RowPacker(shard, 1024, L, seed=1, loop=False).batches(batches[2].cursor_after, start_index=3))
    assert len(again) == len(batches) - 3
    for a, b in zip(again, batches[3:]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.segment_ids, b.segment_ids)
        assert a.index == b.index


def test_a_batch_is_placed_in_its_rows_once_when_a_step_has_several(data_dir, monkeypatch):
    """A step's global batches are all cut (placed) before any is built; the build reuses the cut's placement
    (it used to place every batch but the step's last a second time), on every rank, for the same batches."""
    shard = load_split(data_dir, "train")
    L = read_meta(data_dir)["max_seq_len"]
    builds, real = [], RowPacker._place
    monkeypatch.setattr(
        RowPacker, "_place", lambda self, ids: builds.append(sys._getframe(1).f_code.co_name) or real(self, ids)
    )
    whole = list(itertools.islice(RowPacker(shard, 1024, L, seed=1).batches(batches_per_step=4), 8))
    assert builds and "_build" not in builds
    rank1 = RowPacker(shard, 1024, L, seed=1, rank=1, world_size=2).batches(batches_per_step=4)
    for mine, want in zip(itertools.islice(rank1, 4), whole[1::2]):
        assert mine.index == want.index and torch.equal(mine.segment_ids, want.segment_ids)
        assert torch.equal(mine.input_ids, want.input_ids)
    assert "_build" not in builds
    monkeypatch.setattr("mlmtrain.packing.PLACED_CUTS", 2)  # more global batches per step than it keeps
    again = list(itertools.islice(RowPacker(shard, 1024, L, seed=1).batches(batches_per_step=4), 8))
    assert "_build" in builds and all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(again, whole))


def test_only_placements_that_fit_are_kept_for_the_build(data_dir, monkeypatch):
    """A cut is placed ~2 times (units given back until all fit); only the placement that fits is kept, so
    PLACED_CUTS placements hold PLACED_CUTS batches: a step of exactly that many global batches builds them all
    without placing any again (keeping the attempts too would push the step's first batches out)."""
    monkeypatch.setattr("mlmtrain.packing.PLACED_CUTS", 4)
    shard = load_split(data_dir, "train")
    L = read_meta(data_dir)["max_seq_len"]
    calls, real = [], RowPacker._place
    monkeypatch.setattr(
        RowPacker, "_place", lambda self, ids: calls.append(sys._getframe(1).f_code.co_name) or real(self, ids)
    )
    batches = list(itertools.islice(RowPacker(shard, 1024, L, seed=1).batches(batches_per_step=4), 8))
    assert len(batches) == 8 and calls.count("_cut") > 8  # some cuts took more than one placement
    assert "_build" not in calls


def test_fill_and_determinism_at_64k(data_dir):
    shard = load_split(data_dir, "train")
    L = read_meta(data_dir)["max_seq_len"]
    first = RowPacker(shard, 65536, L, seed=0).batches()
    fills = [next(first).num_real_tokens / 65536 for _ in range(4)]
    print("row fill rates:", fills)
    assert min(fills) >= 0.98
    a, b = next(RowPacker(shard, 65536, L, seed=0).batches()), next(RowPacker(shard, 65536, L, seed=0).batches())
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_rows_across_epochs_and_bad_sizes(data_dir):
    shard = load_split(data_dir, "valid")  # small: every batch runs into the next epoch soon
    L = read_meta(data_dir)["max_seq_len"]
    it = RowPacker(shard, 4 * L, L, seed=5).batches()
    epochs = {next(it).cursor_after[0] for _ in range(40)}
    assert len(epochs) > 2  # the stream ran on through several epochs, every batch whole units
    with pytest.raises(UserError, match=f"rows of max_seq_len = {L} tokens: data.tokens_per_batch = 1000 must be"):
        RowPacker(shard, 1000, L, seed=0)


def test_flops_count_the_same_segments_in_both_layouts(data_dir):
    """Encoder and attention on the real segments, the vocab head on the selected share of the tokens the masker
    may select ([CLS], [SEP] and [UNK] never are: counting them overstated a base step's FLOPs by 0.4%, a tiny
    model's by 5.6%)."""
    shard = load_split(data_dir, "train")
    L = read_meta(data_dir)["max_seq_len"]
    config = odd_config(vocab_size=5000, max_position_embeddings=L)
    for b in (next(RowPacker(shard, 2048, L, seed=0).batches()), next(Packer(shard, 2048, L, seed=0).batches())):
        ids = b.input_ids.numpy()
        if b.segment_lengths is not None:
            lengths = [e - a for a, e in row_segments(b) if ids[a] != PAD_ID]
        else:
            lengths = np.diff(b.cu_seqlens.numpy()[: b.num_segments + 1])
        maskable = int(np.count_nonzero(ids >= 5))  # ids 0-4 are the specials; [PAD] is one of them
        assert b.num_maskable_tokens == maskable < b.num_real_tokens - 2 * b.num_segments + 1
        head = 0.15 * maskable / b.num_real_tokens
        expected = model_flops_per_token(config, lengths, head_fraction=head) * b.num_real_tokens
        assert train_flops_per_batch(config, b, 0.15) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------- attention


def rows_batch(rows: list[list[int]], L: int):
    """Hand-made rows: each a list of segment lengths (a [PAD]-like tail is added where a row is not full).
    Returns input ids, positions, cu_seqlens (every segment), segment ids (R, L)."""
    gen = torch.Generator().manual_seed(len(rows))
    starts, lengths = [], []
    for r, segs in enumerate(rows):
        at = r * L
        for n in [*segs, L - sum(segs)] if sum(segs) < L else segs:
            starts.append(at)
            lengths.append(n)
            at += n
    T = len(rows) * L
    cu_seqlens = torch.tensor([*starts, T], dtype=torch.int32)
    seg_lens = torch.tensor(lengths)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), seg_lens).view(len(rows), L)
    position_ids = torch.arange(T) - torch.repeat_interleave(cu_seqlens[:-1].long(), seg_lens)
    input_ids = torch.randint(5, 97, (T,), generator=gen)
    return input_ids, position_ids, cu_seqlens, segment_ids


# the row paths besides the SDPA reference that run on the CPU: the segment-attention kernel through Triton's
# interpreter (off on a CUDA machine)
ROW_KERNELS = ("flex", "triton") if CPU_RUNS_TRITON else ("flex",)

# odd lengths, one-token segments, a full row of one segment, a full row of several, and an empty last row
CASES = {
    "odd": [[7, 1, 13, 2], [37], [1, 1, 1, 5, 11]],
    "full": [[40], [13, 27], [1, 39]],
    "empty_tail": [[9, 22], [3], []],
}


@pytest.mark.parametrize("case", list(CASES))
def test_row_attention_equals_packed_reference(case):
    torch.manual_seed(0)
    L = 40
    model = random_biases(BertForMaskedLM(odd_config()).eval(), 0)
    input_ids, position_ids, cu_seqlens, segment_ids = rows_batch(CASES[case], L)
    masked = torch.arange(0, input_ids.numel(), 3)
    with torch.no_grad():
        packed = model(input_ids, position_ids, cu_seqlens, L, masked)  # the packed SDPA reference
        rows = model(input_ids, position_ids, cu_seqlens, L, masked, segment_ids)  # auto on CPU: row SDPA
        for impl in ROW_KERNELS:
            model.attn_impl = impl
            out = model(input_ids, position_ids, cu_seqlens, L, masked, segment_ids)
            assert torch.allclose(out, packed, atol=ATOL[torch.float32], rtol=0), (impl, report(out, packed))
    assert torch.allclose(rows, packed, atol=ATOL[torch.float32], rtol=0), report(rows, packed)


def test_row_gradients_equal_packed_reference():
    """FlexAttention has no backward on the CPU (its CUDA backward is checked on a GPU); the row reference's and
    the segment-attention kernel's (interpreted) are."""
    torch.manual_seed(1)
    L = 40
    input_ids, position_ids, cu_seqlens, segment_ids = rows_batch(CASES["odd"] + CASES["empty_tail"], L)
    masked = torch.arange(0, input_ids.numel(), 2)
    labels = input_ids[masked]
    grads = []
    for seg, impl in ((None, "auto"), (segment_ids, "sdpa"), *([(segment_ids, "triton")] if CPU_RUNS_TRITON else [])):
        torch.manual_seed(1)
        model = random_biases(BertForMaskedLM(odd_config(), attn_impl=impl), 1)  # the kernel adds q/k/v's itself
        loss, n = mlm_loss_sum(model(input_ids, position_ids, cu_seqlens, L, masked, seg), labels)
        (loss / n).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k, g in grads[0].items():
        for other in grads[1:]:
            assert torch.allclose(g, other[k], atol=1e-5, rtol=1e-4), (k, report(g, other[k]))


def test_no_cross_contamination_between_row_segments():
    """Changing one segment's tokens changes no other segment's outputs, on every row path."""
    torch.manual_seed(2)
    L = 40
    model = BertForMaskedLM(odd_config()).eval()
    input_ids, position_ids, cu_seqlens, segment_ids = rows_batch(CASES["odd"], L)
    other = input_ids.clone()
    other[7:8] = 5  # the one-token segment of row 0
    everywhere = torch.arange(input_ids.numel())
    for impl in ("sdpa", *ROW_KERNELS):
        model.attn_impl = impl
        with torch.no_grad():
            a = model(input_ids, position_ids, cu_seqlens, L, everywhere, segment_ids)
            b = model(other, position_ids, cu_seqlens, L, everywhere, segment_ids)
        changed = (a - b).abs().amax(-1) > 0
        assert changed.nonzero().flatten().tolist() == [7], impl


def test_flex_mask_reads_the_batch_without_recompiling():
    """Compiled (dynamo + AOTAutograd, no inductor code generation on the CPU), two batches with different
    segments are one graph: the segment ids are a graph input, the block tables depend on the shape only."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(flex_row_attention, backend=counter, fullgraph=True, dynamic=False)
    R, L, H, D = 3, 40, 2, 16
    for segs in (CASES["odd"], CASES["full"]):
        *_, segment_ids = rows_batch(segs, L)
        q, k, v = (torch.randn(R * L, H, D) for _ in range(3))
        with torch.no_grad():
            out = compiled(q, k, v, segment_ids, row_block_tables(segment_ids))
        ref = row_sdpa_attention(q, k, v, row_mask(segment_ids), 0.0)
        assert torch.allclose(out, ref, atol=1e-5), report(out, ref)
    assert counter.frame_count == 1


@requires_cpu_triton
def test_segment_attention_kernel_with_swapped_in_qkv_modules():
    """q, k and v as three modules of their own (how torchao's Float8Linear runs): the kernel gets them stacked
    and gives the same logits and gradients as the row SDPA reference."""

    class OwnLinear(nn.Linear):  # not exactly nn.Linear: BertSelfAttention runs it as itself
        pass

    L = 40
    input_ids, position_ids, cu_seqlens, segment_ids = rows_batch(CASES["odd"], L)
    masked = torch.arange(0, input_ids.numel(), 2)
    results = []
    for impl in ("sdpa", "triton"):
        torch.manual_seed(3)
        model = BertForMaskedLM(odd_config(), attn_impl=impl)
        for layer in model.bert.encoder.layer:
            attention = layer.attention.self
            for name in ("query", "key", "value"):
                old = getattr(attention, name)
                new = OwnLinear(old.in_features, old.out_features)
                new.load_state_dict(old.state_dict())
                setattr(attention, name, new)
        logits = model(input_ids, position_ids, cu_seqlens, L, masked, segment_ids)
        logits.square().mean().backward()
        results.append((logits, model.bert.encoder.layer[0].attention.self.query.weight.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5), report(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6, rtol=1e-4)


@requires_cpu_triton
@pytest.mark.compile
def test_segment_attention_kernel_compiles_into_one_graph_with_its_backward():
    """Compiled (dynamo + AOTAutograd, fullgraph: no break), two batches with other segments are one graph, the
    kernel's custom ops in it, forward and gradients equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(triton_row_attention, backend=counter, fullgraph=True, dynamic=False)
    R, L, H, D = 3, 40, 2, 16
    for segs in (CASES["odd"], CASES["full"]):
        *_, segment_ids = rows_batch(segs, L)
        qkv = torch.randn(R * L, 3, H, D, requires_grad=True)
        dout = torch.randn(R * L, H, D)
        out, eager = compiled(qkv, segment_ids), triton_row_attention(qkv, segment_ids)
        assert torch.equal(out, eager)
        assert torch.equal(torch.autograd.grad(out, qkv, dout)[0], torch.autograd.grad(eager, qkv, dout)[0])
    assert counter.frame_count == 1
    assert "segment_attention_fwd" in str(counter.graphs[0].code)


# rows of several 128-token blocks (document packing at 300 and 512 tokens): segments within one block, across
# blocks, a whole row of one segment, one-token segments, and the last block partial (300 = 2 x 128 + 44)
LONG_ROWS = {300: [[5, 140, 3, 100, 52], [300], [1, 1, 297, 1], [128, 128, 20]], 512: [[512], [200, 300, 12]]}


@pytest.mark.parametrize("L", list(LONG_ROWS))
def test_flex_block_tables_visit_exactly_the_blocks_with_shared_segments(L):
    """The tables from the segment-id ranges equal the brute-force ones (any same-segment pair in a block pair:
    visited; every pair: full), and FlexAttention with them equals the dense-mask reference."""
    from mlmtrain.attention import FLEX_BLOCK

    *_, segment_ids = rows_batch(LONG_ROWS[L], L)
    R, n = segment_ids.shape[0], -(-L // FLEX_BLOCK)
    count, index, full_count, full_index = row_block_tables(segment_ids)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, L, L)
    for r in range(R):
        for qb in range(n):
            q = slice(qb * FLEX_BLOCK, min(L, (qb + 1) * FLEX_BLOCK))
            want_any = {kb for kb in range(n) if same[r, q, kb * FLEX_BLOCK : (kb + 1) * FLEX_BLOCK].any()}
            want_full = {kb for kb in range(n) if same[r, q, kb * FLEX_BLOCK : (kb + 1) * FLEX_BLOCK].all()}
            partial = set(index[r, 0, qb, : count[r, 0, qb]].tolist())
            whole = set(full_index[r, 0, qb, : full_count[r, 0, qb]].tolist())
            assert whole == want_full and partial == want_any - want_full, (r, qb)
    H, D = 2, 16
    q, k, v = (torch.randn(R * L, H, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        out = flex_row_attention(q, k, v, segment_ids, (count, index, full_count, full_index))
    ref = row_sdpa_attention(q, k, v, row_mask(segment_ids), 0.0)
    assert torch.allclose(out, ref, atol=1e-5), report(out, ref)


@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_row_attention_needs_rows(impl):
    model = BertForMaskedLM(odd_config(), attn_impl=impl)
    input_ids = torch.randint(5, 97, (6,))
    with pytest.raises(ValueError, match="segment_ids"):
        model(input_ids, torch.arange(6), torch.tensor([0, 6], dtype=torch.int32), 6, torch.arange(6))


# ---------------------------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("impl,L", [("flex", 128), ("flex", 300), ("triton", 128)])
def test_compiled_flex_matches_fp32_reference_on_gpu(impl, L):
    """FlexAttention (rows of one block, and of several with skipped and full block pairs) or the segment-attention
    kernel, compiled under bf16 autocast (fused forward and backward kernels), vs the fp32 dense-mask reference on
    the same rows: logits and every parameter gradient, as the varlen GPU test checks flash."""
    torch.manual_seed(11)
    config = BertConfig.from_size(
        "mini", 1000, max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    ref = BertForMaskedLM(config, attn_impl="sdpa").cuda()
    fast = BertForMaskedLM(config, attn_impl=impl).cuda()
    fast.load_state_dict(ref.state_dict())
    rows = [[1, 127], [128], [37, 2, 64, 5], []] if L == 128 else LONG_ROWS[L]
    input_ids, position_ids, cu_seqlens, segment_ids = rows_batch(rows, L)
    batch = [t.cuda() for t in (input_ids, position_ids, cu_seqlens)]
    masked = torch.randperm(input_ids.numel())[:128].cuda()
    labels = torch.randint(5, 1000, (128,)).cuda()
    ref_logits = ref(*batch, L, masked, segment_ids.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast_logits = torch.compile(fast, dynamic=False)(*batch, L, masked, segment_ids.cuda())
    tol = ATOL[torch.bfloat16] * max(1.0, ref_logits.abs().max().item())
    assert torch.allclose(fast_logits.float(), ref_logits, atol=tol, rtol=0), report(fast_logits, ref_logits)
    for logits in (ref_logits, fast_logits):
        loss_sum, n = mlm_loss_sum(logits, labels)
        (loss_sum / n).backward()
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        g, h = p.grad, fast_params[name].grad.float()
        assert torch.isfinite(h).all(), name
        if name.endswith("attention.self.key.bias"):  # exactly 0 in exact arithmetic (see test_model.py)
            assert h.abs().max() < 1e-4 and g.abs().max() < 1e-4, report(g, h)
            continue
        rel = ((g - h).norm() / g.norm().clamp(min=1e-12)).item()
        assert rel <= 0.05, f"{name}: relative error {rel:.3g}, {report(g, h)}"
