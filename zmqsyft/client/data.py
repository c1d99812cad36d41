"""Datasets on workers, PySyft 0.2 style: :class:`BaseDataset`, :class:`FederatedDataset`,
``dataset.federate(workers)``.

A :class:`BaseDataset` is two tensors, ``data`` and ``targets``, of the same length: local
tensors, or pointers to tensors on one worker (``.send(worker)``). ``dataset.federate((bob,
alice))`` splits a local dataset (a :class:`BaseDataset`, or any ``torch.utils.data.Dataset`` of
``(data, target)`` samples once :class:`~zmqsyft.TorchHook` has run) into one contiguous part
per worker, sizes differing by at most one, sends each part straight to its worker and returns a
:class:`FederatedDataset`, which holds only pointers. The batches of a
:class:`~zmqsyft.client.loader.FederatedDataLoader` are then made on the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .handle import WorkerHandle
from .pointer import PointerTensor, check_worker

__all__ = ["BaseDataset", "FederatedDataset", "WorkerNotInDataset", "dataset_federate"]


class WorkerNotInDataset(KeyError):
    """A :class:`FederatedDataset` was asked for the part of a worker that holds none of it."""

    def __str__(self) -> str:  # a KeyError prints its argument's repr; this is a sentence
        return str(self.args[0]) if self.args else ""


def _worker_id(worker: Any) -> Any:
    return worker.id if isinstance(worker, WorkerHandle) else worker


def _describe(t: Any) -> str:
    where = f" on '{t.location.id}'" if isinstance(t, PointerTensor) else ""
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}{where}"


class BaseDataset(Dataset):
    """A dataset of two tensors: ``data`` (the inputs) and ``targets`` (the labels), row by row.

    Parameters
    ----------
    data, targets : torch.Tensor
        Local tensors, or pointers to tensors on one and the same worker, with as many rows each.
    transform : callable, optional
        Applied to the data of ``dataset[i]``, and to each whole batch of data a
        :class:`~zmqsyft.client.loader.FederatedDataLoader` makes (so it should work on a batch
        as on a sample: scaling, normalising). A tensor in, a tensor out; on a remote dataset it
        must consist of torch operations, which then run on the worker. ``federate()`` applies it
        before sending, sample by sample.

    ``len(dataset)`` is the number of rows, ``dataset[i]`` is ``(data[i], targets[i])``,
    ``.location`` the worker holding it (``None`` for a local dataset).
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        for name, t in (("data", data), ("targets", targets)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BaseDataset's {name} must be a tensor (or a pointer), "
                                f"not {type(t).__name__}")
            if t.dim() == 0:
                raise ValueError(f"BaseDataset's {name} is a scalar; it needs one row per sample")
        if len(data) != len(targets):
            raise ValueError(f"BaseDataset got {len(data)} rows of data but {len(targets)} "
                             "targets; give one target per row of data")
        where = {t.location.id if isinstance(t, PointerTensor) else None for t in (data, targets)}
        if len(where) > 1:
            shown = " and ".join("here" if w is None else f"on '{w}'" for w in sorted(where, key=str))
            raise ValueError(f"BaseDataset's data and targets are in different places ({shown}); "
                             "send or move them to one worker first")
        self.data = data
        self.targets = targets
        self.transform_ = transform

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.data[index]
        if self.transform_ is not None:
            item = self.transform_(item)
        return item, self.targets[index]

    @property
    def location(self) -> WorkerHandle | None:
        """The worker holding the data, or ``None`` if it is here."""
        return self.data.location if isinstance(self.data, PointerTensor) else None

    def get_data(self) -> torch.Tensor:
        return self.data

    def get_targets(self) -> torch.Tensor:
        return self.targets

    def transform(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> BaseDataset:
        """Apply ``transform`` to the whole ``data`` tensor now (on its worker if it is remote)."""
        self.data = transform(self.data)
        return self

    def __repr__(self) -> str:
        return (f"BaseDataset({len(self)} samples: data {_describe(self.data)}, "
                f"targets {_describe(self.targets)})")

    # ------------------------------------------------------------ moving
    def send(self, worker: WorkerHandle, *more: WorkerHandle) -> BaseDataset:
        """A dataset whose data and targets are copies on ``worker`` (this one stays local)."""
        check_worker(worker, more, "send")
        if self.location is not None:
            raise ValueError(f"this dataset is already on worker '{self.location.id}'; use "
                             ".move(worker) to move it, or .get() it first")
        return BaseDataset(self.data.send(worker), self.targets.send(worker), self.transform_)

    def move(self, worker: WorkerHandle) -> BaseDataset:
        """Move a remote dataset's tensors straight to ``worker``; returns this dataset."""
        check_worker(worker, (), "move")
        if self.location is None:
            raise ValueError("this dataset is local: use .send(worker)")
        self.data = self.data.move(worker)
        self.targets = self.targets.move(worker)
        return self

    def get(self) -> BaseDataset:
        """Fetch a remote dataset's tensors here (destructively, as ``.get()`` is); returns this
        dataset, now local."""
        if isinstance(self.data, PointerTensor):
            self.data = self.data.get()
        if isinstance(self.targets, PointerTensor):
            self.targets = self.targets.get()
        return self

    def federate(self, workers: Sequence[WorkerHandle]) -> FederatedDataset:
        """Split this dataset across ``workers`` and send each part there (see
        :func:`dataset_federate`)."""
        return dataset_federate(self, workers)


def _as_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (data, targets) tensors of a dataset that is just two tensors, untransformed."""
    if isinstance(dataset, BaseDataset) and dataset.transform_ is None:
        return dataset.data, dataset.targets
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    return None


def _part(dataset: Any, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start:stop`` of a local dataset as two tensors (transforms applied)."""
    tensors = _as_tensors(dataset)
    if tensors is not None:
        return tensors[0][start:stop], tensors[1][start:stop]
    subset = torch.utils.data.Subset(dataset, range(start, stop))
    batch = next(iter(DataLoader(subset, batch_size=stop - start)))
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError(f"federate() needs samples of the form (data, target); "
                        f"{type(dataset).__name__}'s samples are not")
    data, targets = batch
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    return data, targets


def dataset_federate(dataset: Any, workers: Sequence[WorkerHandle]) -> FederatedDataset:
    """Split a local dataset into one contiguous part per worker and send each part there.

    Parts differ in size by at most one sample, the first workers taking the larger ones. Each
    part goes straight from this program to its worker; the result holds only pointers.

    Parameters
    ----------
    dataset : BaseDataset or torch.utils.data.Dataset
        Local data whose samples are ``(data, target)`` pairs.
    workers : sequence of worker handles
        Where the parts go, in order; each at most once.

    Raises
    ------
    ValueError
        For no workers, a worker named twice, fewer samples than workers, or a dataset that is
        already on a worker.
    """
    if isinstance(workers, WorkerHandle):
        workers = (workers,)
    workers = list(workers)
    if not workers:
        raise ValueError("federate() got no workers: name where the parts go, "
                         "e.g. dataset.federate((bob, alice))")
    for w in workers:
        check_worker(w, (), "federate")
    ids = [w.id for w in workers]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"federate() got worker {', '.join(repr(i) for i in twice)} more than "
                         "once; a FederatedDataset holds one part per worker")
    if isinstance(dataset, BaseDataset) and dataset.location is not None:
        raise ValueError(f"this dataset is already on worker '{dataset.location.id}'; "
                         "federate() splits local data (use .get() first, or build a "
                         "FederatedDataset from datasets already on workers)")
    n = len(dataset)
    if n < len(workers):
        raise ValueError(f"cannot split {n} samples across {len(workers)} workers (each would "
                         f"need at least one); federate over at most {n} workers")
    base, extra = divmod(n, len(workers))
    parts = []
    start = 0
    for i, worker in enumerate(workers):
        stop = start + base + (1 if i < extra else 0)
        data, targets = _part(dataset, start, stop)
        parts.append(BaseDataset(data.send(worker), targets.send(worker)))
        start = stop
    return FederatedDataset(parts)


class FederatedDataset:
    """Datasets already on workers, one per worker, addressed by worker id.

    Parameters
    ----------
    datasets : iterable of BaseDataset
        Each one remote (``.send(worker)``), each on a different worker.

    ``.workers`` lists the worker ids in order, ``fd["bob"]`` is bob's :class:`BaseDataset`
    (its tensors are pointers), ``len(fd)`` the number of samples on all of them. It is what a
    :class:`~zmqsyft.client.loader.FederatedDataLoader` takes.
    """

    def __init__(self, datasets: Iterable[BaseDataset]) -> None:
        self.datasets: dict[str, BaseDataset] = {}
        for i, dataset in enumerate(datasets):
            if not isinstance(dataset, BaseDataset):
                raise TypeError(f"FederatedDataset takes sy.BaseDataset objects; item {i} is a "
                                f"{type(dataset).__name__}")
            location = dataset.location
            if location is None:
                raise ValueError(f"dataset {i} is local; send it to its worker first "
                                 "(dataset.send(worker)), or use dataset.federate(workers)")
            if location.id in self.datasets:
                raise ValueError(f"two datasets are on worker '{location.id}'; a "
                                 "FederatedDataset holds one per worker (concatenate them "
                                 "there first)")
            self.datasets[location.id] = dataset

    @property
    def workers(self) -> list[str]:
        """The ids of the workers holding a part, in order."""
        return list(self.datasets)

    def __getitem__(self, worker: str | WorkerHandle) -> BaseDataset:
        worker_id = _worker_id(worker)
        try:
            return self.datasets[worker_id]
        except (KeyError, TypeError):
            known = ", ".join(repr(w) for w in self.datasets) or "none"
            raise WorkerNotInDataset(
                f"no part of this FederatedDataset is on worker {worker_id!r}; the workers "
                f"holding parts are {known} (see .workers): index it by one of those") from None

    def __contains__(self, worker: object) -> bool:
        try:
            return _worker_id(worker) in self.datasets
        except TypeError:  # unhashable
            return False

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def get_dataset(self, worker: str | WorkerHandle) -> BaseDataset:
        """Fetch one worker's part here (destructively) and remove it from this dataset."""
        dataset = self[worker]
        dataset.get()
        del self.datasets[_worker_id(worker)]
        return dataset

    def __repr__(self) -> str:
        lines = [f"FederatedDataset: {len(self)} samples on {len(self.datasets)} workers"]
        lines += [f"    {w}: {len(d)} samples" for w, d in self.datasets.items()]
        return "\n".join(lines)
