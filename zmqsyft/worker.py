"""The worker process: one thread, one ROUTER, a DEALER per peer, an op → handler table.

Nothing in a worker ever blocks on a peer. A request that needs another worker (an op on a
pointer chain, ``move``, ``remote_get``, a cascading delete, ``FLUSH``) is sent on and its
continuation is parked with a deadline; the loop keeps serving everyone else meanwhile, so pointer
cycles between workers cannot deadlock. Ops with caller-chosen result ids are relayed and answered
at once: the relay stores a pointer to the result the next hop will create.

Every handler's failure becomes an ERROR reply; undecodable messages are dropped and counted. A
worker never dies because of what a peer sent it.

The parts: this module has the loop, the ROUTER side (requests in, replies and batched ``ACKS``
out, traffic counters); :mod:`zmqsyft.peers` the requests to peer workers; :mod:`zmqsyft.handlers`
and :mod:`zmqsyft.admin` what each op does.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import zmq

from . import transport
from .codec import Frames, ShmPolicy, decode_message, encode_ack, encode_message
from .config import Config
from .errors import HandoverRefused, ProtocolError, UntrustedPayload
from .handlers import Handlers
from .messages import NO_REPLY, Message, Op, salvage_req_id
from .peers import PeerLinks
from .remote_exc import encode_exception
from .store import Store

__all__ = ["Worker"]

log = logging.getLogger(__name__)

Callback = Callable[[Message | None, BaseException | None], None]
_COUNTER_KEYS = {d: (f"messages_{d}", f"bytes_{d}", f"largest_{d}") for d in ("in", "out")}
_PEER_CHECK_S = 0.02  # how often the liveness of peers with requests in flight is looked at
_MAX_BATCH = 256  # messages handled per socket per loop turn, so that no peer starves


class _Ctx:
    """Who to answer: the ROUTER routing id and the request id."""

    __slots__ = ("ident", "req_id")

    def __init__(self, ident: bytes, req_id: int) -> None:
        self.ident = ident
        self.req_id = req_id


class Worker(PeerLinks, Handlers):
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
        A connection whose HELLO presents one of these may send pickled payloads (user
        functions, modules); every other connection is refused them.
    """

    def __init__(self, worker_id: str, bind: str, config: Config, parent_pid: int | None = None,
                 trust_tokens: frozenset[str] = frozenset()) -> None:
        self.id = worker_id
        self.trust_tokens = frozenset(t for t in trust_tokens if t)
        self._trusted: set[bytes] = set()  # routing ids that presented a trust token
        self._shm_peers: set[bytes] = set()  # routing ids on this machine (shared memory)
        self.cfg = config
        self.ctx = transport.context()
        self.router, self.address = transport.make_router(self.ctx, bind, config)
        self.addresses = {self.address, bind}
        self.store = Store(worker_id)
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self._peers: dict[str, zmq.Socket] = {}
        self._peer_of_socket: dict[zmq.Socket, str] = {}
        self._watches: dict[str, transport.PeerWatch] = {}
        self._pending: dict[int, tuple[Callback, str, Op]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._next_req = 1
        self._dirty: set[str] = set()
        self._running = False
        self._counters: dict[str, int] = defaultdict(int)
        self._per_peer: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        # routing id (hex) or peer address -> the peer's name (from HELLO), for stats()
        self._labels: dict[str, str] = {}
        # routing id -> request ids answered with an empty reply this loop turn (sent as one ACKS)
        self._acks: dict[bytes, list[int]] = {}
        self._graveyard: list[Any] = []
        self._no_handover: set[str] = set()  # peers that cannot take over our shared memory
        self._rcvtimeo = -1
        # peer address -> whether it shares our /dev/shm (None until its HELLO reply came), and
        # the requests waiting for that answer because they carry large tensors
        self._peer_shm: dict[str, bool | None] = {}
        self._parked: dict[str, list[tuple[Op, dict[str, Any], Callback | None]]] = {}
        self._handlers = self._handler_table()

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        """Serve until shut down; always closes the sockets."""
        self._running = True
        next_parent_check = next_peer_check = 0.0
        try:
            while self._running:
                timeout = 500.0 if not self._pending else 100.0  # peers are checked per turn
                if self._deadlines:
                    timeout = max(0.0, min(timeout, (self._deadlines[0][0] - time.monotonic()) * 1000))
                # no answer awaited from a peer (none, or only relayed ops that want none): only
                # the ROUTER can bring anything, and a blocking receive costs fewer system calls
                # than polling every socket; late replies wait on the peers' sockets until then
                polling = bool(self._pending)
                if not polling:
                    self._serve_router(int(timeout))
                for sock, _ in self.poller.poll(int(timeout)) if polling else ():
                    if sock is self.router:
                        self._drain(sock, self._on_request)
                    elif sock in self._peer_of_socket:
                        self._drain(sock, self._on_peer_reply)
                    if self._acks:
                        self._flush_acks()
                self._expire()
                now = time.monotonic()
                if now >= next_peer_check:
                    next_peer_check = now + _PEER_CHECK_S
                    self._check_peers()
                if self._acks:
                    self._flush_acks()
                self._graveyard.clear()  # objects whose freeing waited for the replies to go
                if self.parent_pid is not None and now >= next_parent_check:
                    next_parent_check = now + 0.5
                    if os.getppid() != self.parent_pid:
                        log.warning("worker %s: parent %d is gone, exiting", self.id, self.parent_pid)
                        break
        finally:
            self.close()

    def close(self) -> None:
        self._running = False
        self._flush_acks()
        for address, sock in self._peers.items():
            self._watches[address].close(sock)
            sock.close(linger=0)
        self._peers.clear()
        self._watches.clear()
        self.router.close(linger=0)

    def _serve_router(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for a request, then handle what has arrived."""
        timeout_ms = max(timeout_ms, 1)
        if timeout_ms != self._rcvtimeo:
            self.router.rcvtimeo = self._rcvtimeo = timeout_ms
        try:
            frames = transport.recv(self.router, 0, 2)
        except zmq.Again:
            return
        self._on_request(self.router, frames)
        if self._acks:  # it found us idle: its sender may be waiting for this very answer
            self._flush_acks()
        self._drain(self.router, self._on_request, _MAX_BATCH - 1)
        if self._acks:
            self._flush_acks()

    def _drain(self, sock: zmq.Socket, handle: Callable[[zmq.Socket, list[Any]], None],
               limit: int = _MAX_BATCH) -> None:
        copied = 2 if sock is self.router else 1  # the routing id and the header as bytes
        for _ in range(limit):
            if not transport.readable(sock):
                return
            try:
                frames = transport.recv(sock, zmq.NOBLOCK, copied)
            except zmq.Again:
                return
            handle(sock, frames)

    def _on_request(self, sock: zmq.Socket, frames: list[Any], nested: bool = False) -> None:
        """Handle one request; ``nested``: it came inside a ``BATCH`` (counted with it)."""
        if len(frames) < 2:
            self._counters["dropped_malformed"] += 1
            return
        ident = frames[0]
        try:
            msg = decode_message(frames[1:], trusted=ident in self._trusted,
                                 shm=ident in self._shm_peers)
        except UntrustedPayload:
            if not nested:
                self._count(ident.hex(), "in", frames[1:])
            self._counters["refused_untrusted"] += 1
            req_id = salvage_req_id(frames[1])
            if req_id:
                self._reply_error(_Ctx(ident, req_id), UntrustedPayload(
                    f"worker '{self.id}' refused a pickled payload (code, a module, an "
                    "optimizer): it does not trust this sender. A worker started with "
                    "spawn_worker() trusts its parent; one started from the shell trusts only "
                    "connections made with sy.connect(address, trust_token=T) when it was "
                    "started with --trust-token T. Tensors and pointers need no trust."))
            return
        except Exception as exc:  # noqa: BLE001 - malformed input of any kind
            if not nested:
                self._count(ident.hex(), "in", frames[1:])
            req_id = salvage_req_id(frames[1])
            if isinstance(exc, HandoverRefused):  # the sender retries with a copy
                self._counters["handovers_refused"] += 1
            else:
                self._counters["dropped_malformed"] += 1
                log.warning("worker %s: undecodable message from %s: %s", self.id, ident.hex(), exc)
            if req_id:
                self._reply_error(_Ctx(ident, req_id), exc)
            return
        if not nested:
            self._count(ident.hex(), "in", frames[1:], msg.shm_bytes)
        if msg.op is Op.BATCH and not nested and len(frames) == 2:
            self._on_batch(sock, ident, msg.body)
            return
        ctx = _Ctx(ident, msg.req_id)
        handler = self._handlers.get(msg.op)
        try:
            if msg.op is Op.BATCH:
                raise ProtocolError(f"worker '{self.id}' accepts a BATCH only as a single-frame "
                                    "message of its own, not inside another batch")
            if handler is None:
                raise ProtocolError(f"worker '{self.id}' does not accept {msg.op.name} messages")
            handler(ctx, msg.body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an ERROR reply
            self._reply_error(ctx, exc)

    def _on_batch(self, sock: zmq.Socket, ident: bytes, body: dict[str, Any]) -> None:
        """Handle a ``BATCH``: each message in it, in order, as if it had come on its own."""
        msgs = body.get("msgs")
        if not isinstance(msgs, list) or not all(type(m) is bytes for m in msgs):
            self._counters["dropped_malformed"] += 1
            log.warning("worker %s: malformed BATCH from %s dropped", self.id, ident.hex())
            return
        for raw in msgs:
            self._on_request(sock, [ident, raw], nested=True)

    def _reply(self, ctx: _Ctx, body: dict[str, Any] | None = None) -> None:
        if ctx.req_id == NO_REPLY:
            return
        if not body:  # an acknowledgement: batched with the others of this loop turn
            acks = self._acks.get(ctx.ident)
            if acks is None:
                self._acks[ctx.ident] = [ctx.req_id]
            else:
                acks.append(ctx.req_id)
            return
        try:
            frames = encode_message(Op.REPLY, ctx.req_id, body, shm=self._shm_policy(ctx.ident))
        except Exception as exc:  # noqa: BLE001 - e.g. a result the wire cannot carry
            self._reply_error(ctx, exc)
            return
        self._send_reply(ctx, frames)

    def _reply_error(self, ctx: _Ctx, exc: BaseException) -> None:
        log.debug("worker %s: request %d failed: %r", self.id, ctx.req_id, exc)
        if ctx.req_id == NO_REPLY:
            return
        self._send_reply(ctx, encode_message(Op.ERROR, ctx.req_id, {"error": encode_exception(exc, self.id)}))

    def _send_reply(self, ctx: _Ctx, frames: list[Any]) -> None:
        if ctx.ident in self._acks:  # acknowledgements first: replies never overtake them
            self._send_acks(ctx.ident, self._acks.pop(ctx.ident))
        self._send_to(ctx.ident, frames)

    def _send_to(self, ident: bytes, frames: list[Any]) -> None:
        try:
            transport.send(self.router, [ident, *frames])
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the peer is gone
            self._counters["unroutable_replies"] += 1
            log.info("worker %s: cannot reply to %s: %s", self.id, ident.hex(), exc)
            return
        self._count(ident.hex(), "out", frames, frames.shm_bytes if isinstance(frames, Frames) else 0)

    def _shm_policy(self, ident: bytes) -> ShmPolicy | None:
        if self.cfg.shm_threshold and ident in self._shm_peers:
            return ShmPolicy(_yes, self.cfg.shm_threshold, 2 * self.cfg.timeout)
        return None

    def _answer_now(self) -> None:
        """Send the batched acknowledgements now, unless more requests are waiting to join them."""
        if self._acks and not transport.readable(self.router):
            self._flush_acks()

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for ident, req_ids in acks.items():
            self._send_acks(ident, req_ids)

    def _send_acks(self, ident: bytes, req_ids: list[int]) -> None:
        if len(req_ids) == 1:
            self._send_to(ident, encode_ack(req_ids[0]))
        else:
            self._send_to(ident, encode_message(Op.ACKS, NO_REPLY, {"ids": req_ids}))

    def _count(self, key: str, direction: str, frames: list[Any], shm_bytes: int = 0) -> None:
        """Per-peer traffic (by routing id or address): messages, bytes (shared memory included),
        the largest message."""
        size = shm_bytes
        for f in frames:
            size += len(f) if type(f) is bytes else memoryview(f).nbytes
        messages, nbytes, largest = _COUNTER_KEYS[direction]
        if shm_bytes:
            self._counters[f"shm_bytes_{direction}"] += shm_bytes
        peer = self._per_peer[key]
        peer[messages] += 1
        peer[nbytes] += size
        if size > peer[largest]:
            peer[largest] = size


def _yes() -> bool:
    return True
