"""`mlmtrain bench --quick` on the CPU: one run (module-scoped, ~60-90 s on 2 cores) whose results.json is
checked against the schema the report promises, plus fast checks of argument errors, the time budget and
the report's handling of failed sections."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import signal
import time
import warnings

import pytest
from test_ablation_report import _ablation_row

from mlmtrain.benchmarks import charts, report
from mlmtrain.benchmarks.bench_train import steps_for, sweep_points
from mlmtrain.benchmarks.common import OUT_OF_TIME
from mlmtrain.benchmarks.suite import PLANS
from mlmtrain.cli import main

SECTIONS = ["ceilings", "mask", "model", "train", "sweep"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "--out", str(out), "--quick", "--device", "cpu", "--quiet"])
    QUICK_OUTPUT.update(stdout=stdout.getvalue(), stderr=stderr.getvalue())
    return out, rc, json.loads((out / "results.json").read_text(encoding="utf-8"))


QUICK_OUTPUT = {}  # what the quick run printed on stdout


def test_a_quiet_bench_prints_no_trainer_dict_and_draws_no_empty_legend(quick, tmp_path):
    """The HF Trainer baseline printed its metrics dict ({'train_runtime': ...}) on stdout under --quiet, and the
    TFLOP/s chart of a report without ceilings and peak (`--sections train` on a CPU) asked matplotlib for a legend
    of nothing, which warned."""
    assert "train_runtime" not in QUICK_OUTPUT["stdout"], QUICK_OUTPUT["stdout"][-500:]
    assert QUICK_OUTPUT["stdout"] == "", QUICK_OUTPUT["stdout"][:500]  # every line on stderr: stdout stays clean
    said = QUICK_OUTPUT["stderr"]  # --quiet: no progress lines, the result still
    assert "mlmtrain bench: section" not in said and "mlmtrain bench: wrote " in said, said[-800:]
    _, _, results = quick
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert charts.chart_tflops(results, tmp_path / "tflops.png", {}, None)


def spreads(obj):
    """Every {"min", "median", "max"} dict anywhere in obj."""
    if isinstance(obj, dict):
        if {"min", "median", "max"} <= obj.keys():
            yield obj
        for v in obj.values():
            yield from spreads(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from spreads(v)


def test_results_json_schema(quick):
    out, rc, res = quick
    assert res["schema"] == report.SCHEMA
    assert res["quick"] is True and res["device"] == "cpu"
    assert res["command"].startswith("mlmtrain bench") and "--quick" in res["command"]
    env = res["environment"]
    for key in ("torch", "triton", "transformers"):
        assert key in env["versions"], key
    assert env["device"] and env["date"] and env["source"]["mlmtrain"] and "cuda" in env["versions"]
    assert f"- source: mlmtrain {env['source']['mlmtrain']}, commit " in (out / "report.md").read_text()
    assert [s["section"] for s in res["sections"]] == SECTIONS
    for s in res["sections"]:
        assert ("rows" in s) != ("error" in s), s["section"]  # measured, or says why not: never silent
        assert s["wall_s"] >= 0
        for row in s.get("rows", []):
            assert row["section"] == s["section"] and row["command"], row.get("name")
            assert row.get("name") and (row.get("error") or row.get("benchmark"))
            assert "commit" in row and row["commit"] == env["source"]["commit"], row.get("name")  # measured now
    for d in spreads(res["sections"]):
        assert d["min"] <= d["median"] <= d["max"], d
    assert rc == (1 if any("error" in s for s in res["sections"]) else 0)
    assert "headline" in res and "ceilings" in res["headline"]


def test_ceilings_and_training_rows(quick):
    _, _, res = quick
    ceil = report.ceilings(res)
    assert ceil["matmul_bfloat16"] > 0 and ceil["matmul_float32"] > 0 and ceil["copy"] > 0
    train = report.rows_of(res, "train")
    ours = next(r for r in train if r.get("trainer") == "ours")
    assert ours["tokens_per_s"]["median"] > 0 and ours["achieved_tflops"]["median"] > 0
    assert math.isfinite(ours["valid_loss"]) and ours["valid_targets"] > 0
    recipe = next((r for r in train if r.get("trainer") == "recipe"), None)
    if recipe is not None:  # the recipe ran: same tokens (within one sentence), same optimizer steps
        assert abs(recipe["real_tokens"] - ours["real_tokens"]) <= 128, (recipe["real_tokens"], ours["real_tokens"])
        assert recipe["steps"] == ours["steps"]
        assert recipe["tokens_per_s"]["median"] > 0 and math.isfinite(recipe["valid_loss"])
        assert recipe["valid_targets"] == ours["valid_targets"]  # the very same masked validation tokens
    assert ours["vocab_size"] == PLANS["quick"]["data_vocab"] and ours["data"] == "synthetic"
    continuity = next(r for r in train if r.get("data") == "sample")
    assert (
        continuity["trainer"] == "ours"
        and continuity["vocab_size"] < 30000
        and continuity["tokens_per_s"]["median"] > 0
    )
    sweep = [r for r in report.rows_of(res, "sweep")]
    assert {(r["tokens_per_batch"], r["seq_cap"]) for r in sweep} == {(512, 128), (1024, 128), (512, 512), (1024, 512)}
    assert {r["pack"] for r in sweep if r["seq_cap"] == 512} == {"document"}


def test_report_files(quick):
    out, _, res = quick
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# mlmtrain benchmark report")
    for needle in ("torch ", "triton ", "transformers ", res["environment"]["device"], "median (min–max)"):
        assert needle in md, needle
    for s in res["sections"]:
        if "error" in s:
            assert s["error"] in md  # failures are shown, not dropped
    charts = [line.split("(")[-1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert report.CHARTS["throughput"] in charts and report.CHARTS["tflops"] in charts
    for name in charts:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name


def test_quick_run_has_no_errors_once_all_modules_exist(quick):
    missing = [
        m
        for m in ("mlmtrain.benchmarks.bench_mlm_mask", "mlmtrain.benchmarks.bench_model", "accelerate")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.skip(f"not installed yet: {', '.join(missing)}")
    _, rc, res = quick
    errors = {s["section"]: s["error"] for s in res["sections"] if "error" in s}
    errors.update({r["name"]: r["error"] for s in res["sections"] for r in s.get("rows", []) if "error" in r})
    assert not errors, errors
    assert rc == 0


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--sections", "ceilings,warp"]) == 2
    err = capsys.readouterr().err
    assert "unknown section(s) warp" in err and "Traceback" not in err
    assert main(["bench", "--out", str(tmp_path), "--device", "cpu", "--sweep-tokens", "16k"]) == 2
    assert "--sweep-tokens takes positive integers" in capsys.readouterr().err
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert main(["bench", "--out", str(afile), "--device", "cpu"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", "--out", str(tmp_path), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_out_must_be_a_report_folder(tmp_path):
    """bench rewrites results.json, report.md and its charts in --out: never a user's files of those names,
    never a folder holding other files; the GPU scripts' logs written just before it are its own."""
    from mlmtrain.benchmarks.report import SCHEMA, claim_out_folder
    from mlmtrain.errors import UserError
    from mlmtrain.files import read_marker

    user = tmp_path / "user"
    user.mkdir()
    (user / "report.md").write_text("# my report")
    (user / "results.json").write_text('{"mine": 1}')
    with pytest.raises(UserError, match="is not empty and was not made by `mlmtrain bench`"):
        claim_out_folder(user)
    (user / "results.json").unlink()
    with pytest.raises(UserError, match="was not made by"):
        claim_out_folder(user)  # a report.md with no results.json of ours beside it
    assert sorted(p.name for p in user.iterdir()) == ["report.md"] and (user / "report.md").read_text() == "# my report"

    script = tmp_path / "script"  # a user's files under the scripts' names: the scripts claim before they write
    script.mkdir()
    (script / "gpu.txt").write_text("NVIDIA H200")
    (script / "bench.log").write_text("my notes")
    with pytest.raises(UserError, match="was not made by"):
        claim_out_folder(script)
    assert (script / "bench.log").read_text() == "my notes" and read_marker(script) is None
    (script / "bench.log").unlink(), (script / "gpu.txt").unlink()
    claim_out_folder(script)
    assert read_marker(script)["kind"] == "bench"
    (script / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"does not write \(notes.txt\)"):
        claim_out_folder(script)

    older = tmp_path / "older"  # a report from before markers
    older.mkdir()
    (older / "results.json").write_text(json.dumps({"schema": SCHEMA, "sections": []}))
    (older / "report.md").write_text("# mlmtrain benchmark report")
    claim_out_folder(older)
    assert read_marker(older)["kind"] == "bench"


def test_time_limit_skips_and_says_so(tmp_path, monkeypatch):
    """The first section outlasts a 0.5 s budget, so the second is skipped and said to be. The first is
    made to last at least 0.6 s: on an idle box the quick ceilings can finish inside 0.5 s, which made
    this test depend on the machine's load."""

    from mlmtrain.benchmarks.suite import Bench

    real_ceilings = Bench.ceilings

    def slow_ceilings(self):
        rows = real_ceilings(self)
        time.sleep(0.6)
        return rows

    monkeypatch.setattr(Bench, "ceilings", slow_ceilings)
    rc = main(
        [
            "bench",
            "--out",
            str(tmp_path),
            "--quick",
            "--device",
            "cpu",
            "--sections",
            "ceilings,model",
            "--time-limit",
            "0.5",
        ]
    )
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert rc == 1
    assert "rows" in res["sections"][0]
    assert res["sections"][1]["error"].startswith("skipped: the time budget")
    assert "skipped: the time budget" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_a_stopped_bench_names_what_it_left_out(tmp_path, monkeypatch, capsys):
    """SIGTERM or Ctrl-C during a section: the report written so far must not look complete. The stopped section
    and those after it are named as not measured, with the signal; the command exits as for the signal."""
    from mlmtrain.benchmarks.suite import Bench
    from mlmtrain.cli import Terminated

    def stopped(self):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(Bench, "model", stopped)
    argv = ["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ceilings,model,mask"]
    assert main(argv) == 143
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [s["section"] for s in res["sections"]] == ["ceilings", "model", "mask"] and "error" not in res["sections"][
        0
    ]
    why = "not measured: the bench was stopped by SIGTERM"
    assert res["sections"][1]["error"] == res["sections"][2]["error"] == why
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert f"- **model**: {why}" in report and f"- **mask**: {why}" in report
    assert "## Hardware ceilings" in report and "## Model forward" not in report  # the model section has no row


def test_a_signal_during_a_bench_training_run_stops_the_bench(tmp_path, monkeypatch):
    """train takes SIGTERM itself (finish the step, save, return): the bench kept the cut-short run as a measured
    row, went on, and exited 0. Now the run's stop is the bench's: the section is not measured, exit 143."""
    import mlmtrain.train as train_module

    real = train_module.train

    def stopped(cfg, **kw):
        summary = real(cfg, **kw)
        return {**summary, "stopped_by": "SIGTERM"}

    monkeypatch.setattr(train_module, "train", stopped)
    argv = ["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "train,mask"]
    assert main(argv) == 143
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    why = "not measured: the bench was stopped by SIGTERM"
    assert [(s["section"], s.get("error")) for s in res["sections"]] == [("train", why), ("mask", why)]


def test_a_stopped_sections_finished_rows_stay_in_the_report(tmp_path, monkeypatch):
    """A stop in the middle of a section that reports rows as they finish (the ablation): those rows stay, in
    results.json (a --merge reuses them) and in report.md, beside the section's `not measured` line."""
    from mlmtrain.benchmarks.suite import Bench

    real_ceilings = Bench.ceilings

    def ceilings_then_stop(self):
        self.progress("ceilings", real_ceilings(self))
        raise KeyboardInterrupt

    monkeypatch.setattr(Bench, "ceilings", ceilings_then_stop)
    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ceilings"]) == 130
    (section,) = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["sections"]
    assert section["error"] == "not measured: the bench was stopped by SIGINT" and section["rows"]
    assert "## Hardware ceilings" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_a_bench_killed_in_a_section_leaves_a_report_that_says_so(tmp_path, monkeypatch, capsys):
    """kill -9 (a timeout's) in a section: results.json held its finished rows marked only `unfinished`, which the
    report never read: it looked complete, and a later --merge kept the section as measured, exit 0."""
    import shutil

    from mlmtrain.benchmarks.suite import Bench

    real_ceilings, at_kill = Bench.ceilings, tmp_path / "at_kill"

    def ceilings_then_killed(self):
        rows = real_ceilings(self)
        self.progress("ceilings", rows[:2])
        shutil.copytree(tmp_path / "out", at_kill)  # what a kill here leaves
        return rows

    monkeypatch.setattr(Bench, "ceilings", ceilings_then_killed)
    assert main(["bench", "--out", str(tmp_path / "out"), "--quick", "--device", "cpu", "--sections", "ceilings"]) == 0
    monkeypatch.undo()
    why = "not finished: the bench was killed while it ran this section (or still runs it)"
    res = json.loads((at_kill / "results.json").read_text(encoding="utf-8"))
    (section,) = res["sections"]
    assert section["error"] == why and len(section["rows"]) == 2
    commit = res["environment"]["source"]["commit"]  # the rows so far name the commit too, as a finished section's
    assert all("commit" in r and r["commit"] == commit for r in section["rows"]), section["rows"]
    assert f"- **ceilings**: {why}" in (at_kill / "report.md").read_text(encoding="utf-8")
    argv = ["bench", "--out", str(at_kill), "--quick", "--device", "cpu", "--sections", "mask", "--merge"]
    assert main(argv) == 1 and "not measured: ceilings" in capsys.readouterr().err  # kept, and said


def test_merge_keeps_sections_not_redone(tmp_path):
    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ceilings"]) == 0
    main(
        [
            "bench",
            "--out",
            str(tmp_path),
            "--quick",
            "--device",
            "cpu",
            "--sections",
            "model",
            "--merge",
            "--time-limit",
            "1e-9",
        ]
    )
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [s["section"] for s in res["sections"]] == ["ceilings", "model"]
    assert "rows" in res["sections"][0] and res["merged_from"]
    # the report says which call measured a kept section
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert re.search(r"## Hardware ceilings.*\n\n\(\d+ s; kept from an earlier call: `mlmtrain bench --out", report)


def test_merge_refuses_results_measured_on_another_machine(tmp_path, capsys):
    """--merge into an H200's results.json from a CPU: the GPU's sections sat under a CPU header, judged against
    the CPU's ceilings (a training row at 146,703% of the measured matmul ceiling). Refused, nothing changed."""
    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ceilings"]) == 0
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    res["environment"]["device"] = "NVIDIA H200"
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    argv = ["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "mask", "--merge"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "results.json was measured on NVIDIA H200, and this call runs on CPU (" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_report_holding_rows_past_the_budget_exits_1_merged_or_not(tmp_path, capsys):
    """A row the budget left out (this call's, or an earlier call's that --merge kept) leaves the report
    incomplete: exit 1, naming it, as for a section the budget left out; once measured, 0."""
    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ceilings"]) == 0
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    late = {"name": "ours tiny T=512 cap=128", "tokens_per_batch": 512, "seq_cap": 128, "error": OUT_OF_TIME}
    res["sections"].append({"section": "sweep", "wall_s": 0.0, "rows": [late]})
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    capsys.readouterr()
    argv = ["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ceilings", "--merge"]
    assert main(argv) == 1
    assert "1 row past the time budget (sweep: ours tiny T=512 cap=128)" in capsys.readouterr().err
    assert main(argv[:-1]) == 0  # without --merge the stale row is gone
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    res["sections"].append({"section": "mask", "wall_s": 0.0, "error": OUT_OF_TIME})  # a whole section, too
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    assert main(argv) == 1
    res["sections"][-1]["error"] = "module mlmtrain.benchmarks.bench_mlm_mask is not available"  # kept, failed
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    assert main(argv) == 1


@pytest.mark.parametrize(
    "results, phrase",
    [
        ('{"schema": "mlmtrain-bench/1", "sec', "is not valid JSON"),
        ("[1, 2, 3]", "is not a report of this version (mlmtrain-bench/1)"),
        ('{"schema": "x", "sections": "nope"}', "is not a report of this version"),
        ('{"schema": "mlmtrain-bench/0", "sections": []}', "is not a report of this version"),
    ],
)
def test_merge_refuses_a_results_json_it_cannot_extend_before_any_work(tmp_path, capsys, results, phrase):
    """--merge reads the report it extends first: a truncated, foreign or older results.json is one sentence and
    stays as it was, with no section measured (they used to be measured, then a traceback)."""
    out = tmp_path / "report"
    assert main(["bench", "--out", str(out), "--quick", "--device", "cpu", "--sections", "ceilings"]) == 0
    (out / "results.json").write_text(results)
    capsys.readouterr()
    rc = main(["bench", "--out", str(out), "--quick", "--device", "cpu", "--sections", "mask", "--merge"])
    out_text, err = capsys.readouterr()
    assert rc == 2 and phrase in err and len(err.strip().splitlines()) == 1, err
    assert "section mask" not in out_text + err and (out / "results.json").read_text() == results


def test_model_rows_in_fp32_are_held_against_the_fp32_matmul_ceiling():
    """A model row names its dtype "fp32" (a kernel row "float32"): both take the fp32 ceiling, not bf16's."""
    from mlmtrain.benchmarks.report import generic_table

    ceil = {"matmul_float32": 0.210, "matmul_bfloat16": 0.794}
    rate = {"median": 61.5e9, "min": 61.5e9, "max": 61.5e9}
    rows = [{"name": n, "dtype": d, "flops_per_s": rate} for n, d in (("model", "fp32"), ("kernel", "float32"))]
    rows.append({"name": "bf16 model", "dtype": "bf16", "flops_per_s": rate})
    text = generic_table(rows, ceil)
    assert text.count("29% of matmul") == 2 and "8% of matmul" in text


def test_sweep_order_and_steps():
    pts = sweep_points([16384, 32768, 65536, 131072, 262144], [128, 512])
    assert pts[:3] == [(16384, 128), (262144, 128), (65536, 512)]  # the curve's shape first
    assert sorted(pts) == sorted((t, c) for t in [16384, 32768, 65536, 131072, 262144] for c in [128, 512])
    assert steps_for(16384, 2_000_000, 15, 60) == 60 and steps_for(262144, 2_000_000, 15, 60) == 15


def test_report_names_failed_sections(tmp_path):
    res = {
        "command": "mlmtrain bench --out x",
        "quick": True,
        "device": "cpu",
        "wall_s": 1.0,
        "environment": {"device": "CPU", "date": "2026-11-24", "versions": {"torch": "2.13"}},
        "sections": [
            {"section": "mask", "wall_s": 0.0, "error": "module mlmtrain.benchmarks.bench_mlm_mask is not available"},
            {
                "section": "sweep",
                "wall_s": 0.0,
                "rows": [
                    {
                        "name": "ours tiny T=512 cap=128",
                        "tokens_per_batch": 512,
                        "seq_cap": 128,
                        "error": "skipped: the time budget (--time-limit) ran out",
                        "section": "sweep",
                    }
                ],
            },
        ],
    }
    json_path, md_path = report.write(res, tmp_path)
    md = md_path.read_text(encoding="utf-8")
    assert "**mask**: module mlmtrain.benchmarks.bench_mlm_mask is not available" in md
    assert "ours tiny T=512 cap=128: skipped" in md
    assert json.loads(json_path.read_text())["schema"] == report.SCHEMA


def test_skip_without_the_ablation_section_is_refused(tmp_path, capsys):
    """--skip and --remeasure name ablation rows: without the ablation section they would do nothing, silently."""
    from mlmtrain.cli import main

    argv = ["bench", "--out", str(tmp_path / "out"), "--quick", "--device", "cpu", "--sections", "ceilings"]
    assert main([*argv, "--skip", "dropout off"]) == 2
    assert "--skip names ablation rows: add the ablation section" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def _results_with_ceilings(*sections):
    ceilings = {"section": "ceilings", "rows": [
        {"kind": "matmul_ceiling", "dtype": "float32", "tflops": {"min": 0.2, "median": 0.2, "max": 0.2}},
        {"kind": "matmul_ceiling", "dtype": "bfloat16", "tflops": {"min": 0.8, "median": 0.8, "max": 0.8}},
    ]}  # fmt: skip
    return {"sections": [ceilings, *sections]}


def test_the_headline_holds_an_fp32_training_row_against_the_fp32_ceiling():
    from mlmtrain.benchmarks.report import headline

    ours = {"trainer": "ours", "precision": "fp32", "tokens_per_s": {"overall": 1.0},
            "achieved_tflops": {"min": 0.1, "median": 0.1, "max": 0.1}}  # fmt: skip
    h = headline(_results_with_ceilings({"section": "train", "rows": [ours]}))
    assert h["ours"]["fraction_of_matmul_ceiling"]["median"] == pytest.approx(0.5)


def test_the_ablation_headline_holds_its_rows_against_the_bf16_ceiling():
    """The ablation trains in bf16 (its fp8 rows too): its share of the matmul ceiling is against the bf16 GEMM
    rate, even where the ceilings section also measured fp32 (a CPU)."""
    from mlmtrain.benchmarks.report import headline

    row = _ablation_row("today", 500_000.0, 0, achieved_tflops={"min": 0.4, "median": 0.4, "max": 0.4})
    h = headline(_results_with_ceilings({"section": "ablation", "rows": [row]}))
    (workload,) = h["ablation"].values()
    assert workload["today"]["fraction_of_matmul_ceiling"] == pytest.approx(0.5)


def test_the_step_profile_says_how_long_the_steps_flops_take_at_the_ceiling():
    """A step of 1 s at 0.4 TFLOP/s would take 0.5 s at a 0.8 TFLOP/s ceiling: half of it is what is left."""
    from mlmtrain.benchmarks.report import profile_text

    ours = {"phase_ms": {"forward": 400.0, "backward": 600.0}, "precision": "bf16", "steps": 10,
            "real_tokens": 10_000, "tokens_per_s": {"overall": 1000.0},
            "achieved_tflops": {"min": 0.4, "median": 0.4, "max": 0.4}}  # fmt: skip
    text = profile_text(ours, {"matmul_bfloat16": 0.8})
    assert "Timed (unprofiled) step: 1000.00 ms" in text and "would take 500.00 ms (50%)" in text


def test_si_prefixes_start_at_their_own_power_of_ten():
    from mlmtrain.benchmarks.tables import si

    assert si(1e6, "tok/s") == "1 Mtok/s" and si(1000.0, "B/s") == "1 kB/s" and si(999.0) == "999"


def test_rows_of_leaves_out_rows_that_say_why_they_were_not_measured():
    from mlmtrain.benchmarks.tables import rows_of

    results = {"sections": [{"section": "sweep", "rows": [{"name": "a"}, {"name": "b", "error": "skipped"}]}]}
    assert rows_of(results, "sweep") == [{"name": "a"}] and rows_of(results, "mask") == []


def test_the_ceilings_are_each_dtypes_best_matmul_and_the_best_copy_counting_read_and_write(monkeypatch):
    """Each matmul ceiling is the best median of its own dtype's sizes (the fp32 ceiling is not bf16's), and the
    copy ceiling is the best size's rate, counting the bytes read and the bytes written."""
    import torch

    from mlmtrain.benchmarks import ceilings

    def fake_time_fn(fn, device, *, warmup, repeats, setup):
        arg = setup()
        if isinstance(arg, tuple):  # bf16 4x faster; the larger size the faster per FLOP
            s = (1e-3 if arg[0].dtype == torch.bfloat16 else 4e-3) * (arg[0].shape[0] / 256) ** 2
        else:  # the smaller copy is the faster per byte
            s = 1e-3 if arg.numel() * 4 == 8 * 2**20 else 1e-2
        return {"min": s, "median": s, "max": s, "repeats": repeats}

    monkeypatch.setattr(ceilings, "time_fn", fake_time_fn)
    rows = {r["name"]: r for r in ceilings.run("cpu", quick=True)}
    fp32 = rows["matmul ceiling float32"]
    assert fp32["dtype"] == "float32" and fp32["tflops"]["median"] == pytest.approx(2 * 512**3 / 16e-3 / 1e12)
    assert rows["matmul ceiling bfloat16"]["tflops"]["median"] == pytest.approx(2 * 512**3 / 4e-3 / 1e12)
    assert rows["copy ceiling"]["gb_per_s"]["median"] == pytest.approx(2 * 8 * 2**20 / 1e-3 / 1e9)


def test_kernel_bench_outputs_say_the_interpreter_ran_and_helps_are_whole(tmp_path, monkeypatch, capsys):
    """On a CPU the kernel benches' "triton" rows time Triton's interpreter (kernel_bench_device sets it): the
    JSON's environment and the printed lines say so. Their --help took a docstring's first line, mid-sentence."""
    import torch

    from mlmtrain.benchmarks.common import description, print_and_save

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    print_and_save([{"kind": "summary", "x": 1.0}], torch.device("cpu"), str(tmp_path / "k.json"))
    assert json.loads((tmp_path / "k.json").read_text())["environment"]["triton_interpreter"] is True
    assert "ran in Triton's interpreter on the CPU" in capsys.readouterr().out
    assert description("The fused Triton\nkernels, timed.\n\nMore text.") == "The fused Triton kernels, timed."


def test_a_stop_that_breaks_the_charts_leaves_the_numbers_and_says_the_report_was_not_drawn(tmp_path, monkeypatch):
    """Ctrl-C inside matplotlib's import left it half-imported: the stop's own report.md then raised (a traceback,
    exit 1), and report.md was the previous section's, beside a newer results.json. Now: exit 130, results.json
    written, report.md says it was not drawn and how to draw it."""
    from mlmtrain.benchmarks import report
    from mlmtrain.benchmarks.suite import Bench

    def stopped(self):
        raise KeyboardInterrupt

    def broken_render(*args, **kwargs):
        raise AttributeError("module 'matplotlib' has no attribute 'get_data_path'")

    monkeypatch.setattr(Bench, "mask", stopped)
    monkeypatch.setattr(report, "render", broken_render)
    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "mask"]) == 130
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert res["sections"][0]["error"] == "not measured: the bench was stopped by SIGINT"
    assert (tmp_path / "report.md").read_text() == report.UNDRAWN.format(out=tmp_path)


def test_a_cpus_device_name_is_its_model_its_architecture_and_threads(monkeypatch):
    """--merge compares device names: a CPU's carries its model from /proc/cpuinfo's `model name` (not the `model`
    number line above it); a cpuinfo without one (some ARM machines) or none at all gives what platform says."""
    import platform

    import torch

    from mlmtrain import provenance

    cpuinfo = {"text": "processor\t: 0\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"}

    class FakePath:
        def __init__(self, path):
            assert str(path) == "/proc/cpuinfo"

        def read_text(self, **kw):
            if cpuinfo["text"] is None:
                raise FileNotFoundError("/proc/cpuinfo")
            return cpuinfo["text"]

    monkeypatch.setattr(provenance, "Path", FakePath)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(platform, "processor", lambda: "")
    threads, cpu = torch.get_num_threads(), torch.device("cpu")
    assert provenance.device_name(cpu) == f"CPU (Intel(R) Xeon(R) Platinum 8480+, x86_64, {threads} threads)"
    cpuinfo["text"] = "processor\t: 0\nBogoMIPS\t: 50.00\n"  # no model name: the architecture alone
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert provenance.device_name(cpu) == f"CPU (aarch64, {threads} threads)"
    cpuinfo["text"] = None  # no /proc (macOS): platform's processor
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert provenance.device_name(cpu) == f"CPU (arm, aarch64, {threads} threads)"


def test_a_kernel_bench_without_the_interpreter_says_it_did_not_run_there(tmp_path, monkeypatch, capsys):
    import torch

    from mlmtrain.benchmarks.common import print_and_save

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    print_and_save([{"kind": "summary", "x": 1.0}], torch.device("cpu"), str(tmp_path / "k.json"))
    assert json.loads((tmp_path / "k.json").read_text())["environment"]["triton_interpreter"] is False
    assert "interpreter" not in capsys.readouterr().out


def test_every_signal_train_stops_for_stops_the_bench():
    """raise_stop: a run that train stopped for a signal stops the bench as that signal would (SIGINT as Ctrl-C,
    SIGTERM, SIGHUP and SIGPIPE as Terminated with their number: the exit code says which); a run that finished
    goes on."""
    import signal

    from mlmtrain.benchmarks.common import raise_stop
    from mlmtrain.cli import Terminated

    raise_stop(None)
    with pytest.raises(KeyboardInterrupt):
        raise_stop("SIGINT")
    for name in ("SIGTERM", "SIGHUP", "SIGPIPE"):
        with pytest.raises(Terminated) as stopped:
            raise_stop(name)
        assert stopped.value.signal == getattr(signal, name)


def test_the_report_draws_an_unfinished_ablation_section_as_unfinished(tmp_path, monkeypatch):
    """render passes an ablation section's error on: a section killed or stopped in it says its targets judge the
    rows it has and its curves were not reached; a finished one does not."""
    from mlmtrain.benchmarks import ablation_report, report
    from mlmtrain.benchmarks.suite import UNFINISHED

    seen = []
    monkeypatch.setattr(ablation_report, "report_markdown", lambda rows, matmul, finished=True: seen.append(finished)
                        or "")  # fmt: skip
    row = {"benchmark": "ablation", "name": "today", "options": {}, "tokens_per_s": {"overall": 1.0}}
    for error in ({"error": UNFINISHED}, {}):
        section = {"section": "ablation", "wall_s": 1.0, "rows": [row], **error}
        report.render({"command": "x", "environment": {"device": "CPU"}, "sections": [section]}, tmp_path)
    assert seen == [False, True]


def test_merge_into_an_unmarked_report_of_another_machine_leaves_it_unmarked(tmp_path, capsys):
    """--merge checks the earlier report's device before the bench claims --out: an older (unmarked) report
    measured elsewhere is refused as it was, with no marker written into it."""
    from mlmtrain.benchmarks.report import SCHEMA

    results = {"schema": SCHEMA, "sections": [], "environment": {"device": "NVIDIA H200"}}
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (tmp_path / "report.md").write_text("# mlmtrain benchmark report", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "mask", "--merge"]
    assert main(argv) == 2 and "was measured on NVIDIA H200" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_report_main_says_a_refused_claim_or_an_unreadable_results_json_in_one_sentence(tmp_path, capsys):
    """`python -m mlmtrain.benchmarks.report FOLDER [--claim]`: a folder it may not claim, a missing or damaged
    results.json, each one line on stderr and exit 2 (no traceback); a folder it may claim: exit 0, marked."""
    from mlmtrain.benchmarks import report
    from mlmtrain.files import read_marker

    user = tmp_path / "user"
    user.mkdir()
    (user / "bench.log").write_text("my notes")
    assert report.main([str(user), "--claim"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlmtrain report: error: ") and "was not made by" in err and err.count("\n") == 1
    assert report.main([str(tmp_path / "new"), "--claim"]) == 0 and read_marker(tmp_path / "new")["kind"] == "bench"
    assert report.main([str(tmp_path / "new")]) == 2
    path = tmp_path / "new" / "results.json"
    assert capsys.readouterr().err == f"mlmtrain report: error: cannot read {path}: No such file or directory\n"
    path.write_text("{not json")
    assert report.main([str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlmtrain report: error: cannot read {path}: Expecting") and err.count("\n") == 1


def test_report_claim_on_a_folder_that_cannot_be_made_is_one_sentence(tmp_path, capsys):
    """--claim under a file: the handler named a path not yet set (UnboundLocalError, a traceback, exit 1)."""
    (tmp_path / "f").write_text("x")
    assert report.main([str(tmp_path / "f" / "sub"), "--claim"]) == 2
    assert capsys.readouterr().err == f"mlmtrain report: error: cannot make {tmp_path / 'f' / 'sub'}: Not a directory\n"
