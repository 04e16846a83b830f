"""How full the packers fill a batch, and what they cost the host: today's flat Packer against the RowPacker
(data.layout = rows), on the synthetic vocab-30000 corpus, at seq 128 with sentence packing and seq 512 with
document packing. The packer runs on the trainer's background thread; its time per batch is host time only.

What a packer costs the training loop's thread (`loop_cost`): the loop issues `launches` small torch ops per step
(each releases and retakes the GIL, as a kernel launch does), then waits `device_ms` with the GIL released (the
device's share of the step), taking one batch per step from the packer on its thread (data.packer = thread) or
in its process (data.packer = process); the loop's host ms per step (taking the batch and the ops) against no
packer at all. With two or more
CPUs the loop is pinned to one and the packer to the others, so what is measured is the GIL, not a shared core.

Run: `python -m mlmtrain.benchmarks.bench_packing --out DIR [--tokens 4000000] [--batches 30] [--steps 40]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from mlmtrain.benchmarks.common import description

LAUNCHES, DEVICE_MS = 3000, 30.0  # per step: ~the launches of a compiled BERT-base step, and a wait


def run(data, tokens_per_batch: int = 65536, batches: int = 30, seed: int = 0) -> list[dict]:
    from mlmtrain.packing import Packer, RowPacker
    from mlmtrain.prepare import load_split

    rows = []
    for cap, pack in ((128, "sentence"), (512, "document")):
        shard = load_split(data.data_dirs[cap], "train")
        for packer in (Packer, RowPacker):
            stream = packer(shard, tokens_per_batch, cap, seed, pack).batches()
            next(stream)  # the first batch also draws the epoch's order
            fills, seconds = [], []
            for _ in range(batches):
                t0 = time.perf_counter()
                batch = next(stream)
                seconds.append(time.perf_counter() - t0)
                fills.append(batch.num_real_tokens / tokens_per_batch)
            rows.append(
                {
                    "layout": "rows" if packer is RowPacker else "flat",
                    "seq_cap": cap,
                    "pack": pack,
                    "fill_min": min(fills),
                    "fill_median": statistics.median(fills),
                    "host_ms_median": 1e3 * statistics.median(seconds),
                    "host_ms_max": 1e3 * max(seconds),
                }
            )
    return rows


def loop_cost(data_dir, layout: str, where: str, tokens_per_batch: int = 65536, cap: int = 128, steps: int = 40,
              launches: int = LAUNCHES, device_ms: float = DEVICE_MS) -> dict:  # fmt: skip
    """The loop's host ms per step (median, max over `steps` after 5) beside the packer `where` = none | thread |
    process (see the module docstring)."""
    import torch

    from mlmtrain.packing import BatchStream
    from mlmtrain.prefetch import Prefetcher, ProcessPrefetcher
    from mlmtrain.prepare import read_meta, shard_specials

    meta = read_meta(data_dir)
    stream = BatchStream(str(data_dir), layout == "rows", tokens_per_batch, cap, 0, "sentence", 0, 1, True,
                         shard_specials(meta), (0, 0), 0, 1, meta["vocab_size"])  # fmt: skip
    packer = None
    if where == "thread":
        packer = Prefetcher(stream, name="packer")
    elif where == "process":
        packer = ProcessPrefetcher(stream, stream.batch_bytes(), name="packer")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = len(cpus) >= 2
    if pinned:  # the loop on one CPU, the packer on the others
        helper = packer._thread.native_id if where == "thread" else packer._process.pid if packer else None
        if helper is not None:
            os.sched_setaffinity(helper, cpus[1:])
        os.sched_setaffinity(0, cpus[:1])
    a, b, out = torch.zeros(16), torch.ones(16), torch.empty(16)
    seconds = []
    try:
        if packer is not None:
            packer.get()  # started: the first batch (and the process's imports) are not the loop's cost
        for _ in range(steps + 5):
            t0 = time.perf_counter()
            if packer is not None:
                packer.get()  # the batch's hand-over is the loop's too (the process's: a copy out of its slot)
            for _ in range(launches):
                torch.add(a, b, out=out)
            seconds.append(time.perf_counter() - t0)
            time.sleep(device_ms / 1e3)
    finally:
        if packer is not None:
            packer.close()
        if pinned:
            os.sched_setaffinity(0, cpus)
    seconds = seconds[5:]
    return {"layout": layout, "packer": where, "seq_cap": cap, "pinned": pinned, "launches": launches,
            "device_ms": device_ms, "loop_ms_median": 1e3 * statistics.median(seconds),
            "loop_ms_max": 1e3 * max(seconds)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from mlmtrain.benchmarks.synthetic_data import make_synthetic_data

    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--out", required=True, help="work folder (the corpus) and packing_results.json")
    p.add_argument("--tokens", type=int, default=4_000_000, help="train tokens of the synthetic corpus")
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--steps", type=int, default=40, help="steps of the loop-cost rows")
    args = p.parse_args(argv)
    data = make_synthetic_data(Path(args.out) / "synthetic", seq_caps=(128, 512), train_tokens=args.tokens)
    rows = run(data, args.tokens_per_batch, args.batches)
    where = [("flat", "none")] + [(layout, w) for layout in ("flat", "rows") for w in ("thread", "process")]
    loop = [loop_cost(data.data_dirs[128], layout, w, args.tokens_per_batch, steps=args.steps) for layout, w in where]
    results = {"packing": rows, "loop_cost": loop}
    Path(args.out, "packing_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("| layout | seq cap, packing | fill (min / median) | host ms per batch (median / max) |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['layout']} | {r['seq_cap']}, {r['pack']} | {100 * r['fill_min']:.2f}% / "
            f"{100 * r['fill_median']:.2f}% | {r['host_ms_median']:.1f} / {r['host_ms_max']:.1f} |"
        )
    base = loop[0]["loop_ms_median"]
    cpus = "loop and packer on separate CPUs" if loop[0]["pinned"] else "not pinned"
    print(f"\nThe loop's host ms per step ({LAUNCHES} GIL-releasing ops, then {DEVICE_MS:g} ms waiting; seq 128, "
          f"sentence packing; {cpus}):\n")  # fmt: skip
    print("| layout | packer | loop ms per step (median / max) | added by the packer |")
    print("| --- | --- | ---: | ---: |")
    for r in loop:
        print(f"| {r['layout'] if r['packer'] != 'none' else '-'} | {r['packer']} | {r['loop_ms_median']:.2f} / "
              f"{r['loop_ms_max']:.2f} | {r['loop_ms_median'] - base:+.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
