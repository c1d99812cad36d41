"""Routing torch calls on pointers to the worker that holds the data.

For every torch function, tensor method or operator that reaches a pointer's
``__torch_function__``:

1. a few are answered locally (``hash``, shape and dtype queries, ``format``);
2. everything else must be in the allow-list (:mod:`zmqsyft.allowlist`) and all pointers among
   the arguments must live on one worker, or a clear error is raised before anything is sent;
3. the call is run on ``meta`` tensors here to infer the results' shapes and dtypes. If that
   works and every result is a tensor, result ids are chosen here and the op is **pipelined**:
   the pointers are returned at once and the worker's acknowledgement is read later (errors then
   surface on use of the result, or at the next synchronisation point). In-place ops return the
   pointer they modified.
4. if inference fails (a data-dependent shape, a value result such as ``.item()``, an op with no
   meta kernel, or an error), the op runs synchronously: the worker returns values as values and
   tensors as new pointers, and raises its error, with its traceback, at this line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import allowlist
from .client import get_client
from .codec import dtype_name
from .errors import LocationMismatch, OpNotAllowed, PointerError
from .messages import ObjRef, Op, PointerDesc
from .pointer import PointerTensor, pointer_from_desc
from .store import new_id

__all__ = ["torch_function", "run_remote"]

_PIPELINE_POLL = 64  # read arrived acknowledgements once this many requests are in flight


def _no_pickle(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise PointerError(
        "pointers cannot be pickled or deep-copied; use .copy() for a copy on the worker, or "
        ".get() to fetch the data")


def _no_numpy(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise PointerError(f"{self!r} points to data on worker '{self.location.id}'; call .get() "
                       "first to have it here")


_SPECIAL: dict[Any, Any] = {
    torch.Tensor.__hash__: lambda self: id(self),
    torch.Tensor.__format__: lambda self, spec="": format(repr(self), spec),
    torch.Tensor.__reduce_ex__: _no_pickle,
    torch.Tensor.__deepcopy__: _no_pickle,
    torch.Tensor.__setstate__: _no_pickle,
    torch.Tensor.__iter__: lambda self: iter(self.unbind(0)),
    torch.Tensor.__array__: _no_numpy,
    torch.Tensor.numpy: _no_numpy,
    torch.Tensor.device.__get__: lambda self: torch.device("cpu"),
    torch.Tensor.is_meta.__get__: lambda self: False,  # type: ignore[attr-defined]
}


def torch_function(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``func(*args, **kwargs)`` where at least one argument is a pointer."""
    try:
        special = _SPECIAL.get(func)
    except TypeError:
        special = None
    if special is not None:
        return special(*args, **kwargs)
    name = allowlist.name_of(func)
    if name is None:
        shown = torch.overrides.resolve_name(func) or getattr(func, "__name__", repr(func))
        raise OpNotAllowed(
            f"{shown} cannot run on a zmqsyft pointer: it is not in the allow-list of remotely "
            "executable operations. Fetch the data with .get() if you own it")
    if name in allowlist.LOCAL_META:  # answered from the metadata the pointer keeps
        return _infer(func, args, kwargs)
    pointers = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, PointerTensor)]
    location = _common_location(name, pointers)
    for p in pointers:
        p._check_usable(name)
    try:
        meta_args, meta_out = _infer_with_args(func, args, kwargs)
    except Exception:  # noqa: BLE001 - the worker will tell the real story
        return _call_sync(name, location, args, kwargs, pointers)
    if allowlist.is_inplace(name):
        _call_async(name, location, args, kwargs, pointers, out=None, results=())
        target = args[0]
        if isinstance(target, PointerTensor) and isinstance(meta_args[0], torch.Tensor):
            target._rg = meta_args[0].requires_grad  # requires_grad_(), requires_grad = ...
        return None if allowlist.returns_none(name) else target
    leaves = pytree.tree_leaves(meta_out)
    if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        return _call_sync(name, location, args, kwargs, pointers)
    made: list[PointerTensor] = []

    def to_pointer(t: torch.Tensor) -> PointerTensor:
        ptr = PointerTensor(location, new_id(), t.shape, t.dtype, t.requires_grad)
        made.append(ptr)
        return ptr

    result = pytree.tree_map(to_pointer, meta_out)
    out = [[p.id_at_location, list(p.shape), dtype_name(p.dtype), bool(p.requires_grad)] for p in made]
    _call_async(name, location, args, kwargs, pointers, out=out, results=tuple(made))
    return result


def _common_location(name: str, pointers: list[PointerTensor]) -> Any:
    location = pointers[0].location
    for p in pointers[1:]:
        if p.location is not location and p.location.address != location.address:
            raise LocationMismatch(
                f"{name}: the arguments live on different workers: '{location.id}' "
                f"({location.address}) and '{p.location.id}' ({p.location.address}). Move one "
                "of them with .move(worker), or .get() them first")
    return location


def _to_meta(x: Any) -> Any:
    if isinstance(x, PointerTensor):
        return x._meta()
    if isinstance(x, torch.Tensor):
        t = torch.empty_like(x, device="meta")
        return t.requires_grad_(True) if x.requires_grad else t
    return x


def _infer_with_args(func: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Run ``func`` on storage-less stand-ins; return the stand-in arguments and the result."""
    margs, mkwargs = pytree.tree_map(_to_meta, (args, kwargs))
    return margs, func(*margs, **mkwargs)


def _infer(func: Any, args: Any, kwargs: Any) -> Any:
    return _infer_with_args(func, args, kwargs)[1]


def _wire_args(args: Any, kwargs: Any) -> tuple[Any, Any]:
    def one(x: Any) -> Any:
        return ObjRef(x.id_at_location) if isinstance(x, PointerTensor) else x
    return pytree.tree_map(one, (args, kwargs))


def _call_async(name: str, location: Any, args: Any, kwargs: Any, pointers: list[PointerTensor],
                out: list[Any] | None, results: tuple[PointerTensor, ...]) -> None:
    client = get_client()
    wargs, wkwargs = _wire_args(args, kwargs)
    body = {"fn": name, "args": wargs, "kwargs": wkwargs, "out": out,
            "grad": torch.is_grad_enabled()}
    conn = client.conn(location)
    pipeline = client.cfg.pipeline
    req_id = conn.send(Op.CALL, body, keep=tuple(pointers), results=results, what=name,
                       awaited=not pipeline)
    if not pipeline:
        conn.wait(req_id)
        return
    for ptr in results:
        ptr._creator = (conn, req_id)
    if len(conn.inflight) >= _PIPELINE_POLL:
        conn.poll_replies()


def _call_sync(name: str, location: Any, args: Any, kwargs: Any, pointers: list[PointerTensor]) -> Any:
    wargs, wkwargs = _wire_args(args, kwargs)
    body = {"fn": name, "args": wargs, "kwargs": wkwargs, "out": None,
            "grad": torch.is_grad_enabled()}
    reply = get_client().conn(location).request(Op.CALL, body, keep=tuple(pointers), what=name)
    if allowlist.is_inplace(name):
        return None if allowlist.returns_none(name) else args[0]

    def adopt(x: Any) -> Any:
        return pointer_from_desc(x) if isinstance(x, PointerDesc) else x
    return pytree.tree_map(adopt, reply.body.get("result"))


def run_remote(worker: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a user function on ``worker`` (cloudpickled: the worker must trust us)."""
    pointers = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, PointerTensor)]
    for p in pointers:
        p._check_usable("run()")
        if p.location is not worker:
            raise LocationMismatch(
                f"run() on worker '{worker.id}' got a pointer to data on '{p.location.id}'; "
                "move it there first")
    wargs, wkwargs = _wire_args(args, kwargs)
    body = {"fn": fn, "args": wargs, "kwargs": wkwargs, "grad": torch.is_grad_enabled()}
    conn = get_client().conn(worker)
    reply = conn.wait(conn.send(Op.RUN, body, keep=tuple(pointers), allow_pickle=True,
                                what=f"run({getattr(fn, '__name__', 'fn')})"))

    def adopt(x: Any) -> Any:
        return pointer_from_desc(x) if isinstance(x, PointerDesc) else x
    return pytree.tree_map(adopt, reply.body.get("result"))
