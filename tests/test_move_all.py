"""``sy.move_all``: several modules and pointers moved to one worker with every move in flight
together, and a module's move that fails for one tensor still settles the others."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zmqsyft as sy
from zmqsyft.config import Config

MiB = 1 << 20


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def _values(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.timeout(60)
def test_move_all_moves_modules_and_pointers_each_straight_to_the_destination(
        spawn, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:  # type: ignore[no-untyped-def]
    agg = spawn("agg")
    models = [_model(0), _model(1)]
    expected = [_values(m) for m in models]
    sent = [models[0].send(bob), models[1].send(alice)]
    x = torch.randn(300_000)  # (1.2 MB: through shared memory on one host)
    p = x.send(bob)
    already = torch.tensor([7.0]).send(agg)

    moved = sy.move_all([*sent, p, already], agg)

    assert all(a is b for a, b in zip(moved, [*sent, p, already], strict=True))
    for m in sent:
        assert {t.location.id for t in m.parameters()} == {"agg"}
        assert set(t.id_at_location for t in m.parameters()) <= set(agg._objects)
    assert p.location is agg and already.location is agg
    assert bob._objects == {} and alice._objects == {}  # freed where they were
    assert torch.equal(p.get(), x)
    assert torch.equal(already.get(), torch.tensor([7.0]))
    for m, values in zip(sent, expected, strict=True):
        got = m.get()
        assert all(torch.equal(a, b) for a, b in zip(_values(got), values, strict=True))


@pytest.mark.timeout(60)
def test_move_all_settles_every_move_before_raising_the_first_failure(
        spawn, bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:  # type: ignore[no-untyped-def]
    agg = spawn("agg", config=Config(max_store_bytes=8 * MiB))  # (room for the small ones)
    big = torch.randn(4 * MiB // 4 * 3)  # 12 MiB: more than agg may hold
    small = _model(2)
    expected = _values(small)
    p_big = big.send(bob)
    m_small = small.send(alice)

    with pytest.raises(sy.LimitExceeded):
        sy.move_all([p_big, m_small], agg)

    # the failed move left its tensor where it was, the others took effect
    assert p_big.location is bob and torch.equal(p_big.get(), big)
    assert {t.location.id for t in m_small.parameters()} == {"agg"}
    assert alice._objects == {}
    assert all(torch.equal(a, b) for a, b in zip(_values(m_small.get()), expected, strict=True))


@pytest.mark.timeout(60)
def test_a_module_move_refused_for_one_parameter_still_points_the_others_where_they_went(
        spawn, bob: sy.WorkerClient) -> None:  # type: ignore[no-untyped-def]
    """The refused parameter comes first: the ones after it moved all the same, and their
    pointers must say so (they used to keep pointing at bob, where nothing was left)."""
    agg = spawn("agg", config=Config(max_store_bytes=8 * MiB))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(1024, 3072), nn.ReLU(), nn.Linear(3072, 2))  # 12 MiB first
    expected = _values(model)
    model.send(bob)
    first, *rest = list(model.parameters())

    with pytest.raises(sy.LimitExceeded):
        model.move(agg)

    assert first.location is bob
    assert [t.location.id for t in rest] == ["agg"] * len(rest)
    got = [first.get(), *(t.get() for t in rest)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
