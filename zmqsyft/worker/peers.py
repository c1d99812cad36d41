"""A worker's links to its peer workers: one DEALER each, requests with continuations, liveness.

:meth:`PeerLinks.request` sends a request to a peer and parks its continuation with a deadline;
the peer's reply (or ``ACKS``) resumes it. Each link is a :class:`~zmqsyft.wire.rpc.RequestCore`
of its own, so a reply only answers a request sent on that link. A peer found lost (socket
monitor, heartbeats, a send with no connection under it) fails everything waiting on it and loses
its socket; nothing queued for it reaches a later process at that address, and the next request
makes a new link. A request with large tensors waits (in order) for the peer's HELLO reply, which
says whether the two share ``/dev/shm`` and names its bulk socket (large requests go sealed
there, :mod:`zmqsyft.wire.bulk`; replies come inside the connection).

**Keys.** A worker connects to a peer only with that peer's public key (CURVE), and only to a key
it knows (a principal of its :class:`~zmqsyft.worker.access.Access`: ``--allow``, or introduced
by its spawner or an admin). The key comes with the address, in the pointer descriptor or
``MOVE`` naming the peer, and :meth:`PeerLinks.learn` checks it; an address whose key changes (a
worker restarted there) gets a fresh link. The worker presents its own key.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import zmq

from ..config import Config
from ..errors import (
    AccessDenied,
    LimitExceeded,
    ProtocolError,
    RequestTimeout,
    WorkerUnavailable,
)
from ..keys import KeyPair
from ..wire import shm, transport
from ..wire.bodies import Body, Flush, Ping
from ..wire.codec import encode_message
from ..wire.messages import NO_REPLY, Message, Op
from .access import Access
from .peerlink import Callback, PeerLink, _AwaitHello, _Continuation
from .traffic import Traffic

__all__ = ["Callback", "PeerLink", "PeerLinks"]


log = logging.getLogger("zmqsyft.worker")

class PeerLinks:
    """All of one worker's peer links; the worker's loop polls their sockets.

    Attributes
    ----------
    dirty : set of str
        Addresses of peers this worker sent requests to since their last ``FLUSH``.
    no_handover : set of str
        Peers that could not take over this worker's shared memory: they get copies.
    """

    def __init__(self, worker_id: str, cfg: Config, ctx: zmq.Context, poller: zmq.Poller,
                 traffic: Traffic, keys: KeyPair | None = None,
                 access: Access | None = None, session: str = "") -> None:
        self.worker_id = worker_id
        self.cfg = cfg
        self.ctx = ctx
        self.poller = poller
        self.traffic = traffic
        self.keys = keys
        self.access = access if access is not None else Access(insecure=True)
        self.keys_at: dict[str, str] = {}  # address -> the public key of the worker there
        # this worker's session on its peers: its incarnation, so that whoever knows which
        # process of this worker it hands objects to can name the session (GIVE's 'session')
        self.session = session or secrets.token_hex(16)
        self._last_keepalive = 0.0
        self._lost: dict[str, tuple[float, float]] = {}  # address -> (when lost, its lease)
        self.links: dict[str, PeerLink] = {}
        self.by_socket: dict[zmq.Socket, PeerLink] = {}
        self.dirty: set[str] = set()
        self.no_handover: set[str] = set()

    @property
    def waiting(self) -> bool:
        """Whether any answer from a peer is awaited."""
        for link in self.links.values():
            if link.inflight:
                return True
        return False

    def next_deadline(self) -> float | None:
        return min((d for link in self.links.values() if (d := link.next_deadline())), default=None)

    def learn(self, address: str, key: str) -> None:
        """Note that the worker at ``address`` (canonical) holds ``key``, before anything is
        sent there for a descriptor or a ``MOVE`` naming it. ``AccessDenied`` for a key this
        worker does not know (unless ``Config.any_peer``), or none; nothing is checked on an
        insecure worker."""
        if self.keys is None:
            return
        if not key or (self.access.get(key) is None and not self.cfg.any_peer):
            raise AccessDenied(
                f"worker '{self.worker_id}' does not connect to the worker at {address}: "
                + ("no public key came with its address" if not key else
                   f"its key {key[:8]}... is not one it knows") + ". Start this worker with "
                "--allow DIR holding that worker's NAME.key (workers spawned by one client know "
                "each other already)" + ("" if not key else ", or with --any-peer to link to "
                "any peer whose key comes with a pointer"))
        old = self.keys_at.get(address)
        if old != key:
            if old is not None:
                self.lost(address, "the worker there now has another key")
            self.keys_at[address] = key

    # ------------------------------------------------------------- outgoing
    def request(self, address: str, op: Op, body: Body | dict[str, Any],
                callback: Callback | None) -> None:
        """Send a request to a peer worker; ``callback(reply, error)`` runs when it is answered.

        Without a callback the request is sent with request id 0: the peer answers nothing, not
        even an error (for relayed ops whose failures poison their results downstream).
        """
        old = self.links.get(address)
        if old is not None and old.parked is None and (gone := old.gone()) is not None:
            self.lost(address, gone)  # (found on the sending path: a new link is made)
        try:
            link = self._link(address)
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed address
            self._fail(callback, op, address, exc)
            return
        if link.parked is not None:
            link.parked.append((op, body, callback))
            return
        req_id, frames = NO_REPLY if callback is None else link.next_id(), None
        try:
            frames = encode_message(op, req_id, body, shm=link.policy)
            if link.negotiating and link.large(frames):
                raise _AwaitHello  # (it goes sealed once the HELLO reply names the bulk socket)
            link.send(req_id, frames)
        except _AwaitHello:
            link.parked = [(op, body, callback)]
            return
        except Exception as exc:  # noqa: BLE001 - (zmq.Again: no pipe, the peer refused us)
            shm.discard(frames.segments if frames is not None else ())
            self._fail(callback, op, address,
                       self._no_pipe(link) if isinstance(exc, zmq.Again) else exc)
            return
        self.traffic.count(address, "out", frames, frames.shm_bytes)
        if op is not Op.FLUSH:
            self.dirty.add(address)
        if callback is not None:
            link.track(req_id, _Continuation(op, callback), time.monotonic() + self.cfg.timeout,
                       frames.segments)

    def keepalive_every(self) -> float:
        """A quarter of the shortest lease among the linked peers, those whose link was lost
        and is to be made again, and this worker's own."""
        lease = self.cfg.lease
        for link in self.links.values():
            if link.peer is not None and link.peer.lease_ms > 0:
                lease = min(lease, link.peer.lease_ms / 1000)
        for _, lost_lease in self._lost.values():
            if lost_lease > 0:
                lease = min(lease, lost_lease)
        return max(lease / 4, 0.05)

    def keepalive(self, now: float) -> None:
        """Every :meth:`keepalive_every` seconds, a reply-less PING on every link: a peer keeps
        what this worker owns there only while one of its connections is open (see
        :mod:`~zmqsyft.worker.leases`); a link lost is made again meanwhile."""
        if now < self._last_keepalive + self.keepalive_every():  # (leases learnt since count)
            return
        self._last_keepalive = now
        # a link lost (a blip, a peer restarting) is made again while what this worker owns
        # there may still be kept for it: its HELLO names this worker's session again
        for address, (since, lease) in list(self._lost.items()):
            if address in self.links or now - since > lease:
                del self._lost[address]
                continue
            try:
                self._link(address)
            except Exception as exc:  # noqa: BLE001 - no room, no key: it waits for a request
                log.debug("worker %s: cannot link to %s again: %s", self.worker_id, address, exc)
        ping = encode_message(Op.PING, NO_REPLY, Ping())
        for link in self.links.values():
            if link.parked is None:
                try:
                    transport.send(link.sock, ping)
                except zmq.ZMQError as exc:
                    log.debug("worker %s: keep-alive to %s failed: %s", self.worker_id,
                              link.address, exc)

    def flush(self, address: str, callback: Callback) -> None:
        """Ask ``address`` to report once it has handled all this worker sent it before."""
        self.dirty.discard(address)
        self.request(address, Op.FLUSH, Flush(), callback)

    def _fail(self, callback: Callback | None, op: Op, address: str, exc: BaseException) -> None:
        if callback is None:
            log.info("worker %s: could not send %s to %s: %r", self.worker_id, op.name, address, exc)
            return
        try:
            callback(None, exc)
        except Exception:  # noqa: BLE001
            log.exception("worker %s: continuation failed", self.worker_id)

    def _link(self, address: str) -> PeerLink:
        link = self.links.get(address)
        if link is None:
            if len(self.links) >= self.cfg.max_peer_links:
                self._make_room(address)
            link = self.links[address] = PeerLink(self, address)
            self.by_socket[link.sock] = link
            self.poller.register(link.sock, zmq.POLLIN)
            req_id, hello = link.hello(self.worker_id, session=self.session,
                                       bulk=link.hello_secret(), sealed_replies=False)
            frames = encode_message(Op.HELLO, req_id, hello)
            try:
                transport.send(link.sock, frames)
            except zmq.Again:
                raise self._no_pipe(link) from None
            self.traffic.count(address, "out", frames)
            link.track(req_id, _Continuation(Op.HELLO, self._hello_answered(link)),
                       time.monotonic() + self.cfg.timeout)
        return link

    def _no_pipe(self, link: PeerLink) -> Exception:
        """A send found no connection to queue on: the peer refused the handshake (libzmq drops
        the connection and never retries), perhaps before its monitor event has reached us."""
        watch = link.watch
        reason = watch.down() or f"{transport.REFUSED} (the connection was dropped)"
        refused = watch.refused is not None or not (watch.ever_up or watch.closed or watch.failed)
        self.lost(link.address, reason, refused=refused)
        if refused:
            return LimitExceeded(f"worker '{self.worker_id}': the worker at {link.address} {reason}"
                                 f". {transport.REFUSED_ADVICE}.")
        return WorkerUnavailable(f"worker '{self.worker_id}' cannot reach the worker at "
                                 f"{link.address} ({reason})")

    def _make_room(self, address: str) -> None:
        """At ``max_peer_links``: close the oldest link nothing waits on, or refuse."""
        for old, link in self.links.items():  # oldest first
            if not link.inflight and link.parked is None and old not in self.dirty:
                self.lost(old, "closed to make room for another peer link")
                return
        raise ProtocolError(
            f"worker '{self.worker_id}' has {len(self.links)} peer links open, all busy, and may "
            f"not open one to {address} (Config.max_peer_links = {self.cfg.max_peer_links}; "
            "raise it with ZMQSYFT_MAX_PEER_LINKS or zmqsyft.configure on the worker's side)")

    def _hello_answered(self, link: PeerLink) -> Callback:
        def callback(msg: Message | None, exc: BaseException | None) -> None:
            if msg is not None and self.links.get(link.address) is link:
                log.info("worker %s: linked to the worker at %s", self.worker_id, link.address)
                link.open_bulk()
            key = self.keys_at.get(link.address, "")
            principal = self.access.get(key) if key else None
            if principal is not None and key:
                self.traffic.labels[link.address] = principal.label
            elif link.peer is not None:  # (insecure, or an unlisted key under any_peer)
                self.traffic.labels[link.address] = link.peer.id[:64] + (
                    f" (unlisted key {key[:8]}...)" if key else "")
            if self.links.get(link.address) is not link:
                return  # lost meanwhile; lost() failed what was parked
            parked, link.parked = link.parked or [], None
            for op, body, then in parked:
                self.request(link.address, op, body, then)
        return callback

    # ------------------------------------------------------------- incoming
    def receive(self, sock: zmq.Socket, frames: list[Any]) -> None:
        """A message came on a peer's socket: answer the request it names."""
        link = self.by_socket[sock]
        msg = link.receive(frames)
        if msg is None:
            self.traffic.count(link.address, "in", frames)
            self.traffic.counters["dropped_malformed"] += 1
            return
        self.traffic.count(link.address, "in", frames, msg.shm_bytes)

    def expire(self) -> None:
        """Fail the requests whose deadline has passed."""
        now = time.monotonic()
        for link in list(self.links.values()):
            for _, pending in link.expire(now):
                link.resolved(pending, None, RequestTimeout(
                    f"worker '{self.worker_id}' got no answer from the worker at {link.address} "
                    f"to {pending.op.name} within {self.cfg.timeout:g}s; it may have died or be "
                    "frozen"))

    def check(self) -> None:
        """Fail the requests waiting on peers that are unreachable (dead, frozen, gone), and drop
        the sockets (with what is queued on them) of peers we sent unanswered requests to."""
        for address, link in list(self.links.items()):
            if link.inflight or address in self.dirty:
                reason = link.gone() if link.ended else link.watch.down()
                if reason is not None:
                    self.lost(address, reason, refused=link.watch.refused is not None)

    def lost(self, address: str, reason: str, refused: bool = False) -> None:
        """A peer worker is unreachable: fail what waits on it (``LimitExceeded`` if it
        ``refused`` the handshake, else ``WorkerUnavailable``); the next request reconnects."""
        link = self.links.pop(address, None)
        self.dirty.discard(address)
        if link is None:
            return
        log.info("worker %s: lost the link to the worker at %s: %s", self.worker_id, address, reason)
        if not refused and link.peer is not None:  # re-made by the keep-alives for its lease
            self._lost[address] = (time.monotonic(), link.peer.lease_ms / 1000)
        self.poller.unregister(link.sock)
        self.by_socket.pop(link.sock, None)
        link.close()
        parked, link.parked = link.parked or [], None
        error: type[Exception] = WorkerUnavailable
        text, advice = f"worker '{self.worker_id}' cannot reach the worker at {address} ({reason})", ""
        if refused:
            error = LimitExceeded
            text = f"worker '{self.worker_id}': the worker at {address} {reason}"
            advice = f". {transport.REFUSED_ADVICE}."
        link.fail_all(lambda pending: error(f"{text}; {pending.op.name} got no answer{advice}"))
        for op, _, then in parked:
            self._fail(then, op, address, error(f"{text}; {op.name} was not sent{advice}"))

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.by_socket.clear()
