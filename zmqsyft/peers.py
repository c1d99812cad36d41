"""A worker's links to its peer workers: one DEALER each, requests with continuations, liveness.

Mixed into :class:`~zmqsyft.worker.Worker`. ``_request`` sends a request to a peer and parks its
continuation with a deadline; replies (and ``ACKS``) resume it. A peer found dead (socket monitor,
heartbeats) fails everything waiting on it and loses its socket, so that nothing queued for it is
delivered to a later process at the same address. A request with large tensors for a peer whose
HELLO reply has not come yet is parked, in order with what follows it, until the reply says
whether the two share ``/dev/shm``.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from . import shm, transport
from .codec import ShmPolicy, decode_message, encode_message, unpack_acks
from .config import Config
from .errors import RequestTimeout, WorkerUnavailable
from .messages import NO_REPLY, Message, Op
from .remote_exc import decode_exception

if TYPE_CHECKING:
    from .worker import Callback

__all__ = ["PeerLinks"]

log = logging.getLogger("zmqsyft.worker")


class _AwaitHello(Exception):  # noqa: N818 - control flow, never seen outside _request
    """Raised by the shared-memory decider while a peer's HELLO reply is still on its way."""


class PeerLinks:
    """Requests from this worker to its peers (mixed into :class:`~zmqsyft.worker.Worker`)."""

    id: str
    cfg: Config
    ctx: zmq.Context
    poller: zmq.Poller
    _peers: dict[str, zmq.Socket]
    _peer_of_socket: dict[zmq.Socket, str]
    _watches: dict[str, transport.PeerWatch]
    _pending: dict[int, tuple[Callback, str, Op]]
    _deadlines: list[tuple[float, int]]
    _next_req: int
    _dirty: set[str]
    _counters: dict[str, int]
    _labels: dict[str, str]
    _peer_shm: dict[str, bool | None]
    _parked: dict[str, list[tuple[Op, dict[str, Any], Callback | None]]]

    def _count(self, key: str, direction: str, frames: list[Any], shm_bytes: int = 0) -> None:
        raise NotImplementedError

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, req_id = heapq.heappop(self._deadlines)
            entry = self._pending.pop(req_id, None)
            if entry is not None:
                callback, address, op = entry
                self._safe_callback(callback, None, RequestTimeout(
                    f"worker '{self.id}' got no answer from the worker at {address} to {op.name} "
                    f"within {self.cfg.timeout:g}s; it may have died or be frozen"))

    # ------------------------------------------------------------- incoming

    def _check_peers(self) -> None:
        """Fail the requests waiting on peers that are unreachable (dead, frozen, gone), and drop
        the sockets (with what is queued on them) of peers we sent unanswered requests to."""
        waiting = {address for _, address, _ in self._pending.values()} | self._dirty
        for address in waiting:
            reason = self._watches[address].down() if address in self._watches else None
            if reason is not None:
                self._peer_lost(address, reason)

    def _peer_lost(self, address: str, reason: str) -> None:
        """A peer worker is unreachable: fail what waits on it; the next request reconnects."""
        failed = [rid for rid, (_, addr, _) in self._pending.items() if addr == address]
        self._peer_shm.pop(address, None)
        parked = self._parked.pop(address, [])
        sock = self._peers.pop(address, None)
        if sock is not None:
            self.poller.unregister(sock)
            self._peer_of_socket.pop(sock, None)
            self._watches.pop(address).close(sock)
            sock.close(linger=0)
        self._dirty.discard(address)
        for rid in failed:
            callback, _, op = self._pending.pop(rid)
            self._safe_callback(callback, None, WorkerUnavailable(
                f"worker '{self.id}' cannot reach the worker at {address} ({reason}); "
                f"{op.name} got no answer"))
        for op, _, then in parked:
            if then is not None:
                self._safe_callback(then, None, WorkerUnavailable(
                    f"worker '{self.id}' cannot reach the worker at {address} ({reason}); "
                    f"{op.name} was not sent"))

    def _on_peer_reply(self, sock: zmq.Socket, frames: list[Any]) -> None:
        address = self._peer_of_socket.get(sock, "?")
        try:
            msg = decode_message(frames, shm=self._peer_shm.get(address) is True)
        except Exception as exc:  # noqa: BLE001
            self._count(address, "in", frames)
            self._counters["dropped_malformed"] += 1
            log.warning("worker %s: undecodable reply from %s: %s", self.id,
                        self._peer_of_socket.get(sock), exc)
            return
        self._count(address, "in", frames, msg.shm_bytes)
        if msg.op is Op.ACKS:
            for req_id in unpack_acks(msg):
                self._on_peer_answer(Message(Op.REPLY, req_id, {}))
        else:
            self._on_peer_answer(msg)

    def _on_peer_answer(self, msg: Message) -> None:
        entry = self._pending.pop(msg.req_id, None)
        if entry is None:
            self._counters["late_replies"] += 1
            return
        callback = entry[0]
        if msg.op is Op.ERROR:
            self._safe_callback(callback, None, decode_exception(msg.body.get("error")))
        else:
            self._safe_callback(callback, msg, None)

    def _safe_callback(self, callback: Callback, msg: Message | None, exc: BaseException | None) -> None:
        try:
            callback(msg, exc)
        except Exception:  # noqa: BLE001 - a continuation must not kill the loop
            log.exception("worker %s: continuation failed", self.id)

    # -------------------------------------------------------------- outgoing

    def _shm_decider(self, address: str) -> Callable[[], bool]:
        def use() -> bool:
            known = self._peer_shm.get(address)
            if known is None:
                raise _AwaitHello
            return known
        return use

    def _peer(self, address: str) -> zmq.Socket:
        sock = self._peers.get(address)
        if sock is None:
            sock, self._watches[address] = transport.make_dealer(self.ctx, address, self.cfg)
            self._peers[address] = sock
            self._peer_of_socket[sock] = address
            self.poller.register(sock, zmq.POLLIN)
            self._peer_shm[address] = None
            hello = {"peer": self.id, "host": shm.host_key()}
            self._request(address, Op.HELLO, hello, self._learn_peer(address))
        return sock

    def _learn_peer(self, address: str) -> Callback:
        def callback(msg: Message | None, exc: BaseException | None) -> None:
            if msg is not None and isinstance(msg.body.get("id"), str):
                self._labels[address] = msg.body["id"][:64]
            if address not in self._peers:
                return  # lost meanwhile; _peer_lost failed what was parked
            self._peer_shm[address] = (msg is not None and msg.body.get("shm") is True
                                       and msg.body.get("host") == shm.host_key())
            for op, body, then in self._parked.pop(address, []):
                self._request(address, op, body, then)
        return callback

    def _request(self, address: str, op: Op, body: dict[str, Any], callback: Callback | None) -> None:
        """Send a request to a peer worker; ``callback(reply, error)`` runs when it is answered.

        Without a callback the request is sent with request id 0: the peer answers nothing, not
        even an error (for relayed ops whose failures poison their results downstream).

        A request with large tensors for a peer whose HELLO reply has not come yet waits for it
        (to know whether shared memory can carry them); so do the requests to that peer after it.
        """
        if address in self._parked:
            self._parked[address].append((op, body, callback))
            return
        req_id = NO_REPLY
        if callback is not None:
            req_id = self._next_req
            self._next_req += 1
        try:
            sock = self._peer(address)
            policy = None
            if self.cfg.shm_threshold:
                policy = ShmPolicy(self._shm_decider(address), self.cfg.shm_threshold,
                                   2 * self.cfg.timeout)
            frames = encode_message(op, req_id, body, shm=policy)
            transport.send(sock, frames)
        except _AwaitHello:
            self._parked[address] = [(op, body, callback)]
            return
        except Exception as exc:  # noqa: BLE001
            if callback is None:
                log.info("worker %s: could not send %s to %s: %r", self.id, op.name, address, exc)
            else:
                self._safe_callback(callback, None, exc)
            return
        self._count(address, "out", frames, frames.shm_bytes)
        if op is not Op.FLUSH:
            self._dirty.add(address)
        if callback is None:
            return
        self._pending[req_id] = (callback, address, op)
        heapq.heappush(self._deadlines, (time.monotonic() + self.cfg.timeout, req_id))
