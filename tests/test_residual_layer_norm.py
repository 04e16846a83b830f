"""The fused residual + dropout + LayerNorm kernels against their torch reference (forward and every gradient,
shapes x dtypes with a tolerance per dtype), the reference against F.layer_norm, and the dropout mask: its
statistics, its determinism, and that the forward, the backward and the reference draw the same one.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest), so sizes stay at a few thousand elements.
Statistical checks are two-sided binomial z-tests with |z| < 5 (false failure 5.7e-7 for a fresh seed); the
bits are a pure function of (seed, row, column), so each check passes or fails the same way on every run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE as DEVICE
from conftest import requires_cuda, requires_triton
from hopper_build import assert_builds_for_hopper, build

from mlmtrain.kernels import residual_layer_norm as rln
from mlmtrain.kernels import triton_runs_on
from mlmtrain.kernels.residual_layer_norm import (
    dropout_keep_mask,
    dropout_threshold,
    residual_layer_norm,
    residual_layer_norm_reference,
)

Z_MAX = 5.0
EPS = 1e-12  # BERT's layer_norm_eps
# (rtol, atol) per dtype: outputs are rounded once from fp32, so a few units in the last place of the dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 3e-2), torch.float16: (3e-3, 3e-3)}


def _inputs(N, C, dtype=torch.float32, residual_dtype=None, param_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(DEVICE, dtype).requires_grad_()
    residual = (3 * torch.randn(N, C, generator=g) + 1).to(DEVICE, residual_dtype or dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(DEVICE, param_dtype).requires_grad_()
    bias = (0.1 * torch.randn(C, generator=g)).to(DEVICE, param_dtype).requires_grad_()
    return x, residual, weight, bias


def _seed(value=0x1234_5678_9ABC):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _run(backend, inputs, p, seed, dy):
    """y and (dx, dresidual, dweight, dbias) through one backend."""
    y = residual_layer_norm(*inputs, EPS, p, seed, backend=backend)
    return y, torch.autograd.grad(y, inputs, dy)


# ---- kernel == reference ------------------------------------------------------------------------------
@requires_triton
@pytest.mark.parametrize("N,C", [(1, 96), (7, 200), (129, 128), (5, 768), (3, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_kernel_matches_reference(N, C, dtype, p):
    inputs = _inputs(N, C, dtype, seed=N * C)
    dy = torch.randn(N, C, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y, grads = _run("triton", inputs, p, _seed(), dy)
    y_ref, grads_ref = _run("torch", inputs, p, _seed(), dy)
    assert y.dtype == dtype and y.shape == (N, C)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    for name, got, want, source in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_ref, inputs):
        assert got.dtype == source.dtype and got.shape == source.shape, name
        # dweight, dbias sum N rows in a different order: allow for it
        scale = math.sqrt(N) if name in ("dweight", "dbias") else 1.0
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}")


@requires_triton
@pytest.mark.parametrize("N,C", [(7, 200), (5, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_x_bias_added_in_the_kernel_and_its_gradient_summed_there(N, C, dtype, p):
    """x_bias (the sublayer matmul's bias, fp32 as under autocast) added to x before the dropout: y and every
    gradient, x_bias's included (summed over rows in the backward kernel), match the reference."""
    x, residual, weight, bias = _inputs(N, C, dtype, seed=N + C)
    x_bias = torch.randn(C, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_()
    dy = torch.randn(N, C, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    inputs = (x, residual, weight, bias, x_bias)
    out = {}
    for backend in ("triton", "torch"):
        y, _ = rln.residual_layer_norm_routed(
            x, residual, None, weight, bias, EPS, p, _seed(), x_bias=x_bias, backend=backend
        )
        out[backend] = (y, *torch.autograd.grad(y, inputs, dy))
    names = ("y", "dx", "dresidual", "dweight", "dbias", "dx_bias")
    for name, got, want in zip(names, out["triton"], out["torch"]):
        rtol, atol = (TOL if name == "y" else GRAD_TOL)[dtype]
        scale = math.sqrt(N) if name in ("dweight", "dbias", "dx_bias") else 1.0  # sums in another order
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert out["triton"][-1].dtype == torch.float32


@requires_triton
def test_mixed_dtypes_and_leading_dims():
    """A bf16 sublayer output onto an fp32 residual stream (what autocast gives today): y is fp32, each
    gradient comes back in its input's dtype; bf16 parameters give bf16 dweight, dbias."""
    x, residual, weight, bias = _inputs(
        12, 96, torch.bfloat16, residual_dtype=torch.float32, param_dtype=torch.bfloat16
    )
    inputs = [t.detach().view(3, 4, 96).requires_grad_() for t in (x, residual)] + [weight, bias]
    dy = torch.randn(3, 4, 96, device=DEVICE)
    y, grads = _run("triton", inputs, 0.1, _seed(), dy)
    y_ref, grads_ref = _run("torch", inputs, 0.1, _seed(), dy)
    assert y.dtype == torch.float32 and y.shape == (3, 4, 96)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want, source in zip(grads, grads_ref, inputs):
        assert got.dtype == source.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=3e-2)


@requires_triton
def test_backward_launch_geometry_and_strided_inputs():
    """The backward's tile and program count change no element of dx or dresidual (each row is one program's) and
    only the order of the dweight / dbias partial sums; a strided input (a transposed view) and p near 1 match
    the reference too."""
    N, C, p = 37, 96, 0.1
    x, residual, weight, bias = (t.detach() for t in _inputs(N, C))
    dy = torch.randn(N, C, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y, mean, rstd = rln.residual_layer_norm_fwd_triton(x, residual, weight, bias, _seed(), EPS, p)
    runs = [
        rln.residual_layer_norm_bwd_triton(dy, x, residual, weight, _seed(), mean, rstd, p, block_n=bn, num_programs=P)
        for bn, P in ((None, None), (1, 1), (2, 3), (16, 7), (64, 200))
    ]
    for dresidual, dx, sums in runs[1:]:
        assert torch.equal(dresidual, runs[0][0]) and torch.equal(dx, runs[0][1])
        torch.testing.assert_close(sums, runs[0][2], rtol=1e-5, atol=1e-5)
    dy = dy[:8, :32]
    strided = [t[:32, :8].t().requires_grad_() for t in (x, residual)] + [
        t[:32].requires_grad_() for t in (weight, bias)
    ]
    for p in (0.1, 0.99):
        (y, grads), (y_ref, grads_ref) = (_run(b, strided, p, _seed(), dy) for b in ("triton", "torch"))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@requires_triton
def test_no_rows():
    inputs = _inputs(0, 64)
    y = residual_layer_norm(*inputs, EPS, 0.1, _seed(), backend="triton")
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    assert y.shape == (0, 64) and all(g.shape == t.shape for g, t in zip(grads, inputs))
    assert not grads[2].any() and not grads[3].any()


# ---- p = 0: plain LayerNorm of the sum ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_dropout_is_layer_norm_of_sum(dtype):
    """The reference is F.layer_norm(x + residual) itself (bit for bit in fp32); the kernel matches it to
    rounding. In bf16 the sum is kept in fp32, so compare with F.layer_norm of the fp32 sum."""
    x, residual, weight, bias = _inputs(33, 200, dtype)
    want = F.layer_norm(x.float() + residual.float(), (200,), weight, bias, EPS).to(dtype)
    ref = residual_layer_norm_reference(x, residual, weight, bias, EPS, 0.0)
    if dtype == torch.float32:
        assert torch.equal(ref, F.layer_norm(x + residual, (200,), weight, bias, EPS))
    assert torch.equal(ref, want)
    if triton_runs_on(DEVICE):
        got = residual_layer_norm(x, residual, weight, bias, EPS, 0.0, backend="triton")
        torch.testing.assert_close(got, want, rtol=TOL[dtype][0], atol=TOL[dtype][1])
        # training=False turns dropout off, whatever p and seed say
        assert torch.equal(residual_layer_norm(x, residual, weight, bias, EPS, 0.5, _seed(), training=False), got)


@requires_triton
def test_leaf_inputs_accumulate_their_own_gradients():
    """p = 0 and one dtype: x and residual get one gradient, dL/dh. As leaves, each .grad is its own buffer, so a
    second backward (gradient accumulation) adds each input's gradient once, as torch's add does."""
    x, residual, weight, bias = _inputs(4, 16)
    dy = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for _ in range(2):
        residual_layer_norm(x, residual, weight, bias, EPS, 0.0, backend="triton").backward(dy)
    assert x.grad.data_ptr() != residual.grad.data_ptr()
    want = torch.autograd.grad(residual_layer_norm_reference(x, residual, weight, bias, EPS, 0.0), x, dy)[0]
    torch.testing.assert_close(x.grad, 2 * want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(residual.grad, 2 * want, rtol=1e-4, atol=1e-4)


# ---- the dropout mask -----------------------------------------------------------------------------------
def _binomial_z(k: int, n: int, q: float) -> float:
    return (k - n * q) / math.sqrt(n * q * (1 - q))


@requires_triton
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_dropout_rate_and_scale(p):
    """Read the kernel's own mask off its gradients: dx = dh / (1 - p) where kept, 0 where dropped."""
    N, C = 64, 256
    inputs = _inputs(N, C)
    _, (dx, dresidual, _, _) = _run("triton", inputs, p, _seed(7), torch.randn(N, C, device=DEVICE))
    kept = dx != 0
    _, scale = dropout_threshold(p)
    assert abs(scale * (1 - p) - 1) < 1e-4  # 1 / (1 - p) up to the 2^-16 quantisation of p
    assert torch.equal(dx[kept], dresidual[kept] * scale)  # fp32: the same single multiply
    assert abs(_binomial_z(int(kept.sum()), N * C, 1 - p)) < Z_MAX


def test_reference_mask_statistics():
    """At 1M bits: the keep rate overall and in each of the 8 column lanes of a Philox call, and no
    dependence between neighbouring elements (both halves of one word, and the next word)."""
    N, C, p = 1024, 1024, 0.1
    keep = dropout_keep_mask(_seed(99), N, C, p)
    q = 1 - dropout_threshold(p)[0] / 65536
    assert abs(_binomial_z(int(keep.sum()), N * C, q)) < Z_MAX
    lanes = keep.view(N, C // 8, 8).sum((0, 1))  # (8,) kept per column lane
    for k in lanes.tolist():
        assert abs(_binomial_z(k, N * C // 8, q)) < Z_MAX, lanes
    for lag in (1, 2):  # 1: two halves of a word (even columns); 2: neighbouring words
        a, b = keep[:, 0:-lag:2], keep[:, lag::2]
        both_dropped = int((~a & ~b).sum())
        assert abs(_binomial_z(both_dropped, a.numel(), (1 - q) ** 2)) < Z_MAX, lag
    rows_differ = (keep[0] != keep[1]).float().mean()  # rows are separate counters, not copies
    assert 0.1 < rows_differ < 0.3


@requires_triton
@pytest.mark.parametrize("seed", [0x1234_5678_9ABC, -1, 0])
def test_forward_backward_and_reference_share_the_mask(seed):
    """Dropped elements of x do not reach y (so the forward used the reference's mask), and dx is exactly 0
    at those elements and only there (so the backward regenerated it)."""
    N, C, p = 40, 200, 0.3
    x, residual, weight, bias = _inputs(N, C)
    keep = dropout_keep_mask(_seed(seed), N, C, p)
    y = residual_layer_norm(x, residual, weight, bias, EPS, p, _seed(seed), backend="triton")
    poked = x.detach() + torch.where(keep, 0.0, 100.0)  # change only what should be dropped
    assert torch.equal(residual_layer_norm(poked, residual, weight, bias, EPS, p, _seed(seed), backend="triton"), y)
    poked = x.detach() + torch.where(keep, 0.5, 0.0)
    assert not torch.equal(residual_layer_norm(poked, residual, weight, bias, EPS, p, _seed(seed), backend="triton"), y)
    (dx,) = torch.autograd.grad(y, x, torch.randn(N, C, device=DEVICE))
    assert torch.equal(dx != 0, keep)


@requires_triton
def test_same_seed_same_output_other_seed_other_mask():
    inputs = _inputs(16, 128)
    a, b = (residual_layer_norm(*inputs, EPS, 0.1, _seed(5), backend="triton") for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, residual_layer_norm(*inputs, EPS, 0.1, _seed(6), backend="triton"))


def test_seed_none_draws_from_torch_generator():
    """No seed: one drawn from torch's generator for the device, so torch.manual_seed reproduces the call."""
    inputs = _inputs(16, 128)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(residual_layer_norm(*inputs, EPS, 0.1))
    assert torch.equal(*outputs)
    assert not torch.equal(outputs[0], residual_layer_norm(*inputs, EPS, 0.1))


@requires_triton
def test_p_one_drops_everything():
    x, residual, weight, bias = _inputs(5, 96)
    y = residual_layer_norm(x, residual, weight, bias, EPS, 1.0, _seed(), backend="triton")
    torch.testing.assert_close(y, F.layer_norm(residual, (96,), weight, bias, EPS), rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert not dx.any()


def test_bad_arguments():
    x, residual, weight, bias = _inputs(4, 32)
    with pytest.raises(ValueError, match="same shape"):
        residual_layer_norm(x, residual[:2], weight, bias)
    with pytest.raises(ValueError, match="weight and bias"):
        residual_layer_norm(x, residual, weight[:3], bias)
    with pytest.raises(ValueError, match="p must be"):
        residual_layer_norm(x, residual, weight, bias, p=1.5)
    with pytest.raises(ValueError, match="seed must be"):
        residual_layer_norm(x, residual, weight, bias, p=0.1, seed=torch.tensor([1.0], device=DEVICE))
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        residual_layer_norm(x.double(), residual, weight, bias)


@requires_triton
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gradient_port_routes_the_next_layernorms_residual_gradient(p):
    """Two chained LayerNorms, the second taking the first's output as its residual: with the first's gradient
    port (residual_layer_norm_routed) the second hands its residual gradient through the port and the first's
    backward kernel adds it to dy as it loads them; every input's gradient equals the unrouted chain's (where
    autograd adds the two), and the port holds no memory (stride 0)."""
    x1, residual, weight, bias = _inputs(21, 200, seed=1)
    x2 = torch.randn(21, 200, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
    w = torch.randn(200, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # the matmul y1 feeds
    inputs = (x1, residual, weight, bias, x2)
    grads = []
    for routed in (False, True):
        y1, port = rln.residual_layer_norm_routed(x1, residual, None, weight, bias, EPS, p, _seed(1))
        assert port.shape == y1.shape and port.stride() == (0, 0)
        y2, _ = rln.residual_layer_norm_routed(
            x2 + y1 @ w, y1, port if routed else None, weight, bias, EPS, p, _seed(2)
        )
        grads.append(torch.autograd.grad((y2 * y2).sum(), inputs))
    for name, a, b in zip(("x1", "residual", "weight", "bias", "x2"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # a port must come with its own residual's shape, and a detached residual routes nothing through it
    with pytest.raises(ValueError, match="residual's shape"):
        rln.residual_layer_norm_routed(x2, y1, port[:3], weight, bias, EPS, p, _seed(2))
    y1, port = rln.residual_layer_norm_routed(x1, residual, None, weight, bias, EPS, p, _seed(1))
    y2, _ = rln.residual_layer_norm_routed(x2, y1.detach(), port, weight, bias, EPS, p, _seed(2))
    (dx1,) = torch.autograd.grad((y1.sum() + y2.sum()), (x1,))  # y1's own gradient only
    (dx1_alone,) = torch.autograd.grad(
        rln.residual_layer_norm(x1, residual, weight, bias, EPS, p, _seed(1)).sum(), (x1,)
    )
    torch.testing.assert_close(dx1, dx1_alone, rtol=1e-6, atol=1e-6)
    # the kernel itself: dy and dy2 summed in fp32 as they load, exactly the backward of their sum
    x, residual, weight, _ = (t.detach() for t in _inputs(9, 96))
    _, mean, rstd = rln.residual_layer_norm_fwd_triton(x, residual, weight, weight, _seed(), EPS, p)
    dy, dy2 = (torch.randn(9, 96, generator=torch.Generator().manual_seed(s)).to(DEVICE) for s in (4, 5))
    both = rln.residual_layer_norm_bwd_triton(dy, x, residual, weight, _seed(), mean, rstd, p, dy2=dy2)
    summed = rln.residual_layer_norm_bwd_triton(dy + dy2, x, residual, weight, _seed(), mean, rstd, p)
    for a, b in zip(both, summed):
        assert torch.equal(a, b)


class _NoGradient(torch.autograd.Function):
    """A consumer whose backward hands back no gradient (None) for its input."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return None


@requires_triton
def test_backward_with_no_gradient_for_y_or_its_port():
    """Gradients are not materialised (an unused port brings None): when y's only consumer returns None too, the
    backward still runs and gives nothing, as torch's own LayerNorm does."""
    x, residual, weight, bias = _inputs(4, 16)
    y = residual_layer_norm(x, residual, weight, bias, EPS, backend="triton")
    (_NoGradient.apply(y).sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and weight.grad is None


# ---- torch.compile, custom-op registration, CUDA graphs ---------------------------------------------------
@requires_triton
def test_custom_ops_pass_opcheck():
    """Schema, fake (shape) functions, autograd registration and AOT dispatch, as torch.library checks them."""
    x, residual, weight, bias = (t.detach() for t in _inputs(6, 48))
    x_bias = torch.randn(48, device=DEVICE)
    for port, xb in ((None, None), (rln._port(residual), x_bias)):  # with and without the port and x's bias
        torch.library.opcheck(rln._fwd_op, (x, xb, residual, port, weight, bias, _seed(), EPS, 0.1))
    stats = rln._fwd_op(x, None, residual, None, weight, bias, _seed(), EPS, 0.1)
    dy = torch.randn(6, 48, device=DEVICE)
    for dy2, xb in ((None, None), (torch.randn(6, 48, device=DEVICE), x_bias)):
        torch.library.opcheck(rln._bwd_op, (dy, dy2, x, xb, residual, weight, _seed(), stats[1], stats[2], 0.1))


@requires_triton
@pytest.mark.compile
def test_compiles_without_graph_break():
    """fullgraph=True fails on any graph break; the graph calls the fused op (not the reference), and the
    compiled forward and backward (AOT autograd; inductor's codegen adds ~15 s on CPU) equal eager."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    inputs = _inputs(8, 96)
    dy = torch.randn(8, 96, device=DEVICE)

    def f(x, residual, weight, bias, seed):
        return residual_layer_norm(x, residual, weight, bias, EPS, 0.1, seed) * 2

    recorder = EagerAndRecordGraphs()
    torch.compile(f, fullgraph=True, backend=recorder)(*inputs, _seed())
    assert "torch.ops.mlmtrain.residual_layer_norm_fwd.default" in recorder.graphs[0].code
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs, _seed())
    y_eager = f(*inputs, _seed())
    assert torch.equal(y, y_eager)
    for a, b in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_eager, inputs, dy)):
        assert torch.equal(a, b)


def test_kernels_compile_for_hopper_without_a_gpu():
    """Both kernels at the launcher's tiles, with and without dropout, to an sm_90 cubin (tests/hopper_build.py)."""
    builds = []
    for kernel in ("_residual_layer_norm_fwd_kernel", "_residual_layer_norm_bwd_kernel"):
        for C, dtype, dropout in ((768, "bf16", True), (128, "fp32", False)):
            block_n, block_c, warps = rln._tile(C, None, None)
            flags = dict.fromkeys(("HAS_DROPOUT", "WRITE_DX", "HAS_DY2", "HAS_X_BIAS"), dropout)
            consts = {"BLOCK_N": block_n, "BLOCK_C": block_c, **flags}
            fp32 = ("weight_ptr", "bias_ptr", "x_bias_ptr", "mean_ptr", "rstd_ptr")
            fp32 += ("dweight_partial_ptr", "dbias_partial_ptr", "dx_bias_partial_ptr")
            pointers = {"seed_ptr": "i64", **dict.fromkeys(fp32, "fp32")}
            builds.append(
                build(rln.__name__, kernel, dtype, consts, warps, pointers=pointers, floats=("eps", "keep_scale"))
            )
    assert_builds_for_hopper(builds)


@requires_cuda
@pytest.mark.parametrize("C", [768, 1024])
def test_full_batch_on_cuda(C):
    """A real batch (64k tokens: N * C past 2^25, many backward programs per partial sum) against the reference."""
    N = 65536
    inputs = _inputs(N, C, torch.bfloat16)
    dy = torch.randn(N, C, device=DEVICE, dtype=torch.bfloat16)
    y, grads = _run("triton", inputs, 0.1, _seed(), dy)
    y_ref, grads_ref = _run("torch", inputs, 0.1, _seed(), dy)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads[:2], grads_ref[:2]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=3e-2)
    for got, want in zip(grads[2:], grads_ref[2:]):  # sums over 64k rows in another order
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)


@requires_cuda
def test_cuda_graph_replay_reads_the_new_seed():
    """Captured once, replayed with another seed written into the captured tensor: the replay uses it."""
    inputs = [t.detach() for t in _inputs(4096, 768, torch.bfloat16)]
    seed = _seed(1)
    residual_layer_norm(*inputs, EPS, 0.1, seed)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = residual_layer_norm(*inputs, EPS, 0.1, seed)
    for value in (2, 3):
        seed.fill_(value)
        graph.replay()
        want = residual_layer_norm_reference(*inputs, EPS, 0.1, seed)
        torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.compile
def test_inductor_compile_on_cuda():
    inputs = _inputs(65536 // 16, 1024, torch.bfloat16)
    dy = torch.randn(4096, 1024, device=DEVICE, dtype=torch.bfloat16)

    def f(x, residual, weight, bias, seed):
        return residual_layer_norm(x, residual, weight, bias, EPS, 0.1, seed)

    y = torch.compile(f, fullgraph=True)(*inputs, _seed())
    y_eager = f(*inputs, _seed())
    assert torch.equal(y, y_eager)
    for a, b in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_eager, inputs, dy)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@requires_triton
def test_benchmark_runs_and_credits_every_row_the_same_bytes():
    from mlmtrain.benchmarks.bench_residual_layer_norm import logical_bytes, run

    rows = run(16, (40,), DEVICE, repeats=5, compile_rows=False, sweep=True)
    timed = [r for r in rows if "seconds" in r and r["passes"] == "fwd+bwd"]
    assert {"triton", "triton kernels", "torch eager"} <= {r["name"] for r in timed}
    assert any(r["name"].startswith("triton kernels ") for r in timed)  # the sweep's tiles
    assert all(r["bytes"] == logical_bytes(16, 40, 2, 0.1) for r in timed)
    assert rows[-1]["kind"] == "summary" and rows[-1]["speedup_vs_torch_eager"] > 0


@requires_triton
def test_an_element_at_the_dropout_threshold_is_kept_by_kernel_and_reference():
    """An element whose 16 random bits equal the threshold (1 in 65,536; drop iff bits < round(p * 2^16)) is kept
    by both: seed 20 puts one at row 7, column 61 for p = 0.3 (threshold 19,661), which p one step higher drops."""
    from mlmtrain.kernels.residual_layer_norm import (
        dropout_keep_mask,
        residual_layer_norm,
        residual_layer_norm_reference,
    )

    N, C, p = 8, 256, 0.3
    seed = torch.tensor([20], dtype=torch.int64, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(DEVICE).requires_grad_()
    residual, weight, bias = (
        torch.randn(N, C, generator=g).to(DEVICE),
        1 + torch.randn(C, generator=g).to(DEVICE),
        torch.randn(C, generator=g).to(DEVICE),
    )
    keep = dropout_keep_mask(seed, N, C, p)
    assert keep[7, 61] and not dropout_keep_mask(seed, N, C, 19662 / 65536)[7, 61]  # its bits are the threshold
    y = residual_layer_norm(x, residual, weight, bias, 1e-12, p, seed, backend="triton")
    (dx,) = torch.autograd.grad(y, x, torch.randn(N, C, generator=g).to(DEVICE))
    assert torch.equal(dx != 0, keep)  # the kernel's own mask, read back from where its gradient is zero
    torch.testing.assert_close(y, residual_layer_norm_reference(x, residual, weight, bias, 1e-12, p, seed))


def test_dropout_scale_is_exact_for_the_quantised_p():
    """Kept values are scaled by 1 / (1 - p_eff), p_eff = threshold / 2^16, so E[dropout(x)] = x exactly (module
    docstring); 1 / (1 - p) would bias every kept value by ~6e-6 relative at p = 0.1. Both the kernel and the
    reference read this one function, so no kernel-vs-reference test can see it.
    Kills: rln_scale_not_quantised."""
    for p in (0.1, 0.3, 1 / 3, 0.5, 0.99):
        threshold, scale = dropout_threshold(p)
        assert threshold == round(p * 65536)
        assert scale == 65536 / (65536 - threshold)
    assert dropout_threshold(0.0) == (0, 1.0) and dropout_threshold(1.0) == (65536, 0.0)


@requires_triton
@pytest.mark.parametrize("C", [1, 4, 6])
def test_kernel_rows_narrower_than_one_philox_call(C):
    """C < 8 (one Philox call covers 8 columns): the tile is still 8 columns wide, and y and every gradient
    match the reference with dropout on. Kills: rln_tile_no_min_cols."""
    g = torch.Generator().manual_seed(C)
    x, residual = (torch.randn(9, C, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(DEVICE).requires_grad_()
    bias = (0.1 * torch.randn(C, generator=g)).to(DEVICE).requires_grad_()
    seed = torch.tensor([77], dtype=torch.int64, device=DEVICE)
    dy = torch.randn(9, C, generator=g).to(DEVICE)
    out = []
    for backend in ("triton", "torch"):
        y = residual_layer_norm(x, residual, weight, bias, 1e-5, 0.3, seed, backend=backend)
        out.append((y, *torch.autograd.grad(y, (x, residual, weight, bias), dy)))
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@requires_triton
def test_no_dropout_mixed_dtypes_give_x_its_own_precision():
    """p = 0 with x fp32 onto a bf16 residual: dx is not dresidual (bf16) cast up, but written in fp32 from the fp32
    dL/dh, so it matches the reference to fp32 rounding (test_mixed_dtypes_and_leading_dims runs p = 0.1 only, where
    dx is written anyway). Kills: rln_writes_dx_ignores_dtypes."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 96, generator=g).to(DEVICE).requires_grad_()
    residual = (3 * torch.randn(12, 96, generator=g) + 1).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = (1 + 0.5 * torch.randn(96, generator=g)).to(DEVICE).requires_grad_()
    bias = (0.1 * torch.randn(96, generator=g)).to(DEVICE).requires_grad_()
    dy = torch.randn(12, 96, generator=g).to(DEVICE)
    grads = []
    for backend in ("triton", "torch"):
        y = residual_layer_norm(x, residual, weight, bias, 1e-12, 0.0, backend=backend)
        grads.append(torch.autograd.grad(y, (x, residual), dy))
    (dx, dresidual), (dx_ref, dresidual_ref) = grads
    assert dx.dtype == torch.float32 and dresidual.dtype == torch.bfloat16
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dresidual, dresidual_ref, rtol=2e-2, atol=3e-2)


def _accumulate_twice(make_inputs):
    """Two backward passes (gradient accumulation) through the kernel at p = 0, one dtype (dx is dresidual then):
    returns the leaves a (under x) and r (under residual), and the reference gradient of one pass."""
    g = torch.Generator().manual_seed(0)
    a, r = (torch.randn(4, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    weight, bias = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    dy = torch.randn(4, 16, generator=g).to(DEVICE)
    for _ in range(2):
        x, residual = make_inputs(a, r)
        residual_layer_norm(x, residual, weight, bias, 1e-12, 0.0, backend="triton").backward(dy)
    want = torch.autograd.grad(residual_layer_norm_reference(a, r, weight, bias, 1e-12, 0.0), a, dy)[0]
    return a, r, want


@requires_triton
def test_leaf_residual_under_a_pass_through_x_accumulates_its_own_gradient():
    """Only the residual a leaf, x a non-leaf whose backward hands its gradient on as it is (a + 0.0): dL/dh must
    still not become one buffer for two leaves' .grad (test_leaf_inputs_accumulate_their_own_gradients has both
    leaves, where x alone decides). Kills: rln_leaf_only_x."""
    a, r, want = _accumulate_twice(lambda a, r: (a + 0.0, r))
    assert a.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(a.grad, 2 * want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.grad, 2 * want, rtol=1e-4, atol=1e-4)


@requires_triton
def test_pass_through_inputs_accumulate_their_own_gradients():
    """Neither input a leaf, both produced by ops whose backward passes the gradient on unchanged: the two leaves
    must still get their own .grad, as with torch's add (F.layer_norm(x + residual) gives distinct buffers). Before
    2026-12-01 they shared one (the mutation review's finding): only a residual routed to its port shares now."""
    a, r, want = _accumulate_twice(lambda a, r: (a + 0.0, r + 0.0))
    assert a.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(a.grad, 2 * want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.grad, 2 * want, rtol=1e-4, atol=1e-4)


@requires_triton
def test_custom_ops_pass_opcheck_without_dropout():
    """The p = 0 branch of the fake functions (no seed, dx an empty (0,) tensor when it would equal dresidual), which
    the existing opcheck (p = 0.1) never takes. Kills: rln_fake_dx_always_full."""
    g = torch.Generator().manual_seed(3)
    x, residual, dy = (torch.randn(6, 48, generator=g).to(DEVICE) for _ in range(3))
    weight, bias = torch.ones(48, device=DEVICE), torch.zeros(48, device=DEVICE)
    torch.library.opcheck(rln._fwd_op, (x, None, residual, None, weight, bias, None, 1e-12, 0.0))
    _, mean, rstd, _ = rln._fwd_op(x, None, residual, None, weight, bias, None, 1e-12, 0.0)
    torch.library.opcheck(rln._bwd_op, (dy, None, x, None, residual, weight, None, mean, rstd, 0.0))


def test_more_bad_arguments():
    """A seed of more than one element, and an x_bias of the wrong size, are refused by name.
    Kills: rln_seed_numel_unchecked, rln_xbias_shape_unchecked."""
    x, residual, weight, bias = torch.randn(4, 32), torch.randn(4, 32), torch.ones(32), torch.zeros(32)
    with pytest.raises(ValueError, match="seed must be one int64"):
        rln.residual_layer_norm(x, residual, weight, bias, p=0.1, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"x_bias\) must be \(32,\)"):
        rln.residual_layer_norm_routed(x, residual, None, weight, bias, x_bias=torch.zeros(31), backend="torch")


@requires_triton
def test_only_a_routed_residual_shares_its_gradient_buffer_with_x(monkeypatch):
    """p = 0, one dtype: dL/dh is x's gradient and the residual's. Routed to the residual's port, that one buffer is
    both (the port's reader, the producer's backward kernel, makes its own gradients: no copy per LayerNorm); not
    routed, x gets its own copy (the residual's may become a leaf's .grad)."""
    ports = []
    real = rln._bwd_op
    monkeypatch.setattr(rln, "_bwd_op", lambda dy, dport, *rest: ports.append(dport) or real(dy, dport, *rest))
    x1, residual, weight, bias = _inputs(6, 32, seed=1)
    x2 = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
    for routed in (True, False):
        ports.clear()
        y1, port = rln.residual_layer_norm_routed(x1, residual, None, weight, bias, EPS, 0.0)
        y2, _ = rln.residual_layer_norm_routed(x2 + 0.0, y1, port if routed else None, weight, bias, EPS, 0.0)
        dx2, _ = torch.autograd.grad(y2.sum() + y1.sum(), (x2, x1))  # x1: the first LayerNorm's backward runs
        routed_grad = ports[-1]  # the port's gradient, as the first LayerNorm's backward (the last to run) got it
        if routed:
            assert routed_grad is not None and dx2.data_ptr() == routed_grad.data_ptr()
        else:
            assert routed_grad is None
