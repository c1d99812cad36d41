"""A worker's gate: who may connect to it, decided during each connection's ZeroMQ handshake.

The gate answers the ZAP requests (ZeroMQ's authentication protocol, RFC 27) that libzmq makes on
``inproc://zeromq.zap.01`` for every connection to the worker's ROUTER (whose ``ZAP_DOMAIN`` is
set, or libzmq would not ask with the NULL mechanism), and reads that ROUTER's monitor events to
know how many connections are open. It runs in one small daemon thread of its own: the worker's
loop is single-threaded and spends its idle time blocked in a receive on the ROUTER, so it could
not answer a handshake while it waits. The thread only ever sees connection events; nothing is
added to the handling of a message.

**Today's rule** is ``Config.max_connections``: a connection is refused (ZAP status 400, "too
many connections: max_connections = N") when accepting it would make more than N open
connections to the worker, else accepted (200). libzmq then closes the refused connection at once
(so a flood of them costs no descriptors for long), and the connecting DEALER sees
``EVENT_HANDSHAKE_FAILED_AUTH`` with the status (the status text never reaches it) and does not
retry; a zmqsyft caller turns that into ``LimitExceeded`` (see ``transport.PeerWatch``).

A connection over ipc is also refused when the process at its other end runs as another user:
libzmq reports the kernel's ``SO_PEERCRED`` of the peer as the request's address
(``localhost:UID:GID:PID``), which the peer cannot forge. The socket's private directory already
keeps other users out; this holds even where the socket was bound somewhere they can reach.

**Counting.** A ZAP request does not say which connection it is about (no descriptor, no port),
and the handshake events do not carry the descriptor either; only ``ACCEPTED`` and
``DISCONNECTED`` do. So the gate counts *open* connections: accepted and not yet disconnected,
whatever their handshake's state, keyed by descriptor (a descriptor is reused only after its
``DISCONNECTED`` was reported, and the events of one socket come in order). The connection a ZAP
request is about was accepted before libzmq asked, and the gate reads every pending event
before it answers, so it is one of them: the others are ``open - 1``. Connections in the middle
of their handshake count as taken, and a refused one until libzmq has closed it (a few
milliseconds): near the limit, a burst of handshakes can be refused although some of them would
have fitted. That errs on the safe side, and is never off for long.

**One context per worker.** Only one socket of a ZeroMQ context can bind the ZAP endpoint, and
``transport.context()`` is the process-wide one, which a client in the same process (a test, a
user function run on the worker that talks to other workers) also uses. So a
:class:`~zmqsyft.worker.loop.Worker` makes a ``zmq.Context`` of its own, used by its ROUTER, its
peer links' DEALERs (``worker.peers``; they reach other workers, whose gates they pass like any
client) and this gate, and destroys it when it closes. Shared memory does not involve ZeroMQ
contexts. The alternative, one gate per context serving several workers by ZAP domain, would
couple workers that share nothing else; two context threads per worker are cheap.

**Keys.** Every decision is made in :meth:`Gate.decide`, from a parsed :class:`ZapRequest`
(its mechanism and credentials: for CURVE the client's public key) to a :class:`Verdict`. A
worker's ROUTER is a CURVE server (unless ``Config.insecure``), so a connection completes its
handshake only if it knows the worker's public key; the gate then accepts it only if its own key
is one the worker knows (:class:`~zmqsyft.worker.access.Access`), and names the key as the
connection's ``user_id``, which libzmq attaches to every message of the connection as its
``User-Id`` property: the request's principal. An unknown key is refused before it can send
anything: it gets no answer to any op.

**The bulk socket.** A worker that takes large messages sealed (:mod:`zmqsyft.wire.bulk`)
binds a second ROUTER with the ZAP domain :data:`BULK_DOMAIN` and its monitor on
``bulk_monitor_endpoint``. Its connections use the PLAIN mechanism with credentials derived from a
channel secret that only a CURVE connection's HELLO could have brought (``tickets``: user name ->
password, kept by the worker's loop): anyone else is refused in the handshake, and they are
counted apart, at most ``max_connections`` of them too. Nothing on that socket is believed
because of the handshake, though: every chunk must open with its channel's key.

**Closed connections.** The descriptor of every connection that closes is appended to
``closed`` (a deque the worker's loop drains): a session's lease starts when its last
connection closed (:mod:`~zmqsyft.worker.leases`).
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..wire import transport
from .access import Access

__all__ = ["Gate", "ZapRequest", "Verdict", "DOMAIN", "BULK_DOMAIN", "EVENTS"]

log = logging.getLogger("zmqsyft.worker")

DOMAIN = "zmqsyft"
"""The ZAP domain of a worker's ROUTER (any non-empty one makes libzmq ask the gate)."""

BULK_DOMAIN = "zmqsyft-bulk"
"""The ZAP domain of a worker's bulk socket (sealed large messages)."""

EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
          | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
          | zmq.EVENT_MONITOR_STOPPED)
"""The ROUTER's monitor events the gate reads."""

_MY_UID = os.getuid()
_WARN_EVERY_S = 10.0  # at most one log line about refused connections this often
_JOIN_S = 5.0


@dataclass(frozen=True)
class ZapRequest:
    """One ZAP request (RFC 27): a connection asking to complete its handshake.

    Attributes
    ----------
    request_id : bytes
        Echoed in the reply.
    domain : str
        The ZAP domain of the socket connected to (:data:`DOMAIN`).
    address : str
        The peer's address as libzmq reports it (an IP address for tcp; no port).
    mechanism : str
        ``"NULL"``, ``"PLAIN"`` or ``"CURVE"``.
    credentials : tuple of bytes
        The mechanism's credentials (none for NULL; the client's public key for CURVE).
    """

    request_id: bytes
    domain: str
    address: str
    mechanism: str
    credentials: tuple[bytes, ...]

    def peer_uid(self) -> int | None:
        """The user id of the process at the other end of an ipc connection (libzmq reports
        ``localhost:UID:GID:PID``, from the kernel's ``SO_PEERCRED``, not from the peer); None
        for tcp, or where the system does not tell."""
        parts = self.address.split(":")
        if len(parts) == 4 and parts[0] == "localhost" and parts[1].isdigit():
            return int(parts[1])
        return None

    @classmethod
    def parse(cls, frames: list[bytes]) -> ZapRequest:
        """A request from its frames; ``ValueError`` if they are not a version 1.0 request."""
        if len(frames) < 6 or frames[0] != b"1.0":
            raise ValueError(f"not a ZAP 1.0 request ({len(frames)} frames)")
        text = [f.decode("utf-8", "replace") for f in frames[2:4]]
        return cls(frames[1], text[0], text[1], frames[5].decode("ascii", "replace"),
                   tuple(frames[6:]))


@dataclass(frozen=True)
class Verdict:
    """The gate's answer to a :class:`ZapRequest`.

    Attributes
    ----------
    status : int
        200 (accepted), 400 (refused: the client's fault), 500 (the gate failed).
    text : str
        Why (the worker's log; libzmq does not pass it on to the client).
    user_id : str
        The principal of an accepted connection (its messages' ``User-Id`` property).
    """

    status: int
    text: str
    user_id: str = ""

    def frames(self, request_id: bytes) -> list[bytes]:
        """The ZAP reply carrying this verdict."""
        return [b"1.0", request_id, str(self.status).encode(), self.text.encode(),
                self.user_id.encode(), b""]


class Gate:
    """The ZAP handler and connection counter of one worker's context (see the module's docs).

    Made before the worker's ROUTER (its sockets must be in place before the first connection
    can arrive); the ROUTER is made with :data:`DOMAIN` and ``(monitor_endpoint, EVENTS)``; then
    :meth:`start` runs the thread, and :meth:`close` stops it. The sockets are made here and
    used only by the thread from then on.

    Parameters
    ----------
    ctx : zmq.Context
        The worker's own context (only one ZAP handler can be bound per context).
    worker_id : str
        For the log and the refusal text.
    max_connections : int
        Most connections open at once (``Config.max_connections``).
    access : Access
        The keys the worker knows.
    closed : deque of int, optional
        Where the descriptors of closed connections are appended.
    """

    def __init__(self, ctx: zmq.Context, worker_id: str, max_connections: int,
                 access: Access | None = None,
                 closed: collections.deque[int] | None = None) -> None:
        self.worker_id = worker_id
        self.max_connections = max_connections
        self.access = access if access is not None else Access(insecure=True)
        self.closed: collections.deque[int] = closed if closed is not None else collections.deque()
        self.monitor_endpoint = f"inproc://zmqsyft-gate-{uuid.uuid4().hex}"
        self._zap = transport.bind_zap_handler(ctx)
        self._events = transport.monitor_reader(ctx, self.monitor_endpoint)
        self.bulk_monitor_endpoint = f"inproc://zmqsyft-gate-bulk-{uuid.uuid4().hex}"
        self._bulk_events = transport.monitor_reader(ctx, self.bulk_monitor_endpoint)
        self._open: set[int] = set()  # descriptors of the connections open now
        self._open_bulk: set[int] = set()  # the same, of the bulk socket
        self.tickets: dict[bytes, bytes] = {}
        """The bulk socket's PLAIN credentials: user name -> password (the loop adds them)."""
        self.refused = 0
        """How many connections were refused so far."""
        self._last_warning = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"zmqsyft-gate-{worker_id}",
                                        daemon=True)

    @property
    def open_connections(self) -> int:
        """How many connections are open (accepted, not yet disconnected) as last seen."""
        return len(self._open)

    def start(self) -> None:
        """Run the gate's thread (once)."""
        self._thread.start()

    def close(self, router: zmq.Socket | None) -> bool:
        """Stop the gate; from the worker's thread, before ``router`` closes. Returns whether the
        thread has ended (its sockets closed with it)."""
        self._stop.set()
        if router is not None and not router.closed:
            router.disable_monitor()  # reports MONITOR_STOPPED: the thread wakes and ends
        if not self._thread.is_alive() and self._thread.ident is None:  # never started
            self._close_sockets()
            return True
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            log.error("worker %s: the connection gate did not stop within %gs", self.worker_id,
                      _JOIN_S)
            return False
        return True

    # ------------------------------------------------------------- decisions
    def decide(self, request: ZapRequest) -> Verdict:
        """Whether the connection ``request`` is about may complete its handshake.

        The one place where connections are accepted or refused, and named: an accepted
        CURVE connection's ``user_id`` is its public key, its principal.
        """
        uid = request.peer_uid()
        if uid is not None and uid != _MY_UID:
            return Verdict(400, f"a connection over ipc from another user (uid {uid})")
        if request.domain == BULK_DOMAIN:
            return self._decide_bulk(request)
        refusal, user_id = self.access.admit(request.mechanism, request.credentials)
        if refusal:
            return Verdict(400, refusal)
        others = max(len(self._open) - 1, 0)  # it is one of the open ones
        if others >= self.max_connections:
            return Verdict(400, f"too many connections: max_connections = {self.max_connections}")
        return Verdict(200, "OK", user_id)

    def _decide_bulk(self, request: ZapRequest) -> Verdict:
        creds = request.credentials
        if request.mechanism != "PLAIN" or len(creds) != 2:
            return Verdict(400, "the bulk socket takes PLAIN connections with a channel's ticket")
        password = self.tickets.get(creds[0])
        if password is None or not hmac.compare_digest(password, creds[1]):
            return Verdict(400, "a bulk connection with no channel's ticket")
        if max(len(self._open_bulk) - 1, 0) >= self.max_connections:
            return Verdict(400, f"too many bulk connections: max_connections = "
                           f"{self.max_connections}")
        return Verdict(200, "OK")

    # ------------------------------------------------------------- the thread
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._bulk_events, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(500))
                if not self._read_events():
                    break
                if self._zap in ready:
                    self._answer_all()
        except zmq.ContextTerminated:
            pass
        except Exception:  # noqa: BLE001 - a gate bug must be visible, and not kill the worker
            log.exception("worker %s: the connection gate failed", self.worker_id)
        finally:
            self._close_sockets()

    def _read_events(self) -> bool:
        """Take in every pending monitor event; False once the monitor has stopped."""
        self._read_bulk_events()
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            event = parse_monitor_message(frames)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                self._open.add(value)
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                if value in self._open:
                    self._open.discard(value)
                    self.closed.append(value)
            elif kind == zmq.EVENT_MONITOR_STOPPED:
                return False

    def _read_bulk_events(self) -> None:
        while True:
            try:
                frames = self._bulk_events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._open_bulk.add(event["value"])
            elif event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._open_bulk.discard(event["value"])

    def _answer_all(self) -> None:
        """Answer the pending ZAP requests, one at a time, each after the latest events."""
        while True:
            try:
                frames = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not self._read_events():
                self._stop.set()
            request_id = frames[1] if len(frames) > 1 else b""
            request = None
            try:
                request = ZapRequest.parse(frames)
                verdict = self.decide(request)
            except Exception as exc:  # noqa: BLE001 - refuse, say why in the log
                log.exception("worker %s: ZAP request not understood", self.worker_id)
                verdict = Verdict(500, f"internal error: {type(exc).__name__}")
            self._zap.send_multipart(verdict.frames(request_id))
            if verdict.status != 200:
                self._refused(verdict)
            elif request is not None and request.domain == DOMAIN:
                principal = self.access.get(verdict.user_id)
                log.info("worker %s: accepted a %s connection from %s (%s; %d open)",
                         self.worker_id, request.mechanism, request.address or "ipc",
                         f"{principal.label}, key {verdict.user_id[:8]}..." if verdict.user_id
                         and principal is not None else "anonymous: insecure", len(self._open))

    def _refused(self, verdict: Verdict) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warning < _WARN_EVERY_S:  # (each one at info, at most one warning)
            log.info("worker %s: refused a connection (%s)", self.worker_id, verdict.text)
        else:
            self._last_warning = now
            log.warning("worker %s: refused a connection (%s; %d refused so far, %d open)",
                        self.worker_id, verdict.text, self.refused, len(self._open))

    def _close_sockets(self) -> None:
        self._zap.close(linger=0)
        self._events.close(linger=0)
        self._bulk_events.close(linger=0)
