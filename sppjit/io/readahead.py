"""Reading a trace ahead of its replay, on a thread of its own.

Reading and checking a batch (Arrow's decoding, the column checks) and replaying the one
before it both run outside the GIL for most of their time, so on two cores they overlap: a
file's replay then costs the larger of the two, not their sum. The batches come out in the
reader's order, an error where the reader would raise it (after the batches before it), and
at most ``depth`` batches wait decoded: memory stays bounded by batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

_END = object()
_POLL_SECONDS = 0.1  # how often a producer blocked on a full queue looks for close()


class ReadAhead:
    """Iterate ``reader`` on a daemon thread, ``depth`` batches ahead. Use it as a context
    manager (or call close()): leaving early stops the thread and drops what it read."""

    def __init__(self, reader: Iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(reader,), daemon=True,
                                        name="sppjit-read-ahead")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, reader: Iterator) -> None:
        try:
            for batch in reader:
                if not self._put((batch, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((None, exc))
            return
        self._put((_END, None))

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        batch, error = self._queue.get()
        if error is not None:
            self._done = True
            raise error
        if batch is _END:
            self._done = True
            raise StopIteration
        return batch

    def close(self) -> None:
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
