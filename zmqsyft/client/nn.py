"""Remote models: ``nn.Module.send/get/move/copy``, PySyft 0.2 style.

``model.send(bob)`` sends every parameter and buffer to bob and turns each of them, in place,
into an owning pointer (:meth:`PointerTensor._become`): the module keeps its structure and its
Python code here, and the very same parameter objects now stand for bob's tensors. So
``model(data_ptr)`` runs the forward op by op on bob (no module is pickled), ``loss.backward()``
runs there, and an optimizer, even one made before ``send``, steps the remote parameters.
``model.get()`` brings the tensors back into the same objects.
"""

from __future__ import annotations

import contextlib
import copy as _copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import HandoverRefused, PointerError
from ..ids import new_id
from ..wire.bodies import Get, GetReply, Move, MoveReply, Put
from ..wire.messages import Op
from .pointer import PointerTensor, check_worker

__all__ = ["module_send", "module_get", "module_move", "move_all", "module_copy", "module_tensors",
           "module_location", "module_location_property"]


def module_tensors(module: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor, bool]]:
    """Every parameter and buffer of a module, shared ones once.

    Returns ``(owning dict, name, tensor, is_parameter)`` tuples.
    """
    seen: set[int] = set()
    found = []
    for sub in module.modules():
        for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    found.append((table, name, t, is_param))
    return found


def _where(module: nn.Module) -> Any:
    return {t.location for _, _, t, _ in module_tensors(module) if isinstance(t, PointerTensor)}


def module_location(module: nn.Module) -> Any:
    """``model.location``: the worker a sent module's parameters are on (PySyft's SplitNN sends
    each part's inputs there). ``AttributeError`` for a module that was not sent, or whose
    tensors are on several workers (as PySyft: ``hasattr(model, "location")`` is False)."""
    own = module.__dict__.get("location", _NONE)
    if own is not _NONE:  # (a module of the user's own with a `location` attribute)
        return own
    where = _where(module)
    if len(where) == 1:
        return next(iter(where))
    if not where:
        raise AttributeError(f"{type(module).__name__} has no location: it is here, not on a "
                             "worker (send it with .send(worker) first)")
    names = ", ".join(sorted(f"'{w.id}'" for w in where))
    raise AttributeError(f"{type(module).__name__} has no one location: its tensors are on {names}")


def _set_location(module: nn.Module, value: Any) -> None:
    module.__dict__["location"] = value  # (modules of the user's own may have the attribute)


_NONE = object()
module_location_property = property(module_location, _set_location)


def module_send(module: nn.Module, worker: Any, *more: Any) -> nn.Module:
    """Send a module's parameters and buffers to ``worker``; the module now points there.

    Returns the module itself (as PySyft does), so ``model.copy().send(bob)`` reads naturally.
    """
    check_worker(worker, more, "send")
    entries = module_tensors(module)
    remote = _where(module)
    if remote:
        names = ", ".join(sorted(f"'{w.id}'" for w in remote))
        raise PointerError(f"this module is already on {names}; use .move(worker), or .get() it first")
    conn = worker.session.conn(worker)
    for _, name, t, _ in entries:  # pipelined: the model is on its way while we go on
        obj_id, local = new_id(), t.detach()
        req = conn.send(Op.PUT, Put(id=obj_id, obj=local.requires_grad_(t.requires_grad)),
                        keep=(local,), results=(t, _KeptIfRefused(t, local)), awaited=False,
                        what=f".send() of parameter {name!r} to '{worker.id}'")
        t.grad = None
        PointerTensor._become(t, worker, obj_id)
        t._creator = (conn, req)
    return module


class _KeptIfRefused:
    """A parameter's local values while its ``PUT`` is on its way: should the worker refuse
    it, the parameter (a pointer by then, whose use raises the worker's error) keeps them, and
    ``model.get()`` gives them back; once the worker has it, they are let go."""

    __slots__ = ("ptr", "local", "_gen")

    def __init__(self, ptr: torch.Tensor, local: torch.Tensor) -> None:
        self.ptr, self.local = ptr, local

    def _mark_failed(self, exc: BaseException) -> None:
        self.ptr._unsent = self.local  # type: ignore[attr-defined]


def module_get(module: nn.Module) -> nn.Module:
    """Fetch a module's parameters and buffers back (destructively); returns the module.

    All requests are sent before the first answer is awaited. From a worker on this machine a
    large tensor comes as the worker's own shared memory, uncopied (as ``PointerTensor.get``).
    """
    pending, refused = [], []
    for table, name, t, is_param in module_tensors(module):
        if isinstance(t, PointerTensor):
            if t._restore is not None:
                _arrived(t)
            if t._unsent is not None:  # its .send() was refused: its values never left
                refused.append(t)
                continue
            t._check_usable(".get()")
            conn = t.location.session.conn(t.location)
            hold = new_id() if conn.can_take_over() else 0
            pending.append((table, name, t, is_param, conn, hold, conn.send(
                Op.GET, Get(id=t.id_at_location, handover=hold), keep=(t,),
                what=f".get() of {name!r}")))
    replies = []
    for i, (_, name, t, _, conn, hold, req) in enumerate(pending):
        try:
            try:
                replies.append(conn.wait(req))
            except HandoverRefused:  # the worker kept it under `hold`: fetch it again, copied
                replies.append(conn.request(Op.GET, Get(id=hold), keep=(t,),
                                            what=f".get() of {name!r}"))
                hold = 0
        except BaseException:
            for _, _, later, _, _, later_hold, _ in pending[i:]:
                if later_hold:  # (it may yet be kept under `hold` there)
                    later.location.session.free_later(later.location.address, later_hold)
            raise
        if hold:  # the worker may let go of the memory now (its pages go with ours)
            t.location.session.free_later(t.location.address, hold)
    if any(entry[5] for entry in pending):
        pending[0][2].location.session.flush_deletes(wait=False)
    for (table, name, t, is_param, *_), reply in zip(pending, replies, strict=True):
        data = GetReply.from_wire(reply.body).obj
        if not isinstance(data, torch.Tensor):
            raise PointerError(f"parameter {name!r} is a pointer to a pointer; .get() it by hand")
        grad = data._grad
        if t._restore is not None:
            local = t._unbecome(data)
        else:  # a pointer that was not made from a local tensor (from a remote copy)
            t._release("its module was fetched with .get()")
            local = nn.Parameter(data, requires_grad=t.requires_grad) if is_param else data
            table[name] = local
        if grad is not None:  # the gradient the worker computed comes back with it
            local.grad = grad
    for t in refused:
        t._unbecome(t._unsent)
    return module


def _arrived(t: PointerTensor) -> None:
    """Wait for the request that sent ``t`` if it is on its way (its error, if any, is
    ``t``'s)."""
    creator, t._creator = t._creator, None
    if creator is not None and creator[1] in creator[0].inflight:
        with contextlib.suppress(Exception):
            creator[0].wait(creator[1])


def module_move(module: nn.Module, worker: Any) -> nn.Module:
    """Move a remote module's tensors to ``worker``, each directly from where it is."""
    check_worker(worker, (), "move")
    _finish_moves(_start_moves(_module_moving(module, worker), worker), worker)
    return module


def move_all(items: Iterable[Any], worker: Any) -> list[Any]:
    """Move several remote modules and tensor pointers to ``worker`` at once.

    Every tensor goes directly from the worker holding it to ``worker`` (as ``.move()``), and
    all the moves are in flight together: the updates of N data owners reach an aggregator in
    about the time of the slowest, not of their sum. Returns ``items`` as a list, every pointer
    in them pointing at ``worker`` once this returns.

    A move that fails (the object is gone, ``worker`` has no room for it, ...) leaves its tensor
    where it was; the others are still waited for and take effect, and the first failure is
    raised once they all have. Items already on ``worker`` are left alone.

    Parameters
    ----------
    items : iterable of nn.Module or PointerTensor
        Modules that were sent (``model.send(w)``) and pointers to tensors.
    worker : WorkerClient
        Where they all go.
    """
    check_worker(worker, (), "move_all")
    items = list(items)
    tensors: list[tuple[PointerTensor, str]] = []
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            tensors += _module_moving(item, worker)
        elif isinstance(item, PointerTensor):
            item._check_usable(".move()")
            item._check_owner(".move()")
            if item.location is not worker and item.location.address != worker.address:
                tensors.append((item, f"item {i}"))
        else:
            raise TypeError(f"move_all(items, worker): item {i} is a {type(item).__name__}, not "
                            "a module that was sent or a pointer; .send(worker) local data instead")
    _finish_moves(_start_moves(tensors, worker), worker)
    return items


def _module_moving(module: nn.Module, worker: Any) -> list[tuple[PointerTensor, str]]:
    """The module's tensors that a move to ``worker`` moves (checked: all remote, usable)."""
    moving = []
    for _, name, t, _ in module_tensors(module):
        if not isinstance(t, PointerTensor):
            raise PointerError(f"parameter {name!r} is local: .send(worker) the module first")
        if t.location is worker:
            continue
        t._check_usable(".move()")
        moving.append((t, f"parameter {name!r}"))
    return moving


def _start_moves(tensors: list[tuple[PointerTensor, str]], worker: Any) -> list[tuple[Any, ...]]:
    """Send a MOVE for each tensor, none awaited yet. If sending one fails, those already sent
    are waited for (and take effect) before the failure is raised."""
    moving: list[tuple[Any, ...]] = []
    for t, what in tensors:
        try:
            conn = t.location.session.conn(t.location)
            moving.append((t, conn, conn.send(
                Op.MOVE, Move(id=t.id_at_location, dest_address=worker.address,
                              dest_key=worker.key),
                keep=(t,), what=f".move() of {what} to '{worker.id}'")))
        except BaseException:
            with contextlib.suppress(Exception):
                _finish_moves(moving, worker)
            raise
    return moving


def _finish_moves(moving: list[tuple[Any, ...]], worker: Any) -> None:
    """Wait for every move sent; point each tensor that moved at where it is now; then raise
    the first failure, if any (so that no moved tensor is left pointing at its old place)."""
    failure: BaseException | None = None
    for t, conn, req in moving:
        try:
            collapsed = MoveReply.from_wire(conn.wait(req).body).collapsed
        except Exception as exc:  # noqa: BLE001 - raised below, once every move is settled
            failure = failure or exc
            continue
        if collapsed is not None:
            t._retarget(worker.session.worker_at(collapsed.address, collapsed.location,
                                                 collapsed.key),
                        collapsed.id_at_location)
        else:
            t._retarget(worker, t.id_at_location)
    if failure is not None:
        raise failure


def module_copy(module: nn.Module) -> nn.Module:
    """A deep copy. A local module is copied here; a remote one is copied on its worker(s)."""
    memo: dict[int, Any] = {}
    for _, _, t, _ in module_tensors(module):
        if isinstance(t, PointerTensor):
            with torch.no_grad():
                clone = t.clone()
            memo[id(t)] = clone.requires_grad_(True) if t.requires_grad else clone
    return _copy.deepcopy(module, memo)
