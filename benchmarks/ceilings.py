"""The hardware's limits, measured on the spot: what every other figure in the report is judged against.

- matmul: `a @ b` on large random square matrices (bf16, and fp32 on CPU where training runs in fp32),
  2 N^3 FLOPs per call. The best median over the sizes tried is the achievable compute ceiling; it is
  usually below the datasheet peak, and MFU is quoted against both.
- copy: `dst.copy_(src)` device-to-device; bytes = read + write = 2 x the tensor size. The masking kernel
  reads ids and writes ids + labels, so its fraction of this figure is its distance from the memory wall.

Fresh random inputs per repeat (made outside the timed region), warm-up, device events and medians come
from `benchmarks/common.time_fn`.

Run alone: `python -m mlmtrain.benchmarks.ceilings [--device cuda] [--quick]`.
"""

from __future__ import annotations

import argparse
import json

import torch

from mlmtrain.benchmarks.common import description, record, time_fn

# (matmul sizes, copy sizes in MiB, repeats) per mode. On an H200 (2026-11-30) the 16384^3 matmul takes ~12 ms,
# 8192^3 ~1.4 ms and the copy of 2 GiB ~1.0 ms, so the full set takes seconds; the quick set is sized for 2 CPU
# cores.
FULL = {"matmul_sizes": (4096, 8192, 16384), "copy_mib": (256, 2048), "repeats": 20}
QUICK = {"matmul_sizes": (256, 512), "copy_mib": (8, 32), "repeats": 5}


def matmul_rows(device: torch.device, sizes, dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:

        def setup():  # fresh operands every repeat, so no repeat reuses a warm cache
            return (torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))

        seconds = time_fn(lambda ab: torch.mm(*ab), device, warmup=3, repeats=repeats, setup=setup)
        rows.append(
            record(
                "ceilings",
                f"matmul {n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
                seconds,
                work={"flops": 2.0 * n**3},
                kind="matmul",
                n=n,
                dtype=str(dtype).removeprefix("torch."),
            )
        )
    return rows


def copy_rows(device: torch.device, sizes_mib, repeats: int) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        numel = mib * 2**20 // 4  # float32 elements
        dst = torch.empty(numel, device=device, dtype=torch.float32)

        def setup():
            return torch.rand(numel, device=device, dtype=torch.float32)

        seconds = time_fn(dst.copy_, device, warmup=3, repeats=repeats, setup=setup)
        rows.append(
            record(
                "ceilings",
                f"copy {mib} MiB",
                seconds,
                work={"bytes": 2.0 * numel * 4},
                kind="copy",
                mib=mib,
                note="bytes = read + write",
            )
        )
        del dst
    return rows


def run(device: str | torch.device = "cuda", quick: bool = False, repeats: int | None = None) -> list[dict]:
    """Matmul TFLOP/s and copy GB/s rows (benchmarks/common.record layout), plus one summary row per
    ceiling (`kind` "matmul_ceiling" / "copy_ceiling": the best median, with its spread)."""
    device = torch.device(device)
    plan = QUICK if quick else FULL
    repeats = repeats or plan["repeats"]
    dtypes = [torch.bfloat16] + ([torch.float32] if device.type == "cpu" else [])
    rows = []
    for dtype in dtypes:
        rows += matmul_rows(device, plan["matmul_sizes"], dtype, repeats)
        best = max(
            (r for r in rows if r["kind"] == "matmul" and r["dtype"] == str(dtype).removeprefix("torch.")),
            key=lambda r: r["flops_per_s"]["median"],
        )
        rows.append(
            {
                **best,
                "name": f"matmul ceiling {best['dtype']}",
                "kind": "matmul_ceiling",
                "tflops": {k: v / 1e12 for k, v in best["flops_per_s"].items()},
            }
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    copies = copy_rows(device, plan["copy_mib"], repeats)
    best = max(copies, key=lambda r: r["bytes_per_s"]["median"])
    rows += copies
    rows.append(
        {
            **best,
            "name": "copy ceiling",
            "kind": "copy_ceiling",
            "gb_per_s": {k: v / 1e9 for k, v in best["bytes_per_s"].items()},
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    args = p.parse_args(argv)
    for r in run(args.device, args.quick):
        if r["kind"].endswith("ceiling"):
            print(json.dumps({k: r[k] for k in ("name", "tflops", "gb_per_s") if k in r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
