"""Attention alone, forward and forward + backward, on one batch of rows as the RowPacker lays them: the
segment-attention kernel (model.attention = triton), FlexAttention compiled (flex, what auto takes with rows), the
dense-mask SDPA reference, and flash varlen on the same segments laid flat (the flat layout's attention). One
layer's q, k, v from one (T, 3, H, D) tensor, as the model makes them; each backward returns the qkv gradient
(for flex, SDPA and varlen that includes stacking three gradients, as the model's backward does).

Segments: sentence lengths (+ [CLS] and [SEP]) drawn log-normal with the synthetic corpus' parameters
(benchmarks/synthetic_data.py: the bundled Korean sample's), placed into rows by the RowPacker's best-fit
decreasing; every row's [PAD] tail is a segment of its own, as in training.

Run: `python -m mlmtrain.benchmarks.bench_attention --device cuda [--rows 512 --row-len 128 --heads 12
--head-dim 64] [--out FILE.json]`; `--quick` is a CPU-sized run (Triton's interpreter for the kernel).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

from mlmtrain.benchmarks.common import environment, time_fn

LOG_MEAN, LOG_SD = 2.765, 0.683  # the synthetic corpus' sentence lengths (synthetic_data.py)


def row_segments(rows: int, row_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(segment_ids (R, L) int32, cu_seqlens of the same segments laid flat (S+1,) int32, fill): sentences drawn
    until best-fit decreasing leaves some unplaced, the rows as the RowPacker builds them."""
    from mlmtrain.packing import best_fit_decreasing

    rng = np.random.default_rng(seed)
    n = int(rows * row_len / math.exp(LOG_MEAN + LOG_SD**2 / 2) * 1.1)  # ~10% more than fits
    lengths = np.minimum(np.round(np.exp(rng.normal(LOG_MEAN, LOG_SD, n))).astype(np.int64) + 2, row_len)
    row_of = best_fit_decreasing(lengths.tolist(), rows, row_len)
    placed = row_of >= 0
    lengths, row_of = lengths[placed], row_of[placed]
    segment_ids = np.zeros((rows, row_len), dtype=np.int32)
    starts = [0]  # flat segment starts
    next_id = 0
    for r in range(rows):
        used = 0
        for length in lengths[row_of == r]:
            segment_ids[r, used : used + length] = next_id
            next_id, used = next_id + 1, used + int(length)
            starts.append(r * row_len + used)
        if used < row_len:  # the [PAD] tail
            segment_ids[r, used:] = next_id
            next_id += 1
            starts.append((r + 1) * row_len)
    fill = float(lengths.sum()) / (rows * row_len)
    return torch.from_numpy(segment_ids), torch.tensor(starts, dtype=torch.int32), fill


def variants(device: torch.device, compile: bool) -> dict:
    """name -> attend(qkv, segment_ids, cu_seqlens, row_len) -> (T, H, D), for the variants this device runs."""
    from mlmtrain.kernels import triton_runs_on
    from mlmtrain.model import varlen_attention, varlen_attn
    from mlmtrain.row_attention import flex_row_attention, row_block_tables, row_sdpa_attention, triton_row_attention

    out = {}
    if triton_runs_on(device):
        out["segment kernel"] = lambda qkv, seg, cu, L: triton_row_attention(qkv, seg)
    if device.type == "cuda":  # FlexAttention fuses only when compiled, and has no CPU backward
        flex = torch.compile(flex_row_attention, dynamic=False) if compile else flex_row_attention

        def run_flex(qkv, seg, cu, L):
            return flex(*qkv.unbind(1), seg, row_block_tables(seg))

        out["flex"] = run_flex
        if varlen_attn is not None:
            out["flash varlen (flat)"] = lambda qkv, seg, cu, L: varlen_attention(*qkv.unbind(1), cu, L)
    out["sdpa, dense mask"] = lambda qkv, seg, cu, L: row_sdpa_attention(*qkv.unbind(1), seg, 0.0)
    return out


def run(device: torch.device, rows: int, row_len: int, heads: int, head_dim: int, dtype, *, repeats: int = 10,
        compile: bool = True) -> list[dict]:  # fmt: skip
    segment_ids, cu_seqlens, fill = row_segments(rows, row_len)
    segment_ids, cu_seqlens = segment_ids.to(device), cu_seqlens.to(device)
    T = rows * row_len
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, 3, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(T, heads, head_dim, generator=g).to(device, dtype)
    results = []
    for name, attend in variants(device, compile).items():
        call = functools.partial(attend, qkv, segment_ids, cu_seqlens, row_len)

        def forward_backward():
            torch.autograd.grad(call(), qkv, dout)

        forward = time_fn(call, device, repeats=repeats)  # as training runs it: what the backward needs is kept
        both = time_fn(forward_backward, device, repeats=repeats)  # (no no_grad variant: flex compiles once)
        results.append(
            {
                "benchmark": "attention",
                "name": name,
                "rows": rows,
                "row_len": row_len,
                "heads": heads,
                "head_dim": head_dim,
                "dtype": str(dtype).removeprefix("torch."),
                "fill": fill,
                "segments": int(segment_ids.max()) + 1,
                "forward_s": forward,
                "forward_backward_s": both,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--row-len", type=int, default=128)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a CPU-sized run: 4 rows, 2 heads, fp32, 2 repeats")
    p.add_argument("--out", default=None, help="write {environment, rows} as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.rows, args.heads, args.repeats = 4, 2, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = run(device, args.rows, args.row_len, args.heads, args.head_dim, dtype, repeats=args.repeats)
    r0 = rows[0]
    print(f"attention, one layer: {r0['rows']} rows of {r0['row_len']} ({100 * r0['fill']:.1f}% filled, "
          f"{r0['segments']} segments), {r0['heads']} heads of {r0['head_dim']}, {r0['dtype']}, {device}")  # fmt: skip
    print("| variant | forward ms: median (min-max) | forward + backward ms: median (min-max) |")
    print("| --- | ---: | ---: |")
    for r in rows:
        f, b = r["forward_s"], r["forward_backward_s"]
        print(f"| {r['name']} | {1e3 * f['median']:.3f} ({1e3 * f['min']:.3f}-{1e3 * f['max']:.3f}) | "
              f"{1e3 * b['median']:.3f} ({1e3 * b['min']:.3f}-{1e3 * b['max']:.3f}) |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(device), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
