"""Where a worker applies its data owners' release rules (see :mod:`zmqsyft.privacy`).

The handlers ask here, at every point where something could leave: :func:`check_release` before
a value goes to a requester (``GET``, values an op returns, ``_objects``), :func:`check_move`
before data goes to another worker (``MOVE``, a peer's ``GET``). What an op computes is labelled
with its inputs' labels (:func:`of_refs`), and :class:`Changes` labels what an op changed in
place: any argument whose version counter moved (in-place ops, ``out=``, setters, running
statistics), every stored tensor sharing its memory (views and bases), and, for ``backward``,
every stored tensor whose gradient changed.

An insecure worker knows nobody, so it enforces nothing: its owner and every caller are the same
anonymous principal.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import allowlist
from ..errors import PrivacyError
from ..privacy import EMPTY, Labels, kind_of, move_refusal, release_refusal, union
from .context import Services
from .store import PointerRecord

__all__ = ["of_refs", "check_release", "check_move", "check_values", "Changes", "spread",
           "redact", "mark_shares", "count_move"]

_MAX_DEPTH = 64


def of_refs(w: Services, ids: Iterable[int]) -> Labels:
    """The union of the labels of the objects ``ids`` and of what local pointers among them
    point to."""
    store = w.store
    if not store._labels:
        return EMPTY
    labels, objects = EMPTY, store._objects
    for obj_id in ids:
        for _ in range(_MAX_DEPTH):
            labels = union(labels, store.labels(obj_id))
            obj = objects.get(obj_id)
            if not (type(obj) is PointerRecord and obj.address in w.addresses):
                break
            obj_id = obj.id_at_location
    return labels


def check_release(w: Services, to: str, labels: Labels, value: Any, what: str) -> None:
    """Raise ``PrivacyError`` unless ``value`` (labelled ``labels``) may be released to the
    principal whose key is ``to``."""
    if not labels or not w.key:
        return
    why = release_refusal(labels, to, w.key, kind_of(value), what)
    if why is not None:
        w.traffic.counters["privacy_refused"] += 1
        raise PrivacyError(f"worker '{w.id}': {why}")
    w.traffic.counters["private_released"] += 1


def mark_shares(w: Services, tensors: Iterable[torch.Tensor]) -> None:
    """Note fresh secret shares (made by ``zmqsyft.split_shares``/``beaver_triple``): moving one
    counts as moving a share (``stats()`` counters) for as long as it is unchanged."""
    shares = w.store.shares
    if len(shares) > 65536:  # (drop the entries of shares long gone)
        for key in [k for k, (ref, _) in shares.items() if ref() is None]:
            del shares[key]
    for t in tensors:
        shares[id(t)] = (weakref.ref(t), t._version)


def count_move(w: Services, labels: Labels, obj: Any) -> None:
    """Count labelled data leaving for another worker, as a fresh share or as anything else:
    a data owner's audit of what its worker sent (``stats()["counters"]``)."""
    if not labels:
        return
    entry = w.store.shares.get(id(obj))
    fresh = entry is not None and entry[0]() is obj and obj._version == entry[1]
    w.traffic.counters["private_moved_as_shares" if fresh else "private_moved_whole"] += 1


def withheld(w: Services, to: str, labels: Labels, obj: Any) -> str:
    """How ``_objects`` shows an object it may not release to ``to`` (``""``: it may)."""
    if not labels or not w.key or release_refusal(labels, to, w.key, kind_of(obj), "") is None:
        return ""
    shape = f", shape={tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else ""
    return (f"<private{shape}: derived from the data of "
            f"{', '.join(sorted(p.who for p in labels))}>")


def may_move(w: Services, labels: Labels, dest: str) -> bool:
    """Whether data labelled ``labels`` may go to the worker whose key is ``dest`` (it keeps
    its labels there)."""
    return not labels or not w.key or move_refusal(labels, dest, "", "") is None


def check_move(w: Services, labels: Labels, dest: str, dest_name: str, what: str) -> None:
    """Raise ``PrivacyError`` unless data labelled ``labels`` may move to worker ``dest``."""
    if not labels or not w.key:
        return
    why = move_refusal(labels, dest, dest_name, what)
    if why is not None:
        w.traffic.counters["privacy_refused"] += 1
        raise PrivacyError(f"worker '{w.id}': {why}")


def check_values(w: Services, to: str, labels: Labels, result: Any, name: str) -> None:
    """Raise ``PrivacyError`` unless the plain values in an op's result (numbers, lists of
    them: ``item()``, ``tolist()``, comparisons) may be released to ``to``. Metadata (shapes,
    dtypes, sizes) always may."""
    if not labels or not w.key or name in allowlist.LOCAL_META:
        return
    leaves = [leaf for leaf in pytree.tree_leaves(result)
              if isinstance(leaf, (bool, int, float, complex))]
    if leaves:
        check_release(w, to, labels, leaves[0] if len(leaves) == 1 else leaves,
                      f"the value {name} returned")


class Changes:
    """What an op with labelled inputs may change, noted before it runs; :meth:`label` gives
    what it did change those labels afterwards."""

    __slots__ = ("before", "grads", "extra")

    def __init__(self, w: Services, name: str, values: Iterable[Any]) -> None:
        # (every tensor, however nested: out=(values, indices) writes both)
        self.before = [(t, t._version) for t in pytree.tree_leaves(list(values))
                       if isinstance(t, torch.Tensor)]
        self.extra: list[torch.Tensor] = []
        if name.endswith(".__set__") and self.before:
            self.extra.append(self.before[0][0])  # x.data = y / x.grad = y: x, whatever its version
        self.grads = _grads(w) if "backward" in name else None

    def label(self, w: Services, labels: Labels) -> None:
        changed = [t for t, version in self.before if t._version != version] + self.extra
        if self.grads is not None:
            now = _grads(w)
            changed += [obj for obj, grad in now.items() if self.grads.get(obj) != grad]
        if changed:
            spread(w, changed, labels)


def _grads(w: Services) -> dict[Any, Any]:
    """Each stored tensor that has a gradient: (that gradient, its version)."""
    found = {}
    for obj in w.store._objects.values():
        if isinstance(obj, torch.Tensor) and obj.requires_grad:
            grad = obj._grad if obj.is_leaf or obj.retains_grad else None
            if grad is not None:
                found[obj] = (id(grad), grad._version)
    return found


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # (a tensor without storage)
        return 0


def spread(w: Services, tensors: list[torch.Tensor], labels: Labels) -> None:
    """Label every stored tensor that is one of ``tensors``, shares memory with one (a view or a
    base), or whose gradient does."""
    ptrs = {p for t in tensors for p in (_storage(t), _storage(t._grad) if
                                         t._grad is not None and t.is_leaf else 0) if p}
    same = {id(t) for t in tensors}
    for obj_id, obj in w.store.items():
        if not isinstance(obj, torch.Tensor):
            continue
        if id(obj) in same or _storage(obj) in ptrs or (
                obj.is_leaf and obj._grad is not None and _storage(obj._grad) in ptrs):
            w.store.label(obj_id, labels)


_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?\d+(\.\d+)?(e[-+]?\d+)?")


def redact(message: str) -> str:
    """An error message about private data with every number in it replaced by ``#`` (an
    index out of range, a value that failed a check, ... could be the data's)."""
    return _NUMBER.sub("#", message)
