"""Workers that die, freeze or restart: what the caller is told, how soon, and what runs after.

Real worker processes, killed (``SIGKILL``), frozen (``SIGSTOP``/``SIGCONT``) and started again
at the same address, as an operator or a crash would. Each test failed before the behaviour it
checks was built:

- a worker restarted at the same address is met afresh (``HELLO`` before anything else): older
  pointers raise ``WorkerRestarted``, large tensors and new objects work at once;
- a dead worker is noticed on the sending path, while pipelined ops are issued, not at the next
  ``.get()``; the results that never came raise ``ResultLost`` (a ``CommunicationError`` too);
- a refused connection and a dead shell worker fail at once, not after the heartbeat grace;
- another worker's death fails neither ``sync()`` (but once) nor ``carol._objects``;
- requests in flight while a worker is frozen never take effect after the caller was told
  ``OutcomeUnknown``.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import zmqsyft as sy
from tests.helpers import STARTUP, _cli_worker, configured, dead_tcp_address
from zmqsyft import WorkerClient
from zmqsyft.keys import KeyPair, new_keypair

pytestmark = pytest.mark.timeout(240)

BIG = 512 * 1024  # float32 elements: 2 MiB, through shared memory on one host


class Restartable:
    """A shell worker with a fixed address and key, that can be killed and started again."""

    def __init__(self, tmp: Path, transport_kind: str) -> None:
        self.dir = tmp / "keys"
        self.dir.mkdir()
        new_keypair("bob", str(self.dir))
        _, secret = new_keypair("me", str(self.dir))
        self.client_keys = KeyPair.load(secret)
        if transport_kind == "ipc":
            self.address = f"ipc://{tmp}/bob.sock"
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        self.args = ("--id", "bob", "--bind", self.address, "--keys", str(self.dir),
                     "--admin", str(self.dir / "me.key"), "--trust", str(self.dir / "me.key"))

        self.handles: list[WorkerClient] = []

    @contextmanager
    def running(self) -> Iterator[object]:
        with _cli_worker(self.args, STARTUP, None) as worker:
            self.key = worker.key
            yield worker

    def connect(self) -> WorkerClient:
        self.handles.append(sy.connect(self.address, worker_key=self.key, keys=self.client_keys))
        return self.handles[-1]

    def close(self) -> None:
        """Forget the handles (nothing of this test's workers lingers in the session)."""
        for handle in self.handles:
            handle.close()


@pytest.fixture
def restartable(tmp_path: Path, transport_kind: str) -> Iterator[Restartable]:
    made = Restartable(tmp_path, transport_kind)
    try:
        yield made
    finally:
        made.close()


def kill(proc: object) -> None:
    proc.kill()  # type: ignore[attr-defined]
    proc.wait()  # type: ignore[attr-defined]


def _pid(worker: WorkerClient) -> int:
    assert worker._proc is not None
    return worker._proc.pid


# ------------------------------------------------------------------ restarts
def test_a_worker_restarted_at_the_same_address_is_met_afresh(restartable: Restartable,
                                                              hook: sy.TorchHook) -> None:
    bob_at = restartable
    with bob_at.running() as first:
        bob = bob_at.connect()
        small = torch.arange(4.0).send(bob)
        big = torch.ones(BIG).send(bob)
        assert torch.equal(small.get(), torch.arange(4.0))
        small = torch.arange(4.0).send(bob)
        kill(first.proc)  # type: ignore[attr-defined]
    with bob_at.running():
        for ptr, what in ((small, ".get()"), (big, ".get()")):
            with pytest.raises(sy.WorkerRestarted) as info:
                ptr.get()
            message = str(info.value)
            assert "worker 'bob'" in message and "was restarted at" in message, message
            assert what in message and "Send the data to it again" in message
            assert message.count(str(ptr.id_at_location)) == 1, message  # (named once)
            assert isinstance(info.value, sy.ObjectNotFound)
            assert isinstance(info.value, sy.CommunicationError)
        with pytest.raises(sy.WorkerRestarted):
            small + 1  # (an op naming an object from before)
        # the new process is met afresh: shared memory and trust work at once
        fresh = torch.full((BIG,), 2.0).send(bob)
        moved_in = (fresh * 3).get()
        assert torch.equal(moved_in, torch.full((BIG,), 6.0))
        assert bob.run(lambda: 42) == 42
        assert bob.generation == 1


def test_a_restart_found_on_the_sending_path_names_the_stale_object(
        restartable: Restartable, hook: sy.TorchHook) -> None:
    """The restart is met by the request itself (no earlier call saw the old connection go):
    the request naming an old object fails with WorkerRestarted and nothing of it runs."""
    bob_at = restartable
    with bob_at.running() as first:
        bob = bob_at.connect()
        x = torch.arange(4.0).send(bob)
        kill(first.proc)  # type: ignore[attr-defined]
    with bob_at.running():
        start = time.monotonic()
        with pytest.raises(sy.WorkerRestarted):
            x.add_(1)
        assert time.monotonic() - start < 5.0
        y = torch.arange(3.0).send(bob)
        assert list(bob._objects) == [y.id_at_location]


# ------------------------------------------------------------- dead at once
def test_pipelined_ops_notice_a_dead_worker_at_once(spawn: Callable[..., WorkerClient]) -> None:
    bob = spawn("bob")
    x = torch.arange(4.0).send(bob)
    os.kill(_pid(bob), signal.SIGSTOP)
    in_flight = [x + k for k in range(5)]  # pipelined: sent, never answered
    os.kill(_pid(bob), signal.SIGKILL)
    assert bob._proc is not None
    bob._proc.wait()
    killed = time.monotonic()
    issued = 0
    with pytest.raises(sy.WorkerUnavailable) as info:
        while time.monotonic() - killed < 20.0:
            x + 1  # a loop that does not look at its results
            issued += 1
    took = time.monotonic() - killed
    assert took < 1.0, f"the loop ran on for {took:.1f}s ({issued} ops) after the kill"
    assert "worker 'bob'" in str(info.value) and "not running" in str(info.value)
    for ptr in in_flight:
        with pytest.raises(sy.ResultLost) as lost:
            ptr.get()
        assert isinstance(lost.value, sy.CommunicationError)
        assert isinstance(lost.value, sy.PointerError)
        assert isinstance(lost.value, sy.OutcomeUnknown)


def test_a_refused_connection_is_down_at_once(tmp_path: Path, hook: sy.TorchHook) -> None:
    nobody = KeyPair.fresh().text
    with dead_tcp_address() as tcp:
        for address in (tcp, f"ipc://{tmp_path}/nobody.sock"):
            start = time.monotonic()
            with pytest.raises(sy.WorkerUnavailable) as info:
                sy.connect(address, worker_key=nobody)
            took = time.monotonic() - start
            assert took < 1.5, f"{address}: refused after {took:.1f}s"
            assert "nothing accepts connections at" in str(info.value), str(info.value)


def test_every_call_to_a_dead_shell_worker_fails_at_once(restartable: Restartable,
                                                        hook: sy.TorchHook) -> None:
    bob_at = restartable
    with bob_at.running() as worker:
        bob = bob_at.connect()
        x = torch.arange(4.0).send(bob)
        kill(worker.proc)  # type: ignore[attr-defined]
        took = []
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(sy.WorkerUnavailable) as info:
                torch.ones(2).send(bob)
            took.append(time.monotonic() - start)
            assert "could not be reached" in str(info.value), str(info.value)
        assert max(took) < 1.5, took
        with pytest.raises(sy.WorkerUnavailable):
            x.get()


def test_another_workers_death_fails_neither_objects_nor_sync_but_once(
        spawn: Callable[..., WorkerClient]) -> None:
    bob, carol = spawn("bob"), spawn("carol")
    dropped = torch.ones(3).send(bob)
    kept = torch.arange(3.0).send(carol)
    x = torch.arange(2.0).send(bob)
    os.kill(_pid(bob), signal.SIGSTOP)
    pending = x + 1  # in flight when bob dies: sync() reports that once
    os.kill(_pid(bob), signal.SIGKILL)
    assert bob._proc is not None
    bob._proc.wait()
    del dropped  # a delete for the dead worker is queued
    gc.collect()
    assert list(carol._objects) == [kept.id_at_location]  # not failed by bob's death
    with pytest.raises(sy.OutcomeUnknown, match="worker 'bob'"):
        sy.sync()
    for _ in range(3):
        sy.sync()  # said once
        assert list(carol._objects) == [kept.id_at_location]
    with pytest.raises(sy.ResultLost):
        pending.get()


# ------------------------------------------------------------------ freezes
@pytest.mark.parametrize("change", ["in-place op", "send"])
def test_requests_in_flight_during_a_freeze_never_take_effect_later(
        spawn: Callable[..., WorkerClient], change: str) -> None:
    ivl = 0.5
    with configured(heartbeat_ivl=ivl):
        bob = spawn("bob", config=sy.Config(heartbeat_ivl=ivl))
        x = torch.zeros(4).send(bob)
        assert len(bob._objects) == 1
        os.kill(_pid(bob), signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(sy.OutcomeUnknown) as info:
                if change == "send":
                    torch.ones(4).send(bob)
                else:
                    x.add_(1)
                    sy.sync()
            took = time.monotonic() - start
            assert "whether it took effect there is unknown" in str(info.value)
            assert took < 3 * ivl + 1.0, f"a frozen worker was noticed after {took:.1f}s"
        finally:
            os.kill(_pid(bob), signal.SIGCONT)
        # the worker resumes with the request still queued: it must not run it
        assert torch.equal(x.get(), torch.zeros(4)), "a request ran after its caller gave up"
        assert bob._objects == {}, "a PUT was stored after its caller was told it failed"
        assert bob.stats()["counters"]["dropped_ended"] >= 1
