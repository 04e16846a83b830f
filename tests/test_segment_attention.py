"""The segment-attention kernels (attention within the segments of short rows) against their torch reference:
outputs and the gradients of q, k and v, at odd row lengths, one-token segments, whole-row segments and odd head
sizes, with a tolerance per dtype, given as views of one fused qkv tensor (the model's layout). The reference
against a dense-mask SDPA, no leak across segments, the custom ops' checks, and the sm_90 build. On CPU the
kernels run under TRITON_INTERPRET=1 (set in conftest)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE as DEVICE
from conftest import requires_cuda, requires_triton
from hopper_build import assert_builds_for_hopper, build

from mlmtrain.kernels import segment_attention as sa
from mlmtrain.kernels.segment_attention import segment_attention, segment_attention_reference


def _lowp_reference(q, k, v, segment_ids):
    """The same math in the inputs' own dtype (scores, softmax and products rounded to it): the error a 16-bit
    torch implementation makes, which the kernels' error is held to (flash attention's test criterion)."""
    (R, L), D = segment_ids.shape, q.shape[-1]
    q, k, v = (t.unflatten(0, (R, L)) for t in (q, k, v))  # (R, L, H, D)
    scores = torch.einsum("rihd,rjhd->rhij", q, k) / D**0.5
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    probs = scores.masked_fill(~same, float("-inf")).softmax(-1)
    return torch.einsum("rhij,rjhd->rihd", probs, v).flatten(0, 1)


def _assert_within_lowp_error(got, ref, lowp):
    """fp32: within 1e-5 relative to the largest value; 16-bit: at most twice the 16-bit torch error, plus one
    unit in the last place of the largest value (where that error is 0, e.g. one-token segments, a softmax of
    one; Triton's CPU interpreter casts fp32 to bf16 by truncation, where a GPU rounds to nearest)."""
    fp32, dtype = lowp is ref, got.dtype
    got, ref, lowp = got.float(), ref.float(), lowp.float()
    scale = ref.abs().max().item()
    if fp32:  # fp32 inputs: no 16-bit error to compare with
        bound = 1e-5 * scale
    else:
        bound = 2 * (lowp - ref).abs().max().item() + torch.finfo(dtype).eps * scale
    assert (got - ref).abs().max().item() <= bound


def _segments(R, L, kind, g):
    """(R, L) int32 segment ids, each row's segments consecutive as the packer lays them (ids increase)."""
    if kind == "random":  # segments of 1-12 tokens, a [PAD] tail among them
        lengths = torch.randint(1, 13, (R * L,), generator=g)
        ids = torch.repeat_interleave(torch.arange(R * L), lengths)[: R * L]
    elif kind == "one-token":
        ids = torch.arange(R * L)
    else:  # "whole-row": every row one segment
        ids = torch.arange(R).repeat_interleave(L)
    return ids.view(R, L).to(DEVICE, torch.int32)


def _inputs(R, L, H, D, dtype, seed=0):
    """qkv (T, 3, H, D), the leaf to differentiate, and the generator for what else the test draws."""
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(R * L, 3, H, D, generator=g)).to(DEVICE, dtype).requires_grad_()
    return qkv, g


def _run(backend, qkv, segment_ids, dout):
    if backend == "lowp":
        out = _lowp_reference(*qkv.unbind(1), segment_ids)
    else:
        out = segment_attention(qkv, segment_ids, backend=backend)
    return out, torch.autograd.grad(out, qkv, dout)[0]


@requires_triton
@pytest.mark.parametrize("R,L,H,D", [(1, 16, 1, 16), (3, 40, 2, 16), (2, 128, 2, 64), (4, 33, 3, 24), (2, 7, 1, 8)])
@pytest.mark.parametrize("kind", ["random", "one-token", "whole-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(R, L, H, D, kind, dtype):
    qkv, g = _inputs(R, L, H, D, dtype, seed=R * L + D)
    segment_ids = _segments(R, L, kind, g)
    dout = torch.randn(R * L, H, D, generator=g).to(DEVICE, dtype)
    out, dqkv = _run("triton", qkv, segment_ids, dout)
    out_ref, dqkv_ref = _run("torch", qkv, segment_ids, dout)  # fp32 math
    out_lowp, dqkv_lowp = _run("lowp", qkv, segment_ids, dout) if dtype != torch.float32 else (out_ref, dqkv_ref)
    assert out.dtype == dqkv.dtype == dtype and out.shape == (R * L, H, D)
    _assert_within_lowp_error(out, out_ref, out_lowp)
    _assert_within_lowp_error(dqkv, dqkv_ref, dqkv_lowp)


@requires_triton
def test_one_token_segments_return_their_value_and_no_query_or_key_gradient():
    """A token alone in its segment attends only to itself: out = v, and dq = dk = 0 (softmax over one key)."""
    qkv, g = _inputs(2, 24, 2, 16, torch.float32)
    segment_ids = _segments(2, 24, "one-token", g)
    out, dqkv = _run("triton", qkv, segment_ids, torch.randn(48, 2, 16, device=DEVICE))
    torch.testing.assert_close(out, qkv[:, 2], rtol=0, atol=1e-6)
    assert dqkv[:, :2].abs().max() < 1e-4  # dP - rowsum(dO * O), each ~10, cancel to fp32 rounding


@requires_triton
def test_nothing_leaks_across_segments_or_rows():
    """Changing the tokens of one segment changes neither the outputs nor the gradients of any other token."""
    qkv, g = _inputs(2, 32, 2, 16, torch.float32)
    segment_ids = _segments(2, 32, "random", g)
    dout = torch.randn(64, 2, 16, generator=g).to(DEVICE)
    out, dqkv = _run("triton", qkv, segment_ids, dout)
    changed = segment_ids.flatten() == segment_ids[1, 5]  # one segment of row 1
    other = qkv.detach().clone()
    other[changed] += 3.0
    out2, dqkv2 = _run("triton", other.requires_grad_(), segment_ids, dout)
    assert torch.equal(out[~changed], out2[~changed]) and torch.equal(dqkv[~changed], dqkv2[~changed])
    assert not torch.equal(out[changed], out2[changed])


def test_reference_is_sdpa_with_the_block_diagonal_mask():
    g = torch.Generator().manual_seed(3)
    R, L, H, D = 2, 20, 2, 8
    qkv = torch.randn(R * L, 3, H, D, generator=g)
    segment_ids = torch.repeat_interleave(torch.arange(8), torch.tensor([3, 7, 1, 9, 5, 5, 6, 4])).view(R, L)
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (R, 1, L, L)
    q4, k4, v4 = (t.unflatten(0, (R, L)).transpose(1, 2) for t in qkv.unbind(1))  # (R, H, L, D)
    expected = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask).transpose(1, 2).flatten(0, 1)
    torch.testing.assert_close(segment_attention_reference(qkv, segment_ids), expected)


def test_bad_arguments():
    qkv = torch.zeros(12, 3, 2, 8)
    with pytest.raises(ValueError, match="R\\*L"):
        segment_attention(qkv, torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="R\\*L"):
        segment_attention(torch.zeros(12, 2, 2, 8), torch.zeros(2, 6, dtype=torch.int32))  # not q, k, v
    with pytest.raises(ValueError, match="at most 128"):
        segment_attention(torch.zeros(129, 3, 1, 8), torch.zeros(1, 129, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        segment_attention(qkv, torch.zeros(2, 6, dtype=torch.int32), backend="cuda")


@requires_triton
def test_custom_ops_pass_opcheck():
    qkv, g = _inputs(2, 16, 2, 16, torch.float32)
    qkv, segment_ids = qkv.detach(), _segments(2, 16, "random", g)
    torch.library.opcheck(sa._fwd_op, (qkv, segment_ids))
    out, lse = sa._fwd_op(qkv, segment_ids)
    torch.library.opcheck(sa._bwd_op, (torch.randn_like(out), qkv, out, lse, segment_ids))


@requires_cuda
def test_full_batch_on_cuda():
    """BERT-base's rows at 64k tokens (512 rows of 128, 12 heads of 64), bf16, against the reference."""
    qkv, g = _inputs(512, 128, 12, 64, torch.bfloat16)
    segment_ids = _segments(512, 128, "random", g)
    dout = torch.randn(512 * 128, 12, 64, generator=g).to(DEVICE, torch.bfloat16)
    out, dqkv = _run("triton", qkv, segment_ids, dout)
    out_ref, dqkv_ref = _run("torch", qkv, segment_ids, dout)
    out_lowp, dqkv_lowp = _run("lowp", qkv, segment_ids, dout)
    _assert_within_lowp_error(out, out_ref, out_lowp)
    _assert_within_lowp_error(dqkv, dqkv_ref, dqkv_lowp)


def test_kernels_compile_for_hopper_without_a_gpu():
    """Both kernels at BERT's shape (rows of 128, heads of 64) in bf16 and fp16 and at an odd one in fp32, with the
    launchers' blocks, warps and stages, to sm_90."""
    builds = []
    for kernel, launch in (
        ("_segment_attention_fwd_kernel", sa.FWD_LAUNCH),
        ("_segment_attention_bwd_kernel", sa.BWD_LAUNCH),
    ):
        for L, D, dtype in ((128, 64, torch.bfloat16), (128, 64, torch.float16), (40, 24, torch.float32)):
            consts = {**sa._launch(launch, L, D, dtype), "UPCAST": False}
            warps, stages = consts.pop("num_warps"), consts.pop("num_stages")
            pointers = {"segment_ptr": "i32", "lse_ptr": "fp32"}
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
            builds.append(build(sa.__name__, kernel, name, consts, warps, pointers=pointers, num_stages=stages,
                                floats=("scale", "scale_log2"), divisible=("H", "D")))  # fmt: skip
    assert_builds_for_hopper(builds)


def test_heads_wider_than_the_tile_are_refused():
    """D > 128 is refused (the kernel holds a head in one tile of at most 128), as L > 128 is.
    Kills: sa_head_dim_unchecked."""
    with pytest.raises(ValueError, match="heads of at most 128.*D=129"):
        segment_attention(torch.zeros(16, 3, 1, 129), torch.zeros(1, 16, dtype=torch.int32))


@requires_triton
def test_custom_ops_pass_opcheck_in_bf16():
    """The backward op's fake function in bf16 (the training dtype): dqkv in qkv's dtype, where the existing fp32
    opcheck cannot tell qkv's dtype from fp32. Kills: sa_fake_bwd_dtype."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(32, 3, 2, 16, generator=g).to(DEVICE, torch.bfloat16)
    segment_ids = torch.repeat_interleave(torch.arange(6), torch.tensor([5, 3, 8, 7, 1, 8])).view(2, 16)
    segment_ids = segment_ids.to(DEVICE, torch.int32)
    torch.library.opcheck(sa._fwd_op, (qkv, segment_ids))
    out, lse = sa._fwd_op(qkv, segment_ids)
    torch.library.opcheck(sa._bwd_op, (torch.randn_like(out), qkv, out, lse, segment_ids))


@pytest.mark.skipif(sa.triton is None, reason="needs triton")
def test_launch_tiles_are_at_least_16_for_tl_dot():
    """tl.dot needs >= 16 per side: short rows and small heads still launch 16-wide tiles (the CPU interpreter
    runs narrower dots, a GPU build does not). Kills: sa_block_l_no_min16."""
    for L, D in ((7, 8), (1, 1), (16, 16), (33, 24)):
        for kernel in (sa.FWD_LAUNCH, sa.BWD_LAUNCH):
            launch = sa._launch(kernel, L, D, torch.bfloat16)
            assert launch["BLOCK_L"] >= max(16, L) and launch["BLOCK_D"] >= max(16, D)
            assert 16 <= launch["BLOCK_M"] <= launch["BLOCK_L"]
