"""Protocol constants and message shapes. No I/O here.

Wire format (protocol version 10)
================================

Every message is a ZeroMQ multipart message. Between a DEALER and a ROUTER the ROUTER side sees
one extra leading routing-id frame; apart from that both directions look the same::

    frame 0        header: msgpack array  [version, op, request_id, body]
    frame 1..n     raw tensor bytes, one frame per tensor, referenced from the body by index

=============  =====================================================================
field          meaning
=============  =====================================================================
version        ``PROTOCOL_VERSION``; a peer speaking another version gets an error
op             an :class:`Op`; replies use ``Op.REPLY`` or ``Op.ERROR``
request_id     chosen by the sender, unique per connection; a reply carries the id of
               its request. ``0`` is reserved for messages that want no reply.
body           a msgpack map whose values may hold zmqsyft extension types
               (tuples, slices, dtypes, tensors, object refs, pointer descriptors;
               see :mod:`zmqsyft.wire.codec`). No pickle, ever, unless the receiving worker
               trusts the sender (``Ext.PICKLE``).
=============  =====================================================================

Request and reply bodies, key by key, are typed in :mod:`zmqsyft.wire.bodies`, whose table is
rendered from them.

An ``ERROR`` reply's body holds ``error``: the encoded exception (see :mod:`zmqsyft.wire.exc_codec`).

``ACKS`` (request id 0, body ``ids``: a list of request ids) answers several requests at once
with an empty ``REPLY`` each. A worker sends it instead of separate empty replies when one turn
of its loop answered more than one request of the same peer successfully with nothing to return
(pipelined ops with caller-chosen result ids, deletes): one message instead of hundreds. It is
always sent before any other reply to that peer, so replies never overtake acknowledgements.

``BATCH`` (request id 0, body ``msgs``: a list of complete single-frame messages, each a header
as above) carries several requests the other way: a client's pipelined ops that queued up while
the worker was still busy with earlier ones. The receiver handles them one by one, in order,
exactly as if they had come as separate messages from the same sender (a batch inside a batch
is refused). One message instead of dozens saves a wake-up of both ends' I/O threads and a turn
of the worker's loop per op.

``BULK`` (either way; the request id of the message it stands for) takes the place of a large
message whose frames travel sealed (AES-256-GCM) on the receiver's bulk socket instead
(:mod:`zmqsyft.wire.bulk`): the receiver handles the message, once its blob is complete, at the
marker's place in the connection's order.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = ["PROTOCOL_VERSION", "Op", "NO_REPLY", "op_name", "salvage_req_id"]

PROTOCOL_VERSION = 11  # 2: ACKS; 3: BATCH; 4: HANDOVER, segments in a per-user directory;
# 5: typed bodies, every key checked (MOVE no longer carries the unused 'dest' name);
# 6: CURVE keys in pointer descriptors and MOVE, sessions in HELLO, GIVE and ALLOW;
# 7: BULK (large messages sealed beside the CURVE connection, zmqsyft.wire.bulk);
# 8: privacy labels in PUT and GET replies (zmqsyft.privacy); 9: tensors carry their .grad;
# 10: tags and descriptions in PUT, GET and SEARCH replies, TAG (zmqsyft.wire.tags)
# 11: pointer descriptors name the holder's incarnation, GIVE the receiver's session
NO_REPLY = 0


class Op(IntEnum):
    """Message kinds on the wire."""

    REPLY = 0
    ERROR = 1
    HELLO = 2
    PUT = 3
    GET = 4
    CALL = 5
    DEL = 6
    MOVE = 7
    REMOTE_GET = 8
    OBJECTS = 9
    FLUSH = 10
    PING = 11
    STATS = 12
    SHUTDOWN = 13
    SEARCH = 14
    RUN = 15
    ACKS = 16
    BATCH = 17
    GIVE = 18
    ALLOW = 19
    BULK = 20
    TAG = 21


def op_name(op: int) -> str:
    """Readable name of an op code, also for codes this version does not know."""
    try:
        return Op(op).name
    except ValueError:
        return f"<unknown op {op}>"


class Message:
    """A decoded message: op, request id and body (tensor frames already rebuilt into the body)."""

    __slots__ = ("op", "req_id", "body", "shm_bytes")

    def __init__(self, op: Op, req_id: int, body: dict) -> None:
        self.op = op
        self.req_id = req_id
        self.body = body
        self.shm_bytes = 0  # tensor bytes that came through shared memory, not in the frames

    def __repr__(self) -> str:
        keys = ", ".join(sorted(map(str, self.body)))
        return f"<Message {self.op.name} req={self.req_id} body=[{keys}]>"


class ObjRef:
    """A reference to an object in the *receiving* worker's store, by id."""

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:  # noqa: A002
        self.id = id

    def __repr__(self) -> str:
        return f"ObjRef({self.id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjRef) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("ObjRef", self.id))


class PointerDesc:
    """Everything needed to rebuild a pointer on the receiving side.

    ``location``/``address`` name the worker holding the object ``id_at_location``, and ``key`` is
    that worker's public key (Z85 text; ``""`` for an insecure worker): whoever connects to
    ``address`` on the strength of this descriptor talks only to the holder of that key.
    ``ptr_id`` is the pointer's own id (the key it is stored under when it is itself sent);
    ``owned`` says whether the receiver becomes the owner that frees the object.
    ``incarnation`` names the process of that worker the object lives in (its ``HELLO`` reply's
    ``incarnation``; ``""``: unknown, as in a 9-field descriptor of protocol 9): a worker at
    ``address`` with another incarnation was restarted, and the object is gone.
    """

    __slots__ = ("location", "address", "id_at_location", "ptr_id", "shape", "dtype",
                 "requires_grad", "owned", "key", "incarnation")

    def __init__(self, location: str, address: str, id_at_location: int, ptr_id: int,
                 shape: tuple[int, ...], dtype: str, requires_grad: bool, owned: bool,
                 key: str = "", incarnation: str = "") -> None:
        self.location = location
        self.address = address
        self.id_at_location = id_at_location
        self.ptr_id = ptr_id
        self.shape = tuple(shape)
        self.dtype = dtype
        self.requires_grad = requires_grad
        self.owned = owned
        self.key = key
        self.incarnation = incarnation

    def as_list(self) -> list:
        """The descriptor as the wire carries it (``Ext.PTR``): its fields in order; the
        incarnation, last, only when it is known."""
        out = [self.location, self.address, self.id_at_location, self.ptr_id, list(self.shape),
               self.dtype, self.requires_grad, self.owned, self.key]
        if self.incarnation:
            out.append(self.incarnation)
        return out

    def __repr__(self) -> str:
        return (f"PointerDesc({self.location}:{self.id_at_location} @ {self.address}, "
                f"ptr_id={self.ptr_id}, shape={self.shape}, dtype={self.dtype}, owned={self.owned})")


class Summary:
    """A stand-in for an object too large (or not meant) to travel whole; prints as its text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def salvage_req_id(header: Any) -> int:
    """Best effort: the request id in a message header that failed to decode (0 if none), so
    that the request can still be answered, or its waiter told why."""
    import msgpack

    try:
        raw = msgpack.unpackb(bytes(memoryview(header)), strict_map_key=False,
                              ext_hook=lambda code, data: None)
        req_id = raw[2]
        return req_id if isinstance(req_id, int) and not isinstance(req_id, bool) and req_id > 0 else 0
    except Exception:  # noqa: BLE001
        return 0
