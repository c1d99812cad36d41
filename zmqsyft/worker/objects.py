"""Handlers of the object ops: PUT GET DEL MOVE REMOTE_GET OBJECTS FLUSH.

Each is ``handler(worker, ctx, body)`` (see :mod:`zmqsyft.worker.context`). Whatever needs a peer
(a pointer's target must be settled before the pointer leaves, a move, a cascading delete, a
remote get, a flush) continues in a callback; nothing here blocks.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..errors import HandoverRefused, SerializationError
from ..wire.bodies import (
    Del,
    Flush,
    Get,
    GetReply,
    Move,
    MoveReply,
    Objects,
    ObjectsReply,
    Put,
    RemoteGet,
)
from ..wire.exc_codec import decode_exception
from ..wire.messages import Message, Op, PointerDesc, Summary
from ..wire.tensors import sole_segment
from ..wire.transport import canonical_endpoint
from ..wire.values import Handover
from . import executor
from .context import Ctx, Services
from .store import ErrorMarker, PointerRecord

__all__ = ["put", "get", "delete", "move", "remote_get", "objects", "flush", "resolve", "settled"]

log = logging.getLogger(__name__)
MAX_DEPTH = 64  # pointers followed on this worker before giving up (a crafted cycle)


# ------------------------------------------------------------------------ helpers
def resolve(w: Services, obj_id: Any) -> Any:
    """The object behind an id, following pointers that point back at this worker; the error of
    a failed pipelined op is raised."""
    obj = w.store.get(obj_id)
    for _ in range(MAX_DEPTH):
        if not (isinstance(obj, PointerRecord) and obj.address in w.addresses):
            break
        obj = w.store.get(obj.id_at_location)
    if isinstance(obj, ErrorMarker):
        raise decode_exception(obj.error)
    return obj


def settled(w: Services, ctx: Ctx, address: str, then: Callable[[], None]) -> None:
    """Run ``then`` once everything relayed to ``address`` has been handled there.

    Needed before a pointer to ``address`` leaves this worker: its new holder talks to
    ``address`` directly and must not overtake what this worker relayed there before.
    """
    if address not in w.peers.dirty:
        then()
        return

    def done(msg: Message | None, exc: BaseException | None) -> None:
        if exc is not None:
            w.reply_error(ctx, exc)
        else:
            then()
    w.peers.flush(address, done)


def _free(w: Services, obj_id: Any, cascade: dict[str, list[int]], depth: int) -> None:
    obj = w.store.discard(obj_id)
    if isinstance(obj, PointerRecord) and obj.owned and depth < MAX_DEPTH:
        if obj.address in w.addresses:
            _free(w, obj.id_at_location, cascade, depth + 1)
        else:
            cascade[obj.address].append(obj.id_at_location)


# ----------------------------------------------------------------------- handlers
def put(w: Services, ctx: Ctx, body: Put) -> None:
    obj = body.obj
    if isinstance(obj, PointerDesc):
        obj = PointerRecord.from_desc(obj)
    elif isinstance(obj, torch.Tensor):
        w.store.make_room(obj.nbytes, "a tensor sent to it", ctx.ident)
    w.store.put(body.id, obj, ctx.ident)
    w.reply(ctx)


def get(w: Services, ctx: Ctx, body: Get) -> None:
    """Give the object to the caller; it leaves the store only once its reply is encoded (a get
    that fails loses nothing)."""
    obj_id = body.id
    obj = w.store.get(obj_id)
    if isinstance(obj, ErrorMarker):
        w.store.pop(obj_id)
        raise decode_exception(obj.error)
    if isinstance(obj, PointerRecord):
        w.store.pop(obj_id)
        desc = obj.desc(ptr_id=obj_id, owned=obj.owned)
        settled(w, ctx, obj.address, lambda: w.reply(ctx, GetReply(obj=desc)))
        return
    hold = body.handover
    # nothing else here uses it (the store, `obj` and the getrefcount argument are the
    # references): a same-host caller may map its memory; it is kept under the caller's `hold`
    # id until the caller, having mapped it, deletes that (or asks for it again, if it could not)
    if (hold and hold not in w.store and type(obj) is torch.Tensor
            and sys.getrefcount(obj) == 3 and sole_segment(obj) is not None):
        w.store.put(hold, w.store.pop(obj_id), ctx.ident)
        if not w.reply(ctx, GetReply(obj=Handover(obj))):
            w.store.put(obj_id, w.store.pop(hold), ctx.ident)
        return
    if w.reply(ctx, GetReply(obj=obj)):
        w.store.discard(obj_id)


def delete(w: Services, ctx: Ctx, body: Del) -> None:
    cascade: dict[str, list[int]] = defaultdict(list)
    for obj_id in body.ids:
        _free(w, obj_id, cascade, 0)
    for address, targets in cascade.items():
        w.peers.request(address, Op.DEL, Del(ids=targets), None)  # fire and forget
    w.reply(ctx)


def move(w: Services, ctx: Ctx, body: Move) -> None:
    obj_id, dest = body.id, canonical_endpoint(body.dest_address)
    obj = w.store.get(obj_id)
    if dest in w.addresses:
        w.reply(ctx)
        return
    if isinstance(obj, ErrorMarker):
        raise decode_exception(obj.error)
    if isinstance(obj, PointerRecord):
        desc = obj.desc(ptr_id=obj_id, owned=obj.owned)
        if obj.address == dest:  # the chain collapses: dest already holds the data
            w.store.pop(obj_id)
            settled(w, ctx, obj.address, lambda: w.reply(ctx, MoveReply(collapsed=desc)))
            return
        settled(w, ctx, obj.address, lambda: _push(w, ctx, obj_id, obj, dest, desc))
        return
    # referenced by the store and by `obj` only (and getrefcount's argument): nobody else here
    # will see the tensor again, so a same-host dest may take over its memory instead of a copy
    sole = sys.getrefcount(obj) == 3 and dest not in w.peers.no_handover
    _push(w, ctx, obj_id, obj, dest, Handover(obj) if sole and type(obj) is torch.Tensor else obj)


def _push(w: Services, ctx: Ctx, obj_id: int, obj: Any, dest: str, payload: Any) -> None:
    """Store ``payload`` on ``dest`` under ``obj_id``; free it here once ``dest`` confirmed."""

    def done(msg: Message | None, exc: BaseException | None) -> None:
        if isinstance(exc, HandoverRefused) and type(payload) is Handover:
            log.info("worker %s: %s; sending a copy to %s from now on", w.id, exc, dest)
            w.peers.no_handover.add(dest)
            _push(w, ctx, obj_id, obj, dest, obj)
            return
        if exc is not None:
            w.reply_error(ctx, exc)
            return
        current = w.store.discard(obj_id)
        if current is not None and current is not obj:  # the id was reused meanwhile: keep it
            w.store.replace(obj_id, current)
        else:  # freed after the reply has gone (unmapping 100 MiB takes ~15 ms)
            w.free_after_replies(current)
        w.reply(ctx)
    w.peers.request(dest, Op.PUT, Put(id=obj_id, obj=payload), done)


def remote_get(w: Services, ctx: Ctx, body: RemoteGet) -> None:
    obj_id = body.id
    record = w.store.get(obj_id)
    if not isinstance(record, PointerRecord):
        w.reply(ctx)  # the data is here already
        return
    if record.address in w.addresses:
        w.store.replace(obj_id, w.store.pop(record.id_at_location), ctx.ident)
        w.reply(ctx)
        return

    def done(msg: Message | None, exc: BaseException | None) -> None:
        if exc is not None:
            w.reply_error(ctx, exc)
            return
        try:
            obj = GetReply.from_wire(msg.body).obj if msg is not None else None
            if isinstance(obj, PointerDesc):
                obj = PointerRecord.from_desc(obj)
            elif isinstance(obj, torch.Tensor):
                w.store.make_room(obj.nbytes, "remote_get", ctx.ident)
        except Exception as failure:  # noqa: BLE001 - a peer's malformed reply, or no room
            w.reply_error(ctx, failure)
            return
        w.store.replace(obj_id, obj, ctx.ident)
        w.reply(ctx)
    w.peers.request(record.address, Op.GET, Get(id=record.id_at_location), done)


def objects(w: Services, ctx: Ctx, body: Objects) -> None:
    """A snapshot every caller can read, whatever is stored: anything the wire cannot carry
    as it is is summarised."""
    snapshot: dict[int, Any] = {}
    limit = w.cfg.snapshot_max_elements
    for key, obj in w.store.items():
        try:
            snapshot[key] = _shown(obj, key, limit)
        except Exception as exc:  # noqa: BLE001 - one odd object must not hide the others
            snapshot[key] = Summary(f"<{type(obj).__qualname__}: not shown: {type(exc).__name__}>")
    w.reply(ctx, ObjectsReply(objects=snapshot))


def _shown(obj: Any, key: int, limit: int) -> Any:
    if isinstance(obj, torch.Tensor):
        try:
            executor.check_keepable("a stored object", [obj])
        except SerializationError:
            return Summary(f"<tensor the wire does not carry: {obj.layout}, {obj.dtype}, "
                           f"{obj.device}>")
        return obj.detach() if obj.numel() <= limit else Summary(
            f"tensor(<{obj.numel()} elements>, shape={tuple(obj.shape)}, dtype={obj.dtype})")
    if isinstance(obj, PointerRecord):
        return obj.desc(ptr_id=key, owned=False)
    if isinstance(obj, ErrorMarker):
        return Summary(f"<failed {obj.op}: {obj.error.get('type')}: {obj.error.get('message')}>")
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    return Summary(f"<{type(obj).__module__}.{type(obj).__qualname__}>")


def flush(w: Services, ctx: Ctx, body: Flush) -> None:
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
