"""The caller's half: worker handles, pointers, the session that connects them, the torch hook.

Imports :mod:`zmqsyft.wire` and the top-level modules, never :mod:`zmqsyft.worker`.
"""

from __future__ import annotations

from .api import WorkerClient
from .data import BaseDataset, FederatedDataset, WorkerNotInDataset
from .fixed import FixedPrecisionTensor
from .grid import PrivateGridNetwork
from .hook import TorchHook
from .launch import VirtualWorker, connect, get_session, spawn_worker, spawn_workers
from .loader import FederatedDataLoader
from .local import LOCAL_WORKER, LocalWorker
from .nn import move_all
from .optims import Optims
from .plan import Plan, PlanState, func2plan
from .pointer import PointerTensor
from .sandbox import Sandbox, create_sandbox
from .smpc import AdditiveSharingTensor

__all__ = ["WorkerClient", "TorchHook", "VirtualWorker", "connect", "get_session", "spawn_worker",
           "spawn_workers", "move_all",
           "PointerTensor", "FixedPrecisionTensor", "AdditiveSharingTensor", "LocalWorker",
           "LOCAL_WORKER", "Plan", "PlanState", "func2plan",
           "BaseDataset", "FederatedDataset", "FederatedDataLoader", "WorkerNotInDataset", "Optims",
           "PrivateGridNetwork", "Sandbox", "create_sandbox"]
