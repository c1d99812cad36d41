"""One link of a worker to a peer worker: its DEALER, liveness watch, bulk channel and the
requests in flight on it (a :class:`~zmqsyft.wire.rpc.RequestCore` of its own). The links as a
whole, and what is sent on them, are :mod:`~zmqsyft.worker.peers`'."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..errors import AccessDenied, RequestDropped
from ..wire import channel, transport
from ..wire.bodies import Body
from ..wire.bulk import blob_size
from ..wire.messages import Message, Op
from ..wire.rpc import Pending, RequestCore
from ..wire.values import ShmPolicy

__all__ = ["Callback", "PeerLink"]

log = logging.getLogger("zmqsyft.worker")

Callback = Callable[[Message | None, BaseException | None], None]
"""A continuation: called once with the reply, or with the error, of a request to a peer."""


class _AwaitHello(Exception):  # noqa: N818 - control flow, never seen outside request()
    """Raised by the shared-memory decider while a peer's HELLO reply is still on its way."""


class _Continuation(Pending):
    __slots__ = ("callback", "op")

    def __init__(self, op: Op, callback: Callback) -> None:
        super().__init__(op.name)
        self.op = op
        self.callback = callback


class PeerLink(RequestCore):
    """This worker's DEALER to one peer worker and the requests in flight on it."""

    def __init__(self, links: Any, address: str) -> None:  # (its PeerLinks)
        super().__init__()
        self.links, self.address = links, address
        self.ended = False  # the peer dropped a request of ours unrun: this link is over
        curve = None
        if links.keys is not None:
            key = links.keys_at.get(address)
            if not key:
                raise AccessDenied(
                    f"worker '{links.worker_id}' knows no public key for the worker at {address}, "
                    "so it does not connect there (a pointer to it must come with its key)")
            curve = (links.keys.public, links.keys.secret, key.encode("ascii"))
        self.sock, self.watch = transport.make_dealer(links.ctx, address, links.cfg, curve)
        # requests waiting for the HELLO reply (they carry large tensors, or came after one)
        self.parked: list[tuple[Op, Body | dict[str, Any], Callback | None]] | None = None
        self.policy = (ShmPolicy(self._shm_decider, links.cfg.shm_threshold, 2 * links.cfg.timeout)
                       if links.cfg.shm_threshold else None)
        # the sealed channel for large requests (zmqsyft.wire.bulk); its socket once the HELLO
        # reply names the peer's bulk socket
        self.bulk: channel.CallerChannel | None = None

    def hello_secret(self) -> str:
        """A fresh bulk channel secret for this link's HELLO (Z85; ``""`` with sealing off).
        An insecure worker's channel is plain (not encrypted), but large requests still go
        beside the connection."""
        if self.links.cfg.sealed_threshold <= 0:
            return ""
        if self.bulk is not None:
            self.bulk.close()
        self.bulk = bulk = channel.CallerChannel(replies=False, plain=self.links.keys is None)
        return bulk.secret

    def open_bulk(self) -> None:
        """The HELLO reply came: connect to the peer's bulk socket, if it named one."""
        if self.bulk is not None and self.peer is not None:
            try:
                self.bulk.connect(self.links.ctx, self.links.cfg, self.address, self.peer.bulk)
            except Exception as exc:  # noqa: BLE001 - large requests go inside the connection
                log.warning("worker %s: not using the bulk socket of %s: %s",
                            self.links.worker_id, self.address, exc)

    def large(self, frames: list[Any]) -> bool:
        """Whether a message would go sealed on this link's bulk channel (if it has one)."""
        return (self.bulk is not None and len(frames) > 1
                and blob_size(frames) >= self.links.cfg.sealed_threshold)

    def send(self, req_id: int, frames: list[Any]) -> None:
        """Send a request: a large one sealed on the bulk socket, after its marker."""
        sealed = (self.bulk.marker(req_id, frames, self.links.cfg.sealed_threshold)
                  if self.bulk is not None else None)
        if sealed is None:
            transport.send(self.sock, frames)
            return
        assert self.bulk is not None
        transport.send(self.sock, sealed[0])
        self.bulk.send(sealed[1], frames)

    def _shm_decider(self) -> bool:
        if self.negotiating:
            raise _AwaitHello
        return self.shm

    def resolved(self, pending: Any, reply: Message | None, error: BaseException | None) -> None:
        self.ended = self.ended or isinstance(error, RequestDropped)  # (it drops all on it)
        try:
            pending.callback(reply, error)
        except Exception:  # noqa: BLE001 - a continuation must not kill the loop
            log.exception("worker %s: continuation of %s failed", self.links.worker_id, pending.op.name)

    def late(self, req_id: int) -> None:
        self.links.traffic.counters["late_replies"] += 1

    def gone(self) -> str | None:
        """Why this link is lost (cheap when it is not: for the sending path), or ``None``."""
        if self.ended:
            return "it ended this link (it was frozen longer than its callers wait)"
        if not self.watch.changed() and transport.writable(self.sock):
            return None
        return self.watch.down() or (None if transport.writable(self.sock) else "it was dropped")

    def close(self) -> None:
        self.watch.close(self.sock)
        self.sock.close(linger=0)
        if self.bulk is not None:
            self.bulk.close()
