"""The machinery of typed message bodies: kinds of values, the ``Body`` base, ``@body``.

A body class lists its keys as dataclass fields made with :func:`key` (a :class:`Kind`, a
description for the wire table, a default). :func:`body` makes it a slotted dataclass, registers
it for its op, and generates its ``to_wire`` and ``from_wire`` as straight-line code (as
:mod:`dataclasses` generates ``__init__``): they run for every message. The bodies themselves,
and the table, are in :mod:`zmqsyft.wire.bodies`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..errors import ProtocolError
from .messages import Op, PointerDesc

__all__ = ["Kind", "Body", "body", "key", "REQUESTS", "REPLIES", "wire_table"]

B = TypeVar("B", bound="Body")


# ------------------------------------------------------------------ the kinds of values
class Kind:
    """What a key may hold: a name for the table and a check, an expression in ``v`` (inlined
    into each body's generated ``from_wire``, as :mod:`dataclasses` generates ``__init__``)."""

    __slots__ = ("name", "expr")

    def __init__(self, name: str, expr: str) -> None:
        self.name = name
        self.expr = expr


ANY = Kind("value", "True")
OBJ_ID = Kind("object id", "type(v) is int and v > 0")
HOLD_ID = Kind("object id or 0", "type(v) is int and v >= 0")
INT = Kind("int", "type(v) is int")
BOOL = Kind("bool", "type(v) is bool")
STR = Kind("str", "type(v) is str")
OP_NAME = Kind("op name", "True")  # the allow-list refuses what is not one, by name
LIST = Kind("list", "type(v) is list or type(v) is tuple")
MAP = Kind("map", "type(v) is dict")
IDS = Kind("[object id]", "type(v) is list and all(type(i) is int for i in v)")
REQ_IDS = Kind("[request id]", "type(v) is list and all(type(i) is int for i in v)")
TAGS = Kind("[str]", "type(v) is list and all(type(t) is str for t in v)")
FRAMES = Kind("[bytes]", "type(v) is list and all(type(m) is bytes for m in v)")
CALLABLE = Kind("pickled callable", "callable(v)")
LABELS = Kind("[policy]", "type(v) is list and all(type(p) is dict for p in v)")
DESC = Kind("pointer descriptor", "type(v) is PointerDesc")
OPT_DESC = Kind("pointer descriptor or nil", "v is None or type(v) is PointerDesc")
DESCS = Kind("[pointer descriptor]", "type(v) is list and all(type(d) is PointerDesc for d in v)")
OPT_STR = Kind("str or nil", "v is None or type(v) is str")
TAG_LISTS = Kind("[[str]]", "type(v) is list and all(type(t) is list and all(type(s) is str for s in t) "
                 "for t in v)")


def _out_ok(out: Any) -> bool:
    if out is None:
        return True
    if type(out) is not list:
        return False
    for spec in out:  # (loops, not generators: every pipelined op's CALL is checked so)
        if not (type(spec) is list and len(spec) == 4 and type(spec[0]) is int and spec[0] > 0
                and type(spec[1]) is list and type(spec[2]) is str and type(spec[3]) is bool):
            return False
        for d in spec[1]:
            if type(d) is not int:
                return False
    return True


OUT = Kind("[[id, shape, dtype, requires_grad]] or nil", "_out_ok(v)")


def key(kind: Kind, doc: str, default: Any = MISSING) -> Any:
    """A body key: its kind, its description for the table and its default (none: required)."""
    if isinstance(default, (list, dict)):
        empty = type(default)
        return field(default_factory=empty, metadata={"kind": kind, "doc": doc})
    return field(default=default, metadata={"kind": kind, "doc": doc})


# ------------------------------------------------------------------------- the base
class Body:
    """A message body: ``to_wire()`` gives the map to send, ``from_wire(map)`` checks one.

    Both are generated per body class by :func:`body` (straight-line code: they run for every
    message).
    """

    __slots__ = ()
    OP: ClassVar[Op]
    REPLY: ClassVar[bool] = False
    _NAMES: ClassVar[tuple[str, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        """The map to send."""
        raise TypeError(f"{type(self).__name__} is not a body made with @body")

    @classmethod
    def from_wire(cls: type[B], body: dict[str, Any]) -> B:
        """Check a received body and build the typed one; raises ``ProtocolError``."""
        raise TypeError(f"{cls.__name__} is not a body made with @body")

    @staticmethod
    def pack(*args: Any, **kwargs: Any) -> dict[str, Any]:
        """``cls.pack(...)`` is ``cls(...).to_wire()`` without the object (for hot paths)."""
        raise TypeError("not a body made with @body")

    @classmethod
    def _missing(cls, name: str) -> ProtocolError:
        kind = next(f.metadata["kind"] for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        return ProtocolError(f"{cls._what()} needs {name!r} ({kind.name})")

    @classmethod
    def _bad(cls, name: str, value: Any) -> ProtocolError:
        kind = next(f.metadata["kind"] for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        return ProtocolError(f"{cls._what()} key {name!r} takes {kind.name}, not {_show(value)}")

    @classmethod
    def _what(cls) -> str:
        return f"a {cls.OP.name} reply's" if cls.REPLY else cls.OP.name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:50]}..."


REQUESTS: dict[Op, type[Body]] = {}
REPLIES: dict[Op, type[Body]] = {}


def body(op: Op, reply: bool = False) -> Callable[[type[B]], type[B]]:
    """Make a class a body of ``op``: a dataclass with slots, registered for the table, with a
    generated ``to_wire`` and ``from_wire``."""
    def make(cls: type[B]) -> type[B]:
        made = dataclass(slots=True)(cls)
        made.OP = op
        made.REPLY = reply
        made._NAMES = tuple(f.name for f in fields(made))
        made.to_wire = _gen_to_wire(made)  # type: ignore[method-assign]
        made.pack = staticmethod(_gen_pack(made))  # type: ignore[method-assign,assignment]
        made.from_wire = classmethod(_gen_from_wire(made))  # type: ignore[method-assign,assignment]
        (REPLIES if reply else REQUESTS)[op] = made
        return made
    return make


def _gen_to_wire(cls: type[Body]) -> Callable[[Body], dict[str, Any]]:
    items = ", ".join(f"{n!r}: self.{n}" for n in cls._NAMES)
    return _compile(f"def to_wire(self):\n    return {{{items}}}\n", "to_wire", {})


def _default(f: Any, i: int, env: dict[str, Any]) -> str | None:
    """The expression that gives field ``f``'s default in generated code (``env`` gets what it
    names: ``d{i}``, or ``d{i}()`` for a factory); None for a required field."""
    if f.default is not MISSING:
        env[f"d{i}"] = f.default
        return f"d{i}"
    if f.default_factory is not MISSING:
        env[f"d{i}"] = f.default_factory
        return f"d{i}()"
    return None


def _gen_pack(cls: type[Body]) -> Callable[..., dict[str, Any]]:
    params, lines, env = [], [], {}
    for i, f in enumerate(fields(cls)):
        default = _default(f, i, env)
        if default is None:
            params.append(f.name)
        elif default.endswith("()"):  # a fresh one per call, not one shared by all calls
            params.append(f"{f.name}=None")
            lines.append(f"    if {f.name} is None:\n        {f.name} = {default}")
        else:
            params.append(f"{f.name}={default}")
    items = ", ".join(f"{n!r}: {n}" for n in cls._NAMES)
    lines.append(f"    return {{{items}}}")
    return _compile(f"def pack({', '.join(params)}):\n" + "\n".join(lines) + "\n", "pack", env)


def _gen_from_wire(cls: type[Body]) -> Callable[..., Body]:
    lines = ["def from_wire(cls, body):", "    get = body.get"]
    env: dict[str, Any] = {"MISSING": MISSING, "PointerDesc": PointerDesc, "_out_ok": _out_ok}
    for i, f in enumerate(fields(cls)):
        kind: Kind = f.metadata["kind"]
        lines.append(f"    v = get({f.name!r}, MISSING)")
        lines.append("    if v is MISSING:")
        default = _default(f, i, env)
        lines.append(f"        v = {default}" if default is not None
                     else f"        raise cls._missing({f.name!r})")
        if kind.expr != "True":
            allow_none = "v is not None and " if f.default is None else ""
            lines.append(f"    elif {allow_none}not ({kind.expr}):")
            lines.append(f"        raise cls._bad({f.name!r}, v)")
        lines.append(f"    a{i} = v")
    args = ", ".join(f"a{i}" for i in range(len(cls._NAMES)))
    lines.append(f"    return cls({args})")
    return _compile("\n".join(lines) + "\n", "from_wire", env)


def _compile(source: str, name: str, env: dict[str, Any]) -> Any:
    exec(compile(source, f"<zmqsyft.wire.bodies {name}>", "exec"), env)  # noqa: S102 - our own text
    return env[name]


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
    """The table of every request and its reply, as reStructuredText (rendered from the bodies
    registered so far, :mod:`zmqsyft.wire.bodies`'; ``key?`` marks an optional key)."""
    rows = []
    for op, cls in REQUESTS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((op.name, doc, _keys(cls), _keys(REPLIES.get(op))))
    width = max(len(r[0]) for r in rows)
    lines = []

    def entry(mark: str, text: str) -> None:
        lines.extend(textwrap.wrap(text, 96, initial_indent=f"{'':{width}}  {mark} ",
                                   subsequent_indent=f"{'':{width}}      "))
    for name, doc, req, rep in rows:
        lines.append(f"{name:{width}}  {doc}".rstrip())
        for k in req:
            if k != "-":
                entry(">", k)
        for k in rep:
            if k != "-":
                entry("<", k)
    lines.append(f"{'ERROR':{width}}  A failed request's reply.")
    for k in _keys(REPLIES.get(Op.ERROR)):
        entry("<", k)
    return "\n".join(lines)
