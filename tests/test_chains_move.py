"""Pointer chains, move (data goes source -> destination directly) and remote_get."""

from __future__ import annotations

import signal

import pytest
import torch

import zmqsyft as sy
from tests.helpers import assert_answers_ping, peer_row, run_in_threads
from zmqsyft.config import Config
from zmqsyft.wire.messages import Op


def test_chain_op_runs_on_last_hop_and_every_hop_holds_a_pointer(bob: sy.WorkerClient,
                                                                   alice: sy.WorkerClient) -> None:
    p2p = torch.tensor([1.0, 2.0]).send(bob).send(alice)
    z = (p2p * 3).sum()
    alice_objs = alice._objects
    bob_objs = bob._objects
    assert z.location is alice
    held = alice_objs[z.id_at_location]
    assert held.location is bob and held.owner == "alice"
    assert torch.equal(bob_objs[held.id_at_location], torch.tensor(9.0))
    inner = z.get()
    assert inner.owned and inner.location is bob
    assert inner.get().item() == 9.0


def test_get_of_pointer_to_pointer_hands_over_ownership(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    p = torch.tensor([7]).send(bob)
    ptr_id = p.id
    p2p = p.send(alice)
    inner = p2p.get()
    assert inner.id == ptr_id and inner.owned
    assert alice._objects == {}
    del inner  # the caller now owns the data: dropping the pointer frees it
    assert bob._objects == {}


def test_remote_get_pulls_data_to_the_middle_worker(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    p2p = torch.tensor([1, 2, 3]).send(bob).send(alice)
    assert p2p.remote_get() is p2p
    assert bob._objects == {}
    assert torch.equal(alice._objects[p2p.id_at_location], torch.tensor([1, 2, 3]))
    assert torch.equal(p2p.get(), torch.tensor([1, 2, 3]))


def test_move_sends_data_directly_and_frees_source(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    x = torch.randn(1_000_000)  # 4 MB
    p = x.send(bob)
    obj_id = p.id_at_location

    def bytes_to_clients(worker: sy.WorkerClient) -> int:
        me = sy.get_session().name
        return worker.stats()["peers"][me]["bytes_out"]

    before = bytes_to_clients(bob)
    assert p.move(alice) is p
    assert p.location is alice and p.id_at_location == obj_id
    # the 4 MB went bob -> alice directly, not through this process
    assert bytes_to_clients(bob) - before < 100_000
    assert peer_row(bob.stats(), "alice")["bytes_out"] >= 4_000_000
    assert bob._objects == {}
    assert list(alice._objects) == [obj_id]
    assert torch.equal(p.get(), x)


def test_move_to_where_it_is_does_nothing(bob: sy.WorkerClient) -> None:
    p = torch.tensor([1, 2]).send(bob)
    obj_id = p.id_at_location
    assert p.move(bob) is p
    assert p.location is bob and list(bob._objects) == [obj_id]


def test_move_chain_head_to_a_third_worker(bob: sy.WorkerClient, alice: sy.WorkerClient,
                                                   carol: sy.WorkerClient) -> None:
    p2p = torch.tensor([4, 5]).send(bob).send(alice)
    key = p2p.id_at_location
    p2p.move(carol)
    assert alice._objects == {}
    held = carol._objects[key]
    assert held.location is bob
    assert p2p.location is carol
    assert torch.equal(p2p.get().get(), torch.tensor([4, 5]))
    assert bob._objects == {} and carol._objects == {}


def test_move_chain_head_to_the_data_collapses_the_chain(bob: sy.WorkerClient,
                                                         alice: sy.WorkerClient) -> None:
    x = torch.tensor([1, 2, 3, 4, 5])
    p2p = x.send(bob).send(alice)
    p2p.move(bob)  # PySyft 0.2 raised ObjectNotFoundError here
    assert p2p.location is bob
    assert alice._objects == {}
    assert list(bob._objects) == [p2p.id_at_location]
    assert torch.equal(p2p.get(), x)


def test_pointer_cycles_between_workers_do_not_deadlock(bob: sy.WorkerClient,
                                                        alice: sy.WorkerClient) -> None:
    on_bob = torch.ones(3).send(bob).send(alice)  # alice holds a pointer to bob
    on_alice = torch.full((3,), 2.0).send(alice).send(bob)  # bob holds a pointer to alice
    results = []
    for i in range(50):
        results.append(on_bob + i)
        results.append(on_alice * i)
    sy.sync()
    assert torch.equal(results[-2].get().get(), torch.full((3,), 50.0))
    assert torch.equal(results[-1].get().get(), torch.full((3,), 98.0))


def test_relaying_worker_keeps_serving_while_a_peer_is_dead(spawn) -> None:  # type: ignore[no-untyped-def]
    carol = spawn("carol")
    alice = spawn("alice", config=Config(timeout=2.0))
    p2p = torch.ones(2).send(carol).send(alice)
    carol._proc.kill()
    assert carol._proc.wait(timeout=30) == -signal.SIGKILL
    conn = sy.get_session().conn(alice)
    req = conn.send(Op.REMOTE_GET, {"id": p2p.id_at_location}, what="remote_get")
    # alice is waiting on dead carol for that request, but answers others at once
    assert_answers_ping(alice, within=1.0)
    with pytest.raises(sy.WorkerUnavailable) as info:
        conn.wait(req, timeout=10)
    # alice itself reports it (its own 2 s timeout, or the dead connection), naming carol's address
    assert info.value.worker_id == "alice"  # type: ignore[attr-defined]
    assert "worker 'alice'" in str(info.value) and carol.address in str(info.value), info.value


def test_threads_use_their_own_connections(bob: sy.WorkerClient) -> None:
    def work(k: int) -> None:
        p = torch.full((4,), float(k)).send(bob)
        for _ in range(20):
            p = p + 1
        assert torch.equal(p.get(), torch.full((4,), k + 20.0))

    run_in_threads(work, 4)
    assert bob._objects == {}
