"""The session's queued batches of pipelined requests, and the *flusher* thread that sends them.

A connection queues a pipelined request while its worker still has earlier ones to answer
(Nagle's algorithm, for messages) and lists itself here; its owning thread sends its queue before
it sends or waits for anything else, and the flusher sends a queue that has waited ``delay``
seconds (about a millisecond) with nothing else sending it. The flusher only ever *tries* a
connection's lock: it never blocks on a socket its owner is using.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import zmq

from ..errors import ZmqSyftError
from ..wire import transport
from ..wire.codec import encode_message
from ..wire.messages import NO_REPLY, Op
from .lost import gone, refused

__all__ = ["Outboxes", "Batching", "BATCH_DELAY"]

log = logging.getLogger("zmqsyft.client.connection")

BATCH_DELAY = 0.001  # seconds a queued batch waits at most before the flusher thread sends it


class Queueing(Protocol):
    """What the flusher needs of a connection with a queue."""

    thread: int
    lock: Any
    queued_at: float

    def flush_outbox(self) -> None: ...

    def flush_foreign(self, blocking: bool) -> None: ...


class Batching:
    """A connection's own queue of pipelined requests (a mixin of
    :class:`~zmqsyft.client.connection.Connection`, which owns the attributes named here)."""

    outbox: list[bytes]
    outboxes: Outboxes
    queued_at: float
    thread: int
    lock: Any
    sock: zmq.Socket | None
    watch: Any  # (its transport.PeerWatch)
    inflight: dict[int, Any]
    worker: Any

    def poll_replies(self) -> None: ...

    def _fail(self, exc: BaseException) -> BaseException: ...


    gathering = False  # (together(): pipelined requests queue until the block ends)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        r"""Queue this thread's pipelined ``CALL``\ s to the worker until the block ends, then
        send them in one message (a plan's ops)."""
        self.gathering = True
        try:
            yield
        finally:
            self.gathering = False
            with self.lock:
                self.flush_outbox()

    def _behind(self) -> bool:
        """Whether the worker has requests of ours still to answer (a new one may then queue)."""
        if self.outbox:
            return True
        if len(self.inflight) and self.sock is not None:
            self.poll_replies()  # they may have been answered meanwhile
        return bool(self.inflight)

    def _queue(self, header: bytes, limit: int) -> None:
        outbox = self.outbox
        outbox.append(header)
        if self not in self.outboxes.queued:  # (a delete may be in the outbox, not yet listed)
            self.queued_at = time.monotonic()
            self.outboxes.add(self)
        if len(outbox) >= limit and not self.gathering:
            self.flush_outbox()

    def _flush_all(self) -> None:
        self.outboxes.flush_mine()
        self.flush_outbox()  # one the flusher failed to send (no longer listed as queued)

    def flush_foreign(self, blocking: bool) -> None:
        """Send the queue from a thread that does not own this connection: the flusher (which
        never waits for the lock), or a thread about to name an object a queued request creates.
        Never raises: the owning thread meets a failure on its next send."""
        if not self.lock.acquire(blocking=blocking):
            return
        try:
            self.flush_outbox()
        except Exception as exc:  # noqa: BLE001 - the outbox was kept for the owner
            self.outboxes.queued.pop(self, None)
            log.debug("batch to %s not sent from another thread: %s", self.worker.id, exc)
        finally:
            self.lock.release()

    def flush_outbox(self) -> None:
        """Send the queued requests as one message. The caller holds ``lock``."""
        outbox = self.outbox
        if not outbox:
            return
        self.outbox = []
        self.outboxes.queued.pop(self, None)
        if self.sock is None:
            return
        frames: list[Any] = ([outbox[0]] if len(outbox) == 1
                             else encode_message(Op.BATCH, NO_REPLY, {"msgs": outbox}))
        try:
            transport.send(self.sock, frames)
        except zmq.ZMQError as exc:
            if threading.get_ident() != self.thread:  # the flusher: leave it to the owner
                self.outbox = outbox + self.outbox
                raise
            # (why: the worker died, refused the connection, or the link is lost)
            raise self._fail(self._unsendable(f"a batch of {len(outbox)} pipelined requests",
                                              exc)) from exc

    def _unsendable(self, what: str, exc: zmq.ZMQError) -> ZmqSyftError:
        """Why nothing can be sent on this connection: the worker refused it during the
        handshake, or it is lost (libzmq has no peer to queue the message for)."""
        if self.watch is not None:  # (the event that explains it may be on its way)
            self.watch.monitor.poll(200)
        why = self.watch.down() if self.watch is not None else None
        if self.watch is not None and self.watch.refused is not None:
            return refused(self.worker, self.watch.refused, f"{what} was not sent")
        return gone(self.worker, why or f"the connection was lost ({exc})", what)


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
                    if now - conn.queued_at >= delay and not getattr(conn, "gathering", False):
                        conn.flush_foreign(blocking=False)
