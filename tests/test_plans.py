"""Plans (PySyft Part 8, issue 15): functions and modules traced into allow-listed ops, sent to a
worker and run there on pointers as one message, on real worker processes (the pooled ``bob``
and ``alice``; each test leaves their stores empty)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import zmqsyft as sy
from zmqsyft.errors import OpNotAllowed

pytestmark = pytest.mark.timeout(120)


def _messages_in(worker: sy.WorkerClient) -> int:
    return sum(p["messages_in"] for p in worker.stats()["peers"].values())


class Net(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


def test_a_function_plan_is_built_sent_and_run_on_pointers(hook: sy.TorchHook,
                                                             bob: sy.WorkerClient) -> None:
    @sy.func2plan(args_shape=[(1,)])
    def double_abs(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        return torch.abs(x)

    assert double_abs.is_built and "double_abs" in repr(double_abs)
    assert double_abs.__name__ == "double_abs"
    assert torch.equal(double_abs(torch.tensor([-3.0])), torch.tensor([6.0]))  # here: the function
    sent = double_abs.send(bob)  # a copy there; the plan itself stays here
    assert sent is not double_abs and sent.location is bob and double_abs.location is None
    assert sent.is_built and "on 'bob'" in repr(sent)
    x = torch.tensor([-1.0, 2.0]).send(bob)
    result = sent(x)
    assert isinstance(result, sy.PointerTensor) and result.location is bob
    assert torch.equal(result.get(), torch.tensor([2.0, 4.0]))
    del x


def test_a_plan_runs_as_one_message_however_many_ops(hook: sy.TorchHook,
                                                      bob: sy.WorkerClient) -> None:
    @sy.func2plan()
    def many(x: torch.Tensor) -> torch.Tensor:
        for _ in range(50):  # more ops than a pipelined batch holds (32)
            x = x * 1.01 + 0.5
        return x.sum()

    x = torch.arange(4.0).send(bob)
    many.build(x)
    bob.sync()
    before = _messages_in(bob)
    result = many(x)
    # the plan's 101 CALLs came in one message; the other is the stats() request itself
    assert _messages_in(bob) - before == 2, _messages_in(bob) - before
    expected = torch.arange(4.0)
    for _ in range(50):
        expected = expected * 1.01 + 0.5
    assert torch.allclose(result.get(), expected.sum())
    del x


def test_a_module_plan_gives_what_its_forward_gives_and_moves_between_workers(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    torch.manual_seed(0)
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    data = torch.tensor([-1.0, 2.0])
    with torch.no_grad():
        want = net(data)  # local tensors: forward, here
    on_bob = net.send(bob)
    assert on_bob.location is bob and net.location is None
    got = on_bob(data.send(bob))
    assert got.location is bob
    assert torch.allclose(got.get(), want)
    on_alice = net.send(alice)  # the same plan, sent again elsewhere (PySyft's Part 8)
    assert torch.allclose(on_alice(data.send(alice)).get(), want)
    with pytest.raises(sy.PointerError, match="already"):
        on_bob.send(alice)
    back = on_bob.get()
    assert back.location is None and bob._objects == {}
    with torch.no_grad():
        assert torch.allclose(back(data), want)
    del on_alice


def test_a_plan_with_state(hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1.0]),))
    def with_bias(x: torch.Tensor, state: sy.PlanState) -> torch.Tensor:
        (bias,) = state.read()
        return x * 2 + bias

    assert torch.equal(with_bias(torch.tensor([3.0])), torch.tensor([7.0]))
    sent = with_bias.send(bob)
    assert torch.equal(sent(torch.tensor([3.0]).send(bob)).get(), torch.tensor([7.0]))
    sent.get()
    assert bob._objects == {}


def test_a_plan_that_is_not_where_its_arguments_are_says_so(hook: sy.TorchHook,
                                                             bob: sy.WorkerClient,
                                                             alice: sy.WorkerClient) -> None:
    net = Net()
    x = torch.ones(2).send(bob)
    with pytest.raises(sy.LocationMismatch, match=r"send the plan there first"):
        net(x)  # its parameters are here
    on_alice = net.send(alice)
    with pytest.raises(sy.LocationMismatch, match="on worker 'alice'"):
        on_alice(x)
    del x, on_alice


def test_ops_outside_the_allow_list_or_giving_values_are_refused_when_building(
        hook: sy.TorchHook) -> None:
    def resizes(x: torch.Tensor) -> torch.Tensor:
        return x.resize_as(x)

    with pytest.raises(OpNotAllowed, match="cannot be part of a plan"):
        sy.func2plan(args_shape=[(2,)])(resizes)

    def branches(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum().item() > 0 else x

    with pytest.raises(sy.PointerError, match="not known before it runs"):
        sy.func2plan(args_shape=[(2,)])(branches)


def test_the_worker_checks_each_op_of_a_plan(hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    """A plan's ops are CALLs the worker checks one by one: an op list tampered with here (an
    op outside the allow-list) is refused by the worker, and nothing of it runs."""
    @sy.func2plan()
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    x = torch.ones(3).send(bob)
    twice.build(x)
    (trace,) = twice._traces.values()
    trace.ops[0].name = "os.system"
    result = twice(x)
    with pytest.raises(OpNotAllowed, match="not in zmqsyft's reviewed allow-list"):
        result.get()
    assert torch.equal(x.get(), torch.ones(3))


def test_a_trained_step_through_a_plan(hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    """A plan's results carry gradients on the worker: a loss made by a plan trains the
    plan's parameters there."""
    torch.manual_seed(1)
    net = Net()
    net = net.send(bob)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    data, target = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    x, y = data.send(bob), target.send(bob)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((net(x).exp() - y) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.get().item())
    assert losses[-1] < losses[0], losses
    net.get()
    del x, y


def test_a_plan_returning_its_state_as_is_gives_a_reference_of_its_own(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    """A plan whose result is a tensor it holds (its state, unchanged) gave the caller the plan's
    own pointer: ``.get()`` on the result took the state away, and the plan's next run failed.
    The result is a reference of its own to the same tensor (PySyft: a result has its own id)."""
    @sy.func2plan(args_shape=[(2,)], state=(torch.tensor([1.0, 2.0]),))
    def scaled_and_state(x: torch.Tensor, state: sy.PlanState) -> tuple[torch.Tensor, ...]:
        (w,) = state.read()
        return x * w, w

    on_bob = scaled_and_state.send(bob)
    for _ in range(2):  # the state is still there for the second run
        y, w = on_bob(torch.ones(2).send(bob))
        assert torch.equal(w.get(), torch.tensor([1.0, 2.0]))
        assert torch.equal(y.get(), torch.tensor([1.0, 2.0]))
    (state,) = on_bob.state.read()
    assert isinstance(state, sy.PointerTensor) and state._released is None
    on_bob.get()
    assert bob._objects == {}


def test_a_plan_sent_keeps_its_state_and_constants_there(hook: sy.TorchHook, bob: sy.WorkerClient,
                                                  alice: sy.WorkerClient) -> None:
    @sy.func2plan(args_shape=[(2,)], state=(torch.tensor([1.0, 2.0]),))
    def shifted(x: torch.Tensor, state: sy.PlanState) -> torch.Tensor:
        (shift,) = state.read()
        return x + shift + torch.tensor([10.0, 10.0])  # (a constant: it goes along)

    assert shifted.is_built
    on_bob = shifted.send(bob)
    assert on_bob.is_built and "on 'bob'" in repr(on_bob)
    assert torch.equal(on_bob(torch.zeros(2).send(bob)).get(), torch.tensor([11.0, 12.0]))
    on_bob.get()
    assert bob._objects == {}, "the plan's state or constants stayed on bob"
    on_alice = shifted.send(alice)
    assert torch.equal(on_alice(torch.zeros(2).send(alice)).get(), torch.tensor([11.0, 12.0]))
    del on_alice
    assert torch.equal(shifted(torch.zeros(2)), torch.tensor([11.0, 12.0]))


# ---------------------------------------------------------------------------------------------
# Ops on a plan's state or parameters alone (no input involved) are ops of the plan, run at each
# call on the values the state has then: never worked out once, when the plan was built, and kept
# as a constant (a plan updating its state in place read a stale ``w.t()`` at every later call).


def _sgd_step(x: torch.Tensor, y: torch.Tensor, state: sy.PlanState) -> torch.Tensor:
    (w,) = state.read()
    pred = x @ w.t()  # w.t(): the state alone
    grad = 2 * (pred - y).t() @ x
    w.sub_(0.5 * grad)  # an SGD step inside the plan
    w.mul_(1.5)  # the state alone, in place
    return pred


def test_a_plan_updating_its_state_in_place_reads_the_new_state_at_each_run(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    w0, x, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    plan = sy.func2plan(args_shape=[(1, 2), (1, 1)], state=(w0.clone(),))(_sgd_step)
    assert torch.equal(plan.state.read()[0], w0), "building the plan changed its state"
    local_state = sy.PlanState([w0.clone()])  # plain torch, here
    ops_state = sy.PlanState([w0.clone().send(bob)])  # the same ops one by one on pointers
    sent = plan.send(bob)
    xp, yp = x.send(bob), y.send(bob)
    for run in range(3):
        want = _sgd_step(x, y, local_state)
        one_by_one = _sgd_step(xp, yp, ops_state).get()
        got = sent(xp, yp).get()
        assert torch.equal(one_by_one, want), (run, one_by_one, want)
        assert torch.equal(got, want), (run, got, want)
    sent.get()
    assert torch.equal(sent.state.read()[0], local_state.read()[0])
    assert torch.equal(ops_state.read()[0].get(), local_state.read()[0])
    del xp, yp, sent


def test_a_plan_built_after_it_was_sent_runs_nothing_while_built(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    """Built at its first call on pointers, the ops on its (remote) state are recorded, not run
    there while it is built (and frozen as a pointer to their first result)."""
    w0, x, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    sent = sy.Plan(fn=_sgd_step, state=(w0.clone(),)).send(bob)
    assert not sent.is_built
    local_state = sy.PlanState([w0.clone()])
    xp, yp = x.send(bob), y.send(bob)
    for run in range(3):
        want = _sgd_step(x, y, local_state)
        got = sent(xp, yp).get()
        assert torch.equal(got, want), (run, got, want)
    sent.get()
    assert torch.equal(sent.state.read()[0], local_state.read()[0])
    del xp, yp, sent


class _TransposedLinear(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.fc.weight.t() + self.fc.bias * 2  # parameters alone: weight.t(), bias * 2


@pytest.mark.parametrize("built_before_sent", [True, False])
def test_a_module_plan_reads_its_parameters_as_they_are_at_each_run(
        hook: sy.TorchHook, bob: sy.WorkerClient, built_before_sent: bool) -> None:
    torch.manual_seed(2)
    net, here = _TransposedLinear(), _TransposedLinear()
    here.load_state_dict(net.state_dict())
    data, target = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([[1.0], [0.0]])
    if built_before_sent:
        net.build(data)
    net = net.send(bob)
    opt, opt_here = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, here))
    x, y = data.send(bob), target.send(bob)
    for run in range(3):
        for model, optim, a, b in ((net, opt, x, y), (here, opt_here, data, target)):
            optim.zero_grad()
            pred = model(a)
            loss = ((pred - b) ** 2).sum()
            loss.backward()
            optim.step()
            if model is net:
                got = pred.get()
            else:
                want = pred.detach()
        assert torch.allclose(got, want), (run, got, want)
    net.get()
    assert torch.allclose(net.fc.weight, here.fc.weight) and torch.allclose(net.fc.bias,
                                                                              here.fc.bias)
    del x, y


def test_ops_on_constants_made_in_the_plan_stay_constants(hook: sy.TorchHook,
                                                          bob: sy.WorkerClient) -> None:
    @sy.func2plan(args_shape=[(3,)], state=(torch.ones(3),))
    def scaled(x: torch.Tensor, state: sy.PlanState) -> torch.Tensor:
        (s,) = state.read()
        two = torch.tensor(2.0) * torch.ones(3)  # constants alone: worked out once, here
        s.add_(1.0)
        return x * two + s

    (trace,) = scaled._traces.values()
    assert [op.name.rsplit(".", 1)[-1] for op in trace.ops] == ["add_", "mul", "add"]
    sent = scaled.send(bob)
    x = torch.zeros(3).send(bob)
    assert torch.equal(sent(x).get(), torch.full((3,), 2.0))
    assert torch.equal(sent(x).get(), torch.full((3,), 3.0))
    sent.get()
    assert torch.equal(sent.state.read()[0], torch.full((3,), 3.0))
    del x, sent


def test_a_constant_its_ops_change_in_place_starts_afresh_at_each_run(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    @sy.func2plan(args_shape=[(3,)])
    def summed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(3)  # a constant...
        total.add_(x)  # ...changed by an op of the plan: each run changes a copy of it
        return total, total * 2

    x = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    want = torch.tensor([1.0, 2.0, 3.0])
    assert all(map(torch.equal, summed(want), (want, want * 2)))
    summed = summed.send(bob)
    for _ in range(2):
        total, doubled = summed(x)
        assert torch.equal(total.get(), want) and torch.equal(doubled.get(), want * 2)
    del x, summed


def _autograd_step(x: torch.Tensor, y: torch.Tensor, state: sy.PlanState) -> torch.Tensor:
    (w,) = state.read()
    loss = ((x @ w.t() - y) ** 2).sum()
    loss.backward()
    with torch.no_grad():  # (recorded: the plan's ops run with the grad mode they had here)
        w.sub_(0.25 * w.grad)
    w.grad = None
    return loss


def test_a_plan_holds_backward_and_reads_the_gradients_it_leaves(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    w0, x, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])
    plan = sy.func2plan(args_shape=[(1, 2), (1, 1)],
                        state=(w0.clone().requires_grad_(),))(_autograd_step)
    (trace,) = plan._traces.values()
    assert [op.name.rsplit(".", 1)[-1] for op in trace.ops][-5:] == [
        "backward", "__get__", "mul", "sub_", "__set__"]
    local_state = sy.PlanState([w0.clone().requires_grad_()])
    ops_state = sy.PlanState([w0.clone().requires_grad_().send(bob)])
    sent = plan.send(bob)
    xp, yp = x.send(bob), y.send(bob)
    for run in range(3):
        want = _autograd_step(x, y, local_state).detach()
        one_by_one = _autograd_step(xp, yp, ops_state).get()
        got = sent(xp, yp).get()
        assert torch.equal(one_by_one, want), (run, one_by_one, want)
        assert torch.equal(got, want), (run, got, want)
    (w,) = sent.state.read()
    assert w.grad is None  # (set to None by the plan: asked of bob, since the plan ran there)
    sent.get()
    assert torch.equal(sent.state.read()[0], local_state.read()[0])
    assert torch.equal(ops_state.read()[0].get(), local_state.read()[0])
    del xp, yp, w, sent


class _LossWithBackward(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ((self.fc(x) - y) ** 2).sum()
        loss.backward()
        return loss


def test_an_optimiser_steps_on_the_gradients_a_plans_backward_left(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    """The client's knowledge of gradients (``zero_grad()`` set them to None) does not outlive
    a plan that ran ``backward()``: the optimiser reads the new ones."""
    torch.manual_seed(3)
    net, here = _LossWithBackward(), _LossWithBackward()
    here.load_state_dict(net.state_dict())
    data, target = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor([[1.0], [0.0]])
    net = net.send(bob)
    opt, opt_here = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, here))
    x, y = data.send(bob), target.send(bob)
    for run in range(3):
        opt.zero_grad()
        opt_here.zero_grad()
        got, want = net(x, y).get(), here(data, target).detach()
        opt.step()
        opt_here.step()
        assert torch.allclose(got, want), (run, got, want)
    net.get()
    assert torch.allclose(net.fc.weight, here.fc.weight) and torch.allclose(net.fc.bias,
                                                                              here.fc.bias)
    del x, y
