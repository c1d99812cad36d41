"""Typed message bodies: one small class per request and per reply, and the wire table they make.

Every body on the wire is a msgpack map. The classes below are the only place its keys are named:
a sender builds one (``Put(id=7, obj=t)``) and encodes it with :meth:`Body.to_wire`; a receiver
checks what came with :meth:`Body.from_wire`, which fills in defaults, ignores keys it does not
know and raises :class:`~zmqsyft.errors.ProtocolError` naming the op and the key for a value of
the wrong kind. The table in this module's docstring, and so in the docs, is rendered from
these classes by :func:`wire_table` and a test keeps the two identical.

Every request, then ``>`` each key of its body and ``<`` each key of its reply (none: an empty
acknowledgement); ``key?`` is optional, with a default::

    HELLO       The first message of every connection.
                > peer?: str - the sender's name, for the traffic counters
                > trust?: str - a trust token: a match lets this connection send pickled payloads
                > host?: str - the sender's host key: a match lets both ends use shared memory
                > session?: str - the sender's session id: what it stores is kept for the session
                    while it is connected, and for the lease after
                > bulk?: str - a 32-byte secret (Z85) for this connection's sealed bulk channel
                    (zmqsyft.wire.bulk); '' for none
                > sealed_replies?: bool - whether large replies may come sealed on that channel too
                    (a peer link sends sealed requests only)
                < id: str - the worker's name
                < pid?: int - its process id (0: not told)
                < version?: int - its protocol version
                < address?: str - the endpoint it is bound to
                < trusted?: bool - whether the trust token matched
                < host?: str - the worker's host key
                < shm?: bool - whether it accepts shared-memory tensors from this connection
                < max_message_size?: int - the largest message it accepts, bytes (-1: any; 0: not
                    told)
                < worker_key?: str - its public key ('': insecure)
                < principal?: str - the name it knows the caller by (its key's)
                < admin?: bool - whether the caller is one of its admins
                < lease_ms?: int - how long it keeps a session's objects once its last connection
                    closed, ms (the caller keeps a connection alive more often)
                < bulk?: str - its bulk endpoint, where large messages go sealed ('': none, send
                    them on this connection)
                < incarnation?: str - this worker process's random id ('': not told); another one at
                    the same address means the worker was restarted
                < started_ms?: int - when this worker process started, ms since the epoch
    PUT         Store a value.
                > id: object id - the id to store it under
                > obj: value - a tensor, a pointer descriptor, a number, ...
                > owner?: str - a principal's key: store it for that principal instead of the sender
                    (a move on a client's behalf); '' for the sender
                > labels?: [policy] - the policies of the data owners whose private data it derives
                    from (zmqsyft.privacy)
                > tags?: [str] - search tags: a tagged tensor is published (see TAG)
                > description?: str - what it is, shown with it in search results ('': none)
    GET         Take an object away (``get`` is destructive).
                > id: object id - the object
                > handover?: object id or 0 - an id the caller chose: a tensor received through
                    shared memory that nothing else uses comes as a hand-over and is kept under this
                    id until the caller deletes it
                < obj?: value - the object (a pointer comes as a descriptor)
                < labels?: [policy] - to a worker the data's owners trust: the policies of the
                    owners whose private data it derives from
                < tags?: [str] - its search tags
                < description?: str - its description ('': none)
    CALL        Run an allow-listed op where its arguments are.
                > fn: op name - the allow-listed op name (torch.add, torch.Tensor.__add__, ...)
                > args?: list - positional arguments; objects here as references
                > kwargs?: map - keyword arguments
                > out?: [[id, shape, dtype, requires_grad]] or nil - ids for the tensor results in
                    flattened order, with the inferred shape, dtype and requires_grad; nil: reply
                    the result
                > grad?: bool - the caller's grad mode
                > hops?: int - how many workers relayed it so far (chains end at 32)
                < result?: value - when 'out' was nil: the result, tensors as pointer descriptors
    DEL         Free objects (cascading along the pointers they own).
                > ids: [object id] - the objects
    MOVE        Push an object straight to another worker; free it here once that one has it.
                > id: object id - the object
                > dest_address: str - the address of the worker to move it to
                > dest_key?: str - that worker's public key ('': insecure)
                < collapsed?: pointer descriptor or nil - the object was a pointer to
                    'dest_address': what it pointed to, which is where the data is now
    REMOTE_GET  The object is a pointer: fetch what it points to and keep that in its place.
                > id: object id - the pointer
    OBJECTS     A snapshot of the store (the synchronisation point behind ``_objects``).
                < objects?: map - id -> value; large tensors summarised
    FLUSH       Answered once everything relayed before has been handled downstream (recursively).
    PING        An empty round trip.
                < id: str - the worker's name
    STATS       The worker's counters.
                < id: str - the worker's name
                < objects: int - how many objects it holds
                < counters?: map - dropped, refused and late messages, shm bytes
                < peers?: map - per principal: messages, bytes, largest message, each way
                < principals?: map - per principal: objects, bytes, sessions, connections
    SHUTDOWN    Reply, then exit.
    SEARCH      Find published tensors (the worker's own data, tagged objects) by tags.
                > tags: [str] - every tag an object must carry (none: every tagged tensor)
                < results?: [pointer descriptor] - non-owning pointer descriptors
                < tags?: [[str]] - each result's tags
                < descriptions?: [str] - each result's description ('': none)
    TAG         (the owner only) Add search tags to an object, publishing it; set its description.
                > id: object id - the object
                > tags?: [str] - tags to add
                > description?: str or nil - its new description (nil: unchanged)
    RUN         Run a user function (trusted senders only: it is pickled).
                > fn: pickled callable - the function
                > args?: list - positional arguments; objects here as references
                > kwargs?: map - keyword arguments
                > grad?: bool - the caller's grad mode
                < result?: value - the result, tensors kept here as pointer descriptors
    GIVE        Hand objects to another principal: ownership (the sender's own objects), or read-only use.
                > ids: [object id] - the objects
                > to: str - the principal's public key (one the worker knows)
                > read_only?: bool - share them to compute with instead of giving them away
                > session?: str - the receiver's session to keep them for: a worker's incarnation
                    (its links to its peers name it as their session), a client's session id; '' for
                    the principal's default session
    ALLOW       (admins only) Accept connections from more keys: a spawning client's other workers.
                > keys: map - name -> public key
    ACKS        (request id 0) empty replies to several requests at once.
                > ids: [request id] - the request ids
    BATCH       (request id 0) several requests, handled in order as if each had come alone.
                > msgs: [bytes] - complete single-frame messages (no BATCH among them)
    BULK        (either way) stands for a large message sent sealed on the receiver's bulk socket.
                > blob: int - the blob holding the message's frames (zmqsyft.wire.bulk)
                > frames: int - how many frames it has
                > nbytes: int - how many bytes they hold
    ERROR       A failed request's reply.
                < error: map - the encoded exception (zmqsyft.wire.exc_codec)

"""

from __future__ import annotations

from typing import Any

from .messages import Op, PointerDesc
from .schema import (
    ANY,
    BOOL,
    CALLABLE,
    DESCS,
    FRAMES,
    HOLD_ID,
    IDS,
    INT,
    LABELS,
    LIST,
    MAP,
    OBJ_ID,
    OP_NAME,
    OPT_DESC,
    OPT_STR,
    OUT,
    REPLIES,
    REQ_IDS,
    REQUESTS,
    STR,
    TAG_LISTS,
    TAGS,
    Body,
    body,
    key,
    wire_table,
)

__all__ = ["Body", "REQUESTS", "REPLIES", "wire_table", "Hello", "HelloReply", "Put", "Get",
           "GetReply", "Call", "CallReply", "Del", "Move", "MoveReply", "RemoteGet", "Objects",
           "ObjectsReply", "Flush", "Ping", "PingReply", "Stats", "StatsReply", "Shutdown",
           "Search", "SearchReply", "Tag", "Run", "RunReply", "Give", "Allow", "Acks", "Batch", "Bulk",
           "Error"]

# ------------------------------------------------------------------------ the bodies
@body(Op.HELLO)
class Hello(Body):
    """The first message of every connection."""
    peer: str = key(STR, "the sender's name, for the traffic counters", "")
    trust: str = key(STR, "a trust token: a match lets this connection send pickled payloads", "")
    host: str = key(STR, "the sender's host key: a match lets both ends use shared memory", "")
    session: str = key(STR, "the sender's session id: what it stores is kept for the session "
                       "while it is connected, and for the lease after", "")
    bulk: str = key(STR, "a 32-byte secret (Z85) for this connection's sealed bulk channel "
                    "(zmqsyft.wire.bulk); '' for none", "")
    sealed_replies: bool = key(BOOL, "whether large replies may come sealed on that channel too "
                               "(a peer link sends sealed requests only)", True)


@body(Op.HELLO, reply=True)
class HelloReply(Body):
    id: str = key(STR, "the worker's name")
    pid: int = key(INT, "its process id (0: not told)", 0)
    version: int = key(INT, "its protocol version", 0)
    address: str = key(STR, "the endpoint it is bound to", "")
    trusted: bool = key(BOOL, "whether the trust token matched", False)
    host: str = key(STR, "the worker's host key", "")
    shm: bool = key(BOOL, "whether it accepts shared-memory tensors from this connection", False)
    max_message_size: int = key(INT, "the largest message it accepts, bytes (-1: any; 0: not told)",
                                0)
    worker_key: str = key(STR, "its public key ('': insecure)", "")
    principal: str = key(STR, "the name it knows the caller by (its key's)", "")
    admin: bool = key(BOOL, "whether the caller is one of its admins", False)
    lease_ms: int = key(INT, "how long it keeps a session's objects once its last connection "
                        "closed, ms (the caller keeps a connection alive more often)", 0)
    bulk: str = key(STR, "its bulk endpoint, where large messages go sealed ('': none, send "
                    "them on this connection)", "")
    incarnation: str = key(STR, "this worker process's random id ('': not told); another one at "
                           "the same address means the worker was restarted", "")
    started_ms: int = key(INT, "when this worker process started, ms since the epoch", 0)


@body(Op.PUT)
class Put(Body):
    """Store a value."""
    id: int = key(OBJ_ID, "the id to store it under")
    obj: Any = key(ANY, "a tensor, a pointer descriptor, a number, ...")
    owner: str = key(STR, "a principal's key: store it for that principal instead of the sender "
                     "(a move on a client's behalf); '' for the sender", "")
    labels: list[Any] = key(LABELS, "the policies of the data owners whose private data it "
                            "derives from (zmqsyft.privacy)", [])
    tags: list[str] = key(TAGS, "search tags: a tagged tensor is published (see TAG)", [])
    description: str = key(STR, "what it is, shown with it in search results ('': none)", "")


@body(Op.GET)
class Get(Body):
    """Take an object away (``get`` is destructive)."""
    id: int = key(OBJ_ID, "the object")
    handover: int = key(HOLD_ID, "an id the caller chose: a tensor received through shared memory "
                        "that nothing else uses comes as a hand-over and is kept under this id "
                        "until the caller deletes it", 0)


@body(Op.GET, reply=True)
class GetReply(Body):
    obj: Any = key(ANY, "the object (a pointer comes as a descriptor)", None)
    labels: list[Any] = key(LABELS, "to a worker the data's owners trust: the policies of the "
                            "owners whose private data it derives from", [])
    tags: list[str] = key(TAGS, "its search tags", [])
    description: str = key(STR, "its description ('': none)", "")


@body(Op.CALL)
class Call(Body):
    """Run an allow-listed op where its arguments are."""
    fn: str = key(OP_NAME, "the allow-listed op name (torch.add, torch.Tensor.__add__, ...)")
    args: list[Any] = key(LIST, "positional arguments; objects here as references", [])
    kwargs: dict[str, Any] = key(MAP, "keyword arguments", {})
    out: list[Any] | None = key(OUT, "ids for the tensor results in flattened order, with the "
                                "inferred shape, dtype and requires_grad; nil: reply the result", None)
    grad: bool = key(BOOL, "the caller's grad mode", True)
    hops: int = key(INT, "how many workers relayed it so far (chains end at 32)", 0)


@body(Op.CALL, reply=True)
class CallReply(Body):
    result: Any = key(ANY, "when 'out' was nil: the result, tensors as pointer descriptors", None)


@body(Op.DEL)
class Del(Body):
    """Free objects (cascading along the pointers they own)."""
    ids: list[int] = key(IDS, "the objects")


@body(Op.MOVE)
class Move(Body):
    """Push an object straight to another worker; free it here once that one has it."""
    id: int = key(OBJ_ID, "the object")
    dest_address: str = key(STR, "the address of the worker to move it to")
    dest_key: str = key(STR, "that worker's public key ('': insecure)", "")


@body(Op.MOVE, reply=True)
class MoveReply(Body):
    collapsed: PointerDesc | None = key(OPT_DESC, "the object was a pointer to 'dest_address': what it "
                                        "pointed to, which is where the data is now", None)


@body(Op.REMOTE_GET)
class RemoteGet(Body):
    """The object is a pointer: fetch what it points to and keep that in its place."""
    id: int = key(OBJ_ID, "the pointer")


@body(Op.OBJECTS)
class Objects(Body):
    """A snapshot of the store (the synchronisation point behind ``_objects``)."""


@body(Op.OBJECTS, reply=True)
class ObjectsReply(Body):
    objects: dict[int, Any] = key(MAP, "id -> value; large tensors summarised", {})


@body(Op.FLUSH)
class Flush(Body):
    """Answered once everything relayed before has been handled downstream (recursively)."""


@body(Op.PING)
class Ping(Body):
    """An empty round trip."""


@body(Op.PING, reply=True)
class PingReply(Body):
    id: str = key(STR, "the worker's name")


@body(Op.STATS)
class Stats(Body):
    """The worker's counters."""


@body(Op.STATS, reply=True)
class StatsReply(Body):
    id: str = key(STR, "the worker's name")
    objects: int = key(INT, "how many objects it holds")
    counters: dict[str, int] = key(MAP, "dropped, refused and late messages, shm bytes", {})
    peers: dict[str, Any] = key(MAP, "per principal: messages, bytes, largest message, each way", {})
    principals: dict[str, Any] = key(MAP, "per principal: objects, bytes, sessions, connections", {})


@body(Op.SHUTDOWN)
class Shutdown(Body):
    """Reply, then exit."""


@body(Op.SEARCH)
class Search(Body):
    """Find published tensors (the worker's own data, tagged objects) by tags."""
    tags: list[str] = key(TAGS, "every tag an object must carry (none: every tagged tensor)")


@body(Op.SEARCH, reply=True)
class SearchReply(Body):
    results: list[PointerDesc] = key(DESCS, "non-owning pointer descriptors", [])
    tags: list[list[str]] = key(TAG_LISTS, "each result's tags", [])
    descriptions: list[str] = key(TAGS, "each result's description ('': none)", [])


@body(Op.TAG)
class Tag(Body):
    """(the owner only) Add search tags to an object, publishing it; set its description."""
    id: int = key(OBJ_ID, "the object")
    tags: list[str] = key(TAGS, "tags to add", [])
    description: str | None = key(OPT_STR, "its new description (nil: unchanged)", None)


@body(Op.RUN)
class Run(Body):
    """Run a user function (trusted senders only: it is pickled)."""
    fn: Any = key(CALLABLE, "the function")
    args: list[Any] = key(LIST, "positional arguments; objects here as references", [])
    kwargs: dict[str, Any] = key(MAP, "keyword arguments", {})
    grad: bool = key(BOOL, "the caller's grad mode", True)


@body(Op.RUN, reply=True)
class RunReply(Body):
    result: Any = key(ANY, "the result, tensors kept here as pointer descriptors", None)


@body(Op.GIVE)
class Give(Body):
    """Hand objects to another principal: ownership (the sender's own objects), or read-only use."""
    ids: list[int] = key(IDS, "the objects")
    to: str = key(STR, "the principal's public key (one the worker knows)")
    read_only: bool = key(BOOL, "share them to compute with instead of giving them away", False)
    session: str = key(STR, "the receiver's session to keep them for: a worker's incarnation (its "
                       "links to its peers name it as their session), a client's session id; '' "
                       "for the principal's default session", "")


@body(Op.ALLOW)
class Allow(Body):
    """(admins only) Accept connections from more keys: a spawning client's other workers."""
    keys: dict[str, str] = key(MAP, "name -> public key")


@body(Op.ACKS)
class Acks(Body):
    """(request id 0) empty replies to several requests at once."""
    ids: list[int] = key(REQ_IDS, "the request ids")


@body(Op.BATCH)
class Batch(Body):
    """(request id 0) several requests, handled in order as if each had come alone."""
    msgs: list[bytes] = key(FRAMES, "complete single-frame messages (no BATCH among them)")


@body(Op.BULK)
class Bulk(Body):
    """(either way) stands for a large message sent sealed on the receiver's bulk socket."""
    blob: int = key(INT, "the blob holding the message's frames (zmqsyft.wire.bulk)")
    frames: int = key(INT, "how many frames it has")
    nbytes: int = key(INT, "how many bytes they hold")


@body(Op.ERROR, reply=True)
class Error(Body):
    error: dict[str, Any] = key(MAP, "the encoded exception (zmqsyft.wire.exc_codec)")
