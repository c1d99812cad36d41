"""The caller's session: worker handles, per-thread connections, deletes, sync, pointers from
descriptors.

Sockets belong to one thread: each thread that talks to a worker gets its own
:class:`~zmqsyft.client.connection.Connection` (a DEALER) to it, so a thread's requests to one
worker stay in order. Requests are **pipelined**: a request that needs no answer right away (an
op whose result shape was inferred locally) is sent and the caller goes on; its acknowledgement is
read later. Queued batches of them are sent by the session's
:class:`~zmqsyft.client.outbox.Outboxes`; the deletes of dropped pointers by its
:class:`~zmqsyft.client.reaper.Reaper`. Handles and pointers reach their session through the
objects they hold (``pointer.location.session``); the process has one, :func:`get_session`.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch.utils import _pytree as pytree

from ..config import Config, get_config, on_change
from ..errors import WorkerUnavailable, ZmqSyftError
from ..keys import KeyPair
from ..wire import transport
from ..wire.bodies import Allow, Flush
from ..wire.messages import Op, PointerDesc
from ..wire.tensors import DTYPES
from . import interrupts
from .connection import Connection
from .handle import WorkerHandle
from .lost import quietly
from .outbox import Outboxes
from .pointer import PointerTensor
from .reaper import Reaper

__all__ = ["Session"]

log = logging.getLogger(__name__)

_sessions: weakref.WeakSet[Session] = weakref.WeakSet()  # (for a fork's child: see _left_behind)


class Session:
    """The process-wide caller: worker handles, per-thread connections, the delete queue.

    Parameters
    ----------
    make_handle : callable
        ``make_handle(session, name, address)``: a handle for a worker met only through a
        pointer (a chain's next hop, a moved object's new home).
    config : Config, optional
        Fixed settings; by default the process-wide ones, followed as :func:`zmqsyft.configure`
        replaces them.

    Attributes
    ----------
    cfg : Config
        The settings in force, which connections and handles read.
    """

    def __init__(self, make_handle: Callable[[Session, str, str], WorkerHandle],
                 config: Config | None = None) -> None:
        self.cfg = config or get_config()
        if config is None:  # follow sy.configure()
            on_change(self._reconfigure)
        self._make_handle = make_handle
        self.pid = os.getpid()
        self.name = f"client:{socket.gethostname()}:{self.pid}"
        # why this session may not be used: set in the child of a fork (see _left_behind)
        self.foreign: str | None = None
        self.keys = KeyPair.fresh()  # who this process is to the workers it spawns
        self.session_id = secrets.token_hex(16)  # what our objects are kept for (leases)
        self.ctx = transport.context()
        self._local = threading.local()
        self._lock = threading.RLock()
        self._workers: dict[int, WorkerHandle] = {}
        self._stopping = threading.Event()
        self.outboxes = Outboxes(self._stopping)
        self.reaper = Reaper(self, self._stopping)
        self._deletes = self.reaper.queue  # what connections look at before each send
        # what every owning pointer calls when it is made or lets go (one call, not two)
        self.track: Callable[[Any, str, int], weakref.ref[Any]] = self.reaper.track
        self.untrack: Callable[[weakref.ref[Any] | None], None] = self.reaper.untrack
        atexit.register(self._at_exit)
        _sessions.add(self)

    def _left_behind(self) -> None:
        """In the child of a fork: every worker, pointer and socket of this session is the
        parent's. The sockets' I/O threads stayed in the parent, and answers would go there,
        so any use of them is refused with an error that says so (never a wait on a socket that
        nothing serves). Dropped pointers free nothing on the parent's workers, and this
        process's exit neither stops nor waits for them. The child gets a session of its own
        for the workers it spawns or connects to (:func:`~zmqsyft.client.launch.get_session`)."""
        self.foreign = (f"belongs to process {self.pid}, of which this process ({os.getpid()}) "
                        "is a fork: a forked process cannot use its parent's workers, pointers "
                        "or connections (their sockets and answers stay with the parent). Spawn "
                        "or connect to workers in this process instead (sy.spawn_worker, "
                        "sy.connect), or do this work in the parent")
        self._local = threading.local()  # (the parent's sockets: left, never closed here)
        self._lock = threading.RLock()  # (another thread may have held it at the fork)
        self.reaper.forget_all()  # (no lock taken: one held by a thread at the fork stays held)
        for worker in self._workers.values():
            worker.left_behind()

    def _reconfigure(self, config: Config) -> None:
        self.cfg = config

    @property
    def batch_delay(self) -> float:
        """Seconds a queued batch of pipelined requests waits before the flusher sends it."""
        return self.outboxes.delay

    @batch_delay.setter
    def batch_delay(self, seconds: float) -> None:
        self.outboxes.delay = seconds

    # ------------------------------------------------------------- workers
    def register(self, worker: WorkerHandle) -> WorkerHandle:
        with self._lock:
            self._workers[id(worker)] = worker
        return worker

    def find(self, address: str) -> WorkerHandle | None:
        """The open handle whose worker is bound at ``address``, if any: the newest (a worker
        spawned again at the address of one that died gets the deletes of its own pointers;
        the dead one's handle, not closed yet, would lose them)."""
        with self._lock:
            for w in reversed(self._workers.values()):
                if w.at(address):
                    return w
        return None

    def worker_at(self, address: str, name: str, key: str = "") -> WorkerHandle:
        """The handle for the worker at ``address`` with public key ``key`` (a connected one is
        made if unknown)."""
        with self._lock:
            worker = self.find(address)
            if worker is None:
                worker = self._make_handle(self, name, address)
                worker.key = key
                self.register(worker)
            elif key and not worker.key:
                worker.key = key
            return worker

    def introduce(self, worker: WorkerHandle) -> None:
        """A worker this process spawned is ready: let the others it spawned accept its
        connections and connect to it (it knew theirs from its start). Those told its key at
        their own start (spawned in one batch) need nothing; the others are told all at once,
        then their answers awaited (not one round trip after the other: 32 workers spawned one
        by one made 496 of them)."""
        if not worker.key:
            return
        sent = []
        for other in self.workers():
            if other is worker or not other.spawned or not other.key or worker.key in other.told:
                continue
            try:
                conn = self.conn(other)
                sent.append((other, conn, conn.send(Op.ALLOW, Allow(keys={worker.id: worker.key}),
                                                    what=f"introducing '{worker.id}'")))
            except ZmqSyftError as exc:  # closed or dead meanwhile: nothing to introduce to
                log.debug("could not introduce %s to %s: %s", worker.id, other.id, exc)
        for other, conn, request in sent:
            try:
                conn.wait(request)
                other.told.add(worker.key)
            except ZmqSyftError as exc:
                log.debug("could not introduce %s to %s: %s", worker.id, other.id, exc)

    def spawned_keys(self) -> list[tuple[str, str]]:
        """The names and public keys of the workers this process spawned."""
        return [(w.id, w.key) for w in self.workers() if w.spawned and w.key]

    def forget(self, worker: WorkerHandle) -> None:
        with self._lock:
            self._workers.pop(id(worker), None)

    def workers(self) -> list[WorkerHandle]:
        with self._lock:
            return [w for w in self._workers.values() if not w.closed]

    # ---------------------------------------------------------- connections
    def conn(self, worker: WorkerHandle) -> Connection:
        """This thread's connection to ``worker`` (made on first use)."""
        try:  # (every op comes here: the common case first)
            return self._local.conns[worker]
        except (AttributeError, KeyError):
            pass
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get(worker)
        if conn is None:
            if self.foreign is not None:
                raise WorkerUnavailable(f"worker '{worker.id}' {self.foreign}")
            conn = conns[worker] = Connection(self, worker)
        return conn

    def thread_conns(self) -> list[Connection]:
        return list(getattr(self._local, "conns", {}).values())

    def drop_connections(self, worker: WorkerHandle) -> None:
        """Close this thread's connection to a worker that is being closed."""
        conn = getattr(self._local, "conns", {}).pop(worker, None)
        if conn is not None:
            conn.close()

    def tidy_connections(self) -> None:
        """Forget this thread's old pipelined errors and its sockets to closed workers."""
        conns = getattr(self._local, "conns", {})
        for worker, conn in list(conns.items()):
            conn.deferred.clear()
            if worker.closed:  # do not keep sockets to closed workers
                conns.pop(worker).close()

    # -------------------------------------------------------------- deletes
    def free_later(self, address: str, obj_id: int) -> None:
        """Queue a delete of ``obj_id`` on the worker at ``address``."""
        self.reaper.free_later(address, obj_id)

    def flush_deletes(self, wait: bool, timeout: float | None = None,
                      rider: Connection | None = None) -> bytes | None:
        """Send the queued deletes now (see :meth:`Reaper.flush`)."""
        return self.reaper.flush(wait, timeout, rider)

    # -------------------------------------------------------------- pointers
    def pointer_from_desc(self, desc: PointerDesc, owner: str = "me") -> PointerTensor:
        """Rebuild a pointer from a descriptor a worker sent (ownership as the descriptor says)."""
        location = self.worker_at(desc.address, desc.location, desc.key)
        return PointerTensor(location, desc.id_at_location, desc.shape, DTYPES[desc.dtype],
                             desc.requires_grad, id=desc.ptr_id, owner=owner,
                             owned=desc.owned and owner == "me")

    def adopt(self, value: Any) -> Any:
        """A result from a worker with its pointer descriptors made into pointers (ours)."""
        def one(x: Any) -> Any:
            return self.pointer_from_desc(x) if isinstance(x, PointerDesc) else x
        return pytree.tree_map(one, value)

    # -------------------------------------------------------------- sync
    def sync(self, only: WorkerHandle | None = None) -> None:
        """A synchronisation point: everything this thread issued before has taken effect.

        Waits for every pipelined request of this thread, sends all queued deletes, then asks
        every worker to flush what it relayed on (recursively along pointer chains). Raises the
        first error of a pipelined operation that was not reported yet, and a worker's loss
        once (a dead worker does not fail every later sync). ``only``: report only what
        concerns that worker (its ``_objects``); the others' failures wait for a plain sync.
        """
        self._settle(only)
        # the answers just read may have released pointers (results of pipelined ops nobody
        # kept), whose deletes are queued now or were sent by the reaper on its own connection
        # meanwhile: one more round for them, so that what follows sees them done
        with self.reaper.lock:  # (a reaper batch popped from the queue is counted in `dirty`)
            again = bool(self._deletes) or any(w.dirty for w in self.workers())
        if again:
            self._settle(only)
        for conn in self.thread_conns():
            if only is None or conn.worker is only:
                conn.raise_deferred()

    def _settle(self, only: WorkerHandle | None = None) -> None:
        """One round trip: the deletes and each FLUSH go out right behind the requests still in
        flight (a worker handles one connection's messages in order), then this waits once."""
        self.flush_deletes(wait=False)
        with self.reaper.lock:
            pass  # a delete batch the reaper has in flight is acknowledged
        reported = {w for w in self.workers() if w.lost is not None and w.loss_reported}
        problems: list[tuple[WorkerHandle, WorkerUnavailable]] = []

        def settled(conn: Connection, step: Callable[..., Any], *args: Any, **kw: Any) -> Any:
            try:
                return step(*args, **kw)
            except WorkerUnavailable as exc:  # a worker lost: said once, and only where asked
                if conn.worker not in reported and (only is None or conn.worker is only):
                    problems.append((conn.worker, exc))
                return None

        sent = []
        with quietly():  # (what is said of a loss is decided below)
            for worker in self.workers():
                if worker.dirty and worker.ready:
                    worker.dirty = False
                    if worker.lost is None or worker is only:  # (what a lost one relayed failed)
                        conn = self.conn(worker)
                        req_id = settled(conn, conn.send, Op.FLUSH, Flush(), what="flush",
                                         flush_deletes=False)
                        if req_id is not None:
                            sent.append((conn, req_id))
            for conn in self.thread_conns():
                if conn.sock is not None:
                    settled(conn, conn.drain)
            for conn, req_id in sent:
                settled(conn, conn.wait, req_id)  # answered by now; raises if it failed
        if only is None:  # a loss nobody was told of yet (found by the reaper, by _objects)
            named = {w for w, _ in problems}
            problems += [(w, w.loss) for w in self.workers() if w.loss is not None and w.lost
                         and not w.loss_reported and w not in reported and w not in named]
        if problems:
            for worker, _ in problems:
                worker.loss_reported = True
            exc = problems[0][1]
            if len(problems) > 1:
                exc.add_note("(lost too: " + ", ".join(f"'{w.id}'" for w, _ in problems[1:]) + ")")
            raise exc

    def _at_exit(self) -> None:
        if self.foreign is not None:  # (a fork's child: the parent's workers are not ours)
            return
        self._stopping.set()
        self.reaper.wake()
        self.outboxes.wake()
        workers = list(self._workers.values())
        # the workers we spawned are stopped below, and what they hold goes with them: no
        # deletes, no waiting for them (a frozen one would hold up the exit)
        spawned = {w._ready_address for w in workers if w.spawned and not w.closed}
        try:
            self.reaper.release_all()  # pointers still alive: free what they own too
            interrupts.drop_deletes(self._deletes, spawned)
            for conn in self.thread_conns():
                if conn.sock is not None and conn.worker._ready_address not in spawned:
                    try:
                        conn.drain(timeout=min(self.cfg.timeout, 5.0))
                    except ZmqSyftError:
                        pass
            self.flush_deletes(wait=True, timeout=min(self.cfg.timeout, 5.0))
        except Exception:  # noqa: BLE001 - never fail interpreter exit
            log.debug("zmqsyft exit flush failed", exc_info=True)
        try:  # all at once, within one bound, every one reaped
            interrupts.stop_all([w._proc for w in workers if w._proc is not None and not w.closed],
                                min(self.cfg.close_timeout, 2.0))
        except Exception:  # noqa: BLE001
            log.debug("stopping the workers at exit failed", exc_info=True)
        for worker in workers:
            try:
                worker.close_at_exit()
            except Exception:  # noqa: BLE001
                log.debug("closing %s at exit failed", worker, exc_info=True)


def _after_fork() -> None:
    for session in list(_sessions):
        session._left_behind()


os.register_at_fork(after_in_child=_after_fork)
