"""Well-formed CALLs with random allowed ops and random arguments, from a raw socket: the worker
answers or refuses every one, never crashes, keeps every object it held and keeps nothing it was
not asked to."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmqsyft as sy
from tests.helpers import alive_check, next_reply, raw_dealer
from zmqsyft.allowlist import ALLOWED
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import ObjRef, Op, PointerDesc

OPS = sorted(ALLOWED)
BASES = {  # id -> what bob holds under it before and after every example
    101: torch.tensor([1.5, -2.0, 3.0]),
    102: torch.arange(6.0).reshape(2, 3),
    103: torch.tensor([3, 0, 2, 1]),
    104: torch.tensor([[True, False], [False, True]]),
    105: torch.tensor([1 + 2j, -1j]),
    106: torch.tensor(2.5, dtype=torch.float64),
}
ARG = st.one_of(
    st.sampled_from([ObjRef(i) for i in BASES]),
    st.integers(-3, 5),
    st.floats(-4, 4, allow_nan=False),
    st.booleans(),
    st.none(),
    st.sampled_from([torch.float32, torch.int64, torch.bool]),
    st.tuples(st.integers(-2, 3), st.integers(-2, 3)),
    st.lists(st.integers(-1, 4), max_size=3),
    st.sampled_from(["mean", "sum", "none", "reflect", "fro", "linear"]),
)
KWARGS = st.one_of(st.just({}), st.fixed_dictionaries({"dim": st.integers(-2, 1)}),
                   st.fixed_dictionaries({"keepdim": st.booleans()}))


def _descs(value: object) -> list[PointerDesc]:
    if isinstance(value, PointerDesc):
        return [value]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _descs(v)]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _descs(v)]
    return []


@pytest.mark.timeout(300)
def test_random_allowed_calls_are_answered_and_change_nothing_else(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    alive = alive_check(bob)
    with raw_dealer(bob) as sock:
        next_id = iter(range(1, 10**9))

        def request(op: Op, body: dict) -> object:
            req = next(next_id)
            sock.send_multipart(encode_message(op, req, body))
            msg = next_reply(sock, timeout=30, alive=alive)
            assert msg.req_id == req, (msg.req_id, req)
            return msg

        def reset() -> None:
            request(Op.DEL, {"ids": list(BASES)})
            for obj_id, t in BASES.items():
                assert request(Op.PUT, {"id": obj_id, "obj": t.clone()}).op is Op.REPLY

        reset()

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(fn=st.sampled_from(OPS), args=st.lists(ARG, max_size=3), kwargs=KWARGS)
        def one(fn: str, args: list, kwargs: dict) -> None:
            msg = request(Op.CALL, {"fn": fn, "args": args, "kwargs": kwargs, "out": None})
            assert msg.op in (Op.REPLY, Op.ERROR), msg
            made = [d.id_at_location for d in _descs(msg.body.get("result"))]
            if made:  # what the op returned stays bob's until freed: free it
                request(Op.DEL, {"ids": made})
            reset()  # in-place ops may have changed the bases

        one()
        stats = request(Op.STATS, {})
    assert alive(), "the worker died"
    assert stats.body["objects"] == len(BASES), stats.body
