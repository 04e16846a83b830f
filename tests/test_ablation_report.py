"""The ablation report's judgements: which row is today, which is the fastest a target is met by (never dropout
off), at which size a target is judged, "vs today" and the share of the matmul ceiling, and which rows the kernel
categories compare."""

from __future__ import annotations

import pytest


def _ablation_row(name, rate, n_options=1, size="base", **extra):
    return {"benchmark": "ablation", "name": name, "size": size, "seq_cap": 128, "pack": "sentence",
            "tokens_per_batch": 65536, "tokens_per_s": {"overall": rate},
            "options": {f"k{i}": 1 for i in range(n_options)}, **extra}  # fmt: skip


def test_a_target_is_judged_only_at_the_size_it_is_for():
    """The 850k target is BERT-base's: a run at another size (--quick's tiny) shows no target and no verdict."""
    from mlmtrain.benchmarks.ablation_report import headline, report_markdown

    rows = [_ablation_row("today", 2e6, 0, size="tiny"), _ablation_row("+a", 3e6, 1, size="tiny")]
    (h,) = headline(rows, None).values()
    assert h["target_tokens_per_s"] is None
    (line,) = [x for x in report_markdown(rows, None).splitlines() if x.startswith("| tiny, seq 128")]
    assert "no target at this size" in line and "| met |" not in line


def test_the_dropout_off_row_is_never_the_fastest_a_target_is_met_by():
    """The "dropout off" row changes what the model learns: it stands in the table, but the fastest row, the candidate
    default and the target's verdict come from the rows that train the same model."""
    from mlmtrain.benchmarks.ablation_report import headline, report_markdown

    rows = [_ablation_row("today", 500_000.0, 0), _ablation_row("+a", 800_000.0, 1),
            _ablation_row("dropout off", 900_000.0, 2)]  # fmt: skip
    (h,) = headline(rows, None).values()
    assert h["fastest"]["name"] == "+a" and h["candidate"]["name"] == "+a"
    (line,) = [x for x in report_markdown(rows, None).splitlines() if x.startswith("| base, seq 128")]
    assert "800 ktok/s: +a | not met |" in line


def test_today_is_the_today_row_or_none_when_it_was_not_measured():
    """A "today" row that did not run (skipped by the budget) leaves today "not measured": the first row that ran
    (+row attention) is not shown as today's rate."""
    from mlmtrain.benchmarks.ablation_report import headline, report_markdown

    rows = [{**_ablation_row("today", 0.0, 0), "error": "skipped"}, _ablation_row("+row attention", 600_000.0, 1)]
    del rows[0]["tokens_per_s"]
    (h,) = headline(rows, None).values()
    assert h["today"] is None
    (line,) = [x for x in report_markdown(rows, None).splitlines() if x.startswith("| base, seq 128")]
    assert "| not measured |" in line


def test_vs_today_is_the_rows_rate_over_todays():
    from mlmtrain.benchmarks.ablation_report import report_markdown

    rows = [_ablation_row("today", 500_000.0, 0), _ablation_row("+a", 1_000_000.0, 1)]
    (line,) = [x for x in report_markdown(rows, None).splitlines() if x.startswith("| +a |")]
    assert "| 2.00x |" in line


def test_the_headlines_share_of_the_matmul_ceiling_is_the_median_windows():
    """The headline's "of measured matmul" is the median window's achieved TFLOP/s over the measured bf16
    ceiling, as every table beside it states it."""
    from mlmtrain.benchmarks.ablation_report import headline

    row = _ablation_row("today", 500_000.0, 0, achieved_tflops={"min": 100.0, "median": 200.0, "max": 300.0})
    (h,) = headline([row], 400.0).values()
    assert h["today"]["fraction_of_matmul_ceiling"] == pytest.approx(0.5)


def test_kernel_categories_compare_today_with_the_fastest_row_of_the_same_model():
    """The kernel-category table sets today beside the candidate the ablation picked, never the "dropout off"
    row (another model)."""
    from mlmtrain.benchmarks.ablation_report import kernel_categories_markdown

    cats = {"step_ms": 10.0, "categories": {"gemm": {"ms": 5.0, "pct": 50.0}}}
    rows = [_ablation_row(n, r, k, kernel_categories=cats) for n, r, k in
            (("today", 500_000.0, 0), ("+a", 800_000.0, 1), ("dropout off", 900_000.0, 2))]  # fmt: skip
    md = kernel_categories_markdown(rows)
    assert "fastest (+a)" in md and "dropout off" not in md
