"""A worker's object store: id → tensor, pointer record, or the error of a failed pipelined op."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import AccessDenied, LimitExceeded, ObjectNotFound, ProtocolError
from ..privacy import EMPTY, Labels, union
from ..wire.messages import PointerDesc
from ..wire.transport import canonical_endpoint
from .access import Principal
from .leases import Holder

__all__ = ["Store", "PointerRecord", "ErrorMarker"]


class PointerRecord:
    """A pointer held by a worker: the object ``id_at_location`` on the worker at ``address``.

    ``owned`` records whether this worker frees that object when the record is deleted; ``key``
    is that worker's public key (``""``: insecure), the only key this worker connects to there;
    ``incarnation`` the process of that worker the object lives in (``""``: unknown): a worker
    found there with another one was restarted, and the object is gone.
    """

    __slots__ = ("location", "address", "id_at_location", "shape", "dtype", "requires_grad", "owned",
                 "key", "incarnation")

    def __init__(self, location: str, address: str, id_at_location: int, shape: tuple[int, ...],
                 dtype: str, requires_grad: bool, owned: bool, key: str = "",
                 incarnation: str = "") -> None:
        self.location = location
        self.address = address
        self.id_at_location = id_at_location
        self.shape = shape
        self.dtype = dtype
        self.requires_grad = requires_grad
        self.owned = owned
        self.key = key
        self.incarnation = incarnation

    @classmethod
    def from_desc(cls, desc: PointerDesc) -> PointerRecord:
        """The record of a pointer that came over the wire; its address in its one spelling
        (``ProtocolError`` if it is not a worker's endpoint)."""
        return cls(desc.location, canonical_endpoint(desc.address), desc.id_at_location,
                   desc.shape, desc.dtype, desc.requires_grad, desc.owned, desc.key,
                   desc.incarnation)

    def desc(self, ptr_id: int, owned: bool) -> PointerDesc:
        return PointerDesc(self.location, self.address, self.id_at_location, ptr_id, self.shape,
                           self.dtype, self.requires_grad, owned, self.key, self.incarnation)

    def __repr__(self) -> str:
        return f"PointerRecord(-> {self.location}:{self.id_at_location}, owned={self.owned})"


class ErrorMarker:
    """Stored in place of the result of a pipelined op that failed; using it re-raises the error."""

    __slots__ = ("error", "op")

    def __init__(self, error: dict[str, Any], op: str) -> None:
        self.error = error
        self.op = op


def _size(obj: Any) -> int:
    """The bytes an object holds, as the store counts them: a tensor's own bytes (a view counts
    as its own bytes) and its gradient's."""
    if not isinstance(obj, torch.Tensor):
        return 0
    grad = obj._grad if obj.is_leaf or obj.retains_grad else None
    return obj.nbytes if grad is None else obj.nbytes + grad.nbytes


class Store:
    """The objects one worker holds, in insertion order; who owns each (a
    :class:`~zmqsyft.worker.leases.Holder`: one session of one principal; ``None`` for the
    worker's own data), who else may read it, and the tensor bytes they hold, in all and per
    holder.

    Every check of who may do what with an object is made here: :meth:`owned` (take, delete,
    change, give away), :meth:`usable` (compute with), :meth:`visible` (list).

    Parameters
    ----------
    worker_id : str
        For error messages.
    max_bytes : int
        The most tensor bytes the store holds; :meth:`make_room` refuses what would pass it.
        ``0``: three quarters of this machine's memory.
    max_conn_bytes : int
        The most tensor bytes the objects of one holder may hold. ``0``: half of ``max_bytes``.
    """

    def __init__(self, worker_id: str, max_bytes: int = 0, max_conn_bytes: int = 0) -> None:
        self.worker_id = worker_id
        self.max_bytes = max_bytes or _default_max_bytes()
        self.max_conn_bytes = max_conn_bytes or self.max_bytes // 2
        self.nbytes = 0
        self._objects: dict[int, Any] = {}
        self._owner: dict[int, Holder | None] = {}
        self._readers: dict[int, set[str]] = {}  # id -> keys it was shared with, read-only
        self._tags: dict[int, frozenset[str]] = {}  # id -> search tags (published: see SEARCH)
        self._about: dict[int, str] = {}  # id -> its description
        self._labels: dict[int, Labels] = {}  # id -> whose private data it derives from
        self.shares: dict[int, Any] = {}  # id(tensor) -> (weakref, version): fresh secret shares
        self._counted: dict[int, int] = {}  # id -> bytes counted for it, if any

    def make_room(self, nbytes: int, what: str, by: Holder | None = None,
                  total: bool = True) -> None:
        """Refuse (``LimitExceeded``) to store ``nbytes`` more, for holder ``by``, if that
        passes ``max_bytes`` (unless not ``total``: bytes stored already, changing hands) or
        what one holder may hold."""
        if total and self.nbytes + nbytes > self.max_bytes:
            raise LimitExceeded(
                f"{what} needs {nbytes / 2**20:.1f} MiB on worker '{self.worker_id}', which holds "
                f"{self.nbytes / 2**20:.1f} MiB of its {self.max_bytes / 2**20:.1f} MiB "
                "(Config.max_store_bytes); free objects, or start the worker with a larger "
                "--max-store-bytes / ZMQSYFT_MAX_STORE_BYTES. Nothing was stored")
        held = by.nbytes if by is not None else 0
        if by is not None and held + nbytes > self.max_conn_bytes:
            raise LimitExceeded(
                f"{what} needs {nbytes / 2**20:.1f} MiB on worker '{self.worker_id}', where "
                f"this session's objects hold {held / 2**20:.1f} MiB of the "
                f"{self.max_conn_bytes / 2**20:.1f} MiB one session may hold "
                "(Config.max_connection_bytes); free objects, or start the worker with a larger "
                "--max-connection-bytes / ZMQSYFT_MAX_CONNECTION_BYTES. Nothing was stored")

    def _count(self, obj_id: int, obj: Any) -> None:
        size = _size(obj)
        if size:
            self.nbytes += size
            self._counted[obj_id] = size
            by = self._owner.get(obj_id)
            if by is not None:
                by.nbytes += size

    def _uncount(self, obj_id: Any) -> None:
        size = self._counted.pop(obj_id, 0)
        if size:
            self.nbytes -= size
            by = self._owner.get(obj_id)
            if by is not None:
                by.nbytes -= size

    def recount(self, obj_id: Any) -> None:
        """Count an object again after an op may have changed what it holds (``x.data = y``,
        ``x.grad = y``), charging its holder."""
        if obj_id in self._objects:
            self._uncount(obj_id)
            self._count(obj_id, self._objects[obj_id])

    # --------------------------------------------------------------- access
    def owned(self, obj_id: Any, who: Principal, what: str) -> Any:
        """The object, if ``who`` owns it (may take, delete, change or give it away).

        An object ``who`` may only read raises ``AccessDenied``; one it may not see at all is
        reported missing (``ObjectNotFound``), exactly as an id that does not exist."""
        obj = self.get(obj_id)
        if who.key:  # (insecure: everyone owns everything)
            holder = self._owner.get(obj_id)
            if holder is None or holder.principal.key != who.key:
                if who.key in self._readers.get(obj_id, ()):
                    raise AccessDenied(
                        f"{what}: object {obj_id} on worker '{self.worker_id}' was shared with "
                        "you read-only (a search() result, or a view of one): compute with it; "
                        "results are yours, but the object cannot be taken, moved, deleted or "
                        "changed by you")
                raise ObjectNotFound(self.missing(obj_id))
        return obj

    def usable(self, obj_id: Any, who: Principal) -> bool:
        """Whether ``who`` may compute with the object (owns it, or it was shared with it)."""
        if not who.key:
            return obj_id in self._objects
        holder = self._owner.get(obj_id)
        if holder is not None and holder.principal.key == who.key:
            return True
        return who.key in self._readers.get(obj_id, ()) and obj_id in self._objects

    def read_only(self, obj_id: Any, who: Principal) -> bool:
        """Whether ``who`` may only read the object (it was shared with it; it does not own it)."""
        if not who.key:
            return False
        holder = self._owner.get(obj_id)
        return (holder is None or holder.principal.key != who.key) and \
            who.key in self._readers.get(obj_id, ())

    def visible(self, who: Principal) -> Iterator[tuple[int, Any]]:
        """The objects ``who`` may list: all of them for an admin, else those it owns."""
        if who.admin:
            return self.items()
        return iter([(i, o) for i, o in self._objects.items()
                     if (h := self._owner.get(i)) is not None and h.principal.key == who.key])

    def share(self, obj_id: int, key: str) -> None:
        """Let principal ``key`` compute with the object, read-only."""
        if key:
            self._readers.setdefault(obj_id, set()).add(key)

    def owner(self, obj_id: Any) -> Holder | None:
        return self._owner.get(obj_id)

    def held(self, ids: list[int]) -> int:
        """The bytes the objects ``ids`` hold, as counted."""
        return sum(self._counted.get(i, 0) for i in ids)

    def give(self, obj_id: int, to: Holder) -> None:
        """Make ``to`` the object's owner (its bytes move to ``to``'s account)."""
        self._uncount(obj_id)
        self._set_owner(obj_id, to)
        self._count(obj_id, self._objects[obj_id])

    def _set_owner(self, obj_id: int, by: Holder | None) -> None:
        old = self._owner.get(obj_id)
        if old is not None:
            old.ids.discard(obj_id)
        self._owner[obj_id] = by
        if by is not None:
            by.ids.add(obj_id)

    # --------------------------------------------------------------- privacy labels
    def labels(self, obj_id: Any) -> Labels:
        """The data owners' policies of what the object derives from (:mod:`zmqsyft.privacy`)."""
        return self._labels.get(obj_id, EMPTY)

    def label(self, obj_id: Any, labels: Labels) -> None:
        """Add ``labels`` to a stored object's (it derives from that data too now)."""
        if labels and obj_id in self._objects:
            old = self._labels.get(obj_id, EMPTY)
            new = union(old, labels)
            if new is not old:
                self._labels[obj_id] = new

    def labelled(self) -> int:
        """How many objects carry labels."""
        return len(self._labels)

    # --------------------------------------------------------------- tags
    def tag(self, obj_id: int, tags: frozenset[str] | list[str], description: str | None = None
            ) -> None:
        """Attach search tags (``"#diabetes"``) to a stored object, and set its description
        (``None``: leave it, ``""``: none); checked by the caller (:mod:`zmqsyft.wire.tags`)."""
        self.get(obj_id)
        if tags:
            self._tags[obj_id] = self._tags.get(obj_id, frozenset()) | frozenset(tags)
        if description:
            self._about[obj_id] = description
        elif description is not None:
            self._about.pop(obj_id, None)

    def tags(self, obj_id: int) -> list[str]:
        """The object's search tags, sorted."""
        return sorted(self._tags.get(obj_id, ()))

    def description(self, obj_id: int) -> str:
        """The object's description (``""``: none)."""
        return self._about.get(obj_id, "")

    def search(self, tags: frozenset[str]) -> list[int]:
        """Ids of the objects carrying every one of ``tags`` (none: every tagged object), in
        insertion order."""
        return [i for i in self._objects if i in self._tags and tags <= self._tags[i]]

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, obj_id: object) -> bool:
        return obj_id in self._objects

    def items(self) -> Iterator[tuple[int, Any]]:
        return iter(list(self._objects.items()))

    def put(self, obj_id: int, obj: Any, by: Holder | None = None,
            labels: Labels = EMPTY) -> None:
        """Store ``obj`` under a new id, owned by ``by`` (``None``: the worker's own), derived
        from the private data ``labels`` name."""
        if not isinstance(obj_id, int) or isinstance(obj_id, bool) or obj_id <= 0:
            raise ProtocolError(f"invalid object id {obj_id!r}")
        if obj_id in self._objects:
            raise ProtocolError(f"object id {obj_id} is already in use on worker '{self.worker_id}'")
        self._objects[obj_id] = obj
        self._set_owner(obj_id, by)
        self._count(obj_id, obj)
        if labels:
            self._labels[obj_id] = labels

    def replace(self, obj_id: int, obj: Any, by: Holder | None = None,
                labels: Labels = EMPTY) -> None:
        """Store ``obj`` under ``obj_id`` in place of what was there, owned by ``by``, with
        ``labels`` in place of its labels."""
        self._uncount(obj_id)
        self._objects[obj_id] = obj
        if labels:
            self._labels[obj_id] = labels
        else:
            self._labels.pop(obj_id, None)
        self._set_owner(obj_id, by)
        self._count(obj_id, obj)

    def get(self, obj_id: Any) -> Any:
        try:
            return self._objects[obj_id]
        except (KeyError, TypeError):
            raise ObjectNotFound(self.missing(obj_id)) from None

    def pop(self, obj_id: Any) -> Any:
        try:
            obj = self._objects.pop(obj_id)
        except (KeyError, TypeError):
            raise ObjectNotFound(self.missing(obj_id)) from None
        self._forget(obj_id)
        return obj

    def discard(self, obj_id: Any) -> Any:
        try:
            obj = self._objects.pop(obj_id, None)
        except TypeError:
            return None
        self._forget(obj_id)
        return obj

    def _forget(self, obj_id: Any) -> None:
        self._tags.pop(obj_id, None)
        self._about.pop(obj_id, None)
        self._readers.pop(obj_id, None)
        self._labels.pop(obj_id, None)
        self._uncount(obj_id)
        holder = self._owner.pop(obj_id, None)
        if holder is not None:
            holder.ids.discard(obj_id)

    def missing(self, obj_id: Any) -> str:
        return (f"object {obj_id} does not exist on worker '{self.worker_id}' for you: it was "
                "fetched with .get(), moved, freed, never sent there, or it is not yours")


def _default_max_bytes() -> int:
    """Three quarters of this machine's memory (the default of ``Config.max_store_bytes``)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4
    except (OSError, ValueError):
        return 1 << 40
