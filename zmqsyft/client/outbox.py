"""The session's queued batches of pipelined requests, and the *flusher* thread that sends them.

A connection queues a pipelined request while its worker still has earlier ones to answer
(Nagle's algorithm, for messages) and lists itself here; its owning thread sends its queue before
it sends or waits for anything else, and the flusher sends a queue that has waited ``delay``
seconds (about a millisecond) with nothing else sending it. The flusher only ever *tries* a
connection's lock: it never blocks on a socket its owner is using.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

__all__ = ["Outboxes", "BATCH_DELAY"]

BATCH_DELAY = 0.001  # seconds a queued batch waits at most before the flusher thread sends it


class Queueing(Protocol):
    """What the flusher needs of a connection with a queue."""

    thread: int
    lock: Any
    queued_at: float

    def flush_outbox(self) -> None: ...

    def flush_foreign(self, blocking: bool) -> None: ...


class Outboxes:
    """The connections of a session with queued pipelined requests, oldest batch first, and the
    *flusher* thread that sends a batch nothing else has sent within ``delay`` seconds."""

    def __init__(self, stopping: threading.Event) -> None:
        self.queued: dict[Queueing, None] = {}
        self.delay = BATCH_DELAY
        self._stopping = stopping
        self._wakeup = threading.Event()
        self._flusher: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, conn: Queueing) -> None:
        """``conn`` has started a batch: the flusher sends it if nothing else does soon."""
        self.queued[conn] = None
        if self._flusher is None and not self._stopping.is_set():
            with self._lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_stale,
                                                     name="zmqsyft-flusher", daemon=True)
                    self._flusher.start()
        self._wakeup.set()

    def flush_mine(self) -> None:
        """Send every batch this thread has queued, oldest first."""
        me = threading.get_ident()
        for conn in list(self.queued):
            if conn.thread == me:
                with conn.lock:
                    conn.flush_outbox()

    def wake(self) -> None:
        self._wakeup.set()

    def _flush_stale(self) -> None:
        """The flusher thread: sends batches that have waited ``delay`` (never blocks on a
        socket its owner is using; the owner flushes before it waits for anything)."""
        while not self._stopping.is_set():
            self._wakeup.wait()
            self._wakeup.clear()
            while self.queued:
                delay = self.delay
                if self._stopping.wait(min(delay, 0.05)):
                    return
                now = time.monotonic()
                for conn in list(self.queued):
                    if now - conn.queued_at >= delay:
                        conn.flush_foreign(blocking=False)
