"""The fused bias + exact GELU kernels against their torch reference (forward, dx and dbias, shapes x dtypes with
a tolerance per dtype), the reference against F.gelu, and the custom-op / compile / sm_90 build checks. On CPU
the kernels run under TRITON_INTERPRET=1 (set in conftest), so sizes stay at a few thousand elements."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE as DEVICE
from conftest import requires_triton
from hopper_build import assert_builds_for_hopper, build

from mlmtrain.kernels import bias_gelu as bg
from mlmtrain.kernels.bias_gelu import bias_gelu, bias_gelu_reference

# (rtol, atol) per dtype: y and dx are rounded once from fp32, so a unit or two in the last place
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def _inputs(N, C, dtype=torch.float32, bias_dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(N, C, generator=g)).to(DEVICE, dtype).requires_grad_()  # reaches the tails of erf
    bias = torch.randn(C, generator=g).to(DEVICE, bias_dtype).requires_grad_()
    return x, bias


def _run(backend, x, bias, dy):
    y = bias_gelu(x, bias, backend=backend)
    return y, torch.autograd.grad(y, (x, bias), dy)


@requires_triton
@pytest.mark.parametrize("N,C", [(1, 96), (7, 200), (129, 128), (3, 3072), (5, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(N, C, dtype):
    x, bias = _inputs(N, C, dtype, seed=N * C)
    dy = torch.randn(N, C, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y, (dx, dbias) = _run("triton", x, bias, dy)
    y_ref, (dx_ref, dbias_ref) = _run("torch", x, bias, dy)
    assert y.dtype == dx.dtype == dtype and dbias.dtype == bias.dtype and y.shape == (N, C)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx, dx_ref, rtol=rtol, atol=atol)
    # dbias sums N fp32 rows in another order
    torch.testing.assert_close(dbias, dbias_ref, rtol=1e-5, atol=1e-5 * math.sqrt(N))


def test_reference_is_exact_gelu():
    """fp32: the reference is F.gelu(x + bias) bit for bit; bf16: the sum stays fp32 and is rounded once."""
    x, bias = _inputs(33, 200)
    assert torch.equal(bias_gelu_reference(x, bias), F.gelu(x + bias))
    assert torch.equal(bias_gelu_reference(x.bfloat16(), bias), F.gelu(x.bfloat16().float() + bias).bfloat16())


@requires_triton
def test_kernel_is_exact_not_tanh_gelu():
    """Near h = -2 the tanh approximation is off by ~2e-4; the kernel must match erf to fp32 rounding."""
    x = torch.linspace(-8, 8, 1024, device=DEVICE).view(8, 128)
    bias = torch.zeros(128, device=DEVICE)
    y = bias_gelu(x, bias, backend="triton")
    torch.testing.assert_close(y, F.gelu(x), rtol=1e-6, atol=1e-6)
    assert (F.gelu(x, approximate="tanh") - y).abs().max() > 1e-4


@requires_triton
def test_mixed_dtypes_leading_dims_and_no_rows():
    """bf16 activations with an fp32 bias (autocast's pair): y and dx stay bf16, dbias is fp32; (..., C) in,
    (..., C) out; zero rows work."""
    x, bias = _inputs(12, 96, torch.bfloat16)
    x3 = x.detach().view(3, 4, 96).requires_grad_()
    dy = torch.randn(3, 4, 96, device=DEVICE, dtype=torch.bfloat16)
    y, (dx, dbias) = _run("triton", x3, bias, dy)
    y_ref, (dx_ref, dbias_ref) = _run("torch", x3, bias, dy)
    assert y.shape == dx.shape == (3, 4, 96) and y.dtype == dx.dtype == torch.bfloat16 and dbias.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(dbias, dbias_ref, rtol=1e-5, atol=1e-4)
    empty, bias = _inputs(0, 64)
    y = bias_gelu(empty, bias, backend="triton")
    dx, dbias = torch.autograd.grad(y, (empty, bias), torch.ones_like(y))
    assert y.shape == dx.shape == (0, 64) and not dbias.any()


@requires_triton
@pytest.mark.parametrize(
    "launch",
    [dict(num_programs=2, stages=3), dict(block_n=1, num_warps=4, num_programs=3, stages=2), dict(block_n=16)],
)
def test_other_launches_give_the_same_bits(launch):
    """What bench_bias_gelu --sweep times: other tiles, fewer programs looping over several tiles (their loads
    pipelined), other backward program counts; each element's arithmetic is the same, so y and dx are the default
    launch's bit for bit and dbias within fp32 summation order (an odd N: partial tiles at every row-group end)."""
    x, bias = (t.detach() for t in _inputs(37, 200, torch.bfloat16, seed=3))
    dy = torch.randn(37, 200, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    y = bg.bias_gelu_fwd_triton(x, bias)
    dx, dbias = bg.bias_gelu_bwd_triton(dy, x, bias)
    assert torch.equal(bg.bias_gelu_fwd_triton(x, bias, **launch), y)
    backward = {k: v for k, v in launch.items() if k != "stages"}
    dx_other, dbias_other = bg.bias_gelu_bwd_triton(dy, x, bias, **backward)
    assert torch.equal(dx_other, dx)
    torch.testing.assert_close(dbias_other, dbias, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        bg.bias_gelu_fwd_triton(x, bias, block_n=3)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_abramowitz_stegun_erf_is_gelu_to_fp32_rounding(dtype):
    """The "as7128" erf (a launch option bench_bias_gelu times): y and dx against exact GELU over [-12, 12] (both
    tails, the overflow of p^16 included) within the kernels' per-dtype tolerance, and in fp32 within 1e-6, about
    the libdevice erf's own distance (which the reference test holds to the same tolerance)."""
    x = torch.linspace(-12, 12, 24 * 96, device=DEVICE).view(24, 96).to(dtype)
    bias, dy = torch.zeros(96, device=DEVICE), torch.randn(24, 96, generator=torch.Generator().manual_seed(7))
    dy = dy.to(DEVICE, dtype)
    y = bg.bias_gelu_fwd_triton(x, bias, erf="as7128")
    dx, dbias = bg.bias_gelu_bwd_triton(dy, x, bias, erf="as7128")
    xr = x.double().requires_grad_()
    y_ref = F.gelu(xr)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref.detach().to(dtype).double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(dx.double(), dx_ref.to(dtype).double(), rtol=rtol, atol=atol)
    if dtype == torch.float32:
        assert (y.double() - y_ref).abs().max() < 1e-6 and (dx.double() - dx_ref).abs().max() < 1e-5


def test_bad_arguments():
    x, bias = _inputs(4, 32)
    with pytest.raises(ValueError, match="bias must be"):
        bias_gelu(x, bias[:3])
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        bias_gelu(x.double(), bias)
    with pytest.raises(ValueError, match="backend"):
        bias_gelu(x, bias, backend="cuda")


@requires_triton
def test_custom_ops_pass_opcheck():
    x, bias = (t.detach() for t in _inputs(6, 48))
    torch.library.opcheck(bg._fwd_op, (x, bias))
    torch.library.opcheck(bg._bwd_op, (torch.randn(6, 48, device=DEVICE), x, bias))


@requires_triton
@pytest.mark.compile
def test_compiles_without_graph_break():
    """fullgraph=True fails on any graph break; the graph calls the fused op, and compiled (AOT autograd)
    forward and backward equal eager."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    x, bias = _inputs(8, 96)
    dy = torch.randn(8, 96, device=DEVICE)
    recorder = EagerAndRecordGraphs()
    torch.compile(bias_gelu, fullgraph=True, backend=recorder)(x, bias)
    assert "torch.ops.mlmtrain.bias_gelu_fwd.default" in recorder.graphs[0].code
    y = torch.compile(bias_gelu, fullgraph=True, backend="aot_eager")(x, bias)
    y_eager = bias_gelu(x, bias)
    assert torch.equal(y, y_eager)
    for a, b in zip(torch.autograd.grad(y, (x, bias), dy), torch.autograd.grad(y_eager, (x, bias), dy)):
        assert torch.equal(a, b)


def test_kernels_compile_for_hopper_without_a_gpu():
    """Both kernels at the launcher's tiles (BERT-base's 3072 and a small size) to an sm_90 cubin, and the forward
    with its loads pipelined (bench_bias_gelu --sweep)."""
    builds = []
    for kernel in ("_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"):
        for C, dtype in ((3072, "bf16"), (128, "fp32")):
            block_n, block_c, warps = bg._tile(C)
            consts = {"BLOCK_N": block_n, "BLOCK_C": block_c, "STAGES": 1, "ERF": "libdevice"}
            pointers = {"bias_ptr": "fp32", "dbias_partial_ptr": "fp32"}
            builds.append(build(bg.__name__, kernel, dtype, consts, warps, pointers=pointers))
    block_n, block_c, warps = bg._tile(3072)
    for kernel, consts in (("_bias_gelu_fwd_kernel", {"STAGES": 3}), ("_bias_gelu_bwd_kernel", {"ERF": "as7128"})):
        consts = {"BLOCK_N": block_n, "BLOCK_C": block_c, "STAGES": 1, "ERF": "as7128", **consts}
        pointers = {"bias_ptr": "fp32", "dbias_partial_ptr": "fp32"}
        builds.append(build(bg.__name__, kernel, "bf16", consts, warps, pointers=pointers))
    assert_builds_for_hopper(builds)


@requires_triton
def test_benchmark_times_every_launch_and_credits_each_pass_its_bytes():
    """bench_bias_gelu --sweep on a tiny matrix: every launch of the sweep is a row, each pass credited the bytes
    its contract moves (forward 2 N C s, backward 3 N C s), and the summary names the fastest launch per pass."""
    from mlmtrain.benchmarks.bench_bias_gelu import SWEEP_BWD, SWEEP_FWD, run

    N, C = 16, 40
    rows = run(N, (C,), DEVICE, repeats=5, compile_rows=False, sweep=True)
    kernels = [r for r in rows if r.get("path") == "triton-kernels" and r["passes"] in ("fwd", "bwd")]
    assert len(kernels) == 2 + len(SWEEP_FWD) + len(SWEEP_BWD) == len({r["name"] for r in kernels})
    assert all(r["bytes"] == (2 if r["passes"] == "fwd" else 3) * N * C * 2 for r in kernels)
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["fwd_fastest_launch"].startswith("triton kernels fwd")
    assert summary["bwd_fraction_of_copy"] > 0


def test_the_sweeps_programs_per_sm_count_every_column_tile(monkeypatch):
    """The kernels' num_programs counts row groups per column tile: a sweep row's "P/SM" launches that many programs
    per SM in all, over every column tile (it launched P/SM per column tile: 6x the label at C = 3,072)."""
    from mlmtrain import kernels
    from mlmtrain.benchmarks import bench_bias_gelu

    launched = []
    monkeypatch.setattr(kernels, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(bg, "bias_gelu", lambda x, b, backend: x + b)
    monkeypatch.setattr(bg, "bias_gelu_fwd_triton", lambda x, b, **kw: launched.append(("fwd", kw)) or x)
    monkeypatch.setattr(bg, "bias_gelu_bwd_triton", lambda dy, x, b, **kw: launched.append(("bwd", kw)) or (dy, b))
    N, C = 16, 1100  # three column tiles of 512
    rows = bench_bias_gelu.run(N, (C,), torch.device("cpu"), repeats=1, compile_rows=False, sweep=True)
    per_sm = {r["name"]: r["programs_per_sm"] for r in rows if r.get("programs_per_sm")}
    assert sorted(set(per_sm.values())) == [2, 4, 8]
    programs = {kw.get("num_programs") for _, kw in launched} - {None}
    assert programs == {1, 2, 3}  # ceil(P/SM x 1 SM / 3 tiles): every tile's programs together make P per SM


def test_reference_adds_a_bf16_bias_in_fp32():
    """The reference adds the bias in fp32 whatever its dtype, as the kernels do: a bf16 bias added to bf16 x in
    bf16 would round the sum once more (the exactness tests pair bf16 x with an fp32 bias, which promotes)."""
    import torch.nn.functional as F

    from mlmtrain.kernels.bias_gelu import bias_gelu_reference

    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(64, 200, generator=g).bfloat16(), torch.randn(200, generator=g).bfloat16()
    assert torch.equal(bias_gelu_reference(x, bias), F.gelu(x.float() + bias.float()).bfloat16())


@requires_triton
@pytest.mark.parametrize("num_programs", [2, 3])
def test_dbias_partials_of_several_programs_at_an_odd_width(num_programs):
    """The backward's per-program dbias partials (P, C) at C = 200 (BLOCK_C = 256 > C) with P > 1, against the
    reference's dbias (the other tests compare such launches only with each other, or run one program).
    Kills: bg_jit_dbias_stride_blockc."""
    g = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(37, 200, generator=g)).to(DEVICE)
    bias = torch.randn(200, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(37, 200, generator=g).to(DEVICE)
    dx, dbias = bg.bias_gelu_bwd_triton(dy, x, bias.detach(), num_programs=num_programs)
    xr = x.clone().requires_grad_()
    dx_ref, dbias_ref = torch.autograd.grad(bg.bias_gelu_reference(xr, bias), (xr, bias), dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbias, dbias_ref, rtol=1e-5, atol=1e-4)


@requires_triton
def test_custom_ops_take_strided_inputs():
    """The custom ops as a compiled graph may call them: a transposed (strided) x and dy are read as their values.
    Kills: bg_fwd_op_no_contiguous."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 6, generator=g).to(DEVICE).t()  # (6, 48), strides (1, 6)
    bias, dy = torch.randn(48, generator=g).to(DEVICE), torch.randn(48, 6, generator=g).to(DEVICE).t()
    assert not x.is_contiguous()
    y = torch.ops.mlmtrain.bias_gelu_fwd(x, bias)
    torch.testing.assert_close(y, bg.bias_gelu_reference(x, bias), rtol=1e-5, atol=1e-5)
    dx, dbias = torch.ops.mlmtrain.bias_gelu_bwd(dy, x, bias)
    dx_c, dbias_c = torch.ops.mlmtrain.bias_gelu_bwd(dy.contiguous(), x.contiguous(), bias)
    assert torch.equal(dx, dx_c) and torch.equal(dbias, dbias_c)


@requires_triton
def test_custom_ops_pass_opcheck_with_bf16_activations():
    """The backward op's fake function gives dbias fp32 whatever x's dtype, as the kernel does: opcheck with bf16
    x and dy (autocast's activations), where the existing opcheck's fp32 x cannot tell fp32 from x's dtype.
    Kills: bg_fake_dbias_dtype (a compiled bf16 graph would be traced with a bf16 dbias)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 48, generator=g).to(DEVICE, torch.bfloat16)
    bias, dy = torch.randn(48, generator=g).to(DEVICE), torch.randn(6, 48, generator=g).to(DEVICE, torch.bfloat16)
    torch.library.opcheck(bg._fwd_op, (x, bias))
    torch.library.opcheck(bg._bwd_op, (dy, x, bias))
