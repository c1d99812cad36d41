"""``PrivateGridNetwork``: a set of workers searched together (PySyft 0.2's grid, on processes).

``grid.search("#diabetes", "#data")`` asks every worker in turn and returns, for each worker
that has any, the pointers its :meth:`~zmqsyft.client.api.WorkerClient.search` found, by the
worker's id: the shape PySyft's tutorials index (``boston_data["alice"][0]``).
"""

from __future__ import annotations

from typing import Any

from .api import WorkerClient
from .handle import WorkerHandle
from .pointer import PointerTensor

__all__ = ["PrivateGridNetwork"]


class PrivateGridNetwork:
    """The workers of a private grid, to search them all at once.

    Parameters
    ----------
    *workers : WorkerClient
        Worker handles (from ``sy.spawn_worker``, ``sy.VirtualWorker`` or ``sy.connect``), in the
        order their results are listed.

    Attributes
    ----------
    workers : list of WorkerClient
        The workers, as given.
    """

    def __init__(self, *workers: WorkerClient) -> None:
        for w in workers:
            if not isinstance(w, WorkerHandle):
                raise TypeError(
                    f"PrivateGridNetwork takes worker handles (from sy.spawn_worker, "
                    f"sy.VirtualWorker or sy.connect), not {type(w).__name__}: "
                    "sy.PrivateGridNetwork(bob, alice) or sy.PrivateGridNetwork(*workers)")
        self.workers: list[WorkerClient] = list(workers)

    def search(self, *tags: str | list[str]) -> dict[str, list[PointerTensor]]:
        """Search every worker for the published tensors carrying every one of ``tags`` (see
        :meth:`WorkerClient.search <zmqsyft.client.api.WorkerClient.search>`).

        Returns
        -------
        dict
            worker id -> the non-owning pointers found there, in the grid's order; a worker
            that found nothing is left out (as in PySyft).
        """
        found: dict[str, list[PointerTensor]] = {}
        for worker in self.workers:
            results = worker.search(*tags)
            if results:
                found.setdefault(worker.id, []).extend(results)
        return found

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self) -> Any:
        return iter(self.workers)

    def __repr__(self) -> str:
        names = ", ".join(w.id + (" (closed)" if w.closed else "") for w in self.workers)
        return f"<PrivateGridNetwork of {len(self.workers)} workers: {names}>"
