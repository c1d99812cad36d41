"""``Optims``: one optimizer per worker for a model that travels, as PySyft 0.2's Part 2 uses.

A model sent to bob, trained, fetched back and sent to alice keeps its parameter objects, so
one plain optimizer could step it everywhere; but an optimizer with state (momentum, Adam's
averages) keeps that state next to the parameters, on the worker where it was made, and the
next worker cannot use it. ``Optims`` gives each worker its own optimizer over the same
parameters, with the template's class and hyperparameters and a state of its own, made the
first time that worker asks for it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from .handle import WorkerHandle

__all__ = ["Optims"]

# the hook tables of torch.optim.Optimizer: a copy gets tables of its own
_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
          "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
          "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def _key(worker: Any) -> str:
    return str(worker.id if isinstance(worker, WorkerHandle) else worker)


class Optims:
    """One optimizer per worker, all over the same parameters.

    Parameters
    ----------
    workers : iterable of str or worker handles
        The workers (ids, as in PySyft's ``['bob', 'alice']``, or handles) that may ask.
    optim : torch.optim.Optimizer
        The template: each worker's optimizer is of its class, over its parameter groups, with
        its hyperparameters (learning rate, momentum, ...), and starts with an empty state.

    ``get_optim(worker)`` (an id or a handle) returns that worker's optimizer, made on its first
    call; the same object every later time.
    """

    def __init__(self, workers: Iterable[Any], optim: torch.optim.Optimizer) -> None:
        if not isinstance(optim, torch.optim.Optimizer):
            raise TypeError(f"Optims needs a torch optimizer as a template (optim=optim.SGD("
                            f"params=model.parameters(), lr=0.1)), not {type(optim).__name__}")
        self.optim = optim
        self.workers = [_key(w) for w in workers]
        if not self.workers:
            raise ValueError("Optims got no workers; name those that will train, e.g. "
                             "Optims(['bob', 'alice'], optim=...)")
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def get_optim(self, worker: Any) -> torch.optim.Optimizer:
        """The optimizer of ``worker`` (an id or a handle), made on first use."""
        key = _key(worker)
        optimizer = self.optimizers.get(key)
        if optimizer is None:
            if key not in self.workers:
                raise KeyError(f"Optims has no optimizer for worker {key!r}: it was made for "
                               f"{', '.join(repr(w) for w in self.workers)}; add the worker to "
                               "the list given to Optims")
            optimizer = self.optimizers[key] = _fresh(self.optim)
        return optimizer

    def count(self) -> int:
        """How many workers may ask for an optimizer."""
        return len(self.workers)

    def __repr__(self) -> str:
        made = ", ".join(repr(w) for w in self.optimizers) or "none yet"
        return (f"Optims({type(self.optim).__name__} for {', '.join(repr(w) for w in self.workers)}"
                f"; made: {made})")


def _fresh(template: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A new optimizer like ``template``: same class, parameter groups and hyperparameters, an
    empty state."""
    new = copy.copy(template)
    for name in _HOOKS:
        if hasattr(template, name):
            setattr(new, name, OrderedDict(getattr(template, name)))
    state = template.state_dict()
    state["state"] = {}
    new.load_state_dict(state)  # (torch rebuilds the groups and an empty state, of their own)
    return new
