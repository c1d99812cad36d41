"""Batched acknowledgements (Op.ACKS): every request is answered exactly once, acknowledgements
never arrive after a later reply, and a relay's forwarded ops want no answer."""

from __future__ import annotations

import pytest
import torch

import zmqsyft as sy
from tests.helpers import alive_check, next_reply, raw_dealer
from zmqsyft import WorkerClient
from zmqsyft.wire.codec import decode_message, encode_message, unpack_acks
from zmqsyft.wire.messages import Op


def test_a_burst_is_acknowledged_once_each_and_in_order(bob: WorkerClient) -> None:
    alive = alive_check(bob)
    ids = list(range(1, 41))
    with raw_dealer(bob) as sock:
        for req_id in ids:  # 40 PUTs in one burst, then a PING that has a real answer
            sock.send_multipart(encode_message(Op.PUT, req_id, {"id": 1000 + req_id, "obj": torch.ones(2)}))
        sock.send_multipart(encode_message(Op.PING, 99, {}))
        acked: list[int] = []
        while True:
            msg = next_reply(sock, alive=alive)
            if msg.op is Op.ACKS:
                acked += unpack_acks(msg)
            elif msg.req_id == 99:
                break
            else:
                assert msg.op is Op.REPLY and msg.body == {}
                acked.append(msg.req_id)
        assert acked == ids, "each PUT acknowledged once, in order, before the PING's reply"
        sock.send_multipart(encode_message(Op.DEL, 100, {"ids": [1000 + i for i in ids]}))
        assert next_reply(sock, alive=alive).req_id == 100
    assert alive()


def test_acks_decode_strictly() -> None:
    good = decode_message(encode_message(Op.ACKS, 0, {"ids": [3, 4]}))
    assert unpack_acks(good) == [3, 4]
    for bad in ({"ids": "3"}, {"ids": [3, "4"]}, {"ids": [True]}, {}):
        msg = decode_message(encode_message(Op.ACKS, 0, bad))
        with pytest.raises(sy.ProtocolError):
            unpack_acks(msg)


def test_a_relayed_op_failing_downstream_poisons_its_result(alice: WorkerClient, bob: WorkerClient,
                                                            hook: sy.TorchHook) -> None:
    """alice forwards the op to bob without asking for an answer; bob's failure is not lost."""
    x = torch.tensor([1.0, 2.0]).send(bob).send(alice)  # client -> alice -> bob
    y = x[torch.tensor([0, 1])]  # fine
    assert torch.equal(y.get(), torch.tensor([1.0, 2.0]))
    bad = x.index_select(0, torch.tensor([5]))  # out of range: only bob can tell
    on_bob = bad.get()  # alice's result is a pointer to bob's
    with pytest.raises(IndexError, match="index out of range") as info:
        on_bob.get()
    assert info.value.worker_id == "bob"  # type: ignore[attr-defined]
    del x, on_bob
    sy.sync()
