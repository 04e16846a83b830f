"""Data-parallel training on CPU with gloo and 2 processes (torchrun), against one process.

Every comparison uses the same global batch: grad_accum=4, so one process runs 4 micro-batches per step
and each of 2 processes runs 2 (global micro-batch b goes to rank b % 2, masks are keyed by the token's
index within the step; the first micro-batch of each rank skips the gradient sync: DDP no_sync / FSDP
set_requires_gradient_sync). fp32, dropout 0: only the order of the gradient sums differs, so the losses
agree to ~1e-7 relative; we assert rtol 1e-5 (the tolerance of the accumulation test in test_train.py).

Each torchrun launch costs a few seconds on 2 cores, so the tests share one 1-process reference run and
launch 8 jobs in all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlmtrain import checkpoint as ckpt
from mlmtrain import parallel
from mlmtrain.config_load import load_config
from mlmtrain.errors import UserError
from mlmtrain.train import train

RTOL = 1e-5
STEPS = 4
# the loss curve needs no launch to be short: 4 steps of a tiny model on 1024-token micro-batches
SETTINGS = {
    "model.size": "tiny",
    "data.tokens_per_batch": 1024,
    "train.max_steps": STEPS,
    "train.seed": 0,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.eval_batches": 2,
    "train.device": "cpu",
    "train.compile": "off",
    "model.dropout": 0.0,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 2,
    "optim.grad_accum": 4,
    "train.checkpoint_every": 2,
}


def config(data_dir, tokenizer_dir, out, **overrides):
    return load_config(
        None,
        {
            "out_dir": str(out),
            "data.data_dir": str(data_dir),
            "data.tokenizer_dir": str(tokenizer_dir),
            **SETTINGS,
            **overrides,
        },
    )


def cli_args(data_dir, tokenizer_dir, out, **overrides) -> list[str]:
    """`mlmtrain train` arguments for SETTINGS (+ overrides) as --set flags."""
    settings = {"data.data_dir": data_dir, "data.tokenizer_dir": tokenizer_dir, "out_dir": out, **SETTINGS, **overrides}
    args = ["train"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def env(**extra) -> dict:
    # CPU and gloo even on a GPU machine; a short collective timeout bounds any hang
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        parallel.TIMEOUT_ENV: "60",
        **extra,
    }


def torchrun(args: list[str], timeout: float = 180, script=None, **extra_env) -> subprocess.CompletedProcess:
    """`mlmtrain <args>` in 2 processes, or `script` (a launcher such as tests/faults.py, with its own
    arguments) running it."""
    launch = script or ["-m", "mlmtrain.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *launch, *args]
    return subprocess.run(cmd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> training loss (or another per-step metric, e.g. grad_norm) from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if "loss" in r}


def assert_match(got: dict[int, float], want: dict[int, float], what: str) -> None:
    steps = sorted(got)
    assert steps and all(s in want for s in steps), (what, steps, sorted(want))
    a, b = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
    rel = np.abs(a - b) / np.abs(b)
    assert np.all(rel <= RTOL), (
        f"{what}: differs beyond rtol {RTOL}: max rel {rel.max():.3g}, "
        f"mean rel {rel.mean():.3g}\n got  {a.tolist()}\n want {b.tolist()}"
    )


def step_dir(run: Path, step: int) -> Path:
    return run / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step)


@pytest.fixture(scope="module")
def one_process(data_dir, tokenizer_dir, tmp_path_factory):
    """The reference: one process, 4 micro-batches per step, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("one") / "run"
    summary = train(config(data_dir, tokenizer_dir, run))
    return run, summary


# ---- no launch -------------------------------------------------------------------------------------


def test_the_agent_runs_the_command_without_nproc_and_the_ranks_code_is_the_commands():
    from mlmtrain.launch import ranks_exit_code, torchrun_argv

    argv = torchrun_argv(["train", "--nproc", "2", "--data", "d", "--nproc=3", "--out", "o"], 4)
    assert argv == ["--standalone", "--nproc-per-node", "4", "-m", "mlmtrain.cli", "train", "--data", "d", "--out", "o"]
    assert ranks_exit_code({0: 143, 1: 143}, 2) == 143 and ranks_exit_code({0: 3, 1: -15}, 2) == 3
    assert ranks_exit_code({1: 130}, 2) == 130  # rank 0 ended first, cleanly
    assert ranks_exit_code({0: 1, 1: 2}, 2) == 2  # rank 1 refused its input; rank 0 lost its peer
    assert ranks_exit_code({1: 1}, 2) == 1 and ranks_exit_code({0: 143, 1: 1}, 2) == 143
    # rank 0 lost its peer (exit 1) after rank 1 crashed: the line names rank 1, which recorded its error


def test_the_line_after_a_crash_names_the_rank_that_failed_first(capsys, tmp_path):
    from types import SimpleNamespace

    from mlmtrain.launch import finished_code, first_failed, ranks_exit_code

    def failure(code, error_file="<N/A>", timestamp=100):  # as torch fills ProcessFailure without an error file
        return SimpleNamespace(exitcode=code, error_file=error_file, timestamp=timestamp)

    assert first_failed({0: failure(1), 1: failure(-9)}) == 1  # killed by a signal
    assert first_failed({0: failure(1), 1: failure(1, error_file="/tmp/r1/error.json")}) == 1  # recorded its error
    assert first_failed({0: failure(1, timestamp=101), 1: failure(7, timestamp=100)}) == 1  # the earlier one
    # a signal that reached the launcher after the last step: rank 0's summary says what the run exits with
    summary = tmp_path / "summary.json"
    assert finished_code(summary, 0.0) is None
    summary.write_text(json.dumps({"exit_code": 0}))
    assert finished_code(summary, 0.0) == 0 and finished_code(summary, time.time() + 60) is None

    assert ranks_exit_code({0: 1, 1: 1}, 2, culprit=1) == 1
    assert "rank 1 of 2 exited with 1" in capsys.readouterr().err
    assert ranks_exit_code({0: 1, 1: -9}, 2, culprit=1) == 1
    assert "rank 1 of 2 was killed by signal 9" in capsys.readouterr().err


@pytest.mark.slow
def test_nproc_in_process_leaves_the_caller_as_it_was(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """`cli.main([... "--nproc", "2"])` runs the agent in this process: the environment, the signal handlers
    and the loggers it changes are put back (a later run would otherwise record the first one's command)."""
    import logging

    from mlmtrain.cli import main

    for key, value in env().items():
        if key != "PYTHONUNBUFFERED":
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("OMP_NUM_THREADS")
    before_env, before_int = dict(os.environ), signal.getsignal(signal.SIGINT)
    before_levels = {
        n: lg.level for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }
    run = tmp_path / "two"
    assert main([*cli_args(data_dir, tokenizer_dir, run, **{"train.max_steps": 2}), "--nproc", "2"]) == 0
    assert dict(os.environ) == before_env and signal.getsignal(signal.SIGINT) is before_int
    after = {n: lg.level for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    assert {n: after[n] for n in before_levels} == before_levels
    state = json.loads((ckpt.complete_checkpoints(run)[-1] / "state.json").read_text())
    assert state["command"].startswith("mlmtrain train ") and state["command"].endswith("--nproc 2")


def test_a_micro_batchs_backward_runs_inside_the_gradient_sync_skip(monkeypatch, data_dir, tokenizer_dir, tmp_path):
    """FSDP2 reads `set_requires_gradient_sync` in its post-backward hook, so a backward run after `no_sync`
    closed reduce-scattered every micro-batch's gradients (DDP reads its flag in the forward). The skip is
    spied on in one process: a gradient hook records whether it fires inside it."""
    inside, seen = [False], []

    @contextlib.contextmanager
    def spy(model, last):
        if not seen:
            p = next(model.parameters())
            p.register_hook(lambda g: seen.append(inside[0]) or g)
        inside[0] = not last
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(parallel, "no_sync", spy)
    train(config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 1, "optim.grad_accum": 2}))
    assert seen == [True, False]  # micro-batch 0's gradients inside the skip, the last one's outside


def test_window_totals_are_summed_on_the_host_group(monkeypatch):
    """A log window's job totals go through the host (gloo) group as a CPU tensor: on NCCL they were a device
    tensor read back with .tolist(), a device sync at every window close that train.async_log_reads avoids."""
    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append((t.device.type, group))
        t.mul_(2)  # two ranks with equal numbers

    host_group = object()
    monkeypatch.setattr(parallel, "active", lambda: True)
    monkeypatch.setattr(parallel.dist, "all_reduce", all_reduce)
    monkeypatch.setitem(parallel._host, "group", host_group)
    assert parallel.sum_over_ranks(3, 1.5) == [6.0, 3.0]
    assert calls == [("cpu", host_group)]


def test_window_totals_stay_exact_past_float32(monkeypatch):
    """A window's job token count passes 2**24 (a few steps of 512k-token batches): summed in float64, it is
    exact to the token (a float32 tensor would round 16,777,217 to 16,777,216)."""
    monkeypatch.setattr(parallel, "active", lambda: True)
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda t, op=None, group=None: t.mul_(2))
    monkeypatch.setitem(parallel._host, "group", object())
    assert parallel.sum_over_ranks(2**24 + 1, 3 * 10**15 + 1) == [2**25 + 2, 6 * 10**15 + 2]


def test_user_mistakes_are_one_sentence(monkeypatch, data_dir, tokenizer_dir, tmp_path):
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match="positive number of seconds"):
        parallel.timeout()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them; checked before joining any group
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="fp16 loss scaling"):
        parallel.check_shard("fsdp", "fp16")
    with pytest.raises(UserError, match="grad_accum=3 must be a multiple of the number of processes"):
        train(config(data_dir, tokenizer_dir, tmp_path / "run", **{"optim.grad_accum": 3}))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match=r"^rank 1 of 2: bad input$"):
        with parallel.name_failing_rank():
            raise UserError("bad input")


# ---- DDP -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_across_world_sizes(one_process, data_dir, tokenizer_dir, tmp_path):
    """`mlmtrain train --nproc 2` (execs torchrun) == one process, step by step; a checkpoint written by 2
    processes resumes in 1 and one written by 1 resumes in 2, both landing on the uninterrupted losses."""
    ref_run, ref = one_process
    want = losses(ref_run)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "mlmtrain.cli", *cli_args(data_dir, tokenizer_dir, two), "--nproc", "2"]
    done = subprocess.run([*cmd, "--profile-steps", "2:3"], env=env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_match(losses(two), want, "2 processes vs 1")
    # Adam hides a constant gradient scale from the losses; the pre-clip gradient norm does not
    assert_match(losses(two, "grad_norm"), losses(ref_run, "grad_norm"), "gradient norm, 2 processes vs 1")
    # rank 0 alone logs and writes: one config, one metrics row per step, one summary; every rank its own trace
    assert done.stdout.count("config (resolved):") + done.stderr.count("config (resolved):") == 1
    assert done.stdout.count("\ndone: ") == 1 and done.stdout.count("profile: traced steps 2..2") == 1
    assert {p.name for p in (two / "profile").glob("trace_rank*.json")} == {"trace_rank0.json", "trace_rank1.json"}
    assert sorted(losses(two)) == list(range(1, STEPS + 1))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["real_tokens"] == ref["real_tokens"]  # job totals, exactly
    row = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_gpu"])
    assert row["tflops"] == pytest.approx(2 * row["tflops_per_gpu"])
    assert not list(two.glob("**/.tmp_*")) and sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]

    # 2 -> 1: resume the 2-process step-2 checkpoint in this process
    two_to_one = train(config(data_dir, tokenizer_dir, tmp_path / "two_to_one"), resume=str(step_dir(two, 2)))
    assert two_to_one["steps_this_run"] == 2
    assert_match(losses(tmp_path / "two_to_one"), want, "resumed 2 -> 1")

    # 1 -> 2: resume the 1-process step-2 checkpoint with 2 processes, log windows read one window late
    one_to_two = tmp_path / "one_to_two"
    args = cli_args(data_dir, tokenizer_dir, one_to_two, **{"train.async_log_reads": True})
    done = torchrun([*args, "--resume", str(step_dir(ref_run, 2))])
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(losses(one_to_two)) == [3, 4]
    assert_match(losses(one_to_two), want, "resumed 1 -> 2")


# ---- FSDP2 -----------------------------------------------------------------------------------------


def test_fsdp_resumes_and_is_resumed_by_any_world_size(one_process, data_dir, tokenizer_dir, tmp_path):
    """FSDP2 (fully_shard per layer + root) with 2 processes, started from the 1-process step-2
    checkpoint (full weights sharded, optimizer state set with set_optimizer_state_dict), saving every
    step (full state gathered to rank 0): losses equal the 1-process run's, the saved files have the
    1-process layout (tied decoder weight stored once), and one process resumes them exactly."""
    ref_run, _ = one_process
    want = losses(ref_run)
    run = tmp_path / "fsdp"
    done = torchrun(
        [
            *cli_args(data_dir, tokenizer_dir, run, **{"train.shard": "fsdp", "train.checkpoint_every": 1}),
            "--resume",
            str(step_dir(ref_run, 2)),
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_match(losses(run), want, "FSDP 2 processes vs 1")
    assert_match(losses(run, "grad_norm"), losses(ref_run, "grad_norm"), "gradient norm, FSDP vs 1 process")

    ours, theirs = (
        load_file(step_dir(run, 4) / "model.safetensors"),
        load_file(step_dir(ref_run, 4) / "model.safetensors"),
    )
    assert list(ours) == list(theirs) and "cls.predictions.decoder.weight" not in ours
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst < 1e-5, f"FSDP step-4 weights differ from 1 process by {worst:.3g}"
    opt_ours = load_file(step_dir(run, 4) / "optimizer.safetensors")
    opt_theirs = load_file(step_dir(ref_run, 4) / "optimizer.safetensors")
    assert sorted(opt_ours) == sorted(opt_theirs)
    assert all(opt_ours[k].shape == opt_theirs[k].shape for k in opt_ours)

    back = train(config(data_dir, tokenizer_dir, tmp_path / "fsdp_to_one"), resume=str(step_dir(run, 3)))
    assert back["steps_this_run"] == 1
    assert_match(losses(tmp_path / "fsdp_to_one"), want, "FSDP checkpoint resumed by 1 process")


def test_fsdp_bf16_from_scratch(one_process, data_dir, tokenizer_dir, tmp_path):
    """FSDP2 from initialisation with the bf16 MixedPrecisionPolicy (bf16 compute under autocast, fp32
    gradient reduction and fp32 sharded master weights): close to the fp32 run (rtol 1e-3: bf16 matmul
    inputs move these losses by ~6e-5 relative), and the saved weights are fp32."""
    ref_run, _ = one_process
    run = tmp_path / "fsdp_bf16"
    done = torchrun(cli_args(data_dir, tokenizer_dir, run, **{"train.shard": "fsdp", "train.precision": "bf16"}))
    assert done.returncode == 0, done.stdout + done.stderr
    got, want = losses(run), losses(ref_run)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-3)
    weights = load_file(step_dir(run, 4) / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


# ---- failures --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_crash_in_one_rank_ends_the_job_naming_it_and_the_job_resumes_exactly(data_dir, tokenizer_dir, tmp_path):
    """Rank 1 raises at step 3 while rank 0 waits in the step's all-reduce: the job ends (no hang) well
    within the collective timeout, non-zero, and the output names rank 1 and its error. Resumed from its
    step-2 checkpoint at the same world size, with dropout on, it continues bit for bit like a job that
    never crashed (each rank gets its own generator state back)."""
    dropout = {"model.dropout": 0.1}
    straight = tmp_path / "straight"
    done = torchrun(cli_args(data_dir, tokenizer_dir, straight, **dropout))
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "crash"
    t0 = time.time()
    faults = [str(Path(__file__).with_name("faults.py")), "--crash-rank", "1", "--crash-step", "3", "--"]
    done = torchrun(cli_args(data_dir, tokenizer_dir, run, **dropout), timeout=120, script=faults)
    elapsed = time.time() - t0
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "mlmtrain train: rank 1 of 2 failed: RuntimeError: test crash" in out, out
    assert "rank      : 1 (local_rank: 1)" in out, out  # torchrun's failure summary
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_00000002"]

    done = torchrun([*cli_args(data_dir, tokenizer_dir, run, **dropout), "--resume"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert losses(run) == losses(straight), "the resumed job diverged from the uninterrupted one"


@pytest.mark.slow
def test_each_rank_draws_dropout_masks_of_its_own(data_dir, tokenizer_dir, tmp_path):
    """One seed on every rank gave every replica the same dropout masks wherever the draws have the same shapes
    (rows of a fixed length here; on a GPU, every step): the noise of N ranks was one rank's. The weights are
    still made the same on every rank; the generator states saved per rank must differ."""
    run = tmp_path / "rows"
    settings = {"model.dropout": 0.1, "data.layout": "rows", "train.max_steps": 1, "train.checkpoint_every": 1,
                "train.seed": 2**64 - 1}  # the largest seed: rank 1's own must not overflow  # fmt: skip
    done = torchrun(cli_args(data_dir, tokenizer_dir, run, **settings))
    assert done.returncode == 0, done.stdout + done.stderr
    rng = load_file(ckpt.latest_checkpoint(run) / "rng.safetensors")
    assert not torch.equal(rng["rank0.cpu"], rng["rank1.cpu"])


def test_a_resume_gives_a_rank_its_own_streams_only_if_it_saved_them(tmp_path, monkeypatch):
    """A checkpoint written on CPUs has no GPU streams, and one written before ranks drew masks of their own holds
    rank 0's on every rank: either way the rank must draw its own (train re-seeds it), not keep rank 0's."""
    from safetensors.torch import save_file

    state = torch.get_rng_state()
    other = torch.Generator().manual_seed(7).get_state()
    monkeypatch.setattr(parallel, "active", lambda: True)
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    monkeypatch.setattr(parallel, "world_size", lambda: 2)

    def restored(rng: dict, device: str) -> bool:
        save_file({k: v.clone() for k, v in rng.items()}, tmp_path / "rng.safetensors")
        try:
            return ckpt.restore_rng(tmp_path, {"world_size": 2}, torch.device(device))
        finally:
            torch.set_rng_state(state)

    assert restored({"cpu": state, "rank0.cpu": state, "rank1.cpu": other}, "cpu")
    assert not restored({"cpu": state, "rank0.cpu": state, "rank1.cpu": state}, "cpu")  # rank 0's: not its own
    assert not restored({"cpu": state, "rank0.cpu": state, "rank1.cpu": other}, "cuda")  # no GPU stream saved


def test_a_resume_draws_from_the_stream_its_gpu_drew_from_whatever_gpus_are_visible(tmp_path, monkeypatch):
    """rng.safetensors holds every visible GPU's stream (cuda0 ... cuda11). A resume restored them all only when
    as many GPUs were visible as at the save (else none, silently: dropout no longer as if uninterrupted), and in
    string order (cuda10 went to GPU 2). It restores the stream of the GPU the run drew from, on the run's GPU."""
    from safetensors.torch import save_file

    streams = {f"cuda{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(12)}
    save_file({"cpu": torch.get_rng_state(), **streams}, tmp_path / "rng.safetensors")
    got = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: got.append((int(state[0]), device)))
    for saved_on in ("cuda:10", "cuda:2"):
        ckpt.restore_rng(tmp_path, {"resolved": {"train.device": saved_on}}, torch.device("cuda", 0))
    ckpt.restore_rng(tmp_path, {}, torch.device("cuda", 1))  # a checkpoint without the record: the default GPU's
    ckpt.restore_rng(tmp_path, {"resolved": {"train.device": "cuda:3"}}, torch.device("cpu"))  # a CPU resume: none
    assert got == [(10, torch.device("cuda", 0)), (2, torch.device("cuda", 0)), (0, torch.device("cuda", 1))]


def test_a_run_that_drew_on_the_cpu_restores_no_gpu_stream_when_resumed_on_a_gpu(tmp_path, monkeypatch):
    """A run trained with train.device=cpu on a machine with GPUs saved their streams, and drew from none of them:
    resumed on a GPU, none is restored (cuda0's would not be the stream its dropout drew from)."""
    from safetensors.torch import save_file

    streams = {f"cuda{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(2)}
    save_file({"cpu": torch.get_rng_state(), **streams}, tmp_path / "rng.safetensors")
    got = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: got.append((int(state[0]), device)))
    ckpt.restore_rng(tmp_path, {"resolved": {"train.device": "cpu"}}, torch.device("cuda", 0))
    assert got == []


def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (from /proc)."""
    out = {}
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = pid
    return out


def _stop_a_two_process_run(run: Path, data_dir, tokenizer_dir, send, ignored=()) -> tuple[subprocess.Popen, str]:
    """`mlmtrain train --nproc 2` with one log window of 1,000 steps (a stop cannot wait for a log step), signalled
    by `send(proc)` once the ranks train; started with the signals `ignored` ignored (as `nohup` starts a command);
    (the process, its output)."""
    settings = {"train.max_steps": 5000, "train.log_every": 1000, "train.checkpoint_every": 0}
    cmd = [sys.executable, "-m", "mlmtrain.cli", *cli_args(data_dir, tokenizer_dir, run, **settings), "--nproc", "2"]

    def start_ignoring():
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)

    proc = subprocess.Popen(
        cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=start_ignoring,
    )  # fmt: skip
    lines, started = [], threading.Event()

    def read():  # rank 0 prints its start-up line ("device ...") just before the loop; the ranks meet at step 1
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("device "):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # not a fixed sleep: on a loaded machine the ranks' start-up (imports, gloo) took longer than one
        assert started.wait(timeout=180), "".join(lines)
        time.sleep(3)  # both ranks training (a few ms per step here)
        assert len(_worker_pids(proc.pid)) == 2, "".join(lines)
        send(proc)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["rank 1", "every process"])
def test_a_sigterm_stops_every_rank_at_the_next_step_saved_and_the_command_exits_143(
    to, data_dir, tokenizer_dir, tmp_path
):
    """SIGTERM to rank 1 alone (a preempted worker), or to every process of the job at once (a scheduler's
    cancel: each rank then gets it twice, from the scheduler and from the agent): every rank stops after the
    same step, far from a log step, rank 0 saves one complete checkpoint, and `mlmtrain train --nproc 2`
    exits 143 (torchrun would exit 1), so `... && mlmtrain export` does not publish a partial model."""
    run = tmp_path / "stop"

    def send(proc):
        if to == "rank 1":
            os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)

    proc, out = _stop_a_two_process_run(run, data_dir, tokenizer_dir, send)
    assert proc.returncode == 143 and "Traceback" not in out, out
    assert "second SIGTERM" not in out and "stopped by SIGTERM after step" in out, out
    saved = ckpt.complete_checkpoints(run)
    assert len(saved) == 1, out
    stopped_at = ckpt.read_checkpoint(saved[0])[2]["step"]
    # before the first log step; step 1 where a loaded machine's ranks were still in their first step after 8 s
    assert 1 <= stopped_at < 1000
    assert ckpt.verify_checkpoint(saved[0]) is None
    assert json.loads((run / "summary.json").read_text())["exit_code"] == 143


@pytest.mark.slow
@pytest.mark.parametrize("nohup", [False, True])
def test_a_hangup_stops_every_rank_saved_with_129_unless_the_job_was_started_to_outlive_it(
    nohup, data_dir, tokenizer_dir, tmp_path
):
    """A terminal that hangs up sends SIGHUP to every process of its job: the ranks save and the command exits 129
    (before, each rank died unsaved). Started with SIGHUP ignored (`nohup`), the launcher and the ranks keep it
    ignored and train on (torch's agent would catch it and pass it on): a SIGTERM later still stops them, saved."""
    run = tmp_path / "hup"

    def send(proc):
        os.killpg(proc.pid, signal.SIGHUP)
        if nohup:
            time.sleep(3)  # the time the ranks would take to stop
            assert proc.poll() is None, "a hangup stopped a job started with SIGHUP ignored"
            os.killpg(proc.pid, signal.SIGTERM)

    proc, out = _stop_a_two_process_run(run, data_dir, tokenizer_dir, send, ignored=[signal.SIGHUP] if nohup else [])
    code, name = (143, "SIGTERM") if nohup else (129, "SIGHUP")
    assert proc.returncode == code and "Traceback" not in out, out
    assert f"stopped by {name} after step" in out and ("SIGHUP" in out) != nohup, out
    saved = ckpt.complete_checkpoints(run)
    assert len(saved) == 1 and ckpt.verify_checkpoint(saved[0]) is None, out
    assert json.loads((run / "summary.json").read_text())["exit_code"] == code
