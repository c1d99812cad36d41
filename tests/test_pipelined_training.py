"""A training step on a remote model costs no round trip: ``model.send()``, ``opt.zero_grad()``,
``loss.backward()`` and ``opt.step()`` are pipelined, because the client follows which leaves a
backward reaches (:mod:`zmqsyft.client.grads`) and answers ``p.grad`` itself. Checked here: the
count of awaited replies, the values against the same step done locally, the cases the client
cannot follow (it asks the worker), and a wrong prediction (an error, never a wrong value)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zmqsyft as sy
from zmqsyft.client.connection import Connection

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The requests this process waited for an answer to (``Connection.wait``), by name."""
    seen: list[str] = []
    real = Connection.wait

    def counted(self: Connection, req_id: int, timeout: float | None = None) -> Any:
        pending = self.inflight.get(req_id)
        seen.append(pending.what if pending is not None else "answered")
        return real(self, req_id, timeout)

    monkeypatch.setattr(Connection, "wait", counted)
    yield seen


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model: nn.Module, x: Any, y: Any, momentum: float = 0.0) -> Any:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def test_a_training_step_waits_for_no_answer(bob: sy.WorkerClient, waits: list[str]) -> None:
    x, y = _data()
    local = _model()
    xp, yp = x.send(bob), y.send(bob)
    waits.clear()
    remote = _model().send(bob)
    for _ in range(2):  # the second step reads and replaces the first one's gradients
        _step(remote, xp, yp, momentum=0.9)
    assert waits == [], f"a training step waited for {waits}"
    for _ in range(2):
        _step(local, x, y, momentum=0.9)
    remote.get()
    for mine, theirs in zip(local.parameters(), remote.parameters(), strict=True):
        torch.testing.assert_close(theirs, mine)
        torch.testing.assert_close(theirs.grad, mine.grad)


def test_a_backward_reaches_only_its_own_leaves(bob: sy.WorkerClient, waits: list[str]) -> None:
    x, _ = _data()
    a, b = _model(0).send(bob), _model(1).send(bob)
    xp = x.send(bob)
    ((a(xp) ** 2).sum() + (xp * 2).sum()).backward()
    waits.clear()
    assert [p.grad for p in b.parameters()] == [None] * 4
    grads = [p.grad for p in a.parameters()]
    assert waits == [] and all(g is not None for g in grads)
    assert xp.grad is None  # (the data did not require grad)
    local = _model(0)
    (local(x) ** 2).sum().backward()
    for g, p in zip(grads, local.parameters(), strict=True):
        torch.testing.assert_close(g.get(), p.grad)
    assert [p.grad for p in b.get().parameters()] == [None] * 4  # (the worker agrees)


def test_gradients_accumulate_and_the_pointers_follow_them(bob: sy.WorkerClient) -> None:
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True).send(bob)
    (w * w).sum().backward()
    first = w.grad
    assert w.grad is first  # (the same pointer until the gradient may change)
    (w * w).sum().backward()
    second = w.grad
    assert second is not first
    torch.testing.assert_close(second.get(), torch.tensor([4.0, -8.0, 12.0]))
    w.grad = None
    assert w.grad is None
    (3 * w).sum().backward()
    torch.testing.assert_close(w.grad.get(), torch.full((3,), 3.0))


def test_what_the_client_cannot_follow_it_asks_the_worker(bob: sy.WorkerClient,
                                                          waits: list[str]) -> None:
    w = torch.tensor([1.0, -2.0, 3.0, 0.5], requires_grad=True).send(bob)
    mask = torch.tensor([True, False, True, True]).send(bob)
    picked = w[mask]  # a data-dependent shape: made synchronously, its history unknown here
    waits.clear()
    (picked * picked).sum().backward()
    assert waits, "a backward through an unknown history must run on the worker at once"
    waits.clear()
    g = w.grad
    assert len(waits) == 1  # asked once...
    assert w.grad is g and len(waits) == 1  # ...then known
    torch.testing.assert_close(g.get(), torch.tensor([2.0, 0.0, 6.0, 1.0]))


def test_a_wrong_prediction_raises_and_never_gives_a_value(bob: sy.WorkerClient) -> None:
    w = torch.ones(3, requires_grad=True).send(bob)
    out = w * 2  # not a scalar: backward needs a gradient of its shape
    out.backward(torch.ones(4).send(bob))  # the wrong shape: the worker's backward fails
    g = w.grad  # predicted from the ops sent
    with pytest.raises(Exception, match="no gradient on worker 'bob'"):
        g.get()  # (whether the worker's refusal arrived before, or answers this get)
    with pytest.raises(Exception, match="shape"):
        sy.sync()  # the backward's own error, at the next synchronisation point


def test_a_function_run_on_the_worker_makes_the_client_ask_again(hook: sy.TorchHook,
                                                                  spawn: Callable[..., Any]) -> None:
    bob = spawn("bob")
    w = torch.ones(2, requires_grad=True).send(bob)
    assert w.grad is None  # (known: it was sent without one)
    assert bob.run(_give_every_tensor_a_gradient) == 1  # (what it did, the client cannot know)
    torch.testing.assert_close(w.grad.get(), torch.full((2,), 7.0))


def _give_every_tensor_a_gradient() -> int:
    import gc as _gc

    n = 0
    for obj in _gc.get_objects():
        if type(obj) is torch.Tensor and obj.requires_grad and obj.is_leaf and obj.numel() == 2:
            obj.grad = torch.full_like(obj, 7.0)
            n += 1
    return n


def test_a_refused_send_keeps_the_models_values(hook: sy.TorchHook,
                                                spawn: Callable[..., Any]) -> None:
    MiB = 1 << 20
    bob = spawn("bob", config=sy.Config(max_store_bytes=8 * MiB))  # 4 MiB for this session
    model = nn.Sequential(nn.Linear(2048, 1024), nn.Linear(1024, 8))  # an 8 MiB weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.send(bob)  # pipelined: the refusal comes later
    with pytest.raises(sy.PointerError, match="local values are kept") as info:
        model(torch.ones(2, 2048).send(bob))  # (this send waits: the refusal is in by then)
    assert "LimitExceeded" in str(info.value)
    model.get()
    for k, v in model.state_dict().items():
        assert type(v) is torch.Tensor and torch.equal(v, before[k]), k
    sy.sync()


def _omp_wait_policy() -> str | None:
    import os

    return os.environ.get("OMP_WAIT_POLICY")


def test_spawned_workers_threads_sleep_when_idle_unless_told_otherwise(
        hook: sy.TorchHook, spawn: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawned workers share the machine: their OpenMP threads do not spin between ops (which
    took most of the CPU of a federated round with more owners than CPUs)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert spawn("quiet").run(_omp_wait_policy) == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # (the user's choice wins)
    assert spawn("busy").run(_omp_wait_policy) == "ACTIVE"
