"""The request core both halves build their connections on. No sockets here.

A :class:`RequestCore` is one connection's bookkeeping: it numbers the requests sent on it,
keeps them in flight until answered, reads what comes back (a plain reply, an error, an ``ACKS``
answering many at once, or something undecodable whose request id can still be salvaged),
expires requests whose deadline ran out, fails everything at once when the connection is lost,
and runs the ``HELLO`` negotiation (whether the two ends share ``/dev/shm``). A reply can only
answer a request that was sent on the same connection: every connection has its own core.

The drivers are thin subclasses that own a socket: the client's
:class:`~zmqsyft.client.connection.Connection` (one thread's DEALER to one worker, waiting with
deadlines) and the worker's :class:`~zmqsyft.worker.peers.PeerLink` (a DEALER to a peer worker,
never waiting, continuations instead). They say what an answer means by overriding
:meth:`RequestCore.resolved`.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from . import shm
from .bodies import Error, Hello, HelloReply
from .codec import ack_id, decode_message, unpack_acks
from .exc_codec import decode_exception
from .messages import Message, Op, salvage_req_id

__all__ = ["Pending", "RequestCore", "shm_match", "ACKED"]

log = logging.getLogger(__name__)

ACKED = Message(Op.REPLY, 0, {})  # what receive() returns for a bare acknowledgement


def shm_match(host: Any) -> bool:
    """Whether a peer's host key says it shares this process's ``/dev/shm`` (same machine, same
    mount, same user), so that large tensors may travel through shared memory."""
    return type(host) is str and host != "" and host == shm.host_key()


class Pending:
    """A request in flight: ``what`` it is (for error messages) and, once answered, ``reply`` or
    ``error``."""

    __slots__ = ("what", "req_id", "done", "reply", "error")

    def __init__(self, what: str) -> None:
        self.what = what
        self.req_id = 0
        self.done = False
        self.reply: Message | None = None
        self.error: BaseException | None = None


class RequestCore:
    """One connection's requests: ids, those in flight, deadlines, replies, HELLO, loss.

    Attributes
    ----------
    inflight : dict
        Request id -> :class:`Pending` (or a driver's subclass of it), until answered.
    peer : HelloReply or None
        The other end's answer to our ``HELLO``, once it came.
    shm : bool
        Whether the other end shares our ``/dev/shm``: only then are its shared-memory tensors
        accepted, and ours sent to it that way.
    """

    def __init__(self) -> None:
        self.inflight: dict[int, Any] = {}
        self._next = 1
        self._deadlines: list[tuple[float, int]] = []
        self._segments: dict[int, tuple[str, ...]] = {}  # request id -> the segments it carries
        self.hello_id = 0
        self.peer: HelloReply | None = None
        self.shm = False

    # ----------------------------------------------------------------- sending
    def next_id(self) -> int:
        """A fresh request id on this connection (never 0, which asks for no reply)."""
        req_id = self._next
        self._next = req_id + 1
        return req_id

    def track(self, req_id: int, pending: Pending, deadline: float | None = None,
              segments: tuple[str, ...] = ()) -> None:
        """Keep ``pending`` until its reply comes (or ``deadline``, a ``time.monotonic()``);
        the shared-memory ``segments`` its message carries are unlinked once it is over
        (answered, failed, expired or lost: the receiver has mapped them, or never will)."""
        pending.req_id = req_id
        self.inflight[req_id] = pending
        if segments:
            self._segments[req_id] = segments
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, req_id))

    def hello(self, name: str, trust: str = "", session: str = "", bulk: str = "",
              sealed_replies: bool = True) -> tuple[int, Hello]:
        """The id and body of this connection's ``HELLO``, its first request (the driver sends
        it and tracks it like any other); ``session``: the sender's session id; ``bulk``: its
        bulk channel's secret (Z85), if it wants one, and ``sealed_replies``: whether large
        replies may come on it too."""
        self.hello_id = self.next_id()
        self.peer = None
        self.shm = False
        return self.hello_id, Hello(peer=name, trust=trust or "", host=shm.host_key(),
                                    session=session, bulk=bulk, sealed_replies=sealed_replies)

    @property
    def negotiating(self) -> bool:
        """Whether the ``HELLO`` reply is still awaited."""
        return self.hello_id in self.inflight

    # --------------------------------------------------------------- receiving
    def receive(self, frames: list[Any]) -> Message | None:
        """Handle one message that came back on this connection.

        Returns the decoded message (``ACKED`` for a bare acknowledgement), or ``None`` if it
        could not be decoded; then the request it names, if any can be salvaged and is in flight
        here, fails with the reason.
        """
        if len(frames) == 1:
            req_id = ack_id(frames[0])
            if req_id:
                self.answer(req_id, ACKED, None)
                return ACKED
        try:
            msg = decode_message(frames, shm=self.shm)
            if msg.op is Op.BULK:  # it came sealed on the bulk socket
                msg = decode_message(self.unseal(msg), shm=self.shm)
            if msg.op is Op.ACKS:
                for req_id in unpack_acks(msg):
                    self.answer(req_id, ACKED, None)
                return msg
        except Exception as exc:  # noqa: BLE001 - malformed input of any kind
            req_id = salvage_req_id(frames[0]) if frames else 0
            if req_id in self.inflight:
                self.answer(req_id, None, exc)
            else:
                log.warning("undecodable reply dropped: %s", exc)
            return None
        self.answer(msg.req_id, msg, None)
        return msg

    def answer(self, req_id: int, reply: Message | None, error: BaseException | None) -> None:
        """Resolve request ``req_id`` with its reply (an ``ERROR`` becomes its error); a reply
        to nothing in flight here (late, or never sent on this connection) is dropped."""
        pending = self.inflight.pop(req_id, None)
        if self._segments:
            shm.discard(self._segments.pop(req_id, ()))
        if pending is None:
            self.late(req_id)
            return
        if reply is not None and reply.op is Op.ERROR:
            try:
                error = decode_exception(Error.from_wire(reply.body).error)
            except ProtocolError as exc:
                error = exc
            reply = None
        if req_id == self.hello_id and reply is not None:
            try:
                self.peer = HelloReply.from_wire(reply.body)
            except Exception as exc:  # noqa: BLE001 - not a worker of ours
                error, reply = exc, None
            else:
                self.shm = self.peer.shm and shm_match(self.peer.host)
        self.resolved(pending, reply, error)

    def resolved(self, pending: Any, reply: Message | None, error: BaseException | None) -> None:
        """What an answer means; drivers extend this. Here: the pending request records it."""
        pending.done = True
        pending.reply = reply
        pending.error = error

    def unseal(self, marker: Message) -> list[Any]:
        """The frames of the message a ``BULK`` marker stands for (drivers with a bulk channel
        collect them from it; here there is none)."""
        raise ProtocolError("a BULK message on a connection with no bulk channel")

    def late(self, req_id: int) -> None:
        """A reply to a request not in flight on this connection (drivers count it)."""

    # ---------------------------------------------------------------- failures
    def expire(self, now: float) -> list[tuple[int, Any]]:
        """Take out the requests whose deadline has passed (the driver fails them, saying why)."""
        gone = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, req_id = heapq.heappop(deadlines)
            pending = self.inflight.pop(req_id, None)
            if self._segments:
                shm.discard(self._segments.pop(req_id, ()))
            if pending is not None:
                gone.append((req_id, pending))
        return gone

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def fail_all(self, error: Callable[[Any], BaseException]) -> None:
        """The connection is lost: every request in flight fails with ``error(pending)``; the
        next connection negotiates afresh."""
        inflight, self.inflight = self.inflight, {}
        self._deadlines = []
        segments, self._segments = self._segments, {}
        for names in segments.values():
            shm.discard(names)
        self.hello_id = 0
        self.shm = False
        for pending in inflight.values():
            self.resolved(pending, None, error(pending))
