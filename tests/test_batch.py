"""Batched pipelined requests (Op.BATCH): ops queued while the worker is behind go out as one
message, in order, are sent by the flusher thread when nothing else sends them, report their
errors like separate messages would, and a worker survives malformed batches."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgpack
import pytest
import torch

import zmqsyft as sy
from tests.helpers import (
    alive_check,
    configured,
    expect_error,
    messages_from_me,
    next_reply,
    raw_dealer,
    run_in_threads,
)
from zmqsyft import WorkerClient
from zmqsyft.client import get_session
from zmqsyft.errors import SerializationError
from zmqsyft.wire.codec import encode_message, unpack_acks
from zmqsyft.wire.messages import PROTOCOL_VERSION, Op


@contextmanager
def stopped(worker: WorkerClient) -> Iterator[None]:
    """The worker process is stopped (SIGSTOP) inside the block: nothing it receives is answered,
    so pipelined requests issued meanwhile must queue."""
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.pid, signal.SIGCONT)


@pytest.fixture
def slow_flusher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flusher leaves batches alone for a minute: what is queued stays queued until this
    thread sends or waits for something (the assertions on batch contents do not then depend on
    how fast this machine issues ops)."""
    monkeypatch.setattr(get_session(), "batch_delay", 60.0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch", [32, 1])
def test_a_burst_goes_out_in_batches_in_order(bob: WorkerClient, hook: sy.TorchHook, batch: int,
                                             slow_flusher: None) -> None:
    with configured(pipeline=True, pipeline_batch=batch):
        local = torch.tensor([1.0, -2.0], dtype=torch.float64)
        x = local.clone().send(bob)
        sy.sync()
        before = messages_from_me(bob)
        # stopped, the worker is certainly behind, so ops queue behind the first (left running,
        # it often answered each op before the next was issued, here in 4 runs out of 10, and
        # 77-193 messages went out)
        with stopped(bob):
            for i in range(300):  # the result depends on the order of every op
                if i % 3:
                    x.add_(i)
                    local.add_(i)
                else:
                    x.mul_(-0.5)
                    local.mul_(-0.5)
        sy.sync()
        sent = messages_from_me(bob) - before - 1  # the stats request itself counts too
        assert torch.equal(x.get(), local)
    if batch == 1:
        assert 300 <= sent <= 302, f"pipeline_batch=1 sends every op on its own: {sent} messages"
    else:
        # the first op at once, then a message per full batch, the rest with the sync
        assert 300 // batch <= sent <= 300 // batch + 3, f"300 ops took {sent} messages"


@pytest.mark.timeout(60)
def test_the_flusher_sends_a_queued_batch_without_further_calls(bob: WorkerClient,
                                                                hook: sy.TorchHook) -> None:
    x = torch.ones(3).send(bob)
    sy.sync()
    conn = get_session().conn(bob)
    results = []
    with stopped(bob):
        for _ in range(5):  # the first goes out at once; the others wait for it to be answered
            results.append(x + 1)
        assert conn.outbox, "nothing was queued"
        deadline = time.monotonic() + 5
        while conn.outbox:  # this thread does nothing with zmqsyft meanwhile
            assert time.monotonic() < deadline, "the queued batch was never sent"
    # another thread, with its own connection, sees all five results arrive
    seen: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen.append(bob.stats()["objects"])
            if seen[-1] == 6:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    watcher.join(timeout=30)
    assert seen and seen[-1] == 6, f"objects seen on bob: {seen[-5:]}"
    assert all(torch.equal(r.get(), torch.full((3,), 2.0)) for r in results)
    del x


@pytest.mark.timeout(60)
def test_an_error_inside_a_batch_surfaces_at_sync_and_later_ops_still_run(
        bob: WorkerClient, hook: sy.TorchHook, slow_flusher: None) -> None:
    x = torch.tensor([7, 9]).send(bob)
    sy.sync()
    conn = get_session().conn(bob)
    with stopped(bob):
        x.add_(1)            # sent at once
        x.add_(1)            # queued ...
        x.floor_divide_(0)   # ... fails on bob: integer division by zero
        x.add_(10)           # ... still runs, as it would have as a message of its own
        queued = [msgpack.unpackb(header)[1] for header in conn.outbox]
        assert queued.count(int(Op.CALL)) == 3, queued  # (deletes of earlier tests may ride along)
    with pytest.raises(RuntimeError, match="ZeroDivisionError") as info:
        sy.sync()
    assert info.value.worker_id == "bob"  # type: ignore[attr-defined]
    assert torch.equal(x.get(), torch.tensor([19, 21]))


def _pk(op: int, req_id: int, body: dict) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, op, req_id, body])


@pytest.mark.timeout(60)
def test_malformed_batches_are_refused_and_the_worker_survives(bob: WorkerClient) -> None:
    alive = alive_check(bob)
    dropped = bob.stats()["counters"].get("dropped_malformed", 0)
    with raw_dealer(bob) as sock:
        put = encode_message(Op.PUT, 6, {"id": 4242, "obj": torch.ones(2)})  # a tensor: 2 frames
        inner = [
            _pk(int(Op.PING), 5, {}),
            b"\x00 not a message",                                       # dropped, counted
            _pk(int(Op.PUT), 6, {"id": 4243, "obj": 1.5}),               # acknowledged
            _pk(int(Op.BATCH), 7, {"msgs": [_pk(int(Op.PING), 8, {})]}),  # nested: refused
            _pk(int(Op.PING), 9, {}),
        ]
        sock.send_multipart([_pk(int(Op.BATCH), 0, {"msgs": inner})])
        first = next_reply(sock, alive=alive)
        assert (first.op, first.req_id, first.body["id"]) == (Op.REPLY, 5, "bob")
        ack = next_reply(sock, alive=alive)
        assert ack.req_id == 6 and ack.op is Op.REPLY and ack.body == {}
        exc = expect_error(sock, 7, sy.ProtocolError, alive=alive)
        assert "inside another batch" in str(exc)
        assert next_reply(sock, alive=alive).req_id == 9
        # not a list of messages; then a batch with a tensor frame after it: neither is run
        sock.send_multipart([_pk(int(Op.BATCH), 0, {"msgs": "PING"})])
        sock.send_multipart([_pk(int(Op.BATCH), 0, {"msgs": [put[0]]}), put[1]])
        sock.send_multipart(encode_message(Op.PING, 10, {}))
        assert next_reply(sock, alive=alive).req_id == 10
        sock.send_multipart(encode_message(Op.DEL, 11, {"ids": [4243]}))
        reply = next_reply(sock, alive=alive)
        assert reply.req_id == 11 or 11 in unpack_acks(reply)
    assert alive()
    assert bob.stats()["counters"]["dropped_malformed"] == dropped + 2
    assert bob._objects == {}


@pytest.mark.timeout(120)
def test_threads_batching_at_once_keep_their_own_order(bob: WorkerClient, hook: sy.TorchHook) -> None:
    """Four threads queue order-sensitive ops on their own connections while the flusher sends
    stale batches of all of them; every thread's result is exactly its local computation."""
    def work(k: int) -> None:
        local = torch.tensor([float(k), -1.0], dtype=torch.float64)
        x = local.clone().send(bob)
        for i in range(300):
            if i % 4:
                x.add_(i + k)
                local.add_(i + k)
            else:
                x.mul_(-0.5)
                local.mul_(-0.5)
            if i % 50 == 0:
                y = x * 2  # results too, not only in-place ops
                assert torch.equal(y.get(), local * 2)
        sy.sync()
        assert torch.equal(x.get(), local)

    run_in_threads(work, 4, timeout=90)
    assert bob._objects == {}


@pytest.mark.timeout(60)
def test_another_thread_using_a_queued_result_hands_the_batch_over(
        bob: WorkerClient, hook: sy.TorchHook, slow_flusher: None) -> None:
    """A result whose creating op still waits in this thread's batch is used by another
    thread: that thread sends the batch on (under the connection's lock) before naming it."""
    x = torch.tensor([1.0, 2.0]).send(bob)
    sy.sync()
    conn = get_session().conn(bob)
    with stopped(bob):
        first = x + 1                    # sent at once
        r = x + 10                       # queued behind it (the flusher waits a minute here)
        assert conn.outbox
    got: list[object] = []

    def other() -> None:
        try:
            got.append(r.get())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            got.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive() and len(got) == 1
    assert isinstance(got[0], torch.Tensor), got[0]
    assert torch.equal(got[0], torch.tensor([11.0, 12.0]))
    assert not conn.outbox
    assert torch.equal(first.get(), torch.tensor([2.0, 3.0]))
    del x


@pytest.mark.timeout(60)
def test_a_worker_killed_with_a_batch_queued_fails_fast_and_nothing_hangs(
        spawn: Callable[..., WorkerClient], slow_flusher: None) -> None:
    carol = spawn("carol")
    x = torch.ones(3).send(carol)
    sy.sync()
    conn = get_session().conn(carol)
    with stopped(carol):
        results = [x + i for i in range(5)]  # the first goes out, the others queue
        assert conn.outbox
        assert carol.pid is not None
        os.kill(carol.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(sy.WorkerUnavailable, match="carol"):
        sy.sync()
    assert time.monotonic() - t0 < 15  # heartbeats (3 s) or the dead process, not the timeout
    assert not conn.outbox and not conn.inflight
    with pytest.raises(sy.ResultLost, match="worker 'carol' is not running"):
        results[-1].get()  # a queued op's result says what became of it (and is a
    #                        CommunicationError: sent or not, it never came)
    del x, results


@pytest.mark.timeout(60)
def test_deletes_ride_in_one_message_with_the_next_request_and_get_no_reply(
        bob: WorkerClient, hook: sy.TorchHook) -> None:
    with configured(pipeline=False):
        x = torch.ones(3).send(bob)
        results = [x + i for i in range(5)]
        gc.collect()
        sy.sync()
        objects = bob.stats()["objects"]
        messages_in = messages_from_me(bob)
        del results  # five deletes queued (no I/O in a finaliser)
        y = x + 10   # blocking: the deletes travel with it
        conn = get_session().conn(bob)
        assert not conn.inflight and not conn._answered, "the deletes await no reply"
        assert messages_from_me(bob) - messages_in == 2, "one message for the ops, one for stats()"
        assert bob.stats()["objects"] == objects - 5 + 1
        assert torch.equal(y.get(), torch.full((3,), 11.0))


@pytest.mark.timeout(60)
def test_deletes_go_even_when_the_request_they_ride_with_cannot_be_encoded(
        bob: WorkerClient, hook: sy.TorchHook) -> None:
    x = torch.ones(3).send(bob)
    y = x + 1
    gc.collect()
    sy.sync()
    objects = bob.stats()["objects"]
    del y
    with pytest.raises(SerializationError, match="uint16"):
        x.add_(torch.ones(3, dtype=torch.uint16))  # refused while the CALL is encoded
    conn = get_session().conn(bob)
    assert not get_session()._deletes and not conn.outbox, "the delete went out by itself"
    assert bob.stats()["objects"] == objects - 1
