"""The training loop: stored loss curve, gradient accumulation, precision, and runs that survive
(resume, preemption, kill -9 mid-checkpoint, damaged checkpoints, numeric faults)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import numpy as np
import pytest
import torch

from mlmtrain import checkpoint as ckpt
from mlmtrain.config_load import load_config
from mlmtrain.errors import UserError
from mlmtrain.train import train

LOSS_CURVE = Path(__file__).parent / "assets" / "losses" / "tiny_cpu.json"


def tiny_config(data_dir, tokenizer_dir, out, **overrides):
    base = {
        "out_dir": str(out),
        "data.data_dir": str(data_dir),
        "data.tokenizer_dir": str(tokenizer_dir),
        "model.size": "tiny",
        "data.tokens_per_batch": 1024,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.device": "cpu",
        "train.compile": "off",
        "optim.lr": 1e-3,
        "optim.warmup_steps": 2,
    }
    base.update(overrides)
    return load_config(None, base)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_loss_curve_matches_stored(stored_data, tmp_path):
    """A short deterministic tiny run against tests/assets/losses/tiny_cpu.json (fp32, CPU), on the stored
    tokenizer (a freshly trained vocabulary would move the curve). Tolerance 2e-4 relative: the same code on
    another x86 CPU may round matmuls differently; a real change to data, masking, model or optimizer moves it
    far more."""
    data, tokenizer = stored_data
    summary = train(tiny_config(data, tokenizer, tmp_path / "run", **{"train.max_steps": 8}))
    got = [loss for _, loss in summary["losses"]]
    if os.environ.get("MLMTRAIN_UPDATE_LOSSES"):
        LOSS_CURVE.parent.mkdir(parents=True, exist_ok=True)
        LOSS_CURVE.write_text(
            json.dumps({"config": "tiny, 1024 tokens/batch, lr 1e-3, seed 0", "losses": got}, indent=1)
        )
    expected = json.loads(LOSS_CURVE.read_text())["losses"]
    print("got", got, "\nexpected", expected)
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    assert got[-1] < got[0]  # and it learns


def equal_length_shard(data_dir, tokenizer_dir, out: Path, sentence_len: int = 14) -> Path:
    """A shard of equal-length sentences, so batches of T and 2T tokens hold exactly the same
    segments (T is a multiple of sentence_len + 2) and the two packings are comparable."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    rng = np.random.default_rng(0)
    for split, n in (("train", 512), ("valid", 64)):
        (out / split).mkdir(parents=True)
        np.save(out / split / "tokens.npy", rng.integers(5, meta["vocab_size"], n * sentence_len).astype(np.uint16))
        np.save(out / split / "offsets.npy", np.arange(0, n * sentence_len + 1, sentence_len, dtype=np.int64))
        np.save(out / split / "doc_offsets.npy", np.array([0, n], dtype=np.int64))
        meta[split] = {
            **meta[split],
            "sentences": n,
            "tokens": n * sentence_len,
            "documents": 1,
            "max_sentence_len": sentence_len,
            "min_sentence_len": sentence_len,
        }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_gradient_accumulation_equals_one_larger_batch(data_dir, tokenizer_dir, tmp_path):
    """2 micro-batches of 1024 tokens == 1 batch of 2048 tokens, step by step (fp32, no dropout).
    Same segments, same masks (keyed by the token's index within the step), the loss divided by the
    step's total target count in both: only summation order differs, so rtol 1e-5."""
    data = equal_length_shard(data_dir, tokenizer_dir, tmp_path / "eq")
    common = {"data.data_dir": str(data), "model.dropout": 0.0, "train.max_steps": 4}
    accum = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "a", **common, **{"optim.grad_accum": 2}))
    big = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "b", **common, **{"data.tokens_per_batch": 2048}))
    a, b = [x for _, x in accum["losses"]], [x for _, x in big["losses"]]
    print("accum", a, "\nbig  ", b)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bf16_autocast_runs_on_cpu(data_dir, tokenizer_dir, tmp_path):
    summary = train(
        tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.precision": "bf16", "train.max_steps": 3})
    )
    assert summary["precision"] == "bf16" and all(np.isfinite(x) for _, x in summary["losses"])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learning_rate_warms_up_then_decays_to_its_floor(schedule):
    """lr_at: linear warmup to lr over warmup_steps, then the schedule's decay to min_lr_ratio * lr at max_steps."""
    from mlmtrain.train import lr_at

    sets = {"optim.lr": 1e-3, "optim.warmup_steps": 10, "train.max_steps": 110, "optim.schedule": schedule}
    cfg = load_config(None, {**sets, "optim.min_lr_ratio": 0.1})
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    middle = 1e-4 + 9e-4 * 0.5  # half-way through the decay, linear and cosine agree: 0.55 * lr
    quarter = 1e-4 + 9e-4 * (0.75 if schedule == "linear" else 0.5 * (1 + np.cos(np.pi / 4)))
    assert lr_at(35, cfg) == pytest.approx(quarter) and lr_at(60, cfg) == pytest.approx(middle)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)


def test_a_warmup_as_long_as_the_run_is_said(data_dir, tokenizer_dir, tmp_path):
    """--warmup-steps 1000 with --max-steps 3 ran without a word, the peak rate never reached."""
    said = []
    cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 2, "optim.warmup_steps": 2})
    train(cfg, log=said.append)
    assert any(line.startswith("optim.warmup_steps 2 >= train.max_steps 2: the learning rate never") for line in said)
    cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / "ok", **{"train.max_steps": 2, "optim.warmup_steps": 1})
    said.clear()
    train(cfg, log=said.append)
    assert not any("optim.warmup_steps" in line for line in said), said


def test_a_gpu_precision_on_a_cpu_run_is_said(data_dir, tokenizer_dir, tmp_path):
    """train.precision = bf16 (a GPU config's) on a CPU: the run says what it costs there, at its start."""
    said = []
    cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 1, "train.precision": "bf16"})
    train(cfg, log=said.append)
    assert any(line.startswith("a CPU run with precision bf16: ") for line in said), said


@pytest.mark.parametrize("earlier", [None, ["mlmtrain train --out run --max-steps 1"]], ids=["older", "resumed"])
def test_a_resume_keeps_the_commands_that_trained_its_checkpoint(data_dir, tokenizer_dir, tmp_path, monkeypatch,
                                                                 earlier):  # fmt: skip
    """The resumed run's `commands` start with its checkpoint's: all of them (`earlier`, then its own command) for a
    checkpoint that was itself resumed, its one `command` for one an older mlmtrain wrote (no `commands`), so the
    card still shows each command that trained the weights."""
    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 1}))
    first = ckpt.read_state(run / "checkpoints" / "step_00000001")[1]["command"]
    read = ckpt.read_checkpoint

    def saved(path):  # as an older mlmtrain wrote it (no "commands"), or as a resumed run did
        weights, config, state = read(path)
        state = {k: v for k, v in state.items() if k != "commands"}
        return weights, config, {**state, "commands": [*earlier, first]} if earlier else state

    monkeypatch.setattr(ckpt, "read_checkpoint", saved)
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 2}), resume="auto", change_max_steps=True)
    commands = ckpt.read_state(run / "checkpoints" / "step_00000002")[1]["commands"]
    assert commands[:-1] == [*(earlier or []), first] and len(commands) == len(earlier or []) + 2, commands


def test_a_step_that_masks_nothing_is_no_bad_step(data_dir, tokenizer_dir, tmp_path):
    """A step with no masked token (tiny batches, a tiny mask_prob) has loss 0 over 0 targets: counted as 1
    target, not 0/0, so it is no non-finite step to skip."""
    cfg = tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"mask.mask_prob": 1e-6, "train.max_steps": 2})
    summary = train(cfg)
    assert summary["exit_code"] == 0 and summary["bad_steps"] == 0
    assert [loss for _, loss in losses(tmp_path / "run")] == [0.0, 0.0]


def test_validation_batches_are_packed_as_the_training_batches(data_dir, tokenizer_dir, tmp_path):
    """A document-packed run (the README's phase 2) validated on single sentences: its valid loss never saw the
    long contexts the phase trains. Its validation segments are runs of a document's sentences now."""
    from mlmtrain.train import setup

    count = {}  # pack -> (segments, real tokens) of the validation batches
    for pack in ("sentence", "document"):
        run = setup(tiny_config(data_dir, tokenizer_dir, tmp_path / pack, **{"data.pack": pack}))
        try:
            count[pack] = (
                sum(b.num_segments for b in run.valid_batches),
                sum(b.num_real_tokens for b in run.valid_batches),
            )
        finally:
            run.close()
    (sentences, sentence_tokens), (documents, document_tokens) = count["sentence"], count["document"]
    assert documents < sentences and document_tokens / documents > 2 * sentence_tokens / sentences, count


def test_metrics_and_checkpoint_outputs(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 4, "train.eval_every": 2}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s"} <= r.keys() for r in train_rows)
    assert all(0 <= r["device_wait_s"] < 5 for r in train_rows)  # on the CPU each op ran when the loop issued it
    evals = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["valid_accuracy"] <= 1 for r in evals)
    latest = ckpt.latest_checkpoint(run)
    _, config, state = ckpt.read_checkpoint(latest)
    assert state["step"] == 4 and config["run"]["model"]["size"] == "tiny" and config["model"]["hidden_size"] == 128


# ---- runs that survive (checkpoints, resume, preemption, numeric faults) -----------------------


def test_resume_is_bit_exact(data_dir, tokenizer_dir, tmp_path):
    """6 steps straight == 3 steps, stop, resume for 3 more: every loss equal bit for bit (dropout on,
    so the RNG state must come back too)."""
    straight = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "straight"))
    run = tmp_path / "split"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 3}))
    resumed = train(tiny_config(data_dir, tokenizer_dir, run), resume="auto", change_max_steps=True)
    assert resumed["steps_this_run"] == 3
    assert losses(run) == straight["losses"], "the resumed run diverged"


def test_resume_refuses_other_model_or_data(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 1}))
    with pytest.raises(UserError, match="hidden_size"):
        train(tiny_config(data_dir, tokenizer_dir, run, **{"model.size": "mini"}), resume="auto", change_max_steps=True)
    with pytest.raises(UserError, match="data.layout is 'rows' here but 'flat'"):  # other batches and masks
        train(
            tiny_config(data_dir, tokenizer_dir, run, **{"data.layout": "rows"}), resume="auto", change_max_steps=True
        )
    other = equal_length_shard(data_dir, tokenizer_dir, tmp_path / "other")
    with pytest.raises(UserError, match="data shards differ"):
        train(
            tiny_config(data_dir, tokenizer_dir, run, **{"data.data_dir": str(other)}),
            resume="auto",
            change_max_steps=True,
        )


def test_damaged_checkpoint_is_skipped(data_dir, tokenizer_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 4, "train.checkpoint_every": 2}))
    first, newest = ckpt.complete_checkpoints(run)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte
    weights.write_bytes(bytes(data))
    assert ckpt.latest_checkpoint(run) == first
    assert "model.safetensors does not match its sha256" in capsys.readouterr().err
    os.truncate(first / "optimizer.safetensors", 100)  # truncated
    with pytest.raises(UserError, match="no complete checkpoint.*damaged or incomplete: train again into a new"):
        ckpt.latest_checkpoint(run)
    # a run that ended without saving (train.checkpoint_at_end = false) has nothing to resume
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(UserError, match=r"ended without saving one \(train.checkpoint_at_end = false\)"):
        ckpt.latest_checkpoint(run)
    # a run that saved nothing yet (killed before its first save: no summary.json) is started again as named
    (run / "summary.json").unlink()
    with pytest.raises(UserError, match=f"saved none yet: `mlmtrain train --config {run / 'config.json'}` starts"):
        ckpt.latest_checkpoint(run)
    assert train(load_config(run / "config.json"))["steps"] == 4
    # a training process that has not saved yet, a user's folder and a file are named for what they are
    from mlmtrain.run_folder import RunLock

    shutil.rmtree(run / "checkpoints")
    lock = RunLock(run, print)
    with pytest.raises(UserError, match=r"it is training \(pid \d+ .*first checkpoint comes at train.checkpoint_every"):
        ckpt.latest_checkpoint(run)
    lock.release()
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="it is not a run folder of `mlmtrain train`"):
        ckpt.latest_checkpoint(tmp_path / "mine")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="notes.txt is a file, not a run folder or a checkpoint folder"):
        ckpt.latest_checkpoint(tmp_path / "notes.txt")


def test_nan_steps_are_skipped_then_stop(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """Injected non-finite losses: the updates are skipped (weights unchanged), the steps are logged,
    and max_bad_steps consecutive bad steps stop the run with a final checkpoint of the last good state."""
    faults.inject_nan(monkeypatch.setattr, {2, 3, 4, 5})
    run = tmp_path / "run"
    summary = train(
        tiny_config(
            data_dir,
            tokenizer_dir,
            run,
            **{"train.max_steps": 8, "train.max_bad_steps": 3, "train.checkpoint_every": 2},
        )
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "bad_steps" in r]
    assert [r["bad_steps"] for r in rows] == [0, 1, 1, 1] and rows[1]["loss"] is None
    assert "consecutive non-finite" in (summary["stopped_by"] or "")
    w_step2 = ckpt.read_checkpoint(run / "checkpoints" / "step_00000002")[0]
    w_final = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))[0]
    assert all(torch.equal(w_step2[k], w_final[k]) for k in w_step2), "a non-finite step changed the weights"


def _train_cli(data_dir, tokenizer_dir, run, steps, extra_env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    cmd = _train_cli_args(data_dir, tokenizer_dir, run, steps)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(data_dir, tokenizer_dir, tmp_path, capsys):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the message says how to resume;
    resuming reproduces the uninterrupted run's losses bit for bit. (The uninterrupted run, the same command,
    runs in this process: it needs no process of its own, and a new interpreter costs ~5 s.)"""
    from cli_run import in_process

    straight = tmp_path / "straight"
    assert in_process(capsys, *_train_cli_args(data_dir, tokenizer_dir, straight, 40)[3:]).returncode == 0
    run = tmp_path / "run"
    proc = _train_cli(data_dir, tokenizer_dir, run, 40)
    assert _wait_for(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # 128 + SIGTERM: stopped early, so `train && export` does not export
    assert "SIGTERM received" in out and "--resume" in out
    stopped_at = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))[2]["step"]
    assert 3 <= stopped_at < 40
    resumed = subprocess.run(
        [*_train_cli_args(data_dir, tokenizer_dir, run, 40), "--resume"], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert losses(run) == losses(straight)


def _train_cli_args(data_dir, tokenizer_dir, run, steps):
    return [
        sys.executable,
        "-m",
        "mlmtrain.cli",
        "train",
        "--data",
        str(data_dir),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(run),
        "--model",
        "tiny",
        "--tokens-per-batch",
        "1024",
        "--max-steps",
        str(steps),
        "--seed",
        "0",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.eval_batches=2",
        "--set",
        "optim.lr=1e-3",
        "--set",
        "optim.warmup_steps=2",
        "--set",
        "train.device=cpu",
    ]


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_leaves_a_resumable_run(data_dir, tokenizer_dir, tmp_path):
    """kill -9 while a checkpoint is half written (tests/faults.py pauses it before the manifest): the partial
    folder is never taken for a checkpoint, the previous one is used, and the run resumes from it."""
    run = tmp_path / "run"
    assert subprocess.run([*_train_cli_args(data_dir, tokenizer_dir, run, 2)], capture_output=True).returncode == 0
    launcher = [sys.executable, str(Path(__file__).with_name("faults.py")), "--pause-in-checkpoint", "60", "--"]
    proc = subprocess.Popen(
        [*launcher, *_train_cli_args(data_dir, tokenizer_dir, run, 4)[3:], "--resume", "--change-max-steps"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert _wait_for(lambda: any((run / "checkpoints").glob(".tmp_*/model.safetensors")))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    done = subprocess.run(
        [*_train_cli_args(data_dir, tokenizer_dir, run, 4), "--resume", "--change-max-steps"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ckpt.latest_checkpoint(run).name == "step_00000004"


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """A write that fails with ENOSPC (simulated: we run as root, where permissions do not bite) ends
    the run with one sentence, removes the partial folder and leaves the previous checkpoint intact."""
    run = tmp_path / "run"
    train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 2}))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(UserError, match="No space left on device; the previous checkpoint step_00000002 is intact"):
        train(tiny_config(data_dir, tokenizer_dir, run, **{"train.max_steps": 3}), resume="auto", change_max_steps=True)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    assert not list((run / "checkpoints").glob(".tmp_*"))


def test_nothing_we_load_unpickles():
    """Every load in the package goes through safetensors/JSON, or torch.load(weights_only=True). The one pickle
    is the packer process's pipe (prefetch.py): bytes between the trainer and the child it spawned, never a file."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("trainer/*.py"), *root.glob("kernels/*.py")]:
        text = path.read_text(encoding="utf-8")
        if (
            "pickle" in text.replace("unpickle", "").replace("pickle-free", "").replace("no pickle", "")
            and "import pickle" in text
            and path.name != "prefetch.py"
        ):
            offenders.append(f"{path.name}: imports pickle")
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders, offenders


def test_a_window_with_skipped_steps_averages_the_good_ones_and_names_the_bad():
    """Steps 11-16 in windows of 3: the loss is the mean over the window's finite steps, the non-finite ones are
    named by their step, and the streak counts consecutive ones only (a good step resets it)."""
    from types import SimpleNamespace

    from mlmtrain.metrics import WindowStats

    window = WindowStats(torch.device("cpu"), 3, 1, 0.0, SimpleNamespace(wait_s=0.0))
    windows = []
    for step, (loss, bad) in enumerate([(2.0, False), (9.0, True), (4.0, False), (9.0, True), (1.0, False)], 11):
        window.add_batch(SimpleNamespace(num_real_tokens=100, num_segments=4), 1.0)
        window.add_step(torch.tensor(loss), torch.tensor(bad), torch.tensor(1.0))
        if step in (13, 15):
            windows += window.close(step, 1e-3, step == 15)
    first, second = windows
    assert first.row["loss"] == 3.0 and first.bad_steps == [12] and first.row["bad_steps"] == 1
    assert second.row["loss"] == 1.0 and second.bad_steps == [14]
    assert first.max_bad_streak == second.max_bad_streak == 1  # never two in a row


def test_a_log_window_is_timed_until_the_device_has_run_it(monkeypatch):
    """The host runs ahead of the device (by whole steps with CUDA graphs): a window's clock stops only once its
    numbers are read, i.e. once the device has run every step of it, or the work still queued would count in no
    window. A slow read stands in for the device finishing the window."""
    from types import SimpleNamespace

    from mlmtrain.metrics import WindowStats

    window = WindowStats(torch.device("cpu"), 2, 1, 0.0, SimpleNamespace(wait_s=0.0))
    for _ in range(2):
        window.add_batch(SimpleNamespace(num_real_tokens=100, num_segments=4), 1.0)
        window.add_step(torch.tensor(2.0), torch.tensor(False), torch.tensor(1.0))
    tolist = torch.Tensor.tolist

    def device_still_running(self):
        time.sleep(0.3)
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", device_still_running)
    (w,) = window.close(2, 1e-3, False)
    assert w.elapsed_s >= 0.3 and w.row["tokens_per_s"] <= 200 / 0.3 and w.row["loss"] == 2.0


def test_async_log_reads_time_each_window_on_the_device_clock(monkeypatch):
    """train.async_log_reads: a window is read one window later, so the host's clock would stop when it had queued
    the steps, not when they ran: the window after an eval or a save (nothing in flight to wait on) logged the
    host's queueing rate, 2-20x the real one, and the device's time for the window before one fell into the
    excluded eval. The window's time is the device's, between two events, less the host work excluded (a trace's
    export). Events stand in here for CUDA's: each executes at the device time listed."""
    from types import SimpleNamespace

    from mlmtrain.metrics import WindowStats

    # when each recorded event runs on the device: every close records its window's end and the next one's start
    device_ms = iter([0.0, 400.0, 400.0, 1000.0, 1000.0, 5000.0, 5300.0, 5300.0])

    class Event:
        def __init__(self):
            self.at = next(device_ms)

        def elapsed_time(self, end):
            return end.at - self.at

    window = WindowStats(torch.device("cpu"), 2, 1, 0.0, SimpleNamespace(wait_s=0.0), deferred=True)
    monkeypatch.setattr(window, "device_clock", True)
    monkeypatch.setattr(window, "record_event", Event)
    window.restart_clock()  # the first window starts on the device at 0 ms

    def two_steps():
        for _ in range(2):
            window.add_batch(SimpleNamespace(num_real_tokens=100, num_segments=4), 1.0)
            window.add_step(torch.tensor(2.0), torch.tensor(False), torch.tensor(1.0))

    two_steps()
    assert window.close(2, 1e-3, False) == []  # read a window later; its steps ran from 0 to 400 ms
    two_steps()
    window.exclude(0.1)  # a trace's export: 100 ms of the 600 the device's clock shows are no training
    (first,) = window.close(4, 1e-3, False)
    (second,) = window.flush()  # an eval comes: the window in flight is read now
    assert first.elapsed_s == pytest.approx(0.4) and first.row["tokens_per_s"] == pytest.approx(500)
    assert second.elapsed_s == pytest.approx(0.5) and second.row["tokens_per_s"] == pytest.approx(400)
    window.restart_clock()  # after the eval (device 1000..5000 ms): the next window starts at 5000
    two_steps()
    assert window.close(6, 1e-3, True) == []
    (third,) = window.flush()
    assert third.elapsed_s == pytest.approx(0.3) and third.row["loss"] == 2.0 and third.last


@pytest.mark.parametrize("packer", ["thread", "process"])
def test_no_helper_of_a_run_outlives_it(data_dir, tokenizer_dir, tmp_path, monkeypatch, packer):
    """The packer (a thread, or a process) is stopped and joined before `train` returns, done or failed: a daemon
    thread still inside torch at interpreter teardown once aborted about 1 run in 20-30 ("terminate called
    without an active exception", exit 134)."""
    import multiprocessing
    import threading

    from mlmtrain import train as train_module

    def ours():
        return [t.name for t in threading.enumerate() if t.name.startswith("mlmtrain-")] + [
            p.name for p in multiprocessing.active_children() if p.name.startswith("mlmtrain-")
        ]

    overrides = {"train.max_steps": 2, "train.checkpoint_at_end": False, "data.packer": packer}
    train(tiny_config(data_dir, tokenizer_dir, tmp_path / "done", **overrides))
    assert ours() == []
    forward_loss = train_module.forward_loss

    calls = []

    def fails_at_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a fault at step 2")
        return forward_loss(*args)

    monkeypatch.setattr(train_module, "forward_loss", fails_at_step_2)
    with pytest.raises(RuntimeError, match="a fault at step 2"):
        train(tiny_config(data_dir, tokenizer_dir, tmp_path / "failed", **overrides))
    assert ours() == []


def test_a_non_finite_stop_evaluates_and_saves_where_it_stops(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """nan_policy=stop with no eval or checkpoint cadence: the stop at step 3 still evaluates (its valid loss is in
    metrics.jsonl, the summary and the checkpoint) and saves step 3, exiting 3 (kills T08: no eval at a stop;
    T10: no save at a stop)."""
    faults.inject_nan(monkeypatch.setattr, {3})
    run = tmp_path / "run"
    settings = {"train.max_steps": 6, "train.log_every": 1, "train.nan_policy": "stop"}
    summary = train(tiny_config(data_dir, tokenizer_dir, run, **settings), log=lambda m: 0)
    assert summary["exit_code"] == 3 and "non-finite" in summary["stopped_by"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in evals] == [3] and summary["valid_loss"] == evals[0]["valid_loss"]
    assert ckpt.latest_checkpoint(run).name == "step_00000003"
    state = json.loads((ckpt.latest_checkpoint(run) / "state.json").read_text())
    assert state["valid_loss"] == evals[0]["valid_loss"]


def test_fp16_overflows_the_scaler_backs_off_from_are_not_bad_steps(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """fp16: a step whose scaled gradients overflow is the GradScaler's to skip (it halves the scale), routine at a
    run's start and after each growth. Such steps used to count as non-finite, so `nan_policy = "stop"` stopped the
    run at the first one and `max_bad_steps` overflows in a row at the 10th. A scale of 2**40 overflows the first
    steps here; the run goes on, with the scale lowered and the weights of those steps unchanged."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**40))
    run = tmp_path / "run"
    settings = {"train.precision": "fp16", "train.nan_policy": "stop", "train.max_steps": 4}
    summary = train(tiny_config(data_dir, tokenizer_dir, run, **settings))
    assert summary["stopped_by"] is None and summary["steps"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in rows if "bad_steps" in r] == [0, 0, 0, 0]
    assert all(r["loss"] is not None and r["grad_norm"] is None for r in rows if "loss" in r)  # None: inf in JSON


def test_gradients_are_not_touched_when_clipping_is_off(monkeypatch):
    """optim.grad_clip = 0: the norm is measured, and no pass multiplies every gradient by 1 (clip_grad_norm_ with
    an infinite bound does)."""
    from mlmtrain.train import clip_gradients

    model = torch.nn.Linear(3, 2)
    model(torch.ones(4, 3)).sum().backward()
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.allclose(clip_gradients(model, 0.0), want) and not calls
    assert torch.allclose(clip_gradients(model, 1.0), want) and calls  # clipping on: scaled by 1 / norm


class _InfGrad(torch.autograd.Function):
    """The identity forward; an infinite gradient backward: a finite loss whose scaled gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("init_scale, stops", [(2.0, False), (1.0, True)], ids=["scale_1_after", "scale_half_after"])
def test_an_fp16_overflow_is_a_bad_step_once_the_scale_after_it_is_below_1(
    data_dir, tokenizer_dir, tmp_path, monkeypatch, init_scale, stops
):
    """Step 1's loss is finite and its gradients overflow: the GradScaler skips it and halves its scale. The step
    is bad only when the halved scale (read after the scaler's update) is below 1: from 2 to 1 it is routine, from
    1 to 0.5 nan_policy = "stop" stops there."""
    import functools

    from mlmtrain import train as train_module

    real = train_module.forward_loss
    calls = []

    def overflowing(*args, **kwargs):
        loss_sum, targets = real(*args, **kwargs)
        calls.append(1)
        return (_InfGrad.apply(loss_sum) if len(calls) == 1 else loss_sum), targets

    monkeypatch.setattr(train_module, "forward_loss", overflowing)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=init_scale))
    settings = {"train.precision": "fp16", "train.nan_policy": "stop", "train.max_steps": 2}
    summary = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **settings), log=lambda m: 0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows if r.get("step") == 1 and "loss" in r] == [None]  # it overflowed (inf)
    if stops:
        assert summary["steps"] == 1 and "non-finite" in summary["stopped_by"]
    else:
        assert summary["stopped_by"] is None and summary["steps"] == 2


def test_an_fp16_non_finite_loss_is_a_bad_step_whatever_the_scale(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """fp16: a NaN loss is no overflow the scaler backs off from: bad at once (the scale after it: 32768)."""
    faults.inject_nan(monkeypatch.setattr, {2})
    settings = {"train.precision": "fp16", "train.nan_policy": "stop", "train.max_steps": 4}
    summary = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **settings), log=lambda m: 0)
    assert summary["steps"] == 2 and "non-finite" in summary["stopped_by"]


def test_the_steps_clip_to_optim_grad_clip(data_dir, tokenizer_dir, tmp_path, monkeypatch):
    """Each step hands optim.grad_clip to clip_gradients (0 measures only: no clipping to compare against)."""
    from mlmtrain import train as train_module

    seen, real = [], train_module.clip_gradients
    monkeypatch.setattr(train_module, "clip_gradients", lambda model, c: seen.append(c) or real(model, c))
    train(tiny_config(data_dir, tokenizer_dir, tmp_path / "run", **{"train.max_steps": 2, "optim.grad_clip": 0.25}))
    assert seen == [0.25, 0.25]


def test_clipping_off_measures_a_model_with_a_parameter_without_gradient():
    """grad_clip = 0 with a parameter the loss never reached (.grad None, as frozen or unused weights): the norm
    is that of the gradients there are (get_total_norm takes no None), as clip_grad_norm_ gives with clipping on."""
    from mlmtrain.train import clip_gradients

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0](torch.ones(4, 3)).sum().backward()  # the second layer takes no part: its .grad stays None
    assert model[1].weight.grad is None
    want = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[0].parameters()]))
    assert torch.allclose(clip_gradients(model, 0.0), want)
