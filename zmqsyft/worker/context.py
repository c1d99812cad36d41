"""What a handler gets: who to answer (:class:`Ctx`) and the worker's services (:class:`Services`).

A handler is a plain function ``handler(worker, ctx, body)``: ``worker`` is the worker's loop seen
through the :class:`Services` protocol (the only things a handler may use), ``ctx`` says whom to
answer, and ``body`` is the request's typed body (:mod:`zmqsyft.wire.bodies`). A handler answers
with ``worker.reply(ctx, ...)`` now or from a continuation later, and raises to answer with an
error. Handlers never block: whatever needs a peer worker continues in a callback
(``worker.peers.request(...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..config import Config
from ..wire.bodies import Body
from .access import Access, Principal
from .gate import Gate
from .leases import Holder, Leases
from .peers import PeerLinks
from .sealed import Sealed
from .store import Store
from .traffic import Traffic

__all__ = ["Ctx", "Services", "Handler", "NOBODY"]

NOBODY = Principal("?", "nobody")
"""The principal of a request whose sender is not known (an error answered before its session
was found): owns nothing, may do nothing."""


class Ctx:
    """Who asks and who to answer: the caller's ROUTER routing id, its request id (0: no answer
    wanted), and its session (``holder``: the authenticated principal and the session it named;
    what it stores is owned by it)."""

    __slots__ = ("ident", "req_id", "holder")

    def __init__(self, ident: bytes, req_id: int, holder: Holder | None = None) -> None:
        self.ident = ident
        self.req_id = req_id
        self.holder = holder

    @property
    def who(self) -> Principal:
        """The caller's principal (what the checks of ownership and rights compare)."""
        return self.holder.principal if self.holder is not None else NOBODY

    def __repr__(self) -> str:
        return f"<Ctx caller={self.ident.hex()} req={self.req_id}>"


class Services(Protocol):
    """The worker as its handlers see it.

    Attributes
    ----------
    id, address : str
        The worker's name and the endpoint it is bound to.
    addresses : set of str
        Every address this worker is known by (a pointer to one of them points here).
    cfg : Config
        The worker's settings.
    store : Store
        Its objects.
    peers : PeerLinks
        Its links to other workers: ``request``, ``flush``, ``dirty``, ``no_handover``.
    traffic : Traffic
        Its counters and the names its peers gave.
    gate : Gate
        Who may connect (``max_connections``): its ``open_connections`` and ``refused`` counts.
    access : Access
        The principals (keys) it knows, and their rights.
    leases : Leases
        Its sessions (holders of objects), their connections and leases.
    key : str
        Its own public key (Z85 text; ``""`` if insecure): pointers to its objects carry it.
    header : zmq.Frame or None
        The header frame of the request being handled (names its connection: ``SRCFD``).
    trust_tokens : frozenset of str
        Tokens whose presenters may send pickled payloads.
    trusted, shm_callers : set of bytes
        Routing ids of the callers that presented a trust token / that share this machine's
        ``/dev/shm``.
    sealed : Sealed or None
        Its bulk socket and its connections' sealed channels (None: insecure, or turned off).
    router : zmq.Socket
        Its ROUTER, where its callers' requests come in.
    incarnation, started_ms : str, int
        This process's random id, and when it started (ms since the epoch): a caller meeting
        another incarnation at the same address knows the worker was restarted.
    """

    id: str
    address: str
    addresses: set[str]
    cfg: Config
    store: Store
    peers: PeerLinks
    traffic: Traffic
    gate: Gate
    access: Access
    leases: Leases
    key: str
    incarnation: str
    started_ms: int
    header: Any
    trust_tokens: frozenset[str]
    trusted: set[bytes]
    shm_callers: set[bytes]
    sealed: Sealed | None
    router: Any

    def reply(self, ctx: Ctx, body: Body | None = None) -> bool:
        """Answer ``ctx`` (no body: an acknowledgement, batched with the others of this turn);
        False if the body could not be encoded (the caller was sent that error instead)."""

    def reply_error(self, ctx: Ctx, exc: BaseException) -> None:
        """Answer ``ctx`` with an error."""

    def answer_now(self) -> None:
        """Send the batched acknowledgements now unless more requests are waiting to join them."""

    def free_after_replies(self, obj: Any) -> None:
        """Keep ``obj`` alive until this turn's replies are sent (then free it)."""

    def stop(self) -> None:
        """Stop serving once this turn is over."""


Handler = Callable[[Services, Ctx, Any], None]
"""``handler(worker, ctx, body)``; ``body`` is the op's typed request body."""
