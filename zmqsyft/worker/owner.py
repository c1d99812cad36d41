"""What a data owner does with its worker: its own data (``load``, SEARCH) and trusted code (RUN).

A worker can hold data it loaded itself (``zmqsyft worker --load FILE --tag TAG``): the model
owner finds it with ``search()`` and gets pointers that do not own it. ``run()`` sends a pickled
function, which only a trusted connection may (the codec refuses pickle from anyone else).
"""

from __future__ import annotations

import torch

from ..errors import LocationMismatch, ObjectNotFound
from ..ids import new_id
from ..privacy import EMPTY, Labels
from ..wire.bodies import Run, RunReply, Search, SearchReply
from ..wire.messages import PointerDesc
from ..wire.tensors import dtype_name
from . import executor
from .calls import describe
from .context import Ctx, Services
from .labels import check_values, of_refs
from .objects import resolve
from .store import PointerRecord, Store

__all__ = ["load", "add", "search", "run", "DataOwner"]


def load(store: Store, path: str, tags: list[str], labels: Labels = EMPTY) -> list[int]:
    """Load a tensor, or a dict of tensors, saved with ``torch.save``; store it tagged, and
    labelled private to its owner (``labels``: the worker's bound policy).

    Loading uses ``torch.load(weights_only=True)``: no code in the file is run. Every tensor
    gets ``tags``; a dict's entries also get ``#<key>``. Returns the new ids.
    """
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    items = loaded.items() if isinstance(loaded, dict) else [(None, loaded)]
    ids = []
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: expected tensors, found {type(value).__name__} under {key!r}")
        ids.append(add(store, value, [*tags, *([f"#{key}"] if key is not None else [])], labels))
    return ids


def add(store: Store, tensor: torch.Tensor, tags: list[str], labels: Labels = EMPTY) -> int:
    """Store a tensor this worker owns (its own data), with search tags and the labels of its
    owner's policy; return its id."""
    obj_id = new_id()
    store.put(obj_id, tensor, None, labels)
    store.tag(obj_id, frozenset(tags))
    return obj_id


class DataOwner:
    """A worker's methods for its operator's own data (private to its owner: ``labels``)."""

    store: Store
    labels: Labels

    def load(self, path: str, tags: list[str]) -> list[int]:
        """Load this worker's own data from a ``torch.save`` file (see :func:`load`)."""
        return load(self.store, path, tags, self.labels)

    def add(self, tensor: torch.Tensor, tags: list[str]) -> int:
        """Store a tensor as this worker's own private data (see :func:`add`)."""
        return add(self.store, tensor, tags, self.labels)


def search(w: Services, ctx: Ctx, body: Search) -> None:
    """Non-owning pointers to the worker's own data carrying every tag; the caller may compute
    with those objects from now on (read-only: no taking, no changing)."""
    results = []
    for obj_id in w.store.search(frozenset(body.tags)):
        obj = w.store.get(obj_id)
        if isinstance(obj, torch.Tensor):
            w.store.share(obj_id, ctx.who.key)
            results.append(PointerDesc(w.id, w.address, obj_id, new_id(), tuple(obj.shape),
                                       dtype_name(obj.dtype), obj.requires_grad, False, w.key,
                                       w.incarnation))
    w.reply(ctx, SearchReply(results=results))


def run(w: Services, ctx: Ctx, body: Run) -> None:
    args, kwargs = body.args, body.kwargs
    refs = executor.refs_in((args, kwargs))
    for ref in refs:
        if not w.store.usable(ref.id, ctx.who):
            raise ObjectNotFound(w.store.missing(ref.id))
    resolved = {ref.id: resolve(w, ref.id, ctx.who) for ref in refs}
    if any(isinstance(o, PointerRecord) for o in resolved.values()):
        raise LocationMismatch(
            f"run() on worker '{w.id}' got a pointer to data on another worker; "
            "move the data here first")
    args, kwargs = executor.substitute((args, kwargs), lambda ref: resolved[ref.id])
    labelled = of_refs(w, resolved)  # (trusted code: see the README's threat model)
    with torch.set_grad_enabled(body.grad):
        result = body.fn(*args, **kwargs)
    name = f"run({getattr(body.fn, '__name__', 'fn')})"
    check_values(w, ctx.who.key, labelled, result, name)
    w.reply(ctx, RunReply(result=describe(w, result, name, ctx.holder, labelled)))
