"""Turn a benchmark run's results into `results.json` + `report.md` + PNG charts in one folder.

results.json (schema "mlmtrain-bench/1"):
    {"schema", "command", "quick", "device", "environment": {device, versions{torch, triton, transformers, ...},
     date, ...}, "time_limit_s", "wall_s", "sections": [{"section", "wall_s", "rows": [...]} or
     {"section", "wall_s", "error", "traceback"?}], "headline": {...}}
Every row carries "section" and "command". Rates are {"min", "median", "max"} (benchmarks/common.record).

The report states the spread of every figure, names failed or skipped sections instead of dropping them,
and judges throughput against the ceilings measured in the same run (and the datasheet peak, for MFU).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from mlmtrain.benchmarks.charts import chart_recipe, chart_tflops, chart_throughput
from mlmtrain.benchmarks.tables import gib, loss_text, pct, rows_of, scale, si, spread_text, table
from mlmtrain.errors import UserError
from mlmtrain.files import (
    TMP,
    Layout,
    folder_state,
    foreign_files,
    read_marker,
    reads_as,
    refuse_unless_mine,
    write_json,
    write_marker,
    write_text,
)

SCHEMA = "mlmtrain-bench/1"
CHARTS = {"throughput": "throughput_vs_batch.png", "tflops": "tflops_vs_ceiling.png", "recipe": "ours_vs_recipe.png"}
REPORT_FILES = ("results.json", "report.md", *CHARTS.values())  # what `write` replaces
SCRIPT_FILES = ("gpu.txt", "gpu_tests.txt", "bench.log", "bench_merge.log", "kernels.tar.gz")  # scripts/*_gpu.sh's
# scripts/speed_gpu.sh's kernel benches: a table, rows and log each, put into kernels.tar.gz (loose when unpacked)
KERNEL_FILES = tuple(
    f"{n}.{ext}" for n in ("attention", "attention_large", "layernorm", "gelu") for ext in ("md", "json", "log")
)
BENCH_LAYOUT = Layout(
    "bench", "a benchmark report", "mlmtrain bench", (*REPORT_FILES, *SCRIPT_FILES, *KERNEL_FILES, TMP), ()
)


def claim_out_folder(out_dir: str | Path) -> None:
    """Make `out_dir` a report folder, or refuse it in one sentence: it must be new, empty, or hold only a report's
    and the GPU scripts' files, and where it has no marker (an older mlmtrain's) a report's or a script's file is
    replaced only beside a results.json of this schema (the scripts claim the folder before they write in it). A
    report is rewritten in place (after every section; `--merge` extends it), so a folder of its own needs no
    --overwrite."""
    out_dir = Path(out_dir)
    state, made_by = folder_state(out_dir, BENCH_LAYOUT)
    unmarked_report = state == "mine" and read_marker(out_dir) is None
    if unmarked_report and any((out_dir / n).exists() for n in (*REPORT_FILES, *SCRIPT_FILES)):
        if not reads_as(out_dir / "results.json", ("schema", "sections")):
            state = "foreign"
    refuse_unless_mine(out_dir, BENCH_LAYOUT, state, made_by)
    extra = foreign_files(out_dir, BENCH_LAYOUT) if state == "mine" else []
    if extra:
        raise UserError(f"--out {out_dir} holds files `mlmtrain bench` does not write ({', '.join(extra[:5])}): "
                        "choose a new or empty folder.")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(out_dir) is None:
        write_marker(out_dir, BENCH_LAYOUT)


def ceilings(results: dict) -> dict:
    """{"matmul_bf16": TFLOP/s median, "matmul_fp32": ..., "copy": GB/s median} from the ceilings section."""
    out = {}
    for r in rows_of(results, "ceilings"):
        if r.get("kind") == "matmul_ceiling":
            out[f"matmul_{r['dtype']}"] = r["tflops"]["median"]
        elif r.get("kind") == "copy_ceiling":
            out["copy"] = r["gb_per_s"]["median"]
    return out


def _matmul_ceiling(ceil: dict, precision: str | None) -> float | None:
    return ceil.get("matmul_float32") if precision == "fp32" else ceil.get("matmul_bfloat16")


def headline(results: dict) -> dict:
    """The figures docs/BENCHMARKS.md quotes: ceilings, ours vs recipe, the mask kernel's share of copy
    bandwidth, and where the step time goes."""
    ceil = ceilings(results)
    h: dict = {"ceilings": ceil}
    train = rows_of(results, "train")
    ours = next((r for r in train if r.get("trainer") == "ours"), None)
    recipe = next((r for r in train if r.get("trainer") == "recipe"), None)
    cmp = next((r for r in train if r.get("trainer") == "comparison"), None)
    if ours:
        mm = _matmul_ceiling(ceil, ours.get("precision"))
        h["ours"] = {
            "size": ours.get("size"),
            "tokens_per_s": ours["tokens_per_s"],
            "mfu": ours.get("mfu"),
            "achieved_tflops": ours.get("achieved_tflops"),
            "valid_loss": ours.get("valid_loss"),
            "fraction_of_matmul_ceiling": scale(ours.get("achieved_tflops"), 1 / mm) if mm else None,
            "phase_ms": ours.get("phase_ms"),
        }
    if recipe:
        h["recipe"] = {
            "tokens_per_s": recipe["tokens_per_s"],
            "mfu": recipe.get("mfu"),
            "valid_loss": recipe.get("valid_loss"),
        }
    if cmp:
        h["speedup_tokens_per_s"] = cmp.get("speedup_tokens_per_s")
    if rows_of(results, "ablation"):
        from mlmtrain.benchmarks.ablation_report import curve_check
        from mlmtrain.benchmarks.ablation_report import headline as ablation_headline

        h["ablation"] = ablation_headline(rows_of(results, "ablation"), ceil.get("matmul_bfloat16"))
        h["curve"] = curve_check(rows_of(results, "ablation"))
    # the masking kernel's share of copy bandwidth: against the copy of the same bytes timed next to it
    # (bench_mask's summary rows) and against this run's copy ceiling
    mask = rows_of(results, "mask")
    h["mask_kernel_fraction_of_copy"] = {
        r["num_tokens"]: r["kernel_fraction_of_copy"]
        for r in mask
        if r.get("kind") == "summary" and r.get("kernel_fraction_of_copy")
    } or None
    if ceil.get("copy"):
        h["mask_fraction_of_copy_ceiling"] = {
            f"{r['name']} @ {r.get('num_tokens')}": r["bytes_per_s"]["median"] / 1e9 / ceil["copy"]
            for r in mask
            if isinstance(r.get("bytes_per_s"), dict) and r.get("path") == "triton"
        } or None
    return h


# ---- tables ---------------------------------------------------------------------------------------------


RATE_UNITS = {
    "tokens_per_s": (1, "tok/s"),
    "bytes_per_s": (1, "B/s"),
    "flops_per_s": (1, "FLOP/s"),
    "samples_per_s": (1, "samples/s"),
}


def generic_table(rows: list[dict], ceil: dict) -> str:
    """Rows in benchmarks/common.record layout: time and every rate with its spread, plus the share of the
    measured ceiling where the rate is bytes (copy) or FLOPs (matmul)."""
    lines = []
    for r in rows:
        rates = [f"{spread_text(r[k], unit=u)}" for k, (_, u) in RATE_UNITS.items() if isinstance(r.get(k), dict)]
        share = []
        if isinstance(r.get("bytes_per_s"), dict) and ceil.get("copy"):
            share.append(f"{100 * r['bytes_per_s']['median'] / 1e9 / ceil['copy']:.0f}% of copy")
        fp32 = str(r.get("dtype")) in ("fp32", "float32", "torch.float32")  # rows name it either way
        mm = _matmul_ceiling(ceil, r.get("precision") or ("fp32" if fp32 else None))
        if isinstance(r.get("flops_per_s"), dict) and mm:
            share.append(f"{100 * r['flops_per_s']['median'] / 1e12 / mm:.0f}% of matmul")
        if not rates:  # a summary row: its own numbers (ratios, fractions)
            rates = [f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float)]
        secs = r.get("seconds") if isinstance(r.get("seconds"), dict) else None
        label = r.get("name", "?")
        if r.get("num_tokens") and r.get("kind") != "summary":
            label += f" ({r['num_tokens']:,} tokens)"
        lines.append(
            [label, spread_text(secs, unit="s") if secs else "–", "; ".join(rates) or "–", ", ".join(share) or "–"]
        )
    return table(["name", "time per call: median (min–max)", "rates: median (min–max)", "of measured ceiling"], lines)


def train_table(rows: list[dict], ceil: dict) -> str:
    lines = []
    for r in rows:
        if r.get("trainer") == "comparison":
            continue
        mm = _matmul_ceiling(ceil, r.get("precision"))
        batch = (
            f"{r['tokens_per_batch']:,} tokens"
            if r.get("tokens_per_batch")
            else f"{r.get('micro_batch')} sentences x {r.get('grad_accum')}"
        )
        lines.append(
            [
                r["name"],
                batch,
                f"{r.get('real_tokens', 0):,}",
                r.get("steps"),
                si(r["tokens_per_s"].get("overall"), "tok/s"),
                spread_text(r.get("tokens_per_s"), unit="tok/s"),
                spread_text(r.get("achieved_tflops"), fmt=lambda x, u: f"{x:.3g}"),
                pct(r.get("mfu")),
                pct(scale(r.get("achieved_tflops"), 1 / mm)) if mm else "–",
                gib(r.get("peak_mem_bytes")),
                loss_text(r.get("valid_loss")),
                f"{r.get('wall_s', 0):.1f} s",
            ]
        )
    return table(
        [
            "run",
            "batch",
            "real tokens",
            "steps",
            "real tokens/s overall",
            "per window/step: median (min–max)",
            "TFLOP/s",
            "MFU (datasheet peak)",
            "of measured matmul",
            "peak memory",
            "valid MLM loss",
            "wall",
        ],
        lines,
    )


def sweep_table(rows: list[dict], ceil: dict) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([f"{r.get('tokens_per_batch', '?'):,}", r.get("seq_cap"), "–", r["error"], "", "", "", ""])
            continue
        mm = _matmul_ceiling(ceil, r.get("precision"))
        lines.append(
            [
                f"{r['tokens_per_batch']:,}",
                r["seq_cap"],
                r.get("pack"),
                spread_text(r.get("tokens_per_s"), unit="tok/s"),
                pct(r.get("mfu")),
                pct(scale(r.get("achieved_tflops"), 1 / mm)) if mm else "–",
                gib(r.get("peak_mem_bytes")),
                spread_text(r.get("step_time_s"), unit="s"),
            ]
        )
    return table(
        [
            "tokens per batch",
            "seq cap",
            "packing",
            "real tokens/s: median (min–max)",
            "MFU",
            "of measured matmul",
            "peak memory",
            "step time",
        ],
        lines,
    )


def _timeline(row: dict) -> str:
    """Whose clock a row's traced phases are on: the device's where the trace had one, else the host's."""
    return {"device": "device", "host": "host"}.get((row.get("kernel_categories") or {}).get("timeline"), "traced")


def profile_text(ours: dict, ceil: dict) -> str:
    """The traced step's phases, and how long its model FLOPs would take at the measured matmul ceiling:
    the gap between the two is what is left to win."""
    phases = ours["phase_ms"]
    total = sum(phases.values())
    text = (
        f"Step profile ({_timeline(ours)} ms per step, traced window): "
        + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        + f"; total {total:.2f} ms."
    )
    mm = _matmul_ceiling(ceil, ours.get("precision"))
    tf, tps = ours.get("achieved_tflops"), ours.get("tokens_per_s") or {}
    if mm and isinstance(tf, dict) and tps.get("overall") and ours.get("steps"):
        step_ms = ours["real_tokens"] / ours["steps"] / tps["overall"] * 1e3  # timed windows, not profiled
        ideal_ms = step_ms * tf["median"] / mm  # the same model FLOPs at the ceiling
        text += (
            f" Timed (unprofiled) step: {step_ms:.2f} ms; its model FLOPs at the measured matmul ceiling "
            f"({mm:.3g} TFLOP/s) would take {ideal_ms:.2f} ms ({100 * ideal_ms / step_ms:.0f}%): the rest is "
            "what is left between us and the ceiling."
        )
    return text


def source_lines(results: dict) -> list[str]:
    """The code that measured: this call's commit, and the commits of rows kept from earlier calls (--merge)."""
    from mlmtrain.provenance import describe

    src = results["environment"].get("source")
    if src is None:  # a report written before reports named their commit
        return ["- source: not recorded"]
    now = src.get("commit")
    # a row without a "commit" (a section kept from a results.json written before rows named theirs): not recorded
    earlier = collections.Counter(
        r.get("commit") for s in results["sections"] for r in s.get("rows", []) if r.get("commit") != now
    )
    kept = "; ".join(f"{n} at {c[:12] if c else 'a commit not recorded'}" for c, n in earlier.items())
    return [f"- source: {describe(src)}"] + ([f"- rows kept from earlier calls (--merge): {kept}"] if kept else [])


def render(results: dict, out_dir: Path, peak: float | None = None) -> str:
    env, ceil = results["environment"], ceilings(results)
    v = env.get("versions", {})
    md = [
        f"# mlmtrain benchmark report{' (quick)' if results.get('quick') else ''}",
        "",
        f"- command: `{results['command']}`",
        f"- date: {env.get('date')}",
        f"- device: {env.get('device')}",
        f"- versions: torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"tokenizers {v.get('tokenizers')}, python {v.get('python')}"
        + "".join(f", {name} {v[name]}" for name in ("cuda", "cudnn", "torchao") if v.get(name)),
        *source_lines(results),
        f"- wall time: {results.get('wall_s', 0):.0f} s"
        + (f" (time limit {results['time_limit_s']:.0f} s)" if results.get("time_limit_s") else ""),
        "",
        "Method: warm-up runs dropped, device events on CUDA (perf_counter on CPU), fresh random inputs per "
        "repeat, every figure as median (min–max) over repeats (training: over log windows or steps after "
        "warm-up). MFU counts model FLOPs (`mlmtrain.flops`: encoder on real tokens, vocab head on the masked "
        "share) against the datasheet peak; the measured matmul ceiling of this run is shown beside it.",
        "",
    ]
    failed = [s for s in results["sections"] if "error" in s]
    failed_rows = [(s["section"], r) for s in results["sections"] for r in s.get("rows", []) if "error" in r]
    if failed or failed_rows:
        md += ["## Not measured", ""]
        md += [f"- **{s['section']}**: {s['error']}" for s in failed]
        md += [f"- {sec}: {r.get('name', '?')}: {r['error']}" for sec, r in failed_rows]
        md.append("")
    titles = {
        "ceilings": "Hardware ceilings (measured on the spot)",
        "mask": "Masking kernel vs reference vs HF collator",
        "model": "Model forward + backward",
        "train": "Training: ours vs the HF Trainer baseline",
        "sweep": "Sweep: tokens per batch x sequence cap (our step)",
        "ablation": "Speed ablation at the real vocabulary (our step, one option more per row)",
    }
    for s in results["sections"]:
        if "error" in s and not s.get("rows"):  # a stopped section's finished rows are shown, its error listed above
            continue
        rows = [r for r in s["rows"] if "error" not in r]
        commands = {r.get("command") for r in s["rows"]} - {None}  # --merge keeps the sections it does not redo
        kept = (
            f"; kept from an earlier call: `{min(commands)}`" if commands and results["command"] not in commands else ""
        )
        md += [f"## {titles.get(s['section'], s['section'])}", "", f"({s['wall_s']:.0f} s{kept})", ""]
        if s["section"] == "train":
            md += [train_table(rows, ceil), ""]
            cmp = next((r for r in rows if r.get("trainer") == "comparison"), None)
            if cmp and cmp.get("speedup_tokens_per_s"):
                md += [
                    f"Ours is **{cmp['speedup_tokens_per_s']:.2f}x** the recipe's real tokens/s (overall rates "
                    "after warm-up: timed real tokens / timed seconds); "
                    f"validation loss after the same tokens: ours {loss_text(cmp['valid_loss']['ours'])}, recipe "
                    f"{loss_text(cmp['valid_loss']['recipe'])} (same held-out sentences, same masks).",
                    "",
                ]
            ours = next((r for r in rows if r.get("trainer") == "ours"), None)
            if ours and ours.get("phase_ms"):
                md += [profile_text(ours, ceil), ""]
            if chart_recipe(rows, out_dir / CHARTS["recipe"]):
                md += [f"![ours vs recipe]({CHARTS['recipe']})", ""]
        elif s["section"] == "ablation":
            from mlmtrain.benchmarks.ablation_report import report_markdown

            md += [report_markdown(s["rows"], ceil.get("matmul_bfloat16"), finished="error" not in s), ""]
        elif s["section"] == "sweep":
            md += [sweep_table(s["rows"], ceil), ""]
            if chart_throughput(rows, out_dir / CHARTS["throughput"]):
                md += [f"![throughput vs batch size]({CHARTS['throughput']})", ""]
        else:
            md += [generic_table(rows, ceil), ""]
    if chart_tflops(results, out_dir / CHARTS["tflops"], ceil, peak):
        md += ["## Achieved TFLOP/s against the ceiling", "", f"![achieved TFLOP/s]({CHARTS['tflops']})", ""]
    return "\n".join(md)


# report.md when the bench's stop broke drawing it (a signal inside matplotlib's import leaves it half-imported)
UNDRAWN = (
    "# mlmtrain benchmark report\n\nNot drawn: the bench was stopped while it drew this report. results.json "
    "holds every number; `python -m mlmtrain.benchmarks.report {out}` draws it.\n"
)


def write(results: dict, out_dir: str | Path, peak: float | None = None) -> tuple[Path, Path]:
    """Write results.json (with its headline) and report.md (+ charts) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "schema": SCHEMA, "headline": headline(results)}
    json_path, md_path = out_dir / "results.json", out_dir / "report.md"
    # each written whole and renamed (files.write_text): a run killed mid-write keeps the previous complete files
    write_json(json_path, results)
    write_text(md_path, render(results, out_dir, peak))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    """Re-render report.md and the charts from an existing results.json (e.g. after editing or merging)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder", help="a folder holding results.json")
    p.add_argument("--claim", action="store_true", help="only make FOLDER a report's, or refuse it in one sentence "
                   "(the GPU scripts, before they write their logs in it)")  # fmt: skip
    args = p.parse_args(argv)
    path = Path(args.folder) / "results.json"
    try:
        if args.claim:
            claim_out_folder(args.folder)
            return 0
        results = json.loads(path.read_text(encoding="utf-8"))
    except UserError as e:
        print(f"mlmtrain report: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        what = f"make {args.folder}" if args.claim else f"read {path}"
        print(f"mlmtrain report: error: cannot {what}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    peak = None
    if results.get("device") == "cuda":  # the datasheet peak of the GPU named in the results
        from mlmtrain.flops import peak_tflops_named

        peak = peak_tflops_named(results["environment"]["device"], "bf16") or None
    for path in write(results, args.folder, peak):
        print(path)
    return 0


def read_previous(path: Path, device: str | None = None) -> dict | None:
    """--merge: the report to extend, checked before any work (its sections are kept as they are), or None; it
    must have been measured on `device` (the name this call's environment gives), as one report is one machine's."""
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--merge: {path} is not valid JSON ({e}): measure again without --merge.") from None
    sections = previous.get("sections") if isinstance(previous, dict) else None
    if (
        not isinstance(sections, list)
        or previous.get("schema") != SCHEMA
        or not all(isinstance(s, dict) and isinstance(s.get("section"), str) for s in sections)
    ):
        raise UserError(f"--merge: {path} is not a report of this version ({SCHEMA}): measure again without --merge.")
    measured_on = (previous.get("environment") or {}).get("device")
    if device is not None and measured_on != device:
        raise UserError(
            f"--merge: {path} was measured on {measured_on}, and this call runs on {device}: one report holds one "
            "machine's numbers; use another --out, or measure again without --merge."
        )
    return previous


def merged(results: dict, previous: dict | None) -> dict:
    """With --merge: previous sections this run did not redo come first, marked with their own command."""
    if not previous:
        return results
    redone = {s["section"] for s in results["sections"]}
    kept = [s for s in previous.get("sections", []) if s["section"] not in redone]
    return {**results, "sections": kept + results["sections"], "merged_from": previous.get("command")}


if __name__ == "__main__":
    raise SystemExit(main())
