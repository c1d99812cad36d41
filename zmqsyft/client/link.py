"""What a connection is made of, apart from its socket: its session (the :class:`Host` it asks
for settings, keys and the delete queue) and the record it keeps of each request in flight."""

from __future__ import annotations

import collections
import logging
from typing import Any, Protocol

import zmq

from ..config import Config
from ..wire.messages import Message
from ..wire.rpc import Pending
from .outbox import Outboxes

__all__ = ["InFlight", "Host", "Deferred"]

log = logging.getLogger("zmqsyft.client.connection")


class InFlight(Pending):
    """A request in flight: what it keeps alive, the pointers it makes, who waits for it."""

    __slots__ = ("keep", "results", "awaited")

    def __init__(self, keep: tuple[Any, ...], results: tuple[Any, ...], what: str,
                 awaited: bool) -> None:  # (one per op: Pending's fields set here, no super call)
        self.what = what
        self.req_id = 0
        self.done = False
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.awaited = awaited
        self.keep = keep
        self.results = results


class Host(Protocol):
    """What a connection needs of its session."""

    name: str
    ctx: zmq.Context
    keys: Any  # the session's KeyPair (what it is known by), and its id (what it owns for)
    session_id: str
    outboxes: Outboxes
    _deletes: collections.deque[tuple[str, int]]

    @property
    def cfg(self) -> Config: ...

    def flush_deletes(self, wait: bool, timeout: float | None = None,
                      rider: Any = None) -> bytes | None: ...


class Deferred:
    """A connection's errors of pipelined requests nobody waited for, raised at the next
    synchronisation point; and the connecting of its sealed bulk channel."""

    deferred: list[BaseException]
    worker: Any
    peer: Any

    def raise_deferred(self) -> None:
        """Raise the first error of a pipelined request not reported yet."""
        if self.deferred:
            errors, self.deferred = self.deferred, []
            exc = errors[0]
            if len(errors) > 1:
                exc.add_note(f"({len(errors) - 1} more pipelined operation(s) on worker "
                             f"'{self.worker.id}' failed too)")
            raise exc

    def _open_bulk(self, host: Host, worker: Any, bulk: Any) -> None:
        """The worker's HELLO reply named its bulk socket (or not): connect ``bulk`` to it."""
        if bulk is not None and self.peer is not None:
            try:
                bulk.connect(host.ctx, host.cfg, worker.address, self.peer.bulk)
            except Exception as exc:  # noqa: BLE001 - then everything goes inside the connection
                log.warning("worker %s: not using its bulk socket: %s", worker.id, exc)
