"""The GPU scripts driven on the CPU: scripts/speed_gpu.sh with a stand-in interpreter and nvidia-smi (what it does
with its files and budget, not what it measures), its quick path, the ablation's flags and budget, and the tests
the scripts name."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from mlmtrain.cli import main

STAND_IN_PYTHON = """
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
if args[0] == "-c":  # the script's import checks: mlmtrain from this checkout, every other package there
    print(os.getcwd() + "/trainer" if "import mlmtrain" in args[1] else "")
elif args[1] == "mlmtrain.benchmarks.report":  # the scripts' claim on OUT_DIR before they write in it: the real one
    from mlmtrain.benchmarks.report import main

    sys.exit(main(args[2:]))
elif args[1] == "pytest":
    print("3 passed in 1.00s")
elif args[1].startswith("mlmtrain.benchmarks."):
    if args[1] == os.environ.get("FAIL"):  # a bench that fails after printing part of its table
        print("| variant | ms |")
        sys.exit(1)
    Path(args[args.index("--out") + 1]).write_text("{}")
    print("| variant | ms |")
elif args[1] == "mlmtrain.cli":  # the bench's own claim on the folder, then its files
    from mlmtrain.benchmarks.report import claim_out_folder

    out = Path(args[args.index("--out") + 1])
    claim_out_folder(out)  # refuses a folder holding files it does not know
    for name in ("results.json", "report.md"):
        (out / name).write_text(json.dumps({"schema": "mlmtrain-bench/1", "sections": []}))
    sys.exit(int(os.environ.get("BENCH_RC", "0")))  # a bench that failed: its exit code
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
                        "CALLS": str(calls), "SPEED_BUDGET": "200", "SPEED_RESERVE": "0"}  # fmt: skip
    benches = {"attention": 3, "layernorm": 3, "gelu": 3, "attention_large": 3}

    def call(out: Path, *flags: str, rc: int = 0) -> tuple[set, set, list]:
        calls.write_text("")
        done = subprocess.run(["bash", str(script), str(out), *flags], env=env, capture_output=True, text=True)
        assert done.returncode == rc, done.stdout[-2000:] + done.stderr[-2000:]
        kept = set()
        if (out / "kernels.tar.gz").exists():
            with tarfile.open(out / "kernels.tar.gz") as archive:
                kept = set(archive.getnames())
        ran = [line.split()[1].rsplit(".", 1)[-1] for line in calls.read_text().splitlines()
               if "benchmarks." in line and "--claim" not in line]  # fmt: skip
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

    failing = tmp_path / "failing"  # a kernel bench that fails: exit 1, only its log kept, run again by --merge
    env["FAIL"] = "mlmtrain.benchmarks.bench_bias_gelu"
    files, kept, ran = call(failing, rc=1)
    assert kept == every - {"gelu.md", "gelu.json"} and "bench_bias_gelu" in ran
    assert not {"gelu.md", "gelu.json"} & files  # its part of a table is no table a later call would keep
    del env["FAIL"]
    files, kept, ran = call(failing, "--merge")
    assert ran == ["bench_bias_gelu"] and kept == every

    foreign = tmp_path / "foreign"  # a folder of the user's, with a file under a name the script writes
    foreign.mkdir()
    (foreign / "bench.log").write_text("my notes")
    files, kept, ran = call(foreign, rc=2)
    assert files == {"bench.log"} and (foreign / "bench.log").read_text() == "my notes" and ran == []


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
        "+autotune",
        "+autotune, torch ops",
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
    for name in ("+autotune", "+autotune, torch ops"):  # the quick path does not compile
        assert "train.autotune times the compiled step's kernel choices" in by_name[("ablation", name)]["error"]
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

    assert main(["bench", "--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "ablation", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "huge"], "--size must be one of tiny, mini, small, base, large, got 'huge'"),
        (["--sweep-caps", "2,128"], "--sweep-caps are sequence caps from 3 to 512"),
        (["--time-limit", "nan"], "--time-limit must be a number of seconds >= 0"),
        (["--sections", "ceilings,mask,ceilings"], "--sections names ceilings more than once: name each section once"),
        (["--work", "WORK/notes.txt"], "--work WORK/notes.txt is a file, not a folder."),
        (["--work", "WORK"], "--work WORK is not empty and was not made by `mlmtrain bench --work`"),
    ],
)
def test_bench_flags_and_its_work_folder_are_checked_before_any_work(tmp_path, capsys, flags, message):
    """--work is a folder the bench deletes runs in: only a new, empty or earlier bench's one (marked) is taken, a
    user's folder or file never; every flag is one sentence before any section runs (exit 2, no report)."""

    (tmp_path / "WORK").mkdir()
    (tmp_path / "WORK" / "notes.txt").write_text("mine")
    flags = [f.replace("WORK", str(tmp_path / "WORK")) for f in flags]
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--quick", "--device", "cpu", "--sections", "ceilings", *flags]) == 2
    err = capsys.readouterr().err
    assert message.replace("WORK", str(tmp_path / "WORK")) in err and "Traceback" not in err
    assert not out.exists() and (tmp_path / "WORK" / "notes.txt").read_text() == "mine"  # "changes nothing on disk"


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
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    named = set()
    for script in (root / "scripts").glob("*.sh"):
        named |= set(re.findall(r"(tests/\w+\.py)(?:::(\w+))?", script.read_text(encoding="utf-8")))
    assert named
    for path, test in named:
        assert (root / path).is_file(), path
        assert not test or re.search(rf"^def {test}\(", (root / path).read_text(encoding="utf-8"), re.M), (path, test)


def _stand_in_tools(tmp_path, python_names=("python",)):
    """A bin folder with the stand-in interpreter (under each of `python_names`) and nvidia-smi, and its env."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in python_names:
        (bin_dir / name).write_text(f"#!{sys.executable}\n" + STAND_IN_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\necho 'NVIDIA H200, 580.95'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = os.environ | {"PYTHON": str(bin_dir / python_names[0]), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                        "CALLS": str(calls)}  # fmt: skip
    return env, calls


def test_the_speed_scripts_bench_gets_a_time_limit_of_at_least_one_second(tmp_path):
    """speed_gpu.sh gives the bench the budget left less 25 s: with less left than that, 1 s (0 or less would be no
    limit, or refused), not the budget's remainder."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "speed_gpu.sh"
    env, calls = _stand_in_tools(tmp_path)
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env | {"SPEED_BUDGET": "20"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]  # the checks and benches left over
    (bench,) = [line.split() for line in calls.read_text().splitlines() if "mlmtrain.cli" in line]
    assert bench[bench.index("--time-limit") + 1] == "1"
    # a bench that failed keeps its own exit code: what was left over for want of time does not hide it
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True,
                          env=env | {"SPEED_BUDGET": "20", "BENCH_RC": "3"})  # fmt: skip
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]


STEPS = ["pytest", *(f"mlmtrain.benchmarks.{b}" for b in ("bench_attention", "bench_residual_layer_norm",
          "bench_bias_gelu", "bench_attention")), "mlmtrain.cli"]  # fmt: skip
TIMEOUT = """
import os, sys

args = sys.argv[1:]
while args[0] in ("-s", "-k"):
    args = args[2:]
with open(os.environ["CALLS"], "a") as calls:
    calls.write("timeout " + args[0] + " " + " ".join(args[1:4]) + "\\n")
os.execvp(args[1], args[1:])
"""


def test_the_checks_and_kernel_benches_leave_the_rows_their_reserve(tmp_path):
    """SPEED_RESERVE seconds of the budget are the bench's rows': the GPU checks and kernel benches before it run
    only as long as leaves them (their `timeout`s cut to what is left), and where less than 30 s is left for one,
    it is left to a later call (said, exit 1), which runs it; a relative OUT_DIR is the caller's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "speed_gpu.sh"
    env, calls = _stand_in_tools(tmp_path)
    (tmp_path / "bin" / "timeout").write_text(f"#!{sys.executable}\n" + TIMEOUT)
    (tmp_path / "bin" / "timeout").chmod(0o755)

    def call(budget: int, *flags: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[tuple[int, str]]]:
        """The call's result, and each `timeout` it ran: (seconds, the module run: `timeout S python -m M`)."""
        calls.write_text("")
        done = subprocess.run(["bash", str(script), "out", *flags], cwd=tmp_path, capture_output=True, text=True,
                              env=env | {"SPEED_BUDGET": str(budget), "SPEED_RESERVE": "240", **extra})  # fmt: skip
        words = [line.split() for line in calls.read_text().splitlines() if line.startswith("timeout ")]
        return done, [(int(w[1]), w[4]) for w in words]

    done, limits = call(330, SPEED_RESERVE="")  # the default reserve, 240 s: 80 s before it, every step runs
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "out" / "results.json").is_file()  # OUT_DIR relative to the caller, not to the script
    assert [module for _, module in limits] == STEPS, limits
    (checks, *benches, bench) = [seconds for seconds, _ in limits]
    assert 70 <= checks <= 80 and all(50 <= s <= 80 for s in benches) and bench >= 320, limits
    done, limits = call(270, "--merge")  # 20 s, every kernel table in the archive already: none is left over
    assert done.returncode == 0 and "left to a later call" not in done.stdout, done.stdout[-2000:]
    assert [module for _, module in limits] == ["mlmtrain.cli"], limits
    os.remove(tmp_path / "out" / "kernels.tar.gz")

    done, limits = call(270, "--merge", CHECKS="1")  # 20 s: nothing before the rows
    assert done.returncode == 1 and "no time for the GPU checks" in done.stdout, done.stdout[-2000:]
    assert "left to a later call for want of time: checks attention layernorm gelu attention_large" in done.stdout
    assert [module for _, module in limits] == ["mlmtrain.cli"], limits

    done, limits = call(900, "--merge", CHECKS="1")  # the later call
    assert done.returncode == 0 and [module for _, module in limits] == STEPS, done.stdout[-2000:]


def test_bench_gpu_sh_claims_its_folder_first_and_a_merge_call_keeps_the_first_calls_log(tmp_path):
    """scripts/bench_gpu.sh with a stand-in python3 and nvidia-smi: a user's folder holding a file under a name it
    writes (bench.log) is refused before anything is written (exit 2, no bench run, the file as it was); a
    --merge call logs to bench_merge.log and leaves the first call's bench.log as it was."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.sh"
    env, calls = _stand_in_tools(tmp_path, ("python3",))

    def call(out, *flags):
        calls.write_text("")
        return subprocess.run(["bash", str(script), str(out), *flags], env=env, capture_output=True, text=True)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "bench.log").write_text("my notes")
    done = call(foreign)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert [f.name for f in foreign.iterdir()] == ["bench.log"] and (foreign / "bench.log").read_text() == "my notes"
    assert "mlmtrain.cli" not in calls.read_text()

    out = tmp_path / "out"
    done = call(out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (out / "bench.log").write_text("the first call's log")
    done = call(out, "--sections", "sweep", "--merge")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (out / "bench.log").read_text() == "the first call's log" and (out / "bench_merge.log").is_file()
