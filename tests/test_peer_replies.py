"""A worker's peers cannot answer each other's requests: a reply counts only on the link its
request went out on. Two fake peer workers (bare ROUTER sockets on loopback, driven step by step
from the test's thread) play the honest peer and the forger."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

import zmqsyft as sy
from tests.helpers import alive_check, answer, fake_peer, next_reply, raw_dealer, receive
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.messages import Message, ObjRef, Op, PointerDesc


def late_replies(sock: zmq.Socket, req_id: int) -> int:
    sock.send_multipart(encode_message(Op.STATS, req_id, {}))
    msg = next_reply(sock)
    assert (msg.op, msg.req_id) == (Op.REPLY, req_id), (msg.op, msg.req_id, msg.body)
    return int(msg.body["counters"].get("late_replies", 0))


@pytest.mark.timeout(60)
def test_a_peer_cannot_answer_a_request_sent_to_another_peer(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    alive = alive_check(bob)
    with fake_peer(bob, name="honest") as (honest, honest_at, honest_key), \
            fake_peer(bob, name="forger") as (forger, forger_at, forger_key), \
            raw_dealer(bob) as caller:
        def put(req_id: int, obj_id: int, desc: PointerDesc) -> None:
            caller.send_multipart(encode_message(Op.PUT, req_id, {"id": obj_id, "obj": desc}))
            assert next_reply(caller, alive=alive).op is Op.REPLY

        # bob holds a pointer to each fake peer
        put(1, 10, PointerDesc("honest", honest_at, 5, 10, (3,), "float32", False, False, honest_key))
        put(2, 11, PointerDesc("forger", forger_at, 6, 11, (3,), "float32", False, True, forger_key))
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


def _serve_until(caller: zmq.Socket, req_id: int, peers: list[zmq.Socket],
                 hellos: list[bytes], timeout: float = 30.0) -> Message:
    """Answer every HELLO and FLUSH the fake peers get (noting who said HELLO) until the caller
    has its reply to ``req_id``."""
    deadline = time.monotonic() + timeout
    poller = zmq.Poller()
    for sock in (caller, *peers):
        poller.register(sock, zmq.POLLIN)
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            if sock is caller:
                msg = decode_message(caller.recv_multipart())
                if msg.req_id == req_id:
                    return msg
                continue
            ident, header, *_ = sock.recv_multipart()
            op, rid = msgpack.unpackb(header, strict_map_key=False,
                                     ext_hook=lambda code, data: None)[1:3]
            if op == Op.HELLO:
                hellos.append(ident)
                answer(sock, ident, rid, {"id": "fake"})
            elif op == Op.FLUSH:
                answer(sock, ident, rid, {})
    pytest.fail(f"no reply to request {req_id} within {timeout}s")


@pytest.mark.timeout(60)
def test_four_hundred_spellings_of_one_address_open_one_link(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    alive = alive_check(bob)
    with fake_peer(bob) as (peer, peer_at, peer_key), raw_dealer(bob) as caller:
        host, port = peer_at.rsplit(":", 1)
        ids = list(range(1000, 1400))
        for n, obj_id in enumerate(ids):  # tcp://127.0.0.1:PORT, :0PORT, :00PORT, ...
            spelled = f"{host}:{'0' * n}{port}"
            caller.send_multipart(encode_message(Op.PUT, obj_id, {"id": obj_id, "obj": PointerDesc(
                "fake", spelled, obj_id, obj_id, (1,), "float32", False, True, peer_key)}))
            assert next_reply(caller, alive=alive).op is Op.REPLY
        caller.send_multipart(encode_message(Op.DEL, 1, {"ids": ids}))  # frees them on the peer
        assert next_reply(caller, alive=alive).op is Op.REPLY
        hellos: list[bytes] = []
        caller.send_multipart(encode_message(Op.FLUSH, 2, {}))  # bob flushes every link it used
        assert _serve_until(caller, 2, [peer], hellos).op is Op.REPLY
        assert len(set(hellos)) == 1, f"bob opened {len(set(hellos))} links to one address"
        # a spelling that is no worker endpoint is refused, and nothing is stored
        caller.send_multipart(encode_message(Op.PUT, 3, {"id": 5, "obj": PointerDesc(
            "fake", "tcp://0x7f.1:80", 5, 5, (1,), "float32", False, True, peer_key)}))
        msg = next_reply(caller, alive=alive)
        assert msg.op is Op.ERROR and "does not name a host" in msg.body["error"]["message"]
    assert bob.stats()["objects"] == 0


@pytest.mark.timeout(60)
def test_peer_links_are_capped_and_an_idle_one_makes_room(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob", config=sy.Config(max_peer_links=2))
    alive = alive_check(bob)
    with fake_peer(bob, name="a") as (a, a_at, a_key), fake_peer(bob, name="b") as (b, b_at, b_key), \
            fake_peer(bob, name="c") as (c, c_at, c_key), raw_dealer(bob) as caller:
        for obj_id, at, key in ((1, a_at, a_key), (2, b_at, b_key), (3, c_at, c_key)):
            caller.send_multipart(encode_message(Op.PUT, obj_id, {"id": obj_id, "obj": PointerDesc(
                "fake", at, 9, obj_id, (1,), "float32", False, False, key)}))
            assert next_reply(caller, alive=alive).op is Op.REPLY

        def call(req_id: int, obj_id: int) -> None:
            caller.send_multipart(encode_message(Op.CALL, req_id, {
                "fn": "torch.neg", "args": [ObjRef(obj_id)], "kwargs": {}, "out": None}))

        call(11, 1)
        call(12, 2)
        pending = {}
        for peer in (a, b):  # both links busy: bob waits for their answers
            ident, hello_id = receive(peer, Op.HELLO)
            answer(peer, ident, hello_id, {"id": "fake"})
            pending[peer] = (ident, receive(peer, Op.CALL)[1])
        call(13, 3)  # a third link, all busy: refused, for this request only
        msg = next_reply(caller, alive=alive)
        assert (msg.op, msg.req_id) == (Op.ERROR, 13), msg.body
        assert "max_peer_links" in msg.body["error"]["message"]
        answer(a, *pending[a], {"result": 1})  # a's link goes idle
        msg = next_reply(caller, alive=alive)
        assert (msg.op, msg.req_id, msg.body) == (Op.REPLY, 11, {"result": 1})
        caller.send_multipart(encode_message(Op.FLUSH, 14, {}))  # ... and clean
        assert _serve_until(caller, 14, [a, b], []).op is Op.REPLY
        call(15, 3)  # now the idle link to a makes room for c
        ident, hello_id = receive(c, Op.HELLO)
        answer(c, ident, hello_id, {"id": "fake"})
        answer(c, ident, receive(c, Op.CALL)[1], {"result": 3})
        msg = next_reply(caller, alive=alive)
        assert (msg.op, msg.req_id, msg.body) == (Op.REPLY, 15, {"result": 3})
        answer(b, *pending[b], {"result": 2})  # b's link was kept: its answer still counts
        msg = next_reply(caller, alive=alive)
        assert (msg.op, msg.req_id, msg.body) == (Op.REPLY, 12, {"result": 2})
        caller.send_multipart(encode_message(Op.DEL, 16, {"ids": [1, 2, 3]}))
        assert next_reply(caller, alive=alive).op is Op.REPLY
