"""Tokenizer training time and `prepare` throughput on a generated corpus of >= 100 MB, with peak RSS, and
the naive path (AutoTokenizer called line by line, as the HF Trainer baseline does) measured in the same run.

Corpus: whole sentences of the bundled sample (`mlmtrain.text.sample_corpus_path()`) drawn at random
(seeded) into documents of 2-30 sentences until the size is reached. Real sentences, so tokenization cost
per byte is realistic; but the vocabulary is the sample's (a few thousand distinct words), so WordPiece
*training*, whose cost grows with the number of distinct words, is faster here than on a real 100 MB corpus.

Rows (each from `common.time_fn`, seconds as min/median/max; plus CPU seconds, user + system over all
threads, which a shared, loaded machine distorts less than wall time):
- `tokenizer`: `mlmtrain tokenizer` (default settings, vocab 30000) run as its own process; peak RSS is
  that process's (VmHWM), so it is what a user sees, not this script's.
- `prepare`: `mlmtrain prepare` (defaults: valid 0.01, max_seq_len 128) as its own process, same RSS rule.
  Wall time includes process start (~1 s); `prepare_seconds_inside` is prepare's own clock from meta.json.
- `encode_batch_fast`: the tokenizer alone on lines already in memory, one input per line, in batches of
  the size prepare reads (1 MiB).
- `encode_lines`: what prepare calls (`mlmtrain.prepare.encode_lines`: 64 lines joined by [SEP] per input,
  ids cut back apart) on the same in-memory lines: the ceiling `prepare` can reach. prepare / this = how
  close our code (reading, splitting, writing) is to "limited by the tokenizer".
- `naive_autotokenizer`: `AutoTokenizer.from_pretrained(dir)` then `tok(line)["input_ids"]` per line, on
  the first `--naive-mb` MB of the corpus (it is slow; the rate is per byte, so it compares directly).

Ratios are given on both clocks: wall (what a user waits; the naive path uses one core, ours all of them)
and CPU (work per byte, whatever the core count and the load). Load averages at start and end are saved.

Run: `python -m mlmtrain.benchmarks.bench_prepare --out DIR [--mb 100] [--naive-mb 10] [--repeats 1]`
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mlmtrain.benchmarks.common import description, record, time_fn
from mlmtrain.provenance import environment

MB = 1e6


def make_corpus(path: Path, target_bytes: int, seed: int = 0) -> dict:
    """Write documents of 2-30 random sample sentences, a blank line between documents."""
    from mlmtrain.text import sample_corpus_path

    sentences = [s for s in sample_corpus_path().read_text(encoding="utf-8").split("\n") if s.strip()]
    rng = random.Random(seed)
    written = lines = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            doc = "\n".join(rng.choice(sentences) for _ in range(rng.randint(2, 30))) + "\n\n"
            f.write(doc)
            written += len(doc.encode("utf-8"))
            lines += doc.count("\n") - 1
            docs += 1
    return {"bytes": path.stat().st_size, "sentences": lines, "documents": docs}


# Runs `mlmtrain.cli.main` and, at exit, writes the process's VmHWM (peak resident set of this exec'd
# image). Not ru_maxrss: Linux carries the fork-time RSS of the parent (this script, with torch loaded)
# into the child's ru_maxrss across exec.
_LAUNCH = """import atexit, re, sys
def hwm():
    kib = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    open(sys.argv[1], "w").write(str(kib))
atexit.register(hwm)
from mlmtrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(args: list[str], work: Path) -> dict:
    """Run `mlmtrain ARGS` as a child process; return its wall seconds, CPU seconds (user + system, all
    threads) and peak RSS (MiB)."""
    hwm_file = work / "peak_rss_kib.txt"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, str(hwm_file), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so that rusage is ours to read
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mlmtrain {' '.join(args)} failed:\n{stderr}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": int(hwm_file.read_text()) / 1024,
    }


def timed_cli(args: list[str], work: Path, repeats: int) -> tuple[dict, dict]:
    runs = []
    seconds = time_fn(lambda: runs.append(run_cli(args, work)), torch.device("cpu"), warmup=0, repeats=repeats)
    extra = {
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }
    return seconds, extra


def timed_in_process(fn, warmup: int, repeats: int) -> tuple[dict, dict]:
    """time_fn, plus the median process CPU time (all threads) of the timed repeats."""
    cpu = []

    def run():
        c0 = time.process_time()
        fn()
        cpu.append(time.process_time() - c0)

    seconds = time_fn(run, torch.device("cpu"), warmup=warmup, repeats=repeats)
    return seconds, {"cpu_seconds": statistics.median(cpu[warmup:])}


def read_lines(path: Path, max_bytes: float) -> list[str]:
    lines, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            size += len(line.encode("utf-8"))
            if size > max_bytes:
                break
            if line.strip():
                lines.append(line.rstrip("\n"))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--out", required=True, help="work folder (corpus, tokenizer, shards, results.json)")
    p.add_argument("--mb", type=float, default=100, help="corpus size in MB (default 100)")
    p.add_argument("--naive-mb", type=float, default=10, help="MB of the corpus the naive path tokenizes (default 10)")
    p.add_argument("--ceiling-mb", type=float, default=20, help="MB held in memory for the encode_batch_fast ceiling")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats of each row (default 1)")
    args = p.parse_args(argv)

    from mlmtrain.prepare import encode_lines
    from mlmtrain.text import READ_BLOCK_BYTES
    from mlmtrain.tokenizer_folder import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    env = environment(cpu)
    env["cpu_count"] = os.cpu_count()
    env["loadavg_start"] = os.getloadavg()
    corpus = out / "corpus.txt"
    if not corpus.exists() or corpus.stat().st_size < args.mb * MB:
        info = make_corpus(corpus, int(args.mb * MB))
    else:
        info = {"bytes": corpus.stat().st_size}
    nbytes = info["bytes"]
    print(f"corpus: {corpus} {nbytes / MB:.1f} MB", file=sys.stderr)
    rows = []

    tok_dir, data_dir = out / "tokenizer", out / "data"
    seconds, extra = timed_cli(
        ["tokenizer", "--input", str(corpus), "--out", str(tok_dir), "--overwrite"], out, args.repeats
    )
    vocab_size = load_tokenizer(tok_dir).get_vocab_size()
    rows.append(record("prepare", "tokenizer", seconds, work={"bytes": nbytes}, vocab_size=vocab_size, **extra))

    seconds, extra = timed_cli(
        [
            "prepare",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(data_dir),
            "--overwrite",
            "--no-progress",
        ],
        out,
        args.repeats,
    )
    meta = json.loads((data_dir / "meta.json").read_text())
    rows.append(
        record(
            "prepare",
            "prepare",
            seconds,
            work={
                "bytes": nbytes,
                "lines": meta["input_lines"],
                "sentences": meta["train"]["sentences"] + meta["valid"]["sentences"],
                "tokens": meta["train"]["tokens"] + meta["valid"]["tokens"],
            },
            prepare_seconds_inside=meta["seconds"],
            **extra,
        )
    )

    # The tokenizer alone, lines already in memory, same batch size as prepare: the ceiling.
    tok = load_tokenizer(tok_dir)
    lines = read_lines(corpus, args.ceiling_mb * MB)
    ceiling_bytes = sum(len(s.encode("utf-8")) + 1 for s in lines)
    per_batch = max(1, int(len(lines) * READ_BLOCK_BYTES / ceiling_bytes))
    batches = [lines[i : i + per_batch] for i in range(0, len(lines), per_batch)]
    seconds, extra = timed_in_process(
        lambda: [tok.encode_batch_fast(b, add_special_tokens=False) for b in batches],
        warmup=1,
        repeats=max(3, args.repeats),
    )
    rows.append(
        record(
            "prepare",
            "encode_batch_fast",
            seconds,
            work={"bytes": ceiling_bytes, "lines": len(lines)},
            batch_lines=per_batch,
            tokenizers_parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
            **extra,
        )
    )
    seconds, extra = timed_in_process(
        lambda: [encode_lines(tok, b, np.uint16) for b in batches], warmup=1, repeats=max(3, args.repeats)
    )
    rows.append(
        record(
            "prepare",
            "encode_lines",
            seconds,
            work={"bytes": ceiling_bytes, "lines": len(lines)},
            batch_lines=per_batch,
            **extra,
        )
    )

    # The HF Trainer baseline's way: AutoTokenizer, one call per line.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    lines = read_lines(corpus, args.naive_mb * MB)
    naive_bytes = sum(len(s.encode("utf-8")) + 1 for s in lines)
    seconds, extra = timed_in_process(lambda: [hf(s)["input_ids"] for s in lines], warmup=0, repeats=args.repeats)
    rows.append(
        record(
            "prepare",
            "naive_autotokenizer",
            seconds,
            work={"bytes": naive_bytes, "lines": len(lines)},
            tokenizer_class=type(hf).__name__,
            **extra,
        )
    )

    for r in rows:
        r["bytes_per_cpu_s"] = r["bytes"] / r["cpu_seconds"]
    rate = {r["name"]: r["bytes_per_s"]["median"] for r in rows}
    cpu_rate = {r["name"]: r["bytes_per_cpu_s"] for r in rows}
    summary = {}
    for clock, rates in (("wall", rate), ("cpu", cpu_rate)):
        summary[f"prepare_vs_naive_{clock}"] = rates["prepare"] / rates["naive_autotokenizer"]
        summary[f"prepare_vs_tokenizer_ceiling_{clock}"] = rates["prepare"] / rates["encode_lines"]
        summary[f"encode_lines_vs_encode_batch_fast_{clock}"] = rates["encode_lines"] / rates["encode_batch_fast"]
        summary[f"encode_batch_fast_vs_naive_{clock}"] = rates["encode_batch_fast"] / rates["naive_autotokenizer"]
    env["loadavg_end"] = os.getloadavg()
    result = {"environment": env, "corpus": info, "rows": rows, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print("| row | wall s (median, min-max) | MB/s wall | lines/s wall | CPU s | MB per CPU-s | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        s = r["seconds"]
        lines = f"{r['lines_per_s']['median']:,.0f}" if "lines_per_s" in r else "-"
        rss = f"{r['peak_rss_mib']:,.0f} MiB" if "peak_rss_mib" in r else "-"
        print(
            f"| {r['name']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
            f"{r['bytes_per_s']['median'] / MB:.2f} | {lines} | {r['cpu_seconds']:.2f} | "
            f"{r['bytes_per_cpu_s'] / MB:.2f} | {rss} |"
        )
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
