"""The fixed, REVIEWED table of operations a worker will run for a peer.

A CALL names its operation by a dotted name such as ``torch.add``, ``torch.Tensor.sum``,
``torch.Tensor.__add__`` or ``torch.nn.functional.relu``. The worker resolves it **only** through
:data:`ALLOWED` (name → callable). Nothing from the wire ever reaches ``getattr``.

The review rule
---------------
:data:`ALLOWED` is not "everything torch offers minus a deny-list"; it is the list a person
reviewed, kept in the repository next to this module:

* ``allowlist.txt``: the names allowed. Dense, strided CPU math only: arithmetic, comparisons,
  reductions, shape and indexing ops (views of a dense tensor the caller owns are fine), casts
  among the wire dtypes, ``torch.nn.functional``, linalg/fft/special, autograd (``backward``,
  ``.grad``), the optimisers' in-place ops, the operator dunders and the attribute getters and
  setters the client needs (``.grad``, ``.requires_grad``, ``.data``).
* ``allowlist_refused.txt``: the names reviewed and refused, under the reason. Nothing that
  changes layout away from dense strided (sparse, quantized, mkldnn, nested), exposes or aliases
  storage (``set_``, ``as_strided``, ``resize_``, ``indices``, ``values``, ``storage``,
  ``data_ptr`` ...), returns uninitialised memory (``empty_like``, ``resize_``: the bytes a freed
  tensor, maybe another client's, left behind), moves data off the CPU, or takes callables.

The table is built once at import: torch's own list of overridable functions
(``torch.overrides.get_overridable_functions``) maps each ``resolve_name(func)`` to ``func``, and
only the names in ``allowlist.txt`` are kept. So a name the reviewed file has but this torch lacks
is simply absent (logged at debug), and a name this torch has that is in neither file, such as a
new torch version's addition, is refused until someone reviews it. ``tests/test_allowlist.py``
checks that every name torch offers is in exactly one of the two files.

The few ops that could still leave dense strided CPU memory through their arguments (``to``,
``type`` and the ``*_like`` factories, e.g. ``device="meta"``) have their result checked.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import torch
import torch.overrides

from . import secret
from .errors import OpNotAllowed

__all__ = ["ALLOWED", "OWN", "OPERATORS", "DENIED", "LOCAL_META", "REVIEWED", "name_of", "lookup",
           "is_inplace", "returns_none", "offered", "parse_reviewed", "build"]

log = logging.getLogger(__name__)

ALLOWED_FILE = "allowlist.txt"
REFUSED_FILE = "allowlist_refused.txt"

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

# ops whose arguments can pick a device (``x.to("meta")``, ``zeros_like(x, device=...)``):
# their result must still be a dense, strided CPU tensor, or the call is refused
CHECKED_RESULT: frozenset[str] = frozenset(
    {"torch.Tensor.to", "torch.Tensor.type", "torch.zeros_like", "torch.ones_like",
     "torch.full_like"})

_NAME = re.compile(r"torch(\.[A-Za-z_][A-Za-z0-9_]*)+")


def parse_reviewed(text: str) -> list[str]:
    """The op names of a reviewed file: one a line; blank lines and ``#`` comments are ignored.

    A line that is not a dotted ``torch.`` name is an error (a broken review must not load)."""
    names = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _NAME.fullmatch(line):
            raise ValueError(f"reviewed allow-list line {number}: {line!r} is not a torch name")
        names.append(line)
    return names


def _read(filename: str) -> list[str]:
    return parse_reviewed(resources.files(__package__ or "zmqsyft").joinpath(filename)
                          .read_text(encoding="utf-8"))


def offered() -> dict[str, Callable[..., Any]]:
    """Every name torch offers under this version (``resolve_name(func)`` → ``func``): the names
    a reviewer must have looked at. Attribute setters are not in torch's list; they are reachable
    only as ``<property>.__set__`` of an offered ``<property>.__get__`` (see :func:`build`)."""
    table: dict[str, Callable[..., Any]] = {}
    for funcs in torch.overrides.get_overridable_functions().values():
        for func in funcs:
            name = torch.overrides.resolve_name(func)
            if name:
                table.setdefault(name, func)
    return table


def _setter(name: str, torch_offers: dict[str, Callable[..., Any]]) -> Callable[..., Any] | None:
    """``torch.Tensor.grad.__set__`` → the setter of the descriptor whose offered ``__get__`` is
    ``torch.Tensor.grad.__get__`` (no name lookup: the descriptor is the getter's ``__self__``)."""
    if not name.endswith(".__set__"):
        return None
    getter = torch_offers.get(name[: -len("__set__")] + "__get__")
    descriptor = getattr(getter, "__self__", None)
    return getattr(descriptor, "__set__", None) if descriptor is not None else None


def _dense_cpu(result: Any, device: str = "cpu") -> bool:
    tensors = result if isinstance(result, (list, tuple)) else (result,)
    return all(not isinstance(t, torch.Tensor)
               or (t.layout is torch.strided and t.device.type == device and not t.is_quantized
                   and not t.is_nested)
               for t in tensors)


def _checked(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        # a worker estimates an op's cost on meta tensors (it never stores one): meta stays meta
        device = "meta" if args and isinstance(args[0], torch.Tensor) and args[0].is_meta \
            else "cpu"
        if not _dense_cpu(result, device):
            raise OpNotAllowed(f"{name}: the result would not be a dense, strided CPU tensor; "
                               "zmqsyft keeps only those, the result was dropped")
        return result
    return run


def build(allowed_names: Iterable[str], torch_offers: dict[str, Callable[..., Any]],
          ) -> tuple[dict[str, Callable[..., Any]], dict[Any, str]]:
    """The table (name → callable) and its inverse (callable → name) for the reviewed names.

    Only names that ``torch_offers`` has (or setters of its properties) are kept: a reviewed name
    this torch lacks is skipped, and a name torch offers that was not reviewed is not allowed."""
    allowed: dict[str, Callable[..., Any]] = {}
    names: dict[Any, str] = {}
    for name in allowed_names:
        func = torch_offers.get(name) or _setter(name, torch_offers)
        if func is None:
            log.debug("reviewed op %s does not exist in torch %s; not allowed", name,
                      torch.__version__)
            continue
        allowed[name] = _checked(name, func) if name in CHECKED_RESULT else func
        try:
            names[func] = name
        except TypeError:  # unhashable: found by name_of's resolve_name fallback
            pass
    return allowed, names


#: the reviewed names, as read from the two files (allowed, refused)
REVIEWED: tuple[tuple[str, ...], tuple[str, ...]] = (tuple(_read(ALLOWED_FILE)),
                                                     tuple(_read(REFUSED_FILE)))
#: names reviewed and refused (never in :data:`ALLOWED`)
DENIED: frozenset[str] = frozenset(REVIEWED[1])
ALLOWED, _NAMES = build((n for n in REVIEWED[0] if n not in DENIED), offered())


#: zmqsyft's own operations (secret sharing, :mod:`zmqsyft.secret`), by name
OWN: dict[str, Callable[..., Any]] = dict(secret.OPS)


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
    func = (ALLOWED.get(name) or OWN.get(name)) if isinstance(name, str) else None
    if func is None:
        shown = repr(name) if len(repr(name)) <= 200 else repr(name)[:197] + "..."
        raise OpNotAllowed(
            f"operation {shown} is not in zmqsyft's reviewed allow-list of remotely executable "
            "operations (dense CPU torch math, tensor methods and operators); nothing was run"
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
