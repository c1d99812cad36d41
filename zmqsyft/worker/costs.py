"""What an op will cost, known before it runs: the bytes of its results and its arithmetic.

A worker is single-threaded and its memory is shared by every caller, so an 80-byte request must
neither make it allocate gigabytes nor keep it computing for minutes. Before an op runs,
:func:`estimate` runs it on storage-less ``meta`` tensors of its arguments' shapes (nothing is
computed, nothing allocated) under a dispatch mode that adds up the floating-point operations of
the kernels the op reaches: matrix products, convolutions and attention by torch's own formulas
(``torch.utils.flop_counter``), decompositions, solves and distance matrices by ours below,
weighted by how long they take next to a matrix product of the same size (measured: an SVD of an
n x n matrix takes about as long as 40 n^3 flops of matrix product). Both numbers are cached by
op and argument signature: an op in a training loop meets the same shapes again and again.

Some ops' result shapes depend on their data (``bincount``, ``one_hot``, ``nonzero``, ...) or
have no meta kernel. For those, a rule in :data:`_RULES` bounds the result from the data itself
(a maximum, a count: one pass over the input, far cheaper than the op), and anything else is
bounded by its largest argument at 16 bytes an element.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from .. import allowlist

__all__ = ["Cost", "estimate", "warm_up"]


class Cost(NamedTuple):
    """An op's estimated cost: the bytes it makes (its results', or its intermediates' if those
    take more) and its floating-point operations.

    ``exact``: the bytes were inferred from the op itself on meta tensors (else they are a
    bound from a rule, and what the op made is checked again once it has run).
    """

    nbytes: int
    flops: int
    exact: bool
    result: tuple[tuple[int, ...], torch.dtype, int] | None = None
    """The shape, dtype and bytes of the op's one result when it is a single new contiguous
    tensor that needs no autograd (it may then be computed into memory chosen beforehand)."""


_FREE = Cost(0, 0, True)
_UNKNOWN = object()  # cached: no meta inference for this op and signature; the rules decide
_CACHE: dict[Any, Any] = {}
_CACHE_MAX = 4096
_SIG_SCALARS = (bool, int, float, complex, str, type(None), torch.dtype)
# in-place ops that compute more than they touch; every other in-place op costs what it touches
_INPLACE_WORK = frozenset({"addmm_", "addbmm_", "baddbmm_", "addmv_", "__imatmul__"})


# --------------------------------------------------------------------------- flop formulas
def _cubic(shape: tuple[int, ...]) -> int:
    """``batch * m * n * min(m, n)``: the order of a decomposition of an m x n matrix."""
    if len(shape) < 2:
        return 0
    *batch, m, n = shape
    return math.prod(batch) * m * n * min(m, n)


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _decomposition(weight: int) -> Callable[[Any, Any, Any], int]:
    def formula(args: Any, kwargs: Any, out: Any) -> int:
        return weight * sum(_cubic(tuple(t.shape)) for t in _tensors((args, kwargs)))
    return formula


def _dot(args: Any, kwargs: Any, out: Any) -> int:
    return 2 * args[0].numel()


def _mv(args: Any, kwargs: Any, out: Any) -> int:
    return 2 * max(t.numel() for t in _tensors(args) if t.dim() == 2)


def _addbmm(args: Any, kwargs: Any, out: Any) -> int:  # (b, n, m) @ (b, m, p), summed over b
    b1, b2 = args[1], args[2]
    return 2 * b1.numel() * b2.shape[-1] if b1.dim() == 3 and b2.dim() == 3 else 0


def _distances(args: Any, kwargs: Any, out: Any) -> int:
    x1, x2 = args[0], args[1]
    return 3 * out.numel() * x1.shape[-1] if x1.dim() and x2.dim() else 0


def _pdist(args: Any, kwargs: Any, out: Any) -> int:
    return 3 * out.numel() * args[0].shape[-1] if args[0].dim() == 2 else 0


_OURS: dict[str, Callable[[Any, Any, Any], int]] = {
    **dict.fromkeys(["_linalg_svd", "linalg_eig", "_linalg_eigh", "linalg_matrix_exp",
                     "linalg_pinv"], _decomposition(40)),
    **dict.fromkeys(["linalg_qr", "linalg_inv_ex", "_linalg_det", "_linalg_slogdet", "cholesky",
                     "linalg_cholesky_ex", "linalg_lu_solve", "triangular_solve",
                     "linalg_solve_triangular", "cholesky_solve", "cholesky_inverse",
                     "linalg_lu_factor_ex", "linalg_lu", "_linalg_solve_ex",
                     "linalg_ldl_factor_ex", "linalg_ldl_solve", "linalg_householder_product",
                     "ormqr", "geqrf", "linalg_lstsq"], _decomposition(8)),
    "dot": _dot, "vdot": _dot, "mv": _mv, "addmv": _mv, "addmv_": _mv, "addbmm": _addbmm,
    "addbmm_": _addbmm,
    "_euclidean_dist": _distances, "_cdist_forward": _distances, "_pdist_forward": _pdist,
}


def _formulas() -> dict[Any, Callable[[Any, Any, Any], int]]:
    table: dict[Any, Callable[[Any, Any, Any], int]] = {}
    for packet, counted in flop_counter.flop_registry.items():
        table[packet] = lambda a, k, o, counted=counted: int(counted(*a, **k, out_val=o))
        inplace = getattr(torch.ops.aten, str(packet).rsplit(".", 1)[-1] + "_", None)
        if inplace is not None:  # addmm_, baddbmm_: the same arithmetic as addmm, baddbmm
            table[inplace] = table[packet]
    for name, formula in _OURS.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            table[packet] = formula
    return table


_FORMULAS = _formulas()


class _Counting(TorchDispatchMode):
    """Adds up the flops of the kernels an op reaches (on meta tensors: none of them runs), and
    the bytes of every tensor they make that is not a view (a bound on the op's peak memory:
    a composite op's intermediates count too)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.made = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = _FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(args, kwargs, out)
        if not func.is_view:
            self.made += sum(t.numel() * t.element_size() for t in _tensors(out))
        return out


# ------------------------------------------------------------------------------ estimate
class _NoSig(Exception):
    pass


def _sig(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.requires_grad)
    if isinstance(x, _SIG_SCALARS):
        return (type(x), x)
    if isinstance(x, (tuple, list)) and len(x) <= 8:
        return (type(x), tuple(_sig(e) for e in x))
    raise _NoSig


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        t = torch.empty(x.shape, dtype=x.dtype, device="meta")
        return t.requires_grad_(True) if x.requires_grad else t
    return x


def _on_meta(func: Callable[..., Any], args: Any, kwargs: Any, grad: bool) -> Any:
    try:
        margs, mkwargs = pytree.tree_map(_meta, (list(args), dict(kwargs)))
        counting = _Counting()
        with torch.set_grad_enabled(bool(grad)), counting:
            out = func(*margs, **mkwargs)
        kept = sum(t.numel() * t.element_size() for t in _tensors(out))
        result = ((tuple(out.shape), out.dtype, out.numel() * out.element_size())
                  if type(out) is torch.Tensor and out._base is None and not out.requires_grad
                  and out.is_contiguous() else None)
        return Cost(max(kept, counting.made), counting.flops, True, result)
    except Exception:  # noqa: BLE001 - no meta kernel, or a data-dependent shape: rules decide
        return _UNKNOWN


def estimate(name: str, func: Callable[..., Any], args: Any, kwargs: Any, grad: bool) -> Cost:
    """What ``func(*args, **kwargs)`` (the allow-listed op ``name``) will cost: its tensor
    results' bytes (0 for an in-place op: its result is its first argument) and its flops."""
    inplace = allowlist.is_inplace(name)
    if inplace and name.rsplit(".", 1)[-1] not in _INPLACE_WORK:
        return _FREE
    try:
        sigs = []  # (a loop, not a comprehension: this runs for every op)
        for a in args:
            sigs.append((a.shape, a.dtype, a.requires_grad) if type(a) is torch.Tensor
                        else _sig(a))
        key: Any = (name, grad, tuple(sigs),
                    tuple([(k, _sig(v)) for k, v in kwargs.items()]) if kwargs else ())
    except _NoSig:
        key = None
    cost = _CACHE.get(key) if key is not None else None
    if cost is None:
        if name == "zmqsyft.beaver_triple":  # (no tensor arguments: make its results on meta)
            kwargs = {**kwargs, "device": "meta"}
        cost = _on_meta(func, args, kwargs, grad)
        if key is not None:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[key] = cost
    if cost is _UNKNOWN:
        cost = _from_data(name, args, kwargs)
    return cost._replace(nbytes=0, result=None) if inplace else cost


def warm_up() -> None:
    """Load what the first estimate needs: torch's meta kernels, and sympy behind them (about
    1 s and 70 MiB, once per process). A worker does it in a thread of its own once it is ready,
    so that neither its start nor, usually, its first op pays for it (an op that comes sooner
    waits for the import to finish, as it would have without this). Not ``torch._dynamo``:
    the worker's start told the meta kernels they need none (``metakernels``)."""
    meta = torch.ones(1, 1, device="meta")
    torch.mm(meta, meta)
    torch.add(meta, meta)


# ------------------------------------------------------------- ops whose results need data
def _arg(args: Any, kwargs: Any, i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


_HUGE = 1 << 62  # more than any worker holds: a count past it is refused whatever it is exactly


def _product(factors: Any) -> int:
    """The product of whole numbers, stopping at ``_HUGE`` (no big-number arithmetic that a
    crafted argument could make slow)."""
    total = 1
    for f in factors:
        total *= max(0, int(f))
        if total >= _HUGE:
            return _HUGE
    return total


def _comb(n: int, r: int) -> int:
    """``math.comb(n, r)``, or ``_HUGE`` when that is more (decided on logarithms first)."""
    if r < 0 or r > n:
        return 0
    if math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1) > math.log(_HUGE):
        return _HUGE
    return math.comb(n, r)


def _int_max(t: Any) -> int:
    """The largest value of an integer tensor (0 if empty)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return 0
    return int(t.max())


def _bincount(args: Any, kwargs: Any) -> tuple[int, int]:
    x, minlength = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 2, "minlength", 0)
    return max(int(minlength or 0), _int_max(x) + 1) * 8, 0


def _one_hot(args: Any, kwargs: Any) -> tuple[int, int]:
    x, classes = _arg(args, kwargs, 0, "tensor"), _arg(args, kwargs, 1, "num_classes", -1)
    classes = classes if isinstance(classes, int) and classes > 0 else _int_max(x) + 1
    return x.numel() * classes * 8, 0


def _histogram(dd: bool) -> Callable[[Any, Any], tuple[int, int]]:
    def rule(args: Any, kwargs: Any) -> tuple[int, int]:
        x, bins = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "bins", 10)
        dims = x.shape[-1] if dd and x.dim() == 2 else 1  # histogramdd takes (points, dims)
        if isinstance(bins, int):
            sizes = [bins] * dims
        elif isinstance(bins, (list, tuple)) and all(isinstance(b, int) for b in bins):
            sizes = list(bins)
        else:  # bin edges given: as many bins as edges
            sizes = [t.numel() for t in _tensors(bins)]
        return 16 * _product(b + 1 for b in sizes), 0
    return rule


def _repeat_interleave(args: Any, kwargs: Any) -> tuple[int, int]:
    x, repeats = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "repeats")
    dim = _arg(args, kwargs, 2, "dim")
    if repeats is None:  # repeat_interleave(repeats): indices, one per repetition
        return int(x.sum()) * 8 if x.numel() else 0, 0
    if isinstance(repeats, torch.Tensor):
        total = int(repeats.sum()) if repeats.numel() > 1 else _int_max(repeats) * (
            x.numel() if dim is None else x.shape[dim])
    else:
        total = int(repeats) * (x.numel() if dim is None else x.shape[dim])
    rest = 1 if dim is None else x.numel() // max(1, x.shape[dim])
    return max(0, total) * rest * max(8, x.element_size()), 0


def _nonzero(args: Any, kwargs: Any) -> tuple[int, int]:
    x = _arg(args, kwargs, 0, "input")
    return int(torch.count_nonzero(x)) * max(1, x.dim()) * 8, 0


def _combinations(args: Any, kwargs: Any) -> tuple[int, int]:
    x, r = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "r", 2)
    again = _arg(args, kwargs, 2, "with_replacement", False)
    n = x.numel()
    count = _comb(n + r - 1, r) if again else _comb(n, r)
    return _product([count, r, x.element_size()]), 0


def _tolist(args: Any, kwargs: Any) -> tuple[int, int]:  # Python objects: ~40 bytes an element
    return 40 * sum(t.numel() for t in _tensors(args)), 0


def _gram(args: Any, kwargs: Any) -> tuple[int, int]:  # cov, corrcoef: (vars, obs) -> vars^2
    x = args[0]
    rows = x.shape[0] if x.dim() == 2 else 1
    return rows * rows * 16, 2 * rows * x.numel()


def _cubic_rule(weight: int) -> Callable[[Any, Any], tuple[int, int]]:
    def rule(args: Any, kwargs: Any) -> tuple[int, int]:
        tensors = _tensors((args, kwargs))
        return (2 * sum(t.nbytes for t in tensors),
                weight * sum(_cubic(tuple(t.shape)) for t in tensors))
    return rule


def _scalar(args: Any, kwargs: Any) -> tuple[int, int]:
    return 0, 0


_RULES: dict[str, Callable[[Any, Any], tuple[int, int]]] = {
    "bincount": _bincount, "one_hot": _one_hot, "histogram": _histogram(False),
    "histogramdd": _histogram(True),
    "repeat_interleave": _repeat_interleave, "nonzero": _nonzero, "argwhere": _nonzero,
    "combinations": _combinations, "tolist": _tolist, "cov": _gram, "corrcoef": _gram,
    "geqrf": _cubic_rule(8), "lstsq": _cubic_rule(8), "pinverse": _cubic_rule(40),
    "lobpcg": _cubic_rule(400), "cpu": _scalar, "item": _scalar, "equal": _scalar,
    "allclose": _scalar, "is_nonzero": _scalar,
}


def _from_data(name: str, args: Any, kwargs: Any) -> Cost:
    """A bound for an op that meta tensors cannot tell about, from its arguments' data."""
    rule = _RULES.get(name.rsplit(".", 1)[-1])
    if rule is not None:
        try:
            nbytes, flops = rule(args, kwargs)
            return Cost(nbytes, flops, False)
        except Exception:  # noqa: BLE001 - arguments the op will refuse itself: the bound below
            pass
    tensors = _tensors((args, kwargs))
    try:  # elementwise ops broadcast their arguments; every op here makes at most that many
        numel = math.prod(torch.broadcast_shapes(*(t.shape for t in tensors))) if tensors else 0
    except RuntimeError:
        numel = 0
    numel = max([numel, *(t.numel() for t in tensors)])
    return Cost(16 * numel, 0, False)
