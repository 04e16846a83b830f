"""Attention alone, forward and forward + backward, on one batch of rows as the RowPacker lays them: the
segment-attention kernel (model.attention = triton), FlexAttention compiled (flex, what auto takes with rows), the
dense-mask SDPA reference, and on the same segments laid flat (the flat layout's attention) flash varlen and
cuDNN's ragged attention (`aten._cudnn_attention_forward` with cumulative lengths: not a model option, timed to
see whether one would pay; its q, k and v copied contiguous first, a cost it is timed with). One layer's q, k, v
from one (T, 3, H, D) tensor, as the model makes them; each backward returns the qkv gradient (for flex, SDPA and
the flat variants that includes stacking three gradients, as the model's backward does). Each variant's largest
error against the dense-mask reference in fp32 (output and qkv gradient) is recorded beside its times; a variant
that fails records its error instead.

Segments: sentence lengths (+ [CLS] and [SEP]) drawn log-normal with the synthetic corpus' parameters
(benchmarks/synthetic_data.py: the bundled Korean sample's), or with `--documents` the chunks that pack="document"
cuts from documents of the sample's sentence counts (BERT-large's target rows); placed into rows by the
RowPacker's best-fit decreasing; every row's [PAD] tail is a segment of its own, as in training. The flat
cu_seqlens end in empty segments up to the flat packer's fixed capacity, as a static-shape training batch does.

Run: `python -m mlmtrain.benchmarks.bench_attention --device cuda [--rows 512 --row-len 128 --heads 12
--head-dim 64] [--documents] [--out FILE.json]`; `--quick` is a CPU-sized run (Triton's interpreter for the
kernel).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

from mlmtrain.benchmarks.common import description, time_fn
from mlmtrain.benchmarks.synthetic_data import LOG_MEAN_TOKENS, LOG_SD_TOKENS, SENTENCES_PER_DOCUMENT
from mlmtrain.provenance import environment


def sentence_lengths(rng: np.random.Generator, tokens: int, row_len: int) -> np.ndarray:
    """Segment lengths of pack="sentence" ([CLS] sentence [SEP]) adding up to ~10% more than `tokens`."""
    n = int(tokens / math.exp(LOG_MEAN_TOKENS + LOG_SD_TOKENS**2 / 2) * 1.1)
    return np.minimum(np.round(np.exp(rng.normal(LOG_MEAN_TOKENS, LOG_SD_TOKENS, n))).astype(np.int64) + 2, row_len)


def document_lengths(rng: np.random.Generator, tokens: int, row_len: int) -> np.ndarray:
    """Segment lengths of pack="document": documents of the sample's sentence counts, each cut into greedy chunks
    of at most `row_len` tokens (packing.document_units), shuffled as an epoch is; ~10% more than `tokens`."""
    from mlmtrain.packing import document_units

    lengths, total = [], 0
    while total < 1.1 * tokens:
        n = int(rng.choice(SENTENCES_PER_DOCUMENT))
        sentence = np.clip(np.rint(rng.lognormal(LOG_MEAN_TOKENS, LOG_SD_TOKENS, n)), 1, row_len - 2).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(sentence)])
        units = document_units(offsets, np.array([0, n]), row_len)  # (U, 2) first and end sentence
        chunk = [1 + int(np.sum(sentence[a:b] + 1)) for a, b in units]  # [CLS] s1 [SEP] s2 [SEP] ...
        lengths += chunk
        total += sum(chunk)
    return rng.permutation(np.asarray(lengths, dtype=np.int64))


def flat_capacity(lengths: np.ndarray, tokens: int, row_len: int) -> int:
    """The flat packer's fixed segment count for batches of `tokens` (packing.Packer.segment_capacity)."""
    from mlmtrain.packing import unit_capacity

    return unit_capacity(tokens, float(lengths.mean())) + -(-tokens // row_len)


def row_segments(
    rows: int, row_len: int, seed: int = 0, documents: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(segment_ids (R, L) int32, cu_seqlens of the same segments laid flat (S+1,) int32, fill): sentences (or
    document chunks) drawn until best-fit decreasing leaves some unplaced, the rows as the RowPacker builds them;
    cu_seqlens ends in empty segments (repeated R * L) up to the flat packer's capacity."""
    from mlmtrain.packing import best_fit_decreasing

    rng = np.random.default_rng(seed)
    lengths = (document_lengths if documents else sentence_lengths)(rng, rows * row_len, row_len)
    capacity = flat_capacity(lengths, rows * row_len, row_len)
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
    starts += [rows * row_len] * max(0, capacity + 1 - len(starts))  # the empty segments of a static batch
    return torch.from_numpy(segment_ids), torch.tensor(starts, dtype=torch.int32), fill


def variants(device: torch.device, compile: bool, row_len: int, head_dim: int) -> dict:
    """name -> attend(qkv, segment_ids, cu_seqlens, row_len) -> (T, H, D), for the variants this device runs at
    these sizes."""
    from mlmtrain.attention import (
        flex_row_attention,
        row_block_tables,
        row_mask,
        row_sdpa_attention,
        triton_row_attention,
        varlen_attention,
    )
    from mlmtrain.kernels import triton_runs_on
    from mlmtrain.kernels.segment_attention import MAX_HEAD_DIM, MAX_ROW

    # the model builds a batch's block tables and dense mask once per forward, for all its layers: here once too
    row_block_tables, row_mask = (
        functools.lru_cache(maxsize=1)(row_block_tables),
        functools.lru_cache(maxsize=1)(row_mask),
    )
    out = {}
    if triton_runs_on(device) and row_len <= MAX_ROW and head_dim <= MAX_HEAD_DIM:
        out["segment kernel"] = lambda qkv, seg, cu, L: triton_row_attention(qkv, seg)
    if device.type == "cuda":  # FlexAttention fuses only when compiled, and has no CPU backward
        flex = torch.compile(flex_row_attention, dynamic=False) if compile else flex_row_attention

        def run_flex(qkv, seg, cu, L):
            return flex(*qkv.unbind(1), seg, row_block_tables(seg))

        out["flex"] = run_flex
        out["flash varlen (flat)"] = lambda qkv, seg, cu, L: varlen_attention(*qkv.unbind(1), cu, L)
    out["sdpa, dense mask"] = lambda qkv, seg, cu, L: row_sdpa_attention(*qkv.unbind(1), row_mask(seg), 0.0)
    if device.type == "cuda":  # last: an error of its that breaks the device ends only this bench
        out["cudnn varlen (flat)"] = cudnn_varlen
    return out


def cudnn_varlen(qkv, segment_ids, cu_seqlens, row_len: int):
    """cuDNN's ragged attention on the flat segments: (T, 3, H, D) -> (T, H, D), differentiable (aten's own
    autograd formula calls _cudnn_attention_backward). q, k and v are copied contiguous first."""
    q, k, v = (t.contiguous() for t in qkv.unbind(1))  # (T, H, D) each
    cu = cu_seqlens
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, row_len, row_len, True, 0.0, False)[0]


def run(device: torch.device, rows: int, row_len: int, heads: int, head_dim: int, dtype, *, repeats: int = 10,
        compile: bool = True, documents: bool = False) -> list[dict]:  # fmt: skip
    from mlmtrain.attention import row_mask, row_sdpa_attention

    segment_ids, cu_seqlens, fill = row_segments(rows, row_len, documents=documents)
    segment_ids, cu_seqlens = segment_ids.to(device), cu_seqlens.to(device)
    T = rows * row_len
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, 3, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(T, heads, head_dim, generator=g).to(device, dtype)
    reference = _out_and_grad(
        lambda x: row_sdpa_attention(*x.unbind(1), row_mask(segment_ids), 0.0), qkv.detach().float(), dout.float()
    )
    shape = {"rows": rows, "row_len": row_len, "heads": heads, "head_dim": head_dim, "documents": documents,
             "dtype": str(dtype).removeprefix("torch."), "fill": fill, "segments": int(segment_ids.max()) + 1,
             "flat_segments": len(cu_seqlens) - 1}  # fmt: skip
    results = []
    for name, attend in variants(device, compile, row_len, head_dim).items():
        call = functools.partial(attend, qkv, segment_ids, cu_seqlens, row_len)

        def forward_backward():
            torch.autograd.grad(call(), qkv, dout)

        row = {"benchmark": "attention", "name": name, **shape}
        try:
            out, grad = _out_and_grad(lambda x: attend(x, segment_ids, cu_seqlens, row_len), qkv.detach(), dout)
            row["max_abs_error"] = {"out": _max_diff(out, reference[0]), "dqkv": _max_diff(grad, reference[1])}
            row["forward_s"] = time_fn(call, device, repeats=repeats)  # as training runs it: the backward's inputs kept
            row["forward_backward_s"] = time_fn(forward_backward, device, repeats=repeats)  # (flex compiles once)
        except Exception as e:  # a variant this device or version cannot run: said in its row, the others go on
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        results.append(row)
    return results


def _out_and_grad(attend, qkv: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attend(qkv) and the gradient of <attend(qkv), dout> in qkv, from a leaf copy of qkv."""
    x = qkv.detach().clone().requires_grad_()
    out = attend(x)
    return out.detach(), torch.autograd.grad(out, x, dout.to(out.dtype))[0]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--row-len", type=int, default=128)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--documents", action="store_true", help="document chunks (pack=document), not sentences")
    p.add_argument("--quick", action="store_true", help="a CPU-sized run: 4 rows, 2 heads, fp32, 2 repeats")
    p.add_argument("--out", default=None, help="write {environment, rows} as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.rows, args.heads, args.repeats = 4, 2, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = run(device, args.rows, args.row_len, args.heads, args.head_dim, dtype, repeats=args.repeats,
               documents=args.documents)  # fmt: skip
    r0 = rows[0]
    print(f"attention, one layer: {r0['rows']} rows of {r0['row_len']} ({100 * r0['fill']:.1f}% filled, "
          f"{r0['segments']} {'document chunks' if r0['documents'] else 'sentences'} and [PAD] tails; flat: "
          f"{r0['flat_segments']} with the empty ones), {r0['heads']} heads of {r0['head_dim']}, {r0['dtype']}, "
          f"{device}")  # fmt: skip
    print("| variant | forward ms: median (min-max) | forward + backward ms: median (min-max) | max error: out, dqkv |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} | | |")
            continue
        f, b, e = r["forward_s"], r["forward_backward_s"], r["max_abs_error"]
        print(f"| {r['name']} | {1e3 * f['median']:.3f} ({1e3 * f['min']:.3f}-{1e3 * f['max']:.3f}) | "
              f"{1e3 * b['median']:.3f} ({1e3 * b['min']:.3f}-{1e3 * b['max']:.3f}) | "
              f"{e['out']:.1e}, {e['dqkv']:.1e} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(device), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
