"""What this process knows about remote gradients, so that training needs no round trips.

An optimiser reads ``p.grad`` for every parameter in ``zero_grad()`` and again in ``step()``,
and ``loss.backward()`` returns nothing; asked of the worker, each is a round trip, and a
training step of a six-tensor model makes thirteen of them. Yet which parameters a backward
reaches is known here: a pointer made by a pipelined op records the leaves that require grad
among its inputs' (:attr:`PointerTensor._anc`, a set of weak references), a leaf records itself.
So:

* ``loss.backward()`` on a pointer whose leaves are known is pipelined, and marks those leaves
  as having a gradient (of their own shape and dtype: what autograd accumulates into a leaf);
* ``p.grad`` of a pointer whose state is known is answered here: ``None``, or a pointer to the
  gradient under an id chosen here (one pipelined request, the same pointer until the gradient
  may have been replaced: by a backward, or by setting ``p.grad``);
* ``p.grad = None`` (``zero_grad``) is pipelined as before, and marks the state known.

Whatever this process cannot follow makes the knowledge stale: a pointer made synchronously has
unknown leaves, a backward through it, a ``retain_grad()``, a function run on a worker
(``worker.run``), runs synchronously and moves the global :data:`epoch` on, after which every
state is asked of the worker once more (and known again from its answer). A state is
``(epoch, has_grad)``; it holds while ``epoch`` is the current one.

If a prediction is wrong all the same (a gradient a backward did not reach after all), the
worker refuses the pipelined read, and using its result raises, with what happened; it never
gives a wrong value.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["GRAD_GET", "GRAD_SET", "BACKWARD", "epoch", "bump", "known", "set_known", "leaf",
           "inputs_of", "reached", "after_sync"]

GRAD_GET = "torch.Tensor.grad.__get__"
GRAD_SET = "torch.Tensor.grad.__set__"
BACKWARD = "torch.Tensor.backward"

# synchronous calls after which no gradient state is trusted (they may have changed any)
_STALE_AFTER = frozenset({BACKWARD, "torch.autograd.backward", "torch.Tensor.retain_grad",
                          GRAD_SET, "torch.autograd.grad"})

_epoch = [0]


def epoch() -> int:
    """The current epoch: states recorded in an earlier one are not trusted."""
    return _epoch[0]


def bump() -> None:
    """Forget every gradient state (something this process did not follow may have changed
    them)."""
    _epoch[0] += 1


def known(p: Any) -> bool | None:
    """Whether pointer ``p`` has a gradient on its worker, or None if this process does not
    know."""
    state = p._gk
    if state is None or state[0] != _epoch[0]:
        return None
    return state[1]


def set_known(p: Any, has_grad: bool, grad_ptr: Any = None) -> None:
    p._gk = (_epoch[0], has_grad)
    p._gptr = grad_ptr


def leaf(p: Any) -> None:
    """``p`` is a leaf that requires grad: a backward through its results reaches it."""
    p._anc = frozenset((weakref.ref(p),))


def inputs_of(pointers: list[Any]) -> frozenset[Any] | None:
    """The leaves a result computed from ``pointers`` leads back to, or None if unknown."""
    found: frozenset[Any] | None = None
    for p in pointers:
        if not p._rg:
            continue
        anc = p._anc
        if anc is None:
            return None
        found = anc if found is None or found is anc else found | anc
    return found if found is not None else frozenset()


def reached(loss: Any) -> None:
    """A pipelined ``loss.backward()`` was sent: the leaves it reaches now have gradients
    (which it may have replaced: pointers to the earlier ones are not reused)."""
    now = _epoch[0]
    for ref in loss._anc:
        p = ref()
        if p is not None:
            p._gk = (now, True)
            p._gptr = None


def after_sync(name: str, pointers: list[Any], result: Any) -> None:
    """Bring the states up to date after a synchronous call ``name``."""
    if name in _STALE_AFTER:
        bump()
    elif name == GRAD_GET and pointers:
        set_known(pointers[0], result is not None, result)
