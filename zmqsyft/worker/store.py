"""A worker's object store: id → tensor, pointer record, or the error of a failed pipelined op."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import LimitExceeded, ObjectNotFound, ProtocolError
from ..wire.messages import PointerDesc
from ..wire.transport import canonical_endpoint

__all__ = ["Store", "PointerRecord", "ErrorMarker"]


class PointerRecord:
    """A pointer held by a worker: the object ``id_at_location`` on the worker at ``address``.

    ``owned`` records whether this worker frees that object when the record is deleted.
    """

    __slots__ = ("location", "address", "id_at_location", "shape", "dtype", "requires_grad", "owned")

    def __init__(self, location: str, address: str, id_at_location: int, shape: tuple[int, ...],
                 dtype: str, requires_grad: bool, owned: bool) -> None:
        self.location = location
        self.address = address
        self.id_at_location = id_at_location
        self.shape = shape
        self.dtype = dtype
        self.requires_grad = requires_grad
        self.owned = owned

    @classmethod
    def from_desc(cls, desc: PointerDesc) -> PointerRecord:
        """The record of a pointer that came over the wire; its address in its one spelling
        (``ProtocolError`` if it is not a worker's endpoint)."""
        return cls(desc.location, canonical_endpoint(desc.address), desc.id_at_location,
                   desc.shape, desc.dtype, desc.requires_grad, desc.owned)

    def desc(self, ptr_id: int, owned: bool) -> PointerDesc:
        return PointerDesc(self.location, self.address, self.id_at_location, ptr_id, self.shape,
                           self.dtype, self.requires_grad, owned)

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
    grad = obj._grad
    return obj.nbytes if grad is None else obj.nbytes + grad.nbytes


class Store:
    """The objects one worker holds, in insertion order, and the tensor bytes they hold: in all,
    and per connection that stored them (its routing id; the worker's own data is nobody's).

    Parameters
    ----------
    worker_id : str
        For error messages.
    max_bytes : int
        The most tensor bytes the store holds; :meth:`make_room` refuses what would pass it.
        ``0``: three quarters of this machine's memory.
    max_conn_bytes : int
        The most tensor bytes the objects one connection stored may hold. ``0``: half of
        ``max_bytes``.
    """

    def __init__(self, worker_id: str, max_bytes: int = 0, max_conn_bytes: int = 0) -> None:
        self.worker_id = worker_id
        self.max_bytes = max_bytes or _default_max_bytes()
        self.max_conn_bytes = max_conn_bytes or self.max_bytes // 2
        self.nbytes = 0
        self.by_conn: dict[bytes, int] = {}  # routing id -> bytes its objects hold
        self._objects: dict[int, Any] = {}
        self._tags: dict[int, frozenset[str]] = {}
        self._counted: dict[int, tuple[int, bytes | None]] = {}  # id -> (bytes, whose), if any

    def make_room(self, nbytes: int, what: str, by: bytes | None = None) -> None:
        """Refuse (``LimitExceeded``) to store ``nbytes`` more, for connection ``by``, if that
        passes ``max_bytes`` or what one connection may hold."""
        if self.nbytes + nbytes > self.max_bytes:
            raise LimitExceeded(
                f"{what} needs {nbytes / 2**20:.1f} MiB on worker '{self.worker_id}', which holds "
                f"{self.nbytes / 2**20:.1f} MiB of its {self.max_bytes / 2**20:.1f} MiB "
                "(Config.max_store_bytes); free objects, or start the worker with a larger "
                "--max-store-bytes / ZMQSYFT_MAX_STORE_BYTES. Nothing was stored")
        held = self.by_conn.get(by, 0) if by is not None else 0
        if by is not None and held + nbytes > self.max_conn_bytes:
            raise LimitExceeded(
                f"{what} needs {nbytes / 2**20:.1f} MiB on worker '{self.worker_id}', where "
                f"this connection's objects hold {held / 2**20:.1f} MiB of the "
                f"{self.max_conn_bytes / 2**20:.1f} MiB one connection may hold "
                "(Config.max_connection_bytes); free objects, or start the worker with a larger "
                "--max-connection-bytes / ZMQSYFT_MAX_CONNECTION_BYTES. Nothing was stored")

    def _count(self, obj_id: int, obj: Any, by: bytes | None) -> None:
        size = _size(obj)
        if size:
            self.nbytes += size
            self._counted[obj_id] = (size, by)
            if by is not None:
                self.by_conn[by] = self.by_conn.get(by, 0) + size

    def _uncount(self, obj_id: Any) -> None:
        size, by = self._counted.pop(obj_id, (0, None))
        if size:
            self.nbytes -= size
            if by is not None:
                left = self.by_conn[by] - size
                if left:
                    self.by_conn[by] = left
                else:
                    del self.by_conn[by]

    def recount(self, obj_id: Any) -> None:
        """Count an object again after an op may have changed what it holds (``x.data = y``,
        ``x.grad = y``), charging the connection that stored it."""
        if obj_id in self._objects:
            by = self._counted.get(obj_id, (0, None))[1]
            self._uncount(obj_id)
            self._count(obj_id, self._objects[obj_id], by)

    def tag(self, obj_id: int, tags: frozenset[str]) -> None:
        """Attach search tags (``"#diabetes"``) to a stored object."""
        self.get(obj_id)
        self._tags[obj_id] = self._tags.get(obj_id, frozenset()) | tags

    def search(self, tags: frozenset[str]) -> list[int]:
        """Ids of the objects carrying every one of ``tags``, in insertion order."""
        return [i for i in self._objects if i in self._tags and tags <= self._tags[i]]

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, obj_id: object) -> bool:
        return obj_id in self._objects

    def items(self) -> Iterator[tuple[int, Any]]:
        return iter(list(self._objects.items()))

    def put(self, obj_id: int, obj: Any, by: bytes | None = None) -> None:
        """Store ``obj`` under a new id, its bytes counted against connection ``by``."""
        if not isinstance(obj_id, int) or isinstance(obj_id, bool) or obj_id <= 0:
            raise ProtocolError(f"invalid object id {obj_id!r}")
        if obj_id in self._objects:
            raise ProtocolError(f"object id {obj_id} is already in use on worker '{self.worker_id}'")
        self._objects[obj_id] = obj
        self._count(obj_id, obj, by)

    def replace(self, obj_id: int, obj: Any, by: bytes | None = None) -> None:
        """Store ``obj`` under ``obj_id`` in place of what was there."""
        self._uncount(obj_id)
        self._objects[obj_id] = obj
        self._count(obj_id, obj, by)

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
        self._tags.pop(obj_id, None)
        self._uncount(obj_id)
        return obj

    def discard(self, obj_id: Any) -> Any:
        try:
            obj = self._objects.pop(obj_id, None)
        except TypeError:
            return None
        self._tags.pop(obj_id, None)
        self._uncount(obj_id)
        return obj

    def missing(self, obj_id: Any) -> str:
        return (f"object {obj_id} does not exist on worker '{self.worker_id}': it was fetched with "
                ".get(), moved, freed, or never sent there")


def _default_max_bytes() -> int:
    """Three quarters of this machine's memory (the default of ``Config.max_store_bytes``)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4
    except (OSError, ValueError):
        return 1 << 40
