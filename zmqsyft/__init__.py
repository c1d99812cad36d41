"""zmqsyft: PySyft-style pointers to torch tensors on real worker processes, over ZeroMQ.

>>> import torch, zmqsyft as sy
>>> hook = sy.TorchHook(torch)
>>> bob = sy.VirtualWorker(hook, id="bob")          # a real worker process
>>> x_ptr = torch.tensor([1, 2, 3, 4]).send(bob)
>>> (x_ptr + x_ptr).get()
tensor([2, 4, 6, 8])
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import Config, configure, get_config
from .errors import (
    AccessDenied,
    AddressError,
    CommunicationError,
    LimitExceeded,
    LocationMismatch,
    ObjectNotFound,
    OpNotAllowed,
    OutcomeUnknown,
    PointerError,
    PointerReleased,
    PrivacyError,
    ProtocolError,
    RemoteError,
    RequestDropped,
    RequestTimeout,
    ResultLost,
    SecurityError,
    SerializationError,
    SpawnError,
    UntrustedPayload,
    WorkerRestarted,
    WorkerUnavailable,
    ZmqSyftError,
)
from .keys import KeyPair
from .privacy import Policy

if TYPE_CHECKING:  # (imported when first used: see __getattr__)
    from .client import (
        LOCAL_WORKER,
        AdditiveSharingTensor,
        BaseDataset,
        FederatedDataLoader,
        FederatedDataset,
        FixedPrecisionTensor,
        Plan,
        PlanState,
        PointerTensor,
        PrivateGridNetwork,
        Sandbox,
        TorchHook,
        VirtualWorker,
        WorkerClient,
        WorkerNotInDataset,
        connect,
        create_sandbox,
        func2plan,
        get_session,
        move_all,
        spawn_worker,
        spawn_workers,
    )

    local_worker = LOCAL_WORKER

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"


def sync() -> None:
    """Wait until every operation and delete this thread issued has taken effect everywhere.

    Raises the first error of a pipelined operation that was not reported yet.
    """
    from .client import get_session

    get_session().sync()


# The caller's half (zmqsyft.client: pointers, the hook, spawning) is imported on first use of
# one of its names, so that a worker or the fork server, which import this package for
# zmqsyft.worker, never load it (a tenth of their start, and memory in every worker). Its names
# are those of __all__ not defined here.


def __getattr__(name: str) -> Any:
    """The client's names, imported on first use (``local_worker``: PySyft's name of this
    program as a worker, the owner of every pointer it holds; also ``hook.local_worker``)."""
    if name in _CLIENT_NAMES:
        from . import client

        value = client.LOCAL_WORKER if name == "local_worker" else getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zmqsyft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _CLIENT_NAMES)


__all__ = [
    "TorchHook", "VirtualWorker", "spawn_worker", "spawn_workers", "connect", "WorkerClient", "PointerTensor",
    "FixedPrecisionTensor", "AdditiveSharingTensor", "local_worker",
    "Plan", "PlanState", "func2plan",
    "BaseDataset", "FederatedDataset", "FederatedDataLoader", "WorkerNotInDataset",
    "PrivateGridNetwork", "create_sandbox", "Sandbox",
    "Config", "configure", "get_config", "sync", "move_all", "get_session",
    "ZmqSyftError", "CommunicationError", "WorkerUnavailable", "RequestTimeout", "SpawnError",
    "OutcomeUnknown", "RequestDropped", "ResultLost", "WorkerRestarted",
    "ProtocolError", "SerializationError", "SecurityError", "OpNotAllowed", "UntrustedPayload", "LimitExceeded",
    "AccessDenied", "AddressError", "PrivacyError", "Policy", "KeyPair",
    "PointerError", "ObjectNotFound", "PointerReleased", "LocationMismatch", "RemoteError",
]
_CLIENT_NAMES = frozenset(__all__).difference(globals()) | {"LOCAL_WORKER"}
