"""Who a worker knows: principals (public keys with a name and rights), and who may connect.

A **principal** is a CURVE public key the worker was told about: by its operator (``zmqsyft
worker --allow DIR``, ``--admin KEYFILE``, ``--trust KEYFILE``), by its spawning parent (through
the private pipe it was started with), or by an admin at run time (``ALLOW``: a spawning client
introduces its workers to each other). A connection is accepted only from a known key (the
gate asks :meth:`Access.admit` during the handshake), and every message it sends carries that key
as its ``User-Id``, which the peer cannot choose: a request's principal is never a name the peer
states.

Rights: an **admin** may stop the worker, see every object in ``_objects`` and all of
``stats()``, and introduce keys; a **trusted** principal may send pickled payloads (code run on
the worker); everyone may use what it owns, and what others shared with it.

``Config.insecure`` turns all of this off: the handshake is NULL, every connection is the one
principal :data:`INSECURE`, which owns everything and is an admin.

The table is read by the gate's thread and changed by the worker's loop: it is replaced as a
whole (one reference assignment), never changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import zmq.utils.z85

__all__ = ["Principal", "Access", "INSECURE", "WORKER"]


@dataclass(frozen=True)
class Principal:
    """A key a worker knows, with the name it was given and its rights.

    Attributes
    ----------
    key : str
        The CURVE public key, Z85 text (``""``: :data:`INSECURE`).
    name : str
        What the worker's operator or spawner called it (``stats()`` shows it).
    admin : bool
        May stop the worker, see every object, read all its statistics, introduce keys.
    trusted : bool
        May send pickled payloads: code that runs on the worker as its user.
    """

    key: str
    name: str
    admin: bool = False
    trusted: bool = False

    @cached_property
    def label(self) -> str:
        """How ``stats()`` names it: its name (unique among the principals of one worker)."""
        return self.name


INSECURE = Principal("", "anyone (insecure: unauthenticated)", admin=True)
"""Every connection's principal on a worker run with ``Config.insecure``."""

WORKER = Principal("-", "the worker itself")
"""The owner of a worker's own data (``--load``): no connection is it."""


class Access:
    """The principals one worker knows, by key.

    Parameters
    ----------
    insecure : bool
        Accept every connection as :data:`INSECURE` (``Config.insecure``).
    principals : iterable of Principal
        The keys known from the start.
    """

    def __init__(self, insecure: bool = False, principals: tuple[Principal, ...] = ()) -> None:
        self.insecure = insecure
        self._table: dict[str, Principal] = {}
        for p in principals:
            self.allow(p)

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str) -> Principal | None:
        """The principal of ``key`` (Z85 text), or ``None`` if unknown; :data:`INSECURE` for
        every key when insecure."""
        if self.insecure:
            return INSECURE
        return self._table.get(key)

    def allow(self, principal: Principal) -> Principal:
        """Know ``principal`` from now on; a key known already keeps its name and gains the
        rights given here (rights are never taken away by this). Returns what is now known."""
        table = dict(self._table)
        old = table.get(principal.key)
        if old is not None:
            principal = replace(old, admin=old.admin or principal.admin,
                                trusted=old.trusted or principal.trusted)
        elif any(p.name == principal.name for p in table.values()):  # names stay unique
            principal = replace(principal, name=f"{principal.name} ({principal.key[:8]}...)")
        table[principal.key] = principal
        self._table = table
        return principal

    def principals(self) -> list[Principal]:
        return list(self._table.values())

    def admit(self, mechanism: str, credentials: tuple[bytes, ...]) -> tuple[str, str]:
        """Whether a connection may complete its handshake: ``("", user_id)`` if so (the user id
        libzmq attaches to each of its messages), else ``(why not, "")``."""
        if self.insecure:
            return "", ""
        if mechanism != "CURVE" or not credentials or len(credentials[0]) != 32:
            return f"a {mechanism} connection to a worker that requires CURVE", ""
        key = zmq.utils.z85.encode(credentials[0]).decode("ascii")
        if key not in self._table:
            return f"an unknown key ({key[:8]}...)", ""
        return "", key
