"""The wire table cannot drift from the code: it is rendered from the typed bodies, every op a
worker serves has one, and no module reads a body's keys except through them."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from zmqsyft.errors import ProtocolError
from zmqsyft.wire import bodies
from zmqsyft.wire.bodies import REPLIES, REQUESTS, Call, Get, Move, Put, wire_table
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.messages import Op
from zmqsyft.worker.loop import HANDLERS

PACKAGE = Path(__file__).resolve().parent.parent / "zmqsyft"


def test_the_table_in_the_docs_is_the_one_the_bodies_render() -> None:
    rendered = textwrap.indent(wire_table(), "    ")
    assert rendered in (bodies.__doc__ or ""), (
        "zmqsyft/wire/bodies.py's docstring is out of date; paste in:\n" + rendered)


def test_every_op_a_worker_serves_has_a_typed_body_and_the_table_lists_it() -> None:
    assert set(HANDLERS) == set(REQUESTS) - {Op.ACKS, Op.BATCH, Op.BULK}  # (the loop's own)
    table = wire_table()
    for op in REQUESTS:
        assert re.search(rf"^{op.name}\s", table, re.M), op
    for op, reply in REPLIES.items():
        for name in reply._NAMES:
            assert f"< {name}" in table, (op, name)


def test_no_module_reads_body_keys_by_hand() -> None:
    """Keys are named only in wire/bodies.py: a string-keyed ``body.get("k")`` or ``body["k"]``
    anywhere else is a key the table does not govern."""
    by_hand = re.compile(r"""\bbody(\.get\(|\[)\s*["']""")
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
                 for path in PACKAGE.rglob("*.py") if path.name != "bodies.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if by_hand.search(line)]
    assert not offenders, "\n".join(offenders)


def test_bodies_round_trip_through_the_wire() -> None:
    for body in (Put(id=7, obj=torch.arange(3)), Get(id=9, handover=4),
                 Move(id=3, dest_address="ipc:///tmp/x.sock"),
                 Call(fn="torch.add", args=[1, 2], out=[[5, [3], "float32", False]])):
        msg = decode_message(encode_message(body.OP, 1, body))
        got = type(body).from_wire(msg.body)
        for name in body._NAMES:
            want, have = getattr(body, name), getattr(got, name)
            assert torch.equal(want, have) if isinstance(want, torch.Tensor) else want == have


@pytest.mark.parametrize(("cls", "raw", "message"), [
    (Put, {"obj": 1}, "PUT needs 'id'"),
    (Put, {"id": -1, "obj": 1}, "PUT key 'id' takes object id"),
    (Get, {"id": True}, "GET key 'id' takes object id"),
    (Move, {"id": 1}, "MOVE needs 'dest_address'"),
    (Call, {"fn": "torch.add", "out": [[1, [3], "float32"]]}, "CALL key 'out'"),
    (Call, {"fn": "torch.add", "hops": "1"}, "CALL key 'hops' takes int"),
    (bodies.Del, {"ids": 5}, "DEL key 'ids'"),
    (bodies.Batch, {"msgs": ["not bytes"]}, "BATCH key 'msgs'"),
    (bodies.Search, {"tags": ["#a", 3]}, "SEARCH key 'tags'"),
])
def test_a_body_of_the_wrong_shape_is_refused_naming_op_and_key(cls: type, raw: dict,
                                                                message: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(message)):
        cls.from_wire(raw)


def test_defaults_fill_in_and_unknown_keys_are_ignored() -> None:
    call = Call.from_wire({"fn": "torch.neg", "inplace": True})
    assert (call.args, call.kwargs, call.out, call.grad, call.hops) == ([], {}, None, True, 0)
    assert call.args is not Call.from_wire({"fn": "x"}).args  # no shared mutable default
