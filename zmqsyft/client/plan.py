"""Plans (PySyft 0.2's Part 8): a function or a module traced once into a list of allow-listed
ops, then run on a worker's pointers as one message.

``@sy.func2plan(args_shape=[(1,)])`` over a function, or a subclass of :class:`Plan` (an
``nn.Module`` with a ``forward``) built with ``plan.build(example)``. Building runs the code once
on storage-less *traced* tensors (:mod:`zmqsyft.client.plantrace`): every torch function, method
and operator that meets them or the tensors the plan holds (its parameters, buffers and
``state=``) is looked up in the allow-list (anything else is refused when the plan is built, not
when it runs), its results' shapes and dtypes are inferred on ``meta`` tensors, and the op is
recorded with its arguments as slots: the plan's inputs, the results of earlier ops, and the
tensors it uses from outside (parameters, state, constants made inside). None of these ops runs
while the plan is built: ``w.t()`` of a state ``w`` the plan updates in place is worked out again
at every run. Only ops on constants alone (``torch.ones(3) * 2``) run here, once. Each op runs
with the grad mode it had when built (``with torch.no_grad():`` in the plan's code holds).
``loss.backward()`` may be part of a plan, and ``w.grad`` read after it (a gradient of ``w``'s
shape; the worker refuses the read if none was left). Nothing is pickled: no code leaves this
program.

Calling a built plan on pointers (``plan(x_ptr)``) sends its ops, each an ordinary ``CALL`` in
the wire's safe format with fresh result ids, in one ``BATCH`` message to the worker holding the
pointers; the worker runs them in order through the same allow-list, ownership, privacy and cost
checks as single ops, and the call returns pointers to the results at once. The tensors the plan
uses from outside must be on that worker: ``plan.send(worker)`` returns a copy of the plan whose
parameters and state are there (PySyft's pointer to a plan; the plan itself stays here and can
be sent elsewhere too), and ``.get()`` on that copy brings them back. Constants the plan made go
along at its first run. Called on local tensors, a plan is just its function (or ``forward``),
run here.

A plan is traced for the shapes, dtypes and ``requires_grad`` of the inputs it is called with; a
call with other ones traces it again (built plans keep one trace per input signature).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import LocationMismatch, PointerError
from ..ids import new_id
from ..wire.tensors import dtype_name
from . import grads
from .dispatch import _call_async
from .nn import module_get, module_send, module_tensors
from .plantrace import GIVE_NONE, _Slot, _Trace, _Traced
from .pointer import PointerTensor

__all__ = ["Plan", "PlanState", "func2plan"]


class PlanState:
    """Tensors a function plan uses besides its arguments (``func2plan(state=(bias,))``); the
    function gets it as its last argument and reads the tensors with :meth:`read`."""

    def __init__(self, tensors: Sequence[torch.Tensor] = ()) -> None:
        self.tensors: list[Any] = list(tensors)

    def read(self) -> list[Any]:
        """The state's tensors (pointers, once the plan was sent)."""
        return list(self.tensors)

    def __repr__(self) -> str:
        return f"<PlanState {len(self.tensors)} tensor(s)>"


def _signature(leaves: list[Any]) -> tuple[Any, ...]:
    return (torch.is_grad_enabled(), *(
        (tuple(x.shape), x.dtype, bool(x.requires_grad)) if isinstance(x, torch.Tensor) else x
        for x in leaves))


class Plan(nn.Module):
    """A function or module traced into allow-listed ops, run on a worker as one message.

    Subclass it with a ``forward`` (and layers, as any ``nn.Module``), or make one from a
    function with :func:`func2plan`. ``build(*example_args)`` traces it; calling it on pointers
    runs it where they are (building it first if needed); ``send(worker)`` sends the tensors it
    uses from outside (parameters, state) to the worker, ``get()`` brings them back.

    Parameters
    ----------
    fn : callable, optional
        The function of a function plan (``func2plan`` sets it).
    state : sequence of tensors, optional
        Tensors a function plan reads with ``state.read()`` (passed as its last argument).
    name : str, optional
        How errors and ``repr`` name it (default: the function's or class's name).
    """

    def __init__(self, fn: Callable[..., Any] | None = None, state: Sequence[torch.Tensor] | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        self._fn = fn
        self.state = PlanState(state or ()) if state is not None else None
        self.name = name or (getattr(fn, "__name__", None) if fn else type(self).__name__)
        self._traces: dict[tuple[Any, ...], _Trace] = {}

    # --------------------------------------------------------------- tracing
    def forward(self, *args: Any) -> Any:
        if self._fn is None:
            raise NotImplementedError(f"plan {self.name!r}: a Plan subclass defines forward()")
        return self._fn(*args, self.state) if self.state is not None else self._fn(*args)

    @property
    def is_built(self) -> bool:
        """Whether it has been traced (for at least one input signature)."""
        return bool(self._traces)

    def build(self, *args: Any) -> Plan:
        """Trace the plan for arguments like ``args`` (tensors or pointers: only their shapes,
        dtypes and ``requires_grad`` count). Returns the plan."""
        self._trace_for(args)
        return self

    def _trace_for(self, args: tuple[Any, ...]) -> _Trace:
        leaves, spec = pytree.tree_flatten(args)
        key = _signature(leaves)
        found = self._traces.get(key)
        if found is not None:
            return found
        trace = _Trace()
        standins = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                slot = trace.slot()
                trace.inputs.append(slot)
                standins.append(_Traced(trace, slot, x.shape, x.dtype, x.requires_grad))
            else:
                standins.append(x)
        held = [t for _, _, t, _ in module_tensors(self)] + [  # parameters, buffers, state
            t for m in self.modules() if isinstance(m, Plan) and m.state is not None
            for t in m.state.tensors]
        with trace.recording(held):
            result = nn.Module.__call__(self, *pytree.tree_unflatten(standins, spec))
            out_leaves, trace.out_spec = pytree.tree_flatten(result)
            for x in out_leaves:
                if not isinstance(x, torch.Tensor):
                    raise PointerError(f"plan {self.name!r} returns {type(x).__name__}: a plan "
                                       "returns tensors only")
            slots = [trace.ref(x).n for x in out_leaves]
            as_is = [not isinstance(x, _Traced) and id(x) not in trace.alias for x in out_leaves]
        for x, slot, held_as_is in zip(out_leaves, slots, as_is, strict=True):
            if held_as_is:  # its state or a constant, unchanged: the result is a reference of
                slot = trace.record(torch.Tensor.view_as, (x, x), {})._slot  # its own (PySyft:
            trace.out.append(slot)  # a result has an id of its own; .get() of it takes only it)
        self._traces[key] = trace
        return trace

    # --------------------------------------------------------------- running
    def __call__(self, *args: Any) -> Any:
        leaves = pytree.tree_leaves(args)
        if not any(isinstance(x, PointerTensor) for x in leaves):
            return nn.Module.__call__(self, *args)  # local tensors: the function itself, here
        return self._run(self._trace_for(args), leaves)

    def _run(self, trace: _Trace, leaves: list[Any]) -> Any:
        inputs = [x for x in leaves if isinstance(x, torch.Tensor)]
        where = inputs[0].location if isinstance(inputs[0], PointerTensor) else None
        values: dict[int, Any] = {}
        for slot, x in zip(trace.inputs, inputs, strict=True):
            self._check_here(x, where, "an argument")
            values[slot] = x
        for key, (slot, x) in list(trace.outside.items()):
            if not isinstance(x, PointerTensor) and not _is_parameter_of(self, x) and (
                    self.state is None or not any(x is t for t in self.state.tensors)):
                x = x.send(where)  # a constant the plan made: it goes along, once
                trace.outside[key] = (slot, x)
            self._check_here(x, where, "a tensor it uses (a parameter, its state)")
            values[slot] = x
        assert where is not None
        conn = where.session.conn(where)
        with conn.together():  # its ops leave as one message
            for op in trace.ops:
                args, kwargs = pytree.tree_map(
                    lambda a: values[a.n] if isinstance(a, _Slot) else a, (op.args, op.kwargs))
                pointers = [x for x in pytree.tree_leaves((args, kwargs))
                            if isinstance(x, PointerTensor)]
                out = None if op.out is None else [
                    [new_id(), list(shape), dtype_name(dtype), rg] for shape, dtype, rg in op.metas]
                with torch.set_grad_enabled(op.grad):  # (no_grad() in the plan's code)
                    made = _call_async(PointerTensor, op.name, where, args, kwargs, pointers,
                                       out=out, metas=op.metas)
                for slot, ptr in zip(op.out or (), made, strict=True):
                    values[slot] = ptr
        if any(op.name in _GRADS_CHANGED for op in trace.ops):
            grads.bump()  # (what this process knew of gradients there may not hold any more)
        return pytree.tree_unflatten([values[s] for s in trace.out], trace.out_spec)

    def _check_here(self, x: Any, where: Any, what: str) -> None:
        if not isinstance(x, PointerTensor):
            raise LocationMismatch(
                f"plan {self.name!r} runs on worker '{where.id}' (where its arguments are), but "
                f"{what} is here: send the plan there first (plan.send(worker)), and its "
                "arguments too")
        x._check_usable(f"plan {self.name!r}")
        if x.location is not where and x.location.address != where.address:
            raise LocationMismatch(
                f"plan {self.name!r}: {what} is on worker '{x.location.id}', others on "
                f"'{where.id}'; a plan runs on one worker: move them there (or plan.send it)")

    # ------------------------------------------------------------- location
    def send(self, worker: Any) -> Plan:
        """Send a copy of the plan to ``worker`` and return it (PySyft's pointer to the plan):
        the copy's parameters, buffers and state are there, and calling it on pointers to
        ``worker``'s tensors runs it there. This plan stays here, built, and may be sent to
        other workers too."""
        where = self.location
        if where is not None:
            raise PointerError(f"plan {self.name!r} is on worker '{where.id}' already: .get() it "
                               "back first, or send the plan it was sent from")
        traces, self._traces = self._traces, {}
        memo: dict[int, Any] = {}
        try:
            remote = copy.deepcopy(self, memo)
        finally:
            self._traces = traces
        remote._traces = {k: t.rebound(memo) for k, t in traces.items()}
        return remote._send_here(worker)

    def _send_here(self, worker: Any) -> Plan:
        if module_tensors(self):
            module_send(self, worker)
        if self.state is not None:
            self._swap_state([t.send(worker) if not isinstance(t, PointerTensor) else t
                              for t in self.state.tensors])
        self._sent_to = worker
        return self

    def get(self) -> Plan:
        """Bring back what :meth:`send` sent. Returns the plan."""
        if any(isinstance(t, PointerTensor) for _, _, t, _ in module_tensors(self)):
            module_get(self)
        if self.state is not None:
            self._swap_state([t.get() if isinstance(t, PointerTensor) else t
                              for t in self.state.tensors])
        # a trace that took constants along to the worker is dropped (with them), and made
        # again at its next call
        self._traces = {k: t for k, t in self._traces.items()
                        if not any(isinstance(x, PointerTensor) for _, x in t.outside.values())}
        self._sent_to = None
        return self

    def _swap_state(self, new: list[Any]) -> None:
        """The state's tensors are now ``new`` (sent, or fetched): the traces follow."""
        assert self.state is not None
        old = {id(t): n for t, n in zip(self.state.tensors, new, strict=True)}
        self.state.tensors = new
        for trace in self._traces.values():
            for key, (slot, x) in list(trace.outside.items()):
                if key in old and x is not old[key]:
                    del trace.outside[key]
                    trace.outside[id(old[key])] = (slot, old[key])

    @property
    def location(self) -> Any:  # type: ignore[override]
        """The worker the plan was sent to (``None`` while it is here)."""
        for _, _, t, _ in module_tensors(self):
            if isinstance(t, PointerTensor):
                return t.location
        for t in self.state.tensors if self.state is not None else ():
            if isinstance(t, PointerTensor):
                return t.location
        return self._sent_to

    _sent_to: Any = None

    def __repr__(self) -> str:
        where = self.location
        return (f"<Plan {self.name} {'built' if self.is_built else 'not built'}"
                f"{f' on {where.id!r}' if where is not None else ''}>")


_GRADS_CHANGED = GIVE_NONE | {grads.GRAD_SET, "torch.Tensor.retain_grad", "torch.autograd.grad"}


def _is_parameter_of(module: nn.Module, x: Any) -> bool:
    return any(t is x for _, _, t, _ in module_tensors(module))


def func2plan(args_shape: Sequence[Sequence[int]] | None = None,
              state: Sequence[torch.Tensor] | None = None) -> Callable[[Callable[..., Any]], Plan]:
    """Decorator: make a function a :class:`Plan`, built at once for float32 arguments of
    ``args_shape`` (``-1`` stands for any size: built with 1) if given, else at its first call.
    ``state``: tensors the function reads with ``state.read()`` from its last argument."""

    def make(fn: Callable[..., Any]) -> Plan:
        plan = Plan(fn=fn, state=state)
        functools.update_wrapper(plan, fn, updated=())
        if args_shape is not None:
            plan.build(*(torch.zeros([1 if d == -1 else d for d in shape], device="meta")
                         for shape in args_shape))
        return plan

    return make
