"""Tensors ↔ raw bytes for the wire: the dtype table, zero-copy buffers out, tensors over buffers in.

Only dense (strided) tensors of the dtypes in :data:`DTYPES` travel, their bytes taken from the
CPU; anything else is refused with a ``SerializationError`` that says so. A received buffer becomes a tensor without a copy unless its
address is misaligned for the dtype (then it is cloned: small frames only in practice).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as _np
import torch

from ..errors import ProtocolError, SerializationError
from . import shm as _shm

__all__ = ["DTYPES", "dtype_name", "tensor_buffer", "tensor_from_buffer", "tensor_over_segment",
           "sole_segment"]

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
        torch.complex64, torch.complex128,
    )
}
_DTYPE_NAMES = {d: n for n, d in DTYPES.items()}
_NUMPY_DTYPES = frozenset(DTYPES.values()) - {torch.bfloat16}  # (numpy has no bfloat16)
_ALIGN = 8  # alignment kernels need at most (libzmq hands large frames over 8-aligned)


def _spend_frombuffer_warning() -> None:
    """Have ``torch.frombuffer`` give its once-per-process warning about a read-only buffer
    now, hidden, instead of at the first received frame (catching warnings around every frame
    cost more than turning the frame into a tensor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0" * 8, dtype=torch.uint8)


_spend_frombuffer_warning()


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype; raises ``SerializationError`` for dtypes the wire does not carry."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise SerializationError(
            f"tensors of dtype {dtype} cannot be sent; supported: {', '.join(DTYPES)}"
        ) from None


def tensor_buffer(t: torch.Tensor) -> Any:
    """A zero-copy buffer over a tensor's bytes (copying only if it is not contiguous)."""
    if t.is_quantized or t.is_nested or t.layout is not torch.strided:
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else str(t.layout)
        raise SerializationError(f"only dense (strided) tensors can be sent, not {kind} ones")
    if t.is_meta:
        raise SerializationError("a tensor on the meta device has no data to send")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous() or (t.dim() and t.stride(-1) != 1):  # (x[::5] of 3 elements is
        t = t.clone(memory_format=torch.contiguous_format)       # "contiguous", stride 5)
    if t.numel() == 0:
        return b""
    if t.dtype in _NUMPY_DTYPES:  # (numpy's reshape and view cost half torch's)
        return t.numpy().reshape(-1).view(_np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()  # (bfloat16; dtypes the wire refuses later)


def tensor_from_buffer(buf: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Rebuild a tensor over a received frame without copying (unless it is misaligned)."""
    if any((not isinstance(s, int)) or s < 0 for s in shape):
        raise ProtocolError(f"invalid tensor shape {list(shape)!r}")
    view = memoryview(buf)
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    if view.nbytes != expected:
        raise ProtocolError(
            f"tensor frame holds {view.nbytes} bytes, but shape {list(shape)} of {dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    # frames are exclusively ours once received; pyzmq only exposes them read-only, for which
    # torch warns once per process: spent at import (_spend_frombuffer_warning), it is silent
    # from then on, but where torch.set_warn_always(True) made it warn every time
    if torch.is_warn_always_enabled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(view, dtype=torch.uint8)
    else:
        raw = torch.frombuffer(view, dtype=torch.uint8)
    if raw.data_ptr() % min(itemsize, _ALIGN):  # misaligned for its dtype: copy (small frames)
        raw = raw.clone()
    return raw.view(dtype).reshape(tuple(shape))


def tensor_over_segment(buf: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over a whole shared-memory segment (size already checked) that owns its storage:
    no view of another tensor, so that :func:`sole_segment` can tell when nothing else uses it."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    return torch.empty(0, dtype=dtype).set_(  # type: ignore[call-overload]  # stride: contiguous
        raw.untyped_storage(), 0, tuple(shape))


def sole_segment(t: torch.Tensor) -> tuple[int, str] | None:
    """The descriptor and name of the received shared-memory segment that ``t`` spans exactly and
    alone (no view of it, no other tensor on its storage, not saved by autograd), else None."""
    held = _shm.held_segment(t.data_ptr(), t.nbytes)  # (most tensors: one dict lookup, None)
    if (held is None or t._base is not None or t.device.type != "cpu" or t.storage_offset()
            or not t.is_contiguous() or t.is_conj() or t.is_neg()):
        return None
    if t._use_count() != 1:  # type: ignore[attr-defined]  # also held from C++ (autograd)
        return None
    storage = t.untyped_storage()
    # two references: t's and the Python object `storage`; more means another tensor shares it
    if torch._C._storage_Use_Count(storage._cdata) != 2 or storage.nbytes() != t.nbytes:
        return None
    return held
