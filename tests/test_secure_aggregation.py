"""Fixed precision and additive secret sharing (PySyft Part 9/10), on real worker processes."""

from __future__ import annotations

import pytest
import torch

import zmqsyft as sy
from zmqsyft.client.smpc import run_own
from zmqsyft.secret import beaver_triple, reconstruct, split_shares

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ the ring, in this process
def test_shares_add_up_and_each_looks_random() -> None:
    x = torch.tensor([25, -7, 2**62, -(2**63)], dtype=torch.int64)
    shares = split_shares(x, 3)
    assert len(shares) == 3 and all(s.dtype == torch.int64 and s.shape == x.shape for s in shares)
    assert torch.equal(reconstruct(shares), x)
    again = split_shares(x, 3)
    assert not any(torch.equal(a, b) for a, b in zip(shares, again, strict=True))  # fresh randomness each time
    big = split_shares(torch.zeros(100_000, dtype=torch.int64), 2)[0]
    # uniform over 2**64: about half negative, the high bits about half set
    assert 0.48 < (big < 0).double().mean().item() < 0.52
    assert 0.48 < ((big >> 40) & 1).double().mean().item() < 0.52


def test_shares_do_not_come_from_torchs_generator() -> None:
    x = torch.arange(8, dtype=torch.int64)
    torch.manual_seed(0)
    first = split_shares(x, 2)[0]
    torch.manual_seed(0)
    second = split_shares(x, 2)[0]
    assert not torch.equal(first, second)  # seeding torch does not reproduce them


def test_triples_multiply_in_the_ring() -> None:
    parts = beaver_triple([3, 4], [4, 2], "matmul", 2)
    a, b, c = reconstruct(parts[0:2]), reconstruct(parts[2:4]), reconstruct(parts[4:6])
    assert torch.equal(a @ b, c)
    parts = beaver_triple([5], [5], "mul", 3)
    assert torch.equal(reconstruct(parts[0:3]) * reconstruct(parts[3:6]), reconstruct(parts[6:9]))
    meta = beaver_triple([1000, 1000], [1000, 1000], "matmul", 2, device="meta")
    assert all(t.is_meta for t in meta)  # a cost estimate draws nothing


@pytest.mark.parametrize("bad", [
    lambda: split_shares(torch.ones(3), 2),  # floating point: fix_precision first
    lambda: split_shares(torch.ones(3, dtype=torch.int64), 1),
    lambda: split_shares(torch.ones(3, dtype=torch.int64), 65),
    lambda: beaver_triple([2], [2], "pow", 2),
    lambda: beaver_triple([2, -1], [2], "mul", 2),
])
def test_bad_arguments_are_refused(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((TypeError, ValueError)):
        bad()


def test_fixed_precision_round_trip(hook) -> None:  # type: ignore[no-untyped-def]
    x = torch.tensor([0.1, -0.25, 3.14159])
    fixed = x.fix_precision()
    assert isinstance(fixed, sy.FixedPrecisionTensor)
    assert fixed.child.tolist() == [100, -250, 3142]
    assert torch.allclose(fixed.float_precision(), x, atol=1e-3)
    assert torch.allclose((fixed * 2 + 1).float_prec(), x * 2 + 1, atol=2e-3)
    assert torch.allclose(x.fix_prec(precision_fractional=6).float_prec(), x, atol=1e-6)


# --------------------------------------------------------------------------- on real workers
@pytest.fixture
def trio(spawn):  # type: ignore[no-untyped-def]
    return spawn("bob"), spawn("alice"), spawn("james")


def test_integers_shared_among_three(trio) -> None:  # type: ignore[no-untyped-def]
    bob, alice, james = trio
    x = torch.tensor([25]).share(bob, alice, james)
    y = torch.tensor([5]).share(bob, alice, james)
    assert isinstance(x, sy.AdditiveSharingTensor) and len(x.shares) == 3
    assert [p.location for p in x.shares] == [bob, alice, james]
    assert (x + y).get().tolist() == [30]
    assert (x - y).get().tolist() == [20]
    assert (x * 3).get().tolist() == [75]
    assert (x + 2).get().tolist() == [27]
    assert (10 - y).get().tolist() == [5]
    with pytest.raises(ValueError, match="crypto provider"):
        x * y
    z = x + y
    assert z.get().tolist() == [30]
    with pytest.raises(ValueError, match="no longer be used"):
        z.get()  # reconstructed already: its shares are gone


@pytest.mark.parametrize("holders", [2, 3])
def test_fixed_precision_products_with_beaver_triples(trio, spawn, holders: int) -> None:  # type: ignore[no-untyped-def]
    bob, alice, james = trio
    workers = (bob, alice, james)[:holders]
    provider = james if holders == 2 else spawn("carol")  # never a holder itself
    x = torch.tensor([[0.5, -1.25], [2.0, 0.1]])
    y = torch.tensor([[1.5, 0.2], [-0.3, 4.0]])
    sx = x.fix_prec().share(*workers, crypto_provider=provider)
    sy_ = y.fix_prec().share(*workers, crypto_provider=provider)
    assert torch.allclose((sx * sy_).get().float_prec(), x * y, atol=3e-3)
    sx = x.fix_prec().share(*workers, crypto_provider=provider)
    sy_ = y.fix_prec().share(*workers, crypto_provider=provider)
    assert torch.allclose((sx @ sy_).get().float_prec(), x @ y, atol=5e-3)
    sx = x.fix_prec().share(*workers, crypto_provider=provider)
    assert torch.allclose((sx * 0.5).get().float_prec(), x * 0.5, atol=2e-3)
    sx = x.fix_prec().share(*workers, crypto_provider=provider)
    assert torch.allclose(sx.sum().get().float_prec(), x.sum(), atol=2e-3)
    sx = x.fix_prec().share(*workers, crypto_provider=provider)
    assert torch.allclose(sx.mean().get().float_prec(), x.mean(), atol=2e-3)
    sx = x.fix_prec().share(*workers, crypto_provider=provider)
    assert torch.allclose((sx / 4).get().float_prec(), x / 4, atol=2e-3)


def test_a_huge_triple_is_refused_before_it_is_drawn(trio) -> None:  # type: ignore[no-untyped-def]
    bob, alice, james = trio
    (huge,) = run_own(james, "zmqsyft.beaver_triple", [[1 << 20, 1 << 20], [1 << 20], "mul", 2],
                      [[1]])  # the client's idea of the result does not matter: the worker decides
    with pytest.raises(sy.LimitExceeded):
        huge.get()
    assert (torch.tensor([1]).share(bob, james) + 1).get().tolist() == [2]  # still serving


def test_a_sharing_whose_shares_would_meet_on_one_worker_is_refused(trio) -> None:  # type: ignore[no-untyped-def]
    bob, alice, james = trio
    x = torch.tensor([7, 8, 9])
    with pytest.raises(ValueError, match="'bob' is named twice"):
        x.share(bob, bob)
    with pytest.raises(ValueError, match="'alice' is named twice"):
        x.fix_prec().share(bob, alice, alice, crypto_provider=james)
    with pytest.raises(ValueError, match="'james' is both a holder and the crypto provider"):
        x.share(bob, james, crypto_provider=james)
    remote = x.send(bob)
    before = len(bob._objects)
    with pytest.raises(ValueError, match="'bob' is named twice"):
        remote.share(bob, bob)
    assert len(bob._objects) == before  # refused before bob split anything
    assert (x.share(bob, alice) + 1).get().tolist() == [8, 9, 10]  # all still serving


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e16, -1e16])
def test_values_that_do_not_fit_the_ring_are_refused_not_wrapped(trio, value: float) -> None:  # type: ignore[no-untyped-def]
    bob = trio[0]
    x = torch.tensor([1.0, value], dtype=torch.float64)
    with pytest.raises(ValueError, match="too large to encode"):
        x.fix_precision()  # 1e16 * 1000 > 2**63: it used to wrap to a wrong, small number
    remote = x.send(bob)
    with pytest.raises(ValueError, match="too large to encode"):
        remote.fix_precision().child.get()  # encoded on bob, who refuses it the same way
    with pytest.raises(ValueError, match="does not fit int64"):
        torch.tensor([2 ** 62], dtype=torch.int64).fix_precision()
    ok = torch.tensor([1.0, 9e12], dtype=torch.float64).send(bob).fix_precision()  # just inside the ring
    assert ok.child.get().tolist() == [1000, 9_000_000_000_000_000]


# ------------------------------------------------- data owners: shares and their policies
def _owner(spawn, name: str, data: torch.Tensor, trust, tmp_path, k: int = 2):  # type: ignore[no-untyped-def]
    path = tmp_path / f"{name}.pt"
    torch.save({"update": data}, path)
    keys = sy.KeyPair.fresh()
    return spawn(name, keys=keys, load=str(path), tags=["#update"],
                 policy=sy.Policy(name=name, trust=trust, k=k)), keys


def test_data_owners_share_on_their_workers_and_only_the_sum_is_released(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bob_keys, alice_keys = sy.KeyPair.fresh(), sy.KeyPair.fresh()
    u_bob, u_alice = torch.tensor([0.25, -1.5, 3.0]), torch.tensor([1.0, 0.5, -0.75])
    for name, data in (("bob", u_bob), ("alice", u_alice)):
        torch.save({"update": data}, tmp_path / f"{name}.pt")
    bob = spawn("bob", keys=bob_keys, load=str(tmp_path / "bob.pt"), tags=["#u"],
                policy=sy.Policy(name="bob", trust=[alice_keys]))
    alice = spawn("alice", keys=alice_keys, load=str(tmp_path / "alice.pt"), tags=["#u"],
                  policy=sy.Policy(name="alice", trust=[bob_keys]))
    james = spawn("james")
    (pb,), (pa,) = bob.search("#u"), alice.search("#u")
    with pytest.raises(sy.PrivacyError, match="bob"):
        pb.copy().get()  # plaintext: refused
    sb = pb.fix_precision().share(bob, alice, crypto_provider=james).get()
    sa = pa.fix_precision().share(bob, alice, crypto_provider=james).get()
    # each owner's shares: refused alone, by both holders
    for shared, owner in ((sb, "bob"), (sa, "alice")):
        for share in shared.child.copy().shares:
            with pytest.raises(sy.PrivacyError, match=owner):
                share.get()
    with pytest.raises(sy.PrivacyError, match="bob"):
        sb.copy().get()
    # the sum over both owners: released
    total = (sb + sa).get().float_precision()
    assert torch.allclose(total, u_bob + u_alice, atol=2e-3)
    # the shares went straight from each owner's worker to the other, as shares, never whole
    for owner in (bob, alice):
        counters = owner.stats()["counters"]
        assert counters["private_moved_as_shares"] >= 1, counters
        assert counters.get("private_moved_whole", 0) == 0, counters
    # a product of the two owners' shared data, with a triple from james, is also theirs only
    prod = sb * sa
    assert isinstance(prod, sy.FixedPrecisionTensor)


def test_shares_go_only_to_workers_the_owner_trusts(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mallory = spawn("mallory")
    bob, _ = _owner(spawn, "bob", torch.tensor([1.0, 2.0]), [], tmp_path)
    (pb,) = bob.search("#update")
    with pytest.raises(sy.PrivacyError, match="policy does not trust worker") as refused:
        pb.fix_precision().share(bob, mallory)
    assert f"(key {mallory.key[:8]}..." in str(refused.value)
    assert bob.stats()["counters"].get("private_moved_as_shares", 0) == 0


def test_k_of_three_refuses_a_sum_over_two(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bob_keys, alice_keys = sy.KeyPair.fresh(), sy.KeyPair.fresh()
    torch.save({"update": torch.ones(2)}, tmp_path / "u.pt")
    bob = spawn("bob", keys=bob_keys, load=str(tmp_path / "u.pt"), tags=["#u"],
                policy=sy.Policy(name="bob", trust=[alice_keys], k=3))
    alice = spawn("alice", keys=alice_keys, load=str(tmp_path / "u.pt"), tags=["#u"],
                  policy=sy.Policy(name="alice", trust=[bob_keys]))
    (pb,), (pa,) = bob.search("#u"), alice.search("#u")
    sb = pb.fix_precision().share(bob, alice).get()
    sa = pa.fix_precision().share(bob, alice).get()
    with pytest.raises(sy.PrivacyError, match="at least 3 owners"):
        (sb + sa).get()


def _chi2_bytes(t: torch.Tensor) -> float:
    """Pearson's chi-squared statistic of a tensor's bytes against the uniform distribution."""
    counts = torch.bincount(t.contiguous().view(torch.uint8).flatten(), minlength=256).double()
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_each_share_made_on_a_worker_is_uniform(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A share made by a data owner's worker, of data that is anything but random (a constant),
    is uniform on its own: its bytes pass a chi-squared test (255 degrees of freedom: the
    statistic exceeds 340 with probability ~0.0003), and every bit is set about half the time."""
    torch.save({"update": torch.full((200_000,), 7.0)}, tmp_path / "u.pt")
    alice = spawn("alice")
    bob = spawn("bob", load=str(tmp_path / "u.pt"), tags=["#u"],
                policy=sy.Policy(owner=sy.get_session().keys, trust=[alice]))
    (pb,) = bob.search("#u")
    shared = pb.fix_precision().share(bob, alice).get()
    for share in shared.child.shares:  # rule (a): the owner may take its own shares
        value = share.get()
        assert value.dtype == torch.int64 and value.shape == (200_000,)
        assert _chi2_bytes(value) < 340, _chi2_bytes(value)
        bits = torch.stack([(value >> b) & 1 for b in range(64)]).double().mean(dim=1)
        assert bool(((bits > 0.49) & (bits < 0.51)).all()), bits
    control = torch.full((200_000,), 7000, dtype=torch.int64)
    assert _chi2_bytes(control) > 10_000  # (the test tells a constant from noise)
