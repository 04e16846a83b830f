"""Philox4x32-10 in torch against published answers and against Triton (tl.randint4x and our own kernel-side
function), bit for bit. On CPU the Triton side runs under TRITON_INTERPRET=1 (set in conftest)."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import requires_triton

from mlmtrain.kernels import mlm_mask as mm
from mlmtrain.kernels.philox import philox4x32_torch, stream_words


def test_philox_known_answers():
    """Random123's published Philox4x32-10 vectors (kat_vectors): counter[4], key[2] -> output[4]."""
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFF_FFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            0x299F31D0_A4093822,
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, want in cases:
        got = philox4x32_torch(*[torch.tensor([c]) for c in counter], key)
        assert tuple(int(x) for x in got) == want, [hex(int(x)) for x in got]


@requires_triton
def test_philox_is_tritons_stream():
    """At step 0 our counter layout is tl.randint4x's: (offset lo, offset hi, 0, 0), key = seed."""
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out_ptr, offsets_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        r0, r1, r2, r3 = tl.randint4x(seed, tl.load(offsets_ptr + i))
        tl.store(out_ptr + 4 * i, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    offsets = torch.tensor([0, 1, 12345, 2**32 + 5, 2**40 + 7, 2**62, 99, 3], dtype=torch.int64, device=DEVICE)
    out = torch.empty(32, dtype=torch.int64, device=DEVICE)
    seed = 0x12_3456_7890
    randint4x_kernel[(1,)](out, offsets, seed, N=8)
    zero = torch.zeros_like(offsets)
    ref = torch.stack(philox4x32_torch(offsets & 0xFFFFFFFF, offsets >> 32, zero, zero, seed), 1).reshape(-1)
    assert torch.equal(out, ref)


if mm.triton is not None:
    import triton
    import triton.language as tl

    from mlmtrain.kernels.philox import as_u32, philox_words

    @triton.jit(do_not_specialize=["q_lo", "q_hi", "step_lo", "step_hi", "seed_lo", "seed_hi"])  # as the kernels
    def _words_kernel(out_ptr, q_lo, q_hi, step_lo, step_hi, seed_lo, seed_hi, TAG: tl.constexpr, N: tl.constexpr):
        k = tl.arange(0, N)  # (N,) groups past q
        w0, w1, w2, w3 = philox_words(
            as_u32(q_lo), as_u32(q_hi), k, TAG, as_u32(step_lo), as_u32(step_hi), as_u32(seed_lo), as_u32(seed_hi)
        )
        tl.store(out_ptr + 4 * k, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * k + 1, w1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * k + 2, w2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + 4 * k + 3, w3.to(tl.int64) & 0xFFFFFFFF)


@requires_triton
@pytest.mark.parametrize("per_call, tag", [(4, 0), (2, 1 << 31)])
def test_triton_stream_equals_torch_stream(per_call, tag):
    """The kernels' `philox_words` (counter q + k with a stream tag, step, seed) gives `stream_words`' bits."""
    from mlmtrain.kernels.philox import split64

    offset, step, seed, groups = (2**33 - 3) * per_call, 2**40 + 11, 0xDEAD_BEEF_1234, 16
    out = torch.empty(4 * groups, dtype=torch.int64, device=DEVICE)
    _words_kernel[(1,)](out, *split64(offset // per_call), *split64(step), *split64(seed), TAG=tag, N=groups)
    want = stream_words(offset, groups * per_call, per_call, tag, step, seed, DEVICE).reshape(-1)
    assert torch.equal(out, want)
