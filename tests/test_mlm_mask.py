"""The masking kernel against its torch reference (bit for bit), and the reference against BERT's definition
(statistically). On CPU the kernel runs under TRITON_INTERPRET=1 (set in conftest), so kernel calls stay
at <= ~8k tokens; the statistical tests use the reference at large T, which the first tests prove identical.

Statistical tests and their false-failure rates (each test below is one such check):
- rates (selection, whole-word selection): two-sided binomial z-test, |z| < 5.0 -> false failure 5.7e-7.
- 80/10/10 split: chi-square with 2 degrees of freedom, statistic < 27.63 -> false failure 1e-6.
- random-id uniformity: chi-square with K-1 degrees of freedom against the Wilson-Hilferty quantile at
  1e-6 (z = 4.753), accurate to a few percent of the tail probability for K > 30.
Every draw is a pure function of (seed, step, index), so these are deterministic: they pass or fail the
same way on every run, and the false-failure rate is the chance a fresh seed choice would fail."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import requires_cuda, requires_triton
from hopper_build import assert_builds_for_hopper, build

from mlmtrain.errors import UserError
from mlmtrain.kernels import mlm_mask as mm
from mlmtrain.kernels.mlm_mask import (
    IGNORE_INDEX,
    max_masked_bound,
    mlm_mask,
    mlm_mask_reference,
    mlm_mask_triton,
    word_start_table,
)

V, MASK, NSPEC = 69, 4, 5  # 64 maskable ids


def selected_mask(out, num_tokens: int) -> torch.Tensor:
    """(T,) bool: the tokens the masker selected, read from its compacted slots."""
    live = out.masked_labels != IGNORE_INDEX
    selected = torch.zeros(num_tokens, dtype=torch.bool, device=out.masked_positions.device)
    return selected.index_fill_(0, out.masked_positions[live], True)


def dense_labels(out, num_tokens: int) -> torch.Tensor:
    """(T,) int64: the original id where selected, IGNORE_INDEX elsewhere (transformers' `labels`)."""
    live = out.masked_labels != IGNORE_INDEX
    labels = torch.full((num_tokens,), IGNORE_INDEX, dtype=torch.int64, device=out.masked_positions.device)
    return labels.index_put_((out.masked_positions[live],), out.masked_labels[live])


Z_MAX = 5.0  # two-sided normal tail 5.7e-7
CHI2_DF2_MAX = 2 * math.log(1e6)  # chi-square(2) survival exp(-x/2) = 1e-6


def _ids(T, dtype=torch.int32, seed=0, low=0, high=V, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (T,), generator=g).to(dtype=dtype, device=device)


def _words(T, seed=0, max_len=6):
    """Ids laid out as words of 1..max_len pieces: word-start ids in [5, 40), continuation ids in [40, 69)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (T,), generator=g)
    first_piece = torch.cumsum(lengths, 0) - lengths  # (T,) where each word would begin
    starts = torch.zeros(T, dtype=torch.bool)
    starts[first_piece[first_piece < T]] = True
    ids = torch.where(starts, torch.randint(NSPEC, 40, (T,), generator=g), torch.randint(40, V, (T,), generator=g))
    table = torch.arange(V) < 40  # (V,) specials and [5, 40) start words
    return ids.to(torch.int32), starts, table


def _assert_same(a, b, what=""):
    for name, x, y in zip(a._fields, a, b):
        if not torch.equal(x, y):
            diff = (x.long() - y.long()).abs().float() if x.shape == y.shape else None
            detail = (
                f"{int((x != y).sum())} of {x.numel()} differ, max diff {diff.max():.0f}, mean diff "
                f"{diff.mean():.3g}, first at {int((x != y).nonzero()[0])}"
                if diff is not None
                else f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"
            )
            raise AssertionError(f"{what} {name}: {detail}")


def _both(ids, **kw):
    kw = {"vocab_size": V, "mask_id": MASK, "seed": 1234, "step": 7, **kw}
    return mlm_mask(ids, backend="triton", **kw), mlm_mask(ids, backend="torch", **kw)


# ---- kernel == reference, bit for bit -----------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("T", [1, 127, 1025, 4099])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_kernel_matches_reference(T, dtype):
    ids = _ids(T, dtype, seed=T)
    a, b = _both(ids, offset=(1 << 34) - T // 2 - 1, step=(1 << 40) + 3)  # low counter words wrap mid-batch
    _assert_same(a, b, f"T={T} {dtype}")
    assert a.masked_ids.dtype == dtype
    assert a.masked_positions.dtype == a.masked_labels.dtype == torch.int64


@requires_triton
@pytest.mark.parametrize("T", [127, 1025, 4099])
def test_kernel_matches_reference_whole_word_and_never_mask(T):
    ids, _, table = _words(T, seed=T)
    never = torch.zeros(V, dtype=torch.bool)
    never[[7, 8, 41, 60]] = True
    a, b = _both(ids.to(DEVICE), word_start=table.to(DEVICE), never_mask=never.to(DEVICE), mask_prob=0.3, offset=T)
    _assert_same(a, b, f"T={T} whole-word + never_mask")


def test_the_never_mask_tables_are_built_once_per_table(monkeypatch):
    """A run passes one never-mask table at every step: its sorted maskable ids are built at the first call only
    (they were an argsort over the vocabulary per micro-batch); a table changed in place gets new ones."""
    ids = _ids(257, torch.int64, seed=3)
    never = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    never[[7, 8]] = True
    sorts, real = [], torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: sorts.append(1) or real(*a, **k))
    kw = {"vocab_size": V, "mask_id": MASK, "seed": 1, "never_mask": never, "mask_prob": 1.0, "backend": "torch"}
    first = mlm_mask(ids, step=0, **kw)
    again = mlm_mask(ids, step=1, **kw)
    assert len(sorts) == 1 and (first.masked_ids == 7).sum() == (again.masked_ids == 7).sum() == (ids == 7).sum()
    never[7] = False
    changed = mlm_mask(ids, step=0, **kw)
    assert len(sorts) == 2 and ((changed.masked_labels == 7).sum() > 0) == bool((ids == 7).any())


def test_the_never_mask_tables_follow_num_special_and_do_not_keep_the_table_alive():
    """The tables kept with a never-mask table are built for one num_special (another one builds its own: ids
    below it are blocked too), and are kept with the table, not beyond it (a run's table freed, its entry goes)."""
    import gc
    import weakref

    never = torch.zeros(V, dtype=torch.bool)
    never[20] = True
    blocked5, _, n5 = mm._allowed_ids(never, 5)
    blocked9, allowed9, n9 = mm._allowed_ids(never, 9)
    assert (int(n5), int(n9)) == (V - 6, V - 10) and blocked9[:9].all() and not blocked5[5:9].any()
    assert allowed9[: V - 10].tolist() == [i for i in range(9, V) if i != 20]
    assert int(mm._allowed_ids(never, 5)[2]) == V - 6  # back to 5: not 9's tables
    gone = weakref.ref(never)
    del never
    gc.collect()
    assert gone() is None


@requires_triton
def test_kernel_words_longer_than_blocks():
    """Small blocks and a short look-back window: words span several blocks, the call starts mid-word, and
    the walk-back must step through many windows."""
    T = 2000
    ids = torch.full((T,), 50, dtype=torch.int32)  # continuation pieces...
    ids[[300, 301, 900, 1950]] = 10  # ...with only four word starts
    table = torch.arange(V) < 40
    kw = dict(
        vocab_size=V,
        mask_id=MASK,
        num_special=NSPEC,
        never_mask=None,
        mask_prob=0.5,
        mask_frac=0.8,
        random_frac=0.1,
        step=3,
        offset=6,
        max_masked=T,
        word_start=table.to(DEVICE),
    )
    for seed in range(2):
        ids_d = ids.to(DEVICE)
        a = mlm_mask_triton(ids_d, seed=seed, block_size=128, lookback=32, **kw)
        b = mlm_mask_reference(ids_d, seed=seed, **kw)
        _assert_same(a, b, f"seed {seed}")
        selected = selected_mask(a, T).cpu()
        for lo, hi in [(0, 300), (301, 900), (900, 1950), (1950, T)]:
            assert selected[lo:hi].all() or not selected[lo:hi].any(), (seed, lo, hi)


@requires_triton
def test_kernel_cap_and_padding_slots():
    ids = _ids(4000, seed=5)
    for max_masked in (0, 5, 300, 5000):
        a, b = _both(ids, mask_prob=0.5, max_masked=max_masked)
        _assert_same(a, b, f"max_masked={max_masked}")


# ---- semantics (checked on the reference; the kernel is identical) -------------------------------------
def _check_consistent(ids, out, max_masked):
    """The three outputs describe the same selection: live slots first, positions ascending, each slot's label the
    id at its position, every token not selected left as it was, the padded slots (position 0, IGNORE_INDEX)."""
    ids = ids.long().cpu()
    masked_ids, positions, masked_labels = (t.long().cpu() for t in out)
    assert positions.shape == masked_labels.shape == (max_masked,)
    n = int((masked_labels != IGNORE_INDEX).sum())
    assert (masked_labels[:n] != IGNORE_INDEX).all() and (positions[1:n] > positions[: n - 1]).all()
    assert torch.equal(masked_labels[:n], ids[positions[:n]])
    selected = selected_mask(out, ids.numel()).cpu()
    assert int(selected.sum()) == n and torch.equal(masked_ids[~selected], ids[~selected])
    assert (positions[n:] == 0).all() and (masked_labels[n:] == IGNORE_INDEX).all()


def test_outputs_consistent_and_cap_deselects_the_tail():
    ids = _ids(20000, seed=1, device="cpu")
    kw = dict(vocab_size=V, mask_id=MASK, seed=3, step=4, mask_prob=0.5, backend="torch")
    full = mlm_mask(ids, **kw)
    _check_consistent(ids, full, max_masked_bound(20000, 0.5))
    capped = mlm_mask(ids, max_masked=100, **kw)
    _check_consistent(ids, capped, 100)
    assert int((capped.masked_labels != IGNORE_INDEX).sum()) == 100
    assert torch.equal(capped.masked_positions, full.masked_positions[:100])  # the first 100 selections kept
    last = int(capped.masked_positions[-1])
    assert torch.equal(capped.masked_ids[: last + 1], full.masked_ids[: last + 1])
    assert torch.equal(capped.masked_ids[last + 1 :], ids[last + 1 :])  # past the bound: untouched


def test_specials_padding_and_out_of_vocab_never_selected():
    ids = _ids(30000, seed=2, low=-3, high=V + 3, device="cpu")
    ids[:5000] = 0  # a padded tail, at the front for once
    never = torch.zeros(V, dtype=torch.bool)
    never[[10, 11, 12]] = True
    for never_mask in (None, never):
        out = mlm_mask(
            ids,
            vocab_size=V,
            mask_id=MASK,
            seed=0,
            step=0,
            mask_prob=1.0,
            never_mask=never_mask,
            max_masked=30000,
            backend="torch",
        )
        selected = selected_mask(out, ids.numel())
        blocked = (ids < NSPEC) | (ids >= V) | (never[ids.clamp(0, V - 1)] if never_mask is not None else False)
        assert torch.equal(selected, ~blocked)  # p = 1: everything maskable, nothing else
        replaced = selected & (out.masked_ids != ids) & (out.masked_ids != MASK)
        assert replaced.sum() > 1000
        assert (out.masked_ids[replaced] >= NSPEC).all() and (out.masked_ids[replaced] < V).all()
        if never_mask is not None:
            assert not never[out.masked_ids[replaced]].any()
            assert set(out.masked_ids[replaced].tolist()) == set(range(NSPEC, V)) - {10, 11, 12}


def test_identical_keys_identical_output_and_each_key_matters():
    ids = _ids(5000, seed=3, device="cpu")
    kw = dict(vocab_size=V, mask_id=MASK, backend="torch")
    base = mlm_mask(ids, seed=1, step=2, offset=3, **kw)
    _assert_same(base, mlm_mask(ids.clone(), seed=1, step=2, offset=3, **kw), "same keys")
    for other in (dict(seed=2, step=2, offset=3), dict(seed=1, step=3, offset=3), dict(seed=1, step=2, offset=4)):
        assert not torch.equal(base.masked_positions, mlm_mask(ids, **other, **kw).masked_positions), other


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_depends_only_on_global_index(backend):
    """Token-level masking of a slice with offset k equals the slice of the whole: any split across ranks or
    micro-batches masks each token the same way (k = 1001 is not a multiple of the Philox group of 4)."""
    ids = _ids(3000, seed=4)
    kw = dict(vocab_size=V, mask_id=MASK, seed=9, step=5, max_masked=3000, backend=backend)
    whole = mlm_mask(ids, **kw)
    part = mlm_mask(ids[1001:], offset=1001, **kw)
    assert torch.equal(dense_labels(part, 1999), dense_labels(whole, 3000)[1001:])
    assert torch.equal(part.masked_ids, whole.masked_ids[1001:])


def test_single_piece_words_mask_like_token_level():
    ids = _ids(5000, seed=5, device="cpu")
    kw = dict(vocab_size=V, mask_id=MASK, seed=1, step=1, backend="torch")
    _assert_same(mlm_mask(ids, **kw), mlm_mask(ids, word_start=torch.ones(V, dtype=torch.bool), **kw), "all starts")


def test_whole_word_all_or_nothing_and_rate():
    ids, starts, table = _words(200000, seed=6)
    out = mlm_mask(ids, vocab_size=V, mask_id=MASK, seed=11, step=0, word_start=table, backend="torch")
    selected = selected_mask(out, ids.numel())
    word = torch.cumsum(starts.long(), 0) - 1  # (T,) word index of each piece
    n_words = int(word[-1]) + 1
    per_word = torch.zeros(n_words, dtype=torch.long).index_add_(0, word, selected.long())
    length = torch.bincount(word, minlength=n_words)
    assert ((per_word == 0) | (per_word == length)).all(), "a word was partly selected"
    _assert_binomial(int((per_word > 0).sum()), n_words, _p_select(0.15), "whole-word selection rate")


# ---- statistics ------------------------------------------------------------------------------------
def _p_select(p):
    return round(p * 2**24) / 2**24  # the exact probability the 24-bit threshold implements


def _assert_binomial(k, n, p, what):
    z = (k - n * p) / math.sqrt(n * p * (1 - p))
    assert abs(z) < Z_MAX, f"{what}: {k}/{n} = {k / n:.5f}, expected {p:.5f}, z = {z:.2f}"


def _chi2_quantile_1e6(df):
    """Wilson-Hilferty approximation of the chi-square(df) quantile with upper tail 1e-6."""
    z = 4.7534
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_selection_rate_many_seeds():
    k = n = 0
    for seed in range(20):
        ids = _ids(50000, seed=100 + seed, low=NSPEC, device="cpu")  # all maskable
        out = mlm_mask(ids, vocab_size=V, mask_id=MASK, seed=seed, step=seed * 7, backend="torch")
        k, n = k + int((out.masked_labels != IGNORE_INDEX).sum()), n + ids.numel()
    _assert_binomial(k, n, _p_select(0.15), "selection rate")


@requires_triton
def test_selection_rate_kernel():
    k = n = 0
    for seed in range(3):
        ids = _ids(8000, seed=200 + seed, low=NSPEC)
        out = mlm_mask(ids, vocab_size=V, mask_id=MASK, seed=seed, step=1, backend="triton")
        k, n = k + int((out.masked_labels != IGNORE_INDEX).sum()), n + ids.numel()
    _assert_binomial(k, n, _p_select(0.15), "selection rate (kernel)")


def test_80_10_10_split_and_uniform_random_ids():
    """Input is one repeated id x, every token selected (p = 1): then [MASK], x and any other id tell the three
    outcomes apart (a random draw equal to x, probability 1/K, counts as unchanged)."""
    x, K, T = NSPEC, V - NSPEC, 100000
    outs = []
    for seed in range(4):
        ids = torch.full((T,), x, dtype=torch.int32)
        outs.append(
            mlm_mask(
                ids, vocab_size=V, mask_id=MASK, seed=seed, step=3, mask_prob=1.0, max_masked=T, backend="torch"
            ).masked_ids.long()
        )
    out = torch.cat(outs)
    n = out.numel()
    p_mask = _p_select(0.8)
    p_random = _p_select(0.9) - p_mask
    expected = torch.tensor([p_mask, 1 - p_mask - p_random + p_random / K, p_random * (K - 1) / K]) * n
    observed = torch.tensor([(out == MASK).sum(), (out == x).sum(), ((out != MASK) & (out != x)).sum()]).double()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF2_MAX, (
        f"80/10/10 split: observed {observed.tolist()}, expected {expected.tolist()}, chi2 {chi2:.1f}"
    )

    changed = out[(out != MASK) & (out != x)]
    assert changed.min() >= NSPEC and changed.max() < V  # never a special id
    counts = torch.bincount(changed - NSPEC, minlength=K)[1:].double()  # ids x+1 .. V-1: K-1 categories
    e = counts.sum() / (K - 1)
    chi2 = float(((counts - e) ** 2 / e).sum())
    assert chi2 < _chi2_quantile_1e6(K - 2), f"random ids not uniform: chi2 {chi2:.1f}, counts {counts.tolist()}"


# ---- the bound, the table, errors, backends --------------------------------------------------------
def test_max_masked_bound():
    assert max_masked_bound(65536, 0.15) == 10624  # ceil(9830.4 + 8 * 91.41) = 10562 -> next multiple of 128
    for T in (1, 1000, 65536, 10**6):
        m = max_masked_bound(T, 0.15)
        assert m % 128 == 0 and m >= T * 0.15 + 8 * math.sqrt(T * 0.15 * 0.85)
    assert max_masked_bound(0, 0.15) == 0
    assert max_masked_bound(65536, 0.15, pieces_per_word=3.0) > 10624


def test_word_start_table():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "산악", "##자", "자전거", "##s", "#"]
    assert word_start_table(vocab).tolist() == [True] * 6 + [False, True, False, True]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(input_ids=torch.zeros(2, 3, dtype=torch.int32)), "1-D"),
        (dict(input_ids=torch.zeros(4)), "int32 or int64"),
        (dict(mask_prob=1.5), "mask_prob"),
        (dict(mask_frac=0.8, random_frac=0.3), "sum <= 1"),
        (dict(mask_id=V), "mask_id"),
        (dict(num_special=V), "num_special"),
        (dict(never_mask=torch.zeros(V - 1, dtype=torch.bool)), "never_mask"),
        (dict(word_start=torch.zeros(V, dtype=torch.int32)), "word_start"),
        (dict(seed=torch.tensor(1)), "python int"),
        (dict(step=-1), "step"),
        (dict(max_masked=-2), "max_masked"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_input_is_a_user_error(bad, message):
    kw = {"input_ids": torch.zeros(8, dtype=torch.int32), "vocab_size": V, "mask_id": MASK, "seed": 0, "step": 0, **bad}
    with pytest.raises(UserError, match=message):
        mlm_mask(kw.pop("input_ids"), **kw)


def test_auto_backend_and_empty_input():
    ids = _ids(300, seed=7, device="cpu")
    kw = dict(vocab_size=V, mask_id=MASK, seed=0, step=0)
    _assert_same(mlm_mask(ids, backend="auto", **kw), mlm_mask(ids, backend="torch", **kw), "auto")
    empty = mlm_mask(torch.zeros(0, dtype=torch.int64), backend="auto", **kw)
    assert empty.masked_ids.numel() == 0 and empty.masked_positions.numel() == 0


# ---- CUDA only ---------------------------------------------------------------------------------------
def _compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


def test_kernels_compile_for_hopper_without_a_gpu():
    """Both kernels, every mode, at the launcher's block sizes and warps, int64 and int32 ids, the per-call keys
    typed both ways a launch types them (a key of 2**31 or more is u32), to an sm_90 cubin (tests/hopper_build.py)."""
    keys = ("q4_lo", "q4_hi", "q2_lo", "q2_hi", "step_lo", "step_hi", "seed_lo", "seed_hi")
    u8 = {"word_start_ptr": "u8", "never_mask_ptr": "u8", "allowed_ptr": "i64", "n_allowed_ptr": "i64"}
    i32 = {"counts_ptr": "i32", "bits_ptr": "i32", "base_ptr": "i32", "positions_ptr": "i64"}
    builds = []
    for ids, block, whole_word, never, key_type in (
        ("i64", 1024, True, True, "u32"),
        ("i32", 4096, False, False, "i32"),
        ("i64", 2048, True, False, "i32"),
        ("i64", 1024, False, True, "u32"),
    ):
        warps = 4 if block <= 1024 else 8
        pointers = {**u8, **i32, "masked_labels_ptr": "i64"}
        scalars = dict.fromkeys(keys, key_type)
        shift = {"SHIFT": 1}  # offset % 4: 0..3, one build each on the GPU; any shows the code compiles
        count = {"BLOCK": block, **shift, "LOOKBACK": 64, "WHOLE_WORD": whole_word, "HAS_NEVER_MASK": never}
        apply = {"BLOCK": block, **shift, "HAS_NEVER_MASK": never}
        for kernel, consts in (("_mask_count_kernel", count), ("_mask_apply_kernel", apply)):
            builds.append(
                build(mm.__name__, kernel, ids, consts, warps, pointers=pointers, scalars=scalars, divisible=())
            )
    # a key equal to 1 as the constant a launch makes of it where a kernel does not list it in do_not_specialize
    # (on the H200 that broke a test kernel: philox's as_u32 called .to on the Python int)
    ones = {"BLOCK": 1024, "SHIFT": 1, "LOOKBACK": 64, "WHOLE_WORD": True, "HAS_NEVER_MASK": False, "step_hi": 1}
    ones |= {"q4_hi": 1, "seed_hi": 1}
    builds.append(build(mm.__name__, "_mask_count_kernel", "i32", ones, 4, pointers={**u8, **i32}, divisible=()))
    assert_builds_for_hopper(builds)


@requires_cuda
def test_cuda_large_batches_match_reference_without_sync_or_recompiles():
    table = torch.arange(V, device="cuda") < 40
    ids = _ids(1 << 21, seed=8, device="cuda")
    variants_before = _compiled_variants(mm._mask_count_kernel) + _compiled_variants(mm._mask_apply_kernel)
    results = []
    for word_start in (None, table):  # compile outside the check
        mlm_mask(ids, vocab_size=V, mask_id=MASK, seed=0, step=0, word_start=word_start, backend="triton")
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync in either path raises
    try:
        for word_start in (None, table):
            for step in (0, 1, 16, 17, 32, (1 << 40) + 1):
                kw = dict(vocab_size=V, mask_id=MASK, seed=123, step=step, word_start=word_start)
                results.append(
                    (
                        f"cuda step={step} whole_word={word_start is not None}",
                        mlm_mask(ids, backend="triton", **kw),
                        mlm_mask(ids, backend="torch", **kw),
                    )
                )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for what, a, b in results:
        _assert_same(a, b, what)
    # at most one new compiled variant per (kernel, whole-word on/off): new step values never recompile
    variants = _compiled_variants(mm._mask_count_kernel) + _compiled_variants(mm._mask_apply_kernel)
    assert variants - variants_before <= 4


@requires_triton
def test_kernel_matches_reference_whole_word_with_ids_outside_the_vocab():
    """Kernel == reference for any word-start table, ids outside the vocab included: such an id starts a word in
    both (the reference once took it through the table, as id 0, where the kernel takes it as a start). With a
    table from `word_start_table` the two agree either way, id 0 being [PAD], a start; a table without that
    shows the contract."""
    from mlmtrain.kernels.mlm_mask import mlm_mask

    V = 69
    g = torch.Generator().manual_seed(5)
    starts = torch.rand(2048, generator=g) < 0.2
    ids = torch.where(starts, torch.randint(5, 40, (2048,), generator=g), torch.randint(40, V, (2048,), generator=g))
    ids[::9] = V + 3  # outside the vocab, before continuation pieces
    ids[4::13] = -1
    ids = ids.to(torch.int32).to(DEVICE)
    table = torch.arange(V) < 40
    table[0] = False  # else an id outside the vocab, read as id 0, is a start through the table anyway
    kw = dict(vocab_size=V, mask_id=4, seed=99, step=3, word_start=table.to(DEVICE), mask_prob=0.5)
    a, b = mlm_mask(ids, backend="triton", **kw), mlm_mask(ids, backend="torch", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@requires_triton
@pytest.mark.parametrize("T, offset", [(1022, 3), (1023, 2), (2045, 3)])
def test_kernel_matches_reference_when_the_shift_adds_a_block(T, offset):
    """The first block starts offset % 4 lanes early, so T + shift tokens need one block more than T when T ends
    just below a block boundary (CPU blocks are 1024): the last tokens must still be masked, as the reference does.
    Kills: mask_nblocks_ignore_shift."""
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(NSPEC, V, (T,), generator=g).to(torch.int32).to(DEVICE)  # all maskable
    kw = dict(vocab_size=V, mask_id=MASK, seed=5, step=2, offset=offset, mask_prob=1.0, max_masked=T)
    a, b = mlm_mask(ids, backend="triton", **kw), mlm_mask(ids, backend="torch", **kw)
    _assert_same(a, b)
    assert torch.equal(b.masked_positions, torch.arange(T, device=DEVICE))  # p = 1: the tail tokens too


@requires_triton
def test_kernel_reads_strided_ids():
    """A strided view of ids (every other token of a batch) masks as its contiguous copy does.
    Kills: mask_cpu_no_contiguous."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2 * 700,), generator=g).to(torch.int64).to(DEVICE)[::2]
    assert not ids.is_contiguous()
    kw = dict(vocab_size=V, mask_id=MASK, seed=3, step=1, mask_prob=0.5)
    _assert_same(mlm_mask(ids, backend="triton", **kw), mlm_mask(ids.contiguous(), backend="torch", **kw))


@requires_triton
@pytest.mark.parametrize("word_start", [False, True])
def test_kernel_ignores_the_tokens_before_a_sliced_batch(word_start):
    """ids a slice of a larger buffer (a micro-batch of a prefetched batch) and offset % 4 = 3: the first block's
    3 lanes before the call map to the buffer's preceding tokens, which are maskable ids here; they are not the
    call's and must be neither selected nor written (p = 1: exactly the T tokens of the call are selected).
    Kills: mask_jit_negative_idx_in_range (the lanes at idx < 0 taken as in range)."""
    T = 600
    g = torch.Generator().manual_seed(9)
    buffer = torch.randint(NSPEC, V, (T + 8,), generator=g).to(torch.int32).to(DEVICE)
    ids = buffer[5 : 5 + T]  # contiguous, storage offset 5
    table = (torch.arange(V) < 40).to(DEVICE) if word_start else None
    kw = dict(vocab_size=V, mask_id=MASK, seed=2, step=4, offset=7, mask_prob=1.0, max_masked=T + 8, word_start=table)
    a, b = mlm_mask(ids, backend="triton", **kw), mlm_mask(ids, backend="torch", **kw)
    _assert_same(a, b)
    assert int((a.masked_labels != -100).sum()) == T


@requires_triton
def test_kernel_walk_back_reaches_a_word_start_in_the_first_window():
    """Whole-word: the only word start is token 5; every later block walks back window by window (lookback 32,
    blocks of 128) and must search the first window [0, 32) too, else it falls back to token 0's draw.
    Kills: mask_jit_walk_skips_first_window."""
    T = 300
    ids = torch.full((T,), 50, dtype=torch.int32)  # continuation pieces
    ids[5] = 10  # one word start
    table = torch.arange(V) < 40
    kw = dict(vocab_size=V, mask_id=MASK, num_special=NSPEC, never_mask=None, mask_prob=0.5, mask_frac=0.8,
              random_frac=0.1, step=1, offset=0, max_masked=T, word_start=table.to(DEVICE))  # fmt: skip
    for seed in range(6):
        ids_d = ids.to(DEVICE)
        a = mlm_mask_triton(ids_d, seed=seed, block_size=128, lookback=32, **kw)
        _assert_same(a, mlm_mask_reference(ids_d, seed=seed, **kw))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(offset=1 << 63), "offset"),
        (dict(seed=True), "python int"),
        (dict(random_frac=-0.1), "random_frac"),
    ],
)
def test_more_bad_input_is_a_user_error(bad, message):
    """Kills: mask_offset_bound_2p64, mask_bool_seed_accepted, mask_negative_random_frac_accepted."""
    kw = {"vocab_size": V, "mask_id": MASK, "seed": 0, "step": 0, "backend": "torch", **bad}
    with pytest.raises(UserError, match=message):
        mlm_mask(torch.zeros(8, dtype=torch.int32), **kw)


def test_a_never_mask_table_made_in_inference_mode_still_masks():
    """An inference-mode tensor keeps no version counter: the tables' cache key raised on it (a regression of the
    cache, for direct callers of the kernel); its tables are built at each call instead, as before the cache."""
    with torch.inference_mode():
        never = torch.zeros(V, dtype=torch.bool, device=DEVICE)
        never[7] = True
        ids = _ids(64, torch.int64, seed=5)
        out = mlm_mask(ids, vocab_size=V, mask_id=MASK, seed=1, step=0, never_mask=never, mask_prob=1.0,
                       backend="torch")  # fmt: skip
    assert not ((out.masked_labels == 7).any()) and (out.masked_labels != -100).sum() > 0
