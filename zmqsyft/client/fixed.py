"""Fixed-precision encoding (PySyft 0.2's ``fix_precision``/``float_precision``).

``t.fix_precision()`` (``fix_prec``) encodes floating-point values as int64 integers scaled by
``base ** precision_fractional`` (10**3 by default) and gives a :class:`FixedPrecisionTensor`;
``.float_precision()`` (``float_prec``) decodes. Its ``child`` is a local int64 tensor, a pointer
to one (encoded on its worker), or an :class:`~zmqsyft.client.smpc.AdditiveSharingTensor`
(``.share()``); arithmetic rescales products and quotients (on a sharing, with the holders'
truncation).
"""

from __future__ import annotations

from typing import Any

import torch

from ..secret import encode_fixed
from . import smpc
from .handle import WorkerHandle
from .pointer import PointerTensor
from .smpc import AdditiveSharingTensor, share

__all__ = ["FixedPrecisionTensor", "fix_precision", "float_precision"]

_I64 = torch.int64


class FixedPrecisionTensor(smpc._NoComparisons):
    """Real numbers as int64 integers scaled by ``base ** precision_fractional``.

    ``child`` is the encoded tensor: a local int64 tensor, a pointer to one, or an
    :class:`AdditiveSharingTensor`.
    """

    def __init__(self, child: Any, base: int = 10, precision_fractional: int = 3) -> None:
        self.child = child
        self.base = base
        self.precision_fractional = precision_fractional
        self.scale = base ** precision_fractional

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.child.shape)

    def _wrap(self, child: Any) -> FixedPrecisionTensor:
        return FixedPrecisionTensor(child, self.base, self.precision_fractional)

    def _encode(self, value: Any) -> Any:
        """A public operand, encoded at this tensor's scale."""
        if isinstance(value, FixedPrecisionTensor):
            if value.scale != self.scale:
                raise ValueError(f"fixed-precision tensors of scales {self.scale} and "
                                 f"{value.scale} cannot be combined")
            return value.child
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return round(value * self.scale)
        if isinstance(value, torch.Tensor) and not isinstance(value, PointerTensor):
            return _encode(value, self.scale)
        raise TypeError(f"a fixed-precision tensor cannot be combined with "
                        f"{type(value).__name__}")

    def _cut(self, child: Any, divisor: int) -> Any:
        if isinstance(child, AdditiveSharingTensor):
            return child.truncate(divisor)
        return torch.div(child, divisor, rounding_mode="floor")

    def __add__(self, other: Any) -> FixedPrecisionTensor:
        theirs = self._encode(other)
        if isinstance(theirs, AdditiveSharingTensor) and not isinstance(self.child,
                                                                         AdditiveSharingTensor):
            return self._wrap(theirs + self.child)
        return self._wrap(self.child + theirs)

    __radd__ = __add__

    def __sub__(self, other: Any) -> FixedPrecisionTensor:
        return self + (-other)

    def __rsub__(self, other: Any) -> FixedPrecisionTensor:
        return (-self) + other

    def __neg__(self) -> FixedPrecisionTensor:
        return self._wrap(-self.child)

    def __mul__(self, other: Any) -> FixedPrecisionTensor:
        if isinstance(other, int) and not isinstance(other, bool):
            return self._wrap(self.child * other)  # (a whole number: no rescaling)
        theirs = self._encode(other)
        if isinstance(theirs, AdditiveSharingTensor) and not isinstance(self.child,
                                                                         AdditiveSharingTensor):
            return self._wrap(self._cut(theirs * self.child, self.scale))
        return self._wrap(self._cut(self.child * theirs, self.scale))

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> FixedPrecisionTensor:
        theirs = self._encode(other)
        if isinstance(theirs, AdditiveSharingTensor) and not isinstance(self.child,
                                                                         AdditiveSharingTensor):
            return self._wrap(self._cut(theirs.__rmatmul__(self.child), self.scale))
        return self._wrap(self._cut(self.child @ theirs, self.scale))

    def mm(self, other: Any) -> FixedPrecisionTensor:
        return self @ other

    def __truediv__(self, other: Any) -> FixedPrecisionTensor:
        if isinstance(other, int) and not isinstance(other, bool) and other > 0:
            return self._wrap(self._cut(self.child, other))
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other != 0:
            return self * (1.0 / other)
        raise TypeError("a fixed-precision tensor is divided by a public non-zero number")

    def sum(self, *args: Any, **kwargs: Any) -> FixedPrecisionTensor:
        return self._wrap(self.child.sum(*args, **kwargs))

    def mean(self, *args: Any, **kwargs: Any) -> FixedPrecisionTensor:
        total = self.child.sum(*args, **kwargs)
        count = max(1, self.shape.numel() // max(1, torch.Size(total.shape).numel()))
        return self._wrap(self._cut(total, count))

    def share(self, *workers: WorkerHandle, crypto_provider: WorkerHandle | None = None,
              **ignored: Any) -> FixedPrecisionTensor:
        """Secret-share the encoded values among ``workers`` (see :func:`share`)."""
        return self._wrap(share(self.child, *workers, crypto_provider=crypto_provider))

    def get(self) -> FixedPrecisionTensor:
        """Fetch (a pointer) or reconstruct (a sharing) the encoded values."""
        return self._wrap(self.child.get())

    def copy(self) -> FixedPrecisionTensor:
        return self._wrap(self.child.copy() if not isinstance(self.child, torch.Tensor)
                          or isinstance(self.child, PointerTensor) else self.child.clone())

    def float_precision(self) -> torch.Tensor:
        """The decoded float32 values (of a local tensor, or of a pointer: a pointer)."""
        if isinstance(self.child, AdditiveSharingTensor):
            raise ValueError("the values are secret-shared: reconstruct them with .get() first "
                             "(a release the data owners' policies decide on)")
        return (self.child.double() / self.scale).float()

    float_prec = float_precision

    def __repr__(self) -> str:
        return (f"(Wrapper)>FixedPrecisionTensor>[scale {self.base}**"
                f"{self.precision_fractional}]\n\t-> {self.child!r}")

    __str__ = __repr__


def _encode(t: torch.Tensor, scale: int) -> torch.Tensor:
    return encode_fixed(t, scale)


def fix_precision(t: torch.Tensor, base: int = 10, precision_fractional: int = 3,
                  **ignored: Any) -> FixedPrecisionTensor:
    """Encode ``t`` (local, or a pointer: encoded on its worker) at ``base **
    precision_fractional``."""
    if type(base) is not int or type(precision_fractional) is not int or base < 2 or \
            precision_fractional < 0 or base ** precision_fractional > 2 ** 40:
        raise ValueError("fix_precision needs a whole base >= 2 and precision_fractional >= 0 "
                         "with base ** precision_fractional <= 2**40")
    scale = base ** precision_fractional
    if isinstance(t, PointerTensor):  # encoded (and range-checked) on its worker
        t._check_usable(".fix_precision()")
        child = smpc.run_own(t.location, "zmqsyft.encode_fixed", [t, scale], [t.shape])[0]
    else:
        child = _encode(t, scale)
    return FixedPrecisionTensor(child, base, precision_fractional)


def float_precision(t: Any) -> Any:
    """For a plain tensor: itself (already floating point)."""
    return t.float_precision() if isinstance(t, FixedPrecisionTensor) else t
