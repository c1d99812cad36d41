"""A DEALER's view of its peer's reachability, from the socket's monitor events.

:class:`PeerWatch` turns libzmq's connection events into one answer, ``down()``: ``None`` while
the peer is reachable (or may still become so), else why it is not, in words for an error
message. The texts a refused or failed handshake shows are here too.
"""

from __future__ import annotations

import time

import zmq

__all__ = ["PeerWatch", "REFUSED", "REFUSED_ADVICE", "HANDSHAKE_FAILED"]

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)

REFUSED = ("refused the connection during the handshake (at its max_connections limit, or your "
           "key is not one it allows)")
"""What a refused handshake tells the connecting side: the ZAP status text does not reach it."""

HANDSHAKE_FAILED = (
    "the connection's handshake failed: the worker's public key given here (worker_key=) is not "
    "the one it serves with, one end uses CURVE and the other not (--insecure on one side only), "
    "or it is not a zmqsyft worker")
"""What a handshake that fails before any authorisation tells the connecting side."""

REFUSED_ADVICE = ("If it serves its max_connections already, close other connections to it, or "
                  "start it with a larger max_connections (--max-connections N, or "
                  "ZMQSYFT_MAX_CONNECTIONS=N in its environment); if it does not know your key, "
                  "give it your public key (zmqsyft worker --allow DIR, your NAME.key in DIR)")
"""What to do about a refused connection."""


class PeerWatch:
    """Tells, from a DEALER's monitor events, whether its peer is reachable.

    A peer process that dies closes the connection at once (``down`` immediately); one that
    freezes stops answering ZMTP heartbeats, and the connection is dropped within three heartbeat
    intervals; nothing listening at the address refuses the connection (down at once); one that
    never accepts it (a host gone silent) is down once ``grace`` seconds passed without a
    handshake. A busy peer still answers heartbeats (ZeroMQ's I/O thread, without the GIL). A
    peer refusing the handshake (its ZAP handler: at ``max_connections``, or not authorised) is
    down at once, for good; ``refused`` holds the status code it answered (400).
    """

    WATCHED = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, sock: zmq.Socket, grace: float, address: str = "") -> None:
        self.monitor = sock.get_monitor_socket(self.WATCHED)
        self.grace = grace
        self.address = address
        self.up = False
        self.ever_up = False
        self.closed = False  # the connection was refused (nothing listens) or ended for good
        self.since = time.monotonic()
        self.refused: int | None = None
        self.failed = 0  # handshakes that failed for another reason (a key mismatch)

    def changed(self) -> bool:
        """Whether an event waits to be read (one cheap option read: for the sending path)."""
        return bool(int(self.monitor.get(_EVENTS)) & _POLLIN)

    def down(self) -> str | None:
        """Drain pending events; a reason if the peer is unreachable now, else ``None``."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = event["event"]
            self.up = kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self.ever_up = self.ever_up or self.up
            self.closed = self.closed or kind in (zmq.EVENT_CLOSED, zmq.EVENT_DISCONNECTED)
            self.since = time.monotonic()
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused = int(event["value"])
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.failed += 1
        if self.refused is not None:
            return f"{REFUSED} (ZAP status {self.refused})"
        if self.failed and not self.ever_up:
            return HANDSHAKE_FAILED
        if self.up:
            return None
        if self.ever_up:
            return "the connection to it was lost: it died, or stopped answering heartbeats"
        if self.closed:
            return (f"the connection was refused: nothing accepts connections at "
                    f"{self.address or 'its address'} (the worker is not running there)")
        if time.monotonic() - self.since > self.grace:
            return f"no connection could be made to it within {self.grace:g}s"
        return None

    def close(self, sock: zmq.Socket) -> None:
        sock.disable_monitor()
        self.monitor.close(linger=0)
