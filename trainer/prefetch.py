"""Running an iterator ahead of its consumer: `Prefetcher` on one background thread (prepare's reader, whose
file reads and decompression release the GIL while the main thread tokenizes; the trainer's packer by
default), `ProcessPrefetcher` in a spawned process (the trainer's packer with data.packer = process: its
Python loops then hold another process's GIL, not the one the training loop's kernel launches wait for;
bench_packing measures the difference).

The consumer sees items in order, the end of the stream, or the producer's exception re-raised in its own
thread. `close()` stops the producer and joins it, so no thread or process outlives its use (a daemon thread
still running inside torch at interpreter exit can abort the process).
"""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from mlmtrain.errors import UserError

_END = object()


class Prefetcher:
    """Runs `items` on a background thread, at most `depth` items ahead; `transform` (e.g. pinning a batch)
    runs on that thread too. Iterate it, or call `get()` (None at the end). `wait_s` is the total time the
    consumer waited for an item."""

    def __init__(self, items: Iterable, depth: int = 4, transform: Callable | None = None, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._done = False
        self.wait_s = 0.0
        self._thread = threading.Thread(
            target=self._run, args=(iter(items), transform), daemon=True, name=f"mlmtrain-{name}"
        )
        self._thread.start()

    def _put(self, item) -> bool:
        """Put unless stopped; False once the consumer asked to stop."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator, transform: Callable | None) -> None:
        try:
            for item in items:
                if not self._put(transform(item) if transform else item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer instead of dying silently
            self._put(e)

    def get(self):
        """The next item, or None at the end of the stream; re-raises the producer's exception."""
        if self._done:
            return None
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if item is _END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def __iter__(self):
        while (item := self.get()) is not None:
            yield item

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the producer and wait for its thread to end (it checks every 0.1 s between items)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- process


class ProcessPrefetcher:
    """`items` (picklable) iterated in a spawned process, at most `depth` items ahead. An item's numpy arrays
    and CPU tensors cross through `depth` shared-memory slots of `slot_bytes` (pickle protocol 5, out of band;
    what does not fit goes in the message) and are copied out before the slot is handed back, so the consumer
    owns what it gets; `then` runs on each item in the consumer's process (pinning: page-locked memory is the
    pinning process's). The producer ignores SIGINT, SIGTERM and SIGHUP (the consumer's stop handling decides) and ends
    when asked, when its parent is gone, or killed by `close()` or at interpreter exit. Same interface as
    `Prefetcher`, whose thread it replaces where the producer's Python would hold the consumer's GIL."""

    def __init__(self, items: Iterable, slot_bytes: int, depth: int = 4, then: Callable | None = None,
                 name: str = "prefetch"):  # fmt: skip
        import torch  # the slots are shared tensors: spawn hands them to the child as file descriptors
        import torch.multiprocessing

        if multiprocessing.current_process().daemon:
            raise UserError(f"the {name} cannot run in a process of its own from this daemonic process (a pool "
                            "worker's, say): use data.packer = thread")  # fmt: skip

        context = torch.multiprocessing.get_context("spawn")  # never fork a process that holds CUDA and threads
        slots = [torch.empty(slot_bytes, dtype=torch.uint8).share_memory_() for _ in range(max(depth, 1))]
        self._slots = [slot.numpy() for slot in slots]  # (slot_bytes,) uint8 views, one per slot
        self._ready, ready_end = context.Pipe(duplex=False)  # child -> parent: (slot, message) per item
        free_end, self._free = context.Pipe(duplex=False)  # parent -> child: a slot to fill, or None: stop
        self._process = context.Process(
            target=_produce, args=(items, slots, ready_end, free_end, os.getpid()),
            daemon=True, name=f"mlmtrain-{name}",
        )  # fmt: skip
        self._process.start()
        ready_end.close(), free_end.close()  # the child's ends: only the child holds them now
        for k in range(len(slots)):
            self._free.send(k)
        self._then, self._done = then, False
        self.wait_s = 0.0
        atexit.register(self.close)  # runs before multiprocessing's own exit hook joins its children

    def get(self):
        """The next item, or None at the end of the stream; re-raises the producer's exception."""
        if self._done:
            return None
        t0 = time.perf_counter()
        try:
            while not self._ready.poll(1.0):
                if not self._process.is_alive():
                    raise EOFError
            message = self._ready.recv_bytes()
        except (EOFError, OSError):
            self._done = True
            self._process.join(1.0)  # its exit code, once it has one
            raise RuntimeError(f"the {self._process.name} process ended unexpectedly (exit code "
                               f"{self._process.exitcode}; killed for memory?)") from None  # fmt: skip
        self.wait_s += time.perf_counter() - t0
        try:
            kind, payload = pickle.loads(message)
        except Exception as e:  # an exception of the producer's that cannot be rebuilt here
            self._done = True
            raise RuntimeError(f"the {self._process.name} process sent what cannot be read back: {e!r}") from None
        if kind == "item":
            k, pickled, places = payload
            buffers = [bytearray(self._slots[k][at : at + n]) if n >= 0 else at for at, n in places]  # copies
            try:
                self._free.send(k)
            except OSError:  # the producer is gone: the next get says so
                pass
            item = pickle.loads(pickled, buffers=buffers)
            return self._then(item) if self._then else item
        self._done = True
        if kind == "error":
            raise payload
        return None  # kind == "end"

    def __iter__(self):
        while (item := self.get()) is not None:
            yield item

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the producer: ask, read what it is still sending for up to `timeout_s`, then kill it."""
        atexit.unregister(self.close)
        deadline = time.monotonic() + timeout_s
        try:
            self._free.send(None)
        except OSError:  # it has gone already, or this was closed before
            pass
        while self._process.is_alive() and time.monotonic() < deadline:
            try:
                if self._ready.poll(0.05):
                    self._ready.recv_bytes()  # a producer blocked on a full pipe must get past its send to see the stop
            except (EOFError, OSError):  # its end is closed: it is on its way out
                self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._ready.close(), self._free.close()
        self._slots = []  # the shared memory goes with the last reference

    def __enter__(self) -> ProcessPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pickler(pickle.Pickler):
    """Protocol 5 with a plain CPU tensor pickled as its numpy array, so its bytes go out of band as well (any
    other tensor, e.g. bf16 or one that requires grad, is pickled as torch pickles it)."""

    def reducer_override(self, obj):
        torch = sys.modules.get("torch")
        if torch is not None and type(obj) is torch.Tensor and obj.device.type == "cpu" and not obj.requires_grad:
            try:
                return torch.from_numpy, (obj.numpy(),)
            except (TypeError, RuntimeError):  # no numpy dtype (bf16), a conjugate bit
                pass
        return NotImplemented


def _produce(items: Iterable, slots, ready, free, parent: int) -> None:
    """The child process: fill the slot the parent hands back with the next item's out-of-band buffers. Ends
    quietly when the parent asks, or is gone (its pipe ends closed, or another process is its parent)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # stop requests: the loop's to answer, saved
        signal.signal(sig, signal.SIG_IGN)
    views = [slot.numpy() for slot in slots]
    try:
        for item in items:
            k = _next_slot(free, parent)
            if k is None or not _send(ready, ("item", (k, *_write(item, views[k])))):
                return
        _send(ready, ("end", None))
    except BaseException as e:  # handed to the consumer, as a thread's would be, with where it happened
        where = "".join(traceback.format_exception(e))
        try:
            if not isinstance(e, UserError):  # a bug's traceback, not a user's one sentence
                e.add_note("in the producer process:\n" + where)
            pickle.dumps(e)
        except Exception:  # not picklable: its text and traceback instead
            e = RuntimeError(where)
        _send(ready, ("error", e))


def _next_slot(free, parent: int) -> int | None:
    """The next slot the parent hands back, or None: asked to stop, or the parent is gone."""
    while not free.poll(1.0):
        if os.getppid() != parent:
            return None
    try:
        return free.recv()
    except (EOFError, OSError):
        return None


def _send(ready, message) -> bool:
    """Send to the parent; False when it is gone (a closed pipe)."""
    try:
        ready.send(message)
        return True
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return False


def _write(item, slot: np.ndarray) -> tuple[bytes, list[tuple]]:
    """Pickle `item`, its out-of-band buffers into `slot` (64-byte aligned) while they fit, the rest in the
    message. Returns (message, places): per buffer (offset, length) in the slot, or (bytes, -1)."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(item)
    places, at = [], 0
    for buffer in buffers:
        raw = np.frombuffer(buffer.raw(), dtype=np.uint8)  # (n,) no copy
        if at + raw.size <= slot.size:
            slot[at : at + raw.size] = raw
            places.append((at, raw.size))
            at += -(-raw.size // 64) * 64
        else:
            places.append((bytearray(raw), -1))  # writable on the other side, as the slot's copies are
    return out.getvalue(), places
