"""``TorchHook``: the only module that patches torch.

It gives every ``torch.Tensor`` the PySyft 0.2 methods ``send``, ``get``, ``move``, ``copy``,
``remote_get``, ``fix_precision``/``float_precision`` and ``share`` (:mod:`zmqsyft.client.smpc`),
``tag``/``describe`` and the attributes ``tags`` (a set) and ``description`` (``None`` or a
str), which ``send`` carries to the worker (:mod:`zmqsyft.wire.tags`), every ``nn.Module``
``send``, ``get``, ``move`` and ``copy`` (:mod:`zmqsyft.client.nn`), and every
``torch.utils.data.Dataset`` ``federate`` (:mod:`zmqsyft.client.data`). On a local tensor,
``send(worker)`` (and ``move(worker)``) stores a copy of the
tensor on the worker under a fresh random id and returns an owning pointer; ``get()`` and
``remote_get()`` return the tensor itself and ``copy()`` a clone. Pointers override all five
with their remote meaning (:class:`~zmqsyft.client.pointer.PointerTensor`).
"""

from __future__ import annotations

import gc
import threading
from types import ModuleType
from typing import Any

import torch

from .. import heap, metakernels
from ..config import get_config
from ..errors import PointerError
from ..wire.tags import check_description, check_tags
from .data import dataset_federate
from .fixed import fix_precision, float_precision
from .local import LOCAL_WORKER
from .nn import module_copy, module_get, module_location_property, module_move, module_send
from .pointer import PointerTensor, check_worker
from .smpc import send_tensor as put_tensor
from .smpc import share

__all__ = ["TorchHook", "send_tensor"]

_lock = threading.Lock()
_installed = False


def send_tensor(tensor: torch.Tensor, worker: Any, *more: Any) -> PointerTensor:
    """Store a copy of a local tensor on ``worker``; return the pointer that owns it."""
    check_worker(worker, more, "send")
    return put_tensor(tensor, worker)


def send_inplace(tensor: torch.Tensor, worker: Any, *more: Any) -> torch.Tensor:
    """``tensor.send_(worker)``: send it, and turn ``tensor`` itself into the owning pointer
    (whatever holds it now holds the pointer; ``get_()`` turns it back)."""
    if isinstance(tensor, PointerTensor):
        raise PointerError(f"send_() turns a local tensor into a pointer; {tensor!r} is one "
                           "already: send it on with .send(worker)")
    ptr = send_tensor(tensor, worker, *more)
    ptr._release("send_() made the tensor itself the pointer")
    PointerTensor._become(tensor, worker, ptr.id_at_location)
    return tensor


def get_inplace(tensor: torch.Tensor) -> torch.Tensor:
    """``ptr.get_()``: for a tensor made a pointer by ``send_()``, fetch the data into the same
    object; a local tensor is returned as it is."""
    if not isinstance(tensor, PointerTensor):
        return tensor
    if tensor._restore is None:
        raise PointerError(f"get_() turns back a tensor that send_() made a pointer; {tensor!r} "
                           "was not made so: use x = ptr.get()")
    return tensor._unbecome(tensor.get())


def _get_local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _copy_local(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    for attr in ("_zs_tags", "_zs_description"):  # (PySyft's copies kept them too)
        if attr in tensor.__dict__:
            value = tensor.__dict__[attr]
            out.__dict__[attr] = set(value) if isinstance(value, set) else value
    return out


def _tags(tensor: torch.Tensor) -> set[str]:
    """The tensor's search tags: a set, which ``send`` carries along (checked then)."""
    tags = tensor.__dict__.get("_zs_tags")
    if tags is None:
        tags = tensor.__dict__["_zs_tags"] = set()
    return tags


def _set_tags(tensor: torch.Tensor, tags: Any) -> None:
    tensor.__dict__["_zs_tags"] = set(check_tags(tags or (), "setting .tags"))


def _description(tensor: torch.Tensor) -> str | None:
    """The tensor's description (``None``: none), which ``send`` carries along."""
    return tensor.__dict__.get("_zs_description")


def _set_description(tensor: torch.Tensor, text: str | None) -> None:
    tensor.__dict__["_zs_description"] = (None if text is None
                                          else check_description(text, "setting .description"))


def tag(tensor: torch.Tensor, *tags: str) -> torch.Tensor:
    """Add search tags (``"#radio"``) to the tensor; returns it, for chaining. Sent to a worker,
    a tagged tensor is published there: anyone the worker serves finds it with ``search()``
    and may compute with it (never take, change or delete it)."""
    _tags(tensor).update(check_tags(tags, "tag()", _tags(tensor)))
    return tensor


def describe(tensor: torch.Tensor, description: str) -> torch.Tensor:
    """Set the tensor's description, shown with it in search results; returns the tensor."""
    _set_description(tensor, description)
    return tensor


def _warm_up(freeze_gc: bool) -> None:
    try:
        a = torch.empty(2, 3, device="meta", requires_grad=True)
        ((a + a) @ torch.empty(3, 1, device="meta")).sum()
    except Exception:  # noqa: BLE001 - only a warm-up
        pass
    if freeze_gc:
        gc.freeze()  # the warm-up imported some 120,000 more objects, here for good too


class TorchHook:
    """Install zmqsyft's tensor methods into torch (idempotent).

    Parameters
    ----------
    torch_module : module
        The ``torch`` module, as in PySyft: ``hook = sy.TorchHook(torch)``.
    freeze_gc : bool
        On the first call, move every object alive at that moment (torch's and the other
        imported modules' objects), and again when torch's warm-up in the background has ended
        (within about a second), out of the cyclic garbage collector's reach with
        :func:`gc.freeze`: some 290,000 objects. A full collection then no longer rescans them:
        without it one takes 50-140 ms and comes every few thousand pointer ops, about 14 us per
        op of a pipelined loop. Frozen objects are still freed when their reference count drops; only a
        reference cycle among them is no longer collected. Pass ``False`` to leave the collector
        as it is, or call :func:`gc.unfreeze` later.

    The first call also lets this process's C heap keep up to ``Config.malloc_keep`` bytes of
    freed memory for the next tensors (:mod:`zmqsyft.heap`; ``0``, configured before, leaves
    the C library's defaults).
    """

    def __init__(self, torch_module: ModuleType = torch, *, freeze_gc: bool = True) -> None:
        global _installed
        if torch_module is not torch:
            raise TypeError("TorchHook expects the torch module: sy.TorchHook(torch)")
        self.torch = torch_module
        self.local_worker = LOCAL_WORKER  # (PySyft's hook.local_worker: this program)
        with _lock:
            if not _installed:
                torch.Tensor.send = send_tensor  # type: ignore[attr-defined]
                torch.Tensor.move = send_tensor  # type: ignore[attr-defined]
                torch.Tensor.send_ = send_inplace  # type: ignore[attr-defined]
                torch.Tensor.get_ = get_inplace  # type: ignore[attr-defined]
                torch.Tensor.get = _get_local  # type: ignore[attr-defined]
                torch.Tensor.remote_get = _get_local  # type: ignore[attr-defined]
                torch.Tensor.copy = _copy_local  # type: ignore[attr-defined]
                # fixed precision and secret sharing (PySyft's names, short forms too)
                torch.Tensor.fix_precision = fix_precision  # type: ignore[attr-defined]
                torch.Tensor.fix_prec = fix_precision  # type: ignore[attr-defined]
                torch.Tensor.float_precision = float_precision  # type: ignore[attr-defined]
                torch.Tensor.float_prec = float_precision  # type: ignore[attr-defined]
                torch.Tensor.share = share  # type: ignore[attr-defined]
                # search tags and a description (PySyft's names)
                torch.Tensor.tag = tag  # type: ignore[attr-defined]
                torch.Tensor.describe = describe  # type: ignore[attr-defined]
                torch.Tensor.tags = property(_tags, _set_tags)  # type: ignore[attr-defined]
                torch.Tensor.description = property(  # type: ignore[attr-defined]
                    _description, _set_description)
                torch.nn.Module.send = module_send  # type: ignore[attr-defined]
                torch.nn.Module.get = module_get  # type: ignore[attr-defined]
                torch.nn.Module.move = module_move  # type: ignore[attr-defined]
                torch.nn.Module.copy = module_copy  # type: ignore[attr-defined]
                torch.nn.Module.location = module_location_property  # type: ignore[attr-defined]
                # PySyft's dataset.federate((bob, alice)) on any torch dataset
                torch.utils.data.Dataset.federate = dataset_federate  # type: ignore[attr-defined]
                _installed = True
                # torch's elementwise meta kernels need no torch._dynamo (0.75 s, 70 MiB): told
                # here, before the freeze hides the objects the scan looks for (about 30 ms)
                metakernels.spare_dynamo()
                # freed tensors' pages are used again (Config.malloc_keep): a model's deep copy
                # per data owner and round, a fetched average, cost new pages otherwise
                heap.keep_freed(get_config().malloc_keep)
                if freeze_gc:
                    gc.freeze()
                # the first shape inference on meta tensors imports a large part of torch (about
                # a second); do it now, in the background, while workers start up. Not a daemon:
                # a daemon thread still inside torch when the interpreter shuts down aborts the
                # process ("terminate called without an active exception", exit status 134),
                # so a script that ends within a second of TorchHook would crash
                threading.Thread(target=_warm_up, args=(freeze_gc,), name="zmqsyft-warm-up").start()

    def __repr__(self) -> str:
        return "<zmqsyft.TorchHook>"
