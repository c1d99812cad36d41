"""Nothing left in shared memory when a transfer fails, and a lost link fails a large transfer
within the heartbeat grace (issue 14): on real worker processes, killed, frozen or cut off
mid-transfer (a TCP forwarder on 127.0.0.1 that stops forwarding stands for a network link
that went down)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import zmqsyft as sy
from tests.helpers import assert_answers_ping, configured, reap
from zmqsyft import WorkerClient
from zmqsyft.wire import shm

BIG = 8 << 20  # float32 elements: 32 MiB, well above the shared-memory threshold
pytestmark = pytest.mark.timeout(120)


def segments(pid: int) -> list[str]:
    """The shared-memory segments process ``pid`` created that are still in the directory."""
    return sorted(n for n in os.listdir(shm.segment_dir()) if n.startswith(f"zmqsyft-{pid}-"))


def until(check: Callable[[], Any], within: float, what: str) -> float:
    """Poll ``check`` (a real state: a directory, a thread) until it is true; the seconds it took."""
    start = time.monotonic()
    tick = threading.Event()
    while not check():
        elapsed = time.monotonic() - start
        assert elapsed < within, f"{what}: not within {within:g}s"
        tick.wait(0.02)
    return time.monotonic() - start


class Call(threading.Thread):
    """A blocking zmqsyft call run in a thread: its result or its exception, and when."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error, self.ended = fn, None, None, 0.0

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        self.ended = time.monotonic()


def _pid(worker: WorkerClient) -> int:
    assert worker._proc is not None
    return worker._proc.pid


def kill_once_written(creator: int, victim: int) -> Call:
    """A thread that SIGKILLs process ``victim`` as soon as ``creator`` has written a segment
    (its ``error``: none was written within 30 s)."""
    def run() -> None:
        until(lambda: segments(creator), 30, "no segment was written")
        os.kill(victim, signal.SIGKILL)
    thread = Call(run)
    thread.start()
    return thread


@pytest.mark.parametrize("transport_kind", ["ipc"])
def test_a_receiver_killed_mid_send_leaves_no_segment(spawn: Callable[..., WorkerClient],
                                                      hook: sy.TorchHook) -> None:
    bob = spawn("bob")
    assert_answers_ping(bob)
    os.kill(_pid(bob), signal.SIGSTOP)  # it will never map what is sent to it
    killer = kill_once_written(os.getpid(), _pid(bob))
    with pytest.raises(sy.WorkerUnavailable):
        torch.ones(BIG).send(bob)
    killer.join(30)
    assert killer.error is None, killer.error
    took = until(lambda: not segments(os.getpid()), 5, "the failed send's segment is still there")
    assert took < 0.5, "unlinked when the request failed, not by a later sweep"


def test_a_refused_message_unlinks_its_segments_at_once(hook: sy.TorchHook) -> None:
    # the worker accepts messages of at most 256 KiB: a call with a large tensor (shared memory)
    # and a 400 KB one (a frame) is refused before it leaves
    bob = sy.spawn_worker("bob", env={"ZMQSYFT_MAX_MESSAGE_SIZE": "262144"})
    try:
        p = torch.ones(4).send(bob)
        with pytest.raises(sy.LimitExceeded, match="max_message_size"):
            torch.cat([p, torch.ones(BIG), torch.ones(100_000)]).get()
        assert segments(os.getpid()) == []
        assert p.sum().get().item() == 4.0  # the connection is still good
    finally:
        bob.close()


@pytest.mark.parametrize("transport_kind", ["ipc"])
def test_a_move_to_a_peer_killed_mid_move_leaves_no_segment(spawn: Callable[..., WorkerClient],
                                                            hook: sy.TorchHook) -> None:
    alice, bob = spawn("alice"), spawn("bob")
    x = torch.ones(BIG).send(alice)
    y = x.clone()  # made on alice in its own memory (no out= form): a move writes a segment
    torch.ones(4).send(alice).move(bob)  # (alice's link to bob is made)
    os.kill(_pid(bob), signal.SIGSTOP)
    killer = kill_once_written(_pid(alice), _pid(bob))
    with pytest.raises(sy.ZmqSyftError):
        y.move(bob)
    killer.join(30)
    assert killer.error is None, killer.error
    until(lambda: not segments(_pid(alice)), 10, "the failed move's segment is still there")
    assert alice.ping() >= 0


_HOLDER = """
import sys, torch
from zmqsyft.wire import shm
name = shm.write(torch.ones({n}).numpy(), 3600.0)  # what a client's encoder does for a send
print(name, flush=True)
sys.stdin.readline()  # (killed meanwhile)
"""


def test_a_killed_clients_segments_are_swept_by_the_survivors(hook: sy.TorchHook) -> None:
    bob = sy.spawn_worker("bob")  # a surviving worker (this process is a surviving client)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(n=BIG)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        assert ready, "the holder process did not start"
        assert holder.stdout is not None
        name = holder.stdout.readline().strip()
        path = os.path.join(shm.segment_dir(), name)
        assert os.path.exists(path)
        bob.ping()
        shm.sweep_orphans()  # what every sweeper does, here and now
        assert os.path.exists(path), "a live creator's segment was swept"
        holder.kill()
        holder.wait(10)
        took = until(lambda: not os.path.exists(path), 10, "the dead client's segment is still there")
        assert took < 6
    finally:
        reap(holder)
        bob.close()


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to ``target`` (host, port); :meth:`cut` stops it forwarding
    without closing anything, as a network link that went down (no FIN, no RST: silence)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0  # bytes from the client to the worker
        self.cut_at: float | None = None
        self.cut_after: int | None = None  # cut once this many bytes went to the worker
        self.sockets: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.cut_at is not None:
                continue  # accepted, never forwarded: a handshake that goes nowhere
            server = socket.create_connection(self.target)
            self.sockets.append(server)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        while self.cut_at is None:
            try:
                data = src.recv(1 << 16)
                if not data:
                    return
                if self.cut_at is not None:
                    return
                dst.sendall(data)
            except OSError:
                return
            if upstream:
                self.forwarded += len(data)
                if self.cut_after is not None and self.forwarded >= self.cut_after:
                    self.cut()

    def cut(self) -> None:
        if self.cut_at is None:
            self.cut_at = time.monotonic()

    def close(self) -> None:
        self.stopped.set()
        self.cut()
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def forwarded_bob(hook: sy.TorchHook) -> Iterator[tuple[WorkerClient, WorkerClient, Forwarder]]:
    bob = sy.spawn_worker("bob", transport_kind="tcp")
    host, port = bob.address.removeprefix("tcp://").rsplit(":", 1)
    fwd = Forwarder((host, int(port)))
    far = sy.connect(f"tcp://127.0.0.1:{fwd.port}", worker_key=bob.key)
    try:
        yield bob, far, fwd
    finally:
        fwd.close()
        far.close()
        bob.close()


def test_a_lost_link_fails_a_large_transfer_within_the_heartbeat_grace(
        forwarded_bob: tuple[WorkerClient, WorkerClient, Forwarder]) -> None:
    bob, far, fwd = forwarded_bob
    # large messages inside the connection, as between two hosts with no sealed channel
    with configured(shm_threshold=0, sealed_threshold=0, timeout=30.0, heartbeat_ivl=1.0):
        assert torch.ones(4).send(far).get().sum().item() == 4.0
        fwd.cut_after = fwd.forwarded + (4 << 20)  # the link goes down 4 MiB into the transfer
        call = Call(lambda: torch.ones(25 << 20).send(far))  # 100 MiB
        call.start()
        until(lambda: fwd.cut_at is not None or not call.is_alive(), 30, "no transfer started")
        assert fwd.cut_at is not None, f"the transfer ended before the cut: {call.error!r}"
        call.join(30)
        assert not call.is_alive()
        took = call.ended - (fwd.cut_at or 0)
    assert isinstance(call.error, sy.WorkerUnavailable), repr(call.error)
    text = str(call.error)
    assert "lost" in text and "unknown" in text, text
    assert "raise it" not in text and "timeout=" not in text, text
    assert took < 10, f"the lost link was noticed {took:.1f}s after it went down"
    assert bob.ping() >= 0  # (the worker itself is fine)


def test_a_reply_in_shared_memory_to_a_connection_gone_before_reading_it_is_unlinked(
        hook: sy.TorchHook) -> None:
    """A client asks for a 32 MiB tensor (the reply goes through shared memory) and is gone
    before it maps the segment (here: a raw connection that never reads, then closes). The
    worker unlinks the segment when that session's last connection closes, not when it ages
    out (120 s)."""
    from tests.helpers import raw_dealer
    from zmqsyft.wire.bodies import Get, Hello, Put
    from zmqsyft.wire.codec import encode_message
    from zmqsyft.wire.messages import Op

    bob = sy.spawn_worker("bob")
    try:
        worker = _pid(bob)
        with raw_dealer(bob) as sock:
            sock.send_multipart(encode_message(Op.HELLO, 1, Hello(
                peer="vanishing", host=shm.host_key(), session="vanishing-session")), copy=False)
            sock.send_multipart(encode_message(Op.PUT, 2, Put(id=77, obj=torch.ones(BIG))),
                                copy=False)
            sock.send_multipart(encode_message(Op.GET, 3, Get(id=77)), copy=False)
            # the replies arrive (taken off the socket, but the GET's segment never mapped)
            replies = [sock.recv_multipart() for _ in range(3)]
            assert len(replies[-1]) == 1, "the tensor came inside the reply, not in a segment"
            assert segments(worker), "the worker wrote no segment for its reply"
        # (closed without mapping it: nobody will)
        took = until(lambda: not segments(worker), 10,
                     "the reply's segment outlived the connection it was written for")
        assert took < 5
        assert_answers_ping(bob)
    finally:
        bob.close()
