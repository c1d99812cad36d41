"""Pointers: ``torch.Tensor`` wrapper subclasses that stand for a tensor on a worker.

A :class:`PointerTensor` is a real ``torch.Tensor`` (on the ``meta`` device, with the remote
tensor's shape and dtype and no storage), so ``isinstance(p, torch.Tensor)`` holds and torch
routes every function, method and operator on it to ``__torch_function__``, which sends it to the
worker (:mod:`zmqsyft.client.dispatch`). A pointer reaches its session, and so its connection,
through the worker handle it holds: ``ptr.location.session``. Its own attributes are plain: ``location`` (the worker handle),
``id_at_location`` (the object's id there), ``id`` (the pointer's own id: the key it is stored
under when the pointer itself is sent) and ``owner`` (``"me"``, or the worker holding it for the
pointers in a ``_objects`` snapshot).

Ownership: exactly one pointer owns each remote object and frees it when garbage collected (via
the client's delete queue, never by I/O in a finaliser). ``.get()`` and ``.send()`` hand the
ownership on; the pointer is then *released* and any further use raises ``PointerReleased``.

Tags and description: ``tags`` and ``description`` are what this process knows of the remote
tensor's (from ``send``, ``search()``, ``tag()``, ``describe()``); ``tag()`` and ``describe()``
change them on the worker, which lets only the object's owner do so (:mod:`zmqsyft.wire.tags`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..errors import (
    CommunicationError,
    HandoverRefused,
    PointerError,
    PointerReleased,
    ResultLost,
    WorkerRestarted,
)
from ..ids import new_id
from ..wire.bodies import Get, GetReply, Give, Move, MoveReply, Put, RemoteGet
from ..wire.messages import Op, PointerDesc
from ..wire.tags import check_description, check_tags
from ..wire.tensors import dtype_name
from . import grads
from .dispatch import torch_function
from .handle import WorkerHandle
from .local import LOCAL_WORKER, LocalWorker
from .pointer_attrs import PySyftAttributes

__all__ = ["PointerTensor", "check_worker"]

_META = torch.device("meta")


class PointerTensor(PySyftAttributes, torch.Tensor):
    """A pointer to a tensor (or to another pointer) that lives on a worker.

    Prints as ``(Wrapper)>[PointerTensor | me:<id> -> bob:<id_at_location>]``.
    """

    location: WorkerHandle
    id_at_location: int
    owner: LocalWorker | str  # this program (sy.local_worker, equal to "me"), or a worker's id
    # what most pointers never change, as class defaults: fewer writes per pointer created
    _restore: type | None = None
    _released: str | None = None
    _error: BaseException | None = None
    _creator: tuple[Any, int] | None = None
    _gen = 0  # the worker's generation (restarts met) when this was made
    _tags: frozenset[str] = frozenset()
    _description: str | None = None
    # gradients (:mod:`.grads`): the leaves it was computed from, whether it has a gradient
    _anc: frozenset[Any] | None = None  # (None: not known)
    _gk: tuple[int, bool] | None = None  # (epoch, has a gradient); None: not known
    _gptr: PointerTensor | None = None  # its gradient, once asked for
    _unsent: torch.Tensor | None = None  # a module's parameter whose .send() was refused: its values

    @staticmethod
    def __new__(cls, location: WorkerHandle, id_at_location: int, shape: Any, dtype: torch.dtype,
                requires_grad: bool = False, *, id: int | None = None,  # noqa: A002
                owner: str = "me", owned: bool = True) -> PointerTensor:
        grad_ok = dtype.is_floating_point or dtype.is_complex
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=dtype, device=_META, requires_grad=bool(requires_grad and grad_ok))

    def __init__(self, location: WorkerHandle, id_at_location: int, shape: Any, dtype: torch.dtype,
                 requires_grad: bool = False, *, id: int | None = None,  # noqa: A002
                 owner: str = "me", owned: bool = True) -> None:
        # the remote metadata, kept here (not read from the tensor) so that a tensor turned into a
        # pointer in place (a module's parameters) can give its local storage back
        self._shape = shape if type(shape) is torch.Size else torch.Size(shape)
        self._dtype = dtype
        self._rg = bool(requires_grad and (dtype.is_floating_point or dtype.is_complex))
        self.location = location
        self.id_at_location = id_at_location
        self.id = id if id is not None else new_id()
        self.owner = LOCAL_WORKER if owner == "me" else owner  # (equal to "me")
        self._owned = bool(owned and owner == "me")
        self._fin = (location.session.track(self, location.address, id_at_location)
                     if self._owned else None)
        if location.generation:
            self._gen = location.generation

    # ------------------------------------------------------------ torch glue
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if len(types) > 1 and any(getattr(t, "_is_plan_trace", False) for t in types):
            return NotImplemented  # a plan being built: its traced tensors record the op
        return torch_function(cls, func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),  # type: ignore[override]
                           kwargs: Any = None) -> Any:
        raise PointerError(
            f"{func} reached torch's dispatcher with a zmqsyft pointer; it cannot run on pointers. "
            "Fetch the data with .get() first, or report this as a bug")

    def __repr__(self) -> str:  # type: ignore[override]
        out = (f"(Wrapper)>[PointerTensor | {self.owner}:{self.id} -> "
               f"{self.location.id}:{self.id_at_location}]")
        if self._tags:  # (PySyft's layout: what search() found, at a glance)
            out += f"\n\tTags: {' '.join(map(_printable, sorted(self._tags)))}"
            out += f"\n\tShape: {self._shape}"
        if self._description:
            first, *rest = self._description.strip().split("\n", 1)
            more = "..." if rest or len(first) > 80 else ""
            out += f"\n\tDescription: {_printable(first[:80])}{more}"
        return out

    __str__ = __repr__

    # --------------------------------------------------------------- state
    @property
    def owned(self) -> bool:
        """Whether this pointer frees the remote object when it is dropped."""
        return self._owned

    def _meta(self) -> torch.Tensor:
        """A storage-less stand-in with the remote metadata, for inferring results locally."""
        t = torch.empty(self._shape, dtype=self._dtype, device=_META)
        return t.requires_grad_(True) if self._rg else t

    def _desc(self, owned: bool) -> PointerDesc:
        return PointerDesc(self.location.id, self.location.address, self.id_at_location, self.id,
                           tuple(self._shape), dtype_name(self._dtype), self._rg, owned,
                           self.location.key, self.location.incarnation)

    @classmethod
    def _become(cls, tensor: torch.Tensor, location: WorkerHandle, id_at_location: int) -> None:
        """Turn a local tensor (a module's parameter or buffer) into an owning pointer in place.

        The object keeps its identity, so whatever holds it (the module, an optimizer) now holds
        the pointer; its local storage is released. :meth:`_unbecome` turns it back.
        """
        original = type(tensor)
        shape, dtype, rg = tensor.shape, tensor.dtype, tensor.requires_grad
        with torch.no_grad():
            tensor.data = torch.empty(0, dtype=dtype)
        tensor.__class__ = cls
        cls.__init__(tensor, location, id_at_location, shape, dtype, rg)  # type: ignore[arg-type]
        tensor._restore = original  # type: ignore[attr-defined]
        grads.set_known(tensor, False)  # (sent without its gradient)
        if tensor._rg:  # type: ignore[attr-defined]
            grads.leaf(tensor)

    def _unbecome(self, data: torch.Tensor) -> torch.Tensor:
        """Turn a pointer made by :meth:`_become` back into a local tensor holding ``data``."""
        if self._restore is None:
            raise PointerError(f"{self!r} was not made from a local tensor")
        self._release("its module was fetched with .get()")
        self.__class__ = self._restore
        with torch.no_grad():
            self.data = data
        for attr in ("location", "id_at_location", "id", "owner", "_owned", "_released", "_error",
                     "_creator", "_gen", "_fin", "_shape", "_dtype", "_rg", "_restore", "_tags",
                     "_description", "_anc", "_gk", "_gptr", "_unsent"):
            self.__dict__.pop(attr, None)
        return self

    def _mark_failed(self, exc: BaseException) -> None:
        self._error = exc

    def _check_usable(self, what: str) -> None:
        if self.owner is not LOCAL_WORKER:  # (a snapshot held by a worker)
            raise PointerError(
                f"{self!r} is a snapshot of a pointer held by worker '{self.owner}'; it is for "
                f"display only and cannot be used for {what}")
        if self._released is not None:
            raise PointerReleased(
                f"cannot use {self!r} for {what}: object {self.id_at_location} on worker "
                f"'{self.location.id}' is no longer this pointer's, because {self._released}")
        if isinstance(self._error, WorkerRestarted):  # (a relay found the data's worker restarted)
            raise WorkerRestarted(
                f"cannot use {self!r} for {what}: the operation that was to create object "
                f"{self.id_at_location} on worker '{self.location.id}' failed: "
                f"{self._error}") from self._error
        if self._error is not None:  # (its worker failing: a CommunicationError too)
            lost = isinstance(self._error, CommunicationError)
            raise (ResultLost if lost else PointerError)(
                f"cannot use {self!r} for {what}: the operation that was to create object "
                f"{self.id_at_location} on worker '{self.location.id}' failed: "
                f"{type(self._error).__name__}: {self._error}" + (
                    "; its module's local values are kept: .get() the module to have them back"
                    if self._unsent is not None else "")) from self._error
        if self._gen != self.location.generation:
            raise self.location.restarted(self.id_at_location, what)
        self.location._check_open()
        # the request creating this object may still be queued in another thread's batch: hand
        # it to ZeroMQ before this thread names the object (this thread's own queue is ordered
        # by its connection already)
        creator = self._creator
        if creator is not None and creator[0].outbox and creator[0].thread != threading.get_ident():
            creator[0].flush_foreign(blocking=True)

    def _check_owner(self, what: str) -> None:
        if not self._owned:
            raise PointerError(
                f"{self!r} does not own object {self.id_at_location} on worker "
                f"'{self.location.id}' (it was found with search(), or is a view), so it cannot "
                f"take it with {what}; operations on it give results you own")

    def _release(self, reason: str) -> None:
        self.location.session.untrack(self._fin)
        self._fin = None
        self._owned = False
        self._released = reason

    def _retarget(self, location: WorkerHandle, id_at_location: int) -> None:
        self.location.session.untrack(self._fin)
        self.location = location
        self.id_at_location = id_at_location
        self._gen = location.generation
        self._fin = (location.session.track(self, location.address, id_at_location)
                     if self._owned else None)
        self._gk = self._gptr = None  # (its gradient, if any, is the new place's business)

    def _settle(self) -> None:
        """Wait until the pipelined request that creates this object has been acknowledged."""
        if self._creator is not None:
            conn, req_id = self._creator
            self._creator = None
            if req_id in conn.inflight and conn in self.location.session.thread_conns():
                try:
                    conn.wait(req_id)
                except Exception:  # noqa: BLE001 - reported through _check_usable below
                    pass
        if self._error is not None:
            self._check_usable("this")

    # ------------------------------------------------------------- actions
    def get(self) -> Any:
        """Fetch the object and remove it from the worker (``get`` is destructive).

        Returns the tensor, or, for a pointer to a pointer, the inner pointer together with the
        ownership of what it points to.
        """
        self._check_usable(".get()")
        self._check_owner(".get()")
        session = self.location.session
        conn = session.conn(self.location)
        what = f".get() of object {self.id_at_location}"
        # a tensor the worker got through shared memory may become ours, uncopied
        hold = new_id() if conn.can_take_over() else 0
        try:
            reply = conn.request(Op.GET, Get(id=self.id_at_location, handover=hold), keep=(self,),
                                 what=what)
        except HandoverRefused:  # the worker kept it under `hold`: fetch it again, copied
            reply = conn.request(Op.GET, Get(id=hold), keep=(self,), what=what)
            hold = 0
        except BaseException:
            if hold:  # (a timeout: the worker may yet keep it under `hold`)
                session.free_later(self.location.address, hold)
            raise
        if hold:  # the worker may let go of the memory now (its pages then go with ours)
            session.free_later(self.location.address, hold)
            session.flush_deletes(wait=False)
        self._release("it was fetched with .get()")
        got = GetReply.from_wire(reply.body)
        obj = got.obj
        if isinstance(obj, PointerDesc):
            return session.pointer_from_desc(obj)
        if isinstance(obj, torch.Tensor) and (got.tags or got.description):
            where = f".get() from worker '{self.location.id}'"
            try:  # (as a worker sent them: what it cannot have stored is dropped, not the data)
                obj.__dict__["_zs_tags"] = set(check_tags(got.tags, where))
                obj.__dict__["_zs_description"] = check_description(got.description, where) or None
            except (TypeError, ValueError):
                obj.__dict__.pop("_zs_tags", None)
        return obj

    def send(self, worker: WorkerHandle, *more: WorkerHandle) -> PointerTensor:
        """Send *this pointer* to ``worker``: it stores it under this pointer's id.

        The data stays where it is. The returned pointer (``me -> worker:<this id>``) now owns the
        chain and this pointer is released (a non-owning pointer, from ``search()``, stays usable
        and the stored pointer owns nothing either).
        """
        check_worker(worker, more, "send")
        self._check_usable(".send()")
        self._settle()
        session = worker.session
        worker.address  # noqa: B018 - a spawned worker is ready, so its peers know its key
        what = f".send() of a pointer to '{worker.id}'"
        conn = session.conn(worker)
        conn.request(Op.PUT, Put(id=self.id, obj=self._desc(self._owned)), keep=(self,),
                     what=what)
        if worker.key and self.location.key and worker.address != self.location.address:
            # the worker holding the data lets `worker` own (or read) it: the process of it that
            # took the pointer (whose HELLO this connection met), whose links name its
            # incarnation as their session there: a later process of it does not keep it alive
            there = conn.peer.incarnation if conn.peer is not None else ""
            try:
                session.conn(self.location).request(
                    Op.GIVE, Give(ids=[self.id_at_location], to=worker.key,
                                  read_only=not self._owned, session=there),
                    keep=(self,), what=what)
            except BaseException:
                session.free_later(worker.address, self.id)  # (it owns nothing there)
                raise
        if self._owned:  # the ownership went with it; a non-owning pointer stays usable
            self._release(f"it was sent to worker '{worker.id}'; use the pointer that send() returned")
        # we own the pointer object stored on `worker` (whatever it points to)
        return PointerTensor(worker, self.id, self._shape, self._dtype, self._rg)

    def move(self, worker: WorkerHandle, requires_grad: bool = False) -> Any:
        """Move the object to ``worker``: its current worker pushes it there directly.

        The source frees it once ``worker`` has confirmed; this pointer then points at ``worker``
        (same id) and is returned. Moving to where it already is does nothing. If the object is a
        pointer to ``worker`` itself, the chain collapses and this pointer points at the data.
        ``requires_grad=True`` makes the moved tensor require gradients there (a split model's
        activations, moved on to the next part: PySyft's SplitNN).
        """
        if worker is LOCAL_WORKER:  # moving it here is fetching it (PySyft: .move(me))
            return self.get()
        check_worker(worker, (), "move")
        self._check_usable(".move()")
        if worker is self.location or worker.address == self.location.address:
            return self.requires_grad_() if requires_grad and not self.requires_grad else self
        self._check_owner(".move()")
        session = self.location.session
        reply = session.conn(self.location).request(
            Op.MOVE, Move(id=self.id_at_location, dest_address=worker.address,
                          dest_key=worker.key), keep=(self,),
            what=f".move() to '{worker.id}'")
        collapsed = MoveReply.from_wire(reply.body).collapsed
        if collapsed is not None:
            self._retarget(session.worker_at(collapsed.address, collapsed.location, collapsed.key),
                           collapsed.id_at_location)
        else:
            self._retarget(worker, self.id_at_location)
        if requires_grad and not self.requires_grad:
            self.requires_grad_()
        return self

    def remote_send(self, worker: WorkerHandle) -> PointerTensor:
        """The worker holding the object sends it on to ``worker`` and keeps a pointer to it in
        its place: this pointer now leads through that worker to the data on ``worker`` (a
        chain, as if the data had been sent there and the pointer to it to the first worker).
        Returns this pointer. Sending it to where it is does nothing."""
        check_worker(worker, (), "remote_send")
        self._check_usable(".remote_send()")
        self._check_owner(".remote_send()")
        holder = self.location
        if worker is holder or worker.address == holder.address:
            return self
        self.move(worker)
        if self.location is holder:  # (it was a pointer to `worker`: the move collapsed it)
            return self
        chain = self.send(holder)  # (releases this pointer: it owns the chain again below)
        chain.location.session.untrack(chain._fin)
        chain._fin, chain._owned, chain._released = None, False, "it became the remote_send() pointer"
        self._owned, self._released = True, None
        self._retarget(holder, chain.id_at_location)
        return self

    def remote_get(self) -> PointerTensor:
        """For a pointer to a pointer: the middle worker fetches the data from the last hop and
        keeps it in place of its pointer. Returns this pointer."""
        self._check_usable(".remote_get()")
        self.location.session.conn(self.location).request(
            Op.REMOTE_GET, RemoteGet(id=self.id_at_location), keep=(self,), what=".remote_get()")
        self._gk = self._gptr = None
        return self

    def copy(self) -> PointerTensor:
        """A new pointer to a copy of the object, made on the same worker, with the same tags
        and description (so the copy is published too if the original was)."""
        out: PointerTensor = self.clone()  # type: ignore[assignment]
        if self._tags or self._description:
            out._annotate(sorted(self._tags), self._description, ".copy()")
        return out


def _printable(text: str) -> str:
    """``text`` with anything unprintable escaped (a worker's text, shown in a terminal)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def check_worker(worker: Any, more: tuple[Any, ...], what: str) -> None:
    """Refuse anything but one worker handle as the target of ``send``/``move``."""
    if more:
        raise NotImplementedError(f"{what}() to several workers at once is not supported yet")
    if not isinstance(worker, WorkerHandle):
        raise TypeError(
            f"{what}() needs a worker handle (from sy.spawn_worker, sy.VirtualWorker or sy.connect), "
            f"not {type(worker).__name__}")
