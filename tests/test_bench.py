"""`mlmtrain bench --quick` on the CPU: one run (module-scoped, ~60-90 s on 2 cores) whose results.json is
checked against the schema the report promises, plus fast checks of argument errors, the time budget and
the report's handling of failed sections."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time

import pytest

from mlmtrain.benchmarks import report
from mlmtrain.benchmarks.bench_train import steps_for, sweep_points, timed_windows
from mlmtrain.benchmarks.common import OUT_OF_TIME
from mlmtrain.benchmarks.suite import PLANS
from mlmtrain.cli import main

SECTIONS = ["ceilings", "mask", "model", "train", "sweep"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--out", str(out), "--quick", "--device", "cpu"])
    return out, rc, json.loads((out / "results.json").read_text(encoding="utf-8"))


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
    assert env["device"] and env["date"]
    assert [s["section"] for s in res["sections"]] == SECTIONS
    for s in res["sections"]:
        assert ("rows" in s) != ("error" in s), s["section"]  # measured, or says why not: never silent
        assert s["wall_s"] >= 0
        for row in s.get("rows", []):
            assert row["section"] == s["section"] and row["command"], row.get("name")
            assert row.get("name") and (row.get("error") or row.get("benchmark"))
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

    script = tmp_path / "script"
    script.mkdir()
    (script / "gpu.txt").write_text("NVIDIA H200")
    (script / "bench.log").write_text("")
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
    import time

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


STAND_IN_PYTHON = """
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[0] == "-c":  # the script's import checks: mlmtrain from this checkout, every other package there
    print(os.getcwd() + "/trainer" if "import mlmtrain" in args[1] else "")
elif args[1] == "pytest":
    print("3 passed in 1.00s")
elif args[1].startswith("mlmtrain.benchmarks."):
    Path(args[args.index("--out") + 1]).write_text("{}")
    print("| variant | ms |")
elif args[1] == "mlmtrain.cli":  # the bench's own claim on the folder, then its files
    from mlmtrain.benchmarks.report import claim_out_folder

    out = Path(args[args.index("--out") + 1])
    claim_out_folder(out)  # refuses a folder holding files it does not know
    for name in ("results.json", "report.md"):
        (out / name).write_text(json.dumps({"schema": "mlmtrain-bench/1", "sections": []}))
"""


def test_the_gpu_call_leaves_at_most_eight_files_and_a_second_call_reuses_the_kernel_benches(tmp_path):
    """scripts/speed_gpu.sh on a lent machine, with a stand-in interpreter and nvidia-smi (what the script does
    with its files, not what it measures; the bench's own claim on --out is the real one, which refuses a folder
    holding files it does not know): a lent machine gives back at most 8 files, so the kernel benches' tables,
    rows and logs end in one archive and the call leaves 7 files; a --merge call given that archive, or its files
    unpacked, runs none of those benches again, and one given an archive without the large model's attention runs
    only that one, adding it to the archive."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "speed_gpu.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!{sys.executable}\n" + STAND_IN_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\necho 'NVIDIA H200, 580.95'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = os.environ | {"PYTHON": str(bin_dir / "python"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                        "CALLS": str(calls), "SPEED_BUDGET": "200"}  # fmt: skip
    benches = {"attention": 3, "layernorm": 3, "gelu": 3, "attention_large": 3}

    def call(out: Path, *flags: str) -> tuple[set, set, list]:
        calls.write_text("")
        done = subprocess.run(["bash", str(script), str(out), *flags], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        with tarfile.open(out / "kernels.tar.gz") as archive:
            kept = set(archive.getnames())
        ran = [line.split()[1].rsplit(".", 1)[-1] for line in calls.read_text().splitlines() if "benchmarks." in line]
        return {f.name for f in out.rglob("*") if f.is_file()}, kept, ran

    every = {f"{b}.{ext}" for b in benches for ext in ("md", "json", "log")}
    first, kept, ran = call(tmp_path / "first")
    assert first == {"gpu.txt", "gpu_tests.txt", "kernels.tar.gz", "bench.log", "results.json", "report.md",
                     ".mlmtrain.json"}  # fmt: skip
    assert kept == every and ran == ["bench_attention", "bench_residual_layer_norm", "bench_bias_gelu",
                                     "bench_attention"]  # fmt: skip

    second = tmp_path / "second"  # a fresh machine: the first call's results, marker and archive copied in
    second.mkdir()
    for name in ("results.json", ".mlmtrain.json", "kernels.tar.gz"):
        (second / name).write_bytes((tmp_path / "first" / name).read_bytes())
    files, kept, ran = call(second, "--merge")
    assert ran == [] and kept == every and len(files) <= 8 and "bench_merge.log" in files

    unpacked = tmp_path / "unpacked"  # the same with the archive's files unpacked, as the repository keeps them
    unpacked.mkdir()
    for name in ("results.json", ".mlmtrain.json"):
        (unpacked / name).write_bytes((tmp_path / "first" / name).read_bytes())
    with tarfile.open(tmp_path / "first" / "kernels.tar.gz") as archive:
        archive.extractall(unpacked, filter="data")
    files, kept, ran = call(unpacked, "--merge")
    assert ran == [] and kept == every and len(files) <= 8

    older = tmp_path / "older"  # an archive from before the large model's attention bench
    older.mkdir()
    for name in ("results.json", ".mlmtrain.json"):
        (older / name).write_bytes((tmp_path / "first" / name).read_bytes())
    with tarfile.open(older / "kernels.tar.gz", "w:gz") as archive:
        for name in sorted(every - {f"attention_large.{ext}" for ext in ("md", "json", "log")}):
            (tmp_path / name).write_text("old " + name)
            archive.add(tmp_path / name, arcname=name)
    files, kept, ran = call(older, "--merge")
    assert ran == ["bench_attention"] and kept == every and len(files) <= 8
    with tarfile.open(older / "kernels.tar.gz") as archive:
        assert archive.extractfile("gelu.md").read() == b"old gelu.md"  # the earlier call's table kept


def test_speed_script_quick_path_and_a_second_call_that_completes_it(tmp_path):
    """scripts/speed_gpu.sh --quick: the GPU script's own path on the CPU (tiny model; the fused kernels run their
    torch reference, as on any machine without Triton's interpreter). Rows that cannot run on a CPU (CUDA graphs,
    fp8) say why. Then a second call with --merge measures only the rows a first call recorded as skipped (here:
    marked so by hand) and keeps the others."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "speed_gpu.sh"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHON": sys.executable}
    out = tmp_path / "speed"
    first = subprocess.run(["bash", str(script), str(out), "--quick"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [s["section"] for s in res["sections"]] == ["ceilings", "ablation"]
    everything = res["sections"][1]["rows"]
    by_name = {(r["benchmark"], r["name"]): r for r in everything}
    names = [
        "today",
        "+row attention",
        "+bf16 residual",
        "+fused kernels",
        "+CUDA graphs",
        "+fp8 tensorwise",
        "+fp8 rowwise",
        "+fp8 tensorwise, torch ops",
        "+fp8 rowwise, bf16 weight grads, torch ops",
        "+async log reads",
        "+packer process",
        "+segment attention kernel",
        "dropout off",
    ]
    assert [r["name"] for r in everything if r["benchmark"] == "ablation"] == names
    measured = [by_name[("ablation", n)] for n in ("today", "+row attention", "+bf16 residual", "+fused kernels")]
    measured += [by_name[("ablation", n)] for n in ("+async log reads", "+packer process", "dropout off")]
    for r in measured:
        assert r["tokens_per_s"]["overall"] > 0 and math.isfinite(r["valid_loss"]) and r["phase_ms"], r["name"]
    assert len({r["real_tokens"] for r in measured}) == 1  # the same real tokens, so the losses compare
    assert by_name[("ablation", "+row attention")]["options"] == {"data.layout": "rows"}
    assert "needs a CUDA device" in by_name[("ablation", "+CUDA graphs")]["error"]
    for name in ("+fp8 rowwise", "+fp8 rowwise, bf16 weight grads, torch ops"):
        assert "FP8 tensor cores" in by_name[("ablation", name)]["error"]
    assert by_name[("ablation", "+fp8 tensorwise, torch ops")]["options"]["model.fused_ops"] == "torch"
    async_reads = by_name[("ablation", "+async log reads")]  # on the last row that ran (fp8 cannot, here)
    assert async_reads["options"] == {
        **by_name[("ablation", "+fused kernels")]["options"],
        "train.async_log_reads": True,
    }
    packer = by_name[("ablation", "+packer process")]
    assert packer["options"] == {**async_reads["options"], "data.packer": "process"}
    kernel = by_name[("ablation", "+segment attention kernel")]
    assert kernel["options"] == {**packer["options"], "model.attention": "triton"}
    assert by_name[("ablation", "dropout off")]["options"]["model.dropout"] == 0.0  # on the faster of those two
    assert by_name[("ablation", "+fused kernels")]["tokens_per_s"]["overall"] > 0
    targets = [r for r in everything if r["benchmark"] == "target"]
    assert targets[0]["name"] == "today" and targets[0]["seq_cap"] == 512 and targets[0]["pack"] == "document"
    assert len(targets) >= 2 and "ablation" in res["headline"]
    curves = [r for r in everything if r["benchmark"] == "curve"]
    if curves:  # run when a configuration other than today's was the fastest on this CPU
        assert [(r["name"], r["seed"]) for r in curves] == [
            ("today", 0),
            ("today, seed 1", 1),
            ("fastest configuration", 0),
            ("fastest configuration, seed 1", 1),
        ]
        assert all(len(r["loss_curve"]) >= 3 for r in curves) and res["headline"]["curve"]["steps"] >= 6
    md = (out / "report.md").read_text(encoding="utf-8")
    for needle in ("### Ablation", "### Targets", "Kernel categories", "+CUDA graphs", "valid MLM loss", "Host ahead"):
        assert needle in md, needle

    dropout = by_name[("ablation", "dropout off")]  # as a first call cut short by its budget would leave it
    cut = {k: dropout[k] for k in ("benchmark", "name", "size", "tokens_per_batch", "seq_cap", "options", "section")}
    res["sections"][1]["rows"] = [
        r if r is not dropout else {**cut, "error": "skipped: the time budget (--time-limit) ran out"}
        for r in everything
    ]
    (out / "results.json").write_text(json.dumps(res), encoding="utf-8")
    second = subprocess.run(
        [
            "bash",
            str(script),
            str(out),
            "--quick",
            "--merge",
            "--sections",
            "ablation",
            "--remeasure",
            "+bf16 residual",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [s["section"] for s in res["sections"]] == ["ceilings", "ablation"]  # the ceilings kept
    again = {(r["benchmark"], r["name"]): r for r in res["sections"][1]["rows"]}
    assert again[("ablation", "dropout off")]["tokens_per_s"]["overall"] > 0
    assert not again[("ablation", "dropout off")].get("reused_from")
    assert all(again[k].get("reused_from") for k in (("ablation", "today"), ("target", "today")))
    remeasured = again[("ablation", "+bf16 residual")]  # --remeasure: measured again, the rows after it kept
    assert not remeasured.get("reused_from") and remeasured["tokens_per_s"]["overall"] > 0
    assert again[("ablation", "+fused kernels")].get("reused_from")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--remeasure", "+fused kernels"],
            "--remeasure names rows of an earlier report to measure again: add --merge",
        ),
        (["--merge", "--remeasure", "+fused kernel"], "no ablation row is called '+fused kernel'"),
        (["--skip", "dropout of"], "--skip: no ablation row is called 'dropout of'"),
    ],
)
def test_remeasure_and_skip_name_ablation_rows(tmp_path, capsys, flags, message):
    from mlmtrain.cli import main

    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ablation", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "huge"], "--size must be one of tiny, mini, small, base, large, got 'huge'"),
        (["--sweep-caps", "2,128"], "--sweep-caps are sequence caps from 3 to 512"),
        (["--time-limit", "nan"], "--time-limit must be a number of seconds >= 0"),
        (["--work", "WORK/notes.txt"], "--work WORK/notes.txt is a file, not a folder."),
        (["--work", "WORK"], "--work WORK is not empty and was not made by `mlmtrain bench --work`"),
    ],
)
def test_bench_flags_and_its_work_folder_are_checked_before_any_work(tmp_path, capsys, flags, message):
    """--work is a folder the bench deletes runs in: only a new, empty or earlier bench's one (marked) is taken, a
    user's folder or file never; every flag is one sentence before any section runs (exit 2, no report)."""
    from mlmtrain.cli import main

    (tmp_path / "WORK").mkdir()
    (tmp_path / "WORK" / "notes.txt").write_text("mine")
    flags = [f.replace("WORK", str(tmp_path / "WORK")) for f in flags]
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--quick", "--device", "cpu", "--sections", "ceilings", *flags]) == 2
    err = capsys.readouterr().err
    assert message.replace("WORK", str(tmp_path / "WORK")) in err and "Traceback" not in err
    assert not (out / "results.json").exists() and (tmp_path / "WORK" / "notes.txt").read_text() == "mine"


def test_ablation_rows_past_the_budget_are_skipped_and_say_so(tmp_path):
    from mlmtrain.benchmarks.bench_ablation import SKIPPED, SKIPPED_BY_FLAG, Ablation
    from mlmtrain.benchmarks.synthetic_data import make_synthetic_data

    data = make_synthetic_data(tmp_path / "data", train_tokens=3000, valid_tokens=200, log=lambda msg: None)
    seen = []
    bench = Ablation(
        tmp_path,
        data,
        device="cpu",
        compile=False,
        log_every=1,
        deadline=time.monotonic() - 1,
        reuse=[],
        command="x",
        on_row=lambda rows: seen.append(len(rows)),
    )
    row = bench.row("ablation", "today", {}, size="tiny", tokens_per_batch=256, cap=128, target_tokens=1000)
    assert row["error"] == SKIPPED and row["options"] == {} and seen == [1]
    bench.deadline, bench.skip = None, {"today"}  # --skip: said so, whatever the budget
    row = bench.row("ablation", "today", {}, size="tiny", tokens_per_batch=256, cap=128, target_tokens=1000)
    assert row["error"] == SKIPPED_BY_FLAG and seen == [1, 2]


def test_gpu_scripts_name_tests_that_exist():
    """The GPU scripts select tests by file and name; a renamed test would drop out of the one GPU call silently."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    named = set()
    for script in (root / "scripts").glob("*.sh"):
        named |= set(re.findall(r"(tests/\w+\.py)(?:::(\w+))?", script.read_text(encoding="utf-8")))
    assert named
    for path, test in named:
        assert (root / path).is_file(), path
        assert not test or re.search(rf"^def {test}\(", (root / path).read_text(encoding="utf-8"), re.M), (path, test)


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
    reads and dropout off build on the fastest of those, and the large model gets the fastest fp8 row's options on
    its fastest configuration (here the flat layout, which is faster at 512 tokens)."""
    from mlmtrain.benchmarks import bench_ablation

    speed = {"today": 100, "+row attention": 130, "+bf16 residual": 135, "+fused kernels": 140, "+CUDA graphs": 141,
             "+fp8 tensorwise": 120, "+fp8 rowwise": 110, "+fp8 tensorwise, torch ops": 150,
             "+fp8 rowwise, bf16 weight grads, torch ops": 145, "+async log reads": 152,
             "+packer process": 153, "+segment attention kernel": 155, "dropout off": 160,
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
    assert rows[("ablation", "dropout off")] == {**kernel, "model.dropout": 0.0}
    best = {**fp8_torch, **host}  # the kernel holds rows of <= 128 tokens: not at 512
    assert rows[("target", "fastest base configuration")] == best
    assert ("target", "fastest, fp8") not in rows  # the fastest configuration has fp8 already

    speed["+fp8 tensorwise, torch ops"] = 90  # now fp8 is slower on the base model: the large one still tries it
    speed["+fp8 rowwise, bf16 weight grads, torch ops"] = 95  # (its fastest fp8 row: tensorwise's 120)
    speed["+segment attention kernel"] = 140  # and the kernel slower than FlexAttention: dropout off builds on flex
    rows = {(r["benchmark"], r["name"]): r["options"] for r in bench_ablation.run(tmp_path, None, **common, **large)}
    assert rows[("ablation", "dropout off")] == {**chained, **host, "model.dropout": 0.0}
    # the packer process's 153 is within 1% of async reads' 152: noise, so the fastest configuration leaves it out
    flat = {k: v for k, v in chained.items() if k != "data.layout"} | {"train.async_log_reads": True}
    assert rows[("target", "fastest, flat layout")] == flat
    assert rows[("target", "fastest, fp8")] == {**flat, "train.fp8": "tensorwise", "model.fused_ops": "triton"}


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
