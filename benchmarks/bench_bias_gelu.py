"""BERT's intermediate activation, `gelu(x + bias)` (exact erf GELU), forward and backward: the fused Triton
kernels at their default launch and at other launches (`--sweep`), torch eager and torch.compile, with the
device's copy bandwidth measured in the same run.

Rows, per intermediate size C (N tokens, bf16 x, fp32 bias):
- `triton`: `bias_gelu(x, bias)` eager, forward + backward through autograd (what a model calls).
- `triton kernels`: the two launchers back to back, no autograd: the kernels' own time; `... fwd` and `... bwd`
  each alone.
- `--sweep`: the forward and the backward alone at other launches: other tiles (rows per tile, warps), and
  fewer programs that each loop over several tiles (`P/SM`: programs per SM; `stages`: the forward's loads
  pipelined over its tiles, as the backward's always are). Every launch computes the same bits
  (tests/test_bias_gelu.py), except `erf as7128`: Abramowitz-Stegun's erf with one reciprocal for libdevice's
  (sm_90 SASS: 20% fewer instructions in the forward kernel, 12% in the backward; within ~1.5 fp32 ulp of GELU),
  which says whether the kernels are limited by their arithmetic.
- `torch eager`: `F.gelu(x + bias)`; `torch.compile`: the same compiled by inductor (what `model.fused_ops =
  torch` gets, with the bias add in the matmul's epilogue there).
- `copy`: `dst.copy_(src)` moving the fwd+bwd rows' bytes: the bandwidth ceiling.

Bytes credited (s-byte activations): forward reads x and writes y (2 N C s), backward reads dy and x and writes
dx (3 N C s); GB/s = those bytes / the median time, so rows compare as effective bandwidth.

Why: the H200 trace of 2026-11-30 put the forward kernel at 0.34 ms per call and the backward at 0.46 ms at
N = 65,536, C = 3,072 bf16, against ~0.19 and ~0.29 ms for their bytes at the measured copy speed: 3.9 ms per
BERT-base step above the copy ceiling, the largest gap of any kernel there but attention. Static sm_90 SASS puts
erf GELU at ~34 instructions per element, near what the SM can issue per byte moved, so the launch (loads in
flight per SM) may matter as much as the arithmetic: what --sweep measures.
Run: `python -m mlmtrain.benchmarks.bench_bias_gelu [--device cuda] [--hidden 3072] [--sweep] [--out FILE]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlmtrain.benchmarks.common import kernel_bench_main, kernel_rows

GPU_TOKENS, GPU_HIDDEN = 65536, (3072, 4096)  # BERT-base's and BERT-large's intermediate sizes
QUICK_TOKENS, QUICK_HIDDEN = 64, (200,)  # the interpreter stays at seconds
# forward launches: (rows per tile, warps, programs per SM, stages, erf); None: the launcher's default
SWEEP_FWD = (
    (1, 4, None, 1, None),
    (2, 4, None, 1, None),
    (8, 8, None, 1, None),
    (None, None, 2, 3, None),
    (None, None, 4, 3, None),
    (None, None, 8, 3, None),
    (None, None, None, 1, "as7128"),
    (None, None, 4, 3, "as7128"),
)
# backward launches: (rows per tile, warps, programs per SM, erf); the default is 4 per SM in all
SWEEP_BWD = (
    (None, None, 2, None),
    (None, None, 8, None),
    (2, 4, None, None),
    (8, 8, None, None),
    (None, None, None, "as7128"),
)


def run(
    tokens: int | None = None,
    hidden: tuple[int, ...] | None = None,
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
    compile_rows: bool = True,
    sweep: bool = False,
) -> list[dict]:
    """Rows (benchmarks/common.record) per intermediate size, then one `summary` row per size."""
    from mlmtrain.kernels import bias_gelu as bg
    from mlmtrain.kernels import triton_runs_on

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    N = tokens or (GPU_TOKENS if on_gpu else QUICK_TOKENS)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
    rows = []
    for C in hidden or (GPU_HIDDEN if on_gpu else QUICK_HIDDEN):
        x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)  # (N, C)
        bias = torch.randn(C, device=device, requires_grad=True)  # (C,) fp32, as under autocast
        dy = torch.randn(N, C, device=device, dtype=dtype)  # (N, C)
        xd, biasd = x.detach(), bias.detach()
        s = x.element_size()
        fwd_bytes, bwd_bytes = 2 * N * C * s, 3 * N * C * s
        common = dict(num_tokens=N, hidden=C, dtype=str(dtype).removeprefix("torch."), device=str(device))
        add = kernel_rows("bias_gelu", device, rows, f"N={N} C={C}", repeats=repeats, **common)

        def both(name, forward, path):
            add(name, lambda: torch.autograd.grad(forward(x, bias), (x, bias), dy), fwd_bytes + bwd_bytes,
                path=path, passes="fwd+bwd")  # fmt: skip
            with torch.no_grad():
                add(name + " fwd", lambda: forward(x, bias), fwd_bytes, path=path, passes="fwd")

        add.copy(fwd_bytes + bwd_bytes)

        if triton_runs_on(device):
            both("triton", lambda a, b: bg.bias_gelu(a, b, backend="triton"), "triton")
            kernels = lambda: (bg.bias_gelu_fwd_triton(xd, biasd), bg.bias_gelu_bwd_triton(dy, xd, biasd))  # noqa: E731
            add("triton kernels", kernels, fwd_bytes + bwd_bytes, path="triton-kernels", passes="fwd+bwd")
            launches = [("fwd", None, None, None, 1, None), ("bwd", None, None, None, None, None)]
            if sweep:
                launches += [("fwd", *f) for f in SWEEP_FWD] + [
                    ("bwd", b[0], b[1], b[2], None, b[3]) for b in SWEEP_BWD
                ]
            for passes, block_n, warps, per_sm, stages, erf in launches:
                tile = bg._tile(C, block_n, warps)
                col_tiles = -(-C // tile[1])  # num_programs counts row groups per column tile: P/SM is of them all
                programs = -(-per_sm * sms // col_tiles) if per_sm else None
                launch = dict(block_n=block_n, num_warps=warps, num_programs=programs)
                launch |= dict(erf=erf) if erf else {}
                default = block_n is None and warps is None and per_sm is None and stages in (None, 1)
                label = f"triton kernels {passes}" + ("" if default else f" {tile[0]}x{tile[1]} w{tile[2]}")
                label += f" {per_sm} P/SM" if per_sm else ""
                label += f" stages {stages}" if stages and stages > 1 else ""
                label += f" erf {erf}" if erf else ""

                def fn(passes=passes, launch=launch, stages=stages):
                    if passes == "fwd":
                        return bg.bias_gelu_fwd_triton(xd, biasd, **launch, stages=stages)
                    return bg.bias_gelu_bwd_triton(dy, xd, biasd, **launch)

                add(label, fn, fwd_bytes if passes == "fwd" else bwd_bytes, path="triton-kernels", passes=passes,
                    tile=list(tile), programs_per_sm=per_sm, stages=stages, erf=erf or "libdevice")  # fmt: skip
        else:
            print(f"Triton cannot run on {device} here: no triton rows (CPU needs TRITON_INTERPRET=1)", flush=True)

        torch_gelu = lambda a, b: F.gelu(a + b)  # noqa: E731
        both("torch eager", torch_gelu, "torch")
        if compile_rows:
            both("torch.compile", torch.compile(torch_gelu), "inductor")
        rows.append(_summary(rows, N, C))
    return rows


def _summary(rows: list[dict], N: int, C: int) -> dict:
    """Each default kernel's and the fastest sweep launch's fraction of the copy speed, per pass."""
    at = [r for r in rows if r.get("num_tokens") == N and r.get("hidden") == C and "seconds" in r]
    copy = next(r["bytes_per_s"]["median"] for r in at if r["name"] == "copy")
    out = {"benchmark": "bias_gelu", "name": f"summary N={N} C={C}", "kind": "summary", "hidden": C}
    for passes in ("fwd", "bwd"):
        kernels = [r for r in at if r.get("path") == "triton-kernels" and r["passes"] == passes]
        default = next((r for r in kernels if r["name"] == f"triton kernels {passes}"), None)
        best = max(kernels, key=lambda r: r["bytes_per_s"]["median"], default=None)
        out[f"{passes}_fraction_of_copy"] = default["bytes_per_s"]["median"] / copy if default else None
        out[f"{passes}_fastest_launch"] = best["name"] if best else None
        out[f"{passes}_fastest_fraction_of_copy"] = best["bytes_per_s"]["median"] / copy if best else None
    return out


def main(argv: list[str] | None = None) -> int:
    sizes = (GPU_TOKENS, GPU_HIDDEN, QUICK_TOKENS, QUICK_HIDDEN)
    return kernel_bench_main(
        argv, __doc__, run, sizes=sizes, sweep_help="also time other launches (tiles, programs, stages)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
