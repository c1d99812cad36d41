"""Data owners' release rules: the policy each owner sets, and the labels that carry it.

Every object a worker holds carries a **label**: the set of :class:`Policy` objects of the data
owners whose private data it derives from (empty: it derives from nobody's private data). Data a
worker loads itself (``--load``, ``Worker.add``) is labelled with its owner's policy; the result
of an op carries the union of its inputs' labels, and what an op changes in place gains them;
labels travel with ``move``, ``remote_get`` and pointer chains. The worker holding an object
checks, before anything of it leaves:

* **moving** it (``move``, or a peer's ``remote_get``): the destination worker's key must be one
  that every owner's policy trusts (its ``trust``; the owner's own worker always is). The data
  keeps its labels there.
* **releasing** it (``get``, ``item()``/``tolist()`` and every other value an op returns,
  ``_objects``): allowed if (a) the requester is its only owner, or (b) it aggregates the data
  of at least ``k`` distinct owners (the largest ``k`` among their policies) and it is held by a
  worker they all trust, or (c) every owner's policy ``allow``\\ s that kind of result
  (``"scalar"``: one number, such as a loss; ``"any"``: everything). Otherwise
  :class:`~zmqsyft.errors.PrivacyError`, naming the owner and the rule.

Shapes, dtypes and sizes are not protected: pointers carry them, as in PySyft.

A policy is written in a small TOML file (``zmqsyft worker --policy policy.toml``)::

    name = "bob's clinic"            # how refusals name the owner
    owner = "keys/bob.key"           # who may take the raw data: a public key, or its file
    k = 2                            # aggregates of at least 2 owners may leave ...
    trust = ["keys/aggregator.key"]  # ... from these workers, which may also hold the data
    allow = ["scalar"]               # single numbers (losses) may always leave

or in Python, ``Policy(name=..., owner=..., k=..., trust=[...], allow=[...])``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ProtocolError
from .keys import public_key

__all__ = ["Policy", "Labels", "EMPTY", "KINDS", "union", "kind_of", "release_refusal",
           "move_refusal", "labels_to_wire", "labels_from_wire"]

KINDS = {
    "scalar": "a single number (a loss, an accuracy, item() of a one-element tensor)",
    "any": "anything: the owner publishes this data",
}
"""The kinds of result a policy's ``allow`` may name."""

_FIELDS = {"name", "owner", "k", "trust", "allow"}
_MAX_TRUST = 1024  # keys one policy may trust (a policy that came over the wire is bounded)


@dataclass(frozen=True)
class Policy:
    """What one data owner allows to be done with its data.

    Parameters
    ----------
    name : str
        How refusals name the owner (``"bob's clinic"``). Default: the worker's name.
    owner : str
        The public key (Z85 text, a key file's path, or a :class:`~zmqsyft.keys.KeyPair`) of
        the owner: the one principal that may take the raw data. Default: the worker's own key (nobody connects as it: the raw data
        never leaves, only what the rules release).
    k : int
        An aggregate of at least ``k`` distinct owners' data may be released from a worker all
        of them trust (2 by default; 1 would release everything computed on a trusted worker).
    trust : iterable of str
        Public keys (or key files, or worker handles with a ``key``) of the workers that may
        hold this data and release aggregates of it. The owner's own worker always may.
    allow : iterable of str
        Kinds of result that may always be released (see :data:`KINDS`).
    """

    name: str = ""
    owner: str = ""
    k: int = 2
    trust: frozenset[str] = field(default_factory=frozenset)
    allow: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > 200:
            raise ValueError(f"a policy's name is a string of at most 200 characters, "
                             f"not {self.name!r}")
        if type(self.k) is not int or self.k < 1:
            raise ValueError(f"a policy's k is a whole number of at least 1, not {self.k!r}")
        object.__setattr__(self, "owner", _key(self.owner) if self.owner else "")
        object.__setattr__(self, "trust", frozenset(_key(t) for t in _listed(self.trust, "trust")))
        allow = frozenset(_listed(self.allow, "allow"))
        unknown = sorted(allow - KINDS.keys())
        if unknown:
            raise ValueError(f"a policy allows unknown kinds of result {unknown}; known kinds: "
                             + ", ".join(f"{k!r} ({v})" for k, v in KINDS.items()))
        object.__setattr__(self, "allow", allow)
        if len(self.trust) > _MAX_TRUST:
            raise ValueError(f"a policy trusts at most {_MAX_TRUST} workers")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a policy file (TOML: ``name``, ``owner``, ``k``, ``trust``, ``allow``); key
        files it names are found relative to the policy file.

        Raises ``ValueError`` naming the file and what is wrong with it."""
        path = os.path.expanduser(os.fspath(path))
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the policy file {path}: {exc}") from None
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; a policy has "
                             f"{sorted(_FIELDS)}")
        base = os.path.dirname(os.path.abspath(path))

        def here(value: Any) -> Any:  # a key file named relative to the policy file
            if isinstance(value, str) and value and not os.path.isabs(value) and \
                    os.path.isfile(os.path.join(base, value)):
                return os.path.join(base, value)
            return value
        try:
            return cls(name=data.get("name", ""), owner=here(data.get("owner", "")),
                       k=data.get("k", 2), trust=[here(t) for t in data.get("trust", [])],
                       allow=data.get("allow", []))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def bind(self, name: str, owner: str, home: str) -> Policy:
        """This policy as a worker applies it to the data it holds: named ``name`` and owned by
        ``owner`` unless it says otherwise, and trusting the worker ``home`` itself."""
        return replace(self, name=self.name or name, owner=self.owner or owner,
                       trust=self.trust | ({home} if home else set()))

    @property
    def who(self) -> str:
        """The owner as refusals name it."""
        shown = f"{self.owner[:8]}..." if self.owner else "anyone (insecure)"
        return f"{self.name} (owner key {shown})" if self.name else f"owner key {shown}"

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "k": self.k,
                "trust": sorted(self.trust), "allow": sorted(self.allow)}

    @classmethod
    def from_wire(cls, data: Any) -> Policy:
        """A policy that came over the wire (``ProtocolError`` if it is not one)."""
        try:
            if type(data) is not dict or set(data) != _FIELDS:
                raise ValueError(f"expected a map with the keys {sorted(_FIELDS)}")
            for name in ("trust", "allow"):
                if type(data[name]) is not list or len(data[name]) > _MAX_TRUST or \
                        not all(type(v) is str for v in data[name]):
                    raise ValueError(f"{name} is not a list of strings")
            if type(data["owner"]) is not str or (data["owner"] and len(data["owner"]) != 40):
                raise ValueError("owner is not a public key")
            if any(len(t) != 40 for t in data["trust"]):
                raise ValueError("trust is not a list of public keys")
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"malformed privacy label: {exc}") from None


Labels = frozenset[Policy]
EMPTY: Labels = frozenset()


def _key(value: Any) -> str:
    key = getattr(value, "key", None) or getattr(value, "text", None) or value  # a worker, keys
    if isinstance(key, (bytes, bytearray)):
        key = bytes(key).decode("ascii", "replace")
    if not isinstance(key, (str, os.PathLike)):
        raise ValueError(f"{value!r} is not a public key, a key file or a worker")
    return public_key(key).decode("ascii")


def _listed(values: Any, what: str) -> Iterable[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"a policy's {what} is a list, not {values!r}")
    return list(values)


def union(a: Labels, b: Labels) -> Labels:
    """Both label sets (returns one of them unchanged when it holds the other)."""
    if not b or b is a:
        return a
    if not a or a <= b:
        return b
    return a if b <= a else a | b


def kind_of(value: Any) -> str:
    """The kind of a result about to be released: ``"scalar"`` for one number, else
    ``"values"``."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        return "scalar" if numel() == 1 else "values"
    return "scalar" if isinstance(value, (bool, int, float, complex)) else "values"


def release_refusal(labels: Labels, to: str, here: str, kind: str, what: str) -> str | None:
    """Why ``what`` (derived from data labelled ``labels``, held by the worker whose key is
    ``here``) may not be released to the principal ``to``; ``None`` if it may."""
    if not labels:
        return None
    owners = {p.owner for p in labels}
    if owners == {to}:
        return None  # (a) its only owner
    need = max(p.k for p in labels)
    untrusting = [p for p in labels if here not in p.trust]
    if len(owners) >= need and not untrusting:
        return None  # (b) an aggregate of k owners, on a worker they all trust
    refusing = [p for p in labels if kind not in p.allow and "any" not in p.allow]
    if not refusing:
        return None  # (c) every owner allows this kind of result
    first = sorted(refusing, key=lambda p: p.who)[0]
    if len(owners) < need:
        rule = (f"it derives from the data of {len(owners)} owner(s), and {first.who}'s "
                f"policy releases only aggregates of at least {need} owners' data")
    else:
        rule = (f"it aggregates {len(owners)} owners' data, but on a worker that "
                f"{sorted(untrusting, key=lambda p: p.who)[0].who}'s policy does not trust")
    return (f"{what} derives from the private data of {first.who}: it may leave only to its "
            f"owner, as an aggregate the owners' policies allow, or as a kind of result they "
            f"allow (this is {kind!r}; allowed: {sorted(first.allow) or 'none'}); {rule}. "
            "Compute an aggregate over more owners on a worker they trust, or ask the owner "
            "to change its policy")


def move_refusal(labels: Labels, dest: str, dest_name: str, what: str) -> str | None:
    """Why ``what`` (labelled ``labels``) may not move to the worker whose key is ``dest``;
    ``None`` if it may."""
    refusing = sorted((p for p in labels if dest not in p.trust), key=lambda p: p.who)
    if not refusing:
        return None
    return (f"{what} derives from the private data of {refusing[0].who}, whose policy does not "
            f"trust worker {dest_name} (key {dest[:8] or '(none)'}...) to hold it; nothing was "
            "moved. Move it to a worker the owner's policy trusts, or ask the owner to add "
            "that worker's key to its policy's trust")


def labels_to_wire(labels: Labels) -> list[dict[str, Any]]:
    return [p.to_wire() for p in labels]


_SEEN: dict[Any, Policy] = {}  # policies that came over the wire, by their wire form


def labels_from_wire(data: Any) -> Labels:
    """Labels that came over the wire (``ProtocolError`` if they are not labels)."""
    if type(data) is not list or len(data) > _MAX_TRUST:
        raise ProtocolError("malformed privacy labels: expected a list of policies")
    found = []
    for p in data:
        try:
            token = (p["name"], p["owner"], p["k"], tuple(p["trust"]), tuple(p["allow"]),
                     len(p)) if type(p) is dict else None
            policy = _SEEN.get(token)
        except (KeyError, TypeError):
            policy = None
        if policy is None:
            policy = Policy.from_wire(p)
            if len(_SEEN) >= 4096:
                _SEEN.clear()
            _SEEN[token] = policy
        found.append(policy)
    return frozenset(found)
