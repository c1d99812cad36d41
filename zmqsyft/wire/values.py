"""Values ↔ msgpack with extension types, tensors out of band. No sockets here.

A message is ``[header, buf0, buf1, ...]``. The header is msgpack; Python types that msgpack does
not carry travel as msgpack extension types (table below). A tensor travels as an ``Ext.TENSOR``
entry in the header (buffer index, dtype, shape) and its raw bytes as its own frame, handed to
ZeroMQ without a copy and rebuilt on arrival with ``torch.frombuffer`` over the received frame.

=====  ============  ========================================================================
code   name          payload (msgpack)
=====  ============  ========================================================================
1      TUPLE         list of values
2      TENSOR        ``[buffer index, dtype name, shape, requires_grad(, grad)]``: ``grad``, the
                     tensor's ``.grad`` (itself a tensor value), only when it has one
3      REF           object id in the receiver's store, 8 bytes big-endian (not msgpack)
4      PTR           pointer descriptor list (:class:`~zmqsyft.wire.messages.PointerDesc`): 9
                     fields, a 10th (the holder's incarnation) when it is known
5      SLICE         ``[start, stop, step]``
6      ELLIPSIS      nil
7      DTYPE         dtype name, e.g. ``"float32"``
8      SIZE          list of ints (``torch.Size``)
9      DEVICE        device string
10     COMPLEX       ``[real, imag]``
11     SUMMARY       text (:class:`~zmqsyft.wire.messages.Summary`)
12     PICKLE        cloudpickle bytes: only decoded by a receiver that trusts the sender
13     MEMFMT        memory format name
14     SHM           ``[segment name, dtype name, shape, requires_grad(, grad)]``: a tensor whose bytes
                     are in a shared-memory segment (:mod:`zmqsyft.wire.shm`), same-host peers only
15     HANDOVER      ``[pid, fd, segment name, dtype name, shape, requires_grad(, grad)]``: a tensor
                     the sender gives up whose bytes are a segment it holds open (same host)
=====  ============  ========================================================================

Tensors of at least ``shm_threshold`` bytes bound for a peer on the same machine (see
:class:`ShmPolicy`) travel as ``Ext.SHM`` instead of a frame: written once into ``/dev/shm``,
mapped by the receiver. A tensor wrapped in :class:`Handover` (a worker moving it away) that is
itself such a mapping, and shares its memory with nothing else, travels as ``Ext.HANDOVER``: the
receiver maps the same memory, nothing is copied.

Decoding never evaluates anything: dtype and memory-format names resolve through fixed tables,
tensor sizes are checked against their frames, and an ``Ext.PICKLE`` is refused unless the
decoder was built with ``trusted=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack
import torch

from ..errors import ProtocolError, SerializationError, UntrustedPayload
from . import shm as _shm
from .messages import ObjRef, PointerDesc, Summary
from .tensors import (
    DTYPES,
    dtype_name,
    sole_segment,
    tensor_buffer,
    tensor_from_buffer,
    tensor_over_segment,
)

__all__ = ["Ext", "Encoder", "Decoder", "ShmPolicy", "Handover", "MAX_DEPTH"]


class Ext(IntEnum):
    """msgpack extension codes of the zmqsyft value codec."""

    TUPLE = 1
    TENSOR = 2
    REF = 3
    PTR = 4
    SLICE = 5
    ELLIPSIS = 6
    DTYPE = 7
    SIZE = 8
    DEVICE = 9
    COMPLEX = 10
    SUMMARY = 11
    PICKLE = 12
    MEMFMT = 13
    SHM = 14
    HANDOVER = 15


class Handover:
    """A tensor its sender gives up once the message is confirmed (a worker moving it away).

    Encoded like the tensor itself, unless the receiver is on this host and the tensor is a
    received shared-memory segment that nothing else here uses: then the receiver takes over the
    segment (``Ext.HANDOVER``) instead of getting a copy. The sender must keep the tensor alive
    until the receiver has answered.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class ShmPolicy(NamedTuple):
    """When a sender puts tensors into shared memory instead of frames.

    ``use()`` says whether the receiver shares this machine's ``/dev/shm``; it is asked at most
    once per message, and only when a tensor of at least ``threshold`` bytes is met.
    ``max_age`` is how long an untaken segment is kept before the sender unlinks it.
    """

    use: Callable[[], bool]
    threshold: int
    max_age: float


_MEMFMTS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
_MEMFMT_NAMES = {v: k for k, v in _MEMFMTS.items()}
_REF = int(Ext.REF)
# hot-path constructors that skip a Python-level __init__/__new__ frame each: msgpack's ExtType
# is a namedtuple whose __new__ re-checks its fields (ours are right by construction), and an
# ObjRef is one slot
_Packer, _unpackb = msgpack.Packer, msgpack.unpackb
_ExtType = msgpack.ExtType
_new_ext = tuple.__new__
_new_ref = object.__new__
MAX_DEPTH = 64  # nesting of extension values (tuples in tuples ...) a decoder accepts


class Encoder:
    """Encodes one message's values; collects tensor buffers to send as their own frames.

    Parameters
    ----------
    allow_pickle : bool
        If true, values of other types are cloudpickled (``Ext.PICKLE``); only for peers that
        trust us. If false, they raise ``SerializationError``.
    """

    def __init__(self, allow_pickle: bool = False, shm: ShmPolicy | None = None) -> None:
        self.buffers: list[Any] = []
        self.allow_pickle = allow_pickle
        self.shm = shm
        self._shm_ok: bool | None = None
        self.shm_bytes = 0
        self.segments: list[str] = []  # the shared-memory segments written for this message

    def pack(self, value: Any) -> bytes:
        try:
            return _Packer(default=self._default, strict_types=True, use_bin_type=True).pack(value)
        except (SerializationError, ProtocolError):
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"cannot encode value: {exc}") from exc

    def _ext(self, code: Ext, payload: Any) -> msgpack.ExtType:
        # (ExtType's own __new__ checks its arguments in Python: these are right by construction)
        return _new_ext(_ExtType, (int(code), self.pack(payload)))

    def _default(self, obj: Any) -> Any:
        if type(obj) is ObjRef:  # the most frequent extension: a fixed 8 bytes, no nesting
            return _new_ext(_ExtType, (_REF, obj.id.to_bytes(8, "big", signed=False)))
        if type(obj) is Handover:
            return self._handover(obj.tensor) or self._default(obj.tensor)
        # exact builtin subclasses (IntEnum, str subclasses) degrade to their base type
        if isinstance(obj, bool):
            return bool(obj)
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
                raise SerializationError(
                    f"cannot send a {type(obj).__name__} as a tensor; pointers travel as pointers"
                )
            buf = tensor_buffer(obj)
            meta = _meta(obj)
            nbytes = len(buf)
            if self.shm is not None and nbytes >= self.shm.threshold > 0:
                if self._shm_ok is None:
                    self._shm_ok = bool(self.shm.use())
                if self._shm_ok:
                    try:
                        name = _shm.write(buf, self.shm.max_age)
                    except OSError:  # /dev/shm full or gone: the socket carries it, and the rest
                        self._shm_ok = False
                    else:
                        self.segments.append(name)
                        self.shm_bytes += nbytes
                        return self._ext(Ext.SHM, [name, *meta])
            self.buffers.append(buf)
            return self._ext(Ext.TENSOR, [len(self.buffers) - 1, *meta])
        if isinstance(obj, torch.Size):
            return self._ext(Ext.SIZE, list(obj))
        if isinstance(obj, tuple):
            return self._ext(Ext.TUPLE, list(obj))
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, PointerDesc):
            return self._ext(Ext.PTR, obj.as_list())
        if isinstance(obj, slice):
            return self._ext(Ext.SLICE, [obj.start, obj.stop, obj.step])
        if obj is Ellipsis:
            return self._ext(Ext.ELLIPSIS, None)
        if isinstance(obj, torch.dtype):
            return self._ext(Ext.DTYPE, dtype_name(obj))
        if isinstance(obj, torch.device):
            return self._ext(Ext.DEVICE, str(obj))
        if isinstance(obj, complex):
            return self._ext(Ext.COMPLEX, [obj.real, obj.imag])
        if isinstance(obj, Summary):
            return self._ext(Ext.SUMMARY, obj.text)
        if isinstance(obj, torch.memory_format):
            return self._ext(Ext.MEMFMT, _MEMFMT_NAMES[obj])
        if self.allow_pickle:
            import cloudpickle

            return msgpack.ExtType(int(Ext.PICKLE), cloudpickle.dumps(obj))
        raise SerializationError(
            f"cannot send a value of type {type(obj).__module__}.{type(obj).__qualname__} without "
            "pickle; tensors, numbers, strings, bytes, None, lists, tuples, dicts, slices, dtypes "
            "and pointers travel as they are"
        )


    def _handover(self, t: Any) -> msgpack.ExtType | None:
        """``Ext.HANDOVER`` for a tensor whose segment the receiver can take over, else None."""
        if self.shm is None or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
        if self._shm_ok is None:
            self._shm_ok = bool(self.shm.use())
        held = sole_segment(t) if self._shm_ok else None
        if held is None:
            return None
        self.shm_bytes += t.nbytes
        return self._ext(Ext.HANDOVER, [os.getpid(), *held, *_meta(t)])


class Decoder:
    """Decodes one message's header, rebuilding tensors over the received frames.

    Parameters
    ----------
    frames : sequence of buffers
        The message's frames after the header.
    trusted : bool
        Whether ``Ext.PICKLE`` payloads may be unpickled (only for trusted senders).
    """

    def __init__(self, frames: Sequence[Any], trusted: bool = False, shm: bool = False) -> None:
        self.frames = frames
        self.trusted = trusted
        self.shm = shm
        self.shm_bytes = 0
        self._depth = 0

    def unpack(self, data: bytes) -> Any:
        return _unpackb(data, ext_hook=self._ext_hook, strict_map_key=False, raw=False,
                        use_list=True)

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == _REF and len(data) == 8:  # the most frequent extension, never nested
            ref = _new_ref(ObjRef)
            ref.id = int.from_bytes(data, "big", signed=False)
            return ref
        # every nesting level is a C-level msgpack call: bound it before the C stack overflows
        if self._depth >= MAX_DEPTH:
            raise ProtocolError(f"values nested deeper than {MAX_DEPTH} levels are refused")
        self._depth += 1
        try:
            return self._ext(code, data)
        finally:
            self._depth -= 1

    def _ext(self, code: int, data: bytes) -> Any:  # noqa: C901 - a flat table
        if code == Ext.PICKLE:
            if not self.trusted:
                raise UntrustedPayload(
                    "a pickled payload was refused: this side does not trust its sender with "
                    "pickle; tensors, numbers, strings, containers and pointers need no pickle"
                )
            import cloudpickle

            return cloudpickle.loads(data)
        if code == Ext.REF:  # a well-formed one was taken in _ext_hook already
            raise ProtocolError("an object reference must be 8 bytes")
        payload = self.unpack(data)
        if code == Ext.TUPLE:
            return tuple(payload)
        if code == Ext.TENSOR:
            if not isinstance(payload, list) or len(payload) not in (4, 5):
                raise ProtocolError(f"malformed tensor {payload!r}")
            index, dname, shape, requires_grad = payload[:4]
            dtype = _lookup(DTYPES, dname, "dtype")
            if not isinstance(index, int) or not 0 <= index < len(self.frames):
                raise ProtocolError(f"tensor refers to frame {index!r}, message has {len(self.frames)}")
            t = tensor_from_buffer(self.frames[index], dtype, shape)
            return _with_grad(t, requires_grad, payload[4:])
        if code == Ext.SHM or code == Ext.HANDOVER:
            return self._shm_tensor(code, payload)
        if code == Ext.PTR:
            if not isinstance(payload, list) or len(payload) not in (9, 10):
                raise ProtocolError(f"malformed pointer descriptor {payload!r}")
            loc, addr, idl, pid, shape, dname, rg, owned, key = payload[:9]
            _lookup(DTYPES, dname, "dtype")
            incarnation = str(payload[9])[:64] if len(payload) > 9 else ""  # ("": unknown)
            return PointerDesc(str(loc), str(addr), _int(idl), _int(pid), tuple(map(_int, shape)),
                               dname, bool(rg), bool(owned), str(key)[:64], incarnation)
        if code == Ext.SLICE:
            return slice(*payload)
        if code == Ext.ELLIPSIS:
            return Ellipsis
        if code == Ext.DTYPE:
            return _lookup(DTYPES, payload, "dtype")
        if code == Ext.SIZE:
            return torch.Size(map(_int, payload))
        if code == Ext.DEVICE:
            return torch.device(str(payload))
        if code == Ext.COMPLEX:
            return complex(*payload)
        if code == Ext.SUMMARY:
            return Summary(str(payload))
        if code == Ext.MEMFMT:
            return _lookup(_MEMFMTS, payload, "memory format")
        raise ProtocolError(f"unknown extension type {code}")

    def _shm_tensor(self, code: int, payload: Any) -> torch.Tensor:
        """A tensor over a segment: ``Ext.SHM`` names it, ``Ext.HANDOVER`` adds pid and fd."""
        if not self.shm:
            raise ProtocolError(
                "a shared-memory tensor came from a peer not known to share this machine's "
                "/dev/shm (its HELLO did not match); refused")
        cut = 1 if code == Ext.SHM else 3
        if not isinstance(payload, list) or len(payload) not in (cut + 3, cut + 4):
            raise ProtocolError(f"malformed shared-memory tensor {payload!r}")
        ref, (dname, shape, requires_grad) = payload[:cut], payload[cut:cut + 3]
        dtype = _lookup(DTYPES, dname, "dtype")
        if not isinstance(shape, list) or any(type(s) is not int or s < 0 for s in shape):
            raise ProtocolError(f"invalid tensor shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes <= 0:
            raise ProtocolError("a shared-memory tensor cannot be empty")
        buf = (_shm.open_segment(ref[0], nbytes) if cut == 1
               else _shm.take_over(ref[0], ref[1], ref[2], nbytes))
        t = tensor_over_segment(buf, dtype, shape)
        self.shm_bytes += nbytes
        return _with_grad(t, requires_grad, payload[cut + 3:])


def _meta(t: torch.Tensor) -> list[Any]:
    """A tensor's wire metadata: dtype name, shape, requires_grad, and its gradient if it has
    one (a leaf's, or a non-leaf's that retains it), as PySyft sends it."""
    rg = bool(t.requires_grad)  # (a tensor that does not require grad is a leaf)
    meta = [dtype_name(t.dtype), list(t.shape), rg]
    grad = t._grad if not rg or t.is_leaf or t.retains_grad else None
    if grad is not None:
        meta.append(grad.detach())
    return meta


def _with_grad(t: torch.Tensor, requires_grad: Any, grad: list[Any]) -> torch.Tensor:
    """``t`` requiring grad as it did on the sender, with the gradient it had there."""
    try:
        if requires_grad:
            t.requires_grad_(True)
        if grad:
            if type(grad[0]) is not torch.Tensor:
                raise ProtocolError(f"a tensor's gradient must be a tensor, not {grad[0]!r}")
            t.grad = grad[0]
    except RuntimeError as exc:  # a dtype that cannot require grad, a gradient that does not fit
        raise ProtocolError(f"a tensor's autograd state does not fit it: {exc}") from None
    return t


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"expected an integer, got {type(value).__name__}")
    return value


def _lookup(table: dict[str, Any], name: Any, what: str) -> Any:
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ProtocolError(f"unknown {what} {name!r}") from None
