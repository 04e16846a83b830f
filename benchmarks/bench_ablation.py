"""The speed ablation (`mlmtrain bench --sections ablation`): our training step with one more speed option per
row, on the synthetic vocab-30000 corpus (benchmarks/synthetic_data.py), each row building on the last row that
ran, then the two target workloads.

    today             the defaults: flat layout, flash varlen, fp32 residual stream, torch ops, no graphs
    +row attention    data.layout = rows (whole sentences bin-packed into rows, FlexAttention per row)
    +bf16 residual    model.residual_dtype = compute
    +fused kernels    model.fused_ops = triton (the Triton residual+LayerNorm and bias+GELU kernels)
    +CUDA graphs      train.cuda_graphs (the compiled step replayed as CUDA graphs)
    +fp8 tensorwise   train.fp8 = tensorwise   } four rows on the same base; the fastest of them
    +fp8 rowwise      train.fp8 = rowwise      } and the row they build on is what the next row
    +fp8 tensorwise,  the same with model.fused_ops = torch  } builds on (with torch ops, inductor can fuse
      torch ops                                            } the float8 casts into the LayerNorm and GELU)
    +fp8 rowwise, bf16 weight grads, torch ops   train.fp8 = rowwise_with_gw_hp with torch ops: only per-row
                      casts, which inductor fuses into their producers; two of three matmuls in float8
    +async log reads  train.async_log_reads (log-step reads that do not drain the device's queue)
    +packer process   data.packer = process (the packer's Python off the loop's GIL: bench_packing's loop cost)
    +segment attention kernel  model.attention = triton (kernels/segment_attention.py instead of FlexAttention)
    +autotune         train.autotune on the faster of the kernel row and the row it built on (inductor's
                      max_autotune: GEMM templates, FlexAttention's tiles and launches timed at the first compile)
    +autotune, torch ops  the same with model.fused_ops = torch (inductor's GEMM templates can then take the bias
                      and GELU in their epilogues); not run when that row has torch ops already
    dropout off       model.dropout = 0 on the fastest of the autotune rows and the row they built on: speed and loss
    curves            the fastest configuration (the candidate default) and today's defaults over ~200 steps, each
                      at seeds 0 and 1: today's seed-to-seed difference is the noise (`curve_check`)

A row that cannot run (an option refused where it is unsupported, a module this build does not have) says why
and the next row builds on the one before it. Every row trains from the same initialisation on the same stream
until it has seen `target_tokens` real tokens (whole steps: equal within one batch), then its checkpoint is
scored by one evaluator for all (`recipe.mlm_eval`: transformers' BertForMaskedLM on the same held-out
sentences with the same masks), so validation loss stands beside every speed. Every row traces its last log_every
steps (`--profile-steps`; windows holding them are not timed): the per-phase times and, where the profiler
writes profile/categories.json, the kernel-category breakdown, compared between "today" and the fastest row.

Targets: BERT-base, seq 128, sentence packing is the ablation itself (its "today" and fastest rows); BERT-large,
seq 512, document packing runs "today" and the fastest configuration (and that configuration with the flat
layout when it uses rows: at 512 tokens whole documents leave rows emptier), then the faster of those two (not
today's) with the fastest fp8 row's options when it has none: at hidden size 1024 the matmuls may pay for the casts.

A row whose expected end (the longest row so far; for the first autotuning row at least AUTOTUNE_ROW_S) is past
`deadline` is recorded as skipped; `reuse` (rows of an
earlier results.json, `--merge`) supplies rows already measured, so a second call finishes the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mlmtrain.benchmarks.common import OUT_OF_TIME

ABLATION = [
    ("today", {}),
    ("+row attention", {"data.layout": "rows"}),
    ("+bf16 residual", {"model.residual_dtype": "compute"}),
    ("+fused kernels", {"model.fused_ops": "triton"}),
    ("+CUDA graphs", {"train.cuda_graphs": True}),
]
FP8 = [
    ("+fp8 tensorwise", {"train.fp8": "tensorwise"}),
    ("+fp8 rowwise", {"train.fp8": "rowwise"}),
    ("+fp8 tensorwise, torch ops", {"train.fp8": "tensorwise", "model.fused_ops": "torch"}),
    ("+fp8 rowwise, bf16 weight grads, torch ops", {"train.fp8": "rowwise_with_gw_hp", "model.fused_ops": "torch"}),
]
FP8_KEYS = ("train.fp8", "model.fused_ops")  # what an fp8 row changes
ASYNC_READS = ("+async log reads", {"train.async_log_reads": True})
PACKER_PROCESS = ("+packer process", {"data.packer": "process"})
KERNEL_ATTENTION = ("+segment attention kernel", {"model.attention": "triton"})  # rows of <= 128 tokens only
AUTOTUNE = [
    ("+autotune", {"train.autotune": True}),
    ("+autotune, torch ops", {"train.autotune": True, "model.fused_ops": "torch"}),  # on rows with Triton kernels
]
DROPOUT_OFF = ("dropout off", {"model.dropout": 0.0})
# seconds the first autotuning row of a call is expected to take at least (its first compile times every GEMM
# shape and kernel launch; later rows find the choices in inductor's cache, and the longest row so far covers
# them): a guess, not measured on a GPU yet; it keeps the row from starting where the call's hard stop would cut it
# off and waste its device time
AUTOTUNE_ROW_S = 240.0
# the loss curves' rows: today's and the candidate default's, at seeds 0 and 1 each (ablation_report.curve_check)
CURVES = ("today", "today, seed 1", "fastest configuration", "fastest configuration, seed 1")
TARGETS = ("today", "fastest base configuration", "fastest, flat layout", "fastest, fp8")  # the large model's rows
ROW_NAMES = tuple(
    dict.fromkeys(
        [name for name, _ in (*ABLATION, *FP8, ASYNC_READS, PACKER_PROCESS, KERNEL_ATTENTION, *AUTOTUNE, DROPOUT_OFF)]
        + [*TARGETS, *CURVES]
    )
)  # every row's name, once (--remeasure)
SAME_SPEED = 0.01  # rates within 1% are one speed: one row's log windows spread 0.25-1.1% at 64k (H200, 2026-11-24)
SKIPPED = OUT_OF_TIME
SKIPPED_BY_FLAG = "skipped: named by --skip (a later --merge measures it)"
# a row that broke the device (an illegal memory access poisons the CUDA context of the whole process): the rows
# after it are left for a fresh process (`--merge`), which keeps this row as measured and goes on past it
CRASHED = "the device failed in this row (a fresh process measures the rows after it): "
NOT_RUN = "not run: the device failed in an earlier row of this process"


def steps_for_tokens(data_dir, tokens_per_batch: int, cap: int, options: dict, target_tokens: int, seed: int = 0):
    """Optimizer steps whose real tokens come nearest `target_tokens`: the packer run on the host alone, as the
    trainer will run it (its layout and packing), so every row stops at the same real tokens within half a batch
    (the first step past the target would give a layout that fills its batches less a whole extra step)."""
    from mlmtrain.packing import Packer, RowPacker
    from mlmtrain.prepare import load_split

    packer = RowPacker if options.get("data.layout") == "rows" else Packer
    pack = "sentence" if cap <= 128 else "document"
    seen, steps = 0, 0
    for batch in packer(load_split(data_dir, "train"), tokens_per_batch, cap, seed, pack).batches():
        before, seen, steps = seen, seen + batch.num_real_tokens, steps + 1
        if seen >= target_tokens:  # the nearer of the two step counts around the target (a layout that fills
            return steps if steps == 1 or seen - target_tokens <= target_tokens - before else steps - 1  # less
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
        skip=(),
    ):
        from mlmtrain.benchmarks.recipe import valid_batches

        self.work, self.data, self.device, self.compile, self.log_every = work, data, device, compile, log_every
        self.deadline, self.reuse, self.command, self.longest = deadline, list(reuse), command, 0.0
        self.skip = set(skip)  # rows not to measure in this call (--skip), unless an earlier run measured them
        self.done, self.on_row = [], on_row or (lambda rows: None)  # every row so far, and who is told of each
        self.crashed = False  # a row broke the device: no other row can run in this process
        self.tuned = False  # an autotuning row ran in this process (its choices are in inductor's cache)
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
            "target_tokens": target_tokens,
            "log_every": self.log_every,
        }
        final = [r for r in self.reuse if "error" not in r or r["error"].startswith(CRASHED)]
        same = [r for r in final if all(r.get(k) == v for k, v in key.items())]
        if same:
            return {**same[0], "reused_from": "an earlier run (--merge)"}
        if self.crashed:
            return {**key, "error": NOT_RUN, "command": self.command}
        if name in self.skip:
            return {**key, "error": SKIPPED_BY_FLAG, "command": self.command}
        first_tuned = options.get("train.autotune") and not self.tuned
        expected = max(self.longest, AUTOTUNE_ROW_S if first_tuned else 0.0)
        if self.deadline is not None and time.monotonic() + expected > self.deadline:
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
            self.tuned = self.tuned or bool(options.get("train.autotune"))
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
        from mlmtrain.fast_paths import fused_ops_note

        note = fused_ops_note(options.get("model.fused_ops", "torch"), torch.device(self.device))
        return {**row, **key, **({"note": note} if note else {})}  # a row timing the references says so


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
    """The measured row with the highest real tokens/s, except that rows within SAME_SPEED of it count as equally
    fast, and of those the one with the fewest options wins: an option whose gain is run-to-run noise never
    becomes part of a candidate default."""
    measured = [r for r in rows if "error" not in r and isinstance(r.get("tokens_per_s"), dict)]
    if not measured:
        return None
    top = max(r["tokens_per_s"]["overall"] for r in measured)
    tied = [r for r in measured if r["tokens_per_s"]["overall"] >= (1 - SAME_SPEED) * top]
    return min(tied, key=lambda r: (len(r.get("options") or {}), -r["tokens_per_s"]["overall"]))


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
    skip=(),
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
        skip=skip,
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
    built_on = fastest([r for r in (last, *fp8_rows) if r is not None])  # the measured row `base` comes from
    base = built_on["options"] if built_on else base
    for name, added in (ASYNC_READS, PACKER_PROCESS):  # host-side: each on the row before it
        row = bench.row("ablation", name, {**base, **added}, **common)
        rows.append(row)
        if "error" not in row:
            built_on, base = row, row["options"]
    kernel = bench.row("ablation", KERNEL_ATTENTION[0], {**base, **KERNEL_ATTENTION[1]}, **common)
    rows.append(kernel)
    pick = fastest([r for r in (built_on, kernel) if r is not None])  # against the row it built on, not a refused one
    base = pick["options"] if pick else base
    # the torch-ops variant only where the row has the Triton kernels (otherwise it would be the first row again)
    autotune = AUTOTUNE if base.get("model.fused_ops") == "triton" else AUTOTUNE[:1]
    tuned = [bench.row("ablation", name, {**base, **added}, **common) for name, added in autotune]
    rows += tuned
    pick = fastest([r for r in (pick, *tuned) if r is not None])
    base = pick["options"] if pick else base
    rows.append(bench.row("ablation", DROPOUT_OFF[0], {**base, **DROPOUT_OFF[1]}, **common))

    best = fastest([r for r in rows if r["name"] != DROPOUT_OFF[0]])
    best_options = best["options"] if best else base
    if best_options.get("model.attention") == KERNEL_ATTENTION[1]["model.attention"]:  # it holds <= 128 tokens
        best_options = {k: v for k, v in best_options.items() if k != "model.attention"}  # seq 512: flex (auto)
    large = dict(size=large_size, tokens_per_batch=large_tokens_per_batch, cap=512, target_tokens=large_target_tokens)
    configs = [("today", {}), ("fastest base configuration", best_options)]
    if best_options.get("data.layout") == "rows":
        configs.append(("fastest, flat layout", {k: v for k, v in best_options.items() if k != "data.layout"}))
    large_rows = [bench.row("target", name, options, **large) for name, options in configs]
    fp8_pick = fastest(fp8_rows)
    if fp8_pick and "train.fp8" not in best_options:
        top = fastest(large_rows[1:]) or {"options": best_options}
        fp8_added = {k: v for k, v in fp8_pick["options"].items() if k in FP8_KEYS}
        bench.row("target", "fastest, fp8", {**top["options"], **fp8_added}, **large)

    if curve_target_tokens and best and best["options"]:  # a candidate default that is not today's
        curve = dict(size=size, tokens_per_batch=tokens_per_batch, cap=128, target_tokens=curve_target_tokens)
        for seed in (0, 1):
            bench.row("curve", CURVES[seed], {}, **curve, seed=seed)
        for seed in (0, 1):
            bench.row("curve", CURVES[2 + seed], best_options, **curve, seed=seed)
    return bench.done


if __name__ == "__main__":  # the ablation runs inside the bench, which makes its data and reports its rows
    raise SystemExit("bench_ablation runs through `mlmtrain bench --sections ablation` (or scripts/speed_gpu.sh)")
