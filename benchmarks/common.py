"""Measurement method shared by every benchmark: warm-up, device-event timing, medians over repeats,
fresh random inputs per repeat, and the spread (min/median/max) reported with every figure.

A result is a flat dict (one row of results.json) made by `record(...)`; the environment (device, versions, the
code's commit, date) is attached once per report by `mlmtrain.provenance.environment()`."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mlmtrain.files import json_text
from mlmtrain.provenance import environment

OUT_OF_TIME = "skipped: the time budget (--time-limit) ran out"  # a row or section's error: not measured yet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 10,
    setup: Callable[[], object] | None = None,
) -> dict:
    """Time `fn()` (or `fn(setup())` when `setup` is given, so each repeat gets fresh inputs made outside
    the timed region). Returns seconds as {"min", "median", "max", "repeats"}.

    On CUDA each repeat is bracketed by device events (no host clock in the timed region); on CPU by
    `time.perf_counter`. Warm-up runs are not recorded (compilation, autotuning, allocator growth)."""
    times = []
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        run = (lambda: fn(arg)) if setup is not None else fn
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()  # host waits for the device: the one sync per repeat
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    return {
        "min": min(times),
        "median": statistics.median(times),
        "max": max(times),
        "repeats": repeats,
    }


def record(benchmark: str, name: str, seconds: dict, *, work: dict | None = None, **fields) -> dict:
    """One result row. `work` maps a unit to the amount done per call (e.g. {"tokens": 65536,
    "bytes": 1.2e6, "flops": 3e12}); rates per second are derived from the median and the spread from
    min/max, so the row states its own arithmetic."""
    row = {"benchmark": benchmark, "name": name, "seconds": seconds, **fields}
    for unit, amount in (work or {}).items():
        row[unit] = amount
        row[f"{unit}_per_s"] = {
            "median": amount / seconds["median"],
            "min": amount / seconds["max"],
            "max": amount / seconds["min"],
        }
    return row


def kernel_rows(benchmark: str, on: torch.device, rows: list, label: str, *, repeats: int, **common):
    """A kernel benchmark's `add(name, fn, work_bytes, **fields)`: times fn (3 warm-up calls and `repeats` on a
    GPU; 1 and repeats // 5 on the CPU's interpreter) on device `on`, appends the row (with `common` fields) to
    `rows`, prints it after `label`. Also `add.copy(work_bytes)`: the copy ceiling moving those bytes (4 read + 4
    written per fp32 element)."""
    warmup, reps = (3, repeats) if on.type == "cuda" else (1, max(1, repeats // 5))

    def add(name: str, fn, work_bytes: int, **fields) -> dict:
        seconds = time_fn(fn, on, warmup=warmup, repeats=reps)
        rows.append(record(benchmark, name, seconds, work={"bytes": work_bytes}, **common, **fields))
        r = rows[-1]
        median_us, gb_s = r["seconds"]["median"] * 1e6, r["bytes_per_s"]["median"] / 1e9
        print(f"{label} {name:<40} {median_us:10.1f} us  {gb_s:8.1f} GB/s", flush=True)
        return r

    def copy(work_bytes: int) -> dict:
        src = torch.rand(work_bytes // 8, device=on)
        dst = torch.empty_like(src)
        return add("copy", lambda: dst.copy_(src), work_bytes, path="copy", passes="copy")

    add.copy = copy
    return add


def print_and_save(rows: list[dict], device: torch.device, out: str | None) -> None:
    """A standalone benchmark's ending: its summary rows on stdout, and every row with the environment in `out`."""
    import os

    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted:  # the "triton" rows time Triton's interpreter on the CPU: a smoke test, not the kernels' speed
        print("(Triton kernels ran in Triton's interpreter on the CPU: their rows time the interpreter)")
    for r in rows:
        if r.get("kind") == "summary":
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if out:
        env = {**environment(device), "triton_interpreter": interpreted}
        Path(out).write_text(json_text({"environment": env, "rows": rows}, indent=1), encoding="utf-8")


def kernel_bench_device(device: str | None, threads: int | None) -> torch.device:
    """A kernel benchmark's device: CUDA if asked for or present, else the CPU, where the Triton kernels run in
    the interpreter (which must be chosen before triton is first imported)."""
    import os

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def description(doc: str) -> str:
    """A docstring's first paragraph on one line: a --help description (its first line alone stops mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())


def kernel_bench_main(argv, doc: str, run, *, sizes: tuple, sweep_help: str, extra=None) -> int:
    """A kernel benchmark's command line: `sizes` = (GPU tokens, GPU sizes, --quick tokens, --quick sizes); `run`
    takes (tokens, hidden, device, dtype=, repeats=, compile_rows=, sweep=) and the `extra` flags, which `extra`
    adds to the parser and names: extra(parser) -> [dest, ...]."""
    import argparse

    from mlmtrain.config import torch_dtype

    gpu_tokens, gpu_hidden, quick_tokens, quick_hidden = sizes
    p = argparse.ArgumentParser(description=description(doc))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tokens", type=int, default=None, help=f"rows N (default {gpu_tokens}; --quick {quick_tokens})")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help=f"row sizes C (default {gpu_hidden})")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help=f"{quick_tokens} tokens, C = {quick_hidden}: a CPU smoke run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to build on CPU)")
    p.add_argument("--sweep", action="store_true", help=sweep_help)
    p.add_argument("--out", default=None, help="write {environment, rows} as JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    names = extra(p) if extra else []
    args = p.parse_args(argv)
    device = kernel_bench_device(args.device, args.threads)
    tokens = args.tokens or (quick_tokens if args.quick else None)
    hidden = tuple(args.hidden) if args.hidden else (quick_hidden if args.quick else None)
    options = dict(
        dtype=torch_dtype(args.dtype), repeats=args.repeats, compile_rows=not args.no_compile, sweep=args.sweep
    )
    rows = run(tokens, hidden, device, **options, **{name: getattr(args, name) for name in names})
    print_and_save(rows, device, args.out)
    return 0


def raise_stop(stopped_by: str | None) -> None:
    """A signal that stopped a bench's training run (train saves and returns, as for a user) stops the bench: as
    the signal would have outside the run, so the row is not kept as measured and the command exits for it."""
    import signal

    from mlmtrain.cli import Terminated

    if stopped_by == "SIGINT":
        raise KeyboardInterrupt
    if stopped_by in ("SIGTERM", "SIGHUP", "SIGPIPE"):
        raise Terminated(signal.Signals[stopped_by])
