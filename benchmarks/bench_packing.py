"""How full the packers fill a batch, and what they cost the host: today's flat Packer against the RowPacker
(data.layout = rows), on the synthetic vocab-30000 corpus, at seq 128 with sentence packing and seq 512 with
document packing. The packer runs on the trainer's background thread; its time per batch is host time only.

Run: `python -m mlmtrain.benchmarks.bench_packing --out DIR [--tokens 4000000] [--batches 30]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    from mlmtrain.benchmarks.synthetic_data import make_synthetic_data

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="work folder (the corpus) and packing_results.json")
    p.add_argument("--tokens", type=int, default=4_000_000, help="train tokens of the synthetic corpus")
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--batches", type=int, default=30)
    args = p.parse_args(argv)
    data = make_synthetic_data(Path(args.out) / "synthetic", seq_caps=(128, 512), train_tokens=args.tokens)
    rows = run(data, args.tokens_per_batch, args.batches)
    Path(args.out, "packing_results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("| layout | seq cap, packing | fill (min / median) | host ms per batch (median / max) |")
    print("| --- | --- | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['layout']} | {r['seq_cap']}, {r['pack']} | {100 * r['fill_min']:.2f}% / "
            f"{100 * r['fill_median']:.2f}% | {r['host_ms_median']:.1f} / {r['host_ms_max']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
