"""The one background thread that runs an iterator ahead of its consumer: prepare's reader (blocks of text
decoded while the tokenizer works) and the trainer's packer (batches built into pinned memory while the
device works). Threads, not processes: numpy, file reads and the tokenizers library release the GIL, and
`tokenizers` turns its own parallelism off in a process forked after it was used.

The consumer sees items in order, the end of the stream, or the producer's exception re-raised in its own
thread. `close()` stops the producer and joins it, so no thread outlives the object (a daemon thread still
running inside torch at interpreter exit can abort the process).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

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
