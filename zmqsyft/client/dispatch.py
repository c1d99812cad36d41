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
   tensors as new pointers, and raises its error, with its traceback, at this line. Two ops with
   no tensor result are pipelined all the same where this process knows what they do:
   ``loss.backward()`` and ``p.grad`` (:mod:`zmqsyft.client.grads`).

The pointer class is handed in by its ``__torch_function__`` (``torch_function(cls, ...)``); this
module imports none, and reaches the connection through the pointers' worker handle
(``location.session``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import allowlist
from ..errors import LocationMismatch, OpNotAllowed, PointerError
from ..ids import new_id
from ..wire.bodies import Call, CallReply
from ..wire.messages import ObjRef, Op
from ..wire.tensors import dtype_name
from . import grads

__all__ = ["torch_function", "wire_args"]

_PIPELINE_POLL = 64  # read arrived acknowledgements every this many requests, if as many are in flight


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


# the metadata reads optimisers and modules make all the time, straight from the pointer
_META_FAST: dict[str, Any] = {
    "torch.Tensor.shape.__get__": lambda p: p._shape,
    "torch.Tensor.size": lambda p: p._shape,
    "torch.Tensor.dtype.__get__": lambda p: p._dtype,
    "torch.Tensor.requires_grad.__get__": lambda p: p._rg,
    "torch.Tensor.is_leaf.__get__": lambda p: True,
    "torch.Tensor.ndim.__get__": lambda p: len(p._shape),
    "torch.Tensor.dim": lambda p: len(p._shape),
    "torch.Tensor.numel": lambda p: p._shape.numel(),
    "torch.Tensor.nelement": lambda p: p._shape.numel(),
    "torch.Tensor.ndimension": lambda p: len(p._shape),
    "torch.Tensor.is_sparse.__get__": lambda p: False,  # (a pointer's object is dense, strided)
    "torch.Tensor.layout.__get__": lambda p: torch.strided,
    "torch.Tensor.is_floating_point": lambda p: p._dtype.is_floating_point,
    "torch.Tensor.is_complex": lambda p: p._dtype.is_complex,
    "torch.is_floating_point": lambda p: p._dtype.is_floating_point,
    "torch.is_complex": lambda p: p._dtype.is_complex,
    "torch.Tensor.element_size": lambda p: p._dtype.itemsize,
    "torch.Tensor.itemsize.__get__": lambda p: p._dtype.itemsize,
}


def torch_function(cls: type, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``func(*args, **kwargs)`` where at least one argument is a pointer of class ``cls``."""
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
        fast = _META_FAST.get(name)
        if fast is not None and len(args) == 1 and not kwargs and isinstance(args[0], cls):
            return fast(args[0])
        return _infer(cls, func, args, kwargs)
    pointers = [x for x in _leaves(args, kwargs) if isinstance(x, cls)]
    location = _common_location(name, pointers)
    for p in pointers:
        p._check_usable(name)
    if name in _GRAD_OPS:
        done = _grad_op(cls, name, location, args, kwargs, pointers)
        if done is not _SYNC:
            return done
    outcome = _outcome(cls, func, args, kwargs, name)
    if outcome is _SYNC:
        return _call_sync(cls, name, location, args, kwargs, pointers)
    if outcome[0] == "inplace":
        _call_async(cls, name, location, args, kwargs, pointers, out=None)
        target = args[0]
        if isinstance(target, cls):
            _inplace_done(cls, name, target, outcome[1], args, pointers)
        return None if allowlist.returns_none(name) else target
    _, spec, metas, one = outcome
    out = [[new_id(), list(shape), dtype_name(dtype), bool(rg)] for shape, dtype, rg in metas]
    made = _call_async(cls, name, location, args, kwargs, pointers, out=out, metas=metas)
    return made[0] if one else pytree.tree_unflatten(made, spec)


def _flat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether no argument is a container (the common case: no pytree pass needed)."""
    for a in args:
        if isinstance(a, (list, tuple, dict)):
            return False
    for a in kwargs.values():
        if isinstance(a, (list, tuple, dict)):
            return False
    return True


def _leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    if _flat(args, kwargs):
        return [*args, *kwargs.values()]
    return pytree.tree_leaves((args, kwargs))


def _common_location(name: str, pointers: list[Any]) -> Any:
    location = pointers[0].location
    for p in pointers[1:]:
        if p.location is not location and p.location.address != location.address:
            raise LocationMismatch(
                f"{name}: the arguments live on different workers: '{location.id}' "
                f"({location.address}) and '{p.location.id}' ({p.location.address}). Move one "
                "of them with .move(worker), or .get() them first")
    return location


def _to_meta(x: Any, cls: type) -> Any:
    if isinstance(x, cls):
        return x._meta()  # a pointer: its remote metadata, no storage
    if isinstance(x, torch.Tensor):
        t = torch.empty_like(x, device="meta")
        return t.requires_grad_(True) if x.requires_grad else t
    return x


def _infer_with_args(cls: type, func: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """Run ``func`` on storage-less stand-ins; return the stand-in arguments and the result."""
    margs, mkwargs = pytree.tree_map(lambda x: _to_meta(x, cls), (args, kwargs))
    return margs, func(*margs, **mkwargs)


def _infer(cls: type, func: Any, args: Any, kwargs: Any) -> Any:
    return _infer_with_args(cls, func, args, kwargs)[1]


def wire_args(cls: type, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """The arguments as they travel: pointers of class ``cls`` as references to their objects."""
    if not _flat(args, kwargs):
        return pytree.tree_map(lambda x: ObjRef(x.id_at_location) if isinstance(x, cls) else x,
                               (args, kwargs))
    wargs = [ObjRef(a.id_at_location) if isinstance(a, cls) else a for a in args]
    if not kwargs:
        return wargs, {}
    return wargs, {k: ObjRef(v.id_at_location) if isinstance(v, cls) else v
                   for k, v in kwargs.items()}


def _call_async(cls: type, name: str, location: Any, args: Any, kwargs: Any, pointers: list[Any],
                out: list[Any] | None, metas: Any = ()) -> list[Any]:
    """Send a CALL whose results get the ids in ``out``; return pointers to them (``metas``:
    their shapes, dtypes and requires_grad)."""
    session = location.session
    wargs, wkwargs = wire_args(cls, args, kwargs)
    body = Call.pack(fn=name, args=wargs, kwargs=wkwargs, out=out, grad=torch.is_grad_enabled())
    conn = session.conn(location)
    keep = tuple(pointers)
    if not session.cfg.pipeline:
        req_id = conn.send(Op.CALL, body, keep=keep, what=name)
        made = _pointers(cls, location, out, metas, pointers)  # (made while it is on its way)
        conn.wait(req_id)
        return made
    made = _pointers(cls, location, out, metas, pointers)
    req_id = conn.send(Op.CALL, body, keep=keep, results=tuple(made), what=name, awaited=False)
    for ptr in made:
        ptr._creator = (conn, req_id)
    if req_id % _PIPELINE_POLL == 0 and len(conn.inflight) >= _PIPELINE_POLL:
        conn.poll_replies()
    return made


def _pointers(cls: type, location: Any, out: list[Any] | None, metas: Any,
              pointers: list[Any] = ()) -> list[Any]:  # type: ignore[assignment]
    made = [cls(location, spec[0], shape, dtype, rg)
            for spec, (shape, dtype, rg) in zip(out or (), metas, strict=True)]
    no_grad = (grads.epoch(), False)  # (a result has no gradient; one requiring grad, a history)
    anc: Any = False
    for ptr in made:
        ptr._gk = no_grad
        if ptr._rg:
            if anc is False:
                anc = grads.inputs_of(pointers)
            ptr._anc = anc
    return made


def _call_sync(cls: type, name: str, location: Any, args: Any, kwargs: Any,
               pointers: list[Any]) -> Any:
    wargs, wkwargs = wire_args(cls, args, kwargs)
    body = Call(fn=name, args=wargs, kwargs=wkwargs, out=None, grad=torch.is_grad_enabled())
    session = location.session
    reply = session.conn(location).request(Op.CALL, body, keep=tuple(pointers), what=name)
    if allowlist.is_inplace(name):
        grads.after_sync(name, pointers, None)
        return None if allowlist.returns_none(name) else args[0]
    result = session.adopt(CallReply.from_wire(reply.body).result)
    grads.after_sync(name, pointers, result)
    return result


# ----------------------------------------------------------------------------- gradients
_GRAD_OPS = frozenset({grads.GRAD_GET, grads.BACKWARD})
_REQUIRES_GRAD = frozenset({"torch.Tensor.requires_grad_", "torch.Tensor.requires_grad.__set__"})


def _grad_op(cls: type, name: str, location: Any, args: Any, kwargs: Any,
             pointers: list[Any]) -> Any:
    """``p.grad`` and ``loss.backward()`` without a round trip where this process knows what
    they do (:mod:`zmqsyft.client.grads`); ``_SYNC`` where it does not."""
    p = args[0] if args else None
    if not isinstance(p, cls):
        return _SYNC
    if name == grads.GRAD_GET:
        has = grads.known(p) if len(args) == 1 and not kwargs else None
        if not has:
            return None if has is False else _SYNC
        g = p._gptr
        if g is None or g._error is not None or g._released is not None:
            meta = (p._shape, p._dtype, False)
            out = [[new_id(), list(p._shape), dtype_name(p._dtype), False]]
            g = _call_async(cls, name, location, args, kwargs, pointers, out=out, metas=[meta])[0]
            p._gptr = g
        return g
    # backward(gradient=None, retain_graph=None, create_graph=False, inputs=None)
    named = dict(zip(("gradient", "retain_graph", "create_graph", "inputs"), args[1:], strict=False))
    if len(named) + 1 < len(args) or set(named) & set(kwargs):
        return _SYNC
    named.update(kwargs)
    gradient = named.pop("gradient", None)
    if (p._anc is None or not p._rg or named.pop("create_graph", False) or
            named.pop("inputs", None) is not None or set(named) - {"retain_graph"} or
            (gradient is None and p._shape.numel() != 1) or
            not (gradient is None or isinstance(gradient, cls))):
        return _SYNC  # (the worker says what is wrong, or does what this cannot follow)
    _call_async(cls, name, location, args, kwargs, pointers, out=None)
    grads.reached(p)
    return None


def _inplace_done(cls: type, name: str, target: Any, rg: bool | None, args: Any,
                  pointers: list[Any]) -> None:
    """What a pipelined in-place op changed in ``target``'s metadata."""
    if name == grads.GRAD_SET:
        value = args[1] if len(args) > 1 else None
        grads.set_known(target, value is not None, value if isinstance(value, cls) else None)
        return
    if rg is None:
        return
    if rg and not target._rg and name in _REQUIRES_GRAD:
        grads.leaf(target)  # (a tensor that did not require grad is a leaf)
    elif rg and torch.is_grad_enabled():  # now computed from its inputs (and what it was)
        target._anc = grads.inputs_of(pointers)
    target._rg = rg  # requires_grad_(), requires_grad = ...


# ----------------------------------------------------------------------------- fast path
# Shape inference on meta tensors costs tens of microseconds; in a loop the same op meets the same
# argument shapes again and again. So the outcome of inference is cached, keyed by the op, the
# grad mode and a signature of every argument (a pointer's shape, dtype and requires_grad; a
# scalar's type and value). Calls are cached whose arguments are tensors, pointers, scalars, dtypes,
# slices, or short tuples and lists of these (``torch.stack([p, q])``); others take the general
# path.
_CACHE: dict[Any, Any] = {}
_CACHE_MAX = 4096
_SEQ_MAX = 64  # a longer list argument is inferred each time (its key would cost as much)
_SYNC = "sync"  # inference failed or gave values: run synchronously
_SCALARS = (bool, int, float, complex, str, type(None), torch.dtype, torch.device,
            torch.memory_format, torch.layout)


class _Uncacheable(Exception):
    pass


def _sig(x: Any, cls: type) -> Any:
    if isinstance(x, cls):
        return (1, x._shape, x._dtype, x._rg)
    if isinstance(x, torch.Tensor):
        return (2, x.shape, x.dtype, x.requires_grad, x.layout)
    if isinstance(x, _SCALARS):
        return (type(x), x)
    if isinstance(x, slice):
        return (3, _sig(x.start, cls), _sig(x.stop, cls), _sig(x.step, cls))
    if x is Ellipsis:
        return 4
    if isinstance(x, (tuple, list)) and len(x) <= _SEQ_MAX:  # (torch.stack([p, q]) too)
        return (type(x), tuple([_sig(e, cls) for e in x]))
    raise _Uncacheable


def _outcome(cls: type, func: Any, args: Any, kwargs: Any, name: str) -> Any:
    """What shape inference says about this call, from the cache when it can."""
    try:
        key = (func, torch.is_grad_enabled(), tuple([_sig(a, cls) for a in args]),
               tuple((k, _sig(v, cls)) for k, v in kwargs.items()))
    except _Uncacheable:
        key = None
    if key is not None:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    try:
        meta_args, meta_out = _infer_with_args(cls, func, args, kwargs)
    except Exception:  # noqa: BLE001 - the worker will tell the real story
        outcome: Any = _SYNC
    else:
        if allowlist.is_inplace(name):
            first = meta_args[0] if isinstance(meta_args[0], torch.Tensor) else None
            outcome = ("inplace", first.requires_grad if first is not None else None)
        else:
            leaves, spec = pytree.tree_flatten(meta_out)
            if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
                outcome = _SYNC
            else:
                outcome = ("out", spec, [(x.shape, x.dtype, x.requires_grad) for x in leaves],
                           spec.is_leaf())  # (one tensor: no pytree pass per call)
    if key is not None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = outcome
    return outcome
