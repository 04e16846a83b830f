"""The speed ablation (`mlmtrain bench --sections ablation`): our training step with one more speed option per
row, on the synthetic vocab-30000 corpus (benchmarks/synthetic_data.py), each row building on the last row that
ran, then the two target workloads.

    today             the defaults: flat layout, flash varlen, fp32 residual stream, torch ops, no graphs
    +row attention    data.layout = rows (whole sentences bin-packed into rows, FlexAttention per row)
    +bf16 residual    model.residual_dtype = compute
    +fused kernels    model.fused_ops = triton (the Triton residual+LayerNorm and bias+GELU kernels)
    +CUDA graphs      train.cuda_graphs (the compiled step replayed as CUDA graphs)
    +fp8 tensorwise   train.fp8 = tensorwise   } two rows on the same base; the faster one is
    +fp8 rowwise      train.fp8 = rowwise      } what the next row builds on
    dropout off       model.dropout = 0 on the fastest configuration: its speed and its validation loss
    curves            the fastest configuration (the candidate default) against today's defaults over ~200 steps,
                      and today's once more at another seed: the noise its loss curve must stay within

A row that cannot run (an option refused where it is unsupported, a module this build does not have) says why
and the next row builds on the one before it. Every row trains from the same initialisation on the same stream
until it has seen `target_tokens` real tokens (whole steps: equal within one batch), then its checkpoint is
scored by one evaluator for all (`recipe.mlm_eval`: transformers' BertForMaskedLM on the same held-out
sentences with the same masks), so validation loss stands beside every speed. Every row traces its last log_every
steps (`--profile-steps`; windows holding them are not timed): the per-phase times and, where the profiler
writes profile/categories.json, the kernel-category breakdown, compared between "today" and the fastest row.

Targets: BERT-base, seq 128, sentence packing is the ablation itself (its "today" and fastest rows); BERT-large,
seq 512, document packing runs "today" and the fastest configuration (and that configuration with the flat
layout when it uses rows: at 512 tokens whole documents leave rows emptier).

A row whose expected end (the longest row so far) is past `deadline` is recorded as skipped; `reuse` (rows of an
earlier results.json, `--merge`) supplies rows already measured, so a second call finishes the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

ABLATION = [
    ("today", {}),
    ("+row attention", {"data.layout": "rows"}),
    ("+bf16 residual", {"model.residual_dtype": "compute"}),
    ("+fused kernels", {"model.fused_ops": "triton"}),
    ("+CUDA graphs", {"train.cuda_graphs": True}),
]
FP8 = [("+fp8 tensorwise", {"train.fp8": "tensorwise"}), ("+fp8 rowwise", {"train.fp8": "rowwise"})]
DROPOUT_OFF = ("dropout off", {"model.dropout": 0.0})
SKIPPED = "skipped: the time budget (--time-limit) ran out"
# a row that broke the device (an illegal memory access poisons the CUDA context of the whole process): the rows
# after it are left for a fresh process (`--merge`), which keeps this row as measured and goes on past it
CRASHED = "the device failed in this row (a fresh process measures the rows after it): "
NOT_RUN = "not run: the device failed in an earlier row of this process"


def steps_for_tokens(data_dir, tokens_per_batch: int, cap: int, options: dict, target_tokens: int, seed: int = 0):
    """Optimizer steps until the run has seen `target_tokens` real tokens: the packer run on the host alone, as
    the trainer will run it (its layout and packing), so every row stops at the same real tokens within a batch."""
    from mlmtrain.packing import Packer, RowPacker
    from mlmtrain.prepare import load_split

    packer = RowPacker if options.get("data.layout") == "rows" else Packer
    pack = "sentence" if cap <= 128 else "document"
    seen, steps = 0, 0
    for batch in packer(load_split(data_dir, "train"), tokens_per_batch, cap, seed, pack).batches():
        seen, steps = seen + batch.num_real_tokens, steps + 1
        if seen >= target_tokens:
            return steps
    raise AssertionError("the packer's stream ends only with loop=False")


class Ablation:
    """Runs rows under one time budget; each row a dict (results.json), measured, refused, or skipped."""

    def __init__(
        self,
        work: Path,
        data,
        *,
        device: str,
        compile: bool,
        log_every: int,
        deadline,
        reuse,
        command,
        on_row=None,
    ):
        from mlmtrain.benchmarks.recipe import valid_batches

        self.work, self.data, self.device, self.compile, self.log_every = work, data, device, compile, log_every
        self.deadline, self.reuse, self.command, self.longest = deadline, list(reuse), command, 0.0
        self.done, self.on_row = [], on_row or (lambda rows: None)  # every row so far, and who is told of each
        self.crashed = False  # a row broke the device: no other row can run in this process
        self.eval_batches = {
            cap: valid_batches(data.tokenizer_dir, data.valid_lines, max_length=cap, seed=1234)
            for cap in data.data_dirs
        }

    def row(
        self,
        benchmark: str,
        name: str,
        options: dict,
        *,
        size: str,
        tokens_per_batch: int,
        cap: int,
        target_tokens: int,
        seed: int = 0,
    ) -> dict:
        row = self._row(
            benchmark,
            name,
            options,
            size=size,
            tokens_per_batch=tokens_per_batch,
            cap=cap,
            target_tokens=target_tokens,
            seed=seed,
        )
        self.done.append(row)
        self.on_row(self.done)
        return row

    def _row(self, benchmark, name, options, *, size, tokens_per_batch, cap, target_tokens, seed) -> dict:
        from mlmtrain.benchmarks.bench_train import ours_row, run_ours
        from mlmtrain.benchmarks.recipe import hf_model_from_checkpoint, mlm_eval

        key = {
            "benchmark": benchmark,
            "name": name,
            "size": size,
            "tokens_per_batch": tokens_per_batch,
            "seq_cap": cap,
            "options": options,
            "seed": seed,
        }
        final = [r for r in self.reuse if "error" not in r or r["error"].startswith(CRASHED)]
        same = [r for r in final if all(r.get(k) == v for k, v in key.items())]
        if same:
            return {**same[0], "reused_from": "an earlier run (--merge)"}
        if self.crashed:
            return {**key, "error": NOT_RUN, "command": self.command}
        if self.deadline is not None and time.monotonic() + self.longest > self.deadline:
            return {**key, "error": SKIPPED, "command": self.command}
        t0 = time.monotonic()
        run_dir = self.work / f"{benchmark}_{size}_{cap}_{seed}_{name.strip('+').replace(' ', '_').replace(',', '')}"
        try:
            steps = steps_for_tokens(self.data.data_dirs[cap], tokens_per_batch, cap, options, target_tokens, seed)
            result = run_ours(
                self.data,
                run_dir,
                size=size,
                tokens_per_batch=tokens_per_batch,
                steps=steps,
                device=self.device,
                seq_cap=cap,
                compile=self.compile,
                log_every=self.log_every,
                warmup_steps=max(1, steps // 10),
                seed=seed,
                profile=steps >= 3 * self.log_every,
                save_final=True,
                options=options,
            )
            scores = mlm_eval(hf_model_from_checkpoint(run_dir), self.eval_batches[cap], torch.device(self.device))
        except Exception as e:  # refused (one sentence) or broken: the row says which, the others still run
            error = f"{type(e).__name__}: {e}"[:600]
            self.crashed = not device_alive(torch.device(self.device))
            return {**key, "error": CRASHED + error if self.crashed else error, "command": self.command}
        finally:
            self.longest = max(self.longest, time.monotonic() - t0)
        row = ours_row(
            f"{benchmark} {name}",
            result,
            size=size,
            tokens_per_batch=tokens_per_batch,
            seq_cap=cap,
            benchmark=benchmark,
            command=self.command,
            vocab_size=self.data.vocab_size,
            **scores,
        )
        return {**row, **key}


def device_alive(device: torch.device) -> bool:
    """Whether the device still runs work after a row failed (a CUDA error such as an illegal memory access is
    sticky: every later call in the process fails)."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).item()  # sync: the failed row's queue included
        return True
    except Exception:
        return False


def fastest(rows: list[dict]) -> dict | None:
    measured = [r for r in rows if "error" not in r and isinstance(r.get("tokens_per_s"), dict)]
    return max(measured, key=lambda r: r["tokens_per_s"]["overall"], default=None)


def run(
    work: str | Path,
    data,
    *,
    size: str,
    tokens_per_batch: int,
    target_tokens: int,
    device: str,
    compile: bool,
    log_every: int,
    large_size: str,
    large_tokens_per_batch: int,
    large_target_tokens: int,
    curve_target_tokens: int = 0,
    deadline: float | None = None,
    reuse=(),
    command: str = "",
    on_row=None,
) -> list[dict]:
    """The ablation rows, then the large target rows, then the loss curves (module docstring; none when
    `curve_target_tokens` is 0). `data`: a BenchData with caps 128 and 512 (synthetic_data.make_synthetic_data).
    `on_row(rows so far)` after every row (results.json rewritten)."""
    bench = Ablation(
        Path(work),
        data,
        device=device,
        compile=compile,
        log_every=log_every,
        deadline=deadline,
        reuse=reuse,
        command=command,
        on_row=on_row,
    )
    common = dict(size=size, tokens_per_batch=tokens_per_batch, cap=128, target_tokens=target_tokens)
    rows, base = [], {}
    for name, added in ABLATION:
        row = bench.row("ablation", name, {**base, **added}, **common)
        rows.append(row)
        if "error" not in row:
            base = row["options"]
    last = next((r for r in reversed(rows) if "error" not in r), None)  # the row the fp8 rows build on
    fp8_rows = [bench.row("ablation", name, {**base, **added}, **common) for name, added in FP8]
    rows += fp8_rows
    pick = fastest([r for r in (last, *fp8_rows) if r is not None])
    base = pick["options"] if pick else base
    rows.append(bench.row("ablation", DROPOUT_OFF[0], {**base, **DROPOUT_OFF[1]}, **common))

    best = fastest([r for r in rows if r["name"] != DROPOUT_OFF[0]])
    best_options = best["options"] if best else base
    large = dict(size=large_size, tokens_per_batch=large_tokens_per_batch, cap=512, target_tokens=large_target_tokens)
    configs = [("today", {}), ("fastest base configuration", best_options)]
    if best_options.get("data.layout") == "rows":
        configs.append(("fastest, flat layout", {k: v for k, v in best_options.items() if k != "data.layout"}))
    for name, options in configs:
        bench.row("target", name, options, **large)

    if curve_target_tokens and best and best["options"]:  # a candidate default that is not today's
        curve = dict(size=size, tokens_per_batch=tokens_per_batch, cap=128, target_tokens=curve_target_tokens)
        bench.row("curve", "today", {}, **curve)
        bench.row("curve", "today, seed 1", {}, **curve, seed=1)
        bench.row("curve", "fastest configuration", best_options, **curve)
    return bench.done


# ---- the report's part ------------------------------------------------------------------------------------

# the speed targets for the two workloads, at the sizes they name (other sizes, e.g. --quick's tiny: no target)
TARGETS = {
    "ablation": ("base", 850_000, "today: 569k real tokens/s at vocab 4,004, 2026-11-24"),
    "target": ("large", 300_000, "MLPerf Training v4.0: ~253k per H200"),
}


def _measured(rows):
    return [r for r in rows if "error" not in r and isinstance(r.get("tokens_per_s"), dict)]


def _summary(r: dict | None, matmul: float | None) -> dict | None:
    if r is None:
        return None
    tf = r.get("achieved_tflops") or {}
    return {
        "name": r["name"],
        "options": r.get("options"),
        "tokens_per_s": r["tokens_per_s"]["overall"],
        "mfu": (r.get("mfu") or {}).get("median"),
        "fraction_of_matmul_ceiling": tf.get("median") / matmul if matmul and tf.get("median") else None,
        "peak_mem_bytes": r.get("peak_mem_bytes"),
        "valid_loss": r.get("valid_loss"),
        "real_tokens": r.get("real_tokens"),
    }


def headline(rows: list[dict], matmul: float | None) -> dict:
    """today and the fastest row of each workload (seq 128 sentence packing; seq 512 document packing), with the
    target where the size is the one the target is for."""
    out = {}
    for benchmark, (size, target, reference) in TARGETS.items():
        mine = [r for r in _measured(rows) if r.get("benchmark") == benchmark and r["name"] != DROPOUT_OFF[0]]
        if not mine:
            continue
        first = mine[0]
        workload = f"{first['size']}, seq {first['seq_cap']}, {first.get('pack')} packing"
        today = next((r for r in mine if r["name"] == "today"), None)
        out[workload] = {
            "target_tokens_per_s": target if first["size"] == size else None,
            "target_reference": reference,
            "today": _summary(today, matmul),
            "fastest": _summary(fastest(mine), matmul),
        }
    return out


def report_markdown(rows: list[dict], matmul: float | None) -> str:
    from mlmtrain.benchmarks.tables import gib, pct, scale, si, spread_text, table

    def line(r, today):
        if "error" in r:
            return [r["name"], _options(r), r["error"], "", "", "", "", "", "", "", ""]
        tps = r["tokens_per_s"]
        vs = f"{tps['overall'] / today['tokens_per_s']['overall']:.2f}x" if today else "–"
        phases = r.get("phase_ms") or {}
        return [
            r["name"] + (" (reused)" if r.get("reused_from") else ""),
            _options(r),
            f"{si(tps['overall'], 'tok/s')}; windows {spread_text(tps, unit='tok/s')}",
            vs,
            pct(r.get("mfu")),
            pct(scale(r.get("achieved_tflops"), 1 / matmul)) if matmul else "–",
            gib(r.get("peak_mem_bytes")),
            " / ".join(f"{phases[k]:.1f}" for k in ("forward", "backward", "optimizer") if k in phases) or "–",
            f"{r.get('real_tokens', 0):,}",
            f"{r['valid_loss']:.4f}" if r.get("valid_loss") is not None else "–",
            _compiled(r),
        ]

    header = [
        "row",
        "options (on top of the defaults)",
        "real tokens/s: overall; windows median (min–max)",
        "vs today",
        "MFU (datasheet)",
        "of measured matmul",
        "peak memory",
        "fwd / bwd / opt ms (traced)",
        "real tokens",
        "valid MLM loss",
        "graphs / breaks / CUDA-graph skips",
    ]
    md = []
    for benchmark, title in (("ablation", "Ablation"), ("target", "Target: the larger model, document packing")):
        mine = [r for r in rows if r.get("benchmark") == benchmark]
        if not mine:
            continue
        today = next((r for r in _measured(mine) if r["name"] == "today"), None)
        first = mine[0]
        md += [
            f"### {title} ({first.get('size')}, seq {first.get('seq_cap')}, {first.get('tokens_per_batch'):,} "
            f"tokens per batch, vocab {first.get('vocab_size', '30000')})",
            "",
            table(header, [line(r, today) for r in mine]),
            "",
        ]
    md += [
        "MFU: the model FLOPs of the real tokens (flops.py) against the bf16 dense datasheet peak in every row, the "
        "fp8 rows too (their matmuls have twice that peak; the targets and MLPerf's rate are quoted against bf16). "
        "Of measured matmul: the same FLOPs against the bf16 GEMM rate the ceilings section measured.",
        "",
        "### Targets",
        "",
    ]
    lines = []
    for workload, h in headline(rows, matmul).items():
        today, best, target = h["today"], h["fastest"], h["target_tokens_per_s"]
        lines.append(
            [
                workload,
                f"≥ {si(target, 'tok/s')} ({h['target_reference']})" if target else "– (no target at this size)",
                si(today["tokens_per_s"], "tok/s") if today else "not measured",
                f"{si(best['tokens_per_s'], 'tok/s')}: {best['name']}",
                ("met" if best["tokens_per_s"] >= target else "not met") if target else "–",
                f"{100 * best['mfu']:.1f}%" if best.get("mfu") else "–",
                f"{100 * best['fraction_of_matmul_ceiling']:.1f}%" if best.get("fraction_of_matmul_ceiling") else "–",
                f"{best['valid_loss']:.4f}" if best.get("valid_loss") is not None else "–",
            ]
        )
    header = ["workload", "target", "today", "fastest", "target met", "MFU", "of measured matmul", "valid loss"]
    md += [table(header, lines) if lines else "No target row was measured.", ""]
    md += [curves_markdown(rows), ""]
    md += [kernel_categories_markdown(rows), ""]
    return "\n".join(md)


CURVES = ("today", "today, seed 1", "fastest configuration")


def curve_check(rows: list[dict]) -> dict | None:
    """The candidate default's loss curve against today's, beside today's own seed-to-seed difference (the noise):
    mean |difference| of the log windows' train loss over the second half of the run (past warm-up and the first
    fall), and the difference in validation loss. None until all three curve rows are measured."""
    mine = {r["name"]: r for r in _measured(rows) if r.get("benchmark") == "curve" and r.get("loss_curve")}
    if any(name not in mine for name in CURVES):
        return None
    today, other, fast = ([loss for _, loss in mine[name]["loss_curve"]] for name in CURVES)
    n = min(len(today), len(other), len(fast))
    half = range(n // 2, n)

    def mean_gap(a):
        return sum(abs(a[i] - today[i]) for i in half) / max(len(half), 1)

    valid = {name: mine[name].get("valid_loss") for name in CURVES}
    seed_gap, fast_gap = mean_gap(other), mean_gap(fast)
    valid_seed = abs(valid["today, seed 1"] - valid["today"])
    valid_fast = abs(valid["fastest configuration"] - valid["today"])
    return {
        "options": mine["fastest configuration"].get("options"),
        "steps": mine["today"]["steps"],
        "train_loss_gap": {"fastest": fast_gap, "seed": seed_gap},
        "valid_loss": valid,
        "within_noise": fast_gap <= seed_gap and valid_fast <= valid_seed,
    }


def curves_markdown(rows: list[dict]) -> str:
    from mlmtrain.benchmarks.tables import table

    mine = {r["name"]: r for r in rows if r.get("benchmark") == "curve"}
    if not mine:
        return "Loss curves: not run (they need a measured configuration faster than today's)."
    check = curve_check(rows)
    if check is None:
        why = "; ".join(f"{name}: {r.get('error', 'no loss curve')}" for name, r in mine.items())
        return f"Loss curves: not complete ({why})."
    curves = [dict(mine[name]["loss_curve"]) for name in CURVES]
    steps = sorted(set(curves[0]) & set(curves[1]) & set(curves[2]))
    steps = sorted({*steps[:: max(1, len(steps) // 20)], *steps[-1:]})  # about 20 lines
    lines = [[str(step), *(f"{c[step]:.4f}" for c in curves)] for step in steps]
    lines.append(["valid MLM loss", *(f"{check['valid_loss'][name]:.4f}" for name in CURVES)])
    gap = check["train_loss_gap"]
    verdict = "within" if check["within_noise"] else "**outside**"
    return (
        f"Loss curves over {check['steps']} steps at seq 128 (the candidate default, "
        f"{_options(mine['fastest configuration'])}, against today's defaults; today's again at seed 1 is the "
        f"noise): mean |train-loss difference| over the second half {gap['fastest']:.4f} (fastest vs today) against "
        f"{gap['seed']:.4f} (seed 1 vs seed 0): {verdict} the noise, validation loss included.\n\n"
        + table(["step", *CURVES], lines)
    )


def _compiled(r: dict) -> str:
    """What torch.compile did in the row's run (bench_train.run_ours): "–" when nothing was compiled."""
    c = r.get("compiled") or {}
    return f"{c['graphs']} / {c['graph_breaks']} / {c['cudagraph_skips']}" if c.get("graphs") else "–"


def _options(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or "(defaults)"


def kernel_categories_markdown(rows: list[dict]) -> str:
    """The traced step of "today" and of the fastest ablation row, by kernel category (profile/categories.json:
    {"categories": {name: {"ms", "pct"}}, "step_ms"}), side by side."""
    mine = [r for r in _measured(rows) if r.get("benchmark") == "ablation"]
    today = next((r for r in mine if r["name"] == "today"), None)
    best = fastest([r for r in mine if r["name"] != DROPOUT_OFF[0]])
    pair = [(r, (r or {}).get("kernel_categories")) for r in (today, best)]
    if not any(c for _, c in pair):
        return (
            "Kernel categories: not in this report (the trainer's `--profile-steps` did not write "
            "profile/categories.json in these runs); the per-phase times are in the ablation table."
        )
    names = list(dict.fromkeys(n for _, c in pair if c for n in c.get("categories", {})))

    def cell(c, n):
        v = (c or {}).get("categories", {}).get(n)
        return f"{v['ms']:.2f} ms ({v['pct']:.1f}%)" if v else "–"

    from mlmtrain.benchmarks.tables import table

    lines = [[n, cell(pair[0][1], n), cell(pair[1][1], n)] for n in names]
    lines.append(["step", *(f"{c['step_ms']:.2f} ms" if c and c.get("step_ms") else "–" for _, c in pair)])
    # the clock's step beside the trace's: a trace that lost or doubled kernels (CUPTI under CUDA graphs) shows here
    clock = [((r or {}).get("step_time_s") or {}).get("median") for r, _ in pair]
    lines.append(["step by the log windows' clock (median)", *(f"{1e3 * t:.2f} ms" if t else "–" for t in clock)])
    heads = [
        f"today ({pair[0][0]['name']})" if pair[0][0] else "today",
        f"fastest ({pair[1][0]['name']})" if pair[1][0] else "fastest",
    ]
    return "Kernel categories of the traced step, before and after:\n\n" + table(["category", *heads], lines)
