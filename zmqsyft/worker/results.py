"""Large op results computed straight into shared memory, so that they leave without a copy.

A tensor that arrived through shared memory can be moved to a same-host worker, or fetched by a
same-host client, by handing over its segment (:func:`zmqsyft.wire.shm.take_over`): no byte is
copied. A tensor computed here (an update, an average, ``x * 2``) lives in ordinary memory, and
leaving costs a copy into a new segment: 100 MiB took ~60 ms, forty times the hand-over. So an
op whose one result is a large new tensor (``Config.shm_threshold`` bytes or more, its shape and
dtype known beforehand from the meta inference the cost check already ran) is run with ``out=``
a tensor over a fresh, already unlinked segment (:func:`zmqsyft.wire.shm.fresh`): the result is
made where it can be handed over, at no cost to the op (its pages are written once either way).

An op whose large results are freed here, never fetched or moved (``torch.stack`` feeding a
``mean``), gains nothing from that and pays for it: a fresh segment's pages are new memory for
the kernel to clear (on a 2-vCPU VM, 7 ms for 8 MiB, against 0.2 ms into ordinary memory, whose
pages the allocator reuses). So the last large results of each op and shape are counted: once
``STAYED_LIMIT`` of them in a row were freed here, the next ones go to ordinary memory, until
one of them leaves again (at the cost of the one copy that leaving takes then).

Only where it pays and is safe: when a caller on this machine uses shared memory with this
worker (a worker with only remote callers keeps ordinary memory), for ops whose torch function
takes ``out=`` (learned once per op: one that refuses ``out=`` is never tried again), never for
autograd results, views, in-place ops or several results, and never when ``/dev/shm`` has no
room (its pages are reserved first; the op then runs as always).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..wire import shm
from ..wire.tensors import tensor_over_segment
from . import executor
from .context import Services
from .costs import Cost

__all__ = ["run", "keep", "bury", "drain", "settle", "leaving", "freed", "STAYED_LIMIT"]

STAYED_LIMIT = 3  # an op's large results freed here in a row: its next ones are not shared
_MADE_MAX = 4096  # large results remembered (their address: the op that made them)
_made: dict[int, tuple[str, Any]] = {}
_stayed: dict[tuple[str, Any], int] = {}  # (op, shape) -> its latest large results freed here,
# in a row (the same computation repeated: a training round's)

# operators whose torch function (with ``out=``) computes what they compute
_OPERATORS = {"__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "div",
              "__matmul__": "matmul", "__pow__": "pow", "__div__": "div"}
_NO_OUT: set[str] = set()  # ops seen to refuse out=
_graveyard: list[Any] = []  # freed once this loop turn's replies are out
_graves: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
_digger: threading.Thread | None = None
_pending = [0]  # lists handed to the thread and not yet freed
_freed = threading.Condition()


def _out_form(name: str) -> Callable[..., Any] | None:
    """The torch function that computes op ``name`` with ``out=`` (``torch.add`` for
    ``torch.Tensor.__add__``, ``torch.Tensor.add`` and ``torch.add``), or None."""
    if name in _NO_OUT:
        return None
    head, _, attr = name.rpartition(".")
    if head == "torch.Tensor":
        attr = _OPERATORS.get(attr, attr)
    elif head != "torch":
        return None
    if attr.startswith("_") or attr.endswith("_"):  # private, dunder, in place
        return None
    func = getattr(torch, attr, None)
    return func if callable(func) and not isinstance(func, type) else None


def run(w: Services, name: str, func: Callable[..., Any], args: Any, kwargs: Any, grad: bool,
        cost: Cost) -> Any:
    """:func:`zmqsyft.worker.executor.run`, with a large single result computed into shared
    memory where that helps (see the module's docstring); the same result either way."""
    spec = cost.result
    if spec is None or spec[2] < (limit := w.cfg.shm_threshold) or not limit \
            or not w.shm_callers or "out" in kwargs:
        return executor.run(name, args, kwargs, grad, func)
    shape, dtype, nbytes = spec
    key = (name, shape)
    target = _out_form(name) if _stayed.get(key, 0) < STAYED_LIMIT else None
    mapped = shm.fresh(nbytes) if target is not None else None
    if mapped is None:
        return _made_by(executor.run(name, args, kwargs, grad, func), key)
    out = tensor_over_segment(mapped, dtype, shape)
    try:
        result = executor.run(name, args, {**kwargs, "out": out}, grad, target)
    except (TypeError, RuntimeError) as exc:  # no out= form after all: as always, from now on
        if "'out'" in str(exc) or "out=" in str(exc):
            _NO_OUT.add(name)
        return _made_by(executor.run(name, args, kwargs, grad, func), key)
    return _made_by(result, key)


def _made_by(result: Any, key: tuple[str, Any]) -> Any:
    if type(result) is torch.Tensor:
        if len(_made) >= _MADE_MAX:  # (results that went some other way: forgotten)
            _made.clear()
        _made[result.data_ptr()] = key
    return result


def leaving(obj: Any) -> None:
    """``obj`` leaves this worker (fetched or moved): the op that made it, if it is a large
    result, has its results computed into shared memory (again)."""
    if _made and type(obj) is torch.Tensor:
        key = _made.pop(obj.data_ptr(), None)
        if key is not None:
            _stayed.pop(key, None)


def freed(obj: Any) -> None:
    """``obj`` (a large tensor) is freed here: if an op made it, that op's results count one
    more freed without leaving."""
    if _made and type(obj) is torch.Tensor:
        key = _made.pop(obj.data_ptr(), None)
        if key is not None:
            _stayed[key] = _stayed.get(key, 0) + 1


def keep(obj: Any) -> None:
    """Keep ``obj`` (a tensor a move gave away, or a large one deleted) until this loop turn's
    replies are out; :func:`bury` then frees it."""
    _graveyard.append(obj)


def bury() -> None:
    """Free what :func:`keep` kept, in a thread of its own. Unmapping a 100 MiB tensor computed
    into shared memory takes ~20 ms (its page tables are torn down) with the GIL released: the
    worker goes on serving meanwhile instead of making its next caller wait."""
    global _digger
    if not _graveyard:
        return
    if _digger is None or not _digger.is_alive():  # (none yet, or a forked child)
        _digger = threading.Thread(target=_dig, name="zmqsyft-free", daemon=True)
        _digger.start()
    with _freed:
        _pending[0] += 1
    _graves.put(_graveyard[:])
    _graveyard.clear()


def drain(timeout: float = 10.0) -> None:
    """Free everything kept or being freed before returning: a ``sync()`` or ``stats()`` that
    follows a delete or a move sees the memory gone, as it would without the thread."""
    bury()
    with _freed:
        _freed.wait_for(lambda: _pending[0] == 0, timeout)


def settle(timeout: float = 10.0) -> None:
    """Free what is still waiting and stop the thread (a worker closing: nothing may be freed in
    a thread while the interpreter shuts down, torch would abort the process)."""
    global _digger
    drain(timeout)
    digger, _digger = _digger, None
    if digger is not None and digger.is_alive():
        _graves.put(None)
        digger.join(timeout)


def _dig() -> None:
    while (graves := _graves.get()) is not None:
        graves.clear()  # (freed here, in this thread)
        del graves
        with _freed:
            _pending[0] -= 1
            _freed.notify_all()
