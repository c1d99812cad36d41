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
    """The bytes an object holds, as the store counts them (a view counts as its own bytes)."""
    return obj.nbytes if isinstance(obj, torch.Tensor) else 0


class Store:
    """The objects one worker holds, in insertion order, and the tensor bytes they hold.

    Parameters
    ----------
    worker_id : str
        For error messages.
    max_bytes : int
        The most tensor bytes the store holds; :meth:`make_room` refuses what would pass it.
    """

    def __init__(self, worker_id: str, max_bytes: int = 0) -> None:
        self.worker_id = worker_id
        self.max_bytes = max_bytes or _default_max_bytes()
        self.nbytes = 0
        self._objects: dict[int, Any] = {}
        self._tags: dict[int, frozenset[str]] = {}

    def make_room(self, nbytes: int, what: str) -> None:
        """Refuse (``LimitExceeded``) to store ``nbytes`` more if that passes ``max_bytes``."""
        if self.nbytes + nbytes > self.max_bytes:
            raise LimitExceeded(
                f"{what} needs {nbytes / 2**20:.1f} MiB on worker '{self.worker_id}', which holds "
                f"{self.nbytes / 2**20:.1f} MiB of its {self.max_bytes / 2**20:.1f} MiB "
                "(Config.max_store_bytes); free objects, or start the worker with a larger "
                "ZMQSYFT_MAX_STORE_BYTES. Nothing was stored")

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

    def put(self, obj_id: int, obj: Any) -> None:
        if not isinstance(obj_id, int) or isinstance(obj_id, bool) or obj_id <= 0:
            raise ProtocolError(f"invalid object id {obj_id!r}")
        if obj_id in self._objects:
            raise ProtocolError(f"object id {obj_id} is already in use on worker '{self.worker_id}'")
        self._objects[obj_id] = obj
        self.nbytes += _size(obj)

    def replace(self, obj_id: int, obj: Any) -> None:
        old = self._objects.get(obj_id)
        self._objects[obj_id] = obj
        self.nbytes += _size(obj) - _size(old)

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
        self.nbytes -= _size(obj)
        return obj

    def discard(self, obj_id: Any) -> Any:
        try:
            obj = self._objects.pop(obj_id, None)
        except TypeError:
            return None
        self._tags.pop(obj_id, None)
        self.nbytes -= _size(obj)
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
