"""The fixed table of operations a worker will run for a peer.

A CALL names its operation by a dotted name such as ``torch.add``, ``torch.Tensor.sum``,
``torch.Tensor.__add__`` or ``torch.nn.functional.relu``. The worker resolves it **only** through
:data:`ALLOWED` (name → callable), built once at import from torch's own list of overridable
functions (``torch.overrides.get_overridable_functions``): torch functions, tensor methods,
``torch.nn.functional``, ``torch.linalg``/``fft``/``special``, and the operator dunders listed in
:data:`OPERATORS`. Nothing from the wire ever reaches ``getattr``. Excluded: any name with a
private (``_``) component other than the operators, and :data:`DENIED` (raw memory, storage,
hooks that take callables, pickling, numpy/dlpack export and similar).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.overrides

from .errors import OpNotAllowed

__all__ = ["ALLOWED", "OPERATORS", "DENIED", "LOCAL_META", "name_of", "lookup", "is_inplace",
           "returns_none"]

_BIN = ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
        "lshift", "rshift", "div")
OPERATORS: frozenset[str] = frozenset(
    [f"__{op}__" for op in _BIN]
    + [f"__r{op}__" for op in _BIN]
    + [f"__i{op}__" for op in _BIN]
    + ["__neg__", "__pos__", "__abs__", "__invert__", "__eq__", "__ne__", "__lt__", "__le__",
       "__gt__", "__ge__", "__getitem__", "__setitem__", "__len__", "__bool__", "__float__",
       "__int__", "__index__", "__complex__", "__contains__", "__reversed__", "__long__",
       "__nonzero__"]
)

DENIED: frozenset[str] = frozenset(
    "torch.Tensor." + n
    for n in (
        "storage", "untyped_storage", "storage_type", "data_ptr", "const_data_ptr",
        "share_memory_", "is_shared", "pin_memory", "is_pinned", "numpy", "apply_", "map_",
        "map2_", "register_hook", "register_post_accumulate_grad_hook", "module_load",
        "__reduce_ex__", "__setstate__", "__deepcopy__", "__dlpack__", "__dlpack_device__",
        "__array__", "__array_wrap__", "__format__", "__repr__", "tofile", "cuda", "ipu", "xpu",
        "mps", "mtia", "hpu", "to_mkldnn", "__cuda_array_interface__.__get__", "name.__get__",
        "volatile.__get__", "output_nr.__get__", "grad_fn.__get__", "pin_memory",
    )
)

# metadata the client knows without asking the worker (it keeps shape and dtype locally)
LOCAL_META: frozenset[str] = frozenset(
    "torch.Tensor." + n
    for n in (
        "shape.__get__", "dtype.__get__", "ndim.__get__", "requires_grad.__get__",
        "is_leaf.__get__", "layout.__get__", "itemsize.__get__", "nbytes.__get__", "size", "dim",
        "numel", "nelement", "ndimension", "element_size", "is_floating_point", "is_complex",
        "is_signed", "__len__", "is_cpu.__get__", "is_cuda.__get__", "is_sparse.__get__",
        "is_quantized.__get__", "is_nested.__get__", "is_mkldnn.__get__", "is_meta.__get__",
        "retains_grad.__get__", "get_device",
    )
) | {"torch.is_complex", "torch.is_floating_point", "torch.numel"}


def _private(name: str) -> bool:
    parts = name.split(".")
    for part in parts[1:]:
        if part.startswith("_") and part not in OPERATORS and part not in ("__get__",):
            return True
    return False


def _build() -> tuple[dict[str, Callable[..., Any]], dict[Any, str]]:
    allowed: dict[str, Callable[..., Any]] = {}
    names: dict[Any, str] = {}
    for funcs in torch.overrides.get_overridable_functions().values():
        for func in funcs:
            name = torch.overrides.resolve_name(func)
            if not name or name in DENIED or _private(name):
                continue
            allowed[name] = func
            names[func] = name
    return allowed, names


ALLOWED, _NAMES = _build()

# attribute setters torch routes through __torch_function__ (optimisers set p.grad = None)
for _attr in ("grad", "requires_grad", "data"):
    _setter = getattr(torch.Tensor, _attr).__set__
    ALLOWED[f"torch.Tensor.{_attr}.__set__"] = _setter
    _NAMES[_setter] = f"torch.Tensor.{_attr}.__set__"


def name_of(func: Callable[..., Any]) -> str | None:
    """The allow-list name of a torch callable, or ``None`` if it is not allow-listed."""
    try:
        name = _NAMES.get(func)
    except TypeError:  # unhashable
        return None
    if name is None:
        name = torch.overrides.resolve_name(func)
        if name not in ALLOWED:
            return None
        try:
            _NAMES[func] = name
        except TypeError:
            pass
    return name


def lookup(name: Any) -> Callable[..., Any]:
    """Resolve an op name from the wire; raise ``OpNotAllowed`` for anything outside the table."""
    func = ALLOWED.get(name) if isinstance(name, str) else None
    if func is None:
        raise OpNotAllowed(
            f"operation {name!r} is not in zmqsyft's allow-list of remotely executable operations "
            "(torch functions, tensor methods and operators); nothing was run"
        )
    return func


def returns_none(name: str) -> bool:
    """Whether an in-place op returns ``None`` rather than the tensor it modified."""
    return name.endswith(("__setitem__", "__set__"))


@functools.lru_cache(maxsize=8192)
def is_inplace(name: str) -> bool:
    """Whether an op mutates its first argument and returns it (``add_``, ``__iadd__``, ...)."""
    short = name.rsplit(".", 1)[-1]
    if short.startswith("__i") and short.endswith("__") and short[3:-2] in _BIN:
        return True
    if short in ("__setitem__", "__set__"):
        return True
    return short.endswith("_") and not short.startswith("_") and name.startswith("torch.Tensor.")
