"""The speed ablation's report (bench_ablation.py runs the rows): the ablation and target tables, the headline
(today and the fastest row of each workload against its target), the loss curves' verdict on a candidate
default, and the kernel categories of "today" and the fastest row side by side."""

from __future__ import annotations

from mlmtrain.benchmarks.bench_ablation import CURVES, DROPOUT_OFF, fastest

# The band a candidate default's validation loss must stay inside, in nats: NOISE_FACTOR x today's seed-to-seed
# difference, at least VALID_TOLERANCE, at most VALID_CAP. One seed pair estimates the noise loosely: at 1x, an
# equal candidate failed 11-19% of the time (run noise sd 0.01-0.05, simulated); at 2x, 6-10% (sd 0.01-0.02).
# The cap keeps a seed pair that happens to differ widely from passing a clearly worse candidate.
NOISE_FACTOR, VALID_TOLERANCE, VALID_CAP = 2.0, 0.01, 0.05

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
            # the fastest row measured (what a target is judged on), and the candidate default: the row with the
            # fewest options within SAME_SPEED of it (what the curves and the large model's rows build on)
            "fastest": _summary(max(mine, key=lambda r: r["tokens_per_s"]["overall"]), matmul),
            "candidate": _summary(fastest(mine), matmul),
        }
    return out


def report_markdown(rows: list[dict], matmul: float | None, finished: bool = True) -> str:
    """The ablation section's Markdown; `finished` False: a section stopped or killed before its last row."""
    from mlmtrain.benchmarks.tables import gib, loss_text, pct, scale, si, spread_text, table

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
            loss_text(r.get("valid_loss")),
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
        *([] if finished else ["The section did not finish (see Not measured): the targets judge these rows.", ""]),
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
                loss_text(best.get("valid_loss")),
                "the same" if h["candidate"]["name"] == best["name"] else h["candidate"]["name"],
            ]
        )
    header = ["workload", "target", "today", "fastest", "target met", "MFU", "of measured matmul", "valid loss",
              "candidate default (fewest options within 1%)"]  # fmt: skip
    md += [table(header, lines) if lines else "No target row was measured.", ""]
    md += [curves_markdown(rows, finished), ""]
    md += [kernel_categories_markdown(rows), ""]
    md += [host_ahead_markdown(rows), ""]
    return "\n".join(md)


def host_ahead_markdown(rows: list[dict]) -> str:
    """How far the host ran ahead of the device in each row: the time it waited at the log step's read (ms per
    step, median over the timed windows). Near 0, the device waited for the host instead (launches, the packer's
    thread, Python): what CUDA graphs and fewer kernels remove, and no faster kernel speeds up."""
    waits = [(r, r.get("device_wait_ms_per_step")) for r in _measured(rows)]
    if {(r.get("kernel_categories") or {}).get("timeline") for r, _ in waits} - {None} == {"host"}:  # a CPU's rows
        return "Host ahead of the device: no device (the host runs the step itself)."
    parts = [f"{r['benchmark']} {r['name']} {w['median']:.1f}" for r, w in waits if w]
    if not parts:
        return "Host ahead of the device: not in this report (rows measured before mlmtrain recorded it)."
    return (
        "Host ahead of the device (ms per step it waited at the log step's read, median; near 0: the device "
        "waited for the host; async log reads wait on a copy a window old instead): " + "; ".join(parts) + "."
    )


def curve_check(rows: list[dict]) -> dict | None:
    """The candidate default against today's defaults over ~200 steps, at seeds 0 and 1. The verdict is on
    validation loss (the same held-out sentences and masks for all): the candidate's minus today's at the same
    seed, averaged over the two seeds, must not exceed the noise band, NOISE_FACTOR x |today seed 1 - today
    seed 0| within [VALID_TOLERANCE, VALID_CAP]. One-sided: learning better is no regression. Train loss (every
    log window's mean; the
    second half, past warm-up and the first fall) is reported the same way beside it, not judged: a window's
    mean moves with its masks. None until all four curve rows are measured."""
    mine = {r["name"]: r for r in _measured(rows) if r.get("benchmark") == "curve" and r.get("loss_curve")}
    if any(name not in mine for name in CURVES):
        return None
    valid = {name: mine[name].get("valid_loss") for name in CURVES}
    if any(v is None for v in valid.values()):
        return None
    today, today1, fast, fast1 = ([loss for _, loss in mine[name]["loss_curve"]] for name in CURVES)
    n = min(map(len, (today, today1, fast, fast1)))
    # the second half's windows where all four have a loss (a window of only non-finite steps has none)
    half = [i for i in range(n // 2, n) if None not in (today[i], today1[i], fast[i], fast1[i])]

    def mean(values):
        values = list(values)
        return sum(values) / max(len(values), 1)

    difference = mean(valid[CURVES[2 + s]] - valid[CURVES[s]] for s in (0, 1))
    noise = abs(valid[CURVES[1]] - valid[CURVES[0]])
    band = min(max(NOISE_FACTOR * noise, VALID_TOLERANCE), VALID_CAP)
    return {
        "options": mine[CURVES[2]].get("options"),
        "steps": mine[CURVES[0]]["steps"],
        "valid_loss": valid,
        "valid_difference": difference,  # candidate - today, same seed, mean of the two seeds
        "valid_noise": noise,
        "band": band,
        "train_loss_difference": mean(fast[i] - today[i] + fast1[i] - today1[i] for i in half) / 2 if half else None,
        "train_loss_noise": mean(abs(today1[i] - today[i]) for i in half) if half else None,
        "within_noise": difference <= band,
    }


def _curve_state(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    if not row.get("loss_curve"):
        return "no loss curve"
    return "no finite validation loss (diverged)" if row.get("valid_loss") is None else "measured"


def curves_markdown(rows: list[dict], finished: bool = True) -> str:
    from mlmtrain.benchmarks.tables import table

    mine = {r["name"]: r for r in rows if r.get("benchmark") == "curve"}
    if not mine:
        if not finished:
            return "Loss curves: not reached (the section did not finish)."
        return "Loss curves: not run (they need a measured configuration faster than today's)."
    check = curve_check(rows)
    if check is None:
        why = "; ".join(f"{name}: {_curve_state(r)}" for name, r in mine.items())
        return f"Loss curves: not complete ({why})."
    curves = [dict(mine[name]["loss_curve"]) for name in CURVES]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    steps = sorted({*steps[:: max(1, len(steps) // 20)], *steps[-1:]})  # about 20 lines
    lines = [[str(step), *(f"{c[step]:.4f}" if c[step] is not None else "–" for c in curves)] for step in steps]
    lines.append(["valid MLM loss", *(f"{check['valid_loss'][name]:.4f}" for name in CURVES)])
    verdict = "within" if check["within_noise"] else "**outside**"
    return (
        f"Loss curves over {check['steps']} steps at seq 128: the candidate default "
        f"({_options(mine[CURVES[2]])}) against today's defaults, each at seeds 0 and 1. Validation loss, candidate "
        f"minus today at the same seed, mean of the two seeds: {check['valid_difference']:+.4f} against a band of "
        f"{check['band']:.4f} ({NOISE_FACTOR:g}x today's seed-to-seed difference {check['valid_noise']:.4f}, from "
        f"{VALID_TOLERANCE} to {VALID_CAP} nats): {verdict} the noise (one-sided: learning better is no regression). "
        + (
            f"Train loss over the second half, the same difference: {check['train_loss_difference']:+.4f}, beside "
            f"today's mean seed-to-seed |difference| {check['train_loss_noise']:.4f} (reported, not judged).\n\n"
            if check["train_loss_difference"] is not None
            else "Train loss over the second half: no window where all four curves have a finite loss.\n\n"
        )
        + table(["step", *CURVES], lines)
    )


def _compiled(r: dict) -> str:
    """What torch.compile did in the row's run (bench_train.run_ours): "–" when nothing was compiled."""
    c = r.get("compiled") or {}
    return f"{c['graphs']} / {c['graph_breaks']} / {c['cudagraph_skips']}" if c.get("graphs") else "–"


def _options(r: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or "(defaults)"
    return f"{text} ({r['note']})" if r.get("note") else text


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
    timelines = {c.get("timeline") for _, c in pair if c}
    where = "device time" if timelines == {"device"} else "host operator self time: no device in the trace"
    text = f"Kernel categories of the traced step ({where}), before and after:\n\n" + table(["category", *heads], lines)
    return text + "".join(_gaps_markdown(head, c) for head, (_, c) in zip(heads, pair))


def _gaps_markdown(head: str, categories: dict | None) -> str:
    """The idle gaps of one traced step (categories.json "idle_gaps", mlmtrain/idle_gaps.py) as a list."""
    from mlmtrain.idle_gaps import describe

    gaps = (categories or {}).get("idle_gaps")
    if not gaps:
        return ""
    items = [f"  - {c['ms']:.2f} ms ({c['count']:.1f} per step): {describe(c)}" for c in gaps["top"]]
    host = gaps.get("host")
    if host:
        items.append(f"  - the loop's thread: {host['step_ms']:.2f} ms per step, {host['waiting_ms']:.2f} ms of it in "
                     "long runtime calls (waiting for the device or the launch queue)")  # fmt: skip
    return (
        f"\n\nIdle gaps of >= {gaps['min_gap_us']:.0f} us, {head}: {gaps['ms']:.2f} ms per step in "
        f"{gaps['count']:.1f} gaps, by where the host was:\n\n" + "\n".join(items)
    )
