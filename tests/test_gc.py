"""Garbage collection: dropped pointers free their remote objects, batched, never from __del__."""

from __future__ import annotations

import gc
import textwrap
import time
from pathlib import Path

import torch

import zmqsyft as sy
from tests.helpers import key_file, next_reply, raw_dealer, run_script
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import Op


def test_del_pointer_frees_object(bob: sy.WorkerClient) -> None:
    p = torch.tensor([1, 2, 3]).send(bob)
    assert list(bob._objects) == [p.id_at_location]
    del p
    assert bob._objects == {}


def test_del_chain_head_frees_every_hop(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    head = torch.tensor([1, 2, 3]).send(bob).send(alice)
    y = head * 2  # results on both hops too
    assert len(bob._objects) == 2 and len(alice._objects) == 2
    del head
    assert len(bob._objects) == 1 and len(alice._objects) == 1
    del y
    assert bob._objects == {} and alice._objects == {}


def test_three_hop_chain_cascades(bob: sy.WorkerClient, alice: sy.WorkerClient,
                                                   carol: sy.WorkerClient) -> None:
    head = torch.arange(4).send(bob).send(alice).send(carol)
    assert torch.equal((head + 1).get().get().get(), torch.arange(4) + 1)
    del head
    assert bob._objects == {} and alice._objects == {} and carol._objects == {}


def test_thousand_pointers_in_a_loop(bob: sy.WorkerClient) -> None:
    for i in range(1000):
        p = torch.tensor([float(i)]).send(bob)
        q = p * 2
        if i % 200 == 199:
            # deletes ride along with the next message: the store never piles up
            assert bob.stats()["objects"] <= 4
    assert q.get().item() == 1998.0
    del p, q
    assert bob._objects == {}


def test_pipelined_results_dropped_unused(bob: sy.WorkerClient) -> None:
    a = torch.ones(8).send(bob)
    for _ in range(500):
        a + a  # result dropped at once, maybe before the worker has even created it
    assert list(bob._objects) == [a.id_at_location]


def test_same_tensor_sent_twice_gives_two_objects(bob: sy.WorkerClient) -> None:
    x = torch.tensor([1, 2, 3])
    p1, p2 = x.send(bob), x.send(bob)
    assert p1.id_at_location != p2.id_at_location
    assert set(bob._objects) == {p1.id_at_location, p2.id_at_location}
    assert torch.equal(p1.get(), x)
    assert torch.equal(p2.get(), x)
    assert bob._objects == {}


def test_pointer_sent_back_to_its_own_worker(bob: sy.WorkerClient) -> None:
    p = torch.tensor([1, 2, 3]).send(bob)
    data_id, ptr_id = p.id_at_location, p.id
    pp = p.send(bob)
    objs = bob._objects
    assert list(objs) == [data_id, ptr_id]
    assert objs[ptr_id].location is bob and objs[ptr_id].id_at_location == data_id
    assert torch.equal((pp + pp).get(), torch.tensor([2, 4, 6]))
    inner = pp.get()
    assert inner.location is bob and inner.id_at_location == data_id and inner.owned
    assert list(bob._objects) == [data_id]
    again = inner.send(bob)
    del inner, again
    assert bob._objects == {}


def _raw_stats(worker: sy.WorkerClient) -> int:
    """Ask a worker how many objects it holds, on a socket of our own (no deletes ride along)."""
    with raw_dealer(worker) as sock:
        sock.send_multipart(encode_message(Op.STATS, 1, {}))
        reply = next_reply(sock, timeout=5.0)
        assert (reply.op, reply.req_id) == (Op.REPLY, 1), reply
        return reply.body["objects"]


def test_timer_flushes_deletes_without_further_messages(bob: sy.WorkerClient) -> None:
    p = torch.tensor([1.0]).send(bob)
    assert _raw_stats(bob) == 1
    del p
    gc.collect()
    deadline = time.monotonic() + 5
    while _raw_stats(bob) != 0:  # each probe waits for a reply; bounded by the deadline
        assert time.monotonic() < deadline, "the delete was not flushed by the timer"


def test_deletes_pending_at_exit_reach_the_worker(bob: sy.WorkerClient, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import torch, zmqsyft as sy
        hook = sy.TorchHook(torch)
        bob = sy.connect({bob.address!r}, worker_key={bob.key!r}, keys={key_file(tmp_path, bob)!r})
        kept = [torch.ones(3).send(bob) for _ in range(5)]     # alive at exit
        for i in range(50):
            p = torch.tensor([float(i)]).send(bob)
            q = p + 1                                          # pipelined, then dropped
        del p, q
        print("sent", flush=True)
    """)
    result = run_script("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent"
    assert bob._objects == {}


def test_torchhook_freezes_start_up_objects_and_cycles_still_free_pointers(
        bob: sy.WorkerClient, tmp_path: Path) -> None:
    """TorchHook moves the objects alive at that moment out of the collector's full passes
    (freeze_gc=False leaves it alone); a pointer caught in a reference cycle made afterwards is
    still collected and frees its remote object."""
    script = textwrap.dedent(f"""
        import gc, torch, zmqsyft as sy
        frozen = {{}}
        sy.TorchHook(torch, freeze_gc=FREEZE)
        frozen["count"] = gc.get_freeze_count()
        bob = sy.connect({bob.address!r}, worker_key={bob.key!r}, keys={key_file(tmp_path, bob)!r})
        p = torch.ones(3).send(bob)
        cycle = [p]
        cycle.append(cycle)                 # only the cyclic collector can free p now
        del p, cycle
        before = bob.stats()["objects"]
        gc.collect()
        sy.sync()                           # the delete is sent and acknowledged
        print("objects", before, bob.stats()["objects"], "frozen", frozen["count"], flush=True)
    """)
    counts = {}
    for freeze in (True, False):
        result = run_script("-c", script.replace("FREEZE", str(freeze)))
        assert result.returncode == 0, result.stderr
        words = result.stdout.split()
        assert words[:3] == ["objects", "1", "0"], result.stdout  # freed before the exit flush
        counts[freeze] = int(words[-1])
    assert counts[False] == 0
    assert counts[True] > 50_000  # torch alone brings some 300,000 objects


def test_deletes_flushed_in_passing_leave_no_bookkeeping_behind(bob: sy.WorkerClient) -> None:
    """Deletes that ride along before other requests are not waited for; their answers must not
    pile up in the connection (they did: one kept reply per delete batch, forever)."""
    from zmqsyft.client import get_session

    a = torch.ones(2).send(bob)
    for _ in range(100):
        p = torch.ones(2).send(bob)
        del p                     # queued; the next request carries the delete
        q = a + 1                 # noqa: F841 - dropped by the next iteration
    del q
    sy.sync()
    conn = get_session().conn(bob)
    assert conn.inflight == {} and conn._answered == {}
    del a
    assert bob._objects == {}


def test_a_worker_spawned_again_where_one_died_frees_what_its_pointers_drop(
        hook: sy.TorchHook, tmp_path: Path) -> None:
    """The dead worker's handle, not closed yet, is still at the same address: deletes went to
    it and were lost, and the new worker kept every object its dropped pointers had."""
    address = f"ipc://{tmp_path}/bob.sock"
    first = sy.spawn_worker("bob", bind=address)
    try:
        old = torch.tensor([1, 2, 3]).send(first)
        first._proc.kill()
        first._proc.wait(timeout=30)
        second = sy.spawn_worker("bob", bind=address)
        try:
            p = torch.tensor([4, 5, 6]).send(second)
            assert list(second._objects) == [p.id_at_location]
            del p
            assert second._objects == {}
            del old  # (its delete reaches the new worker, which has no such object: nothing)
            assert second._objects == {}
        finally:
            second.close()
    finally:
        first.close()
