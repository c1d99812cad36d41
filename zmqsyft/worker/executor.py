"""Runs allow-listed operations on a worker's local objects.

The worker decides *where* an op runs (here, or relayed to the next hop of a pointer chain);
this module only runs it here: resolve argument references through the store, call the op under
the caller's grad mode, and hand back the result's tensors in the flattened order the caller
allocated ids for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import allowlist
from ..errors import ProtocolError, SerializationError
from ..wire.messages import ObjRef
from ..wire.tensors import DTYPES

__all__ = ["refs_in", "substitute", "run", "result_tensors", "check_outputs", "check_keepable"]

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_WIRE_DTYPES = frozenset(DTYPES.values())


def _flat_call(tree: Any) -> bool:
    """Whether ``tree`` is ``(args, kwargs)`` with no container among the arguments."""
    if not (isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[0], (list, tuple))
            and isinstance(tree[1], dict)):
        return False
    for a in tree[0]:
        if isinstance(a, (list, tuple, dict)):
            return False
    for a in tree[1].values():
        if isinstance(a, (list, tuple, dict)):
            return False
    return True


def refs_in(tree: Any) -> list[ObjRef]:
    """All object references in an argument structure."""
    if _flat_call(tree):
        return [a for a in (*tree[0], *tree[1].values()) if isinstance(a, ObjRef)]
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, ObjRef)]


def substitute(tree: Any, fn: Callable[[ObjRef], Any]) -> Any:
    """Replace every object reference in ``tree`` by ``fn(ref)``."""
    if _flat_call(tree):
        args, kwargs = tree
        return ([fn(a) if isinstance(a, ObjRef) else a for a in args],
                {k: fn(v) if isinstance(v, ObjRef) else v for k, v in kwargs.items()})
    return pytree.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, ObjRef) else leaf, tree)


def run(name: str, args: Any, kwargs: Any, grad: bool,
        func: Callable[..., Any] | None = None) -> Any:
    """Run the allow-listed op ``name`` (``func``, if already looked up) on resolved arguments."""
    if func is None:
        func = allowlist.lookup(name)
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise ProtocolError("CALL args must be a list and kwargs a map")
    if kwargs and not all(isinstance(k, str) for k in kwargs):
        raise ProtocolError("CALL kwargs keys must be strings")
    grad = bool(grad)
    if torch.is_grad_enabled() is grad:
        return func(*args, **kwargs)
    with torch.set_grad_enabled(grad):
        return func(*args, **kwargs)


def result_tensors(result: Any) -> list[torch.Tensor]:
    """The tensors of a result, in the flattened order both sides agree on."""
    if type(result) is torch.Tensor or type(result) is torch.nn.Parameter:
        return [result]
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def check_keepable(name: str, tensors: list[torch.Tensor]) -> None:
    """Refuse, before anything is stored, results a worker does not keep: only dense (strided)
    CPU tensors of the dtypes the wire carries, so that whatever one caller stores can be sent,
    fetched and listed by every caller."""
    for t in tensors:
        if type(t) in _PLAIN_TENSORS and t.layout is _STRIDED and t.is_cpu \
                and t.dtype in _WIRE_DTYPES and not t.is_quantized:
            continue
        what = (t.layout if t.layout is not _STRIDED else "quantized" if t.is_quantized
                else t.dtype if t.dtype not in _WIRE_DTYPES else t.device
                if t.device.type != "cpu" else type(t).__name__)
        raise SerializationError(
            f"{name} produced a tensor this worker does not keep ({what}): results must be dense "
            f"CPU tensors of the dtypes the wire carries ({', '.join(DTYPES)}); nothing was stored")


def check_outputs(name: str, tensors: list[torch.Tensor], out: list[Any]) -> None:
    """Check that an op produced the tensors the caller allocated ids for, of a kind kept here."""
    if len(tensors) != len(out):
        raise RuntimeError(
            f"{name} produced {len(tensors)} tensors where {len(out)} were expected"
        )
    check_keepable(name, tensors)
    for t, spec in zip(tensors, out, strict=True):
        shape = tuple(spec[1])
        if t.shape != shape:  # (a torch.Size is a tuple)
            raise RuntimeError(
                f"{name} produced a tensor of shape {tuple(t.shape)} where {shape} was inferred"
            )
