"""Pointer records and the peers they point to: what must happen before a pointer leaves this
worker, and how a peer restarted since a record was made is told apart from a missing object.

**Before a pointer leaves.** Its new holder talks to the data's worker directly, so everything
this worker relayed there must have been handled first (:func:`settled`), and the data's worker
must have handed the object to the new holder (:func:`hand_over`: a ``GIVE`` naming the
holder's principal and its session there, so that what a worker is given is kept only for that
process of it: a relay restarted at the same address with the same key has another session, and
its predecessor's objects are freed once their lease ran out).

**Restarted peers.** A record names the process of the peer its object lives in (its
``incarnation``, from the descriptor it was made from; ``""``: unknown). A peer link learns the
incarnation of the process it talks to from that process's ``HELLO`` reply (a link never
reconnects by itself: a new process means a new link and a new ``HELLO``). When the two differ,
the peer was restarted and the object is gone: a request through the record is answered with
``WorkerRestarted`` naming the peer (:func:`checked` before one is sent, :func:`explained` when
the peer answered ``ObjectNotFound``), not with the peer's ``ObjectNotFound``, so that the
caller knows to send the data again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import ObjectNotFound, WorkerRestarted, WorkerUnavailable
from ..wire.bodies import Give, HelloReply, Ping
from ..wire.messages import Message, Op, PointerDesc
from .context import Ctx, Services
from .store import PointerRecord

__all__ = ["record", "settled", "or_error", "hand_over", "peer", "restarted", "checked",
           "explained", "linked"]

Then = Callable[[], None]


def record(w: Services, desc: PointerDesc) -> PointerRecord:
    """The pointer record of a descriptor that came over the wire: its address in its one
    spelling, and its key one this worker may connect to (``ProtocolError`` /
    ``AccessDenied`` otherwise; see :meth:`~zmqsyft.worker.peers.PeerLinks.learn`)."""
    rec = PointerRecord.from_desc(desc)
    if rec.address not in w.addresses:
        w.peers.learn(rec.address, rec.key)
        if rec.owned and rec.address not in w.peers.links:
            # link now, not at the first use: the peer keeps what it gave this worker only while
            # one of this worker's connections to it is open (then for its lease)
            w.peers.request(rec.address, Op.PING, Ping(), None)
    return rec


def settled(w: Services, ctx: Ctx, address: str, then: Then) -> None:
    """Run ``then`` once everything relayed to ``address`` has been handled there.

    Needed before a pointer to ``address`` leaves this worker: its new holder talks to
    ``address`` directly and must not overtake what this worker relayed there before.
    """
    if address not in w.peers.dirty:
        then()
        return
    w.peers.flush(address, or_error(w, ctx, then))


def or_error(w: Services, ctx: Ctx, then: Then,
             rec: PointerRecord | None = None) -> Callable[[Message | None, BaseException | None], None]:
    """A continuation that runs ``then``, or answers ``ctx`` with the peer's error (for a
    request through ``rec``: :func:`explained`)."""
    def done(msg: Message | None, exc: BaseException | None) -> None:
        if exc is not None:
            w.reply_error(ctx, explained(w, rec, exc) if rec is not None else exc)
        else:
            then()
    return done


def hand_over(w: Services, ctx: Ctx, rec: PointerRecord, to: str, session: str,
              then: Then) -> None:
    """Tell the worker ``rec`` points to that ``to`` (a principal's key; ``session``: its
    session there, ``""`` for its default one) owns the object now (or may read it, for a
    record that owns nothing), then run ``then``; on failure answer ``ctx`` with the error.
    Nothing to tell on an insecure worker, or when the data is here."""
    if not to or rec.address in w.addresses:
        then()
        return
    w.peers.request(rec.address, Op.GIVE, Give(ids=[rec.id_at_location], to=to,
                                               read_only=not rec.owned, session=session),
                    or_error(w, ctx, then, rec))


def peer(w: Services, address: str) -> HelloReply | None:
    """What this worker's link to ``address`` learnt of the process it talks to (its ``HELLO``
    reply); ``None`` while there is no such link, it has no reply yet, or it is lost."""
    link = w.peers.links.get(address)
    if link is None or link.peer is None or link.gone() is not None:
        return None
    return link.peer


def restarted(w: Services, rec: PointerRecord) -> WorkerRestarted | None:
    """``WorkerRestarted`` if the peer ``rec`` points to is known to be another process than
    the one the record was made for; ``None`` if it is the same, or that is not known."""
    if not rec.incarnation or rec.address in w.addresses:
        return None
    info = peer(w, rec.address)
    if info is None or not info.incarnation or info.incarnation == rec.incarnation:
        return None
    when = time.strftime("%H:%M:%S", time.localtime(info.started_ms / 1000))
    return WorkerRestarted(
        f"worker '{rec.location}' at {rec.address} was restarted at {when} (a new process, pid "
        f"{info.pid or '?'}); objects from before are gone, among them object "
        f"{rec.id_at_location} that worker '{w.id}' points to. Send the data to it again")


def checked(w: Services, ctx: Ctx, rec: PointerRecord, then: Then) -> None:
    """Run ``then``, unless the peer ``rec`` points to was restarted since the record was made:
    then answer ``ctx`` with ``WorkerRestarted``. If this worker's link there has not met the
    process there yet, a ``PING`` on it finds out first (its reply follows the ``HELLO``
    reply); a peer that cannot be reached is left for ``then``'s requests to report."""
    if not rec.incarnation or rec.address in w.addresses or peer(w, rec.address) is not None:
        _verdict(w, ctx, rec, then)
        return
    w.peers.request(rec.address, Op.PING, Ping(), lambda msg, exc: _verdict(w, ctx, rec, then))


def _verdict(w: Services, ctx: Ctx, rec: PointerRecord, then: Then) -> None:
    exc = restarted(w, rec)
    if exc is not None:
        w.reply_error(ctx, exc)
    else:
        then()


def explained(w: Services, rec: PointerRecord, exc: BaseException) -> BaseException:
    """The error to answer for a request through ``rec`` that failed with ``exc``: the peer's
    ``ObjectNotFound`` becomes ``WorkerRestarted`` when the peer is another process than the
    one the record was made for."""
    if isinstance(exc, ObjectNotFound) and not isinstance(exc, WorkerRestarted):
        return restarted(w, rec) or exc
    return exc


def linked(w: Services, ctx: Ctx, address: str, then: Callable[[HelloReply], None]) -> None:
    """Run ``then`` with what this worker's link to ``address`` learnt of the process there
    (its ``HELLO`` reply), making the link first if need be; answer ``ctx`` with the error if
    the peer cannot be reached."""
    info = peer(w, address)
    if info is not None:
        then(info)
        return

    def pinged(msg: Message | None, exc: BaseException | None) -> None:
        found = peer(w, address) if exc is None else None
        if found is None:
            w.reply_error(ctx, exc or WorkerUnavailable(
                f"worker '{w.id}' lost its link to the worker at {address} as it was made; "
                "nothing was moved: try again"))
        else:
            then(found)
    w.peers.request(address, Op.PING, Ping(), pinged)
