"""Handlers of the object ops: PUT GET DEL MOVE REMOTE_GET FLUSH GIVE.

Each is ``handler(worker, ctx, body)`` (see :mod:`zmqsyft.worker.context`). Whatever needs a peer
(a pointer's target must be settled before the pointer leaves, a move, a cascading delete, a
remote get, a flush) continues in a callback; nothing here blocks.

**Ownership.** What a request stores belongs to its sender's session (``ctx.holder``). Only the
owner may take (GET, MOVE, REMOTE_GET), delete or give away an object (the store's
:meth:`~zmqsyft.worker.store.Store.owned` says so, or reports the object missing); ``_objects``
lists only the caller's own objects, unless it is an admin (:mod:`~zmqsyft.worker.catalog`). A
pointer that leaves a worker takes the ownership of what it points to with it: before a pointer
record is handed to its new holder (a GET of it, a collapsing MOVE, a MOVE of the record itself),
the worker holding the data is told to GIVE the object to that holder's principal and session,
and the pointer leaves only once it has (:mod:`~zmqsyft.worker.chains`). A record whose worker
was restarted since it was made answers ``WorkerRestarted`` naming that worker. A tensor's tags
and description go with it (GET, MOVE, REMOTE_GET).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from typing import Any

import torch

from ..errors import AccessDenied, HandoverRefused, ObjectNotFound
from ..privacy import EMPTY, labels_from_wire, labels_to_wire
from ..wire.bodies import (
    Del,
    Flush,
    Get,
    GetReply,
    Give,
    Move,
    MoveReply,
    Put,
    RemoteGet,
)
from ..wire.exc_codec import decode_exception
from ..wire.messages import Message, Op, PointerDesc
from ..wire.tensors import sole_segment
from ..wire.transport import canonical_endpoint
from ..wire.values import Handover
from . import labels, results
from .access import Principal
from .catalog import checked_tags
from .chains import checked, explained, hand_over, linked, record, settled
from .context import Ctx, Services
from .store import ErrorMarker, PointerRecord

__all__ = ["put", "get", "delete", "move", "remote_get", "flush", "give", "free",
           "expire", "resolve", "settled", "record"]

log = logging.getLogger(__name__)
MAX_DEPTH = 64  # pointers followed on this worker before giving up (a crafted cycle)
_LARGE = 1 << 20  # bytes: a tensor freed is dropped after the replies, in a thread of its own


# ------------------------------------------------------------------------ helpers
def resolve(w: Services, obj_id: Any, who: Principal) -> Any:
    """The object behind an id, following pointers that point back at this worker (each one
    only to what ``who`` may use); the error of a failed pipelined op is raised."""
    obj = w.store.get(obj_id)
    for _ in range(MAX_DEPTH):
        if not (isinstance(obj, PointerRecord) and obj.address in w.addresses):
            break
        if not w.store.usable(obj.id_at_location, who):
            raise ObjectNotFound(w.store.missing(obj.id_at_location))
        obj = w.store.get(obj.id_at_location)
    if isinstance(obj, ErrorMarker):
        raise decode_exception(obj.error)
    return obj


def free(w: Services, ids: list[int]) -> None:
    """Free objects here, and what the pointer records among them own elsewhere."""
    cascade: dict[str, list[int]] = defaultdict(list)
    for obj_id in ids:
        _free(w, obj_id, cascade, 0)
    for address, targets in cascade.items():
        w.peers.request(address, Op.DEL, Del(ids=targets), None)  # fire and forget


def expire(w: Services, now: float) -> None:
    """Free what the sessions whose lease ran out held (see :mod:`~zmqsyft.worker.leases`)."""
    for holder in w.leases.expired(now):
        if holder.ids:
            log.info("worker %s: the lease of %s (session %r) ran out: freeing its %d objects",
                     w.id, holder.principal.label, holder.session, len(holder.ids))
            w.traffic.counters["objects_freed_by_lease"] += len(holder.ids)
            free(w, list(holder.ids))


def _free(w: Services, obj_id: Any, cascade: dict[str, list[int]], depth: int) -> None:
    holder = w.store.owner(obj_id)
    obj = w.store.discard(obj_id)
    if type(obj) is torch.Tensor and obj.nbytes >= _LARGE:
        results.freed(obj)
        w.free_after_replies(obj)  # (in a thread of its own: unmapping takes milliseconds)
    elif isinstance(obj, PointerRecord) and obj.owned and depth < MAX_DEPTH:
        if obj.address in w.addresses:
            # a record naming an object here frees it only if the record's owner owns that too
            inner = w.store.owner(obj.id_at_location)
            if (holder is inner if holder is None or inner is None else
                    not holder.principal.key or inner.principal.key == holder.principal.key):
                _free(w, obj.id_at_location, cascade, depth + 1)
        else:  # (there, this worker's DEL frees only what this worker owns)
            cascade[obj.address].append(obj.id_at_location)


# ----------------------------------------------------------------------- handlers
def put(w: Services, ctx: Ctx, body: Put) -> None:
    holder = ctx.holder
    if body.owner and body.owner != ctx.who.key:  # stored for someone else: a move for a client
        principal = w.access.get(body.owner)
        if principal is None:
            raise AccessDenied(f"PUT for another principal: worker '{w.id}' knows no key "
                               f"{body.owner[:8]}...")
        holder = w.leases.session(principal, "")
    obj = body.obj
    labelled = labels_from_wire(body.labels) if body.labels else EMPTY
    if labelled and w.key and holder is ctx.holder:
        # labels come only with a move, pushed by the worker holding the data for whoever asked:
        # a client's own labels could name an owner that does not exist, as a second owner
        raise AccessDenied(f"PUT: worker '{w.id}' takes privacy labels only with data moved "
                           "here for another principal; nothing was stored")
    tags, about = checked_tags(w, body.tags, body.description, "PUT")
    if (tags or about) and not isinstance(obj, torch.Tensor):
        raise TypeError(f"PUT: worker '{w.id}' takes tags and a description with a tensor only")
    if isinstance(obj, PointerDesc):
        obj = record(w, obj)
    elif isinstance(obj, torch.Tensor):
        w.store.make_room(obj.nbytes, "a tensor sent to it", holder)
    w.store.put(body.id, obj, holder, labelled)
    w.store.tag(body.id, tags, about or None)
    w.reply(ctx)


def get(w: Services, ctx: Ctx, body: Get) -> None:
    """Give the object to the caller; it leaves the store only once its reply is encoded (a get
    that fails loses nothing)."""
    obj_id = body.id
    obj = w.store.owned(obj_id, ctx.who, "GET")
    if isinstance(obj, ErrorMarker):
        w.store.pop(obj_id)
        raise decode_exception(obj.error)
    if isinstance(obj, PointerRecord):
        desc = obj.desc(ptr_id=obj_id, owned=obj.owned)

        def handed() -> None:  # the caller owns what it pointed to now: the record goes
            if obj_id in w.store and w.store.get(obj_id) is obj:
                w.store.pop(obj_id)
            w.reply(ctx, GetReply(obj=desc))
        # (what it points to goes to the caller's session there: a worker's is its incarnation)
        checked(w, ctx, obj, lambda: settled(w, ctx, obj.address, lambda: hand_over(
            w, ctx, obj, ctx.who.key, _session(ctx), handed)))
        return
    tagged = _leaving(w, ctx, obj_id, obj)
    results.leaving(obj)
    tags, about = w.store.tags(obj_id), w.store.description(obj_id)
    hold = body.handover
    # nothing else here uses it (the store, `obj` and the getrefcount argument are the
    # references): a same-host caller may map its memory; it is kept under the caller's `hold`
    # id until the caller, having mapped it, deletes that (or asks for it again, if it could not)
    if (hold and hold not in w.store and type(obj) is torch.Tensor
            and sys.getrefcount(obj) == 3 and sole_segment(obj) is not None):
        kept = w.store.labels(obj_id)
        w.store.put(hold, w.store.pop(obj_id), ctx.holder)
        w.store.tag(hold, tags, about or None)  # (asked for again if the caller cannot map it)
        if not w.reply(ctx, GetReply(obj=Handover(obj), labels=tagged, tags=tags,
                                     description=about)):
            w.store.put(obj_id, w.store.pop(hold), ctx.holder, kept)
            w.store.tag(obj_id, tags, about or None)
        return
    if w.reply(ctx, GetReply(obj=obj, labels=tagged, tags=tags, description=about)):
        w.store.discard(obj_id)


def _session(ctx: Ctx) -> str:
    """The caller's session, for what is handed to it elsewhere (a peer worker's links name its
    incarnation; a client's connections its one session id)."""
    return ctx.holder.session if ctx.holder is not None else ""


def _leaving(w: Services, ctx: Ctx, obj_id: int, obj: Any) -> list[Any]:
    """Before the object goes to the requester: the labels it keeps if that is a worker its
    data owners trust (it moves there), else nothing, once it is checked that it may be
    released to the requester (``PrivacyError`` if not)."""
    labelled = w.store.labels(obj_id)
    if not labelled:
        return []
    who = ctx.who.key
    if {p.owner for p in labelled} != {who} and labels.may_move(w, labelled, who):
        labels.count_move(w, labelled, obj)
        return labels_to_wire(labelled)
    labels.check_release(w, who, labelled, obj, f"object {obj_id}")
    grad = obj._grad if isinstance(obj, torch.Tensor) and (obj.is_leaf or obj.retains_grad) else None
    if grad is not None:  # it leaves with its gradient, labelled as the tensor (labels.spread)
        labels.check_release(w, who, labelled, grad, f"the gradient of object {obj_id}")
    return []


def delete(w: Services, ctx: Ctx, body: Del) -> None:
    """Free the caller's objects among ``ids``; ids that are not its own are passed over, as
    ids that do not exist are (a late delete of something moved or fetched is normal)."""
    who, store = ctx.who, w.store
    if who.key:
        ids = [i for i in body.ids if (h := store.owner(i)) is not None and h.principal.key == who.key]
    else:
        ids = body.ids
    free(w, ids)
    w.reply(ctx)


def move(w: Services, ctx: Ctx, body: Move) -> None:
    obj_id, dest = body.id, canonical_endpoint(body.dest_address)
    obj = w.store.owned(obj_id, ctx.who, "MOVE")
    if dest in w.addresses:
        w.reply(ctx)
        return
    w.peers.learn(dest, body.dest_key)
    if isinstance(obj, ErrorMarker):
        raise decode_exception(obj.error)
    if isinstance(obj, PointerRecord):
        desc = obj.desc(ptr_id=obj_id, owned=obj.owned)
        if obj.address == dest:  # the chain collapses: dest already holds the data

            def collapsed() -> None:
                if obj_id in w.store and w.store.get(obj_id) is obj:
                    w.store.pop(obj_id)
                w.reply(ctx, MoveReply(collapsed=desc))
            checked(w, ctx, obj, lambda: settled(w, ctx, obj.address, lambda: hand_over(
                w, ctx, obj, ctx.who.key, _session(ctx), collapsed)))
            return
        # dest will hold the record: it must own (or may read) what the record points to, for
        # the process at dest (its session on others is its incarnation)
        checked(w, ctx, obj, lambda: settled(w, ctx, obj.address, lambda: linked(
            w, ctx, dest, lambda there: hand_over(
                w, ctx, obj, body.dest_key, there.incarnation,
                lambda: _push(w, ctx, obj_id, obj, dest, desc)))))
        return
    labels.check_move(w, w.store.labels(obj_id), body.dest_key, dest, f"object {obj_id}")
    results.leaving(obj)
    # referenced by the store and by `obj` only (and getrefcount's argument): nobody else here
    # will see the tensor again, so a same-host dest may take over its memory instead of a copy
    sole = sys.getrefcount(obj) == 3 and dest not in w.peers.no_handover
    _push(w, ctx, obj_id, obj, dest, Handover(obj) if sole and type(obj) is torch.Tensor else obj)


def _push(w: Services, ctx: Ctx, obj_id: int, obj: Any, dest: str, payload: Any) -> None:
    """Store ``payload`` on ``dest`` under ``obj_id``, for the caller; free it here once
    ``dest`` confirmed."""
    labelled = w.store.labels(obj_id)

    def done(msg: Message | None, exc: BaseException | None) -> None:
        nonlocal obj, payload
        if isinstance(exc, HandoverRefused) and type(payload) is Handover:
            log.info("worker %s: %s; sending a copy to %s from now on", w.id, exc, dest)
            w.peers.no_handover.add(dest)
            _push(w, ctx, obj_id, obj, dest, obj)
            return
        if exc is not None:
            w.reply_error(ctx, exc)
            return
        kept, holder = w.store.labels(obj_id), w.store.owner(obj_id)
        current = w.store.discard(obj_id)
        if current is not None and current is not obj:  # the id was reused meanwhile: keep it
            w.store.replace(obj_id, current, holder, kept)
        else:  # freed after the reply has gone (unmapping 100 MiB takes ~15 ms), elsewhere
            w.free_after_replies(current)
        obj = payload = current = None  # (so that the graveyard holds the last reference)
        w.reply(ctx)
    labels.count_move(w, labelled, obj)
    w.peers.request(dest, Op.PUT, Put(id=obj_id, obj=payload, owner=ctx.who.key,
                                      labels=labels_to_wire(labelled), tags=w.store.tags(obj_id),
                                      description=w.store.description(obj_id)), done)


def remote_get(w: Services, ctx: Ctx, body: RemoteGet) -> None:
    obj_id = body.id
    rec = w.store.owned(obj_id, ctx.who, "REMOTE_GET")
    if not isinstance(rec, PointerRecord):
        w.reply(ctx)  # the data is here already
        return
    if rec.address in w.addresses:
        inner = rec.id_at_location
        w.store.replace(obj_id, w.store.owned(inner, ctx.who, "REMOTE_GET"),
                        ctx.holder, labels.of_refs(w, [inner]))
        w.store.tag(obj_id, w.store.tags(inner), w.store.description(inner) or None)
        w.store.discard(inner)
        w.reply(ctx)
        return

    def done(msg: Message | None, exc: BaseException | None) -> None:
        if exc is not None:
            w.reply_error(ctx, explained(w, rec, exc))
            return
        try:
            reply = GetReply.from_wire(msg.body) if msg is not None else GetReply()
            obj, labelled = reply.obj, labels_from_wire(reply.labels)
            tags, about = checked_tags(w, reply.tags, reply.description, "REMOTE_GET")
            if isinstance(obj, PointerDesc):
                obj = record(w, obj)
            elif isinstance(obj, torch.Tensor):
                w.store.make_room(obj.nbytes, "remote_get", ctx.holder)
        except Exception as failure:  # noqa: BLE001 - a peer's malformed reply, or no room
            w.reply_error(ctx, failure)
            return
        w.store.replace(obj_id, obj, ctx.holder, labelled)
        w.store.tag(obj_id, tags, about or None)
        w.reply(ctx)
    checked(w, ctx, rec, lambda: w.peers.request(rec.address, Op.GET,
                                                  Get(id=rec.id_at_location), done))


def flush(w: Services, ctx: Ctx, body: Flush) -> None:
    results.drain()  # (what was deleted or moved away before this is freed when it is answered)
    dirty = list(w.peers.dirty)
    if not dirty:
        w.reply(ctx)
        return
    left = [len(dirty)]
    errors: list[BaseException] = []

    def done(msg: Message | None, exc: BaseException | None) -> None:
        if exc is not None:
            errors.append(exc)
        left[0] -= 1
        if left[0] == 0:
            if errors:
                w.reply_error(ctx, errors[0])
            else:
                w.reply(ctx)
    for address in dirty:
        w.peers.flush(address, done)


def give(w: Services, ctx: Ctx, body: Give) -> None:
    """Hand the caller's objects to another principal (``read_only``: let it compute with them,
    which the caller may do for what was shared with it, too)."""
    if not w.key:
        w.reply(ctx)  # insecure: everyone owns everything already
        return
    principal = w.access.get(body.to)
    if principal is None:
        raise AccessDenied(f"GIVE: worker '{w.id}' knows no principal with key {body.to[:8]}...; "
                           "it can give objects only to keys it accepts connections from")
    store, who = w.store, ctx.who
    for obj_id in body.ids:
        if body.read_only:
            if not store.usable(obj_id, who):
                store.owned(obj_id, who, "GIVE")  # raises: missing for this caller
            store.share(obj_id, principal.key)
        else:
            store.owned(obj_id, who, "GIVE")
    if not body.read_only:
        # the session named: a worker's incarnation (which its links here name), so a restarted
        # worker's new process does not keep its predecessor's objects alive
        to = w.leases.session(principal, body.session[:64])
        if not to.conns:  # its lease runs from now: the receiver links to this worker later
            to.gone_since = time.monotonic()
        # what is given counts against the receiver's share: giving cannot fill the store
        store.make_room(store.held(body.ids), "GIVE", to, total=False)
        for obj_id in body.ids:
            store.give(obj_id, to)
    w.reply(ctx)
