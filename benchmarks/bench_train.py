"""Full training steps: our trainer vs the HF Trainer baseline (benchmarks/recipe.py), in one run, on the same
sentences, the same model size, the same number of real tokens and optimizer steps; plus a sweep of our
step over tokens per batch and sequence caps.

Data: the bundled sample corpus (`mlmtrain.text.sample_corpus_path()`, ~1k Korean sentences). Every 10th
distinct sentence is held out as the validation set both models are scored on; the rest is the training
text. It is small, so both trainers cycle through it (ours: the packer's stream runs on into the next
epoch, reshuffled; the recipe: the lines repeated in order, shuffled by the Trainer's sampler). A WordPiece
tokenizer is trained on it (the corpus supports a smaller vocabulary than 30000; every row names it).

Per trainer, a row: real tokens/s (median over the timed windows, with min/max), achieved TFLOP/s and MFU
(one FLOPs formula for both: `mlmtrain.flops`, encoder on real tokens, head on the masked share), peak
memory, and the validation MLM loss after the same tokens from one evaluator (`recipe.mlm_eval`: the same
held-out sentences with the same masks, our checkpoint loaded into transformers' BertForMaskedLM).
Ours is timed by its own log windows (`train.log_every` steps each; the first window, which holds
torch.compile, is dropped); the recipe per optimizer step (the first `warmup_skip` dropped).

Run alone: `python -m mlmtrain.benchmarks.bench_train --out DIR [--device cuda] [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mlmtrain.benchmarks.common import OUT_OF_TIME, raise_stop
from mlmtrain.config import auto_warmup, default_precision
from mlmtrain.files import json_text
from mlmtrain.profiling import spread

HOLDOUT_EVERY = 10  # every 10th distinct sentence is validation


@dataclass
class BenchData:
    tokenizer_dir: Path
    train_lines: list[str]
    valid_lines: list[str]
    data_dirs: dict[int, Path]  # sequence cap -> token shards
    vocab_size: int


def make_data(work_dir: str | Path, seq_caps=(128,), vocab_size: int = 30000, seed: int = 0) -> BenchData:
    """Tokenizer + shards (one per sequence cap) from the sample corpus minus the held-out sentences."""
    from mlmtrain.text import sample_corpus_path
    from mlmtrain.tokenizer import TokenizerSettings, train_tokenizer

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    lines = sample_corpus_path().read_text(encoding="utf-8").splitlines()
    distinct = list(dict.fromkeys(s.strip() for s in lines if s.strip()))
    held_out = set(distinct[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY])
    kept = [s for s in lines if s.strip() not in held_out]  # blank lines kept: they are document breaks
    train_text = work_dir / "train.txt"
    train_text.write_text("\n".join(kept) + "\n", encoding="utf-8")
    tokenizer_dir = work_dir / "tokenizer"
    vocab = train_tokenizer(
        [train_text], tokenizer_dir, TokenizerSettings(vocab_size=vocab_size), overwrite=True, progress=False
    )
    data_dirs = prepare_at_caps(train_text, tokenizer_dir, work_dir, seq_caps, seed, valid_fraction=0.02)
    train_lines = [s.strip() for s in kept if s.strip()]
    return BenchData(tokenizer_dir, train_lines, [s for s in distinct if s in held_out], data_dirs, vocab)


def prepare_at_caps(text: Path, tokenizer_dir: Path, work_dir: Path, caps, seed: int, valid_fraction: float) -> dict:
    """Shards of one text file at each sequence cap (`work_dir/data_{cap}`), through the real `prepare`."""
    from mlmtrain.prepare import prepare

    data_dirs = {}
    for cap in caps:
        data_dirs[cap] = work_dir / f"data_{cap}"
        prepare([text], tokenizer_dir, data_dirs[cap], valid_fraction, max_seq_len=cap, seed=seed, overwrite=True,
                progress=False)  # fmt: skip
    return data_dirs


def _fresh_device_state(device: torch.device) -> None:
    """Between runs in one process: drop compiled graphs (else dynamo recompiles with dynamic shapes, and
    after 8 recompiles falls back to eager) and cached memory, and restart the peak-memory counter."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_windows(windows: list[dict], steps: int, log_every: int, profiled: bool) -> list[dict]:
    """The metrics.jsonl windows a rate is taken from: whole log windows (`log_every` steps; a run whose steps are
    not a multiple of it ends in a short one), not the first (compilation and warm-up), and, when the run was
    profiled, none holding a step the profiler touched (its warm-up step and the traced ones: the last
    `log_every` steps, see run_ours). All of them when none is left (a run too short to time)."""
    untraced_end = steps - log_every if profiled else steps  # windows ending here or before are clean
    ends = [0] + [w["step"] for w in windows]
    timed = [w for i, w in enumerate(windows) if i and w["step"] - ends[i] == log_every and w["step"] <= untraced_end]
    return timed or windows


def run_ours(
    data: BenchData,
    out_dir: Path,
    *,
    size: str,
    tokens_per_batch: int,
    steps: int,
    device: str,
    seq_cap: int = 128,
    compile: bool = True,
    log_every: int = 5,
    warmup_steps: int = 0,
    seed: int = 0,
    profile: bool = False,
    save_final: bool = False,
    options: dict | None = None,
) -> dict:
    """One `mlmtrain.train.train` run; returns its summary plus the timed log windows' spread. With
    `profile`, the last `log_every` steps are profiled (the first warms the profiler up, the rest are traced:
    per-phase times in summary["phase_ms"], kernel categories in OUT/profile/categories.json) and every log
    window holding one of them is left out of the timing (`timed_windows`), as the profiler slows it down.
    `options`: more config keys (dotted, as `--set` takes them)."""
    from torch._dynamo.utils import counters

    from mlmtrain.config_load import load_config
    from mlmtrain.errors import UserError
    from mlmtrain.files import folder_state, foreign_files, lock_holder
    from mlmtrain.run_folder import RUN_LAYOUT
    from mlmtrain.train import train

    dev = torch.device(device)
    _fresh_device_state(dev)
    cfg = load_config(
        None,
        {
            "data.data_dir": str(data.data_dirs[seq_cap]),
            "data.tokenizer_dir": str(data.tokenizer_dir),
            "model.size": size,
            "train.max_steps": steps,
            "data.tokens_per_batch": tokens_per_batch,
            "data.pack": "sentence" if seq_cap <= 128 else "document",
            "train.precision": default_precision(dev.type),
            "train.compile": "on" if compile else "off",
            "train.device": device,
            "train.eval_every": 0,
            "train.log_every": log_every,
            "train.seed": seed,
            "train.checkpoint_minutes": 1e6,
            "train.checkpoint_at_end": save_final,
            "optim.warmup_steps": warmup_steps,
            "train.profile_steps": f"{steps - log_every + 1}:{steps}" if profile else "",
            "train.profile_warmup": 1,
            **(options or {}),
        },
    )
    cfg.out_dir = str(out_dir)
    if folder_state(out_dir, RUN_LAYOUT)[0] == "mine":  # the bench's own run from an earlier `--work` reuse
        if foreign_files(out_dir, RUN_LAYOUT) or lock_holder(out_dir):
            raise UserError(f"{out_dir} holds files a run does not write, or a process trains in it: it is kept")
        shutil.rmtree(out_dir)
    counters.clear()
    t0 = time.perf_counter()
    summary = train(cfg, log=lambda msg: print(msg, file=sys.stderr))
    wall_s = time.perf_counter() - t0
    raise_stop(summary.get("stopped_by"))
    # what torch.compile did in this run: more graphs than the step's (and eval's) means it recompiled; a CUDA-graph
    # skip means the graphs asked for were not used (inductor logs why)
    compiled = {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }
    windows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "tokens_per_s" in w]
    timed = timed_windows(windows, steps, log_every, profile)
    steps_in = {w["step"]: w["step"] - end for w, end in zip(windows, [0] + [w["step"] for w in windows])}  # per row
    # windows hold the same number of steps of (nearly) the same real tokens, so the overall rate (timed
    # tokens / timed seconds) is the harmonic mean of the window rates
    overall = len(timed) / sum(1 / w["tokens_per_s"] for w in timed)
    categories = out_dir / "profile" / "categories.json"  # written by profilers that break a step into kernels
    return {
        "kernel_categories": json.loads(categories.read_text()) if categories.is_file() else None,
        "summary": summary,
        "wall_s": wall_s,
        "timed_windows": len(timed),
        "log_every": log_every,
        "tokens_per_s": {"overall": overall, **spread(w["tokens_per_s"] for w in timed)},
        "step_time_s": spread(w["elapsed_s"] / steps_in[w["step"]] for w in timed),  # the rates' windows, not all
        "achieved_tflops": spread(w["tflops"] for w in timed),
        "mfu": spread(w["mfu"] for w in timed),
        "samples_per_s": spread(w["samples_per_s"] for w in timed),
        # ms per step the host waited for the device at the log step's read: near 0, the host kept the device waiting
        "device_wait_ms_per_step": spread(1e3 * w["device_wait_s"] / log_every for w in timed),
        "pack": cfg.data.pack,
        "precision": summary.get("precision"),
        "compile": summary.get("compile"),
        "compiled": compiled,
        "loss_curve": [[w["step"], w["loss"]] for w in windows],  # every log window's mean train loss
    }


def ours_row(
    name: str, result: dict, *, size: str, tokens_per_batch: int, seq_cap: int, benchmark: str, **fields
) -> dict:
    s = result["summary"]
    return {
        "benchmark": benchmark,
        "name": name,
        "trainer": "ours",
        "size": size,
        "tokens_per_batch": tokens_per_batch,
        "seq_cap": seq_cap,
        "pack": result["pack"],
        "precision": result["precision"],
        "compile": result["compile"],
        "steps": s["steps"],
        "real_tokens": s["real_tokens"],
        "tokens_per_s": result["tokens_per_s"],
        "samples_per_s": result["samples_per_s"],
        "achieved_tflops": result["achieved_tflops"],
        "mfu": result["mfu"],
        "step_time_s": result["step_time_s"],
        "seconds": result["step_time_s"],
        "peak_mem_bytes": s["peak_mem_bytes"],
        "data_wait_s": s.get("data_wait_s"),
        "device_wait_ms_per_step": result.get("device_wait_ms_per_step"),
        "phase_ms": s.get("phase_ms") or None,
        "kernel_categories": result.get("kernel_categories"),
        "compiled": result.get("compiled"),
        "loss_curve": result.get("loss_curve"),
        "own_valid_loss": s.get("valid_loss"),
        "final_train_loss": s.get("final_loss"),
        "timed": f"{result['timed_windows']} log windows of {result['log_every']} steps (first window dropped"
        + (", the profiled steps' windows dropped)" if s.get("phase_ms") else ")"),
        "wall_s": result["wall_s"],
        **fields,
    }


def run(
    out_dir: str | Path,
    *,
    size: str = "base",
    tokens_per_batch: int = 65536,
    steps: int = 30,
    device: str = "cuda",
    compile: bool = True,
    log_every: int = 5,
    max_micro_batch: int = 256,
    data: BenchData | None = None,
    seed: int = 0,
    command: str = "",
) -> list[dict]:
    """Ours then the recipe, same sentences, same real tokens, same optimizer steps. Three rows: ours,
    recipe, and the comparison (speedup, loss difference, memory ratio)."""
    from mlmtrain.benchmarks.recipe import RecipeSettings, hf_model_from_checkpoint, mlm_eval, run_recipe, valid_batches
    from mlmtrain.config import OptimSpec
    from mlmtrain.model import BertConfig

    out_dir = Path(out_dir)
    dev = torch.device(device)
    data = data or make_data(out_dir / "data", seed=seed)
    steps = -(-steps // log_every) * log_every  # whole log windows: the timing and the profile use them
    warmup = auto_warmup(steps)  # set explicitly so both schedules are the same
    eval_batches = valid_batches(data.tokenizer_dir, data.valid_lines, max_length=128, seed=1234)
    common = {"command": command, "vocab_size": data.vocab_size, "valid_sentences": len(data.valid_lines)}

    ours = run_ours(
        data,
        out_dir / "ours",
        save_final=True,
        size=size,
        tokens_per_batch=tokens_per_batch,
        steps=steps,
        device=device,
        compile=compile,
        log_every=log_every,
        warmup_steps=warmup,
        seed=seed,
        profile=steps >= 3 * log_every,
    )
    ours_eval = mlm_eval(hf_model_from_checkpoint(out_dir / "ours"), eval_batches, dev)
    ours_r = ours_row(
        f"ours {size} T={tokens_per_batch}",
        ours,
        size=size,
        tokens_per_batch=tokens_per_batch,
        seq_cap=128,
        benchmark="train",
        **ours_eval,
        **common,
    )

    _fresh_device_state(dev)
    o = OptimSpec()
    settings = RecipeSettings(
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        warmup_steps=warmup,
        grad_clip=o.grad_clip,
        max_length=128,
        seed=seed,
    )
    model_config = BertConfig.from_size(size, vocab_size=data.vocab_size)
    try:
        rec = run_recipe(
            data.train_lines,
            data.tokenizer_dir,
            model_config,
            real_tokens=ours_r["real_tokens"],
            steps=ours_r["steps"],
            device=dev,
            settings=settings,
            max_micro_batch=max_micro_batch,
            eval_batches=eval_batches,
        )
    except ImportError as e:  # transformers' Trainer needs accelerate: ours is still worth reporting
        return [
            ours_r,
            {
                "benchmark": "train",
                "name": f"recipe {size} (HF Trainer)",
                "trainer": "recipe",
                "error": f"the recipe needs transformers' Trainer, which needs accelerate: {e}",
                **common,
            },
        ]
    recipe_r = {
        "benchmark": "train",
        "name": f"recipe {size} (HF Trainer)",
        "trainer": "recipe",
        "size": size,
        "seq_cap": 128,
        "precision": rec["precision"],
        "compile": False,
        "seconds": rec["step_time_s"],
        "timed": f"{rec['timed_steps']} optimizer steps (first 3 dropped)",
        **{k: v for k, v in rec.items() if k not in ("precision",)},
        **common,
    }
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    compare = {
        "benchmark": "train",
        "name": f"ours vs recipe {size}",
        "trainer": "comparison",
        "size": size,
        "speedup_tokens_per_s": ratio(ours_r["tokens_per_s"]["overall"], rec["tokens_per_s"]["overall"]),
        "real_tokens": {"ours": ours_r["real_tokens"], "recipe": rec["real_tokens"]},
        "steps": {"ours": ours_r["steps"], "recipe": rec["steps"]},
        "valid_loss": {"ours": ours_r["valid_loss"], "recipe": rec.get("valid_loss")},
        "peak_mem_ratio": ratio(ours_r["peak_mem_bytes"], rec["peak_mem_bytes"]),
        **common,
    }
    return [ours_r, recipe_r, compare]


def sweep_points(tokens: list[int], caps: list[int]) -> list[tuple[int, int]]:
    """Sweep order by how much each point says: the extremes and the 512 cap first, so a time budget that
    runs out still leaves the shape of the curve."""
    points = [(t, c) for c in caps for t in tokens]
    first = [(min(tokens), caps[0]), (max(tokens), caps[0])] + [(sorted(tokens)[len(tokens) // 2], c) for c in caps[1:]]
    first = [p for p in dict.fromkeys(first) if p in points]
    return first + [p for p in points if p not in first]


def steps_for(tokens_per_batch: int, target_tokens: int, lo: int, hi: int) -> int:
    """Enough steps to see `target_tokens` real tokens, within [lo, hi]."""
    return max(lo, min(hi, math.ceil(target_tokens / tokens_per_batch)))


def sweep(
    out_dir: str | Path,
    data: BenchData,
    *,
    size: str,
    tokens: list[int],
    caps: list[int],
    device: str,
    compile: bool = True,
    target_tokens: int = 2_000_000,
    min_steps: int = 15,
    max_steps: int = 60,
    log_every: int = 5,
    deadline: float | None = None,
    expected_s: float = 0.0,
    reuse: list[dict] = (),
    command: str = "",
) -> list[dict]:
    """Our step at each (tokens per batch, sequence cap). A point that would end past `deadline`
    (time.monotonic(); judged by the longest point so far, at first by `expected_s`) is recorded as skipped,
    with the reason; a point `reuse` already measured (same size, T, cap) is copied."""
    rows, longest = [], expected_s
    for T, cap in sweep_points(tokens, caps):
        name = f"ours {size} T={T} cap={cap}"
        same = [
            r
            for r in reuse
            if r.get("trainer") == "ours"
            and r.get("size") == size
            and r.get("tokens_per_batch") == T
            and r.get("seq_cap") == cap
        ]
        if same:
            rows.append({**same[0], "benchmark": "sweep", "name": name, "reused_from": "train section"})
            continue
        if deadline is not None and time.monotonic() + longest > deadline:
            rows.append(
                {
                    "benchmark": "sweep",
                    "name": name,
                    "tokens_per_batch": T,
                    "seq_cap": cap,
                    "error": OUT_OF_TIME,
                    "command": command,
                }
            )
            continue
        steps = -(-steps_for(T, target_tokens, min_steps, max_steps) // log_every) * log_every  # whole windows
        t0 = time.monotonic()
        try:
            res = run_ours(
                data,
                Path(out_dir) / f"sweep_T{T}_cap{cap}",
                size=size,
                tokens_per_batch=T,
                steps=steps,
                device=device,
                seq_cap=cap,
                compile=compile,
                log_every=log_every,
            )
            rows.append(
                ours_row(name, res, size=size, tokens_per_batch=T, seq_cap=cap, benchmark="sweep", command=command)
            )
        except Exception as e:  # one point failing (e.g. out of memory at 256k) must not hide the others
            rows.append(
                {
                    "benchmark": "sweep",
                    "name": name,
                    "tokens_per_batch": T,
                    "seq_cap": cap,
                    "error": f"{type(e).__name__}: {e}"[:500],
                    "command": command,
                }
            )
        longest = max(longest, time.monotonic() - t0)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Training throughput: ours vs the HF Trainer baseline.")
    p.add_argument("--out", required=True, help="work folder (data, runs) and train_results.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, help="model size (default base on CUDA, tiny with --quick)")
    p.add_argument("--tokens-per-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny model, small batches, no compile (CPU smoke run)")
    args = p.parse_args(argv)
    quick = args.quick or args.device == "cpu"
    rows = run(
        args.out,
        size=args.size or ("tiny" if quick else "base"),
        tokens_per_batch=args.tokens_per_batch or (1024 if quick else 65536),
        steps=args.steps or (12 if quick else 30),
        device=args.device,
        compile=not quick,
        log_every=3 if quick else 5,
        max_micro_batch=64 if quick else 256,
        command="python -m mlmtrain.benchmarks.bench_train " + " ".join(argv or sys.argv[1:]),
    )
    Path(args.out, "train_results.json").write_text(json_text(rows, indent=2, default=str), encoding="utf-8")
    for r in rows:
        print(
            json.dumps(
                {
                    k: r.get(k)
                    for k in ("name", "tokens_per_s", "mfu", "valid_loss", "speedup_tokens_per_s")
                    if r.get(k) is not None
                },
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
