"""`mlmtrain bench`: every benchmark in one go, written to one folder as results.json + report.md + charts.

Sections, run in the order given by --sections:
    ceilings  bf16 matmul TFLOP/s and device-to-device copy GB/s, measured now (benchmarks/ceilings.py)
    mask      the masking kernel vs its torch reference vs the HF collator (benchmarks/bench_mlm_mask.py)
    model     forward + backward of the model at base and large (benchmarks/bench_model.py)
    train     full training steps, ours vs the HF Trainer baseline, same tokens (benchmarks/bench_train.py), and
              ours once more at the bundled sample's own vocabulary (the rows before the vocab-30000 corpus)
    sweep     our step over tokens per batch (16k..256k) and sequence caps (128, 512)
    ablation  the speed options one by one, and the target workloads (benchmarks/bench_ablation.py); not in the
              default list: scripts/speed_gpu.sh asks for it

train, sweep and ablation run on a synthetic corpus at the real vocabulary, 30,000 pieces (4,096 with --quick),
with the sentence lengths of Korean text (benchmarks/synthetic_data.py), made once per run through `prepare`.

A section whose module is missing or that fails is recorded as {"section", "error"} and named in the
report; the others still run. --time-limit keeps a scripted run inside a wall-clock budget: a section or
sweep point that would start past it is recorded as skipped, never silently dropped. results.json is
rewritten after every section, so a run killed from outside still leaves what it measured.

`--quick` is a CPU-sized smoke run (tiny model, small batches, no torch.compile; 16 s
on 2 cores): CI runs it and checks the report's schema, and users without a GPU can try the tool.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mlmtrain import progress as progress_lines
from mlmtrain import provenance
from mlmtrain.benchmarks.common import OUT_OF_TIME
from mlmtrain.cli import Terminated
from mlmtrain.config import MODEL_SIZES, auto_warmup, default_precision
from mlmtrain.errors import UserError, require
from mlmtrain.files import Layout, folder_state, read_marker, refuse_unless_mine, write_marker, write_text

SECTIONS = ("ceilings", "mask", "model", "train", "sweep")
OPTIONAL_SECTIONS = ("ablation",)
# the running section in the report written after each of its rows: what a bench killed in it leaves (a --merge
# call naming the section measures it again, reusing the finished rows where the section can)
UNFINISHED = "not finished: the bench was killed while it ran this section (or still runs it)"

# What each section measures, per mode. Full sizes fit an H200 in < 9 minutes together (scripts/bench_gpu.sh).
PLANS = {
    "full": {
        "mask_sizes": [65536, 262144, 1048576, 4194304],
        "mask_repeats": 20,
        "mask_hf_max_tokens": 262144,
        "model_sizes": ["base", "large"],
        "model_tokens": 65536,
        "model_repeats": 10,
        "model_warmup": 2,
        "model_vocab": 30000,  # the blog post's vocabulary size
        "train_size": "base",
        "train_tokens": 65536,
        "train_steps": 40,
        "log_every": 5,
        "recipe_micro_batch": 256,
        # 3 x 2 points, 5 compiles (64k/128 is the train section's run): ~20-25 s each for base on an H200
        "sweep_tokens": [16384, 65536, 262144],
        "sweep_caps": [128, 512],
        "sweep_target_tokens": 2_000_000,
        "sweep_steps": (15, 60),
        "compile": True,
        "data_vocab": 30000,  # the real vocabulary (the blog post's)
        "data_tokens": 4_000_000,  # synthetic train text: no epoch repeats in the train section's 2.6M tokens
        "valid_tokens": 40_000,  # the held-out sentences every train and ablation row is scored on
        "ablation_tokens": 65536,
        "ablation_target_tokens": 2_000_000,  # ~31 steps of 64k: 5 timed windows of 5 after compile
        "ablation_log_every": 5,
        "large_size": "large",
        "large_tokens": 65536,
        "large_target_tokens": 1_500_000,
        "curve_target_tokens": 13_000_000,  # ~200 steps of 64k: the loss curve of the candidate default
    },
    "quick": {
        "mask_sizes": [4096, 32768],
        "mask_repeats": 3,
        "mask_hf_max_tokens": None,
        "model_sizes": ["tiny"],
        "model_tokens": 1024,
        "model_repeats": 3,
        "model_warmup": 1,
        "model_vocab": 4096,  # about what the sample corpus supports; 30000 makes the CPU run slow
        "train_size": "tiny",
        "train_tokens": 1024,
        "train_steps": 8,
        "log_every": 2,
        "recipe_micro_batch": 64,
        "sweep_tokens": [512, 1024],
        "sweep_caps": [128, 512],  # >= 512: a document unit fills the 512 cap
        "sweep_target_tokens": 4096,
        "sweep_steps": (6, 6),
        "compile": False,
        "data_vocab": 4096,  # as model_vocab: the same generator, sized for a CPU (30000 makes each step ~5x slower)
        "data_tokens": 60_000,
        "valid_tokens": 2_000,  # the evaluator runs transformers' full vocab head: on a CPU that is the cost
        "ablation_tokens": 256,  # two rows of 128
        "ablation_target_tokens": 1500,  # 6-7 steps in windows of 2: the first dropped, the last profiled
        "ablation_log_every": 2,  # a profiled window needs 2 steps: one warms the profiler up, one is traced
        "large_size": "tiny",
        "large_tokens": 512,
        "large_target_tokens": 1000,
        "curve_target_tokens": 2500,  # ~10 steps of 256
    },
}


def command_line(args) -> str:
    parts = ["mlmtrain bench", f"--out {args.out}", f"--device {args.device}", f"--sections {args.sections}"]
    parts += ["--quick"] if args.quick else []
    parts += [f"--size {args.size}"] if args.size else []
    parts += [f"--sweep-tokens {','.join(map(str, args.sweep_tokens))}"] if args.sweep_tokens else []
    parts += [f"--sweep-caps {','.join(map(str, args.sweep_caps))}"] if args.sweep_caps else []
    parts += [f"--time-limit {args.time_limit:g}"] if args.time_limit else []
    parts += ["--merge"] if args.merge else []
    parts += [f"--remeasure {name!r}" for name in args.remeasure or ()]
    parts += [f"--skip {name!r}" for name in args.skip or ()]
    return " ".join(parts)


# --work: data, runs and checkpoints the bench makes and remakes; a run in it is deleted only if it holds nothing else
WORK_LAYOUT = Layout("bench-work", "a benchmark's work folder", "mlmtrain bench --work", ("**",), ())


def check_args(args) -> list[str]:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    known = (*SECTIONS, *OPTIONAL_SECTIONS)
    unknown = [s for s in sections if s not in known]
    if unknown or not sections:
        raise UserError(f"unknown section(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(known)}")
    if twice := sorted({s for s in sections if sections.count(s) > 1}):  # a report holds a section once
        raise UserError(f"--sections names {', '.join(twice)} more than once: name each section once")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu (with --quick)")
    for flag in ("sweep_tokens", "sweep_caps"):
        text = getattr(args, flag)
        if text is not None:
            try:
                values = [int(v) for v in text.split(",") if v.strip()]
            except ValueError:
                values = []
            if not values or min(values) < 1:
                raise UserError(f"--{flag.replace('_', '-')} takes positive integers separated by commas, got {text!r}")
            setattr(args, flag, values)
    if not 0 <= args.time_limit < float("inf"):  # nan too
        raise UserError(f"--time-limit must be a number of seconds >= 0 (0 = none), got {args.time_limit:g}")
    if args.size is not None and args.size not in MODEL_SIZES:
        raise UserError(f"--size must be one of {', '.join(MODEL_SIZES)}, got {args.size!r}")
    if args.sweep_caps and not all(3 <= cap <= 512 for cap in args.sweep_caps):
        raise UserError(f"--sweep-caps are sequence caps from 3 to 512 (BERT's positions), got {args.sweep_caps}")
    for module, users in (("transformers", [s for s in sections if s not in ("ceilings", "sweep")]),  # evaluator, HF
                          ("accelerate", [s for s in sections if s == "train"])):  # the HF Trainer  # fmt: skip
        if users:
            require(module, f"mlmtrain bench --sections {','.join(users)}", module, "bench")
    if args.remeasure and not args.merge:
        raise UserError("--remeasure names rows of an earlier report to measure again: add --merge")
    for flag in ("remeasure", "skip"):
        from mlmtrain.benchmarks.bench_ablation import ROW_NAMES

        names = getattr(args, flag) or []
        if names and "ablation" not in sections:
            raise UserError(f"--{flag} names ablation rows: add the ablation section (--sections ablation)")
        unknown = [name for name in names if name not in ROW_NAMES]
        if unknown:
            raise UserError(f"--{flag}: no ablation row is called {unknown[0]!r}; rows: {', '.join(ROW_NAMES)}")
    return sections


class Bench:
    """State shared by the sections of one run: the plan, the data (made once), rows already measured."""

    def __init__(self, args, sections: list[str], work: Path, previous: dict | None):
        self.args, self.sections, self.work = args, sections, work
        self.plan = dict(PLANS["quick" if args.quick else "full"])
        self.plan["sweep_tokens"] = args.sweep_tokens or self.plan["sweep_tokens"]
        self.plan["sweep_caps"] = args.sweep_caps or self.plan["sweep_caps"]
        self.device = torch.device(args.device)
        self.size = args.size or self.plan["train_size"]
        self.command = command_line(args)
        self.commit = provenance.source()["commit"]
        self.deadline: float | None = None  # time.monotonic() past which nothing new starts (main sets it)
        self.previous = previous or {"sections": []}
        self.done: dict[str, list[dict]] = {}
        self._data = self._sample_data = None
        self.progress = lambda section, rows: None  # main writes the rows of a section still running

    def tagged(self, section: str, rows: list[dict]) -> list[dict]:
        """Rows with their section, command and commit (a row kept from an earlier call keeps its own)."""
        return [{**r, "section": section, "command": r.get("command") or self.command,
                 "commit": r.get("commit") if r.get("reused_from") else self.commit} for r in rows]  # fmt: skip

    def data(self):
        """The synthetic vocab-30000 corpus every train, sweep and ablation row runs on (made once)."""
        from mlmtrain.benchmarks.synthetic_data import make_synthetic_data

        if self._data is None:
            caps = {128, *(self.plan["sweep_caps"] if "sweep" in self.sections else [])}
            caps |= {512} if "ablation" in self.sections else set()
            log = lambda msg: progress_lines.quiet() or print(f"mlmtrain bench: {msg}", file=sys.stderr)  # noqa: E731
            self._data = make_synthetic_data(
                self.work / "synthetic",
                seq_caps=sorted(caps),
                vocab_size=self.plan["data_vocab"],
                train_tokens=self.plan["data_tokens"],
                valid_tokens=self.plan["valid_tokens"],
                log=log,
            )
        return self._data

    def sample_data(self):
        """The bundled sample corpus at its own vocabulary: the one row kept for continuity with earlier reports."""
        from mlmtrain.benchmarks.bench_train import make_data

        if self._sample_data is None:
            self._sample_data = make_data(self.work / "sample", seq_caps=[128])
        return self._sample_data

    # ---- sections: each returns a list of rows ----------------------------------------------------------

    def ceilings(self) -> list[dict]:
        from mlmtrain.benchmarks import ceilings

        return ceilings.run(self.device, quick=self.args.quick)

    def mask(self) -> list[dict]:
        from mlmtrain.benchmarks import bench_mlm_mask

        # the HF collator runs on the CPU at ~1 s per 256k tokens: capped there so the section stays short
        return bench_mlm_mask.run(
            self.plan["mask_sizes"],
            self.device,
            self.plan["mask_repeats"],
            hf_max_tokens=self.plan["mask_hf_max_tokens"],
            table=sys.stderr,  # as every other line of the bench: stdout stays clean
        )

    def model(self) -> list[dict]:
        from mlmtrain.benchmarks import bench_model
        from mlmtrain.benchmarks.bench_train import _fresh_device_state

        dtype = default_precision(self.device.type)
        rows, longest = [], 0.0
        for size in self.plan["model_sizes"]:
            if self.deadline is not None and time.monotonic() + longest > self.deadline:
                rows.append(
                    {
                        "benchmark": "model",
                        "name": f"{size}",
                        "size": size,
                        "error": OUT_OF_TIME,
                    }
                )
                continue
            t0 = time.monotonic()
            _fresh_device_state(self.device)
            # ours (compiled, as the trainer runs it) and transformers on the same sentences; one compile per
            # size keeps the section inside the GPU script's budget (bench_model.py alone has more variants)
            variants = ("ours", "hf") if self.device.type == "cuda" else None
            for r in bench_model.run(
                size,
                self.plan["model_tokens"],
                str(self.device),
                dtype,
                self.plan["model_repeats"],
                warmup=self.plan["model_warmup"],
                vocab_size=self.plan["model_vocab"],
                compile=self.plan["compile"],
                variants=variants,
            ):
                rows.append({**r, "name": f"{size} {r['name']}"})
            longest = max(longest, time.monotonic() - t0)
        return rows

    def train(self) -> list[dict]:
        from mlmtrain.benchmarks import bench_train

        rows = bench_train.run(
            self.work / "train",
            size=self.size,
            tokens_per_batch=self.plan["train_tokens"],
            steps=self.plan["train_steps"],
            device=self.args.device,
            compile=self.plan["compile"],
            log_every=self.plan["log_every"],
            max_micro_batch=self.plan["recipe_micro_batch"],
            data=self.data(),
            command=self.command,
        )
        rows = [{**r, "data": "synthetic"} for r in rows]
        sample = self.sample_data()
        T, steps, log_every = self.plan["train_tokens"], self.plan["train_steps"], self.plan["log_every"]
        result = bench_train.run_ours(
            sample,
            self.work / "train" / "ours_sample_vocab",
            size=self.size,
            tokens_per_batch=T,
            steps=-(-steps // log_every) * log_every,
            device=self.args.device,
            compile=self.plan["compile"],
            log_every=log_every,
            warmup_steps=auto_warmup(steps),
        )
        name = f"ours {self.size} T={T} at the sample's vocabulary ({sample.vocab_size})"
        row = bench_train.ours_row(
            name,
            result,
            size=self.size,
            tokens_per_batch=T,
            seq_cap=128,
            benchmark="train",
            vocab_size=sample.vocab_size,
            data="sample",
        )
        return rows + [row]

    def sweep(self) -> list[dict]:
        from mlmtrain.benchmarks import bench_train

        reuse = list(self.done.get("train", []))
        if self.args.merge:  # points a previous run measured (incremental sweeps under a time limit)
            reuse += [
                r
                for s in self.previous["sections"]
                if s["section"] in ("train", "sweep")
                for r in s.get("rows", [])
                if "error" not in r
            ]
        reuse = [r for r in reuse if r.get("data") == "synthetic"]  # not the sample-vocabulary rows
        lo, hi = self.plan["sweep_steps"]
        # until a sweep point has run, the train section's own run (same model, one compile) says how long one takes
        expected = max(
            [r.get("wall_s", 0.0) for r in self.done.get("train", []) if r.get("trainer") == "ours"], default=0.0
        )
        rows = bench_train.sweep(
            self.work / "sweep",
            self.data(),
            size=self.size,
            tokens=self.plan["sweep_tokens"],
            caps=self.plan["sweep_caps"],
            device=self.args.device,
            compile=self.plan["compile"],
            target_tokens=self.plan["sweep_target_tokens"],
            min_steps=lo,
            max_steps=hi,
            log_every=self.plan["log_every"],
            deadline=self.deadline,
            expected_s=expected,
            reuse=reuse,
            command=self.command,
        )
        return [{**r, "data": "synthetic"} for r in rows]

    def ablation(self) -> list[dict]:
        from mlmtrain.benchmarks import bench_ablation

        again = set(self.args.remeasure or ())  # rows whose code changed since they were measured
        rows = [r for s in self.previous["sections"] if s["section"] == "ablation" for r in s.get("rows", [])]
        reuse = [r for r in rows if r.get("name") not in again]
        return bench_ablation.run(
            self.work / "ablation",
            self.data(),
            size=self.size,
            tokens_per_batch=self.plan["ablation_tokens"],
            target_tokens=self.plan["ablation_target_tokens"],
            device=self.args.device,
            compile=self.plan["compile"],
            log_every=self.plan["ablation_log_every"],
            large_size=self.plan["large_size"],
            large_tokens_per_batch=self.plan["large_tokens"],
            large_target_tokens=self.plan["large_target_tokens"],
            curve_target_tokens=self.plan["curve_target_tokens"],
            deadline=self.deadline,
            reuse=reuse if self.args.merge else [],
            command=self.command,
            on_row=lambda rows: self.progress("ablation", rows),
            skip=self.args.skip or (),
        )

    def run_section(self, name: str) -> dict:
        t0 = time.monotonic()
        if self.deadline is not None and t0 > self.deadline:
            return {"section": name, "wall_s": 0.0, "error": OUT_OF_TIME}
        try:
            rows = getattr(self, name)()
        except ModuleNotFoundError as e:
            return {
                "section": name,
                "wall_s": time.monotonic() - t0,
                "error": f"module {e.name} is not available ({e})",
                "traceback": traceback.format_exc(),
            }
        except Exception as e:  # a broken section is reported, the others still run
            return {
                "section": name,
                "wall_s": time.monotonic() - t0,
                "error": f"{type(e).__name__}: {e}"[:1000],
                "traceback": traceback.format_exc(),
            }
        rows = self.tagged(name, rows)
        self.done[name] = rows
        return {"section": name, "wall_s": time.monotonic() - t0, "rows": rows}


def main(args) -> int:
    from mlmtrain.benchmarks import report
    from mlmtrain.flops import peak_tflops_for

    sections = check_args(args)
    out = Path(args.out)
    own_work = args.work is None
    if not own_work:  # new, empty or an earlier bench's --work: the bench deletes and rewrites in it
        state, made_by = folder_state(Path(args.work), WORK_LAYOUT)
        state = "foreign" if state == "mine" and read_marker(args.work) is None else state  # unmarked ones: new
        refuse_unless_mine(Path(args.work), WORK_LAYOUT, state, made_by, "--work")
    device = provenance.device_name(torch.device(args.device))  # one report holds one machine's numbers
    previous = report.read_previous(out / "results.json", device) if args.merge else None
    report.claim_out_folder(out)  # before any work, after every check: a folder that is not a report's is refused
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mlmtrain_bench_"))
    if not own_work:
        work.mkdir(parents=True, exist_ok=True)
        write_marker(work, WORK_LAYOUT)
    bench = Bench(args, sections, work, previous)
    results = {
        "command": bench.command,
        "quick": bool(args.quick),
        "device": args.device,
        "environment": provenance.environment(bench.device),
        "time_limit_s": args.time_limit or None,
        "sections": [],
        "wall_s": 0.0,
    }
    peak = peak_tflops_for(bench.device, default_precision(bench.device.type)) or None
    t0 = time.monotonic()
    bench.deadline = t0 + args.time_limit if args.time_limit else None  # the budget is for the sections

    partial = {}  # the running section's rows so far

    def progress(section: str, rows: list[dict]) -> None:  # rows so far: a hard stop keeps every finished row
        rows = bench.tagged(section, rows)
        partial.update(section=section, rows=rows)
        running = {"section": section, "wall_s": time.monotonic() - t0, "rows": rows, "error": UNFINISHED}
        report.write(report.merged({**results, "sections": [*results["sections"], running]}, previous), out, peak)

    bench.progress = progress
    if not progress_lines.quiet():
        print(f"mlmtrain bench: {', '.join(sections)} on {results['environment']['device']} -> {out}", file=sys.stderr)
    try:
        for name in sections:
            if not progress_lines.quiet():  # --quiet: warnings, errors and results only
                print(f"mlmtrain bench: section {name} ...", file=sys.stderr)
            result = bench.run_section(name)
            results["sections"].append(result)
            status = result.get("error") or f"{len(result['rows'])} rows"
            if not progress_lines.quiet() or "error" in result:
                print(f"mlmtrain bench: section {name}: {status} ({result['wall_s']:.0f} s)", file=sys.stderr)
            results["wall_s"] = time.monotonic() - t0
            report.write(report.merged(results, previous), out, peak)  # after every section: a kill keeps the rest
    except (KeyboardInterrupt, Terminated) as stop:  # the report names what the stop left out, as the budget's
        why = f"not measured: the bench was stopped by {getattr(stop, 'signal', signal.SIGINT).name}"
        results["wall_s"] = time.monotonic() - t0
        kept = {s["section"] for s in (previous or {}).get("sections", [])}  # --merge: an earlier call's stays
        stopped, *after = sections[len(results["sections"]) :]
        rows = partial["rows"] if partial.get("section") == stopped else []
        results["sections"].append({"section": stopped, "wall_s": 0.0, "rows": rows, "error": why})
        results["sections"] += [{"section": n, "wall_s": 0.0, "error": why} for n in after if n not in kept]
        try:
            report.write(report.merged(results, previous), out, peak)
        except Exception:  # results.json is written first; the charts' import may be what the signal broke
            write_text(out / "report.md", report.UNDRAWN.format(out=out))
        raise
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    merged = report.merged(results, previous)
    json_path, md_path = report.write(merged, out, peak)
    errors = [s["section"] for s in merged["sections"] if "error" in s]  # a kept one too: the report lacks it
    # rows the budget left out, this call's or an earlier one's kept by --merge: the report is not complete
    late = [f"{s['section']}: {r.get('name')}" for s in merged["sections"] for r in s.get("rows", [])
            if str(r.get("error", "")).startswith(OUT_OF_TIME)]  # fmt: skip
    said = f"mlmtrain bench: wrote {json_path} and {md_path} in {results['wall_s']:.0f} s"
    if errors:
        said += f"; not measured: {', '.join(errors)}"
    if late:
        named = ", ".join(late[:3]) + (", ..." if len(late) > 3 else "")
        rows = "row" if len(late) == 1 else "rows"
        said += f"; {len(late)} {rows} past the time budget ({named}): `--merge` measures them"
    print(said, file=sys.stderr)
    return 1 if errors or late else 0
