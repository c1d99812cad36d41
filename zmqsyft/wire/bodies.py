"""Typed message bodies: one small class per request and per reply, and the wire table they make.

Every body on the wire is a msgpack map. The classes below are the only place its keys are named:
a sender builds one (``Put(id=7, obj=t)``) and encodes it with :meth:`Body.to_wire`; a receiver
checks what came with :meth:`Body.from_wire`, which fills in defaults, ignores keys it does not
know and raises :class:`~zmqsyft.errors.ProtocolError` naming the op and the key for a value of
the wrong kind. The table in this module's docstring, and so in the docs, is rendered from
these classes by :func:`wire_table` and a test keeps the two identical.

Requests (a reply of ``-`` is an empty acknowledgement):

{table}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..errors import ProtocolError
from .messages import Op, PointerDesc

__all__ = ["Body", "REQUESTS", "REPLIES", "wire_table", "Hello", "HelloReply", "Put", "Get",
           "GetReply", "Call", "CallReply", "Del", "Move", "MoveReply", "RemoteGet", "Objects",
           "ObjectsReply", "Flush", "Ping", "PingReply", "Stats", "StatsReply", "Shutdown",
           "Search", "SearchReply", "Run", "RunReply", "Acks", "Batch", "Error"]

B = TypeVar("B", bound="Body")


# ------------------------------------------------------------------ the kinds of values
class Kind:
    """What a key may hold: a name for the table and a check (value in, value out, or None for
    a value that does not fit)."""

    __slots__ = ("name", "check")

    def __init__(self, name: str, check: Callable[[Any], bool]) -> None:
        self.name = name
        self.check = check


def _is_int(v: Any) -> bool:
    return type(v) is int


ANY = Kind("value", lambda v: True)
OBJ_ID = Kind("object id", lambda v: type(v) is int and v > 0)
HOLD_ID = Kind("object id or 0", lambda v: type(v) is int and v >= 0)
INT = Kind("int", _is_int)
BOOL = Kind("bool", lambda v: type(v) is bool)
STR = Kind("str", lambda v: type(v) is str)
OP_NAME = Kind("op name", lambda v: True)  # the allow-list refuses what is not one, by name
LIST = Kind("list", lambda v: type(v) is list or type(v) is tuple)
MAP = Kind("map", lambda v: type(v) is dict)
IDS = Kind("[object id]", lambda v: type(v) is list and all(type(i) is int for i in v))
REQ_IDS = Kind("[request id]", lambda v: type(v) is list and all(type(i) is int for i in v))
TAGS = Kind("[str]", lambda v: type(v) is list and all(type(t) is str for t in v))
FRAMES = Kind("[bytes]", lambda v: type(v) is list and all(type(m) is bytes for m in v))
CALLABLE = Kind("pickled callable", callable)
DESC = Kind("pointer descriptor", lambda v: type(v) is PointerDesc)
OPT_DESC = Kind("pointer descriptor or nil", lambda v: v is None or type(v) is PointerDesc)
DESCS = Kind("[pointer descriptor]",
             lambda v: type(v) is list and all(type(d) is PointerDesc for d in v))


def _out_ok(out: Any) -> bool:
    return out is None or (type(out) is list and all(
        type(spec) is list and len(spec) == 4 and type(spec[0]) is int and spec[0] > 0
        and type(spec[1]) is list and all(type(d) is int for d in spec[1])
        and type(spec[2]) is str and type(spec[3]) is bool for spec in out))


OUT = Kind("[[id, shape, dtype, requires_grad]] or nil", _out_ok)


def key(kind: Kind, doc: str, default: Any = MISSING) -> Any:
    """A body key: its kind, its description for the table and its default (none: required)."""
    if isinstance(default, (list, dict)):
        empty = type(default)
        return field(default_factory=empty, metadata={"kind": kind, "doc": doc})
    return field(default=default, metadata={"kind": kind, "doc": doc})


# ------------------------------------------------------------------------- the base
class Body:
    """A message body: ``to_wire()`` gives the map to send, ``from_wire(map)`` checks one."""

    __slots__ = ()
    OP: ClassVar[Op]
    REPLY: ClassVar[bool] = False
    _SPEC: ClassVar[tuple[tuple[str, Any, Any, Kind], ...]] = ()
    _NAMES: ClassVar[tuple[str, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._NAMES}

    @classmethod
    def from_wire(cls: type[B], body: dict[str, Any]) -> B:
        """Check a received body and build the typed one; raises ``ProtocolError``."""
        obj = cls.__new__(cls)
        setter = object.__setattr__
        for name, default, factory, kind in cls._SPEC:
            value = body.get(name, default)
            if value is MISSING:
                if factory is MISSING:
                    raise ProtocolError(f"{cls._what()} needs {name!r} ({kind.name})")
                value = factory()
            elif not kind.check(value) and not (value is default is None):
                raise ProtocolError(f"{cls._what()} key {name!r} takes {kind.name}, "
                                    f"not {_show(value)}")
            setter(obj, name, value)
        return obj

    @classmethod
    def _what(cls) -> str:
        return f"a {cls.OP.name} reply's" if cls.REPLY else cls.OP.name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:50]}..."


REQUESTS: dict[Op, type[Body]] = {}
REPLIES: dict[Op, type[Body]] = {}


def body(op: Op, reply: bool = False) -> Callable[[type[B]], type[B]]:
    """Make a class a body of ``op`` (a dataclass with slots; registered for the table)."""
    def make(cls: type[B]) -> type[B]:
        made = dataclass(slots=True)(cls)
        made.OP = op
        made.REPLY = reply
        made._SPEC = tuple((f.name, f.default, f.default_factory, f.metadata["kind"])
                           for f in fields(made))
        made._NAMES = tuple(f.name for f in fields(made))
        (REPLIES if reply else REQUESTS)[op] = made
        return made
    return make


# ------------------------------------------------------------------------ the bodies
@body(Op.HELLO)
class Hello(Body):
    """The first message of every connection."""
    peer: str = key(STR, "the sender's name, for the traffic counters", "")
    trust: str = key(STR, "a trust token: a match lets this connection send pickled payloads", "")
    host: str = key(STR, "the sender's host key: a match lets both ends use shared memory", "")


@body(Op.HELLO, reply=True)
class HelloReply(Body):
    id: str = key(STR, "the worker's name")
    pid: int = key(INT, "its process id (0: not told)", 0)
    version: int = key(INT, "its protocol version", 0)
    address: str = key(STR, "the endpoint it is bound to", "")
    trusted: bool = key(BOOL, "whether the trust token matched", False)
    host: str = key(STR, "the worker's host key", "")
    shm: bool = key(BOOL, "whether it accepts shared-memory tensors from this connection", False)


@body(Op.PUT)
class Put(Body):
    """Store a value."""
    id: int = key(OBJ_ID, "the id to store it under")
    obj: Any = key(ANY, "a tensor, a pointer descriptor, a number, ...")


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
    peers: dict[str, Any] = key(MAP, "per peer name: messages, bytes, largest message, each way", {})


@body(Op.SHUTDOWN)
class Shutdown(Body):
    """Reply, then exit."""


@body(Op.SEARCH)
class Search(Body):
    """Find the worker's own data by tags."""
    tags: list[str] = key(TAGS, "every tag an object must carry")


@body(Op.SEARCH, reply=True)
class SearchReply(Body):
    results: list[PointerDesc] = key(DESCS, "non-owning pointer descriptors", [])


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


@body(Op.ACKS)
class Acks(Body):
    """(request id 0) empty replies to several requests at once."""
    ids: list[int] = key(REQ_IDS, "the request ids")


@body(Op.BATCH)
class Batch(Body):
    """(request id 0) several requests, handled in order as if each had come alone."""
    msgs: list[bytes] = key(FRAMES, "complete single-frame messages (no BATCH among them)")


@body(Op.ERROR, reply=True)
class Error(Body):
    error: dict[str, Any] = key(MAP, "the encoded exception (zmqsyft.wire.exc_codec)")


# ------------------------------------------------------------------------ the table
def _keys(cls: type[Body] | None) -> list[str]:
    if cls is None:
        return ["-"]
    out = []
    for f in fields(cls):
        optional = f.default is not MISSING or f.default_factory is not MISSING
        out.append(f"{f.name}{'?' if optional else ''}: {f.metadata['kind'].name}"
                   f" - {f.metadata['doc']}")
    return out or ["-"]


def wire_table() -> str:
    """The table of every request and its reply, as reStructuredText (rendered from the bodies;
    ``key?`` marks an optional key)."""
    rows = []
    for op, cls in REQUESTS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((op.name, doc, _keys(cls), _keys(REPLIES.get(op))))
    width = max(len(r[0]) for r in rows)
    lines = []
    for name, doc, req, rep in rows:
        lines.append(f"{name.ljust(width)}  {doc}")
        lines += [f"{''.ljust(width)}    > {k}" for k in req if k != "-"]
        lines += [f"{''.ljust(width)}    < {k}" for k in rep if k != "-"]
    lines.append(f"{'ERROR'.ljust(width)}  (a reply)")
    lines += [f"{''.ljust(width)}    < {k}" for k in _keys(Error)]
    return "\n".join(lines)
