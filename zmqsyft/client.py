"""The caller's side of the protocol: connections, request ids, deadlines, deletes.

Sockets belong to one thread: each thread that talks to a worker gets its own DEALER to it (so a
thread's requests to one worker stay in order), and a background *reaper* thread with sockets of
its own flushes the deletes of dropped pointers on a short timer.

Requests are **pipelined**: a request that needs no answer right away (an op whose result shape
was inferred locally) is sent and the caller goes on; its acknowledgement is read later. While
the worker still has earlier ones to answer, such requests queue and go out together as one
``BATCH`` (see :mod:`zmqsyft.connection`); a *flusher* thread sends a queue nothing else has sent
within about a millisecond. The
in-flight entry keeps the pointers it names alive until then, so a delete can never overtake the
request that uses or creates the object. An error in such a request marks its result pointers as
failed (using them raises it) and is raised at the next synchronisation point on that connection.

Deletes are never sent from ``__del__``: a dropped pointer only appends ``(address, id)`` to a
lock-free queue. The queue is flushed, batched per worker, before the next request any thread
sends, by the reaper after ``gc_interval`` seconds, at every synchronisation point, and at exit.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import transport
from .codec import encode_message
from .config import Config, get_config
from .connection import BATCH_DELAY, Connection
from .errors import ZmqSyftError
from .messages import NO_REPLY, Op

if TYPE_CHECKING:
    from .launch import WorkerClient

__all__ = ["Client", "get_client"]

log = logging.getLogger(__name__)


class Client:
    """The process-wide caller: worker handles, per-thread connections, the delete queue."""

    def __init__(self, config: Config | None = None) -> None:
        self._cfg = config
        self.name = f"client:{socket.gethostname()}:{os.getpid()}"
        self.ctx = transport.context()
        self._local = threading.local()
        self._lock = threading.RLock()
        self._workers: dict[int, WorkerClient] = {}
        self._deletes: collections.deque[tuple[str, int]] = collections.deque()
        # id of a weak reference to each owning pointer -> (the reference, what to free when the
        # pointer dies); keyed by id, never by the reference, whose == would compare pointers
        self._tracked: dict[int, tuple[weakref.ref[Any], tuple[str, int]]] = {}
        self._gc_wakeup = threading.Event()
        self._stopping = threading.Event()
        self._reaper_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._flushing = threading.local()
        # connections with queued pipelined requests, oldest batch first (see Connection)
        self.queued: dict[Connection, None] = {}
        self._queue_wakeup = threading.Event()
        self._flusher: threading.Thread | None = None
        self._flusher_lock = threading.Lock()  # not the reaper's: it is held across a flush
        self.batch_delay = BATCH_DELAY
        atexit.register(self._at_exit)

    @property
    def cfg(self) -> Config:
        """The config in force: the one given, else the process-wide one (``sy.configure``)."""
        return self._cfg if self._cfg is not None else get_config()

    # ------------------------------------------------------------- workers
    def register(self, worker: WorkerClient) -> WorkerClient:
        with self._lock:
            self._workers[id(worker)] = worker
        return worker

    def find(self, address: str) -> WorkerClient | None:
        """The open handle whose worker is bound at ``address``, if any."""
        with self._lock:
            for w in self._workers.values():
                if not w.closed and (w._ready_address or w.address_hint) == address:
                    return w
        return None

    def worker_at(self, address: str, name: str) -> WorkerClient:
        """The handle for the worker at ``address`` (a connected one is made if unknown)."""
        with self._lock:
            worker = self.find(address)
            if worker is None:
                from .launch import WorkerClient

                worker = self.register(WorkerClient._connected(self, address, name))
            return worker

    def forget(self, worker: WorkerClient) -> None:
        with self._lock:
            self._workers.pop(id(worker), None)

    def workers(self) -> list[WorkerClient]:
        with self._lock:
            return [w for w in self._workers.values() if not w.closed]

    def conn(self, worker: WorkerClient) -> Connection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(worker)
        if conn is None:
            conn = conns[worker] = Connection(self, worker)
        return conn

    def _thread_conns(self) -> list[Connection]:
        return list(getattr(self._local, "conns", {}).values())

    def drop_connections(self, worker: WorkerClient) -> None:
        """Close this thread's connection to a worker that is being closed."""
        conn = getattr(self._local, "conns", {}).pop(worker, None)
        if conn is not None:
            conn.close()

    # ----------------------------------------------------- queued batches
    def queue(self, conn: Connection) -> None:
        """``conn`` has started a batch: the flusher sends it if nothing else does soon."""
        self.queued[conn] = None
        if self._flusher is None and not self._stopping.is_set():
            with self._flusher_lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_stale,
                                                     name="zmqsyft-flusher", daemon=True)
                    self._flusher.start()
        self._queue_wakeup.set()

    def flush_queued(self) -> None:
        """Send every batch this thread has queued, oldest first."""
        me = threading.get_ident()
        for conn in list(self.queued):
            if conn.thread == me:
                with conn.lock:
                    conn.flush_outbox()

    def _flush_stale(self) -> None:
        """The flusher thread: sends batches that have waited ``batch_delay`` (never blocks on
        a socket its owner is using; the owner flushes before it waits for anything)."""
        while not self._stopping.is_set():
            self._queue_wakeup.wait()
            self._queue_wakeup.clear()
            while self.queued:
                delay = self.batch_delay
                if self._stopping.wait(min(delay, 0.05)):
                    return
                now = time.monotonic()
                for conn in list(self.queued):
                    if now - conn.queued_at >= delay:
                        conn.flush_foreign(blocking=False)

    # ------------------------------------------------------------ deletes
    def track(self, ptr: Any, address: str, obj_id: int) -> weakref.ref[Any]:
        """Free ``obj_id`` at ``address`` when ``ptr`` is garbage collected.

        A plain weak reference with a callback (a few times cheaper than ``weakref.finalize``,
        which matters at one per op); the table keeps it alive and says what to free.
        """
        ref = weakref.ref(ptr, self._release)
        self._tracked[id(ref)] = (ref, (address, obj_id))
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
        self._deletes.append((address, obj_id))
        self._ensure_reaper()
        self._gc_wakeup.set()

    def flush_deletes(self, wait: bool, timeout: float | None = None,
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
                address, obj_id = self._deletes.popleft()
            except IndexError:
                break
            batches[address].append(obj_id)
        if not batches:
            return None
        self._flushing.on = True
        ride = None
        try:
            sent = []
            for address, ids in batches.items():
                worker = self.find(address)
                if worker is None:
                    continue
                conn = self.conn(worker)
                if conn is rider:
                    ride = encode_message(Op.DEL, NO_REPLY, {"ids": ids})[0]
                    continue
                try:
                    # nobody waits for a delete flushed in passing (``wait=False``): it gets no
                    # reply (freeing what is gone already is no error) and rides with the next
                    # request to that worker
                    sent.append((conn, conn.send(Op.DEL, {"ids": ids}, what="delete",
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

    def _ensure_reaper(self) -> None:
        if self._reaper is None and not self._stopping.is_set():
            self._reaper = threading.Thread(target=self._reap, name="zmqsyft-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while not self._stopping.is_set():
            self._gc_wakeup.wait()
            self._gc_wakeup.clear()
            # give the caller's own next message the chance to carry the deletes
            if self._stopping.wait(self.cfg.gc_interval):
                return
            with self._reaper_lock:
                try:
                    self.flush_deletes(wait=True)
                    conns = getattr(self._local, "conns", {})
                    for worker, conn in list(conns.items()):
                        conn.deferred.clear()
                        if worker.closed:  # do not keep sockets to closed workers
                            conns.pop(worker).close()
                except Exception:  # noqa: BLE001 - the reaper must survive anything
                    log.exception("zmqsyft reaper failed to flush deletes")

    # -------------------------------------------------------------- sync
    def sync(self) -> None:
        """A synchronisation point: everything this thread issued before has taken effect.

        Waits for every pipelined request of this thread, sends all queued deletes, then asks
        every worker to flush what it relayed on (recursively along pointer chains). Raises the
        first error of a pipelined operation that was not reported yet.
        """
        # one round trip in all: the deletes and each FLUSH go out right behind the requests
        # still in flight (a worker handles one connection's messages in order), then we wait
        self.flush_deletes(wait=False)
        with self._reaper_lock:
            pass  # a delete batch the reaper has in flight is acknowledged
        sent = []
        for worker in self.workers():
            if worker._dirty and worker._ready_address is not None:
                worker._dirty = False
                conn = self.conn(worker)
                sent.append((conn, conn.send(Op.FLUSH, {}, what="flush", flush_deletes=False)))
        conns = self._thread_conns()
        for conn in conns:
            if conn.sock is not None:
                conn.drain()
        for conn, req_id in sent:
            conn.wait(req_id)  # answered by now; raises if the flush failed
        for conn in conns:
            conn.raise_deferred()

    def _at_exit(self) -> None:
        self._stopping.set()
        self._gc_wakeup.set()
        try:
            while self._tracked:  # pointers still alive: free what they own too
                _, (_, target) = self._tracked.popitem()
                self._deletes.append(target)
            for conn in self._thread_conns():
                if conn.sock is not None:
                    try:
                        conn.drain(timeout=min(self.cfg.timeout, 5.0))
                    except ZmqSyftError:
                        pass
            self.flush_deletes(wait=True, timeout=min(self.cfg.timeout, 5.0))
        except Exception:  # noqa: BLE001 - never fail interpreter exit
            log.debug("zmqsyft exit flush failed", exc_info=True)
        for worker in list(self._workers.values()):
            try:
                worker._close_at_exit()
            except Exception:  # noqa: BLE001
                log.debug("closing %s at exit failed", worker, exc_info=True)


_client: Client | None = None
_client_lock = threading.Lock()


def get_client() -> Client:
    """The process-wide :class:`Client` (created on first use)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = Client()
    return _client
