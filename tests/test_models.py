"""Remote models (PySyft Part 2 and Part 4): send/get/move/copy, remote training, averaging.

Every remote computation is checked against the same computation done locally, to float
tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn, optim

import zmqsyft as sy
from zmqsyft import PointerTensor

DATA = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGET = torch.tensor([[0.0], [0.0], [1.0], [1.0]])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_send_and_get_keep_the_parameter_objects(bob: sy.WorkerClient) -> None:
    model = make_model()
    before = params(model)
    objects = list(model.parameters())
    assert model.send(bob) is model
    assert all(isinstance(p, PointerTensor) and p.location is bob for p in model.parameters())
    assert [id(p) for p in model.parameters()] == [id(p) for p in objects]
    assert len(bob._objects) == 4
    assert model.get() is model
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert [id(p) for p in model.parameters()] == [id(p) for p in objects]
    assert all(torch.equal(a, b) for a, b in zip(params(model), before, strict=True))
    assert bob._objects == {}


def test_remote_forward_matches_local(bob: sy.WorkerClient) -> None:
    model = make_model()
    expected = model(DATA)
    model.send(bob)
    out = model(DATA.send(bob))
    assert isinstance(out, PointerTensor) and out.location is bob and out.shape == (4, 1)
    assert torch.allclose(out.get(), expected)
    assert isinstance(model[0].weight, PointerTensor) and model[0].weight.location is bob
    assert torch.allclose(model[0].weight.data.get(), make_model()[0].weight)


def test_backward_and_grad_pointers(bob: sy.WorkerClient) -> None:
    local = make_model()
    ((local(DATA) - TARGET) ** 2).sum().backward()
    model = make_model().send(bob)
    loss = ((model(DATA.send(bob)) - TARGET.send(bob)) ** 2).sum()
    loss.backward()
    for p, q in zip(model.parameters(), local.parameters(), strict=True):
        grad = p.grad
        assert isinstance(grad, PointerTensor) and grad.location is bob
        assert torch.allclose(grad.get(), q.grad)


@pytest.mark.parametrize("make_opt", [
    lambda ps: optim.SGD(ps, lr=0.1),
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: optim.Adam(ps, lr=0.05),
], ids=["sgd", "sgd-momentum", "adam"])
def test_remote_training_equals_local(bob: sy.WorkerClient, make_opt) -> None:  # type: ignore[no-untyped-def]
    local = make_model()
    local_opt = make_opt(local.parameters())
    remote = make_model().send(bob)
    remote_opt = make_opt(remote.parameters())
    data, target = DATA.send(bob), TARGET.send(bob)
    for _ in range(5):
        local_opt.zero_grad()
        local_loss = ((local(DATA) - TARGET) ** 2).sum()
        local_loss.backward()
        local_opt.step()
        remote_opt.zero_grad()
        loss = ((remote(data) - target) ** 2).sum()
        loss.backward()
        remote_opt.step()
        assert torch.allclose(loss.get(), local_loss, atol=1e-6)
    remote.get()
    for a, b in zip(remote.parameters(), local.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_part2_federated_rounds_equal_local(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    """PySyft Part 2 as written: one optimizer made before send, reused across send/get."""
    local = make_model()
    local_opt = optim.SGD(params=local.parameters(), lr=0.1)
    model = make_model()
    opt = optim.SGD(params=model.parameters(), lr=0.1)
    datasets = [(DATA[:2].send(bob), TARGET[:2].send(bob)), (DATA[2:].send(alice), TARGET[2:].send(alice))]
    local_sets = [(DATA[:2], TARGET[:2]), (DATA[2:], TARGET[2:])]
    for _ in range(3):
        for (data, target), (ldata, ltarget) in zip(datasets, local_sets, strict=True):
            model.send(data.location)
            opt.zero_grad()
            loss = ((model(data) - target) ** 2).sum()
            loss.backward()
            opt.step()
            model.get()
            local_opt.zero_grad()
            lloss = ((local(ldata) - ltarget) ** 2).sum()
            lloss.backward()
            local_opt.step()
            assert torch.allclose(loss.get(), lloss, atol=1e-6)
    for a, b in zip(model.parameters(), local.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_part4_trusted_aggregator_average(bob: sy.WorkerClient, alice: sy.WorkerClient,
                                          carol: sy.WorkerClient) -> None:
    secure_worker = carol
    model = nn.Linear(2, 1)
    bobs_model = model.copy().send(bob)
    alices_model = model.copy().send(alice)
    assert all(type(p) is nn.Parameter for p in model.parameters())  # the original stays local
    bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=0.1)
    alices_opt = optim.SGD(params=alices_model.parameters(), lr=0.1)
    local_b, local_a = copy.deepcopy(model), copy.deepcopy(model)
    lb_opt = optim.SGD(local_b.parameters(), lr=0.1)
    la_opt = optim.SGD(local_a.parameters(), lr=0.1)
    bobs_data, bobs_target = DATA[:2].send(bob), TARGET[:2].send(bob)
    alices_data, alices_target = DATA[2:].send(alice), TARGET[2:].send(alice)
    for _ in range(4):
        for opt, m, d, t in ((bobs_opt, bobs_model, bobs_data, bobs_target),
                             (alices_opt, alices_model, alices_data, alices_target),
                             (lb_opt, local_b, DATA[:2], TARGET[:2]),
                             (la_opt, local_a, DATA[2:], TARGET[2:])):
            opt.zero_grad()
            loss = ((m(d) - t) ** 2).sum()
            loss.backward()
            opt.step()
    alices_model.move(secure_worker)
    bobs_model.move(secure_worker)
    assert all(p.location is secure_worker for p in bobs_model.parameters())
    assert len(bob._objects) == 2 and len(alice._objects) == 2  # only the data is left there
    with torch.no_grad():
        model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
        model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())
    assert torch.allclose(model.weight, (local_a.weight + local_b.weight) / 2, atol=1e-6)
    assert torch.allclose(model.bias, (local_a.bias + local_b.bias) / 2, atol=1e-6)


def test_module_move_goes_directly_and_get_returns_it(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    model = make_model()
    before = params(model)
    model.send(bob).move(alice)
    assert bob._objects == {} and len(alice._objects) == 4
    model.get()
    assert all(torch.equal(a, b) for a, b in zip(params(model), before, strict=True))
    assert alice._objects == {}


def test_copy_of_a_remote_module_is_a_remote_copy(bob: sy.WorkerClient) -> None:
    model = make_model().send(bob)
    twin = model.copy()
    assert len(bob._objects) == 8
    assert all(isinstance(p, PointerTensor) and p.requires_grad and p.location is bob
               for p in twin.parameters())
    twin_ids = {p.id_at_location for p in twin.parameters()}
    assert len(twin_ids) == 4 and not twin_ids & {p.id_at_location for p in model.parameters()}
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0)
    twin.get()
    assert all(torch.equal(p, torch.zeros_like(p)) for p in twin.parameters())
    assert all(type(p) is nn.Parameter for p in twin.parameters())
    model.get()
    assert torch.equal(model[0].weight, make_model()[0].weight)


def test_sending_a_remote_module_again_is_refused(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    model = make_model().send(bob)
    with pytest.raises(sy.PointerError, match="already on 'bob'"):
        model.send(alice)
    assert alice._objects == {} and len(bob._objects) == 4  # nothing moved
    assert all(p.location is bob for p in model.parameters())
    model.get()
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(make_model()), strict=True))


def test_dropping_a_remote_module_frees_its_parameters(bob: sy.WorkerClient) -> None:
    model = make_model().send(bob)
    assert len(bob._objects) == 4
    del model
    assert bob._objects == {}


def test_aggregator_flow_never_sends_private_data_or_models_to_the_client(spawn) -> None:  # type: ignore[no-untyped-def]
    """Proof by the workers' own per-peer counters: nothing model- or data-sized ever went from
    bob or alice to this process; their models reached the aggregator directly."""
    bob, alice, secure_worker = spawn("bob"), spawn("alice"), spawn("secure_worker")
    torch.manual_seed(1)
    model = nn.Linear(64, 32)  # an 8 KiB weight
    weight_bytes = model.weight.numel() * 4
    data = {w: (torch.randn(200, 64).send(w), torch.randn(200, 32).send(w)) for w in (bob, alice)}
    me = sy.get_session().name
    before = {w: w.stats()["peers"].get(me, {}).get("bytes_out", 0) for w in (bob, alice)}
    models = {}
    for w in (bob, alice):
        m = model.copy().send(w)
        opt = optim.SGD(m.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            loss = ((m(data[w][0]) - data[w][1]) ** 2).mean()
            loss.backward()
            opt.step()
            loss.get()  # the loss value is meant to come back
        models[w] = m.move(secure_worker)
    with torch.no_grad():
        avg = ((models[bob].weight.data + models[alice].weight.data) / 2).get()
        model.weight.set_(avg)
    for w in (bob, alice):
        to_me = w.stats()["peers"][me]
        assert to_me["largest_out"] < 1024, (w.id, to_me)  # acks, descriptors and losses only
        assert to_me["bytes_out"] - before[w] < weight_bytes  # not even all of it together
        to_aggregator = w.stats()["peers"][secure_worker.id]
        assert to_aggregator["bytes_out"] >= weight_bytes  # the model went there, directly
    from_aggregator = secure_worker.stats()["peers"][me]
    assert from_aggregator["largest_out"] >= weight_bytes  # the average, once
