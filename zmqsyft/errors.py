"""The zmqsyft exception tree, split by who is at fault.

``ZmqSyftError``
 ├─ ``CommunicationError``        the network or the peer process (not the caller's code)
 │   ├─ ``WorkerUnavailable``     a worker did not answer in time, died, or was closed
 │   │   ├─ ``OutcomeUnknown``    ... after the request left: it may or may not have run
 │   │   │   ├─ ``RequestTimeout``  ... specifically: the deadline ran out
 │   │   │   └─ ``ResultLost``      (also a PointerError) a pipelined op's result never came
 │   │   └─ ``RequestDropped``    a worker dropped it unrun: the connection it came on had ended
 │   ├─ ``WorkerRestarted``       (also ObjectNotFound) objects of a worker's earlier process
 │   └─ ``SpawnError``            a local worker process failed to start
 ├─ ``ProtocolError``             a message could not be encoded or decoded
 │   ├─ ``SerializationError``    a value of a type the wire format does not carry
 │   └─ ``HandoverRefused``       a same-host receiver could not take over a moved tensor's memory
 ├─ ``SecurityError``             something was refused on purpose
 │   ├─ ``OpNotAllowed``          an op name outside the allow-list
 │   ├─ ``UntrustedPayload``      a pickled payload sent to a worker that does not trust the sender
 │   ├─ ``AccessDenied``          an object or operation that is not the caller's to use that way
 │   ├─ ``LimitExceeded``         a request would pass one of the worker's limits
 │   └─ ``PrivacyError``          data would leave against its data owner's policy
 ├─ ``PointerError``              misuse of a pointer
 │   ├─ ``ObjectNotFound``        the object a pointer names is gone (got, freed, never existed)
 │   ├─ ``PointerReleased``       the pointer gave its object away (``.get()``, ``.send()``)
 │   └─ ``LocationMismatch``      pointers on different workers in one op
 └─ ``RemoteError``               an exception raised by remote code whose type is not safe to rebuild

Remote exceptions of safe types (builtins, torch errors) are re-raised as their own type with the
remote traceback attached as a note; see :mod:`zmqsyft.wire.exc_codec`.
"""

from __future__ import annotations

__all__ = [
    "ZmqSyftError",
    "AddressError",
    "CommunicationError",
    "WorkerUnavailable",
    "OutcomeUnknown",
    "RequestTimeout",
    "ResultLost",
    "RequestDropped",
    "WorkerRestarted",
    "SpawnError",
    "ProtocolError",
    "SerializationError",
    "HandoverRefused",
    "SecurityError",
    "AccessDenied",
    "OpNotAllowed",
    "UntrustedPayload",
    "LimitExceeded",
    "PrivacyError",
    "PointerError",
    "ObjectNotFound",
    "PointerReleased",
    "LocationMismatch",
    "RemoteError",
]


class ZmqSyftError(Exception):
    """Base class of every error zmqsyft raises on its own account."""


class AddressError(ZmqSyftError, ValueError):
    """An endpoint zmqsyft cannot bind or connect to (the message says what was expected)."""


class CommunicationError(ZmqSyftError):
    """The transport or the peer process failed; the caller's code is not at fault."""


class WorkerUnavailable(CommunicationError, ConnectionError):
    """A worker did not answer within its deadline, has died, or was closed."""


class OutcomeUnknown(WorkerUnavailable):
    """A request had left when its worker turned out dead, frozen or unreachable: it may or may
    not have taken effect there. Only what the worker tells later (``_objects``, a ``.get()``
    of a value it changes) can say which."""


class RequestTimeout(OutcomeUnknown, TimeoutError):
    """A request's deadline ran out before the worker answered."""


class RequestDropped(WorkerUnavailable):
    """A worker dropped a request without running it, because the connection it came on had
    ended meanwhile (the worker was frozen longer than its callers wait, so they were told it is
    unavailable). Nothing of the request took effect; send it again."""


class SpawnError(CommunicationError):
    """A local worker process could not be started or did not report ready."""


class ProtocolError(ZmqSyftError):
    """A message was malformed, of another protocol version, or could not be decoded."""


class SerializationError(ProtocolError, TypeError):
    """A value has a type that the wire format does not carry."""


class HandoverRefused(ProtocolError):
    """A worker could not take over the shared memory of a tensor moved to it from the same host.

    Internal to a move: the sending worker then sends the tensor's bytes instead. It reaches user
    code only from hand-made messages.
    """


class SecurityError(ZmqSyftError, PermissionError):
    """A request was refused on purpose (allow-list, trust)."""


class AccessDenied(SecurityError):
    """The object, or the operation, is not the caller's to use that way (another principal owns
    it, it was shared read-only, or the operation is for the worker's admins)."""


class OpNotAllowed(SecurityError):
    """An operation name is not in the allow-list of remotely executable operations."""


class UntrustedPayload(SecurityError):
    """A pickled payload was sent to a worker that does not trust the sender."""


class LimitExceeded(SecurityError):
    """A request would pass one of a worker's limits (memory held, ...); nothing of it was kept."""


class PrivacyError(SecurityError):
    """Data would leave a worker against its data owner's policy (see :mod:`zmqsyft.privacy`):
    released to someone who is not its owner, or moved to a worker the owner does not trust.
    Nothing was released or moved."""


class PointerError(ZmqSyftError):
    """A pointer was used in a way its state does not allow."""


class ObjectNotFound(PointerError, LookupError):
    """The object a pointer names does not exist at its location (any more)."""


class ResultLost(PointerError, OutcomeUnknown):
    """The result of a pipelined operation never came: its worker died, froze or became
    unreachable while the operation was in flight. Both a ``PointerError`` (the pointer holds
    no result) and a ``CommunicationError`` (the network or the worker is at fault)."""


class WorkerRestarted(ObjectNotFound, CommunicationError):
    """A pointer names an object of an earlier process of its worker: the worker was restarted
    (a new process at the same address) and everything it held before is gone."""


class PointerReleased(PointerError):
    """The pointer no longer owns its object: it was fetched with ``.get()`` or sent on."""


class LocationMismatch(PointerError, ValueError):
    """An operation mixes pointers that live on different workers."""


class RemoteError(ZmqSyftError):
    """An exception raised on a worker whose type cannot safely be rebuilt locally.

    Attributes
    ----------
    remote_type : str
        The qualified name of the remote exception type.
    remote_traceback : str
        The formatted traceback, as the worker saw it.
    worker_id : str
        The worker that raised it.
    remote_message : str
        The remote exception's own message.
    """

    def __init__(
        self, message: str, remote_type: str = "", remote_traceback: str = "", worker_id: str = "",
        remote_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.worker_id = worker_id
        self.remote_message = message if remote_message is None else remote_message
