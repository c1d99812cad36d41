"""A worker's peers cannot answer each other's requests: a reply counts only on the link its
request went out on. Two fake peer workers (bare ROUTER sockets on loopback, driven step by step
from the test's thread) play the honest peer and the forger."""

from __future__ import annotations

import time

import pytest
import zmq

import zmqsyft as sy
from tests.helpers import alive_check, answer, fake_peer, next_reply, raw_dealer, receive
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import ObjRef, Op, PointerDesc


def late_replies(sock: zmq.Socket, req_id: int) -> int:
    sock.send_multipart(encode_message(Op.STATS, req_id, {}))
    msg = next_reply(sock)
    assert (msg.op, msg.req_id) == (Op.REPLY, req_id), (msg.op, msg.req_id, msg.body)
    return int(msg.body["counters"].get("late_replies", 0))


@pytest.mark.timeout(60)
def test_a_peer_cannot_answer_a_request_sent_to_another_peer(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    alive = alive_check(bob)
    with fake_peer() as (honest, honest_at), fake_peer() as (forger, forger_at), \
            raw_dealer(bob.address) as caller:
        def put(req_id: int, obj_id: int, desc: PointerDesc) -> None:
            caller.send_multipart(encode_message(Op.PUT, req_id, {"id": obj_id, "obj": desc}))
            assert next_reply(caller, alive=alive).op is Op.REPLY

        # bob holds a pointer to each fake peer
        put(1, 10, PointerDesc("honest", honest_at, 5, 10, (3,), "float32", False, False))
        put(2, 11, PointerDesc("forger", forger_at, 6, 11, (3,), "float32", False, True))
        # freeing the owning pointer makes bob open its link to the forger (HELLO, DEL)
        caller.send_multipart(encode_message(Op.DEL, 3, {"ids": [11]}))
        assert next_reply(caller, alive=alive).op is Op.REPLY
        forger_ident, hello_id = receive(forger, Op.HELLO)
        answer(forger, forger_ident, hello_id, {"id": "forger"})
        receive(forger, Op.DEL)
        # an op on the pointer to the honest peer is relayed there, and bob waits for its answer
        caller.send_multipart(encode_message(Op.CALL, 4, {
            "fn": "torch.neg", "args": [ObjRef(10)], "kwargs": {}, "out": None}))
        honest_ident, hello_id = receive(honest, Op.HELLO)
        answer(honest, honest_ident, hello_id, {"id": "honest"})
        _, call_id = receive(honest, Op.CALL)
        before = late_replies(caller, 5)
        # the forger answers that request's id on its own link, with a result of its choosing
        answer(forger, forger_ident, call_id, {"result": 42})
        deadline = time.monotonic() + 10
        while late_replies(caller, 6) == before:  # bob has read it (and dropped it)
            assert time.monotonic() < deadline, "bob never read the forged reply"
        # the honest answer is the one the caller gets
        answer(honest, honest_ident, call_id, {"result": 7})
        msg = next_reply(caller, alive=alive)
        assert (msg.op, msg.req_id, msg.body) == (Op.REPLY, 4, {"result": 7})
