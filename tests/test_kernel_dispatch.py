"""Where the kernels run (`mlmtrain.kernels`: use_triton, triton_problem, split_rows): backend "triton" refused with
a sentence where Triton cannot run, "torch" always the pure-torch reference (the kernel-vs-reference tests depend on
it), "auto" the kernel exactly on CUDA and the CPU's interpreter."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE as DEVICE
from conftest import requires_triton

from mlmtrain.errors import UserError

V, MASK = 69, 4  # a vocabulary of 69 ids, [MASK] at 4


def test_triton_backend_refused_where_triton_cannot_run(monkeypatch):
    """kernels/__init__.py: where the interpreter cannot run (INTERPRETER_PROBLEM set), the CPU is no Triton device:
    backend='triton' is refused with a sentence naming the fix, 'auto' and 'torch' take the reference, and each
    wrapper (mlm_mask's UserError, the others' ValueError) and triton_row_attention refuse rather than fall back.
    Kills: init_no_refusal_where_triton_cannot_run, init_cpu_problem_ignored, att_triton_row_auto_backend."""
    import mlmtrain.kernels as kernels
    from mlmtrain.attention import triton_row_attention
    from mlmtrain.kernels.bias_gelu import bias_gelu
    from mlmtrain.kernels.mlm_mask import mlm_mask

    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "INTERPRETER_PROBLEM", "the Triton interpreter is off (test)")
    assert kernels.triton_problem(cpu) == "the Triton interpreter is off (test)"
    assert not kernels.triton_runs_on(cpu)
    assert kernels.use_triton("auto", cpu) is False and kernels.use_triton("torch", cpu) is False
    with pytest.raises(ValueError, match="cannot run on cpu .*use backend='torch'"):
        kernels.use_triton("triton", cpu)
    with pytest.raises(UserError, match="cannot run on cpu"):
        mlm_mask(torch.zeros(8, dtype=torch.int32), vocab_size=69, mask_id=4, seed=0, step=0, backend="triton")
    x, bias = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="cannot run on cpu"):
        bias_gelu(x, bias, backend="triton")
    torch.testing.assert_close(bias_gelu(x, bias), torch.nn.functional.gelu(x + bias))  # auto: the reference
    with pytest.raises(ValueError, match="cannot run on cpu"):
        triton_row_attention(torch.randn(16, 3, 1, 8), torch.zeros(1, 16, dtype=torch.int32))


@requires_triton
def test_torch_backend_runs_the_reference_where_triton_runs(monkeypatch):
    """backend='torch' is the pure-torch reference even where the kernels run (the kernel-vs-reference tests
    would compare the kernel with itself otherwise). Kills: init_torch_backend_runs_triton."""
    import mlmtrain.kernels as kernels
    from mlmtrain.kernels import mlm_mask as mm
    from mlmtrain.kernels import residual_layer_norm as rln
    from mlmtrain.kernels import segment_attention as sa

    assert kernels.use_triton("torch", DEVICE) is False and kernels.use_triton("auto", DEVICE) is True

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton launcher ran for backend='torch'")

    monkeypatch.setattr(mm, "mlm_mask_triton", no_kernel)
    ids = torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mm.mlm_mask(ids, vocab_size=V, mask_id=MASK, seed=0, step=0, backend="torch")
    x, residual = torch.randn(4, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE).requires_grad_()
    weight, bias = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    assert rln.residual_layer_norm_routed(x, residual, None, weight, bias, backend="torch")[1] is None  # no port
    monkeypatch.setattr(sa, "segment_attention_fwd_triton", no_kernel)
    sa.segment_attention(
        torch.randn(16, 3, 1, 16, device=DEVICE), torch.zeros(1, 16, dtype=torch.int32, device=DEVICE), backend="torch"
    )


def test_triton_runs_on_cuda_and_the_cpu_only():
    """kernels/__init__.py triton_problem: a device other than cuda/cpu (meta, mps, xpu) is no Triton device.
    Kills: init_any_device_runs_triton."""
    import mlmtrain.kernels as kernels

    for other in ("meta", "mps", "xpu"):  # devices are made by name: none of them is needed here
        device = torch.device(other)
        if kernels.triton is not None:
            assert kernels.triton_problem(device) == "Triton runs on CUDA GPUs (and the CPU's interpreter)"
        assert not kernels.triton_runs_on(device) and kernels.use_triton("auto", device) is False
    if kernels.triton is not None:
        assert kernels.triton_problem(torch.device("cuda", 0)) is None  # by device type: no CUDA call is made


@pytest.mark.parametrize("block_n", [1, 8, 16])
@pytest.mark.parametrize("programs", [1, 3, 4, 7, 200])
def test_split_rows_whole_tiles_at_most_programs_cover_every_row(block_n, programs):
    """kernels/__init__.py split_rows: each program a whole number of tiles, at most `programs` of them, together
    covering rows 0..N-1 exactly once (the last program may be short, none is empty).
    Kills: init_split_rows_floor_rows (more programs than asked: a second wave on the GPU)."""
    from mlmtrain.kernels import split_rows

    for N in (1, 7, 37, 129, 1000):
        rows, P = split_rows(N, block_n, programs)
        assert rows % block_n == 0 and rows > 0
        assert 1 <= P <= programs, (N, rows, P)
        assert (P - 1) * rows < N <= P * rows, (N, rows, P)
