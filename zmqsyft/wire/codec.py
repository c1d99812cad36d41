"""Messages ↔ ZeroMQ frames: ``[header, *tensor buffers]``. No sockets here.

The header is msgpack ``[version, op, request id, body]`` (:mod:`zmqsyft.wire.messages`); the
body's values are encoded by :mod:`zmqsyft.wire.values`, which puts each tensor's bytes in a
frame of its own (or in shared memory). Bare acknowledgements have a fast path both ways.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import LimitExceeded, ProtocolError, UntrustedPayload
from . import shm as _shm
from .bodies import Acks
from .messages import PROTOCOL_VERSION, Message, ObjRef, Op
from .values import Decoder, Encoder, Ext, ShmPolicy

__all__ = ["Frames", "encode_message", "decode_message", "check_size", "encode_ack", "ack_id",
           "unpack_acks"]

_OPS = {int(op): op for op in Op}
_REPLY = int(Op.REPLY)
_unpackb = msgpack.unpackb
_new_ext, _ExtType, _REF_CODE = tuple.__new__, msgpack.ExtType, int(Ext.REF)
_local = threading.local()  # each thread's packer for the fast path of encode_message
# an acknowledgement's header up to its request id: fixarray(4), the version, REPLY
_ACK_HEAD = b"\x94" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb(_REPLY)


class Frames(list):
    """A message's frames; ``shm_bytes`` counts the tensor bytes that went through shared memory,
    ``segments`` names the segments written for it (their sender unlinks them once the request
    is over: :func:`zmqsyft.wire.shm.discard`)."""

    shm_bytes = 0
    segments: tuple[str, ...] = ()



def encode_message(op: Op, req_id: int, body: Any, allow_pickle: bool = False,
                   shm: ShmPolicy | None = None) -> Frames:
    """Encode a message as ``[header, *tensor buffers]`` ready for ``send_multipart(copy=False)``.

    ``body`` is a typed body (:mod:`zmqsyft.wire.bodies`) or a plain map.
    """
    if type(body) is not dict:
        body = body.to_wire()
    packer = _local.__dict__.get("packer")
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_refs_only, strict_types=True,
                                                use_bin_type=True)
    try:  # the common message: plain values and object references (no tensor, no nesting)
        return Frames([packer.pack([PROTOCOL_VERSION, int(op), req_id, body])])
    except (_Other, TypeError, ValueError, OverflowError):  # (the packer starts afresh)
        pass  # the full encoder encodes it, or says why it cannot
    enc = Encoder(allow_pickle=allow_pickle, shm=shm)
    try:
        header = enc.pack([PROTOCOL_VERSION, int(op), req_id, body])
    except BaseException:
        _shm.discard(enc.segments)  # (written for a message that will never leave)
        raise
    frames = Frames([header, *enc.buffers])
    if enc.shm_bytes:
        frames.shm_bytes = enc.shm_bytes
        frames.segments = tuple(enc.segments)
    return frames


class _Other(Exception):
    """A value the one-level fast path of :func:`encode_message` leaves to the full encoder."""


def _refs_only(obj: Any) -> Any:
    if type(obj) is ObjRef:  # (values.ref_ext, inline)
        return _new_ext(_ExtType, (_REF_CODE, obj.id.to_bytes(8, "big", signed=False)))
    raise _Other


def check_size(frames: list[Any], limit: int, what: str, worker: str) -> None:
    """Refuse (``LimitExceeded``) a message over the worker's ``max_message_size`` (``limit``;
    ``<= 0``: none): the worker's libzmq would close the connection it came on."""
    if limit <= 0:
        return
    size = sum(memoryview(f).nbytes for f in frames)
    if size > limit:
        _shm.discard(getattr(frames, "segments", ()))  # (never sent: nobody will map them)
        raise LimitExceeded(
            f"{what} to worker '{worker}' would be a message of {size / 2**20:,.1f} MiB; the "
            f"worker accepts at most {limit / 2**20:,.1f} MiB (its Config.max_message_size: a "
            "larger one would close this connection). Send smaller tensors, or start the worker "
            "with a larger --max-message-size / ZMQSYFT_MAX_MESSAGE_SIZE. Nothing was sent")


def encode_ack(req_id: int) -> Frames:
    """``encode_message(Op.REPLY, req_id, {})``, without the extension machinery."""
    if 0 < req_id < 128:  # (msgpack: a positive fixint is the byte itself)
        return Frames([_ACK_HEAD + bytes((req_id, 0x80))])
    return Frames([msgpack.packb([PROTOCOL_VERSION, _REPLY, req_id, {}])])


def ack_id(frame: Any) -> int:
    """The request id if ``frame`` is a whole empty ``REPLY`` (as :func:`encode_ack` makes it),
    else 0: the common answer read without the extension machinery."""
    if type(frame) is not bytes or len(frame) > 16:
        return 0
    if len(frame) == 5 and frame[4] == 0x80 and frame[3] < 0x80 and frame.startswith(_ACK_HEAD):
        return frame[3]  # (the common form, read without msgpack: a positive fixint id, or 0)
    try:
        raw = msgpack.unpackb(frame)
    except Exception:  # noqa: BLE001 - not ours to judge: the full decoder will say what is wrong
        return 0
    if (type(raw) is list and len(raw) == 4 and raw[0] == PROTOCOL_VERSION and raw[1] == _REPLY
            and type(raw[2]) is int and raw[2] > 0 and raw[3] == {}):
        return raw[2]
    return 0


def unpack_acks(msg: Message) -> list[int]:
    """The request ids an ``ACKS`` message acknowledges (checked: ``ProtocolError`` if not)."""
    return Acks.from_wire(msg.body).ids


def decode_message(frames: Sequence[Any], trusted: bool = False, shm: bool = False) -> Message:
    """Decode ``[header, *buffers]`` into a :class:`Message`.

    Raises
    ------
    ProtocolError
        If anything about the message is malformed (never any other exception type).
    """
    if not frames:
        raise ProtocolError("empty message")
    dec = Decoder(frames[1:], trusted=trusted, shm=shm)
    try:
        first = frames[0]
        header = _unpackb(first if type(first) is bytes else bytes(memoryview(first)),
                          ext_hook=dec._ext_hook, strict_map_key=False, raw=False, use_list=True)
    except (ProtocolError, UntrustedPayload):
        raise
    except Exception as exc:  # malformed input of any kind
        raise ProtocolError(f"undecodable header: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, list) or len(header) != 4:
        raise ProtocolError("header is not [version, op, request_id, body]")
    version, op, req_id, body = header
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} received, this side speaks {PROTOCOL_VERSION}; "
            "install the same zmqsyft version on both sides"
        )
    if not isinstance(req_id, int) or isinstance(req_id, bool) or not isinstance(body, dict):
        raise ProtocolError("malformed header fields")
    try:
        op = _OPS[op]
    except (KeyError, TypeError):
        raise ProtocolError(f"unknown op {op!r}") from None
    msg = Message(op, req_id, body)
    if dec.shm_bytes:
        msg.shm_bytes = dec.shm_bytes
    return msg
