"""A worker's bulk socket: large messages to and from its callers, sealed with AES-256-GCM.

What travels and why is :mod:`zmqsyft.wire.bulk`'s; this is the worker's end. Every connection
whose ``HELLO`` brought a channel secret (every CURVE connection of a zmqsyft caller) gets a
:class:`Channel`: the keys, the blobs received on it and not yet claimed by their ``BULK``
marker, and the routing id of the caller's bulk socket once an authentic chunk came from it.
A channel belongs to the routing id of the CURVE connection that brought its secret, so a blob
can only ever stand in for a message of that connection, with that connection's principal:
nothing received on the bulk socket carries an identity of its own.

A marker whose blob is not complete yet is *parked*, and every later request of its connection
behind it (the connection's order is kept), until the blob is complete (the loop then polls the
bulk socket too), for at most ``Config.timeout``; then its caller is told, and the requests
behind it go on.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.utils.z85

from ..config import Config
from ..errors import ProtocolError, RequestTimeout
from ..wire import bulk, channel, transport
from ..wire.bodies import Bulk
from ..wire.codec import encode_message
from ..wire.messages import Op
from .gate import BULK_DOMAIN, EVENTS, Gate
from .leases import Holder

__all__ = ["Channel", "Sealed", "open_sealed"]

log = logging.getLogger("zmqsyft.worker")


def open_sealed(w: Any, bind: str | None) -> Sealed | None:
    """The bulk socket of worker ``w`` (its loop, being made: its ROUTER is bound), at ``bind``
    or beside its ROUTER; ``None`` if it has no keys (insecure) or sealing is off, or if it
    cannot bind beside its ROUTER (logged: large messages then go inside the connections). A
    ``bind`` asked for that cannot be bound raises."""
    if w.cfg.sealed_threshold <= 0:
        return None
    try:
        return Sealed(w.ctx, bind or channel.bulk_bind(w.address), w.cfg, w.gate,
                      w.traffic.counters, w._on_request, w._fail, w._send_to,
                      plain=w.keys is None)
    except (zmq.ZMQError, ValueError) as exc:
        if bind:
            raise
        log.warning("worker %s: no bulk socket (%s): large messages will go inside the CURVE "
                    "connections, several times slower", w.id, exc)
        return None


class Channel:
    """One connection's sealed channel."""

    __slots__ = ("ident", "keys", "opener", "sealer", "route", "blob_out", "replies")

    def __init__(self, ident: bytes, keys: bulk.ChannelKeys, cfg: Config,
                 replies: bool = True, plain: bool = False) -> None:
        self.ident = ident
        self.replies = replies  # whether the caller takes sealed replies (a peer link does not)
        self.keys = keys
        limit = cfg.max_message_size
        self.opener = bulk.Opener(keys.channel, keys.recv_key, limit, cfg.max_frames,
                                  max_pending=2 * limit if limit > 0 else -1, plain=plain)
        self.sealer = bulk.Sealer(keys.channel, keys.send_key, plain)
        self.route: bytes | None = None  # the caller's bulk socket, once it showed itself
        self.blob_out = 0


class Sealed:
    """The bulk socket of a worker and the channels of its connections.

    Parameters
    ----------
    ctx : zmq.Context
        The worker's context.
    bind : str
        Where to bind the bulk socket (``channel.bulk_bind`` of the worker's own endpoint:
        beside it).
    cfg : Config
        ``sealed_threshold``, ``max_message_size``, ``max_frames``, ``max_connections``.
    gate : Gate
        Admits the bulk socket's connections (PLAIN, with a channel's ticket).
    counters : Counter
        Where chunks dropped and blobs given up are counted (the worker's ``stats()`` counters).
    handle, fail, send_to
        The worker's loop: ``handle(frames, user, header, holder=, sealed=)`` handles a request
        (the routing id first), ``fail(ident, req_id, holder, exc)`` answers one with an error,
        ``send_to(ident, frames, counted)`` sends a reply (counting ``counted``).
    """

    def __init__(self, ctx: zmq.Context, bind: str, cfg: Config, gate: Gate,
                 counters: collections.Counter[str], handle: Callable[..., None],
                 fail: Callable[[bytes, int, Holder | None, BaseException], None],
                 send_to: Callable[[bytes, list[Any], list[Any]], None],
                 plain: bool = False) -> None:
        self.cfg = cfg
        self.plain = plain  # an insecure worker's: chunks unencrypted (bulk._Plain)
        self.threshold = cfg.sealed_threshold
        self.gate = gate
        self.sock, self.endpoint = transport.make_bulk_router(
            ctx, bind, cfg, BULK_DOMAIN, (gate.bulk_monitor_endpoint, EVENTS),
            bulk.MAX_CHUNK_MESSAGE)
        self.channels: collections.OrderedDict[bytes, Channel] = collections.OrderedDict()
        self._by_channel: dict[bytes, Channel] = {}
        self._max_channels = 2 * cfg.max_connections
        self.counters = counters  # the worker's (stats)
        self._handle, self._fail, self._send_to = handle, fail, send_to
        # routing id -> its requests held back behind a marker whose blob is incomplete
        self.parked: dict[bytes, collections.deque[_Parked]] = {}

    # ------------------------------------------------------------------ channels
    def hello(self, ident: bytes, secret: str, replies: bool = True) -> bool:
        """A connection's ``HELLO`` brought ``secret`` (Z85; ``""``: none): its channel from now
        on (a later HELLO on the same connection replaces it). Whether it has one. ``replies``:
        whether large replies may go sealed to it too."""
        self.drop(ident)
        if not secret:
            return False
        try:
            raw = zmq.utils.z85.decode(secret) if len(secret) == 40 else b""
        except Exception:  # noqa: BLE001
            raw = b""
        if len(raw) != 32:
            raise ProtocolError("HELLO: 'bulk' is not a 32-byte secret in Z85 text")
        keys = bulk.ChannelKeys(raw, caller=False)
        if keys.channel in self._by_channel:  # (another connection sent the same secret)
            raise ProtocolError("HELLO: that bulk secret is in use; draw a fresh one")
        chan = Channel(ident, keys, self.cfg, replies, self.plain)
        self.channels[ident] = chan
        self._by_channel[keys.channel] = chan
        self.gate.tickets[keys.user] = keys.ticket
        while len(self.channels) > self._max_channels:  # the least recently used go first
            self.drop(next(iter(self.channels)))
        return True

    def drop(self, ident: bytes) -> None:
        """Forget a connection's channel (its blobs freed)."""
        chan = self.channels.pop(ident, None)
        if chan is not None:
            self._by_channel.pop(chan.keys.channel, None)
            self.gate.tickets.pop(chan.keys.user, None)
            chan.opener.close()

    # ------------------------------------------------------------------ receiving
    def drain(self, limit: int = 4096) -> set[bytes]:
        """Take in the chunks waiting on the bulk socket; the routing ids of the connections
        that got a blob completed (their parked requests may go on)."""
        done: set[bytes] = set()
        sock = self.sock
        for _ in range(limit):
            if not transport.readable(sock):
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if len(frames) != 2:
                self.counters["bulk_dropped"] += 1
                continue
            route, chunk = frames[0].bytes, frames[1]
            chan = self._by_channel.get(bulk.channel_of(chunk.buffer))
            if chan is None:
                self.counters["bulk_dropped"] += 1
                continue
            try:
                blob = chan.opener.open(chunk.buffer)
            except bulk.BulkError as exc:
                self.counters["bulk_dropped"] += 1
                log.info("a bulk chunk on the channel of %s was dropped: %s", chan.ident.hex(), exc)
                continue
            chan.route = route  # (authentic: its sender holds the channel's key)
            self.channels.move_to_end(chan.ident)
            if blob:
                done.add(chan.ident)
                self.counters["sealed_messages_in"] += 1
        return done

    def take(self, ident: bytes, blob: int) -> list[Any] | None:
        """The frames of blob ``blob`` of the connection ``ident`` if complete, else ``None``.
        ``ProtocolError`` if that connection has no channel, or the blob was refused or broke."""
        chan = self.channels.get(ident)
        if chan is None:
            raise ProtocolError("a BULK marker on a connection whose HELLO opened no bulk channel")
        return chan.opener.take(blob)

    def expire(self, older_than: float) -> None:
        """Forget blobs no marker claimed in time, and halves of blobs that never completed."""
        for chan in self.channels.values():
            if chan.opener.done or chan.opener.pending:
                self.counters["bulk_expired"] += chan.opener.expire(older_than)

    # ------------------------------------------------------------------ sending
    def reply(self, ident: bytes, req_id: int, frames: list[Any]) -> bool:
        """Send a reply sealed, if it is large and its caller takes sealed replies on a bulk
        socket it has shown: the ``BULK`` marker first (the caller opens the chunks as they
        come), then the chunks. Whether it was (else: send it as usual)."""
        chan = self.channels.get(ident)
        if chan is None or len(frames) < 2 or not chan.replies:
            return False
        nbytes = bulk.blob_size(frames)
        if nbytes < self.threshold:
            return False
        if chan.route is None:
            self.drain()  # its attach may be waiting
            if chan.route is None:
                return False
        chan.blob_out += 1
        blob, route, sock = chan.blob_out, chan.route, self.sock
        self.counters["sealed_messages_out"] += 1
        self._send_to(ident, encode_message(Op.BULK, req_id, Bulk(
            blob=blob, frames=len(frames), nbytes=nbytes)), frames)
        try:
            for chunk in chan.sealer.seal(blob, frames):
                sock.send(route, zmq.SNDMORE)
                sock.send(chunk, copy=False)
        except zmq.ZMQError as exc:  # its bulk socket is gone (ROUTER_MANDATORY): it times out
            chan.route = None
            self.counters["bulk_unroutable"] += 1
            log.info("a sealed reply to %s could not be sent: %s", ident.hex(), exc)
        return True

    # ------------------------------------------------------------------ parking
    def hold(self, frames: list[Any], user: str, header: Any) -> bool:
        """Hold a request whose connection waits for a sealed message; whether it was held."""
        queue = self.parked.get(frames[0])
        if queue is None:
            return False
        queue.append(_Parked(frames, user, header))
        return True

    def on_marker(self, ident: bytes, req_id: int, body: dict[str, Any], user: str, header: Any,
                  holder: Holder) -> None:
        """A ``BULK`` marker: handle the sealed message it stands for if it is all here, else
        park it first in its connection's queue, until it is (:meth:`unpark`)."""
        try:
            marker = Bulk.from_wire(body)
            frames = self.take(ident, marker.blob)
            if frames is None:
                self.arrived(wake=False)
                frames = self.take(ident, marker.blob)
            if frames is not None and len(frames) != marker.frames:
                raise ProtocolError(f"a sealed message of {len(frames)} frames for a BULK marker "
                                    f"of {marker.frames}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes an ERROR reply
            self.counters["dropped_malformed"] += 1
            self._fail(ident, req_id, holder, exc)
            return
        if frames is None:
            deadline = time.monotonic() + self.cfg.timeout
            self.parked.setdefault(ident, collections.deque()).appendleft(
                _Parked(None, user, header, holder, req_id, marker.blob, deadline))
            return
        self._handle([ident, *frames], user, header, holder=holder, sealed=True)

    def arrived(self, wake: bool = True) -> None:
        """Take in the chunks waiting; go on with the connections a blob completed."""
        for ident in self.drain():
            if wake and ident in self.parked:
                self.unpark(ident, time.monotonic())

    def tick(self, now: float) -> None:
        """Answer the parked markers whose time ran out (the requests behind them go on)."""
        for ident in list(self.parked):
            self.unpark(ident, now)

    def housekeeping(self, now: float) -> None:
        """Take in chunks no marker waits for (so that nothing piles up), and give up blobs
        nobody claimed within twice ``Config.timeout``."""
        if transport.readable(self.sock):
            self.arrived()
        self.expire(now - 2 * self.cfg.timeout)

    def unpark(self, ident: bytes, now: float) -> None:
        """Handle the held requests of connection ``ident`` in order, up to a marker whose blob
        is still incomplete (one past its deadline is answered with an error)."""
        queue = self.parked.get(ident)
        while queue:
            item = queue.popleft()
            if item.frames is not None:  # (a marker among them parks again, at the front)
                self._handle(item.frames, item.user, item.header)
                continue
            try:
                frames = self.take(ident, item.blob)
            except Exception as exc:  # noqa: BLE001 - refused or broken: its sender is told
                self._fail(ident, item.req_id, item.holder, exc)
                continue
            if frames is None:
                if now < item.deadline:
                    queue.appendleft(item)
                    return
                self.counters["bulk_timeouts"] += 1
                self._fail(ident, item.req_id, item.holder, RequestTimeout(
                    "got the marker of a sealed message but not all of the message itself on "
                    f"the bulk socket within {self.cfg.timeout:g}s (the connection to it broke "
                    "off, or it was refused); send it again"))
                continue
            self._handle([ident, *frames], item.user, item.header, holder=item.holder,
                         sealed=True)
        if queue is not None and not queue and self.parked.get(ident) is queue:
            del self.parked[ident]

    def close(self) -> None:
        self.sock.disable_monitor()
        self.sock.close(linger=0)
        for chan in self.channels.values():  # (the gate's tickets stay: a caller's bulk socket
            chan.opener.close()              # still in its handshake is not refused, and logged)
        self.channels.clear()
        self._by_channel.clear()


class _Parked:
    """A request held back behind a sealed message still coming: a message as received
    (``frames``), or the ``BULK`` marker itself (``frames`` None; its blob and deadline)."""

    __slots__ = ("frames", "user", "header", "holder", "req_id", "blob", "deadline")

    def __init__(self, frames: list[Any] | None, user: str, header: Any,
                 holder: Holder | None = None, req_id: int = 0, blob: int = 0,
                 deadline: float = 0.0) -> None:
        self.frames = frames
        self.user = user
        self.header = header
        self.holder = holder
        self.req_id = req_id
        self.blob = blob
        self.deadline = deadline
