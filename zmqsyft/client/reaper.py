"""Freeing what dropped pointers owned: weak references, the delete queue, and its timer thread.

Deletes are never sent from ``__del__``: a dropped pointer only appends ``(address, id)`` to a
lock-free queue. The queue is flushed, batched per worker, in one message with the next request
any thread sends to that worker, by the *reaper* thread after ``gc_interval`` seconds, at every
synchronisation point, and at exit.

The reaper thread also keeps this session's objects alive on every worker it holds pointers to:
a worker frees a session's objects once none of its connections has been open for its lease
(``Config.lease``, told in its HELLO reply), and a connection that ZeroMQ re-made after a network
blip is the session's again only once something is sent on it. Every quarter lease the reaper
sends a ``PING`` that wants no reply on its own connection to each such worker.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from typing import Any, Protocol

from ..config import Config
from ..errors import ZmqSyftError
from ..wire.bodies import Del, Ping
from ..wire.codec import encode_message
from ..wire.messages import NO_REPLY, Op
from .connection import Connection
from .handle import WorkerHandle
from .lost import quietly

__all__ = ["Reaper"]

log = logging.getLogger(__name__)


class Owner(Protocol):
    """What the reaper needs of its session."""

    @property
    def cfg(self) -> Config: ...

    def find(self, address: str) -> WorkerHandle | None: ...

    def conn(self, worker: WorkerHandle) -> Connection: ...

    def tidy_connections(self) -> None: ...

    def workers(self) -> list[WorkerHandle]: ...


class Reaper:
    """The delete queue of one session and the thread that flushes it on a timer.

    Attributes
    ----------
    queue : deque of (address, id)
        Objects to free, in the order they were dropped.
    """

    def __init__(self, owner: Owner, stopping: threading.Event) -> None:
        self.owner = owner
        self.queue: collections.deque[tuple[str, int]] = collections.deque()
        # id of a weak reference to each owning pointer -> (the reference, what to free when the
        # pointer dies); keyed by id, never by the reference, whose == would compare pointers
        self._tracked: dict[int, tuple[weakref.ref[Any], tuple[str, int]]] = {}
        self._wakeup = threading.Event()
        self._stopping = stopping
        self.lock = threading.Lock()  # held while the reaper thread flushes
        self._thread: threading.Thread | None = None
        self._flushing = threading.local()

    # ------------------------------------------------------------- tracking
    def track(self, ptr: Any, address: str, obj_id: int) -> weakref.ref[Any]:
        """Free ``obj_id`` at ``address`` when ``ptr`` is garbage collected.

        A plain weak reference with a callback (a few times cheaper than ``weakref.finalize``,
        which matters at one per op); the table keeps it alive and says what to free.
        """
        ref = weakref.ref(ptr, self._release)
        self._tracked[id(ref)] = (ref, (address, obj_id))
        if self._thread is None:  # (the keep-alives)
            self._ensure_thread()
        return ref

    def untrack(self, ref: weakref.ref[Any] | None) -> None:
        if ref is not None:
            self._tracked.pop(id(ref), None)

    def _release(self, ref: weakref.ref[Any]) -> None:
        # runs inside garbage collection: append only, no locks, no I/O
        entry = self._tracked.pop(id(ref), None)
        if entry is None:  # untracked meanwhile, or already released at exit
            return
        self.free_later(*entry[1])

    def free_later(self, address: str, obj_id: int) -> None:
        """Queue a delete of ``obj_id`` on the worker at ``address`` (sent like a dropped
        pointer's: with the next request to it, or by the timer)."""
        self.queue.append((address, obj_id))
        self._ensure_thread()
        self._wakeup.set()

    def forget_all(self) -> None:
        """In the child of a fork: what the pointers own is the parent's to free; nothing is."""
        self._tracked.clear()
        self.queue.clear()

    def release_all(self) -> None:
        """At exit: every pointer still alive lets go of what it owns."""
        while self._tracked:
            _, (_, target) = self._tracked.popitem()
            self.queue.append(target)

    # ------------------------------------------------------------- flushing
    def flush(self, wait: bool, timeout: float | None = None,
              rider: Connection | None = None) -> bytes | None:
        """Send every queued delete, one DEL per worker, on this thread's connections.

        ``rider``: the connection this thread is about to send a request on; the DEL for its
        worker is not sent but returned (a reply-less header to send in one message with it).
        """
        if getattr(self._flushing, "on", False):
            return None
        batches: dict[str, list[int]] = collections.defaultdict(list)
        while True:
            try:
                address, obj_id = self.queue.popleft()
            except IndexError:
                break
            batches[address].append(obj_id)
        if not batches:
            return None
        self._flushing.on = True
        ride = None
        try:
            with quietly():  # (what fails here is logged, not said to anyone)
                sent = []
                for address, ids in batches.items():
                    worker = self.owner.find(address)
                    if worker is None or not worker.ready or worker.lost is not None:
                        continue  # (a worker gone, or not heard of since it was lost: dropped)
                    conn = self.owner.conn(worker)
                    if conn is rider:
                        ride = encode_message(Op.DEL, NO_REPLY, Del(ids=ids))[0]
                        continue
                    try:
                        # nobody waits for a delete flushed in passing (``wait=False``): it gets no
                        # reply (freeing what is gone already is no error) and rides with the next
                        # request to that worker
                        sent.append((conn, conn.send(Op.DEL, Del(ids=ids), what="delete",
                                                     flush_deletes=False, silent=not wait)))
                    except ZmqSyftError as exc:
                        log.info("could not free %d objects on %s: %s", len(ids), worker.id, exc)
                if wait:
                    for conn, req_id in sent:
                        try:
                            conn.wait(req_id, timeout)
                        except ZmqSyftError as exc:
                            log.info("freeing objects on %s failed: %s", conn.worker.id, exc)
        finally:
            self._flushing.on = False
        return ride

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopping.is_set():
            self._thread = threading.Thread(target=self._run, name="zmqsyft-reaper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()  # the last keep-alives
        while not self._stopping.is_set():
            # (at least once a second: a worker's lease is learnt after this thread started)
            due = last + self._keepalive_every() - time.monotonic()
            if self._wakeup.wait(min(1.0, max(0.0, due))):
                self._wakeup.clear()
                # give the caller's own next message the chance to carry the deletes
                if self._stopping.wait(self.owner.cfg.gc_interval):
                    return
                with self.lock:
                    try:
                        self.flush(wait=True)
                        self.owner.tidy_connections()
                    except Exception:  # noqa: BLE001 - the reaper must survive anything
                        log.exception("zmqsyft reaper failed to flush deletes")
            if time.monotonic() >= last + self._keepalive_every():
                last = time.monotonic()
                with self.lock:
                    try:
                        self._keepalive()
                    except Exception:  # noqa: BLE001
                        log.exception("zmqsyft reaper failed to send keep-alives")

    def _holding(self) -> set[str]:
        """The addresses of the workers this session holds objects on."""
        while True:
            try:
                return {target[0] for _, target in self._tracked.values()}
            except RuntimeError:  # changed size meanwhile (another thread made a pointer)
                continue

    def _keepalive_every(self) -> float:
        """A quarter of the shortest lease among this session's workers (no scan of the
        pointers: this runs every second)."""
        leases = [w.lease for w in self.owner.workers() if w.lease > 0]
        return max(min([self.owner.cfg.lease, *leases]) / 4, 0.05)

    def _keepalive(self) -> None:
        with quietly():
            self._keepalives()

    def _keepalives(self) -> None:
        for address in self._holding():
            worker = self.owner.find(address)
            if worker is None or worker.closed or not worker.ready:
                continue
            try:
                conn = self.owner.conn(worker)
                conn.send(Op.PING, Ping(), what="keep-alive", flush_deletes=False, silent=True)
                conn.poll_replies()  # (its HELLO reply, the first time)
            except ZmqSyftError as exc:
                log.debug("keep-alive to %s failed: %s", worker.id, exc)

    def wake(self) -> None:
        self._wakeup.set()
