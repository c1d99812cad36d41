"""The zmqsyft exception tree, split by who is at fault.

``ZmqSyftError``
 ├─ ``CommunicationError``        the network or the peer process (not the caller's code)
 │   ├─ ``WorkerUnavailable``     a worker did not answer in time, died, or was closed
 │   │   └─ ``RequestTimeout``    ... specifically: the deadline ran out
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
    "RequestTimeout",
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


class RequestTimeout(WorkerUnavailable, TimeoutError):
    """A request's deadline ran out before the worker answered."""


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
