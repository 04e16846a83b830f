"""The speed ablation's logic without a GPU: the loss-curve check against seed noise, rows that break the device,
timed windows, steps for a token target, the fastest row and the targets, the row plan, the attention bench's
layout, and the report's idle gaps."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from mlmtrain.benchmarks.bench_train import timed_windows


def test_curve_check_judges_the_candidates_validation_loss_against_the_seed_noise():
    """Candidate minus today at the same seed, mean of seeds 0 and 1, against twice today's seed-to-seed
    difference kept within 0.01-0.05 nats: one-sided (learning better passes); train loss is reported beside it,
    not judged."""
    from mlmtrain.benchmarks.ablation_report import curve_check, curves_markdown

    def row(name, losses, valid, seed=0):
        return {
            "benchmark": "curve",
            "name": name,
            "seed": seed,
            "steps": 20,
            "loss_curve": [[5 * (i + 1), loss] for i, loss in enumerate(losses)],
            "valid_loss": valid,
            "tokens_per_s": {"overall": 1.0},
            "options": {} if name.startswith("today") else {"data.layout": "rows"},
        }

    today = [row("today", [9.0, 8.0, 7.0, 6.0], 6.50), row("today, seed 1", [9.1, 8.2, 7.1, 6.1], 6.53, seed=1)]

    def candidate(valid0, valid1, shift=0.05):
        return [
            row("fastest configuration", [9.0, 8.0, 7.0 + shift, 6.0 + shift], valid0),
            row("fastest configuration, seed 1", [9.1, 8.2, 7.1 + shift, 6.1 + shift], valid1, seed=1),
        ]

    check = curve_check(today + candidate(6.52, 6.55))  # +0.02 against a band of 2 x 0.03, capped at 0.05
    assert check["within_noise"] and check["valid_difference"] == pytest.approx(0.02)
    assert check["band"] == pytest.approx(0.05) and check["options"] == {"data.layout": "rows"}
    assert check["train_loss_difference"] == pytest.approx(0.05) and check["train_loss_noise"] == pytest.approx(0.1)
    assert not curve_check(today + candidate(6.57, 6.60))["within_noise"]  # +0.07: worse than the noise
    assert curve_check(today + candidate(6.30, 6.31))["within_noise"]  # better: no regression
    quiet = [today[0], {**today[1], "valid_loss": 6.501}]  # seeds that happen to agree: the band is 0.01
    assert curve_check(quiet + candidate(6.51, 6.52))["band"] == 0.01
    assert not curve_check(quiet + candidate(6.52, 6.52))["within_noise"]
    close = [today[0], {**today[1], "valid_loss": 6.51}]  # 0.01 apart: twice that
    assert curve_check(close + candidate(6.52, 6.52))["band"] == pytest.approx(0.02)
    wide = [today[0], {**today[1], "valid_loss": 6.80}]  # a seed pair 0.30 apart passed a candidate 0.25 worse
    assert not curve_check(wide + candidate(6.75, 7.05))["within_noise"]
    assert curve_check(today + candidate(6.5, 6.5)[:1]) is None  # a curve row missing: no verdict
    md = curves_markdown(today + candidate(6.57, 6.60))
    assert "**outside** the noise" in md and "| 20 | 6.0000 | 6.1000 | 6.0500 | 6.1500 |" in md
    assert "not complete" in curves_markdown([today[0], {**today[1], "error": "skipped"}])


def test_a_row_that_breaks_the_device_leaves_the_rest_to_a_fresh_process(tmp_path, monkeypatch):
    """An illegal memory access poisons the CUDA context: the rows after it say so instead of failing one by one,
    and a fresh process (--merge) keeps the broken row as final and runs the rest."""
    from mlmtrain.benchmarks import bench_ablation
    from mlmtrain.benchmarks.bench_ablation import CRASHED, NOT_RUN, Ablation
    from mlmtrain.benchmarks.synthetic_data import make_synthetic_data

    data = make_synthetic_data(tmp_path / "data", train_tokens=3000, valid_tokens=200, log=lambda msg: None)

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_ablation, "steps_for_tokens", boom)
    monkeypatch.setattr(bench_ablation, "device_alive", lambda device: False)
    common = dict(size="tiny", tokens_per_batch=256, cap=128, target_tokens=1000)

    def bench(reuse):
        return Ablation(
            tmp_path, data, device="cpu", compile=False, log_every=1, deadline=None, reuse=reuse, command="x"
        )

    first = bench([])
    broken = first.row("ablation", "+fused kernels", {"model.fused_ops": "triton"}, **common)
    after = first.row("ablation", "+CUDA graphs", {"train.cuda_graphs": True}, **common)
    assert broken["error"].startswith(CRASHED) and "illegal memory access" in broken["error"]
    assert after["error"] == NOT_RUN
    monkeypatch.setattr(bench_ablation, "device_alive", lambda device: True)  # the fresh process's device works
    second = bench([broken, after])
    assert second.row("ablation", "+fused kernels", {"model.fused_ops": "triton"}, **common)["reused_from"]
    rerun = second.row("ablation", "+CUDA graphs", {"train.cuda_graphs": True}, **common)
    assert rerun["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"  # it ran again


def test_timed_windows_leave_out_compilation_short_windows_and_profiled_steps():
    """A rate comes from whole log windows after the first, none holding a step the profiler touched: with 31
    steps in windows of 5, the profiler's last 5 steps (27..31) reach into the window ending at 30."""

    def ends(*steps):
        return [{"step": s} for s in steps]

    windows = ends(5, 10, 15, 20, 25, 30, 31)
    assert timed_windows(windows, 31, 5, profiled=True) == ends(10, 15, 20, 25)
    assert timed_windows(windows, 31, 5, profiled=False) == ends(10, 15, 20, 25, 30)  # 31 is a short window
    assert timed_windows(ends(5, 10, 15, 20), 20, 5, profiled=True) == ends(10, 15)
    assert timed_windows(ends(3), 3, 5, profiled=False) == ends(3)  # too short to time: every window


def test_steps_for_tokens_stops_nearest_the_target(monkeypatch):
    """Rows stop at the step count whose real tokens come nearest the target (at least one step): the first step
    past it would give a layout that fills its batches less a whole extra step."""
    from types import SimpleNamespace

    from mlmtrain import packing, prepare
    from mlmtrain.benchmarks.bench_ablation import steps_for_tokens

    class Batches:  # 100 real tokens per batch, for ever
        def __init__(self, *args):
            pass

        def batches(self):
            while True:
                yield SimpleNamespace(num_real_tokens=100)

    monkeypatch.setattr(packing, "Packer", Batches)
    monkeypatch.setattr(prepare, "load_split", lambda *args: None)
    assert steps_for_tokens("data", 128, 128, {}, 1040) == 10  # 1,000 is nearer than 1,100
    assert steps_for_tokens("data", 128, 128, {}, 1060) == 11
    assert steps_for_tokens("data", 128, 128, {}, 30) == 1


def test_fastest_counts_rates_within_one_percent_as_one_speed_and_takes_the_fewest_options():
    from mlmtrain.benchmarks.bench_ablation import fastest

    def row(name, rate, n_options):
        return {"name": name, "tokens_per_s": {"overall": rate}, "options": {f"k{i}": 1 for i in range(n_options)}}

    rows = [row("today", 100.0, 0), row("+a", 120.0, 1), row("+b", 120.5, 2), row("+c", 119.0, 3)]
    assert fastest(rows)["name"] == "+a"  # +b's 0.4% is noise: its extra option is not worth a default
    assert fastest([*rows, row("+d", 125.0, 4)])["name"] == "+d"  # 4% faster: a real gain
    assert fastest([{"name": "x", "error": "refused"}, row("today", 1.0, 0)])["name"] == "today"
    assert fastest([]) is None


def test_a_target_is_judged_on_the_fastest_row_measured():
    """The candidate default (fewest options within 1%) is what the curves test; a target is met by the fastest
    row measured: 846k and 852k against 850k read "not met" when the candidate was judged."""
    from mlmtrain.benchmarks.ablation_report import headline, report_markdown

    def row(name, rate, n_options):
        options = {f"k{i}": 1 for i in range(n_options)}
        return {"benchmark": "ablation", "name": name, "size": "base", "seq_cap": 128, "pack": "sentence",
                "tokens_per_batch": 65536, "tokens_per_s": {"overall": rate}, "options": options}  # fmt: skip

    rows = [row("today", 500_000.0, 0), row("+a", 846_000.0, 1), row("+b", 852_000.0, 2)]
    (h,) = headline(rows, None).values()
    assert h["fastest"]["name"] == "+b" and h["candidate"]["name"] == "+a"
    (line,) = [x for x in report_markdown(rows, None).splitlines() if x.startswith("| base, seq 128")]
    assert "852 ktok/s: +b | met |" in line and line.endswith("| +a |")


def test_ablation_plan_builds_each_row_on_the_right_one_and_tries_fp8_on_the_large_model(tmp_path, monkeypatch):
    """The rows `run` asks for, from made-up speeds: the fp8 rows are siblings on the last chained row, async log
    reads build on the fastest of those, the autotune rows on the faster of the kernel row and the row before it
    (with torch ops only where that row has the Triton kernels), dropout off on the fastest of those, and the
    large model gets the fastest fp8 row's options on its fastest configuration (here the flat layout, which is
    faster at 512 tokens)."""
    from mlmtrain.benchmarks import bench_ablation

    speed = {"today": 100, "+row attention": 130, "+bf16 residual": 135, "+fused kernels": 140, "+CUDA graphs": 141,
             "+fp8 tensorwise": 120, "+fp8 rowwise": 110, "+fp8 tensorwise, torch ops": 150,
             "+fp8 rowwise, bf16 weight grads, torch ops": 145, "+async log reads": 152,
             "+packer process": 153, "+segment attention kernel": 155, "+autotune": 154, "dropout off": 160,
             "+autotune, torch ops": 150,
             "fastest base configuration": 50, "fastest, flat layout": 60, "fastest, fp8": 70}  # fmt: skip

    def fake_row(self, benchmark, name, options, **kw):
        if benchmark == "target" and name == "today":
            return {"benchmark": benchmark, "name": name, "options": options, "error": "skipped"}
        return {"benchmark": benchmark, "name": name, "options": options, "tokens_per_s": {"overall": speed[name]}}

    def bare_init(self, *args, **kwargs):  # no data, no evaluator: the plan only
        self.done, self.on_row = [], lambda rows: None

    monkeypatch.setattr(bench_ablation.Ablation, "__init__", bare_init)
    monkeypatch.setattr(bench_ablation.Ablation, "_row", fake_row)
    common = dict(size="base", tokens_per_batch=1, target_tokens=1, device="cpu", compile=False, log_every=1)
    large = dict(large_size="large", large_tokens_per_batch=1, large_target_tokens=1)
    rows = {(r["benchmark"], r["name"]): r["options"] for r in bench_ablation.run(tmp_path, None, **common, **large)}
    assert {name for _, name in rows} <= set(bench_ablation.ROW_NAMES)  # what --remeasure accepts
    chained = {"data.layout": "rows", "model.residual_dtype": "compute", "model.fused_ops": "triton",
               "train.cuda_graphs": True}  # fmt: skip
    assert rows[("ablation", "+fp8 rowwise")] == {**chained, "train.fp8": "rowwise"}
    fp8_torch = {**chained, "model.fused_ops": "torch", "train.fp8": "tensorwise"}
    assert rows[("ablation", "+fp8 tensorwise, torch ops")] == fp8_torch
    gw_hp = {**chained, "model.fused_ops": "torch", "train.fp8": "rowwise_with_gw_hp"}
    assert rows[("ablation", "+fp8 rowwise, bf16 weight grads, torch ops")] == gw_hp
    assert rows[("ablation", "+async log reads")] == {**fp8_torch, "train.async_log_reads": True}
    host = {"train.async_log_reads": True, "data.packer": "process"}
    assert rows[("ablation", "+packer process")] == {**fp8_torch, **host}
    kernel = {**fp8_torch, **host, "model.attention": "triton"}
    assert rows[("ablation", "+segment attention kernel")] == kernel
    assert rows[("ablation", "+autotune")] == {**kernel, "train.autotune": True}
    assert ("ablation", "+autotune, torch ops") not in rows  # the fp8 torch-ops row won: torch ops already
    assert rows[("ablation", "dropout off")] == {**kernel, "model.dropout": 0.0}  # autotune within 1%: noise
    best = {**fp8_torch, **host}  # the kernel holds rows of <= 128 tokens: not at 512
    assert rows[("target", "fastest base configuration")] == best
    assert ("target", "fastest, fp8") not in rows  # the fastest configuration has fp8 already

    speed["+fp8 tensorwise, torch ops"] = 90  # now fp8 is slower on the base model: the large one still tries it
    speed["+fp8 rowwise, bf16 weight grads, torch ops"] = 95  # (its fastest fp8 row: tensorwise's 120)
    speed["+segment attention kernel"] = 140  # and the kernel slower than FlexAttention: autotune builds on flex
    speed["+autotune"] = speed["+autotune, torch ops"] = 150  # autotuning slower: dropout off too
    rows = {(r["benchmark"], r["name"]): r["options"] for r in bench_ablation.run(tmp_path, None, **common, **large)}
    assert rows[("ablation", "+autotune")] == {**chained, **host, "train.autotune": True}
    tuned_torch = {**chained, **host, "train.autotune": True, "model.fused_ops": "torch"}
    assert rows[("ablation", "+autotune, torch ops")] == tuned_torch  # the row has the Triton kernels
    assert rows[("ablation", "dropout off")] == {**chained, **host, "model.dropout": 0.0}
    # the packer process's 153 is within 1% of async reads' 152: noise, so the fastest configuration leaves it out
    flat = {k: v for k, v in chained.items() if k != "data.layout"} | {"train.async_log_reads": True}
    assert rows[("target", "fastest, flat layout")] == flat
    assert rows[("target", "fastest, fp8")] == {**flat, "train.fp8": "tensorwise", "model.fused_ops": "triton"}

    speed["+autotune, torch ops"] = 158  # autotuned with torch ops the fastest: dropout off builds on it
    rows = {(r["benchmark"], r["name"]): r["options"] for r in bench_ablation.run(tmp_path, None, **common, **large)}
    assert rows[("ablation", "dropout off")] == {**tuned_torch, "model.dropout": 0.0}
    assert rows[("target", "fastest base configuration")] == tuned_torch


@pytest.mark.parametrize("documents", [False, True])
def test_attention_bench_lays_rows_as_the_packer_does_and_times_each_variant(tmp_path, monkeypatch, documents):
    """bench_attention --quick on the CPU: the segment kernel (interpreted) and the SDPA reference timed, each
    with its error against the fp32 reference; its rows are whole segments (sentences, or document chunks of at
    most a row) with a [PAD] tail each, the flat cu_seqlens the same segments and then empty ones up to the flat
    packer's capacity, and they fill the rows. A variant that fails says why in its row; the others still run."""
    import numpy as np
    import torch

    from mlmtrain.benchmarks import bench_attention

    row_len = 512 if documents else 128
    segment_ids, cu_seqlens, fill = bench_attention.row_segments(8, row_len, documents=documents)
    flat = segment_ids.flatten()
    assert fill > 0.95 and cu_seqlens[0] == 0 and cu_seqlens[-1] == flat.numel()
    lengths = torch.diff(cu_seqlens)
    S = int(flat.max()) + 1
    assert torch.equal(torch.bincount(flat.long()), lengths[:S].long())  # segment i spans cu_seqlens[i]..[i+1]
    assert (lengths[S:] == 0).all() and len(lengths) > S  # the capacity's empty segments
    assert (torch.diff(flat) >= 0).all() and torch.equal(flat[cu_seqlens[:S].long()], torch.arange(S))
    chunks = bench_attention.document_lengths(np.random.default_rng(0), 20_000, 512)
    assert chunks.max() <= 512 and chunks.min() >= 3 and chunks.sum() >= 22_000  # [CLS] s [SEP] at the least

    def broken(qkv, seg, cu, L):
        raise RuntimeError("no kernel for this shape\nsecond line")

    variants = bench_attention.variants
    monkeypatch.setattr(bench_attention, "variants", lambda *a: {**variants(*a), "broken": broken})
    out = tmp_path / "attention.json"
    argv = ["--quick", "--device", "cpu", "--out", str(out)] + (
        ["--documents", "--row-len", "512"] if documents else []
    )
    assert bench_attention.main(argv) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    from conftest import CPU_RUNS_TRITON

    kernel = {"segment kernel"} if CPU_RUNS_TRITON and not documents else set()  # rows of <= 128 tokens
    assert set(rows) == {"sdpa, dense mask", "broken"} | kernel
    assert rows["broken"]["error"] == "RuntimeError: no kernel for this shape"
    timed = [r for name, r in rows.items() if name != "broken"]
    assert all(r["forward_backward_s"]["median"] > 0 and r["documents"] is documents for r in timed)
    assert rows["sdpa, dense mask"]["max_abs_error"] == {"out": 0.0, "dqkv": 0.0}  # fp32 on the CPU: the reference
    assert all(r["max_abs_error"]["out"] < 1e-4 and r["max_abs_error"]["dqkv"] < 1e-4 for r in timed)


def test_the_attention_bench_builds_a_batchs_mask_once_as_the_model_does(monkeypatch):
    """The model builds a batch's dense mask (and FlexAttention's block tables) once per forward for all its
    layers: the per-layer bench times the attention alone, not that setup at every call."""
    import torch

    from mlmtrain import attention
    from mlmtrain.benchmarks import bench_attention

    built, real = [], attention.row_mask
    monkeypatch.setattr(attention, "row_mask", lambda seg: built.append(seg) or real(seg))
    attend = bench_attention.variants(torch.device("cpu"), False, 8, 4)["sdpa, dense mask"]
    seg, qkv = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]]), torch.randn(8, 3, 1, 4)
    outs = [attend(qkv, seg, None, 8) for _ in range(3)]
    assert len(built) == 1 and all(torch.equal(o, outs[0]) for o in outs)
    attend(qkv, torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]]), None, 8)  # another batch: its own mask
    assert len(built) == 2


def test_the_attention_bench_builds_a_batchs_flex_block_tables_once_as_the_model_does(monkeypatch):
    """FlexAttention's variant (CUDA only: here a stand-in flex_row_attention on a device named cuda, nothing run
    on it) gets the block tables of a batch built once, whatever number of calls times it; a new batch, its own."""
    import torch

    from mlmtrain import attention, kernels
    from mlmtrain.benchmarks import bench_attention

    built, real = [], attention.row_block_tables
    monkeypatch.setattr(attention, "row_block_tables", lambda seg: built.append(seg) or real(seg))
    monkeypatch.setattr(attention, "flex_row_attention", lambda q, k, v, seg, tables: (q, tables))
    monkeypatch.setattr(kernels, "triton_runs_on", lambda device: False)
    attend = bench_attention.variants(torch.device("cuda"), False, 8, 4)["flex"]
    seg, qkv = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]]), torch.randn(8, 3, 1, 4)
    tables = [attend(qkv, seg, None, 8)[1] for _ in range(3)]
    assert len(built) == 1 and all(t is tables[0] for t in tables)
    attend(qkv, torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2]]), None, 8)
    assert len(built) == 2


def test_the_report_lists_the_idle_gaps_of_the_traced_steps():
    """A device trace's idle gaps (categories.json "idle_gaps") go under the kernel-category table, by cause."""
    from mlmtrain.benchmarks.ablation_report import kernel_categories_markdown

    gaps = {"min_gap_us": 50.0, "ms": 5.5, "count": 12.0, "host": {"step_ms": 90.0, "waiting_ms": 70.0}, "top": [
        {"kind": "host late", "phase": "data", "op": "aten::copy_", "call": "cudaMemcpyAsync", "waited_in": None,
         "ms": 3.25, "count": 1.0},
    ]}  # fmt: skip
    categories = {"step_ms": 91.4, "categories": {"gemm": {"ms": 47.8, "pct": 52.3}}, "idle_gaps": gaps}
    rows = [
        {"benchmark": "ablation", "name": name, "tokens_per_s": {"overall": speed}, "kernel_categories": categories}
        for name, speed in (("today", 5e5), ("+CUDA graphs", 7e5))
    ]
    md = kernel_categories_markdown(rows)
    assert "Idle gaps of >= 50 us, fastest (+CUDA graphs): 5.50 ms per step in 12.0 gaps" in md
    assert "- 3.25 ms (1.0 per step): host late in data, cudaMemcpyAsync from aten::copy_" in md
    assert "the loop's thread: 90.00 ms per step, 70.00 ms of it in long runtime calls" in md


def _cheap_ablation(monkeypatch, tmp_path, **kwargs):
    """An Ablation with no data and no evaluator: rows that run fail at once (steps_for_tokens patched by the test)."""
    from mlmtrain.benchmarks import bench_ablation, recipe

    monkeypatch.setattr(recipe, "valid_batches", lambda *args, **kw: [])
    data = SimpleNamespace(data_dirs={128: tmp_path}, tokenizer_dir=tmp_path, valid_lines=[], vocab_size=100)
    args = dict(device="cpu", compile=False, log_every=1, deadline=None, reuse=[], command="x") | kwargs
    return bench_ablation.Ablation(tmp_path, data, **args)


COMMON = dict(size="tiny", tokens_per_batch=256, cap=128, target_tokens=1000)


def _measured_row(name, options):
    return {"benchmark": "ablation", "name": name, "size": "tiny", "tokens_per_batch": 256, "seq_cap": 128,
            "options": options, "seed": 0, "target_tokens": 1000, "log_every": 1,
            "tokens_per_s": {"overall": 1.0}}  # fmt: skip


def test_steps_for_tokens_packs_as_the_rows_trainer_will(monkeypatch):
    """A row's step count comes from the packer its trainer will run: sentence packing at seq 128 (document
    packing only above it), and the RowPacker when the row's options set data.layout = rows; another packer
    fills its batches otherwise, and the rows would stop at different real tokens."""
    from mlmtrain import packing, prepare
    from mlmtrain.benchmarks.bench_ablation import steps_for_tokens

    seen = []

    def fake(kind):
        class Batches:
            def __init__(self, split, tokens_per_batch, cap, seed, pack):
                seen.append((kind, cap, pack))

            def batches(self):
                while True:
                    yield SimpleNamespace(num_real_tokens=100)

        return Batches

    monkeypatch.setattr(packing, "Packer", fake("flat"))
    monkeypatch.setattr(packing, "RowPacker", fake("rows"))
    monkeypatch.setattr(prepare, "load_split", lambda *args: None)
    steps_for_tokens("data", 128, 128, {}, 1000)
    steps_for_tokens("data", 512, 512, {}, 1000)
    steps_for_tokens("data", 128, 128, {"data.layout": "rows"}, 1000)
    assert seen == [("flat", 128, "sentence"), ("flat", 512, "document"), ("rows", 128, "sentence")]


def test_merge_reuses_a_row_only_with_the_same_options(tmp_path, monkeypatch):
    """--merge copies an earlier row only where everything that sets its speed is the same, its options too: a
    row whose base changed since (a row before it remeasured, another one now the fastest) is measured again."""
    from mlmtrain.benchmarks import bench_ablation

    def measured(*args, **kwargs):
        raise RuntimeError("measured now")

    monkeypatch.setattr(bench_ablation, "steps_for_tokens", measured)
    earlier = _measured_row("+async log reads", {"train.async_log_reads": True})
    bench = _cheap_ablation(monkeypatch, tmp_path, reuse=[earlier])
    assert bench.row("ablation", "+async log reads", {"train.async_log_reads": True}, **COMMON)["reused_from"]
    moved = bench.row("ablation", "+async log reads", {"data.layout": "rows", "train.async_log_reads": True}, **COMMON)
    assert "reused_from" not in moved and moved["error"] == "RuntimeError: measured now"


def test_skip_keeps_a_row_an_earlier_call_measured(tmp_path, monkeypatch):
    """--skip leaves a row to a later call; a row an earlier call already measured is kept as measured, not
    replaced by a "skipped" line (the merged report would lose a GPU measurement)."""
    from mlmtrain.benchmarks.bench_ablation import SKIPPED_BY_FLAG

    earlier = _measured_row("dropout off", {"model.dropout": 0.0})
    bench = _cheap_ablation(monkeypatch, tmp_path, reuse=[earlier], skip={"dropout off"})
    kept = bench.row("ablation", "dropout off", {"model.dropout": 0.0}, **COMMON)
    assert kept["reused_from"] and kept["tokens_per_s"] == {"overall": 1.0}
    assert bench.row("ablation", "dropout off", {"model.dropout": 0.1}, **COMMON)["error"] == SKIPPED_BY_FLAG


def test_a_row_is_skipped_when_the_longest_row_so_far_would_end_past_the_deadline(tmp_path, monkeypatch):
    """A row starts only if the longest row so far would still end before --time-limit's deadline: a short row
    after a long one does not make the next look short, a row is not started just because time is left, and the
    first autotuning row expects its compile's minutes."""
    from mlmtrain.benchmarks import bench_ablation
    from mlmtrain.benchmarks.bench_ablation import SKIPPED

    ran = []

    def long_then_short(*args, **kwargs):
        time.sleep(1.0 if not ran else 0.0)
        ran.append(1)
        raise RuntimeError("refused")

    monkeypatch.setattr(bench_ablation, "steps_for_tokens", long_then_short)
    bench = _cheap_ablation(monkeypatch, tmp_path)
    bench.row("ablation", "today", {}, **COMMON)  # 1 s
    bench.row("ablation", "+row attention", {"data.layout": "rows"}, **COMMON)  # ~0 s
    bench.deadline = time.monotonic() + 0.5  # time left, but less than the longest row took
    row = bench.row("ablation", "+bf16 residual", {"model.residual_dtype": "compute"}, **COMMON)
    assert row["error"] == SKIPPED and len(ran) == 2
    # the first autotuning row expects at least AUTOTUNE_ROW_S (its compile), however short the rows before it were;
    # after it, the longest row so far (its own time) stands for the next
    bench.deadline = time.monotonic() + bench_ablation.AUTOTUNE_ROW_S - 5
    assert bench.row("ablation", "+bf16 residual", {"model.residual_dtype": "compute"}, **COMMON)["error"] != SKIPPED
    row = bench.row("ablation", "+autotune", {"train.autotune": True}, **COMMON)
    assert row["error"] == SKIPPED and len(ran) == 3
    bench.deadline = time.monotonic() + bench_ablation.AUTOTUNE_ROW_S + 5
    assert bench.row("ablation", "+autotune", {"train.autotune": True}, **COMMON)["error"] != SKIPPED
    bench.deadline = time.monotonic() + 2.0  # more than the longest row (1 s): a second autotuning row starts
    row = bench.row("ablation", "+autotune, torch ops", {"train.autotune": True, "model.fused_ops": "torch"}, **COMMON)
    assert row["error"] != SKIPPED and len(ran) == 5


def _plan(monkeypatch, tmp_path, speed, errors=(), curve_target_tokens=0):
    """bench_ablation.run with made-up rows: {(benchmark, name): options} in the order asked."""
    from mlmtrain.benchmarks import bench_ablation

    def fake_row(self, benchmark, name, options, **kw):
        if (benchmark, name) in errors or name in errors:
            return {"benchmark": benchmark, "name": name, "options": options, "error": "refused"}
        rate = speed.get((benchmark, name), speed.get(name, 1))
        return {"benchmark": benchmark, "name": name, "options": options, "tokens_per_s": {"overall": rate}}

    def bare_init(self, *args, **kwargs):
        self.done, self.on_row = [], lambda rows: None

    monkeypatch.setattr(bench_ablation.Ablation, "__init__", bare_init)
    monkeypatch.setattr(bench_ablation.Ablation, "_row", fake_row)
    common = dict(size="base", tokens_per_batch=1, target_tokens=1, device="cpu", compile=False, log_every=1)
    large = dict(large_size="large", large_tokens_per_batch=1, large_target_tokens=1)
    rows = bench_ablation.run(tmp_path, None, **common, **large, curve_target_tokens=curve_target_tokens)
    return {(r["benchmark"], r["name"]): r["options"] for r in rows}


def test_a_refused_row_is_not_built_on_and_slower_fp8_rows_are_not_picked(tmp_path, monkeypatch):
    """A chained row that cannot run (CUDA graphs refused) adds nothing to the rows after it: the fp8 rows build
    on the last row that ran, and when every fp8 row is slower than that row, the host-side rows build on it,
    not on the fastest fp8 row."""
    speed = {"today": 100, "+row attention": 130, "+bf16 residual": 135, "+fused kernels": 140,
             "+fp8 tensorwise": 120, "+fp8 rowwise": 110, "+fp8 tensorwise, torch ops": 125,
             "+fp8 rowwise, bf16 weight grads, torch ops": 115}  # fmt: skip
    rows = _plan(monkeypatch, tmp_path, speed, errors={"+CUDA graphs"})
    fused = {"data.layout": "rows", "model.residual_dtype": "compute", "model.fused_ops": "triton"}
    assert rows[("ablation", "+CUDA graphs")] == {**fused, "train.cuda_graphs": True}
    assert rows[("ablation", "+fp8 tensorwise")] == {**fused, "train.fp8": "tensorwise"}
    assert rows[("ablation", "+async log reads")] == {**fused, "train.async_log_reads": True}


def test_the_large_models_fp8_row_builds_on_the_fastest_candidate_not_on_todays_defaults(tmp_path, monkeypatch):
    """At seq 512 the fp8 row adds the fastest fp8 row's options to the fastest candidate configuration (the
    fastest base configuration, or it on the flat layout), even where today's defaults ran faster there."""
    speed = {"today": 100, "+row attention": 130, "+bf16 residual": 135, "+fp8 tensorwise": 90, ("target", "today"): 80,
             "fastest base configuration": 50, "fastest, flat layout": 60}  # fmt: skip
    rows = _plan(monkeypatch, tmp_path, speed)
    flat = {k: v for k, v in rows[("target", "fastest base configuration")].items() if k != "data.layout"}
    assert rows[("target", "fastest, flat layout")] == flat
    assert rows[("target", "fastest, fp8")] == {**flat, "train.fp8": "tensorwise", "model.fused_ops": "triton"}


def test_no_loss_curves_when_todays_defaults_are_the_fastest(tmp_path, monkeypatch):
    """The curves compare a candidate default with today's: when today's defaults are the fastest there is no
    candidate, and the ~200-step curves (minutes of GPU time) are not run."""
    speed = {"today": 1000}  # every other row at 1 tok/s
    rows = _plan(monkeypatch, tmp_path, speed, curve_target_tokens=100)
    assert not [key for key in rows if key[0] == "curve"]


def test_fastest_of_equally_few_options_within_one_percent_is_the_faster():
    """Among rows within 1% of the top with the same number of options, the faster one is the candidate."""
    from mlmtrain.benchmarks.bench_ablation import fastest

    rows = [{"name": n, "tokens_per_s": {"overall": r}, "options": {n: 1}} for n, r in (("+a", 120.0), ("+b", 120.5))]
    assert fastest(rows)["name"] == "+b"


def test_dropout_off_builds_on_the_faster_of_the_kernel_row_and_the_row_it_was_built_on(tmp_path, monkeypatch):
    """With "+packer process" refused, the segment kernel row builds on "+async log reads"; "dropout off" then
    builds on the faster of those two, not on a slower kernel row."""
    speed = {"today": 100, "+row attention": 130, "+async log reads": 152, "+segment attention kernel": 140}
    rows = _plan(monkeypatch, tmp_path, speed, errors={"+packer process"})
    assert "model.attention" not in rows[("ablation", "dropout off")]


def test_an_unfinished_ablation_does_not_say_why_curves_were_skipped_by_plan():
    """A killed or stopped section has no curve rows because it did not get there, not because no configuration was
    faster than today's (what a finished one without them means); its targets judge the rows it has."""
    from mlmtrain.benchmarks.ablation_report import curves_markdown, report_markdown

    assert curves_markdown([], finished=False) == "Loss curves: not reached (the section did not finish)."
    assert curves_markdown([]).startswith("Loss curves: not run (they need a measured configuration faster")
    assert "The section did not finish (see Not measured)" in report_markdown([], None, finished=False)
    assert "Loss curves: not reached (the section did not finish)." in report_markdown([], None, finished=False)
    assert "did not finish" not in report_markdown([], None)


def test_a_cpu_rows_profile_is_labelled_host_time_not_device_time():
    """On a CPU the trace has no device timeline: the phases and categories are host operator time, and no device
    waited for the host. The report called them device time and printed 0.0 ms of the host running ahead."""
    from mlmtrain.benchmarks.ablation_report import host_ahead_markdown, kernel_categories_markdown
    from mlmtrain.benchmarks.report import profile_text

    def row(timeline):
        cats = {"timeline": timeline, "step_ms": 10.0, "categories": {"gemm": {"ms": 5.0, "pct": 50.0}}}
        return {"benchmark": "ablation", "name": "today", "tokens_per_s": {"overall": 1.0}, "kernel_categories": cats,
                "device_wait_ms_per_step": {"median": 0.0}, "phase_ms": {"forward": 1.0}}  # fmt: skip

    cpu, gpu = row("host"), row("device")
    assert host_ahead_markdown([cpu]) == "Host ahead of the device: no device (the host runs the step itself)."
    assert host_ahead_markdown([gpu]).startswith("Host ahead of the device (ms per step it waited")
    assert "(host operator self time: no device in the trace)" in kernel_categories_markdown([cpu])
    assert "(device time)" in kernel_categories_markdown([gpu])
    assert profile_text(cpu, {}).startswith("Step profile (host ms per step")
    assert profile_text(gpu, {}).startswith("Step profile (device ms per step")


def test_a_fused_kernels_row_that_timed_the_references_says_so(tmp_path, monkeypatch):
    """On a machine where Triton cannot run, "+fused kernels" times the torch references (the train log says so);
    the row and its options cell say it too, rather than read as a timing of the kernels."""
    from mlmtrain import fast_paths
    from mlmtrain.benchmarks import bench_ablation
    from mlmtrain.benchmarks.ablation_report import _options
    from mlmtrain.benchmarks.synthetic_data import make_synthetic_data

    data = make_synthetic_data(tmp_path / "data", train_tokens=3000, valid_tokens=200, log=lambda msg: None)
    monkeypatch.setattr(fast_paths, "triton_problem", lambda device: "the Triton interpreter is off")
    monkeypatch.setattr(bench_ablation, "steps_for_tokens", lambda *a, **k: 2)
    monkeypatch.setattr(bench_ablation, "mlm_eval", lambda *a, **k: {}, raising=False)
    bench = bench_ablation.Ablation(tmp_path, data, device="cpu", compile=False, log_every=1, deadline=None, reuse=[],
                                    command="x")  # fmt: skip
    row = bench.row("ablation", "+fused kernels", {"model.fused_ops": "triton"}, size="tiny", tokens_per_batch=256,
                    cap=128, target_tokens=500)  # fmt: skip
    note = "model.fused_ops = triton: the kernels cannot run on cpu (the Triton interpreter is off); their torch"
    assert row.get("note", "").startswith(note), row.get("error")
    assert _options(row) == f"model.fused_ops=triton ({row['note']})"
