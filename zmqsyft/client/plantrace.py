"""How a plan (:mod:`zmqsyft.client.plan`) is traced: the op list and its recorder.

While a plan is built its inputs are storage-less :class:`_Traced` stand-ins, and a torch
function mode (:class:`_Recording`) sees every torch function, method and operator the code
calls. An op is recorded, with its arguments as slots, when it touches a traced tensor or a
tensor the plan *holds*: its parameters and buffers, its state, and a constant it made that an
op of the plan changed in place. Such an op is never run while the plan is built, so its result
is worked out again at every run, on the values the state has then (``w.t()`` of a state ``w``
that the plan updates in place, ``self.fc.weight.t()``). Only ops on constants alone (tensors the
plan makes from literals, ``torch.ones(3) * 2``) run here, once, and their results are
constants of the plan. ``backward()`` is recorded for what it leaves (gradients, read with
``.grad``, which is a tensor of its tensor's shape in the plan).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .. import allowlist
from ..errors import OpNotAllowed, PointerError
from .dispatch import _to_meta
from .pointer import PointerTensor

__all__: list[str] = []

_PLAIN = (torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__hash__)
# ops run for what they do to gradients on the worker, giving nothing
GIVE_NONE = frozenset({"torch.Tensor.backward", "torch.autograd.backward"})
GRAD_GET = "torch.Tensor.grad.__get__"


class _Slot:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"${self.n}"


class _Op:
    """An op of a plan; ``grad``: whether grad mode was on where the plan's code ran it."""

    __slots__ = ("name", "args", "kwargs", "out", "metas", "grad")

    def __init__(self, name: str, args: Any, kwargs: Any, out: list[int] | None,
                 metas: list[tuple[torch.Size, torch.dtype, bool]]) -> None:
        self.name, self.args, self.kwargs, self.out, self.metas = name, args, kwargs, out, metas
        self.grad = torch.is_grad_enabled()


class _Trace:
    """One recording: the ops, the slots of the inputs and outputs, and the outside tensors."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.slots = 0
        self.inputs: list[int] = []
        self.outside: dict[int, tuple[int, Any]] = {}  # id(tensor) -> (slot, the tensor)
        self.out: list[int] = []
        self.out_spec: Any = None
        # while tracing: the tensors the plan holds (their ops are recorded, never run here),
        # and the slots of the copies standing for constants its ops change in place
        self.held: dict[int, Any] = {}
        self.alias: dict[int, int] = {}

    def rebound(self, copies: dict[int, Any]) -> _Trace:
        """The same trace for a copy of its plan: the outside tensors it names are the copies
        ``copies`` (a ``deepcopy`` memo) made of them (constants stay the same objects)."""
        new = _Trace()
        new.ops, new.slots, new.inputs, new.out, new.out_spec = (
            self.ops, self.slots, self.inputs, self.out, self.out_spec)
        for slot, x in self.outside.values():
            y = copies.get(id(x), x)
            new.outside[id(y)] = (slot, y)
        return new

    def slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def recording(self, held: Iterable[Any]) -> _Recording:
        """The mode to build the plan under; ``held``: its parameters, buffers and state."""
        self.held = {id(t): t for t in held if isinstance(t, torch.Tensor)}
        return _Recording(self)

    def touches(self, args: Any, kwargs: Any) -> bool:
        """Whether an op on these arguments is the plan's to record (else: constants alone)."""
        return any(isinstance(x, _Traced) or (isinstance(x, torch.Tensor) and id(x) in self.held)
                   for x in pytree.tree_leaves((args, kwargs)))

    def ref(self, x: Any) -> Any:
        """An argument as the op list keeps it: traced tensors and outside tensors as slots."""
        if isinstance(x, _Traced):
            return _Slot(x._slot)
        if isinstance(x, torch.Tensor):
            if id(x) in self.alias:
                return _Slot(self.alias[id(x)])
            entry = self.outside.get(id(x))
            if entry is None:
                entry = self.outside[id(x)] = (self.slot(), x)
            return _Slot(entry[0])
        return x

    def record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = allowlist.name_of(func)
        if name is None:
            shown = torch.overrides.resolve_name(func) or getattr(func, "__name__", repr(func))
            raise OpNotAllowed(
                f"{shown} cannot be part of a plan: it is not in zmqsyft's allow-list of remotely "
                "executable operations (a plan may hold only ops a worker would run one by one)")
        margs, mkwargs = pytree.tree_map(_meta, (args, kwargs))
        try:
            result = func(*margs, **mkwargs)
        except Exception as exc:  # noqa: BLE001 - said with the op's name
            raise PointerError(
                f"{name} cannot be part of a plan: what it gives is not known before it runs "
                f"({type(exc).__name__}: {exc}). Plans hold ops whose results are tensors of "
                "shapes known in advance (not .item(), .tolist(), bool(), nonzero(), a branch on "
                "values): do that outside the plan, on its results") from exc
        if name in allowlist.LOCAL_META:  # shapes, dtypes: known while tracing
            return result
        if name in GIVE_NONE:  # loss.backward(): the gradients it leaves are read with .grad
            self.ops.append(_Op(name, *pytree.tree_map(self.ref, (args, kwargs)), None, []))
            return result
        if name == GRAD_GET and result is None and isinstance(margs[0], torch.Tensor):
            result = torch.empty_like(margs[0], requires_grad=False)  # (a stand-in has none)
        if allowlist.is_inplace(name):
            target = args[0]
            if isinstance(target, torch.Tensor) and not isinstance(target, _Traced) and (
                    id(target) not in self.held):
                # a constant the plan made, changed by its ops: each run changes a copy of it
                self.alias[id(target)] = self.record(torch.Tensor.clone, (target,), {})._slot
                self.held[id(target)] = target
            wargs, wkwargs = pytree.tree_map(self.ref, (args, kwargs))
            self.ops.append(_Op(name, wargs, wkwargs, None, []))
            return None if allowlist.returns_none(name) else target
        wargs, wkwargs = pytree.tree_map(self.ref, (args, kwargs))
        leaves, spec = pytree.tree_flatten(result)
        if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
            raise PointerError(
                f"{name} gives {type(result).__name__}, not tensors: a plan holds only ops whose "
                "results are tensors (no .item(), .tolist(), bool(), data-dependent branches); "
                "do that outside the plan, on its results")
        out = [self.slot() for _ in leaves]
        metas = [(x.shape, x.dtype, x.requires_grad) for x in leaves]
        self.ops.append(_Op(name, wargs, wkwargs, out, metas))
        made = [_Traced(self, s, *m) for s, m in zip(out, metas, strict=True)]
        return pytree.tree_unflatten(made, spec)


class _Recording(TorchFunctionMode):
    """While a plan is built: records the ops its trace :meth:`_Trace.touches`, runs the others
    (on constants alone) as they are."""

    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _PLAIN or not self.trace.touches(args, kwargs):
            return func(*args, **kwargs)
        return self.trace.record(func, args, kwargs)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.trace.held, self.trace.alias = {}, {}  # (no reference kept to what it held)


def _meta(x: Any) -> Any:
    if isinstance(x, _Traced):
        t = torch.empty(x._shape, dtype=x._dtype, device="meta")
        return t.requires_grad_() if x._rg else t
    return _to_meta(x, PointerTensor)  # (pointers and tensors: as single ops infer them)


class _Traced(torch.Tensor):
    """A storage-less stand-in for a tensor while a plan is built: what it meets is recorded."""

    _trace: _Trace
    _slot: int
    _shape: torch.Size
    _dtype: torch.dtype
    _rg: bool
    _is_plan_trace = True  # (a pointer's __torch_function__ leaves ops with these to us)

    @staticmethod
    def __new__(cls, trace: _Trace, slot: int, shape: Any, dtype: torch.dtype,
                requires_grad: bool = False) -> _Traced:
        rg = bool(requires_grad and (dtype.is_floating_point or dtype.is_complex))
        return torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device="meta",
                                                   requires_grad=rg)

    def __init__(self, trace: _Trace, slot: int, shape: Any, dtype: torch.dtype,
                 requires_grad: bool = False) -> None:
        self._trace, self._slot = trace, slot
        self._shape, self._dtype = torch.Size(shape), dtype  # (read without tracing)
        self._rg = bool(requires_grad and (dtype.is_floating_point or dtype.is_complex))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _PLAIN:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        traced = next(x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, _Traced))
        return traced._trace.record(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),  # type: ignore[override]
                           kwargs: Any = None) -> Any:
        raise PointerError(f"{func} reached torch's dispatcher while a plan was being built; it "
                           "cannot be part of a plan")
