"""What the soak test (``benchmarks/soak.py``) found, each reduced to one reproduction.

Two shell workers with fixed keys and addresses (``bob`` and ``alice``, each allowing the other
and the test's key; a third, ``carol``, for a longer chain and a move), killed with SIGKILL and
started again at the same address, as the soak's killer does. All three findings are fixed:

1. what bob GAVE to alice (a chain's data) was kept for alice's key's default session, which a
   restarted alice (same key) kept alive forever; now a GIVE names the receiving process's
   session (a worker's links name its incarnation), which lapses with that process;
2. an op through a chain whose last hop was restarted raised ``ObjectNotFound`` relayed by the
   middle worker; now pointer descriptors and records name the holder's incarnation and the
   relay answers ``WorkerRestarted`` naming the restarted worker;
3. data given to a chain's middle worker was freed after the lease when that worker had not
   linked to the data's worker yet (needs no kill).

A finding not fixed yet is added here as a strict ``xfail``: it starts passing (and so failing
as ``XPASS``) when the bug is fixed, which is the signal to drop the mark.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import zmqsyft as sy
from tests.helpers import STARTUP, _cli_worker
from zmqsyft import WorkerClient
from zmqsyft.keys import KeyPair, new_keypair

pytestmark = pytest.mark.timeout(240)

LEASE = 1.0
# a restarted relay is back, and linked to bob, within this lease (a worker's start, torch's
# import, takes ~9 s on 2 busy cores: with 8 s the old lease could run out first, and a test of
# the fix pass without it)
RESTART_LEASE = 20.0
BACK_LATE = ("the restarted relay came back after the lease of its predecessor had run out: "
             "this run cannot tell whether the new process would have kept the old objects "
             "alive (raise RESTART_LEASE)")


class Pair:
    """bob and alice (or ``names``), shell workers that know each other's keys and can be
    restarted."""

    def __init__(self, tmp: Path, lease: float = LEASE,
                 names: tuple[str, ...] = ("bob", "alice")) -> None:
        self.lease = lease
        self.dir = tmp / "keys"
        self.dir.mkdir()
        for name in names:
            new_keypair(name, str(self.dir))
        _, secret = new_keypair("me", str(self.dir))
        self.me = KeyPair.load(secret)
        self.address = {n: f"ipc://{tmp}/{n}.sock" for n in names}
        self.handles: list[WorkerClient] = []

    @contextmanager
    def running(self, name: str) -> Iterator[object]:
        args = ("--id", name, "--bind", self.address[name], "--keys", str(self.dir),
                "--allow", str(self.dir), "--admin", str(self.dir / "me.key"),
                "--lease", str(self.lease))
        with _cli_worker(args, STARTUP, None) as worker:
            yield worker

    def connect(self, name: str) -> WorkerClient:
        self.handles.append(sy.connect(self.address[name],
                                       worker_key=str(self.dir / f"{name}.key"), keys=self.me))
        return self.handles[-1]

    def close(self) -> None:
        """Forget the handles: nothing of this test's workers (stopped by now) lingers in the
        session, where a later test's sync() would report their loss."""
        for handle in self.handles:
            handle.close()


@pytest.fixture
def pairs(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    """Makes :class:`Pair` s in the test's directory; closes their handles after the test."""
    made: list[Pair] = []

    def make(**kwargs: Any) -> Pair:
        made.append(Pair(tmp_path, **kwargs))
        return made[-1]
    try:
        yield make
    finally:
        for pair in made:
            pair.close()


def _kill(worker: object) -> None:
    worker.proc.kill()  # type: ignore[attr-defined]
    worker.proc.wait()  # type: ignore[attr-defined]


def test_data_behind_a_chain_whose_relay_was_restarted_is_freed(
        pairs: Callable[..., Pair], hook: sy.TorchHook) -> None:
    pair = pairs(lease=RESTART_LEASE)  # alice is back (and connects to bob) within the lease
    with pair.running("bob"):
        bob = pair.connect("bob")
        with pair.running("alice") as first:
            alice = pair.connect("alice")
            data = torch.arange(4.0).send(bob)
            data_id = data.id_at_location
            chain = data.send(alice)  # bob GIVEs the data to alice
            assert torch.equal((chain + 1).get().get(), torch.arange(4.0) + 1)
            _kill(first)  # alice dies holding the chain: nobody can reach bob's data now
        with pair.running("alice"):
            # the new alice relays for a new chain: it connects to bob with alice's key
            other = torch.ones(2).send(bob).send(alice)
            assert torch.equal((other * 2).get().get(), torch.full((2,), 2.0))
            assert data_id in bob._objects, BACK_LATE
            del chain
            gc.collect()
            deadline = time.monotonic() + pair.lease + 10
            while data_id in bob._objects and time.monotonic() < deadline:
                threading.Event().wait(0.1)  # freed once alice's lease runs out: polled
            assert data_id not in bob._objects, (
                "bob still holds the data of a chain whose relay (alice) was restarted: "
                f"{bob.stats()['principals']}")
            assert torch.equal(other.get().get(), torch.ones(2))


def test_data_behind_a_chain_moved_to_a_relay_that_was_restarted_is_freed(
        pairs: Callable[..., Pair], hook: sy.TorchHook) -> None:
    """Finding 1 by way of a move: alice moves her pointer on to carol, and so has bob give the
    data to carol, to the carol process alice's link met; a restarted carol does not keep it."""
    workers = pairs(lease=RESTART_LEASE, names=("bob", "alice", "carol"))
    with workers.running("bob"), workers.running("alice"):
        bob = workers.connect("bob")
        workers.connect("alice")
        with workers.running("carol") as first:
            carol = workers.connect("carol")
            data = torch.arange(4.0).send(bob)
            data_id = data.id_at_location
            chain = data.send(workers.handles[1]).move(carol)  # carol -> bob now
            assert chain.location is carol
            assert torch.equal((chain + 1).get().get(), torch.arange(4.0) + 1)
            _kill(first)
        with workers.running("carol"):
            other = torch.ones(2).send(bob).send(carol)  # the new carol links to bob
            assert torch.equal((other * 2).get().get(), torch.full((2,), 2.0))
            assert data_id in bob._objects, BACK_LATE
            del chain
            gc.collect()
            deadline = time.monotonic() + workers.lease + 10
            while data_id in bob._objects and time.monotonic() < deadline:
                threading.Event().wait(0.1)  # freed once carol's lease runs out: polled
            assert data_id not in bob._objects, (
                "bob still holds the data of a chain whose relay (carol) was restarted: "
                f"{bob.stats()['principals']}")
            assert torch.equal(other.get().get(), torch.ones(2))


@pytest.mark.parametrize("through", ["remote_get", "op", "get"])
def test_a_chain_whose_last_hop_was_restarted_says_restarted(
        pairs: Callable[..., Pair], hook: sy.TorchHook, through: str) -> None:
    pair = pairs()
    with pair.running("alice"):
        alice = pair.connect("alice")
        with pair.running("bob") as first:
            bob = pair.connect("bob")
            chain = torch.arange(4.0).send(bob).send(alice)
            assert torch.equal((chain + 1).get().get(), torch.arange(4.0) + 1)
            _kill(first)
        with pair.running("bob"):
            assert torch.equal(torch.ones(2).send(bob).get(), torch.ones(2))  # bob is back
            with pytest.raises(sy.CommunicationError) as info:
                if through == "remote_get":
                    chain.remote_get()
                elif through == "op":
                    (chain * 2).get().get()
                else:
                    chain.get().get()
            assert isinstance(info.value, sy.WorkerRestarted), repr(info.value)
            assert "bob" in str(info.value)
            assert "worker 'bob'" in str(info.value) and "restarted" in str(info.value)


@pytest.mark.parametrize("through", ["remote_get", "op", "get"])
def test_a_three_hop_chain_whose_last_hop_was_restarted_says_restarted(
        pairs: Callable[..., Pair], hook: sy.TorchHook, through: str) -> None:
    """client -> carol -> alice -> bob, bob restarted: alice tells it, carol relays it."""
    workers = pairs(names=("bob", "alice", "carol"))
    with workers.running("carol"), workers.running("alice"):
        carol, alice = workers.connect("carol"), workers.connect("alice")
        with workers.running("bob") as first:
            bob = workers.connect("bob")
            chain = torch.arange(4.0).send(bob).send(alice).send(carol)
            assert torch.equal((chain + 1).get().get().get(), torch.arange(4.0) + 1)
            _kill(first)
        with workers.running("bob"):
            assert torch.equal(torch.ones(2).send(bob).get(), torch.ones(2))  # bob is back
            with pytest.raises(sy.CommunicationError) as info:
                if through == "remote_get":
                    chain.remote_get()
                elif through == "op":
                    (chain * 2).get().get().get()
                else:
                    chain.get().get().get()
            assert isinstance(info.value, sy.WorkerRestarted), repr(info.value)
            assert "worker 'bob'" in str(info.value) and "restarted" in str(info.value)


def test_a_three_hop_chain_whose_middle_hop_was_restarted_says_restarted(
        pairs: Callable[..., Pair], hook: sy.TorchHook) -> None:
    """client -> carol -> alice -> bob, alice restarted: carol tells it, naming alice."""
    workers = pairs(names=("bob", "alice", "carol"))
    with workers.running("carol"), workers.running("bob"):
        carol, bob = workers.connect("carol"), workers.connect("bob")
        with workers.running("alice") as first:
            alice = workers.connect("alice")
            chain = torch.arange(4.0).send(bob).send(alice).send(carol)
            assert torch.equal((chain + 1).get().get().get(), torch.arange(4.0) + 1)
            _kill(first)
        with workers.running("alice"):
            assert torch.equal(torch.ones(2).send(alice).get(), torch.ones(2))  # alice is back
            with pytest.raises(sy.CommunicationError) as info:
                (chain * 2).get().get().get()
            assert isinstance(info.value, sy.WorkerRestarted), repr(info.value)
            assert "worker 'alice'" in str(info.value) and "restarted" in str(info.value)


def test_data_given_to_a_chain_is_kept_while_the_chain_is_unused(
        pairs: Callable[..., Pair], hook: sy.TorchHook) -> None:
    """Soak finding 3: bob gives the data to alice when the pointer is sent to her; alice does
    not connect to bob until the chain is used. The data must not be freed meanwhile."""
    pair = pairs()
    with pair.running("bob"), pair.running("alice"):
        bob, alice = pair.connect("bob"), pair.connect("alice")
        data = torch.arange(4.0).send(bob)
        data_id = data.id_at_location
        chain = data.send(alice)
        deadline = time.monotonic() + LEASE + 4.0
        while time.monotonic() < deadline:  # longer than bob's lease for alice's key
            assert data_id in bob._objects, "bob freed data it gave to alice while alice's " \
                f"pointer to it is alive: {bob.stats()['principals']}"
            threading.Event().wait(0.2)
        assert torch.equal(chain.get().get(), torch.arange(4.0))
