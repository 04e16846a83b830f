"""Counter-based random bits: Philox4x32-10 (Salmon et al., SC'11; the generator of Triton's `tl.randint` and of
curand), written out in Triton and in torch so the two give the same bits for the same (counter, key).

Streams as the kernels use them: key = the seed (64 bits); counter = (q, step), q = a group index of consecutive
global element indices (64 bits, a stream tag in its top bit), step = a 64-bit key of the call (the optimizer
step). One call gives four 32-bit words, shared out in order among `per_call` consecutive indices
(`stream_words`). There is no generator state: the same (seed, step, index) gives the same bits on any rank,
after any resume, in the kernel and in the reference.
"""

from __future__ import annotations

import torch

from mlmtrain.kernels import tl, triton

M32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al., SC'11; identical to triton.language.random and curand).
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10

if triton is not None:

    @triton.jit
    def philox4x32(c0, c1, c2, c3, k0, k1, N_ROUNDS: tl.constexpr):
        """Philox4x32 on uint32 blocks; written out (not tl.randint4x) so the counter layout and the rounds
        are ours on every Triton version, matching `philox4x32_torch` bit for bit."""
        for _ in tl.static_range(N_ROUNDS):
            _c0, _c2 = c0, c2
            c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
            c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
            c1 = _c2 * 0xCD9E8D57
            c3 = _c0 * 0xD2511F53
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def philox_words(q_lo, q_hi, k, stream_tag, step_lo, step_hi, seed_lo, seed_hi):
        """Philox words for counter (q + k as 64 bits with `stream_tag` in the top bit, step as 64 bits)."""
        c0 = q_lo + k.to(tl.uint32)  # low word of q + k, wraps
        c1 = (q_hi + (c0 < q_lo).to(tl.uint32)) | stream_tag  # carry into the high word
        zero = c0 * 0
        return philox4x32(c0, c1, zero + step_lo, zero + step_hi, seed_lo, seed_hi, 10)

    @triton.jit
    def as_u32(x):
        """An i32 (or u32) kernel scalar's bits as uint32. tl.cast, not x.to: a launch passes an int equal to 1 as a
        constant (a Python int, which has no .to) unless the kernel lists it in do_not_specialize."""
        return tl.cast(x, tl.uint32, bitcast=True)


def split64(value: int) -> tuple[int, int]:
    """A 64-bit counter word as two int32 kernel scalars. A kernel lists them in do_not_specialize, so a new value
    compiles nothing new (Triton otherwise specialises an int equal to 1, or divisible by 16)."""
    lo, hi = value & M32, (value >> 32) & M32
    return tuple(v - (1 << 32) if v >= 1 << 31 else v for v in (lo, hi))


def _mul32(x: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of x * constant for x in [0, 2^32) held in int64, without overflowing int64:
    split the constant in 16-bit halves so each partial product stays below 2^48."""
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    low_part, high_part = x * c_lo, x * c_hi  # < 2^48 each; x * constant = high_part * 2^16 + low_part
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & M32
    return hi, lo


def philox4x32_torch(c0, c1, c2, c3, key: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; key is a 64-bit python int. Bit-exact with the kernel."""
    k0, k1 = key & M32, (key >> 32) & M32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & M32, (k1 + PHILOX_KEY_B) & M32
    return c0, c1, c2, c3


def stream_words(offset: int, T: int, per_call: int, stream_tag: int, step: int, seed: int, device):
    """Philox words of global indices offset .. offset + T - 1 for one stream: one call per `per_call`
    consecutive indices (counter = index // per_call, tag in the top bit of its high word), its four words
    shared out in order. Returns (T,) for per_call 4, (T, 2) for per_call 2."""
    first, last = offset // per_call, (offset + T - 1) // per_call
    group = torch.arange(first, last + 1, device=device, dtype=torch.int64)  # (G,)
    zero = torch.zeros_like(group)
    words = philox4x32_torch(group & M32, (group >> 32) | stream_tag, zero + (step & M32), zero + (step >> 32), seed)
    words = torch.stack(words, 1).reshape(-1, 4 // per_call).squeeze(1)  # (G * per_call,) or (G * 2, 2)
    start = offset % per_call
    return words[start : start + T]
