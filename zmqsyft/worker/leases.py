"""Sessions and leases: who holds a worker's objects, and how long they are kept for them.

Every object a worker stores belongs to a :class:`Holder`: one session of one principal (a
client process, a peer worker relaying ops). A connection names its session in its ``HELLO``
(a client's connections all name the client's one session; a reconnecting client names it
again); requests on a connection that sent none belong to its principal's default session.

A holder's session is alive while any of its connections is open: ZeroMQ's heartbeats close a
connection whose other end died, froze or left the network (within three heartbeat intervals),
and the worker's gate reports each closed connection (by descriptor) from its own thread. Once
the last one closed, the **lease** (``Config.lease``) runs: a connection of the same principal
naming the same session within it keeps everything; after it, the holder's objects are freed
like a ``DEL`` of each (pointer records free what they own downstream), except what it handed
to others before (their owner changed). What others hand to a principal (``GIVE``) goes to the
session the ``GIVE`` names: for a worker, the process of it that is to hold the pointer (a
worker's peer links name its incarnation as their session), so that a worker restarted at the
same address with the same key does not keep its predecessor's objects alive; it is kept for the
lease from then on until that process links here. A ``GIVE`` naming no session hands to the
principal's default session (``""``), which lives while any connection of that principal is
open, and then for the lease.

The holder of a request is found from its routing id, but only if the routing id's holder has
the principal the request's ``User-Id`` names: a routing id a peer chose itself cannot borrow
another principal's session.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import zmq

from ..wire import shm
from .access import Principal

log = logging.getLogger("zmqsyft.worker")

__all__ = ["Holder", "Leases"]

_SRCFD = int(zmq.SRCFD)

SEGMENTS_KEPT = 120.0
"""Seconds a holder remembers the segments of its replies (the writer's ``max_age`` sweep takes
over after that)."""


class Holder:
    """One session of one principal: the objects it owns here and its open connections.

    Attributes
    ----------
    principal : Principal
        Whose session it is.
    session : str
        The session id its connections named (``""``: the principal's default session).
    ids : set of int
        The ids of the objects it owns here.
    nbytes : int
        The tensor bytes they hold.
    conns : set of int
        The descriptors of its open connections.
    gone_since : float or None
        When its last connection closed (``time.monotonic()``), while it has none.
    segments : deque of (float, tuple of str)
        Shared-memory segments written for replies to it in the last ``SEGMENTS_KEPT`` seconds
        (with when): the receiver unlinks each once it mapped it; if its last connection closes
        first, nobody will, and they are unlinked then (not when they age out).
    """

    __slots__ = ("principal", "session", "ids", "nbytes", "conns", "gone_since", "segments")

    def __init__(self, principal: Principal, session: str) -> None:
        self.principal = principal
        self.session = session
        self.ids: set[int] = set()
        self.nbytes = 0
        self.conns: set[int] = set()
        self.gone_since: float | None = None
        self.segments: collections.deque[tuple[float, tuple[str, ...]]] = collections.deque()

    def replied_with(self, names: tuple[str, ...]) -> None:
        """A reply to it carried the shared-memory segments ``names``."""
        now = time.monotonic()
        kept = self.segments
        while kept and now - kept[0][0] > SEGMENTS_KEPT:
            kept.popleft()  # (long mapped, or the writer's own sweep unlinks them)
        kept.append((now, names))

    def drop_segments(self) -> None:
        """Its last connection closed: what replies to it left in shared memory is nobody's."""
        while self.segments:
            shm.discard(self.segments.popleft()[1])

    def __repr__(self) -> str:
        return (f"<Holder {self.principal.label} session={self.session!r} objects={len(self.ids)} "
                f"conns={len(self.conns)}>")


class Leases:
    """The holders of one worker, their connections, and their leases.

    Parameters
    ----------
    lease : float
        Seconds a holder with no open connection is kept (``Config.lease``).
    """

    def __init__(self, lease: float, worker_id: str = "") -> None:
        self.lease = lease
        self.worker_id = worker_id
        self.holders: dict[tuple[str, str], Holder] = {}
        self._by_route: dict[bytes, Holder] = {}
        self._by_fd: dict[int, Holder] = {}
        self.closed: collections.deque[int] = collections.deque()
        """Descriptors of closed connections, appended by the gate's thread."""

    def holder(self, ident: bytes, principal: Principal, header: Any) -> Holder:
        """The holder a request from routing id ``ident`` with ``principal`` belongs to (the hot
        path: one lookup; the connection is noted if its holder had none open)."""
        h = self._by_route.get(ident)
        if h is None or (h.principal.key != principal.key and principal.key):
            h = self._by_route[ident] = self.session(principal, "")
        if not h.conns and header is not None:
            self._attach(h, header)
        return h

    def label(self, ident: bytes) -> str:
        """The principal label of the connection with routing id ``ident`` (traffic counters)."""
        h = self._by_route.get(ident)
        return h.principal.label if h is not None else ident.hex()

    def session(self, principal: Principal, session: str) -> Holder:
        """The holder of ``principal``'s ``session`` (made if new)."""
        key = (principal.key, session)
        h = self.holders.get(key)
        if h is None:
            h = self.holders[key] = Holder(principal, session)
        elif h.principal is not principal:
            h.principal = principal  # its rights may have grown since
        return h

    def hello(self, ident: bytes, principal: Principal, session: str, header: Any) -> Holder:
        """A ``HELLO`` naming ``session``: the routing id's requests belong to it from now on."""
        h = self.session(principal, session[:64])
        old = self._by_route.get(ident)
        self._by_route[ident] = h
        if old is not None and old is not h:
            for fd, holder in list(self._by_fd.items()):
                if holder is old:  # the connection moved to the session it named
                    self._detach(fd)
        if header is not None:
            self._attach(h, header)
        return h

    def _attach(self, h: Holder, header: Any) -> None:
        self.take_closed()  # a descriptor is reused only after its close was reported
        try:
            fd = int(header.get(_SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return
        if fd < 0:
            return
        prev = self._by_fd.get(fd)
        if prev is not None and prev is not h:
            self._detach(fd)
        self._by_fd[fd] = h
        h.conns.add(fd)
        h.gone_since = None

    def _detach(self, fd: int) -> None:
        h = self._by_fd.pop(fd, None)
        if h is not None:
            h.conns.discard(fd)
            if not h.conns:
                h.gone_since = time.monotonic()
                h.drop_segments()

    def take_closed(self) -> None:
        """Take in the connections the gate saw close."""
        closed = self.closed
        while closed:
            fd = closed.popleft()
            h = self._by_fd.get(fd)
            if h is not None:
                log.info("worker %s: a connection of %s closed (session %r, %d left)",
                         self.worker_id, h.principal.label, h.session, len(h.conns) - 1)
            self._detach(fd)

    def expired(self, now: float) -> list[Holder]:
        """Take out the holders whose lease has run out (their objects are the caller's to free).

        A principal's default session (``""``: what others gave it, what it did without naming
        a session) lives as long as any connection of that principal is open."""
        self.take_closed()
        alive = {h.principal.key for h in self.holders.values() if h.conns}
        gone = []
        for h in self.holders.values():
            if h.conns:
                continue
            if h.session == "":
                if h.principal.key in alive:
                    h.gone_since = None
                    continue
                if h.gone_since is None:
                    h.gone_since = now
            if h.gone_since is not None and now - h.gone_since > self.lease:
                gone.append(h)
        for h in gone:
            del self.holders[(h.principal.key, h.session)]
        if gone:
            dead = set(map(id, gone))
            for ident in [i for i, h in self._by_route.items() if id(h) in dead]:
                del self._by_route[ident]
        return gone

    def by_principal(self) -> dict[str, dict[str, int]]:
        """Objects, bytes and sessions per principal (its label)."""
        out: dict[str, dict[str, int]] = {}
        for h in self.holders.values():
            row = out.setdefault(h.principal.label, {"objects": 0, "bytes": 0, "sessions": 0,
                                                     "connections": 0})
            row["objects"] += len(h.ids)
            row["bytes"] += h.nbytes
            row["sessions"] += 1
            row["connections"] += len(h.conns)
        return out
