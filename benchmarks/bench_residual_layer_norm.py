"""Post-LN sublayer output, `LayerNorm(dropout(x) + residual)`, forward + backward: the fused Triton kernels vs
eager torch vs what torch.compile (inductor) makes of the same torch code, with the device's copy bandwidth
measured in the same run.

Rows, per hidden size C (N tokens, bf16 x and residual, fp32 weight and bias, p = 0.1 by default):
- `triton`: `residual_layer_norm(...)` eager, forward + backward through autograd (what a model calls).
- `triton (compiled graph)`: the same call inside `torch.compile`: the custom ops in an inductor graph.
- `triton kernels`: the two launchers back to back, no autograd: the kernels' own time.
- `torch eager`: `F.layer_norm(F.dropout(x, p) + residual)`, the model's code today (h rounded to bf16, a
  bool dropout mask saved, three kernels each way).
- `torch.compile`: the same function compiled by inductor (default mode): the real competitor, since it
  fuses dropout, add and LayerNorm on its own. Our bit-exact torch reference is not timed: its Philox in
  int64 torch ops measures the emulation, not what inductor does with a dropout.
- `copy`: `dst.copy_(src)` moving the same bytes: the bandwidth ceiling.
Each also has a forward-only row (`... fwd`), no autograd graph kept.

Bytes: every row is credited with the same logical bytes, what the fused contract must move: forward reads
x and residual and writes y; backward reads dy, x and residual and writes dx and dresidual (p > 0; at
p = 0 only one gradient is written): 8 N C s bytes in all for s-byte activations, + 16 N for mean and
rstd. GB/s = those bytes / the median time, so rows compare as effective bandwidth.

What to compare (no numbers here: they come from a GPU run, `--out` keeps them with the environment):
- fwd+bwd median of `triton` vs `torch.compile` at C = 768 and 1024: integrate only if the kernel wins
  against inductor, not just against eager. The `summary` row gives both ratios.
- `triton kernels` vs `triton`: autograd and dispatch overhead; under CUDA graphs only the former remains.
- `fraction_of_copy` of `triton kernels`: how close to the bandwidth ceiling. Static sm_90 SASS puts the
  forward at ~46 instructions per element with dropout (8 per thread), near what H200 can issue per byte
  moved; if it lands well under copy speed at C = 768 (25% of each 1024-wide tile is padding), try
  `--sweep`, then p = 0 (`--p 0`) to see the dropout's share.
On a CPU (`--quick`) the Triton rows run in the interpreter: a smoke test of this script, not a speed.
Run: `python -m mlmtrain.benchmarks.bench_residual_layer_norm [--device cuda] [--sweep] [--out FILE]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlmtrain.benchmarks.common import kernel_bench_main, kernel_rows

GPU_TOKENS, GPU_HIDDEN = 65536, (768, 1024)
QUICK_TOKENS, QUICK_HIDDEN = 256, (128,)  # the interpreter and inductor's CPU compile stay at seconds
# (rows per tile at 1024 columns (scaled to C), warps, backward programs per SM); None: the launchers' default
SWEEP = ((1, 4, None), (2, 4, None), (4, 8, None), (8, 8, None), (4, 16, None), (None, None, 1), (None, None, 3))
EPS = 1e-12


def logical_bytes(N: int, C: int, element_size: int, p: float) -> int:
    gradients_written = 2 if p > 0 else 1
    return N * C * element_size * (3 + 3 + gradients_written) + 16 * N


def torch_sublayer(x, residual, weight, bias, p):
    """The model's post-LN sublayer output as written in torch today."""
    return F.layer_norm(F.dropout(x, p, training=True) + residual, (x.shape[-1],), weight, bias, EPS)


def run(
    tokens: int | None = None,
    hidden: tuple[int, ...] | None = None,
    device: str | torch.device | None = None,
    *,
    p: float = 0.1,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
    compile_rows: bool = True,
    sweep: bool = False,
) -> list[dict]:
    """Rows (benchmarks/common.record) per hidden size, then one `summary` row per size."""
    from mlmtrain.kernels import residual_layer_norm as rln
    from mlmtrain.kernels import triton_runs_on

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    N = tokens or (GPU_TOKENS if on_gpu else QUICK_TOKENS)
    kernel_ok = triton_runs_on(device)
    rows = []
    for C in hidden or (GPU_HIDDEN if on_gpu else QUICK_HIDDEN):
        x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)  # (N, C)
        residual = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)  # (N, C)
        weight = torch.ones(C, device=device, requires_grad=True)  # (C,)
        bias = torch.zeros(C, device=device, requires_grad=True)  # (C,)
        inputs, dy = (x, residual, weight, bias), torch.randn(N, C, device=device, dtype=dtype)  # dy (N, C)
        seed = rln.draw_seed(device)
        nbytes = logical_bytes(N, C, x.element_size(), p)
        common = dict(num_tokens=N, hidden=C, dtype=str(dtype).removeprefix("torch."), p=p, device=str(device))

        add = kernel_rows("residual_layer_norm", device, rows, f"N={N} C={C}", repeats=repeats, **common)

        def both(name, forward, path):
            """A fwd+bwd row (autograd over all four inputs) and a forward-only row of `forward`."""
            add(name, lambda: torch.autograd.grad(forward(*inputs), inputs, dy), nbytes, path=path, passes="fwd+bwd")
            with torch.no_grad():
                fwd_bytes = N * C * x.element_size() * 3 + 8 * N
                add(name + " fwd", lambda: forward(*inputs), fwd_bytes, path=path, passes="fwd")

        add.copy(nbytes)

        if kernel_ok:
            both("triton", lambda *a: rln.residual_layer_norm(*a, EPS, p, seed), "triton")
            if compile_rows:
                compiled = torch.compile(lambda *a: rln.residual_layer_norm(*a, EPS, p, seed), fullgraph=True)
                both("triton (compiled graph)", compiled, "triton-compiled")
            block_c = rln._tile(C, None, None)[1]
            sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
            detached = [t.detach() for t in inputs]
            for rows_1024, warps, per_sm in ((None, None, None),) + (SWEEP if sweep else ()):
                block_n = max(1, rows_1024 * 1024 // block_c) if rows_1024 else None
                launch = dict(block_n=block_n, num_warps=warps)
                programs = per_sm * sms if per_sm else None

                def kernels(launch=launch, programs=programs):
                    y, mean, rstd = rln.residual_layer_norm_fwd_triton(*detached, seed, EPS, p, **launch)
                    return rln.residual_layer_norm_bwd_triton(
                        dy, *detached[:3], seed, mean, rstd, p, **launch, num_programs=programs
                    )

                tile = rln._tile(C, block_n, warps)
                label = f"triton kernels {tile[0]}x{tile[1]} w{tile[2]}" + (f" bwd {per_sm}/SM" if per_sm else "")
                label = "triton kernels" if launch == dict(block_n=None, num_warps=None) and not per_sm else label
                fields = dict(path="triton-kernels", passes="fwd+bwd", tile=list(tile), programs_per_sm=per_sm)
                add(label, kernels, nbytes, **fields)
        else:
            print(f"Triton cannot run on {device} here: no triton rows (CPU needs TRITON_INTERPRET=1)", flush=True)

        both("torch eager", lambda *a: torch_sublayer(*a, p), "torch")
        if compile_rows:
            both("torch.compile", torch.compile(lambda *a: torch_sublayer(*a, p)), "inductor")
        rows.append(_summary(rows, N, C))
    return rows


def _summary(rows: list[dict], N: int, C: int) -> dict:
    """Median-time ratios at one size (> 1: the fused kernels are faster) and the fraction of copy speed."""
    at = {r["name"]: r for r in rows if r.get("num_tokens") == N and r.get("hidden") == C and "seconds" in r}

    def median(name):
        return at[name]["seconds"]["median"] if name in at else None

    out = {"benchmark": "residual_layer_norm", "name": f"summary N={N} C={C}", "kind": "summary", "hidden": C}
    ours = median("triton")
    for other in ("torch eager", "torch.compile"):
        out[f"speedup_vs_{other.replace(' ', '_').replace('.', '_')}"] = (
            median(other) / ours if ours and median(other) else None
        )
    if "triton kernels" in at:
        copy_bw = at["copy"]["bytes_per_s"]["median"]
        out["kernels_fraction_of_copy"] = at["triton kernels"]["bytes_per_s"]["median"] / copy_bw
    return out


def main(argv: list[str] | None = None) -> int:
    def dropout_flag(p):
        p.add_argument("--p", type=float, default=0.1, help="dropout probability (BERT's hidden dropout: 0.1)")
        return ["p"]

    sizes = (GPU_TOKENS, GPU_HIDDEN, QUICK_TOKENS, QUICK_HIDDEN)
    sweep_help = "also time other tiles (rows per tile, warps)"
    return kernel_bench_main(argv, __doc__, run, sizes=sizes, sweep_help=sweep_help, extra=dropout_flag)


if __name__ == "__main__":
    raise SystemExit(main())
