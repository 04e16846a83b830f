"""The packer process (data.packer = process, prefetch.ProcessPrefetcher): items in order through shared-memory
slots, the producer's errors as the consumer's, no process left behind however the consumer ends, and training
with it equal to training with the thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mlmtrain.errors import UserError
from mlmtrain.packing import BatchStream, PackedBatch
from mlmtrain.prefetch import Prefetcher, ProcessPrefetcher
from mlmtrain.prepare import read_meta, shard_specials
from mlmtrain.train import train


@dataclass(frozen=True)
class Numbered:
    """Items i = 0..n-1 (forever with n = None): arrays of i, one bigger than a slot; then `error` if given."""

    n: int | None
    error: tuple | None = None  # (exception class, message): raised in the producer
    big: int = 5000

    def __iter__(self):
        i = 0
        while self.n is None or i < self.n:
            yield {"i": i, "ids": torch.arange(i, i + 7, dtype=torch.int32), "lengths": np.full(3, i),
                   "big": np.full(self.big, float(i)), "name": f"item {i}"}  # fmt: skip
            i += 1
        if self.error is not None:
            raise self.error[0](self.error[1])


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no")


class TwoArguments(Exception):  # pickles, but cannot be rebuilt from its args
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def two_arguments(message: str) -> TwoArguments:
    return TwoArguments(message, "b")


@dataclass(frozen=True)
class Tensors:
    """One item of tensors pickle cannot take as numpy arrays: bf16, one that requires grad, a Parameter."""

    def __iter__(self):
        yield [
            torch.ones(3, dtype=torch.bfloat16),
            torch.ones(2, requires_grad=True),
            torch.nn.Parameter(torch.ones(2)),
        ]


def test_items_arrive_in_order_as_the_consumers_own():
    with ProcessPrefetcher(Numbered(9), slot_bytes=1024, depth=2) as items:
        got = list(items)
        assert items.get() is None  # the end stays the end
    assert items._process.exitcode == 0  # it ended on its own: close() had nothing to kill
    items.close()  # twice is harmless (the loop and the run both close it)
    assert [g["i"] for g in got] == list(range(9))
    for i, g in enumerate(got):  # the slots were reused 4 times: each item kept its own copy
        assert g["ids"].tolist() == list(range(i, i + 7)) and g["ids"].dtype == torch.int32
        assert g["lengths"].tolist() == [i] * 3 and (g["big"] == i).all() and g["name"] == f"item {i}"
        assert g["big"].size == 5000  # 40 kB: past the 1 kB slot, so it came in the message
    got[0]["ids"][0] = 99  # writable, and nobody else's
    got[0]["big"][0] = 99  # the one that came in the message too
    assert got[2]["ids"][0] == 2 and got[2]["big"][0] == 2


def test_tensors_without_a_numpy_form_are_pickled_as_torch_pickles_them():
    with ProcessPrefetcher(Tensors(), slot_bytes=4096) as items:
        bf16, grad, parameter = items.get()
    assert bf16.dtype == torch.bfloat16 and bf16.tolist() == [1.0] * 3
    assert grad.requires_grad and type(parameter) is torch.nn.Parameter


def test_then_runs_in_the_consumer():
    with ProcessPrefetcher(Numbered(2), slot_bytes=4096, then=lambda item: (os.getpid(), item["i"])) as items:
        assert list(items) == [(os.getpid(), 0), (os.getpid(), 1)]


def test_the_producers_error_is_the_consumers():
    with ProcessPrefetcher(Numbered(2, (UserError, "the shards are damaged")), slot_bytes=4096) as items:
        assert [g["i"] for g in (items.get(), items.get())] == [0, 1]
        with pytest.raises(UserError, match="^the shards are damaged$"):
            items.get()
        assert items.get() is None
    with ProcessPrefetcher(Numbered(0, (Unpicklable, "odd")), slot_bytes=4096) as items:
        with pytest.raises(RuntimeError, match="Unpicklable: odd"):
            items.get()
    with ProcessPrefetcher(Numbered(0, (two_arguments, "a")), slot_bytes=4096) as items:
        with pytest.raises(RuntimeError, match="cannot be read back"):
            items.get()
        assert items.get() is None
    with ProcessPrefetcher(Numbered(0, (ValueError, "a bug")), slot_bytes=4096) as items:
        with pytest.raises(ValueError, match="a bug") as raised:
            items.get()
    assert "in the producer process" in raised.value.__notes__[0] and "__iter__" in raised.value.__notes__[0]


def test_close_ends_a_producer_waiting_for_a_slot():
    items = ProcessPrefetcher(Numbered(None), slot_bytes=4096, depth=2)
    assert items.get()["i"] == 0
    process = items._process
    t0 = time.perf_counter()
    items.close()
    assert not process.is_alive() and time.perf_counter() - t0 < 5


def test_a_killed_producer_is_one_clear_error():
    items = ProcessPrefetcher(Numbered(None), slot_bytes=4096, depth=2)
    items.get()
    os.kill(items._process.pid, signal.SIGKILL)
    items._process.join()
    with pytest.raises(RuntimeError, match=r"the mlmtrain-prefetch process ended unexpectedly \(exit code -9"):
        while True:  # the two items it had sent before may still be read
            items.get()
    items.close()


def test_the_producer_leaves_interrupts_to_the_consumer():
    """Ctrl-C reaches the whole process group and SIGTERM (a batch scheduler's) and SIGHUP (a terminal that
    hung up) may too: the producer keeps going, so the loop can finish its step and save."""
    with ProcessPrefetcher(Numbered(4), slot_bytes=4096, depth=1) as items:
        assert items.get()["i"] == 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(items._process.pid, sig)
        time.sleep(0.5)
        assert [g["i"] for g in items] == [1, 2, 3]


ORPHAN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_prefetch import Numbered
from mlmtrain.prefetch import ProcessPrefetcher
if __name__ == "__main__":
    items = ProcessPrefetcher(Numbered(None), slot_bytes=4096, depth=1)
    items.get()
    print(items._process.pid, flush=True)
    time.sleep(60)
"""


def test_no_producer_outlives_a_killed_consumer(tmp_path):
    script = tmp_path / "consumer.py"
    script.write_text(ORPHAN.format(tests=os.path.dirname(__file__)))
    consumer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(consumer.stdout.readline())
    consumer.kill()
    consumer.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the producer outlived its consumer"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _fields(batch: PackedBatch) -> list:
    return [batch.input_ids.tolist(), batch.position_ids.tolist(), batch.cu_seqlens.tolist(),
            None if batch.segment_ids is None else batch.segment_ids.tolist(), batch.num_real_tokens,
            batch.num_segments, batch.index, batch.cursor_after, batch.max_segment_len,
            None if batch.segment_lengths is None else batch.segment_lengths.tolist()]  # fmt: skip


@pytest.mark.parametrize("rows", [False, True], ids=["flat", "rows"])
def test_the_process_builds_the_threads_batches(data_dir, rows):
    stream = BatchStream(str(data_dir), rows, 2048, 128, 0, "sentence", 0, 1, True,
                         shard_specials(read_meta(data_dir)), (0, 3), 5, 1, 2000)  # fmt: skip
    with Prefetcher(stream) as thread, ProcessPrefetcher(stream, stream.batch_bytes()) as process:
        for _ in range(6):
            a, b = thread.get(), process.get()
            assert _fields(a) == _fields(b)


def test_training_with_the_packer_process_equals_the_thread(data_dir, tokenizer_dir, tmp_path):
    from test_train import tiny_config

    settings = {"train.max_steps": 3}
    thread = train(tiny_config(data_dir, tokenizer_dir, tmp_path / "thread", **settings))
    process = train(
        tiny_config(data_dir, tokenizer_dir, tmp_path / "process", **settings, **{"data.packer": "process"})
    )
    assert process["losses"] == thread["losses"]


def test_sigterm_to_the_whole_group_stops_the_run_with_a_checkpoint(data_dir, tokenizer_dir, tmp_path):
    """A batch scheduler signals every process of the job: the packer process keeps serving until the loop has
    saved, and goes with it (nothing of the group is left)."""
    from test_train import _train_cli_args, _wait_for, losses

    from mlmtrain import checkpoint

    run = tmp_path / "run"
    args = [*_train_cli_args(data_dir, tokenizer_dir, run, 400), "--set", "data.packer=process"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert _wait_for(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM received" in out and "Traceback" not in out
    assert checkpoint.read_checkpoint(checkpoint.latest_checkpoint(run))[2]["step"] >= 2
    assert _wait_for(lambda: not _group_alive(proc.pid), timeout=10), "a process of the run outlived it"


def _group_alive(group: int) -> bool:
    """Any process of the group that has not ended (a zombie has: init reaps it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()  # state, ppid, pgrp, ...
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[2] == str(group) and fields[0] != "Z":
            return True
    return False


def test_bench_packing_measures_the_loop_beside_each_packer(data_dir):
    from mlmtrain.benchmarks.bench_packing import loop_cost

    cpus = os.sched_getaffinity(0)
    for where in ("none", "thread", "process"):
        row = loop_cost(data_dir, "rows", where, tokens_per_batch=2048, steps=3, launches=20, device_ms=1.0)
        assert row["packer"] == where and 0 < row["loop_ms_median"] <= row["loop_ms_max"]
        assert os.sched_getaffinity(0) == cpus  # the loop's CPUs are given back


def test_the_thread_runs_at_most_depth_items_ahead():
    """The producer thread runs at most `depth` items ahead of the consumer (plus the one it holds): the packer
    never holds an epoch's batches in memory."""
    import time

    from mlmtrain.prefetch import Prefetcher

    made = []

    def items():
        for i in range(100):
            made.append(i)
            yield i

    with Prefetcher(items(), depth=3) as ahead:
        assert ahead.get() == 0
        time.sleep(0.5)
        assert len(made) <= 1 + 3 + 1  # the one handed out, `depth` queued, one waiting to be put
        assert list(ahead) == list(range(1, 100))
