"""What one op may cost a worker, checked before it runs, from a raw socket the way an attacker
would send it: its arithmetic (``max_op_flops``, estimated on meta tensors of the arguments'
shapes) and, for ops whose result size depends on their data (``bincount``, ``one_hot``, ...),
its result's bytes. A refused op runs not at all: no time, no memory, nothing stored."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import zmq

import zmqsyft as sy
from tests.helpers import alive_check, next_reply, peak_rss, raw_dealer, settled_rss
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.exc_codec import decode_exception
from zmqsyft.wire.messages import Message, ObjRef, Op


def call(sock: zmq.Socket, req_id: int, fn: str, *args: Any, alive: Any = None,
         timeout: float = 60.0) -> Message:
    sock.send_multipart(encode_message(Op.CALL, req_id, {"fn": fn, "args": list(args),
                                                         "kwargs": {}, "out": None}))
    msg = next_reply(sock, timeout=timeout, alive=alive)
    assert msg.req_id == req_id, msg
    return msg


def refused(msg: Message, limit: str) -> Exception:
    assert msg.op is Op.ERROR, msg.body
    exc = decode_exception(msg.body["error"])
    assert type(exc) is sy.LimitExceeded and limit in str(exc) and "Nothing" in str(exc), exc
    return exc


@pytest.mark.timeout(60)
def test_a_matmul_of_two_small_tensors_expanded_is_refused_at_once_by_default(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """Two expanded views of a 4-byte tensor: a 12000x12000 matrix product is 3.5e12 flops
    (about ten seconds of this worker, and a 576 MiB result) asked for in one small request."""
    bob = spawn("bob")
    alive = alive_check(bob)
    one = torch.ones(1).send(bob)
    view = one.expand(12000, 12000)
    before = settled_rss(one)
    objects = set(bob._objects)
    with raw_dealer(bob) as sock:
        started = time.monotonic()
        exc = refused(call(sock, 1, "torch.matmul", ObjRef(view.id_at_location),
                           ObjRef(view.id_at_location), alive=alive), "max_op_flops")
        took = time.monotonic() - started
    assert "3,456 GFLOP" in str(exc) and "1,000 GFLOP" in str(exc), exc
    assert took < 2.0, f"the refusal took {took:.1f}s: the op ran"
    assert (peak_rss(bob.pid) - before) < 64 << 20, "the worker allocated the result"
    assert set(bob._objects) == objects
    assert view[:2, :2].sum().get().item() == 4.0  # the worker serves on


@pytest.mark.timeout(60)
def test_max_op_flops_bounds_products_decompositions_and_in_place_ops(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob", config=sy.Config(max_op_flops=10**9))
    alive = alive_check(bob)
    small, big = torch.rand(200, 200), torch.rand(1000, 1000)
    s, b = small.send(bob), big.send(bob)
    bob.sync()
    with raw_dealer(bob) as sock:
        for req_id, fn, args in [
            (1, "torch.matmul", (b, b)),  # 2e9
            (2, "torch.linalg.svd", (b,)),  # ~40 n^3 = 4e10
            (3, "torch.linalg.inv", (b,)),  # ~8 n^3 = 8e9
            (4, "torch.Tensor.addmm_", (b, b, b)),  # in place, 2e9
            (5, "torch.functional.einsum", ("ij,jk->ik", b, b)),
            (6, "torch.matrix_power", (s, 10**18)),  # ~2 log2(1e18) products of 200^3: 1.9e9
        ]:
            refs = [ObjRef(a.id_at_location) if isinstance(a, sy.PointerTensor) else a for a in args]
            refused(call(sock, req_id, fn, *refs, alive=alive), "max_op_flops")
    assert torch.equal(b.get(), big)  # addmm_ changed nothing
    # under the limit, the same ops run and are right
    assert torch.allclose(s.matmul(s).get(), small @ small, atol=1e-3)
    assert torch.allclose(torch.linalg.svdvals(s).get(), torch.linalg.svdvals(small), atol=1e-3)


DATA_DEPENDENT = [  # (op, the argument bob holds, other arguments): each would need ~1 GiB
    ("torch.bincount", torch.tensor([2**27]), ()),
    ("torch.nn.functional.one_hot", torch.tensor([0, 2**26]), ()),
    ("torch.repeat_interleave", torch.tensor([2**27]), ()),
    ("torch.nonzero", torch.ones(4096, 4096, dtype=torch.bool), ()),
    ("torch.combinations", torch.arange(1200), (3,)),
    ("torch.Tensor.tolist", torch.zeros(2**22), ()),
    # counts whose exact value is a number of 100,000 digits: bounded, not computed
    ("torch.combinations", torch.arange(100_000), (50_000,)),
    ("torch.histogramdd", torch.rand(4, 3000), (10,)),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fn", "held", "more"), DATA_DEPENDENT, ids=[d[0] for d in DATA_DEPENDENT])
def test_an_op_whose_result_size_depends_on_its_data_is_refused_before_it_runs(spawn, hook: sy.TorchHook, fn: str, held: torch.Tensor, more: tuple) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob", config=sy.Config(max_store_bytes=96 << 20))
    alive = alive_check(bob)
    x = held.send(bob)
    before = settled_rss(x)
    with raw_dealer(bob) as sock:
        started = time.monotonic()
        refused(call(sock, 1, fn, ObjRef(x.id_at_location), *more, alive=alive),
                "max_store_bytes")
        took = time.monotonic() - started
    assert took < 2.0, f"the refusal took {took:.1f}s"
    grew = (peak_rss(bob.pid) - before) / 2**20
    assert grew < 64, f"the worker's peak memory grew by {grew:.0f} MiB: the op ran"
    assert bob.stats()["objects"] == 1
    assert torch.equal(x.get(), held)


@pytest.mark.timeout(60)
def test_an_op_whose_intermediates_would_not_fit_is_refused_before_it_runs(spawn, hook: sy.TorchHook) -> None:  # type: ignore[no-untyped-def]
    """Distances between 1024 x 1024 broadcast pairs of 64-vectors: a 4 MiB result, but a
    256 MiB difference tensor on the way. What an op makes on its way counts, not only what
    it returns."""
    bob = spawn("bob", config=sy.Config(max_store_bytes=96 << 20))
    alive = alive_check(bob)
    a, b = torch.rand(1024, 1, 64).send(bob), torch.rand(1, 1024, 64).send(bob)
    before = settled_rss(a)
    with raw_dealer(bob) as sock:
        refused(call(sock, 1, "torch.nn.functional.pairwise_distance", ObjRef(a.id_at_location),
                     ObjRef(b.id_at_location), alive=alive), "max_store_bytes")
    grew = (peak_rss(bob.pid) - before) / 2**20
    assert grew < 64, f"the worker's peak memory grew by {grew:.0f} MiB: the op ran"
    small = torch.nn.functional.pairwise_distance(a[:8], b[:, :8])  # what fits still runs
    assert small.get().shape == (8, 8)
