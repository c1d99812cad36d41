"""The worker process's loop: one thread, one ROUTER, a DEALER per peer, an op -> handler table.

Who may connect (known keys, ``max_connections``) is decided in each connection's handshake by the
worker's gate (:mod:`~zmqsyft.worker.gate`), in a thread of its own; the loop sees every request's
principal (its ``User-Id``) and never a refused connection.

:class:`Worker` owns its parts and hands its handlers only the services they may use
(:class:`~zmqsyft.worker.context.Services`); it sends the replies: batched ``ACKS`` for empty
answers, always ahead of any other reply to the same caller.

Nothing in a worker ever blocks on a peer: a request that needs another worker (a pointer chain,
``move``, ``remote_get``, a cascading delete, ``FLUSH``) is sent on and its continuation parked
with a deadline, so pointer cycles between workers cannot deadlock.

Every request body is checked against its op's typed body before any handler sees it; every
failure becomes an ERROR reply; undecodable messages are dropped and counted; a connection a
freeze ended (:mod:`~zmqsyft.worker.freeze`) has its requests dropped unrun.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..config import Config
from ..errors import ProtocolError
from ..keys import KeyPair
from ..privacy import Policy
from ..wire import shm, transport
from ..wire.bodies import REQUESTS, Acks, Body, Error
from ..wire.codec import Frames, decode_message, encode_ack, encode_message
from ..wire.exc_codec import encode_exception
from ..wire.messages import NO_REPLY, Op
from ..wire.values import ShmPolicy
from . import admin, calls, catalog, intake, objects, owner, results
from .access import Access
from .context import Ctx, Handler
from .freeze import FreezeWatch
from .gate import DOMAIN, EVENTS, Gate
from .leases import Holder, Leases
from .peers import PeerLinks
from .sealed import open_sealed
from .store import Store
from .traffic import Traffic

__all__ = ["Worker", "HANDLERS"]

log = logging.getLogger("zmqsyft.worker")

# how often the liveness of peers with requests in flight, and leases that ran out, are looked at
_PEER_CHECK_S, _LEASE_CHECK_S = 0.02, 0.25
_MAX_BATCH = 256  # messages handled per socket per loop turn, so that no peer starves

HANDLERS: dict[Op, Handler] = {
    Op.HELLO: admin.hello, Op.PING: admin.ping, Op.STATS: admin.stats, Op.SHUTDOWN: admin.shutdown,
    Op.PUT: objects.put, Op.GET: objects.get, Op.DEL: objects.delete, Op.MOVE: objects.move,
    Op.REMOTE_GET: objects.remote_get, Op.OBJECTS: catalog.objects, Op.FLUSH: objects.flush,
    Op.CALL: calls.call,
    Op.SEARCH: catalog.search, Op.TAG: catalog.tag, Op.RUN: owner.run,
    Op.GIVE: objects.give, Op.ALLOW: admin.allow,
}
"""What a worker does for each request op: ``handler(worker, ctx, typed body)``."""

# op -> (its handler, its typed body), looked up once per request
_TABLE: dict[Op, tuple[Handler, type[Body]]] = {op: (h, REQUESTS[op]) for op, h in HANDLERS.items()}



class Worker(owner.DataOwner):
    """A worker: binds ``bind``, serves requests until ``SHUTDOWN`` or its parent dies.

    Parameters
    ----------
    worker_id : str
        The name this worker reports (``"bob"``).
    bind : str
        ZeroMQ endpoint to bind (``tcp://127.0.0.1:0`` picks a free port).
    config : Config
        Timeouts and socket limits.
    parent_pid : int, optional
        Exit when this process is no longer our parent.
    trust_tokens : frozenset of str
        A connection whose HELLO presents one may send pickled payloads (else only trusted keys).
    keys : KeyPair, optional
        Its CURVE key pair (default: a fresh one): its clients and peers know it by the public key.
    access : Access, optional
        The keys it accepts, and their rights (default: none; anyone if ``config.insecure``).
    bulk_bind : str, optional
        Where to bind its bulk socket, for sealed large messages (default: beside ``bind``).
    policy : Policy, optional
        Its data owner's rules for the data it loads (:mod:`zmqsyft.privacy`; default: private
        to the worker itself, aggregates of 2 owners released only where it is).
    """

    def __init__(self, worker_id: str, bind: str, config: Config, parent_pid: int | None = None,
                 trust_tokens: frozenset[str] = frozenset(), keys: KeyPair | None = None,
                 access: Access | None = None, bulk_bind: str | None = None,
                 policy: Policy | None = None) -> None:
        self.id = worker_id
        self.cfg = config
        # this process, among the workers that ever served at this address (in its HELLO replies)
        self.incarnation, self.started_ms = secrets.token_hex(8), int(time.time() * 1000)
        self.trust_tokens = frozenset(t for t in trust_tokens if t)
        self.trusted: set[bytes] = set()  # routing ids that presented a trust token
        self.shm_callers: set[bytes] = set()  # routing ids on this machine (shared memory)
        self.access = access if access is not None else Access(insecure=config.insecure)
        if config.insecure:
            self.access.insecure = True
            self.keys: KeyPair | None = None
            self.key = ""
        else:
            self.keys = keys if keys is not None else KeyPair.fresh()
            self.key = self.keys.text
        # the data owner's rules for what this worker loads (zmqsyft.privacy)
        self.policy = (policy or Policy()).bind(worker_id, self.key, self.key)
        self.labels = frozenset({self.policy})
        self.leases = Leases(config.lease, worker_id)
        self.traffic = Traffic()
        self.header: Any = None  # the header frame of the request being handled
        self.ctx = zmq.Context()  # its own: the gate is the one ZAP handler of its context
        self.gate = Gate(self.ctx, worker_id, config.max_connections, self.access,
                         self.leases.closed)
        curve = (self.keys.public, self.keys.secret) if self.keys is not None else None
        try:
            self.router, self.address = transport.make_router(
                self.ctx, bind, config, zap_domain=DOMAIN, monitor=(self.gate.monitor_endpoint, EVENTS),
                curve=curve)
            self.sealed = open_sealed(self, bulk_bind)  # large messages, beside the connections
        except Exception:
            self.gate.close(None)
            self.ctx.destroy(linger=0)  # (closes the ROUTER, if it was made)
            raise
        self.gate.start()
        self.addresses = {transport.canonical_endpoint(a) for a in (self.address, bind)}
        self.store = Store(worker_id, config.max_store_bytes, config.max_connection_bytes)
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if self.sealed is not None:
            self.poller.register(self.sealed.sock, zmq.POLLIN)
        self.peers = PeerLinks(worker_id, config, self.ctx, self.poller, self.traffic, self.keys,
                               self.access, session=self.incarnation)
        self._running = False
        self.freeze = FreezeWatch(2 * config.heartbeat_ivl)
        # routing id -> request ids answered with an empty reply this loop turn (sent as one ACKS)
        self._acks: dict[bytes, list[int]] = {}
        self._rcvtimeo = -1
        self._shm = ShmPolicy(_yes, config.shm_threshold, 2 * config.timeout)

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        """Serve until shut down; always closes the sockets."""
        self._running = True
        next_parent_check = next_peer_check = next_lease_check = 0.0
        peers = self.peers
        try:
            while self._running:
                polling = peers.waiting or bool(self.sealed and self.sealed.parked)
                timeout = 100.0 if polling else 500.0  # peers are checked per turn
                deadline = peers.next_deadline() if polling else None
                if deadline is not None:
                    timeout = max(0.0, min(timeout, (deadline - time.monotonic()) * 1000))
                # no answer awaited from a peer (none, or only relayed ops that want none): only
                # the ROUTER can bring anything, and a blocking receive costs fewer system calls
                # than polling every socket; late replies wait on the peers' sockets until then
                if not polling:
                    self._serve_router(int(timeout))
                for sock, _ in self.poller.poll(int(timeout)) if polling else ():
                    if sock is self.router:
                        self._drain_router()
                    elif sock in peers.by_socket:
                        self._drain(sock, peers.receive)
                    elif self.sealed is not None and sock is self.sealed.sock:
                        self.sealed.arrived()
                    if self._acks:
                        self._flush_acks()
                peers.expire()
                now = time.monotonic()
                if now >= next_peer_check:
                    next_peer_check = now + _PEER_CHECK_S
                    peers.check()
                    if self.sealed is not None and self.sealed.parked:
                        self.sealed.tick(now)
                if now >= next_lease_check:
                    next_lease_check = now + _LEASE_CHECK_S
                    objects.expire(self, now)
                    if self.sealed is not None:
                        self.sealed.housekeeping(now)
                    peers.keepalive(now)  # (what this worker owns on its peers stays)
                if self._acks:
                    self._flush_acks()
                results.bury()  # what waited for this turn's replies to go, freed in a thread
                if self.parent_pid is not None and now >= next_parent_check:
                    next_parent_check = now + 0.5
                    if os.getppid() != self.parent_pid:
                        log.warning("worker %s: parent %d is gone, exiting", self.id, self.parent_pid)
                        break
        finally:
            self.close()

    def stop(self) -> None:  # (once this turn is over)
        self._running = False

    def close(self) -> None:
        """Stop serving; close the peer links, the gate (its thread joined), the ROUTER and the
        worker's ZeroMQ context. Closing again does nothing."""
        self._running = False
        if self.router.closed:
            return
        self.freeze.close()
        results.settle()  # (what moves gave away is freed before the interpreter exits)
        self._flush_acks()
        self.peers.close()
        if self.sealed is not None:
            self.sealed.close()
        gate_stopped = self.gate.close(self.router)
        self.router.close(linger=0)
        if gate_stopped:  # else its sockets are still in use: terminating would wait for them
            self.ctx.destroy(linger=0)

    def _serve_router(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for a request, then handle what has arrived."""
        timeout_ms = max(timeout_ms, 1)
        if timeout_ms != self._rcvtimeo:
            self.router.rcvtimeo = self._rcvtimeo = timeout_ms
        if not self._take_request(0):
            return
        if self._acks:  # it found us idle: its sender may be waiting for this very answer
            self._flush_acks()
        self._drain_router(_MAX_BATCH - 1)
        if self._acks:
            self._flush_acks()

    def _take_request(self, flags: int) -> bool:
        """Receive and handle one request; False if none was waiting."""
        try:
            frames, user, header = transport.recv_request(self.router, flags, self.cfg.max_frames)
        except zmq.Again:
            return False
        except Exception as exc:  # noqa: BLE001 - too many frames, no memory: dropped
            intake.dropped(self, self.router, exc)
            return True
        if self.sealed is not None and self.sealed.parked and self.sealed.hold(frames, user, header):
            return True  # (behind a sealed message still coming)
        try:
            self._on_request(frames, user, header)
        except Exception as exc:  # noqa: BLE001 - whatever escaped the request's own handling
            intake.dropped(self, self.router, exc)
        return True

    def _drain_router(self, limit: int = _MAX_BATCH) -> None:
        for _ in range(limit):
            if not transport.readable(self.router) or not self._take_request(zmq.NOBLOCK):
                return

    def _drain(self, sock: zmq.Socket, handle: Callable[[zmq.Socket, list[Any]], None],
               limit: int = _MAX_BATCH) -> None:
        max_frames = self.cfg.max_frames
        for _ in range(limit):
            if not transport.readable(sock):
                return
            try:
                frames = transport.recv(sock, zmq.NOBLOCK, 1, max_frames)
            except zmq.Again:
                return
            except Exception as exc:  # noqa: BLE001 - too many frames, no memory: dropped
                intake.dropped(self, sock, exc)
                continue
            try:
                handle(sock, frames)
            except Exception as exc:  # noqa: BLE001 - whatever escaped the message's own handling
                intake.dropped(self, sock, exc)

    # ------------------------------------------------------------- requests in
    def _on_request(self, frames: list[Any], user: str, header: Any, nested: bool = False,
                    holder: Holder | None = None, sealed: bool = False) -> None:
        """Handle one request from the connection whose principal is ``user`` (the ``User-Id``
        its messages carry); ``nested``: it came inside a ``BATCH`` of ``holder``'s;
        ``sealed``: it came sealed on the bulk socket, for a ``BULK`` marker of ``holder``'s."""
        if len(frames) < 2:
            self.traffic.counters["dropped_malformed"] += 1
            return
        ident = frames[0]
        if not nested and (frozen := self.freeze.ended(ident)) is not None:
            return intake.ended(self, ident, frames, frozen)
        if holder is None:
            principal = self.access.get(user)
            if principal is None:  # the gate admitted no such key: nothing to answer
                self.traffic.counters["dropped_unknown_sender"] += 1
                return
            holder = self.leases.holder(ident, principal, header)
        principal = holder.principal  # (insecure: the name its HELLO gave)
        try:
            msg = decode_message(frames[1:], trusted=principal.trusted or ident in self.trusted,
                                 shm=ident in self.shm_callers)
        except Exception as exc:  # noqa: BLE001 - malformed input of any kind
            intake.undecodable(self, ident, frames, exc, nested, holder)
            return
        op = msg.op
        if op is Op.BULK and not nested and not sealed and self.sealed is not None:
            self.sealed.on_marker(ident, msg.req_id, msg.body, user, header, holder)
            return  # (a large message, sealed beside)
        if not nested and op is Op.PING and msg.req_id == NO_REPLY:  # a keep-alive: apart
            self.traffic.counters["keepalives_in"] += 1
        elif not nested:
            self.traffic.count(principal.label, "in", frames[1:], msg.shm_bytes)
        if op is Op.BATCH and not nested and len(frames) == 2:
            self._on_batch(ident, msg.body, holder)
            return
        self.header = header if not nested else None  # (HELLO notes its connection)
        ctx = Ctx(ident, msg.req_id, holder)
        try:
            entry = _TABLE.get(op)
            if entry is None:
                if op is Op.BATCH:
                    raise ProtocolError(f"worker '{self.id}' accepts a BATCH only as a single-"
                                        "frame message of its own, not inside another batch")
                raise ProtocolError(f"worker '{self.id}' does not accept {op.name} messages")
            handler, body_type = entry
            if log.isEnabledFor(logging.DEBUG):  # (op.name alone costs 0.3 us a request)
                log.debug("worker %s: %s %d from %s", self.id, op.name, ctx.req_id, principal.label)
            handler(self, ctx, body_type.from_wire(msg.body))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an ERROR reply
            self.reply_error(ctx, exc)

    def _on_batch(self, ident: bytes, body: dict[str, Any], holder: Holder) -> None:
        """Handle a ``BATCH``: each message in it, in order, as if it had come on its own."""
        for raw in intake.batch(self, ident, body):
            self._on_request([ident, raw], "", None, nested=True, holder=holder)

    # ------------------------------------------------------------- replies out
    def reply(self, ctx: Ctx, body: Body | None = None) -> bool:
        """Answer ``ctx``; an empty answer is batched with the others of this loop turn.

        Returns False if ``body`` could not be encoded (the caller got that error instead).
        """
        if ctx.req_id == NO_REPLY:
            return True
        if body is None:  # an acknowledgement: batched with the others of this loop turn
            acks = self._acks.get(ctx.ident)
            if acks is None:
                self._acks[ctx.ident] = [ctx.req_id]
            else:
                acks.append(ctx.req_id)
            return True
        try:
            policy = self._shm if self.cfg.shm_threshold and ctx.ident in self.shm_callers else None
            frames = encode_message(Op.REPLY, ctx.req_id, body, shm=policy)
        except Exception as exc:  # noqa: BLE001 - e.g. a result the wire cannot carry
            self.reply_error(ctx, exc)
            return False
        self._send_reply(ctx, frames)
        return True

    def _fail(self, ident: bytes, req_id: int, holder: Holder | None, exc: BaseException) -> None:
        self.reply_error(Ctx(ident, req_id, holder), exc)

    def reply_error(self, ctx: Ctx, exc: BaseException) -> None:
        """Answer ``ctx`` with an error (encoded with its type and traceback)."""
        log.debug("worker %s: request %d failed: %r", self.id, ctx.req_id, exc)
        if ctx.req_id == NO_REPLY:
            return
        self._send_reply(ctx, encode_message(Op.ERROR, ctx.req_id,
                                             Error(error=encode_exception(exc, self.id))))

    def answer_now(self) -> None:
        """Send the batched acknowledgements now, unless more requests are waiting to join them."""
        if self._acks and not transport.readable(self.router):
            self._flush_acks()

    def free_after_replies(self, obj: Any) -> None:
        """Keep ``obj`` alive until this turn's replies are out (freeing it can take a while)."""
        results.keep(obj)

    def _send_reply(self, ctx: Ctx, frames: list[Any]) -> None:
        if ctx.ident in self._acks:  # acknowledgements first: replies never overtake them
            self._send_acks(ctx.ident, self._acks.pop(ctx.ident))
        if ctx.holder is not None and (segments := getattr(frames, "segments", ())):
            ctx.holder.replied_with(segments)  # (unlinked if it is gone before mapping them)
        if len(frames) > 1 and self.sealed is not None and self.sealed.reply(ctx.ident, ctx.req_id,
                                                                             frames):
            return  # (sent sealed, after a marker in its place)
        self._send_to(ctx.ident, frames)

    def _send_to(self, ident: bytes, frames: list[Any], counted: list[Any] | None = None) -> None:
        """Send ``frames`` to ``ident``; the traffic counters count ``counted`` (what a BULK
        marker stands for) if given."""
        try:
            transport.send(self.router, [ident, *frames])
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer is gone
            self.traffic.counters["unroutable_replies"] += 1
            shm.discard(getattr(frames, "segments", ()))  # (nobody will map them now)
            log.info("worker %s: cannot reply to %s: %s", self.id, ident.hex(), exc)
            return
        if counted is not None:
            frames = counted
        self.traffic.count(self.leases.label(ident), "out", frames,
                           frames.shm_bytes if isinstance(frames, Frames) else 0)

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for ident, req_ids in acks.items():
            self._send_acks(ident, req_ids)

    def _send_acks(self, ident: bytes, req_ids: list[int]) -> None:
        if len(req_ids) == 1:
            self._send_to(ident, encode_ack(req_ids[0]))
        else:
            self._send_to(ident, encode_message(Op.ACKS, NO_REPLY, Acks(ids=req_ids)))


def _yes() -> bool:
    return True
