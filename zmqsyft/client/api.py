"""The public worker handle: :class:`WorkerClient`, what a user calls on a worker.

``_objects`` (a snapshot of its store), ``search`` (published tensors, by tags), ``run`` (a function
on it), ``stats`` (its traffic), ``ping``, ``sync``; readiness, liveness and teardown come from
:class:`~zmqsyft.client.handle.WorkerHandle`.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import LocationMismatch, ObjectNotFound
from ..wire.bodies import (
    Del,
    Objects,
    ObjectsReply,
    Ping,
    Run,
    RunReply,
    Search,
    SearchReply,
    Stats,
    StatsReply,
)
from ..wire.messages import Message, Op, PointerDesc
from ..wire.tags import query_tags
from . import grads
from .dispatch import wire_args
from .handle import WorkerHandle
from .pointer import PointerTensor

__all__ = ["WorkerClient", "ObjectStore"]


class WorkerClient(WorkerHandle):
    """A handle to one worker process, local (spawned) or remote (connected), as users get it
    from :func:`~zmqsyft.spawn_worker`, :func:`~zmqsyft.VirtualWorker` and
    :func:`~zmqsyft.connect`: ``id``, ``address``, ``pid``, ``close()`` and ``with`` come from
    :class:`~zmqsyft.client.handle.WorkerHandle`; this class adds what one asks a worker."""

    def _request(self, op: Op, body: Any, what: str = "") -> Message:
        self._check_open()
        return self.session.conn(self).request(op, body, what=what)

    @property
    def _objects(self) -> dict[int, Any]:
        """A snapshot of the worker's store: id → tensor, or → pointer for pointers it holds.

        This is a synchronisation point: it reflects every operation and delete issued before it,
        including deletes cascading through pointer chains. Large tensors are summarised.
        """
        return self.objects()

    def objects(self) -> dict[int, Any]:
        """Same as :attr:`_objects`."""
        gc.collect()  # a pointer dropped into a reference cycle is dropped too, for the user
        return self._snapshot()

    def _snapshot(self) -> dict[int, Any]:
        self.session.sync(only=self)
        reply = ObjectsReply.from_wire(self._request(Op.OBJECTS, Objects(), what="_objects").body)
        out: dict[int, Any] = {}
        for key, value in reply.objects.items():
            if isinstance(value, PointerDesc):
                value = self.session.pointer_from_desc(value, owner=self.id)
            out[key] = value
        return out

    @property
    def _tensors(self) -> dict[int, Any]:
        """The tensors among :attr:`_objects` (what PySyft's ``worker._tensors`` listed)."""
        return {k: v for k, v in self.objects().items()
                if isinstance(v, torch.Tensor) and not isinstance(v, PointerTensor)}

    @property
    def object_store(self) -> ObjectStore:
        """PySyft's ``worker.object_store``: ``_objects``, ``_tensors`` and ``get_obj(id)``, read
        from the worker (snapshots, as :attr:`_objects`)."""
        return ObjectStore(self)

    def clear_objects(self) -> WorkerClient:
        """Delete every object this program's key owns on the worker (the worker passes over
        the others' objects an admin's ``_objects`` also lists, and pointer records free what
        they own downstream). Pointers to them still held here raise ``ObjectNotFound`` when
        used. Returns the worker, as PySyft did."""
        gc.collect()
        self.session.sync(only=self)
        reply = ObjectsReply.from_wire(self._request(Op.OBJECTS, Objects(), what="clear_objects")
                                       .body)
        self._request(Op.DEL, Del(ids=list(reply.objects)), what="clear_objects")
        return self

    def ping(self) -> float:
        """Round-trip time of an empty request, in seconds."""
        start = time.perf_counter()
        self._request(Op.PING, Ping())
        return time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        """The worker's counters.

        Returns a dict with ``objects`` (how many it holds), ``counters`` (dropped and late
        messages; ``connections_open`` now and ``connections_refused`` so far, against its
        ``max_connections``) and ``peers``: for each peer, by the name it gave (``"alice"``, or
        ``"client:<host>:<pid>"`` for a program like this one), ``messages_in/out``,
        ``bytes_in/out`` and ``largest_in/out`` (the largest single message), counted from the
        worker's side over both the requests it served and the ones it sent.
        """
        return StatsReply.from_wire(self._request(Op.STATS, Stats()).body).to_wire()

    def search(self, *tags: str | list[str]) -> list[PointerTensor]:
        """Pointers to the published tensors on the worker carrying every one of ``tags``
        (``search("#diabetes", "#data")``, or PySyft's ``search(["#diabetes", "#data"])``;
        matched exactly; none: every published tensor), each showing its ``tags`` and
        ``description``.

        Published are the worker's own data (``--load``) and every tensor its owner tagged
        (``tensor.tag(...).send(worker)``, ``ptr.tag(...)``), whoever that is: this program
        too, whose own objects come back as non-owning pointers as well (the pointer ``send``
        returned stays their one owner). The pointers do not own the data: dropping them frees
        nothing, and they cannot take, move, change, delete or retag it; operations on them
        give results you own.

        Raises
        ------
        TypeError, ValueError
            For a tag that is not a short printable str, or too many tags.
        """
        query = query_tags(tags, f"search() on worker '{self.id}'")
        reply = SearchReply.from_wire(self._request(Op.SEARCH, Search(tags=query),
                                                    what="search").body)
        found = []
        for i, desc in enumerate(reply.results):
            ptr = self.session.pointer_from_desc(desc)
            if i < len(reply.tags) and reply.tags[i]:
                ptr._tags = frozenset(reply.tags[i])
            if i < len(reply.descriptions) and reply.descriptions[i]:
                ptr._description = reply.descriptions[i]
            found.append(ptr)
        return found

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the worker; pointers to its objects are passed as the
        objects themselves.

        ``fn`` (and whatever it refers to: a module, an optimizer) travels with cloudpickle, so
        the worker must trust this program: a spawned worker trusts its parent; a worker started
        from the shell needs ``--trust-token-file FILE`` (the token in a mode-600 file) and
        ``sy.connect(address, trust_token=...)``.
        Tensor results stay on the worker and come back as pointers; other values as values.

        Raises
        ------
        UntrustedPayload
            If the worker does not trust this program; nothing was run.
        """
        pointers = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, PointerTensor)]
        for p in pointers:
            p._check_usable("run()")
            if p.location is not self:
                raise LocationMismatch(
                    f"run() on worker '{self.id}' got a pointer to data on '{p.location.id}'; "
                    "move it there first")
        wargs, wkwargs = wire_args(PointerTensor, args, kwargs)
        body = Run(fn=fn, args=wargs, kwargs=wkwargs, grad=torch.is_grad_enabled())
        conn = self.session.conn(self)
        grads.bump()  # (the function may change any gradient there)
        reply = conn.wait(conn.send(Op.RUN, body, keep=tuple(pointers), allow_pickle=True,
                                    what=f"run({getattr(fn, '__name__', 'fn')})"))
        return self.session.adopt(RunReply.from_wire(reply.body).result)

    def sync(self) -> None:
        """Wait until everything issued so far has taken effect; raise pipelined errors."""
        self.session.sync()


class ObjectStore:
    """A worker's store as PySyft's tests and tutorials read it (``bob.object_store``); each
    read asks the worker (a snapshot: see :attr:`WorkerClient._objects`)."""

    def __init__(self, worker: WorkerClient) -> None:
        self.worker = worker

    @property
    def _objects(self) -> dict[int, Any]:
        return self.worker._objects

    @property
    def _tensors(self) -> dict[int, Any]:
        return self.worker._tensors

    def __len__(self) -> int:
        return len(self.worker._objects)

    def get_obj(self, obj_id: int) -> Any:
        """The object ``obj_id`` as the worker holds it (a snapshot; ``ObjectNotFound`` if it
        holds none, or none of yours)."""
        found = self.worker._objects
        if obj_id not in found:
            raise ObjectNotFound(f"object {obj_id} does not exist on worker '{self.worker.id}' "
                                 "for you: it was fetched, moved, freed, or never sent there")
        return found[obj_id]

    def __repr__(self) -> str:
        return f"<ObjectStore of worker '{self.worker.id}'>"
