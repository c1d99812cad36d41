"""Additive secret sharing over the integers mod 2**64: what a worker runs for it.

A value ``x`` (an ``int64`` tensor: a fixed-precision encoding, or integers) is split into ``n``
shares ``x_1 ... x_n`` such that ``x_1 + ... + x_n == x`` with int64 arithmetic, which wraps
around mod 2**64. Every share but the last is drawn uniformly from the ring by the operating
system's cryptographic generator (``os.urandom``, never torch's or NumPy's generator), so any
``n - 1`` shares are independent of ``x``: only all of them together tell it.

* :func:`split_shares`: run by the worker holding ``x`` (the data owner's worker), which then
  sends each share straight to its holder.
* :func:`encode_fixed`: a fixed-point encoding made where the data is, refusing values that
  do not fit int64 instead of wrapping them.
* :func:`beaver_triple`: run by a crypto provider: random ``a``, ``b`` and ``c = a * b`` (or
  ``a @ b``), each split into ``n`` shares, for one multiplication of two shared tensors.

All three are in the worker's allow-list (:data:`OPS`) under these names. On ``meta`` tensors (a
worker's cost estimate, a client's shape inference) they make storage-less results of the right
shapes and draw nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["random_ring", "split_shares", "beaver_triple", "encode_fixed", "reconstruct", "OPS",
           "MAKES_SHARES", "MAX_PARTIES", "TRIPLE_KINDS"]

MAX_PARTIES = 64  # shares one value may be split into
TRIPLE_KINDS = ("mul", "matmul")
_CHUNK = 1 << 24  # bytes drawn from the generator at a time


def random_ring(shape: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """An int64 tensor of ``shape`` drawn uniformly from the ring mod 2**64 by ``os.urandom``."""
    shape = tuple(int(s) for s in shape)
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=torch.int64, device="meta")
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=torch.int64)
    flat = out.view(torch.uint8)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = os.urandom(min(_CHUNK, flat.numel() - start))
        flat[start:start + len(chunk)] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
    return out.reshape(shape)


def _parties(n: Any) -> int:
    if type(n) is not int or not 2 <= n <= MAX_PARTIES:
        raise ValueError(f"a value is shared among 2 to {MAX_PARTIES} workers, not {n!r}")
    return n


def split_shares(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """``n`` additive shares of the int64 tensor ``x``: ``n - 1`` uniformly random, the last
    ``x`` minus their sum (mod 2**64)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise TypeError(
            "only int64 tensors can be secret-shared (integers mod 2**64), not "
            f"{getattr(x, 'dtype', type(x).__name__)}; encode floating-point values with "
            ".fix_precision() first")
    n = _parties(n)
    shares = [random_ring(x.shape, x.device) for _ in range(n - 1)]
    if x.is_meta:
        return (*shares, torch.empty_like(x))
    last = x.detach().clone()
    for s in shares:
        last.sub_(s)
    return (*shares, last)


def beaver_triple(shape_a: Sequence[int], shape_b: Sequence[int], kind: str, n: int,
                  device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Shares of a multiplication triple: random ``a`` of ``shape_a``, ``b`` of ``shape_b`` and
    ``c = a * b`` (``kind="mul"``) or ``a @ b`` (``"matmul"``), each split into ``n`` shares;
    returned as ``(a_1..a_n, b_1..b_n, c_1..c_n)``."""
    if kind not in TRIPLE_KINDS:
        raise ValueError(f"a triple's kind is one of {TRIPLE_KINDS}, not {kind!r}")
    n = _parties(n)
    for shape in (shape_a, shape_b):
        if not isinstance(shape, (list, tuple)) or len(shape) > 8 or \
                not all(type(s) is int and s >= 0 for s in shape):
            raise ValueError(f"a triple's shapes are lists of sizes, not {shape!r}")
    a, b = random_ring(shape_a, device), random_ring(shape_b, device)
    c = a * b if kind == "mul" else a @ b
    return (*split_shares(a, n), *split_shares(b, n), *split_shares(c, n))


def encode_fixed(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``x`` as int64 integers scaled by ``scale`` (rounded to the nearest): the fixed-point
    encoding, refused with :class:`ValueError` rather than wrapped when a value does not fit."""
    if not isinstance(x, torch.Tensor) or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"fix_precision encodes real tensors, not "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if type(scale) is not int or not 1 <= scale <= 2 ** 40:
        raise ValueError(f"a fixed-point scale is a whole number from 1 to 2**40, not {scale!r}")
    if x.is_meta:
        return torch.empty(x.shape, dtype=torch.int64, device="meta")
    if x.dtype == torch.int64:
        limit = (2 ** 63 - 1) // scale
        if x.numel() and bool(((x > limit) | (x < -limit)).any()):
            raise ValueError(f"fix_precision: a value times the scale {scale} does not fit int64 "
                             f"(|value| must stay below {limit}); use a smaller precision")
        return x.detach() * scale
    scaled = torch.round(x.detach().double() * scale)
    if x.numel() and not bool((scaled.abs() < 2.0 ** 63).all()):
        raise ValueError(f"fix_precision: a value is infinite, NaN, or too large to encode at "
                         f"scale {scale} (|value * scale| must stay below 2**63, and below "
                         f"2**63 / scale for products); use a smaller precision or rescale")
    return scaled.to(torch.int64)


def reconstruct(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """The value a list of shares stands for (their sum, mod 2**64)."""
    total = shares[0].clone()
    for s in shares[1:]:
        total.add_(s)
    return total


OPS: dict[str, Callable[..., Any]] = {
    "zmqsyft.split_shares": split_shares,
    "zmqsyft.beaver_triple": beaver_triple,
    "zmqsyft.encode_fixed": encode_fixed,
}
"""zmqsyft's own operations in a worker's allow-list, by the name a CALL gives."""

MAKES_SHARES = frozenset({"zmqsyft.split_shares", "zmqsyft.beaver_triple"})
"""The operations in :data:`OPS` whose results are fresh shares."""
