"""One long-lived thread for a process's model work (loading and the engine loop).

libgomp keeps a worker pool per thread that starts parallel regions. A second
such thread makes more managed threads than this host has cores, and libgomp
then stops spinning between regions and sleeps on a futex in every one. Measured
here (2 cores): a 16 x 576 x 1536 GEMM took 447 us from a second thread against
260-315 us from the first, and the server's decode loop, running on its own
thread after the model was loaded on the main one, spent 1.6x the forward time
of the same requests run offline. So a server loads its model and steps its
engine on one thread of this kind.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    """Runs submitted callables one after another on one daemon thread."""

    def __init__(self, name: str = "baton-compute"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the thread and return its result (or raise its exception)."""
        return self.submit(fn).result()

    def close(self) -> None:
        """End the thread once the jobs before this call have run."""
        self._jobs.put(None)

    @property
    def ident(self):
        return self._thread.ident
