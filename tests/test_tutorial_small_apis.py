"""PySyft 0.2 tutorial APIs that are one call each (issue 15): the local worker as an object
(``sy.local_worker``, ``hook.local_worker``, ``ptr.owner``, ``.is_client_worker``),
``worker._tensors``, ``worker.clear_objects()``, ``ptr.remote_send(worker)``,
``nn.Module.location`` and ``ptr.move(worker, requires_grad=True)`` (SplitNN). Real worker
processes (the pooled ``bob``/``alice``/``carol``), each test leaving their stores empty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zmqsyft as sy
from tests.helpers import next_reply, raw_dealer, second_client
from zmqsyft.wire.bodies import Get, GetReply, Put
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import Op

pytestmark = pytest.mark.timeout(120)


def test_the_local_worker_is_this_program_and_owns_its_pointers(
        hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    me = sy.local_worker
    assert hook.local_worker is me and me.id == "me" and me.is_client_worker
    assert me._objects == {} and me._tensors == {}
    p = torch.ones(2).send(bob)
    assert p.owner is me and p.owner == "me" and p.owner.id == "me"
    assert "PointerTensor | me:" in repr(p)
    held = p.send(alice := bob)  # (a pointer stored on a worker: its snapshot names the holder)
    assert held.owner is me
    del p, held, alice


def test_tensors_lists_only_tensors_and_clear_objects_empties_the_worker(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    x = torch.arange(3.0).send(bob)
    chain = torch.ones(2).send(alice).send(bob)  # bob also holds a pointer record
    assert set(bob._tensors) == {x.id_at_location}
    assert torch.equal(bob._tensors[x.id_at_location], torch.arange(3.0))
    assert len(bob._objects) == 2 and len(alice._objects) == 1
    assert bob.clear_objects() is bob
    assert bob._objects == {} and alice._objects == {}  # (the record freed what it owned)
    with pytest.raises(sy.ObjectNotFound):
        x.get()
    del x, chain


def test_clear_objects_leaves_another_clients_objects(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    mine = torch.ones(3).send(bob)
    other = second_client(bob, alice)  # a key bob accepts, not an admin
    with raw_dealer(bob, keys=other) as sock:
        sock.send_multipart(encode_message(Op.PUT, 1, Put(id=4242, obj=torch.zeros(2))),
                            copy=False)
        assert next_reply(sock).req_id == 1
        bob.clear_objects()  # (this program is bob's admin: it sees theirs, deletes only its own)
        sock.send_multipart(encode_message(Op.GET, 2, Get(id=4242)), copy=False)
        reply = next_reply(sock)
        assert reply.op == Op.REPLY, reply.body
        assert torch.equal(GetReply.from_wire(reply.body).obj, torch.zeros(2))
    with pytest.raises(sy.ObjectNotFound):
        mine.get()
    del mine


def test_remote_send_leaves_a_pointer_in_place(hook: sy.TorchHook, bob: sy.WorkerClient,
                                               alice: sy.WorkerClient) -> None:
    x = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    assert x.remote_send(alice) is x
    assert x.location is bob
    on_bob, on_alice = bob._objects, alice._objects
    assert len(on_bob) == 1 and isinstance(next(iter(on_bob.values())), sy.PointerTensor)
    assert [torch.equal(v, torch.tensor([1.0, 2.0, 3.0])) for v in on_alice.values()] == [True]
    assert torch.equal((x * 2).get().get(), torch.tensor([2.0, 4.0, 6.0]))
    inner = x.get()  # the record back: a pointer to alice's data, ours
    assert inner.location is alice and torch.equal(inner.get(), torch.tensor([1.0, 2.0, 3.0]))
    assert bob._objects == {} and alice._objects == {}


def test_remote_send_to_where_it_is_does_nothing(hook: sy.TorchHook, bob: sy.WorkerClient) -> None:
    x = torch.ones(2).send(bob)
    assert x.remote_send(bob) is x and x.location is bob
    assert torch.equal(x.get(), torch.ones(2))


def test_a_modules_location_is_where_its_parameters_are(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    model = nn.Linear(3, 2)
    assert not hasattr(model, "location")  # here, not on a worker
    with pytest.raises(AttributeError, match="location"):
        model.location  # noqa: B018
    model.send(bob)
    assert model.location is bob
    model.move(alice)
    assert model.location is alice
    model.get()
    assert not hasattr(model, "location")

    class Located(nn.Module):  # a module of the user's own with a `location` attribute
        def __init__(self) -> None:
            super().__init__()
            self.location = "Berlin"

    assert Located().location == "Berlin"


def test_a_split_model_step_with_move_requires_grad(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    """SplitNN across two workers: part 1 on bob, part 2 on alice; the activations move to
    alice with requires_grad=True, the loss's gradient comes back to bob through them."""
    torch.manual_seed(0)
    part1, part2 = nn.Linear(4, 3), nn.Linear(3, 1)
    local1, local2 = nn.Linear(4, 3), nn.Linear(3, 1)
    local1.load_state_dict(part1.state_dict())
    local2.load_state_dict(part2.state_dict())
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    part1.send(bob), part2.send(alice)
    opt1 = torch.optim.SGD(part1.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(part2.parameters(), lr=0.1)
    data, target = x.send(part1.location), y.send(part2.location)
    a = part1(data)
    remote_a = a.detach().move(part2.location, requires_grad=True)
    assert remote_a.location is alice and remote_a.requires_grad
    loss = ((part2(remote_a) - target) ** 2).mean()
    loss.backward()
    opt2.step()
    grad_a = remote_a.grad.copy().move(bob)
    a.backward(grad_a)
    opt1.step()
    # the same step done locally
    la = local1(x)
    la_d = la.detach().requires_grad_()
    lloss = ((local2(la_d) - y) ** 2).mean()
    lloss.backward()
    la.backward(la_d.grad)
    for p in (*local1.parameters(), *local2.parameters()):
        p.data -= 0.1 * p.grad
    assert torch.allclose(loss.get(), lloss.detach())
    part1.get(), part2.get()
    for got, want in ((part1, local1), (part2, local2)):
        for p, q in zip(got.parameters(), want.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6)
    del data, target, a, remote_a, grad_a, loss


def test_garbage_collection_can_be_turned_off_per_pointer(hook: sy.TorchHook,
                                                          bob: sy.WorkerClient) -> None:
    kept = torch.ones(2).send(bob)
    assert kept.gc and kept.garbage_collection
    kept_id = kept.id_at_location
    kept.gc = False
    assert not kept.garbage_collection
    assert torch.ones(3).send(bob).disable_gc.gc is False
    freed = torch.zeros(2).send(bob)
    del kept, freed
    left = bob._objects
    assert kept_id in left and len(left) == 2  # the two with gc off stayed, the other went
    bob.clear_objects()
    on_again = torch.ones(1).send(bob)
    on_again.gc = False
    on_again.gc = True
    del on_again
    assert bob._objects == {}


def test_send_and_get_in_place_keep_the_tensors_identity(hook: sy.TorchHook,
                                                         bob: sy.WorkerClient) -> None:
    t = torch.tensor([1.0, -1.0, 3.0, 4.0])
    held = [t]
    assert t.send_(bob) is t and isinstance(t, sy.PointerTensor) and t.location is bob
    assert isinstance(held[0], sy.PointerTensor)
    assert torch.equal((t * 2).get(), torch.tensor([2.0, -2.0, 6.0, 8.0]))
    assert t.get_() is t and type(t) is torch.Tensor
    assert torch.equal(held[0], torch.tensor([1.0, -1.0, 3.0, 4.0]))
    assert bob._objects == {}
    p = torch.ones(2).send(bob)
    with pytest.raises(sy.PointerError, match="one already"):
        p.send_(bob)
    with pytest.raises(sy.PointerError, match="use x = ptr.get"):
        p.get_()
    del p


def test_object_store_reads_and_moving_to_the_local_worker_fetches(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    x = torch.tensor([1.0, 2.0]).send(bob)
    store = bob.object_store
    assert len(store) == 1 and x.id_at_location in store._objects
    assert torch.equal(store.get_obj(x.id_at_location), torch.tensor([1.0, 2.0]))
    assert list(store._tensors) == [x.id_at_location]
    with pytest.raises(sy.ObjectNotFound, match="does not exist on worker 'bob'"):
        store.get_obj(12345)
    y = x.move(alice).move(sy.local_worker)  # back here: a fetch
    assert type(y) is torch.Tensor and torch.equal(y, torch.tensor([1.0, 2.0]))
    assert bob._objects == {} and alice._objects == {}


def test_part_9_sharing_between_three_holders_and_matmul_by_name(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient,
        carol: sy.WorkerClient) -> None:
    x = torch.tensor([25]).share(bob, alice, carol)  # no crypto provider: + and - only
    y = torch.tensor([5]).share(bob, alice, carol)
    assert torch.equal((x + y).get(), torch.tensor([30]))
    assert torch.equal((x - y).get(), torch.tensor([20]))
    a = torch.tensor([[1, 2], [3, 4]]).share(bob, alice, crypto_provider=carol)
    b = torch.tensor([[2, 0], [0, 2]]).share(bob, alice, crypto_provider=carol)
    assert torch.equal(a.matmul(b).get(), torch.tensor([[2, 4], [6, 8]]))
    del x, y, a, b


def test_comparisons_on_shared_values_say_they_are_not_built(
        hook: sy.TorchHook, bob: sy.WorkerClient, alice: sy.WorkerClient,
        carol: sy.WorkerClient) -> None:
    x = torch.tensor([25]).share(bob, alice, crypto_provider=carol)
    y = torch.tensor([5.5]).fix_precision().share(bob, alice, crypto_provider=carol)
    for attempt in (lambda: x > x, lambda: x <= x, lambda: x.max(), lambda: y.relu(),
                    lambda: y < y, lambda: y.argmax()):
        with pytest.raises(NotImplementedError, match="secret-shared values is not supported"
                           ".*secure comparison protocol"):
            attempt()
    assert torch.equal(x.get(), torch.tensor([25]))  # nothing was spent by the refusals


def test_a_virtual_worker_made_with_data_holds_it(hook: sy.TorchHook) -> None:
    x, y = torch.tensor([-1.0, 2.0]), torch.tensor([1.0, -2.0])
    with sy.VirtualWorker(hook, id="device_1", data=(x, y)) as device:
        held = device._objects
        assert sorted(v.tolist() for v in held.values()) == [[-1.0, 2.0], [1.0, -2.0]]
        device.clear_objects()
        assert device._objects == {}
