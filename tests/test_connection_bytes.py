"""What one connection may keep on a worker (``max_connection_bytes``, default half of
``max_store_bytes``), tried from two raw sockets the way a runaway or hostile client would: one
connection cannot take the whole worker, what it frees comes back to it, what its ops make counts,
and re-pointing a small stored tensor at a large one (``x.data = y``) is counted too."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import zmq

import zmqsyft as sy
from tests.helpers import alive_check, next_reply, peak_rss, raw_dealer, second_client, settled_rss
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.exc_codec import decode_exception
from zmqsyft.wire.messages import Message, ObjRef, Op

MiB = 1 << 20
CHUNK = torch.zeros(2 * MiB)  # 8 MiB of float32


class Caller:
    """One raw connection speaking the protocol."""

    def __init__(self, sock: zmq.Socket, alive: Any) -> None:
        self.sock, self.alive, self.req = sock, alive, 0

    def __call__(self, op: Op, body: dict[str, Any]) -> Message:
        self.req += 1
        self.sock.send_multipart(encode_message(op, self.req, body))
        msg = next_reply(self.sock, alive=self.alive)
        assert msg.req_id == self.req, msg
        return msg


def limit_error(msg: Message) -> str:
    assert msg.op is Op.ERROR, msg.body
    exc = decode_exception(msg.body["error"])
    assert type(exc) is sy.LimitExceeded, exc
    return str(exc)


@pytest.mark.timeout(60)
def test_one_connection_cannot_take_the_whole_worker(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """One session (a client's connections, all of them) holds at most max_connection_bytes."""
    bob = spawn("bob", config=sy.Config(max_store_bytes=64 * MiB))  # 32 MiB a session
    alive = alive_check(bob)
    with raw_dealer(bob) as a_sock, raw_dealer(bob, keys=second_client(bob)) as b_sock:
        a, b = Caller(a_sock, alive), Caller(b_sock, alive)
        for i in range(4):
            assert a(Op.PUT, {"id": 100 + i, "obj": CHUNK}).op is Op.REPLY
        text = limit_error(a(Op.PUT, {"id": 104, "obj": CHUNK}))
        assert "max_connection_bytes" in text and "32.0 MiB" in text and "Nothing" in text, text
        assert 104 not in bob._objects
        # the other connection still has room, and the first gets back what it frees
        for i in range(3):
            assert b(Op.PUT, {"id": 200 + i, "obj": CHUNK}).op is Op.REPLY
        assert a(Op.DEL, {"ids": [100]}).op is Op.REPLY
        assert a(Op.PUT, {"id": 104, "obj": CHUNK}).op is Op.REPLY
        # what an op makes counts against the connection that asked for it
        reply = a(Op.CALL, {"fn": "torch.add", "args": [ObjRef(101), 1.0], "kwargs": {},
                            "out": None})
        assert "max_connection_bytes" in limit_error(reply)
        assert b(Op.CALL, {"fn": "torch.add", "args": [ObjRef(200), 1.0], "kwargs": {},
                           "out": [[300, [2 * MiB], "float32", False]]}).op is Op.REPLY
        # a get hands the bytes back to the worker: the connection has room again
        assert a(Op.GET, {"id": 101}).op is Op.REPLY
        assert a(Op.CALL, {"fn": "torch.add", "args": [ObjRef(102), 1.0], "kwargs": {},
                           "out": None}).op is Op.REPLY


@pytest.mark.timeout(60)
def test_repointing_a_small_tensor_at_a_large_one_is_counted(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """``x.data = y`` then freeing ``y``: ``x`` now holds ``y``'s memory. Counted as ``x``'s
    old 4 bytes, this would let one connection grow the worker without bound."""
    bob = spawn("bob", config=sy.Config(max_store_bytes=64 * MiB))
    alive = alive_check(bob)
    before = settled_rss(torch.ones(1).send(bob))
    with raw_dealer(bob) as sock:
        call = Caller(sock, alive)
        stored = 0
        for i in range(20):  # 160 MiB if nothing counted it
            small = 1000 + i
            assert call(Op.PUT, {"id": small, "obj": torch.zeros(1)}).op is Op.REPLY
            reply = call(Op.PUT, {"id": 2000 + i, "obj": CHUNK})
            if reply.op is Op.ERROR:
                assert "max_connection_bytes" in limit_error(reply)
                break
            assert call(Op.CALL, {"fn": "torch.Tensor.data.__set__",
                                  "args": [ObjRef(small), ObjRef(2000 + i)], "kwargs": {},
                                  "out": None}).op is Op.REPLY
            assert call(Op.DEL, {"ids": [2000 + i]}).op is Op.REPLY
            stored += 1
    assert stored <= 4, f"{stored} x 8 MiB were kept past the 32 MiB a connection may hold"
    grew = (peak_rss(bob.pid) - before) / MiB
    assert grew < 80, f"the worker's peak memory grew by {grew:.0f} MiB"
