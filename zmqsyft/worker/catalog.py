"""What a worker shows of its objects: the ``_objects`` snapshot (OBJECTS), the tags and
descriptions objects are published with (TAG, and PUT's ``tags``), and SEARCH over them.

**Publishing.** A tensor with search tags is *published*: every principal the worker accepts
finds it with SEARCH and gets a non-owning pointer to it, a read-only capability (compute with
it; results are yours; never take, move, change, delete or retag it), exactly like the worker's
own data (``--load``), which is tagged from the start. Only an object's owner tags it (TAG, or
the tags of the PUT that stores it); privacy labels are untouched by all of this: what derives
from a data owner's data leaves only under its policy, whoever found it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SerializationError
from ..ids import new_id
from ..wire.bodies import Objects, ObjectsReply, Search, SearchReply, Tag
from ..wire.messages import PointerDesc, Summary
from ..wire.tags import check_description, check_tags
from ..wire.tensors import dtype_name
from . import executor, labels
from .context import Ctx, Services
from .store import ErrorMarker, PointerRecord

__all__ = ["objects", "search", "tag", "checked_tags"]


def checked_tags(w: Services, tags: list[str], description: str | None, what: str,
                 obj_id: int | None = None) -> tuple[list[str], str | None]:
    """Tags and a description from a request, checked (:mod:`zmqsyft.wire.tags`; ``TypeError``
    or ``ValueError`` naming this worker); ``obj_id``: the tags it carries count too."""
    where = f"{what} on worker '{w.id}'"
    already = w.store.tags(obj_id) if obj_id is not None and tags else ()
    tags = check_tags(tags, where, already) if tags else []
    return tags, check_description(description, where) if description is not None else None


def tag(w: Services, ctx: Ctx, body: Tag) -> None:
    """Add tags to the caller's own tensor (publishing it) and set its description."""
    obj = w.store.owned(body.id, ctx.who, "TAG")
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"TAG: object {body.id} on worker '{w.id}' is not a tensor (a pointer "
                        "to another worker's object, or a failed op's result); tag the tensor "
                        "on the worker that holds it")
    tags, description = checked_tags(w, body.tags, body.description, "TAG", body.id)
    w.store.tag(body.id, tags, description)
    w.reply(ctx)


def search(w: Services, ctx: Ctx, body: Search) -> None:
    """Non-owning pointers to the published tensors carrying every tag (whoever owns them: the
    worker itself, the caller, another principal), with their tags and descriptions; the caller
    may compute with those objects from now on (read-only: no taking, no changing)."""
    query, _ = checked_tags(w, body.tags, None, "SEARCH")
    results, tags, descriptions = [], [], []
    for obj_id in w.store.search(frozenset(query)):
        obj = w.store.get(obj_id)
        if isinstance(obj, torch.Tensor):
            w.store.share(obj_id, ctx.who.key)
            results.append(PointerDesc(w.id, w.address, obj_id, new_id(), tuple(obj.shape),
                                       dtype_name(obj.dtype), obj.requires_grad, False, w.key,
                                       w.incarnation))
            tags.append(w.store.tags(obj_id))
            descriptions.append(w.store.description(obj_id))
    w.reply(ctx, SearchReply(results=results, tags=tags, descriptions=descriptions))


def objects(w: Services, ctx: Ctx, body: Objects) -> None:
    """A snapshot of the caller's own objects (an admin's: of all), whatever is stored: anything
    the wire cannot carry as it is is summarised."""
    snapshot: dict[int, Any] = {}
    limit = w.cfg.snapshot_max_elements
    for key, obj in w.store.visible(ctx.who):
        private = labels.withheld(w, ctx.who.key, w.store.labels(key), obj)
        if private:
            snapshot[key] = Summary(private)
            continue
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
        if obj.numel() > limit:
            return Summary(f"tensor(<{obj.numel()} elements>, shape={tuple(obj.shape)}, "
                           f"dtype={obj.dtype})")
        shown = obj.detach().requires_grad_(obj.requires_grad)  # (a non-leaf shows as a leaf)
        if obj.is_leaf or obj.retains_grad:
            shown.grad = obj._grad  # the encoder sends it along
        return shown
    if isinstance(obj, PointerRecord):
        return obj.desc(ptr_id=key, owned=False)
    if isinstance(obj, ErrorMarker):
        return Summary(f"<failed {obj.op}: {obj.error.get('type')}: {obj.error.get('message')}>")
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    return Summary(f"<{type(obj).__module__}.{type(obj).__qualname__}>")
