"""``create_sandbox``: PySyft 0.2's playground (its tutorial Part 5) on real worker processes.

``sy.create_sandbox(globals())`` hooks torch, starts six worker processes (``bob``, ``theo``,
``jason``, ``alice``, ``andy``, ``jon``) at once, and, with ``download_data``, splits each of
scikit-learn's bundled datasets by rows across them, every part tagged (``"#diabetes"``,
``"#data"`` or ``"#target"``) and described, so that ``grid.search("#diabetes", "#data")``
finds a part on every worker.

**Whose data it is.** As in PySyft, this program sends the data: it owns every part, published
by its tags, so anyone the workers accept (only this program: spawned workers know no other
client) finds the parts with ``search()`` as read-only capabilities and may train on them and
take the results (a model, a loss) back. No privacy labels are involved: this is public data.
For data that may not leave its worker, see the README's *Data owners' privacy*
(``spawn_worker(load=..., policy=...)``). The owning pointers are kept in the returned
:class:`Sandbox` (also put in the globals as ``sandbox``): while it lives the data stays on the
workers, however many search results are dropped; ``sandbox.close()`` stops the workers.
Nothing is downloaded: scikit-learn ships these datasets (Boston housing, of PySyft's list, is
no longer among them: ``"#diabetes"`` is the regression data to use instead).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from ..wire.tags import MAX_DESCRIPTION_CHARS
from . import interrupts
from .api import WorkerClient
from .grid import PrivateGridNetwork
from .hook import TorchHook
from .launch import spawn_worker
from .pointer import PointerTensor

__all__ = ["create_sandbox", "Sandbox", "SANDBOX_WORKERS", "SANDBOX_DATASETS"]

SANDBOX_WORKERS = ("bob", "theo", "jason", "alice", "andy", "jon")
"""The sandbox's workers, by name, in the order of ``workers`` (PySyft's)."""

SANDBOX_DATASETS = ("diabetes", "breast_cancer", "digits", "iris", "wine", "linnerud")
"""scikit-learn's bundled datasets the sandbox spreads (``sklearn.datasets.load_<name>``)."""


class Sandbox:
    """What :func:`create_sandbox` made: the hook, the workers, the grid, and the owning
    pointers to the data it sent.

    Attributes
    ----------
    hook : TorchHook
    workers : list of WorkerClient
        ``bob``, ``theo``, ``jason``, ``alice``, ``andy``, ``jon``.
    grid : PrivateGridNetwork
        Of all the workers.
    data : dict
        dataset name -> worker id -> ``(data, target)``: the owning pointers to each part
        (empty without ``download_data``). Dropping them frees the parts.
    """

    def __init__(self, hook: TorchHook, workers: list[WorkerClient]) -> None:
        self.hook = hook
        self.workers = workers
        self.grid = PrivateGridNetwork(*workers)
        self.data: dict[str, dict[str, tuple[PointerTensor, PointerTensor]]] = {}

    def close(self) -> None:
        """Stop every worker, all at once (their data goes with them; what else they hold too),
        reap them, and forget the pointers."""
        running = [w._proc for w in self.workers if w._proc is not None and not w.closed]
        if running:
            interrupts.stop_all(running, self.workers[0].session.cfg.close_timeout)
        for worker in self.workers:
            worker.close()  # (its process has exited: only the handle is closed)
        self.data.clear()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(w.id for w in self.workers)
        sets = ", ".join(self.data) or "no data"
        return f"<zmqsyft sandbox: workers {names}; {sets}>"


def create_sandbox(gbs: dict[str, Any], verbose: bool = True, download_data: bool = True, *,
                   transport_kind: str = "ipc") -> Sandbox:
    """PySyft's sandbox: a hook, six real worker processes and scikit-learn's datasets on them.

    Parameters
    ----------
    gbs : dict
        Where to put the names, normally ``globals()``: ``hook``, ``bob``, ``theo``, ``jason``,
        ``alice``, ``andy``, ``jon``, ``workers`` (their list), ``grid``
        (a :class:`~zmqsyft.client.grid.PrivateGridNetwork` of them) and ``sandbox`` (what this
        returns).
    verbose : bool
        Say what is being done, step by step.
    download_data : bool
        Spread scikit-learn's bundled datasets (:data:`SANDBOX_DATASETS`) across the workers,
        each split by rows, every part tagged ``#<name>`` and ``#data`` or ``#target`` and
        described (PySyft's name: nothing is downloaded). Needs scikit-learn
        (``pip install scikit-learn``).
    transport_kind : {"ipc", "tcp"}
        How the workers listen (see :func:`~zmqsyft.spawn_worker`).

    Returns
    -------
    Sandbox
        Which holds the owning pointers to the data (see the module's docs) and closes the
        workers with ``close()`` (or at this program's exit).

    Raises
    ------
    ImportError
        With ``download_data`` and no scikit-learn; nothing was started.
    """
    if not isinstance(gbs, dict):
        raise TypeError(f"create_sandbox() puts its names into a dict, normally globals(), "
                        f"not {type(gbs).__name__}")
    if download_data and importlib.util.find_spec("sklearn") is None:
        raise ImportError("create_sandbox(download_data=True) spreads scikit-learn's bundled "
                          "datasets: pip install scikit-learn (or pass download_data=False)")
    say: Callable[[str], None] = print if verbose else (lambda _: None)
    say("Setting up the sandbox")
    say("  - hooking torch")
    hook = TorchHook(torch)
    say(f"  - starting worker processes (all at once): {', '.join(SANDBOX_WORKERS)}")
    workers = [spawn_worker(name, transport_kind=transport_kind) for name in SANDBOX_WORKERS]
    sandbox = Sandbox(hook, workers)
    try:
        if download_data:
            say("  - spreading scikit-learn's bundled datasets across them, tagged:")
            for name in SANDBOX_DATASETS:
                say(f"      #{name}")
                sandbox.data[name] = _spread(name, workers)
    except BaseException:
        sandbox.close()
        raise
    gbs.update({"hook": hook, **{w.id: w for w in workers}, "workers": list(workers),
                "grid": sandbox.grid, "sandbox": sandbox})
    say(f"  - defined: hook, {', '.join(SANDBOX_WORKERS)}, workers, grid, sandbox")
    say("Done!")
    return sandbox


def _spread(name: str, workers: list[WorkerClient]) -> dict[str, tuple[PointerTensor, PointerTensor]]:
    """Load scikit-learn's bundled dataset ``name``; send each worker its rows of the inputs and
    of the targets, tagged and described; the owning pointers by worker id."""
    from sklearn import datasets  # (only with download_data: an optional dependency)

    bunch = getattr(datasets, f"load_{name}")()
    descr = "\n".join(line for line in bunch.DESCR.strip().splitlines()
                      if not line.startswith(".. _")).strip()
    title = descr.splitlines()[0] if descr else name
    parts: dict[str, list[PointerTensor]] = {w.id: [] for w in workers}
    for kind, values in (("data", bunch.data), ("target", bunch.target)):
        whole = torch.as_tensor(values, dtype=torch.float32)
        chunks = torch.tensor_split(whole, len(workers))
        start = 0
        for i, (worker, chunk) in enumerate(zip(workers, chunks, strict=True)):
            rows = f"rows {start}-{start + len(chunk) - 1} of {len(whole)}"
            start += len(chunk)
            head = (f"{title}, {'inputs' if kind == 'data' else 'targets'}: {rows} "
                    f"(part {i + 1} of {len(workers)})")
            text = f"{head}\n(scikit-learn's bundled copy)\n\n{descr}"[:MAX_DESCRIPTION_CHARS]
            part = chunk.clone().tag(f"#{name}", f"#{kind}").describe(text)  # type: ignore[attr-defined]
            parts[worker.id].append(part.send(worker))
    return {wid: (p[0], p[1]) for wid, p in parts.items()}
