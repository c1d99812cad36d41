"""ZeroMQ sockets and endpoints: the only module that sets socket options.

A worker binds one ROUTER; every peer (the client included) reaches it with a DEALER. Every
socket has ``LINGER=0`` (closing never blocks), unlimited high-water marks (flow control is the
client's in-flight window, so ZeroMQ never drops or blocks on a reply) and ZMTP heartbeats. The
ROUTER sets ``ROUTER_MANDATORY`` so that a reply to a peer that has gone raises instead of being
dropped silently, and ``MAXMSGSIZE`` from the config; with a ZAP domain, every connection to it is
put to the ZAP handler of its context (a worker's gate, :mod:`zmqsyft.worker.gate`) during the
handshake, and one the handler refuses shows on the connecting DEALER's :class:`PeerWatch`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import uuid
from typing import Any

import zmq

from ..config import Config
from ..errors import ProtocolError
from .watch import HANDSHAKE_FAILED, REFUSED, REFUSED_ADVICE, PeerWatch

__all__ = ["Dropped", "context", "make_router", "make_dealer", "PeerWatch", "ipc_endpoint", "is_loopback",
           "send", "recv", "readable", "writable", "canonical_endpoint", "ZAP_ENDPOINT", "bind_zap_handler",
           "monitor_reader", "REFUSED", "REFUSED_ADVICE", "HANDSHAKE_FAILED", "recv_request",
           "make_bulk_router", "make_bulk_dealer", "clip"]

_HANDSHAKE_MS = 10_000
_BULK_QUEUE = 64  # chunk messages (of at most 1 MiB) a bulk socket holds per connection
_IPC_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


def context() -> zmq.Context:
    """The process-wide ZeroMQ context."""
    return zmq.Context.instance()


ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq sends a context's ZAP requests (RFC 27): one handler per context binds it."""

def _common(sock: zmq.Socket, cfg: Config) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    ivl = max(1, int(cfg.heartbeat_ivl * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl * 2)  # (a ping goes within ivl: 3 ivl at most)
    sock.setsockopt(zmq.HEARTBEAT_TTL, ivl * 3)


def make_router(ctx: zmq.Context, bind: str, cfg: Config, zap_domain: str = "",
                monitor: tuple[str, int] | None = None,
                curve: tuple[bytes, bytes] | None = None) -> tuple[zmq.Socket, str]:
    """Bind a worker's ROUTER; return it with the endpoint it actually bound (port 0 resolved).

    ``zap_domain``: if not empty, every connection's handshake asks the context's ZAP handler
    (with the NULL mechanism libzmq asks only when a domain is set). ``monitor``: an inproc
    endpoint and the events (``zmq.EVENT_*``) to report there, attached before binding so that no
    connection is missed. ``curve``: the worker's (public, secret) key: every connection must
    then be a CURVE client that knows the public key (authenticated and encrypted), and the ZAP
    handler sees each client's public key.
    """
    sock = ctx.socket(zmq.ROUTER)
    try:
        _common(sock, cfg)
        if curve is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = curve
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a connection that never completes its handshake (a bare TCP connect) holds a
        # descriptor and a place under max_connections: for this long at most, not libzmq's 30 s
        sock.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_MS)
        if cfg.max_message_size > 0:
            sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_size)
        if zap_domain:
            sock.setsockopt_string(zmq.ZAP_DOMAIN, zap_domain)
        if monitor is not None:
            sock.monitor(*monitor)
        endpoint = _bind(sock, bind)
    except Exception:
        sock.close(linger=0)
        raise
    return sock, endpoint


def _bind(sock: zmq.Socket, bind: str) -> str:
    """Bind ``sock`` (``tcp://HOST:0``: a free port); the endpoint it bound."""
    if bind.startswith("tcp://") and bind.endswith(":0"):
        sock.bind_to_random_port(bind[: -len(":0")])
    else:
        sock.bind(bind)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def make_bulk_router(ctx: zmq.Context, bind: str, cfg: Config, zap_domain: str,
                     monitor: tuple[str, int], max_message: int) -> tuple[zmq.Socket, str]:
    """Bind a worker's bulk socket (sealed large messages, :mod:`zmqsyft.wire.bulk`): a ROUTER
    taking PLAIN connections that its ZAP handler admits, each message at most ``max_message``
    bytes (one chunk). Returns it with the endpoint it bound."""
    sock = ctx.socket(zmq.ROUTER)
    try:
        _common(sock, cfg)
        # a bounded queue per connection: past it, libzmq stops reading that connection (TCP
        # pushes back on its sender) until the worker has opened what came; the worker opens
        # chunks while a marker waits for them, and every quarter second otherwise
        sock.setsockopt(zmq.RCVHWM, _BULK_QUEUE)
        sock.plain_server = True
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, zap_domain)
        sock.monitor(*monitor)
        endpoint = _bind(sock, bind)
    except Exception:
        sock.close(linger=0)
        raise
    return sock, endpoint


def make_bulk_dealer(ctx: zmq.Context, address: str, cfg: Config, user: bytes, password: bytes,
                     max_message: int) -> zmq.Socket:
    """A DEALER to a worker's bulk socket (PLAIN, with a channel's ticket); what comes back on it
    is at most ``max_message`` bytes a message."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, cfg)
    sock.plain_username = user
    sock.plain_password = password
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    sock.connect(address)
    return sock


def bind_zap_handler(ctx: zmq.Context) -> zmq.Socket:
    """The REP socket answering ``ctx``'s ZAP requests (``zmq.ZMQError`` EADDRINUSE if another
    socket of ``ctx`` answers them already)."""
    sock = ctx.socket(zmq.REP)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
    except Exception:
        sock.close(linger=0)
        raise
    return sock


def monitor_reader(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A PAIR reading the events a socket's monitor reports at ``endpoint`` (inproc; it may be
    connected before the monitor is attached). No high-water mark: an event dropped under a
    flood of connections would leave a count wrong for good."""
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def make_dealer(ctx: zmq.Context, address: str, cfg: Config,
                curve: tuple[bytes, bytes, bytes] | None = None) -> tuple[zmq.Socket, PeerWatch]:
    """A DEALER connected to a peer's ROUTER (fresh random routing id), and its liveness watch.

    ``curve``: (our public key, our secret key, the peer's public key): the connection is then
    CURVE, and completes only with the holder of that key's secret, if it accepts ours. The
    DEALER never reconnects by itself (``RECONNECT_IVL=-1``): a connection lost is for good, so
    that whatever comes next at that address (a restarted worker) is met with a new socket and a
    new ``HELLO``, never with requests meant for the process that went.
    """
    sock = ctx.socket(zmq.DEALER)
    _common(sock, cfg)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    watch = PeerWatch(sock, 3 * cfg.heartbeat_ivl, address)
    sock.connect(address)
    return sock, watch


_COPY_BELOW = 65536  # smaller frames are copied: cheaper than a zero-copy zmq.Frame
# plain ints: pyzmq's enum constants cost an enum construction per use on the hot path
_SNDMORE, _RCVMORE, _EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = (
    int(c) for c in (zmq.SNDMORE, zmq.RCVMORE, zmq.EVENTS, zmq.POLLIN, zmq.POLLOUT, zmq.NOBLOCK))
# The hot path avoids what costs Python frames per call in pyzmq: ``Socket.get(option)``
# builds a ``SocketOption`` enum each time (so "more frames?" is read from the received
# frame's ``more``, and "readable?" from ``zmq_poll``, which does not), and the pure-Python
# ``send`` wrapper of pyzmq's socket class (for routing ids and groups, which we never use) is
# skipped for plain sockets.
_PLAIN_SOCKET = zmq.Socket
_backend_send = zmq.Socket.__mro__[1].send  # (zmq.backend's Socket.send)
_poll = zmq.zmq_poll


def send(sock: zmq.Socket, frames: list[Any]) -> None:
    """Send a multipart message: small frames copied, large ones (tensor buffers) without a copy.

    Never blocks: with no high-water mark, a socket can only refuse a message when it has no
    peer to queue it for (a DEALER whose connection was refused during its handshake, which
    libzmq does not retry), and then ``zmq.Again`` says so at once instead of waiting for ever.
    """
    put = _backend_send if type(sock) is _PLAIN_SOCKET else type(sock).send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        small = type(frame) is bytes and len(frame) < _COPY_BELOW
        put(sock, frame, (_SNDMORE | _NOBLOCK) if i < last else _NOBLOCK, copy=small)


def writable(sock: zmq.Socket) -> bool:
    """Whether ``sock`` has a connection to queue a message on (a DEALER that never reconnects
    has none once its connection was lost; polling handles libzmq's pending news)."""
    return bool(_poll(((sock, _POLLOUT),), 0))


def readable(sock: zmq.Socket) -> bool:
    """Whether a message is waiting on ``sock`` (cheaper than a ``zmq.Again`` from a receive)."""
    return bool(_poll(((sock, _POLLIN),), 0))


def recv(sock: zmq.Socket, flags: int = 0, copied: int = 1, max_frames: int = 0) -> list[Any]:
    """Receive a multipart message: the first ``copied`` frames (routing id, header) as ``bytes``,
    the rest (tensor buffers) as zero-copy ``zmq.Frame`` objects.

    A message of more than ``max_frames`` frames (``0``: no limit), or one this process has no
    memory to receive, is read to its end and dropped, so that the next receive starts at the next
    message; :class:`Dropped` says why, and keeps the message's first ``copied`` frames (to
    answer its sender). ``zmq.Again`` passes through.
    """
    first = sock.recv(flags, copy=False)
    frames = [first.bytes if copied else first]
    if not first.more:
        return frames
    return _read_rest(sock, frames, copied, max_frames)


def _read_rest(sock: zmq.Socket, frames: list[Any], copied: int, max_frames: int) -> list[Any]:
    """The rest of a message whose first ``frames`` were received, the last of them with more
    to come (see :func:`recv`)."""
    more = True
    try:
        while more:
            if max_frames and len(frames) >= max_frames:
                raise Dropped(f"a message of more than {max_frames} frames was dropped (the "
                              "limit is Config.max_frames: start the worker with a larger "
                              "--max-frames / ZMQSYFT_MAX_FRAMES to accept it)")
            frame = sock.recv(copy=False)
            more = frame.more
            frames.append(frame.bytes if len(frames) < copied else frame)
    except (Dropped, MemoryError) as exc:
        head = frames[:copied]
        frames.clear()
        dropped = _discard_rest(sock)
        if isinstance(exc, MemoryError):
            exc = Dropped(f"a message too large for this process's memory was dropped "
                          f"({dropped} more frames discarded)")
        exc.head = head
        raise exc from None
    return frames


def recv_request(sock: zmq.Socket, flags: int = 0,
                 max_frames: int = 0) -> tuple[list[Any], str, zmq.Frame | None]:
    """Receive one request on a ROUTER: like :func:`recv` with the routing id and the header
    copied, plus the ``User-Id`` libzmq attached to it (what the ZAP handler named the
    connection's principal: for CURVE, the client's public key; it cannot be forged; ``""`` if
    none) and the header frame itself (whose ``get(zmq.SRCFD)`` names the connection)."""
    first = sock.recv(flags, copy=False)
    ident = first.bytes
    if not first.more:
        return [ident], "", None
    header = sock.recv(copy=False)
    try:
        user = header.get("User-Id")
    except zmq.ZMQError:  # no such property: no ZAP handler named one
        user = ""
    frames = [ident, header.bytes]
    if not header.more:
        return frames, user, header
    return _read_rest(sock, frames, 2, max_frames), user, header


class Dropped(ProtocolError):
    """A message received but not kept; ``head``: its first frames (routing id, header)."""

    head: list[Any] = []


def _discard_rest(sock: zmq.Socket) -> int:
    """Read the rest of a multipart message without keeping it; how many frames that was."""
    n = 0
    while sock.get(_RCVMORE):
        sock.recv(copy=False)
        n += 1
    return n


def ipc_endpoint(name: str, directory: str | None = None) -> str:
    """An ``ipc://`` endpoint in a private directory (created mode 0700 if not given)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:32] or "worker"
    if directory is not None:
        path = os.path.join(directory, f"{safe}.sock")
        if len(path) <= _IPC_MAX:
            return f"ipc://{path}"
    directory = tempfile.mkdtemp(prefix="zmqsyft-")
    path = os.path.join(directory, f"{safe}.sock")
    if len(path) > _IPC_MAX:  # a very long TMPDIR
        directory = tempfile.mkdtemp(prefix="zs-", dir="/tmp")
        path = os.path.join(directory, f"{safe}.sock")
    return f"ipc://{path}"


_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def canonical_endpoint(address: Any) -> str:
    """The one spelling of a peer's endpoint (``tcp://HOST:PORT`` with the port as a plain
    number and an IP address in its short form, or ``ipc://PATH`` normalised), so that one
    worker is one link however a pointer spells it. Raises ``ProtocolError`` for anything else:
    a worker reaches its peers over tcp or ipc only."""
    if type(address) is not str or len(address) > 512:
        raise ProtocolError(f"a peer address must be a short string, not {clip(address)}")
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://"):].rpartition(":")
        if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
            raise ProtocolError(f"{clip(address)} is not tcp://HOST:PORT")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            host = host.lower()
            labels = host.split(".")
            if labels[-1].isdigit() or labels[-1].startswith("0x"):  # an address, spelled oddly
                if len(labels) != 4 or not all(x.isascii() and x.isdigit() and int(x) < 256
                                                for x in labels):
                    raise ProtocolError(f"{clip(address)} does not name a host") from None
                host = ".".join(str(int(x)) for x in labels)
            elif not _HOSTNAME.fullmatch(host) or len(host) > 253:
                raise ProtocolError(f"{clip(address)} does not name a host") from None
        else:
            host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
        return f"tcp://{host}:{int(port)}"
    if address.startswith("ipc://") and len(address) > len("ipc://") and "\x00" not in address:
        path = address[len("ipc://"):]
        if path.startswith("/"):
            path = "/" + os.path.normpath(path).lstrip("/")
        return f"ipc://{path}"
    raise ProtocolError(f"{clip(address)} is not a tcp:// or ipc:// endpoint of a worker")


def clip(value: Any) -> str:
    """``repr(value)``, cut to 80 characters (for error messages about what a peer sent)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_loopback(endpoint: str) -> bool:
    """Whether binding ``endpoint`` exposes the worker only to this machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a host name: treat as exposed
