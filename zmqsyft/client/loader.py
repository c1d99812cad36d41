"""``FederatedDataLoader``: batches of a :class:`~zmqsyft.client.data.FederatedDataset`, each
made on the worker that holds the data.

For every batch the loader sends the batch's row indices (a small int64 tensor, inside the
operation's message) and the worker selects those rows of its data and targets
(``torch.index_select``): the data never comes to this program, and the batch pointers point at
that worker. Both selections are pipelined, so a batch costs two messages and no round trip.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .data import BaseDataset
from .handle import WorkerHandle

__all__ = ["FederatedDataLoader"]

# torch DataLoader options about local loader processes and memory: meaningless here
_NOT_APPLICABLE = {"num_workers", "pin_memory", "timeout", "worker_init_fn", "prefetch_factor",
                   "persistent_workers", "multiprocessing_context", "pin_memory_device"}

Batch = tuple[torch.Tensor, torch.Tensor]


class FederatedDataLoader:
    """Iterate a federated dataset in batches, worker by worker, as PySyft 0.2 did.

    Parameters
    ----------
    federated_dataset : FederatedDataset
        What to load (``dataset.federate(workers)`` or ``sy.FederatedDataset([...])``).
    batch_size : int
        Samples per batch (at least 1). A batch never mixes two workers' data.
    shuffle : bool
        Visit each worker's samples in a fresh random order every epoch (each sample exactly
        once per epoch).
    drop_last : bool
        Drop each worker's last batch if it is smaller than ``batch_size``.
    iter_per_worker : bool
        Yield, at each step, a dict ``{worker: (data, target)}`` with one batch of every worker
        that still has one, instead of one ``(data, target)`` at a time.
    seed : int, optional
        Seed of the ``torch.Generator`` that shuffles: two loaders with the same seed give the
        same orders, epoch after epoch. Without it (and without ``generator``) each epoch's
        order is seeded from torch's global generator, so ``torch.manual_seed`` fixes it.
    generator : torch.Generator, optional
        The generator to shuffle with (instead of ``seed``).

    Iterating gives one epoch: every batch of the first worker (in ``federated_dataset.workers``
    order), then every batch of the next one; each batch is ``(data_ptr, target_ptr)``, both on
    that worker, and ``data_ptr.location`` says which. ``len(loader)`` is the number of batches
    of an epoch (of steps, with ``iter_per_worker``). Options of torch's ``DataLoader`` about
    loader processes (``num_workers``, ``pin_memory``, ...) are accepted with a warning and
    ignored.
    """

    def __init__(self, federated_dataset: Any, batch_size: int = 8, shuffle: bool = False,
                 drop_last: bool = False, iter_per_worker: bool = False, *,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 num_iterators: int = 1, **kwargs: Any) -> None:
        workers = getattr(federated_dataset, "workers", None)
        if workers is None or not hasattr(federated_dataset, "__getitem__"):
            raise TypeError(
                f"FederatedDataLoader takes a sy.FederatedDataset, not a "
                f"{type(federated_dataset).__name__}: make one with dataset.federate((bob, "
                "alice)), or use torch.utils.data.DataLoader for local data")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, not "
                             f"{batch_size!r}")
        if num_iterators != 1:
            raise NotImplementedError(
                "num_iterators > 1 (batches of several workers at each step) is not supported; "
                "use iter_per_worker=True for one batch of every worker at each step")
        unknown = sorted(set(kwargs) - _NOT_APPLICABLE)
        if unknown:
            raise TypeError(f"FederatedDataLoader got unexpected options {', '.join(unknown)}")
        if kwargs:
            warnings.warn(f"FederatedDataLoader ignores {', '.join(sorted(kwargs))}: batches are "
                          "made on the workers, not in loader processes here", stacklevel=2)
        if seed is not None and generator is not None:
            raise ValueError("give FederatedDataLoader a seed or a generator, not both")
        self.federated_dataset = federated_dataset
        self.workers: list[str] = list(workers)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.iter_per_worker = bool(iter_per_worker)
        self.seed = seed
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator

    # --------------------------------------------------------------- sizes
    def _parts(self) -> list[BaseDataset]:
        return [self.federated_dataset[w] for w in self.workers]

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches_per_worker(self) -> dict[str, int]:
        """How many batches each worker gives per epoch."""
        return {w: self._count(len(d)) for w, d in zip(self.workers, self._parts(), strict=True)}

    def __len__(self) -> int:
        counts = self.batches_per_worker().values()
        if self.iter_per_worker:
            return max(counts, default=0)
        return sum(counts)

    # --------------------------------------------------------------- batches
    def _order(self, n: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n)
        generator = self.generator
        if generator is None:  # like torch's RandomSampler: a fresh seed from the global one
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=generator)

    def _batches(self, dataset: BaseDataset) -> Iterator[Batch]:
        order = self._order(len(dataset))
        for start in range(0, self._count(len(dataset)) * self.batch_size, self.batch_size):
            yield make_batch(dataset, order[start:start + self.batch_size])

    def __iter__(self) -> Iterator[Any]:
        parts = self._parts()
        if not self.iter_per_worker:
            return (batch for dataset in parts for batch in self._batches(dataset))
        return self._steps(parts)

    def _steps(self, parts: list[BaseDataset]) -> Iterator[dict[WorkerHandle, Batch]]:
        running = {dataset.location: self._batches(dataset) for dataset in parts}
        while running:
            step = {}
            for location, batches in list(running.items()):
                batch = next(batches, None)
                if batch is None:
                    del running[location]
                else:
                    step[location] = batch
            if step:
                yield step

    def __repr__(self) -> str:
        return (f"FederatedDataLoader({len(self)} batches of up to {self.batch_size} from "
                f"{', '.join(repr(w) for w in self.workers)}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last})")


def make_batch(dataset: BaseDataset, indices: torch.Tensor) -> Batch:
    """Rows ``indices`` of a dataset's data (transformed) and targets, selected where they are."""
    data = torch.index_select(dataset.data, 0, indices)
    targets = torch.index_select(dataset.targets, 0, indices)
    if dataset.transform_ is not None:
        data = dataset.transform_(data)
    return data, targets
