"""Additive secret sharing (PySyft 0.2's Part 9 and 10 API; fixed precision is in
:mod:`zmqsyft.client.fixed`).

``x.share(bob, alice, crypto_provider=james)``
splits an int64 tensor into additive shares mod 2**64 (:mod:`zmqsyft.secret`), one per worker,
and gives an :class:`AdditiveSharingTensor`, which holds a pointer to each share.

Where the shares come from: a local tensor is split here, each share sent to its holder; a
pointer's tensor is split by the worker that holds it, with its operating system's cryptographic
generator, and that worker sends each share straight to its holder (``move``), so the data never
passes through this process, and its owner's policy decides which workers may hold shares. Like
PySyft, ``share()`` of a pointer gives the sharing "at" that worker; its ``.get()`` hands it to
this process without any traffic, and a ``.get()`` of a sharing it holds reconstructs the value:
every holder releases its share (a release its data owners' policies decide on: a sum over at
least ``k`` owners' shares, yes; one owner's, no) and the shares are added here.

Shared tensors support ``+``, ``-`` (with each other and with public values), ``*`` by a public
integer, ``sum``/``mean``, and ``*``/``@`` of two shared tensors, with a Beaver triple from the
``crypto_provider``: the holders open ``x - a`` and ``y - b`` among themselves (never to this
process) and each computes its share of the product. Fixed-precision products and divisions are
truncated the SecureML way (after the shares are gathered onto two holders): exact to one unit
of the last place, except with probability about ``|value| / 2**64``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..ids import new_id
from ..secret import MAX_PARTIES, reconstruct, split_shares
from ..wire.bodies import Put
from ..wire.messages import Op
from ..wire.tags import check_description, check_tags
from . import grads, interrupts
from .dispatch import _call_async
from .handle import WorkerHandle
from .pointer import PointerTensor

__all__ = ["AdditiveSharingTensor", "share", "send_tensor"]

_I64 = torch.int64


def send_tensor(tensor: torch.Tensor, worker: WorkerHandle) -> PointerTensor:
    """Store a copy of a local tensor on ``worker``, with its tags and description (which
    publish it there: :mod:`zmqsyft.wire.tags`); return the pointer that owns it."""
    obj_id = new_id()
    what = f".send() to '{worker.id}'"
    tags = check_tags(tensor.__dict__.get("_zs_tags") or (), what)
    about = tensor.__dict__.get("_zs_description")
    about = check_description(about, what) if about else ""
    # the pointer (which frees the object) exists before the request leaves
    ptr = PointerTensor(worker, obj_id, tensor.shape, tensor.dtype, tensor.requires_grad)
    if tags or about:
        ptr._tags, ptr._description = frozenset(tags), about or None
    if tensor._grad is None:  # (a gradient travels with its tensor)
        grads.set_known(ptr, False)
    if ptr._rg:
        grads.leaf(ptr)  # (it arrives as a leaf)
    session, conn = worker.session, worker.session.conn(worker)
    since = conn._next
    try:
        # (a result: a reconnect meeting a restarted worker makes it the new process's)
        conn.wait(conn.send(Op.PUT, Put(id=obj_id, obj=tensor, tags=tags, description=about),
                            results=(ptr,), what=what))
    except BaseException as exc:
        ptr._release("the .send() that was to create it failed")
        if not isinstance(exc, Exception):  # Ctrl-C: the object is freed once it is stored
            interrupts.free_when_answered(conn, since, what, session.track, session.free_later,
                                          worker.address, obj_id)
        raise
    return ptr


def run_own(location: WorkerHandle, name: str, args: list[Any], shapes: Sequence[Any]
        ) -> list[PointerTensor]:
    """Run zmqsyft's own op ``name`` on ``location``: pointers to its int64 results."""
    out = [[new_id(), list(shape), "int64", False] for shape in shapes]
    metas = [(torch.Size(shape), _I64, False) for shape in shapes]
    pointers = [a for a in args if isinstance(a, PointerTensor)]
    return _call_async(PointerTensor, name, location, args, {}, pointers, out=out, metas=metas)


def _same(a: WorkerHandle, b: WorkerHandle) -> bool:
    return a is b or a.address == b.address


def _check_parties(holders: Sequence[WorkerHandle], provider: WorkerHandle | None) -> None:
    """Refuse a sharing whose shares would meet on one worker (which would then hold the value)
    or whose crypto provider is also a holder (it would learn both factors from the opened
    differences)."""
    for i, h in enumerate(holders):
        if any(_same(h, other) for other in holders[:i]):
            raise ValueError(f"worker '{h.id}' is named twice among the holders: a worker holding "
                             "two shares of a value holds more of it than intended; name each "
                             "holder once")
        if provider is not None and _same(h, provider):
            raise ValueError(f"worker '{h.id}' is both a holder and the crypto provider: it could "
                             "then reconstruct the factors of every product; choose a crypto "
                             "provider that holds no share")


class _NoComparisons:
    """Comparisons, ``max``/``argmax`` and ``relu`` of secret-shared values (PySyft 0.2 ran them
    with SecureNN's private-compare protocol) are not built: each raises ``NotImplementedError``
    saying so and what to do, instead of Python's bare "'>' not supported"."""

    def _refuse(self, what: str) -> Any:
        raise NotImplementedError(
            f"{what} of secret-shared values is not supported by zmqsyft (it needs a secure "
            "comparison protocol, such as PySyft 0.2's SecureNN, which is not built). Compare "
            "in plaintext where the data owners' policy allows it (after .get() of an "
            "aggregate), or keep the computation to +, -, * and @, which are supported")

    def __gt__(self, other: Any) -> Any:
        return self._refuse("'>'")

    def __ge__(self, other: Any) -> Any:
        return self._refuse("'>='")

    def __lt__(self, other: Any) -> Any:
        return self._refuse("'<'")

    def __le__(self, other: Any) -> Any:
        return self._refuse("'<='")

    def max(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("max()")

    def argmax(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse("argmax()")

    def relu(self) -> Any:
        return self._refuse("relu()")


class AdditiveSharingTensor(_NoComparisons):
    """An int64 tensor split into additive shares mod 2**64, one on each holder.

    Attributes: ``holders`` (worker handles), ``shares`` (a pointer on each, in the same order),
    ``crypto_provider`` (the worker that deals Beaver triples, or ``None``), ``shape``.
    """

    def __init__(self, holders: Sequence[WorkerHandle], shares: Sequence[PointerTensor],
                 crypto_provider: WorkerHandle | None = None, at: WorkerHandle | None = None
                 ) -> None:
        self.holders = list(holders)
        self.shares = list(shares)
        self.crypto_provider = crypto_provider
        self.at = at  # share() of a pointer: the sharing "lives" on that worker until .get()
        self.shape = torch.Size(self.shares[0].shape)
        self._spent: str | None = None

    # ------------------------------------------------------------------ plumbing
    def _use(self) -> list[PointerTensor]:
        if self._spent is not None:
            raise ValueError(f"this shared tensor can no longer be used: {self._spent}")
        return self.shares

    def _like(self, shares: Sequence[PointerTensor], holders: Sequence[WorkerHandle] | None = None
              ) -> AdditiveSharingTensor:
        return AdditiveSharingTensor(holders or self.holders, shares, self.crypto_provider)

    def _aligned(self, other: AdditiveSharingTensor
                 ) -> tuple[list[WorkerHandle], list[Any], list[Any]]:
        """Both operands' shares on the union of their holders (a missing share is zero)."""
        holders = list(self.holders)
        for h in other.holders:
            if not any(_same(h, mine) for mine in holders):
                holders.append(h)

        def on(t: AdditiveSharingTensor) -> list[Any]:
            found = []
            for h in holders:
                i = next((i for i, mine in enumerate(t.holders) if _same(h, mine)), None)
                found.append(None if i is None else t._use()[i])
            return found
        return holders, on(self), on(other)

    def _binary(self, other: Any, op: Any) -> AdditiveSharingTensor:
        """``op`` (``torch.add`` or ``torch.sub``) of this and a shared or public operand."""
        if isinstance(other, AdditiveSharingTensor):
            holders, mine, theirs = self._aligned(other)
            shares = [op(a, b) if a is not None and b is not None else
                      a.clone() if b is None else b.clone() if op is torch.add else -b
                      for a, b in zip(mine, theirs, strict=True)]
            return self._like(shares, holders)
        first, *rest = self._use()
        return self._like([op(first, _public(other)), *(s.clone() for s in rest)])

    # ---------------------------------------------------------------- arithmetic
    def __add__(self, other: Any) -> AdditiveSharingTensor:
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other: Any) -> AdditiveSharingTensor:
        return self._binary(other, torch.sub)

    def __rsub__(self, other: Any) -> AdditiveSharingTensor:
        return (-self) + other

    def __neg__(self) -> AdditiveSharingTensor:
        return self._like([-s for s in self._use()])

    def __mul__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, AdditiveSharingTensor):
            return self._beaver(other, "mul")
        public = _public(other)
        return self._like([s * public for s in self._use()])

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> AdditiveSharingTensor:
        if isinstance(other, AdditiveSharingTensor):
            return self._beaver(other, "matmul")
        public = _public(other)
        return self._like([s @ public for s in self._use()])

    def __rmatmul__(self, other: Any) -> AdditiveSharingTensor:
        public = _public(other)
        return self._like([public @ s for s in self._use()])

    def matmul(self, other: Any) -> AdditiveSharingTensor:
        """``x.matmul(y)``: as ``x @ y`` (Part 9 writes it so)."""
        return self.__matmul__(other)

    def mm(self, other: Any) -> AdditiveSharingTensor:
        return self @ other

    def sum(self, *args: Any, **kwargs: Any) -> AdditiveSharingTensor:
        return self._like([s.sum(*args, **kwargs) for s in self._use()])

    def mean(self, *args: Any, **kwargs: Any) -> AdditiveSharingTensor:
        """The mean, as an integer (floor) division of the sum by the count."""
        total = self.sum(*args, **kwargs)
        return total.truncate(max(1, self.shape.numel() // max(1, total.shape.numel())))

    def _beaver(self, other: AdditiveSharingTensor, kind: str) -> AdditiveSharingTensor:
        """``self * other`` or ``self @ other`` with a triple from the crypto provider."""
        provider = self.crypto_provider or other.crypto_provider
        if provider is None:
            raise ValueError(
                "multiplying two shared tensors needs a crypto provider to deal a Beaver triple:"
                " share them with .share(..., crypto_provider=worker)")
        holders, xs, ys = self._aligned(other)
        if any(x is None for x in xs) or any(y is None for y in ys):
            raise ValueError("both shared tensors must be shared among the same workers to be "
                             "multiplied")
        n = len(holders)
        z_shape = (torch.empty(self.shape, device="meta") * torch.empty(other.shape, device="meta")
                   if kind == "mul" else torch.empty(self.shape, device="meta")
                   @ torch.empty(other.shape, device="meta")).shape
        _check_parties(holders, provider)
        dealt = run_own(provider, "zmqsyft.beaver_triple",
                        [list(self.shape), list(other.shape), kind, n],
                        [self.shape] * n + [other.shape] * n + [z_shape] * n)
        dealt = [p.move(holders[i % n]) for i, p in enumerate(dealt)]
        a, b, c = dealt[:n], dealt[n:2 * n], dealt[2 * n:]
        es = [x - ai for x, ai in zip(xs, a, strict=True)]
        fs = [y - bi for y, bi in zip(ys, b, strict=True)]
        e, f = _open(es, holders), _open(fs, holders)  # x - a and y - b, on every holder
        mul = torch.mul if kind == "mul" else torch.matmul
        zs = [c[i] + mul(e[i], b[i]) + mul(a[i], f[i]) for i in range(n)]
        zs[0] = zs[0] + mul(e[0], f[0])
        return AdditiveSharingTensor(holders, zs, provider)

    def truncate(self, divisor: int) -> AdditiveSharingTensor:
        """The shared value divided by the public whole number ``divisor`` (SecureML's local
        truncation, after gathering the shares onto the first two holders)."""
        if type(divisor) is not int or divisor < 1:
            raise ValueError(f"a shared tensor is divided by a whole number >= 1, not {divisor!r}")
        shares = self._use()
        if divisor == 1:
            return self._like([s.clone() for s in shares])
        if len(shares) == 1:
            return self._like([torch.div(shares[0], divisor, rounding_mode="floor")])
        second = shares[1]
        for s in shares[2:]:  # (the others' shares, gathered onto the second holder)
            second = second + s.clone().move(self.holders[1])
        return self._like([torch.div(shares[0], divisor, rounding_mode="floor"),
                           -torch.div(-second, divisor, rounding_mode="floor")],
                          self.holders[:2])

    # ------------------------------------------------------------------ leaving
    def get(self) -> Any:
        """Reconstruct the value: every holder releases its share (its data owners' policies
        decide) and they are added here. A sharing made by ``share()`` of a pointer is first
        only handed to this process (no traffic), as in PySyft."""
        if self.at is not None:
            self.at = None
            return self
        shares = self._use()
        values = [s.get() for s in shares]
        self._spent = "it was reconstructed with .get()"
        return reconstruct(values)

    def copy(self) -> AdditiveSharingTensor:
        return self._like([s.clone() for s in self._use()])

    def __repr__(self) -> str:
        lines = [f"(Wrapper)>[AdditiveSharingTensor shape={tuple(self.shape)}]"]
        lines += [f"\t-> {s!r}" for s in self.shares]
        if self.crypto_provider is not None:
            lines.append(f"\t*crypto provider: {self.crypto_provider.id}*")
        if self.at is not None:
            lines.insert(0, f"(shared from '{self.at.id}': .get() hands it to you)")
        return "\n".join(lines)

    __str__ = __repr__


def _open(shares: list[PointerTensor], holders: list[WorkerHandle]) -> list[PointerTensor]:
    """The sum of ``shares`` on every holder: each sends a copy of its share to the others."""
    opened = []
    for i, h in enumerate(holders):
        total = shares[i]
        for j, s in enumerate(shares):
            if j != i:
                total = total + s.clone().move(h)
        opened.append(total)
    return opened


def _public(value: Any) -> Any:
    """A public operand of a shared (int64) tensor."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise TypeError(f"a shared tensor takes integers and int64 tensors as public operands, "
                        f"not {type(value).__name__}; encode it with .fix_precision() first")
    if isinstance(value, torch.Tensor):
        if isinstance(value, PointerTensor) or value.dtype != _I64:
            raise TypeError("a shared tensor's public tensor operands are local int64 tensors")
    return value


def share(x: Any, *workers: WorkerHandle, crypto_provider: WorkerHandle | None = None,
          **ignored: Any) -> Any:
    """Split ``x`` (an int64 tensor, or a pointer to one) into additive shares, one on each of
    ``workers`` (a :class:`~zmqsyft.client.fixed.FixedPrecisionTensor` has its own ``share``)."""
    if not 2 <= len(workers) <= MAX_PARTIES or not all(isinstance(w, WorkerHandle)
                                                      for w in workers):
        raise TypeError(f"share() takes 2 to {MAX_PARTIES} worker handles, not {workers!r}")
    _check_parties(workers, crypto_provider)
    if isinstance(x, PointerTensor):
        if x.dtype != _I64:
            raise TypeError(f"only int64 tensors can be shared, not {x.dtype}; use "
                            ".fix_precision() first")
        x._check_usable(".share()")
        made = run_own(x.location, "zmqsyft.split_shares", [x, len(workers)],
                       [x.shape] * len(workers))
        shares = [p if _same(w, x.location) else p.move(w)
                  for p, w in zip(made, workers, strict=True)]
        return AdditiveSharingTensor(workers, shares, crypto_provider, at=x.location)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"share() needs a tensor, not {type(x).__name__}")
    values = split_shares(x.detach(), len(workers))  # (refuses any dtype but int64)
    return AdditiveSharingTensor(workers, [send_tensor(v, w) for v, w in
                                           zip(values, workers, strict=True)], crypto_provider)
