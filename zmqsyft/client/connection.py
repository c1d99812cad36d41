"""One thread's connection to one worker: request ids, in-flight requests, deadlines, liveness.

A :class:`Connection` owns a DEALER, used only by the thread that made it, and keeps each request
in flight (with the pointers it names, so that no delete overtakes it) until answered. Pipelined
ops queue while earlier requests are unanswered and go out together as one ``BATCH``
(:mod:`~zmqsyft.client.outbox`). A lost connection (found while waiting, or cheaply on the
sending path) fails what is in flight (``OutcomeUnknown``) and is closed for good; the next
request connects afresh and, to a worker met before, waits for its ``HELLO`` reply first: a
restarted worker (another incarnation) makes older pointers raise ``WorkerRestarted``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq
import zmq.utils.z85

from ..config import Config
from ..errors import RequestDropped, RequestTimeout, WorkerUnavailable, ZmqSyftError
from ..wire import channel, shm, transport
from ..wire.bodies import Body, HelloReply
from ..wire.codec import check_size, encode_message
from ..wire.messages import NO_REPLY, Message, Op, salvage_req_id
from ..wire.rpc import RequestCore
from ..wire.values import ShmPolicy
from . import interrupts
from .handle import WorkerHandle
from .link import Deferred, Host, InFlight
from .linkprobe import LinkProbe
from .lost import gone, outcome_unknown, refused, report, restarted, unsent
from .outbox import Batching

__all__ = ["Connection"]

log = logging.getLogger(__name__)
_POLL_SLICE, _SMALL = 0.1, 1 << 20  # liveness checks while waiting (s); unmeasured messages (B)
_CHECK_EVERY = 0.002  # the link's liveness, looked at on the sending path at most this often (s)
# requests a worker may pass on to other workers (chains, cascading deletes, move, remote_get)
_MAY_RELAY = frozenset({Op.CALL, Op.DEL, Op.MOVE, Op.REMOTE_GET})
_monotonic = time.monotonic


class Connection(interrupts.Interruptible, Batching, Deferred, RequestCore):
    """One thread's DEALER to one worker, with that thread's in-flight requests to it."""

    def __init__(self, host: Host, worker: WorkerHandle) -> None:
        super().__init__()
        self.host = host
        self.worker = worker
        self.outboxes = host.outboxes
        self.sock: zmq.Socket | None = None
        self.watch: transport.PeerWatch | None = None
        self.probe = LinkProbe()  # a second connection, while a large message is on its way
        self.deferred: list[BaseException] = []
        self._answered: dict[int, InFlight] = {}  # awaited requests answered before their wait()
        self._deletes_queued = host._deletes  # deletes waiting to ride with a request
        self._deadline_s = host.cfg.timeout
        self._take_over = False  # the worker's descriptors are open to us (zero-copy .get())
        self._failing = False
        self._ended = False  # the worker dropped a request of ours: this connection is over
        self._checked = 0.0  # when the link was last looked at on the sending path
        self._hello: InFlight | None = None
        self._rcvtimeo = -1
        self._policy: tuple[Config, ShmPolicy | None] | None = None
        self.thread = threading.get_ident()
        # the socket's guard: the owning thread holds it for every socket operation; the
        # client's flusher thread only tries it, to send a batch that has waited too long
        self.lock = threading.RLock()
        self.outbox: list[bytes] = []  # queued pipelined requests (single-frame headers)
        self.queued_at = 0.0
        # the sealed channel beside the CURVE connection, for large messages (zmqsyft.wire.bulk)
        self._bulk: channel.CallerChannel | None = None

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            self.worker._check_open()
            address = self.worker.address  # (waits for a spawned one, whose readiness may
            if self.sock is not None:      # introduce it to its siblings on this connection)
                return self.sock
            keys, key = self.worker.client_keys or self.host.keys, self.worker.key
            self.sock, self.watch = transport.make_dealer(
                self.host.ctx, address, self.host.cfg,
                (keys.public, keys.secret, key.encode("ascii")) if key else None)
            self._take_over = False  # HELLO first: it names our session (what we store is its)
            if self._bulk is not None:  # (a new connection, a new channel)
                self._bulk.close()
            self._bulk = (channel.CallerChannel(plain=not key)  # (large messages go beside
                          if self.host.cfg.sealed_threshold > 0 else None)  # the connection)
            req_id, hello = self.hello(self.host.name, self.worker.trust_token or "",
                                       self.host.session_id,
                                       self._bulk.secret if self._bulk is not None else "")
            self._hello = InFlight((), (), "hello", awaited=False)
            self.track(req_id, self._hello)
            try:
                transport.send(self.sock, encode_message(Op.HELLO, req_id, hello))
            except zmq.Again as exc:  # (its handshake failed already: nothing to queue on)
                raise self._fail(self._unsendable("the connection's HELLO", exc)) from None
            if self.worker.incarnation:  # a reconnect: is it the process we knew? (before
                try:                     # anything else names its objects)
                    self._shm_out()
                except WorkerUnavailable as exc:
                    raise gone(self.worker, self.worker.lost or str(exc), "the request") from None
        return self.sock

    def _check_link(self, what: str, sending: bool = True) -> None:
        """On the sending path, cheaply: a lost connection fails what is in flight on it
        (``OutcomeUnknown``) and is closed, so that this request reconnects; a worker known to
        be gone fails it at once, unsent."""
        watch, now = self.watch, time.monotonic()
        if watch is None or now - self._checked < _CHECK_EVERY:
            return
        self._checked = now
        assert self.sock is not None
        writable = transport.writable(self.sock)
        if not self._ended and writable and not watch.changed():
            return
        why = watch.down()
        if watch.refused is not None:
            raise self._fail(refused(self.worker, watch.refused, f"{what} was not sent"))
        if self._ended:  # (the worker drops every request of ours on it: none ran)
            self._fail(RequestDropped(f"worker '{self.worker.id}' ended this connection (it was "
                                      "frozen); the requests sent on it were dropped unrun"))
        elif why is not None or not writable:
            self._fail(outcome_unknown(self.worker, why or "the connection was dropped",
                                       "a request"))
        if sending and self.sock is None and self.worker._exit_status() is not None:
            raise gone(self.worker, why or "", what)

    def send(self, op: Op, body: Body | dict[str, Any], keep: tuple[Any, ...] = (),
             results: tuple[Any, ...] = (), what: str = "", flush_deletes: bool = True,
             awaited: bool = True, allow_pickle: bool = False, silent: bool = False) -> int:
        """Send a request; return its id. ``keep`` and ``results`` stay alive until it is answered.

        With ``awaited=False`` nobody waits for the reply: an error in it is kept and raised at the
        next synchronisation point (``deferred``). A ``silent`` request (a delete flushed in
        passing) gets no reply at all (id ``NO_REPLY``, returned); it goes out at once, in one
        message with what this thread has queued for the worker. The deletes queued for this
        worker travel in one message with the request.
        """
        cfg = self.host.cfg
        if len(self.inflight) >= cfg.max_inflight:
            self._wait_below(cfg.max_inflight // 2)
        ride = None
        if flush_deletes and self._deletes_queued:
            ride = self.host.flush_deletes(wait=False, rider=self)
        with self.lock:
            if self.watch is not None and _monotonic() - self._checked >= _CHECK_EVERY:
                self._check_link(what or op.name)
            gen = self.worker.generation
            sock = self.sock if self.sock is not None else self._socket()
            if gen != self.worker.generation:  # a reconnect met a restarted worker
                restarted(self.worker, keep, results, what or op.name)
            if op in _MAY_RELAY:
                self.worker.dirty = True  # sync() must FLUSH it: it may have relayed this on
            if silent:
                self.outbox.append(encode_message(op, NO_REPLY, body)[0])
                self._flush_all()
                return NO_REPLY
            # Nagle: a pipelined op queues while the worker has earlier ones of ours to answer
            pipelined = not awaited and op is Op.CALL and (
                self.gathering or cfg.pipeline_batch > 1 and self._behind())
            if ride is not None:
                self.outbox.append(ride)
                self.worker.dirty = True
            req_id = self.next_id()
            policy = self._policy
            try:
                frames = encode_message(op, req_id, body, allow_pickle=allow_pickle,
                                        shm=policy[1] if policy is not None and policy[0] is cfg
                                        else self._shm_policy())
                if len(frames) > 1 or len(frames[0]) > _SMALL:  # refused, or it closes the link
                    self._shm_out()  # (its HELLO reply tells the worker's limit)
                    told = self.peer.max_message_size if self.peer is not None else 0
                    check_size(frames, told or cfg.max_message_size, op.name, self.worker.id)
            except BaseException:
                if ride is not None:
                    self._flush_all()  # the deletes go all the same
                raise
            sealed = None  # (frames, blob) sent sealed on the bulk socket, after a marker
            if self._bulk is not None and len(frames) > 1:
                marker = self._bulk.marker(req_id, frames, cfg.sealed_threshold)
                if marker is not None:
                    sealed, frames = (frames, marker[1]), marker[0]
            pending = InFlight(keep, results, what or op.name, awaited)
            if (len(frames) == 1 and sealed is None and not pipelined and not self.outbox
                    and not self.outboxes.queued):  # the common request, alone: out at once,
                try:  # and its bookkeeping done while it travels (no reply can be read before:
                    transport.send(sock, frames)  # only this thread reads, under this lock)
                except zmq.ZMQError as exc:
                    shm.discard(frames.segments)  # (as a failure of the tracked request would)
                    raise self._fail(self._unsendable(op.name, exc)) from exc
                self.track(req_id, pending, segments=frames.segments)
                return req_id
            self.track(req_id, pending, segments=(frames if sealed is None else sealed[0]).segments)
            if len(frames) == 1 and sealed is None:
                if pipelined:
                    self._queue(frames[0], cfg.pipeline_batch)
                    return req_id
                if self.outbox:  # one message with what this thread queued before
                    self.outbox.append(frames[0])
                    self._flush_all()
                    return req_id
            if self.outboxes.queued or self.outbox:
                self._flush_all()  # what this thread queued before goes first
            try:
                if len(frames) == 1 and sealed is None:  # (one frame: nothing to cut in two)
                    transport.send(sock, frames)
                else:  # (a Ctrl-C while parts of a message are sent comes after: sent whole)
                    with interrupts.held_back(True):
                        transport.send(sock, frames)
                        if sealed is not None and self._bulk is not None:  # (opened as they come)
                            self._bulk.send(sealed[1], sealed[0])
                    self.probe.start(self, frames)
            except zmq.ZMQError as exc:
                self.inflight.pop(req_id, None)
                raise self._fail(self._unsendable(op.name, exc)) from exc
        return req_id

    def unseal(self, marker: Message) -> list[Any]:
        """The frames of a reply that came sealed (within this connection's deadline; the
        worker's liveness is watched meanwhile)."""
        if self._bulk is None:
            return super().unseal(marker)

        def dead() -> str | None:
            why = self.worker._exit_status()
            return why if why is not None or self.watch is None else self.watch.down()
        return self._bulk.collect(marker, self._deadline_s, f"worker '{self.worker.id}'", dead)

    def _shm_policy(self) -> ShmPolicy | None:
        cfg = self.host.cfg
        if self._policy is None or self._policy[0] is not cfg:  # rebuilt when the config changes
            policy = None
            if cfg.shm_threshold:
                policy = ShmPolicy(self._shm_out, cfg.shm_threshold, 2 * cfg.timeout)
            self._policy = (cfg, policy)
        return self._policy[1]

    def can_take_over(self) -> bool:
        """Whether the worker's shared-memory tensors can become ours without a copy (waits for
        its HELLO reply if need be)."""
        return self._shm_out() and self._take_over

    def _shm_out(self, timeout: float | None = None) -> bool:
        """Whether the worker shares our ``/dev/shm`` (waits for its HELLO reply if need be)."""
        if self.negotiating:
            self._deadline_s = self.host.cfg.timeout if timeout is None else timeout
            deadline = time.monotonic() + self._deadline_s
            while self.negotiating:
                self._pump(deadline, "hello")
        return self.shm

    def peer_info(self, timeout: float | None = None) -> HelloReply:
        """The worker's answer to this connection's ``HELLO`` (its name, pid, address);
        connects and waits for it if need be (``WorkerUnavailable`` if it does not answer)."""
        with self.lock:
            self._socket()
        self._shm_out(timeout)
        if self.peer is None:
            if self._hello is not None and self._hello.error is not None:
                raise self._hello.error
            raise WorkerUnavailable(f"worker '{self.worker.id}' at {self.worker.address} did not "
                                    "answer the connection's HELLO")
        return self.peer

    def request(self, op: Op, body: Body | dict[str, Any], keep: tuple[Any, ...] = (),
                results: tuple[Any, ...] = (), what: str = "") -> Message:
        """Send a request and return its reply, or raise its error."""
        return self.wait(self.send(op, body, keep, results, what))

    def wait(self, req_id: int, timeout: float | None = None) -> Message:
        """Wait for the reply to ``req_id``, handling other replies as they come."""
        pending = self.inflight.get(req_id) or self._answered.pop(req_id, None)
        if pending is None:
            raise ZmqSyftError(f"no request {req_id} in flight to worker '{self.worker.id}'")
        self._deadline_s = self.host.cfg.timeout if timeout is None else timeout
        deadline = _monotonic() + self._deadline_s
        try:
            while not pending.done:
                self._pump(deadline, pending.what)
        except KeyboardInterrupt:
            interrupts.abandon(pending, self._answered)  # Ctrl-C: its reply is dropped when it comes
            raise
        self._answered.pop(req_id, None)
        if pending.error is not None:
            error = pending.error
            if isinstance(error, WorkerUnavailable):
                report(self.worker)
            try:
                raise error
            finally:  # no exception -> traceback -> frame -> exception cycle keeping pointers alive
                error = pending = None  # type: ignore[assignment]
        assert pending.reply is not None
        return pending.reply

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every request in flight on this connection has been answered."""
        self._deadline_s = self.host.cfg.timeout if timeout is None else timeout
        deadline = time.monotonic() + self._deadline_s
        while self.inflight:
            what = next(iter(self.inflight.values())).what
            self._pump(deadline, what)

    def poll_replies(self) -> None:
        """Handle the replies that have already arrived, without waiting."""
        with self.lock:
            sock = self.sock
            while sock is not None and self.inflight and transport.readable(sock):
                try:
                    frames = transport.recv(sock, zmq.NOBLOCK)
                except zmq.Again:
                    return
                self.receive(frames)

    def _wait_below(self, limit: int) -> None:
        self._deadline_s = self.host.cfg.timeout
        deadline = time.monotonic() + self._deadline_s
        while len(self.inflight) > limit:
            self._pump(deadline, "pipelined requests")

    def _pump(self, deadline: float, what: str) -> None:
        with self.lock:
            if self.outboxes.queued or self.outbox:
                self._check_link(what, sending=False)  # (not queued on to a dead worker)
                self._flush_all()  # nothing may wait for a request still queued
            sock = self.sock if self.sock is not None else self._socket()
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise self._fail(RequestTimeout(
                    f"worker '{self.worker.id}' at {self.worker.address} did not answer {what} "
                    f"within the deadline ({self._deadline_s:g}s); if the operation legitimately "
                    "takes longer, raise it with zmqsyft.configure(timeout=...)"))
            # poll() with a timeout, then a receive that does not block (see interrupts.recv)
            rcvtimeo = max(1, int(min(remaining, _POLL_SLICE) * 1000))
            if rcvtimeo != self._rcvtimeo:
                sock.rcvtimeo = self._rcvtimeo = rcvtimeo
            try:
                frames = interrupts.recv(sock, rcvtimeo)  # (a Ctrl-C loses no reply)
            except zmq.Again:
                pass
            else:
                self.receive(frames)
                return
            self._no_reply(what)

    def _no_reply(self, what: str) -> None:
        """Nothing came within a poll slice: fail everything if the worker or the link is gone."""
        dead = self.worker._exit_status()
        exited = dead is not None
        if dead is None and self.watch is not None:
            dead = self.watch.down() or self.probe.down()
            if self.watch.refused is not None:
                raise self._fail(refused(self.worker, self.watch.refused, f"{what} got no answer"))
        if dead is not None:  # (over a connection never made, nothing reached it)
            never = self.watch is not None and not self.watch.ever_up and not exited
            raise self._fail(gone(self.worker, dead, what) if never else
                             outcome_unknown(self.worker, dead, what))

    def resolved(self, pending: Any, reply: Message | None, error: BaseException | None) -> None:
        """A reply (or the loss of the connection) answered ``pending``."""
        pending.done = True
        pending.keep = ()
        if self.probe.sock is not None:  # (closed once nothing is on its way)
            self.probe.settle(busy=bool(self.inflight))
        if pending.awaited:  # someone will wait() for it: keep the answer until then
            self._answered[pending.req_id] = pending
        if error is not None:
            pending.error = error
            self._ended = self._ended or isinstance(error, RequestDropped)
            for ptr in pending.results:
                ptr._mark_failed(error)
            if not pending.awaited and not pending.results and not self._failing:
                # an op with results reports through them (using one raises the error); one
                # without (in-place) reports at the next synchronisation point
                self.deferred.append(error)
        else:
            pending.reply = reply
            if pending.req_id == self.hello_id and self.peer is not None:
                self.worker.met(self.peer.incarnation, self.peer.started_ms, self.peer.pid)
                self._take_over = self.shm and shm.may_take_over(self.peer.pid)
                self.worker.lease = self.peer.lease_ms / 1000  # (the reaper keeps us alive)
                self._open_bulk(self.host, self.worker, self._bulk)
        pending.results = ()

    def _fail(self, exc: BaseException) -> BaseException:
        """After a transport failure: fail what is in flight, close the socket, discard late
        replies (the next request connects afresh)."""
        with self.lock:
            queued = {salvage_req_id(header) for header in self.outbox}  # (never sent)
            self.outbox = []
            self.outboxes.queued.pop(self, None)
            self._failing = True
            try:
                self.fail_all(lambda p: unsent(self.worker, exc, p.what) if p.req_id in queued
                              else exc)
            finally:
                self._failing = False
            if self.sock is not None:
                if self.watch is not None:
                    self.watch.close(self.sock)
                    self.watch = None
                self.sock.close(linger=0)
                self.sock = None
                self._take_over = False
                self._rcvtimeo = -1
                self._ended = False
            if self._bulk is not None:
                self._bulk.close()
                self._bulk = None
            self.probe.stop()
        return exc

    def close(self) -> None:
        self._fail(WorkerUnavailable(f"connection to worker '{self.worker.id}' was closed"))
