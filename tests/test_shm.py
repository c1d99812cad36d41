"""Same-host shared-memory transfers: used when both ends share /dev/shm, correct, leak-free,
off when configured so, and refused when a peer has not proved it is on this machine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import psutil
import pytest
import torch

import zmqsyft as sy
from tests.helpers import (
    alive_check,
    assert_answers_ping,
    cli_worker,
    configured,
    next_reply,
    raw_dealer,
    run_script,
)
from zmqsyft import WorkerClient
from zmqsyft.config import Config
from zmqsyft.errors import ProtocolError
from zmqsyft.wire import shm
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.messages import PROTOCOL_VERSION, Op
from zmqsyft.wire.values import Ext, ShmPolicy

pytestmark = pytest.mark.skipif(not shm.host_key(), reason="this machine has no usable /dev/shm")

BIG = 2 * (1 << 20) // 4  # float32 elements: 2 MiB, above the 1 MiB default threshold


def _segments(pid: int | None = None) -> list[str]:
    prefix = "zmqsyft-" if pid is None else f"zmqsyft-{pid}-"
    return sorted(n for n in os.listdir(shm.segment_dir()) if n.startswith(prefix))


def _shm_counters(worker: WorkerClient) -> tuple[int, int]:
    counters = worker.stats()["counters"]
    return counters.get("shm_bytes_in", 0), counters.get("shm_bytes_out", 0)


def test_send_get_and_move_go_through_shared_memory(spawn: Callable[..., WorkerClient],
                                                    hook: sy.TorchHook) -> None:
    bob, alice = spawn("bob"), spawn("alice")
    data = torch.randn(BIG)
    nbytes = data.numel() * 4
    ptr = data.send(bob)
    sy.sync()
    assert _shm_counters(bob) == (nbytes, 0)
    assert _segments(os.getpid()) == [], "the receiver unlinks a segment once it has mapped it"

    ptr.move(alice)
    sy.sync()
    assert _shm_counters(bob) == (nbytes, nbytes)
    assert _shm_counters(alice) == (nbytes, 0)

    back = ptr.get()
    assert torch.equal(back, data)
    assert _shm_counters(alice) == (nbytes, nbytes)
    back.add_(1)  # the received tensor is ordinary, writable memory
    assert torch.equal(back, data + 1)
    for worker in (bob, alice):
        assert _segments(worker.pid) == []
    # per-peer traffic still counts the bytes (the privacy accounting of Part 4 relies on it)
    peers = alice.stats()["peers"]
    assert max(p.get("largest_out", 0) for p in peers.values()) >= nbytes


def test_small_tensors_and_threshold_zero_use_the_socket(spawn: Callable[..., WorkerClient],
                                                          hook: sy.TorchHook) -> None:
    cfg = Config(shm_threshold=0)
    bob = spawn("bob", config=cfg)
    small = torch.arange(10.0)
    assert torch.equal(small.send(bob).get(), small)
    with configured(shm_threshold=0):
        data = torch.randn(BIG)
        assert torch.equal(data.send(bob).get(), data)
    assert _shm_counters(bob) == (0, 0)


def test_operations_on_a_shared_memory_tensor_and_requires_grad(bob: WorkerClient,
                                                                 hook: sy.TorchHook) -> None:
    w = torch.randn(BIG, requires_grad=True)
    ptr = w.send(bob)
    loss = (ptr * 2).sum()
    loss.backward()
    grad = ptr.grad.get()
    assert torch.equal(grad, torch.full_like(w, 2.0))
    assert ptr.get().requires_grad


def test_a_peer_without_a_matching_hello_cannot_send_shared_memory(bob: WorkerClient, tmp_path: Path) -> None:
    alive = alive_check(bob)
    data = torch.arange(BIG, dtype=torch.float32)
    policy = ShmPolicy(lambda: True, 1, 60.0)
    with raw_dealer(bob) as sock:
        # no HELLO at all: the segment is refused (and left for its sender to sweep)
        frames = encode_message(Op.PUT, 1, {"id": 4711, "obj": data}, shm=policy)
        name = msgpack.unpackb(frames[0], ext_hook=lambda c, d: msgpack.unpackb(d))[3]["obj"][0]
        sock.send_multipart(frames)
        reply = next_reply(sock, alive=alive)
        assert reply.op is Op.ERROR and "not known to share" in reply.body["error"]["message"]
        assert os.path.exists(os.path.join(shm.segment_dir(), name))
        shm.sweep(0)
        assert not os.path.exists(os.path.join(shm.segment_dir(), name))

        # a HELLO with another machine's key: still refused
        sock.send_multipart(encode_message(Op.HELLO, 2, {"peer": "stranger", "host": "other:1:2:3"}))
        assert next_reply(sock, alive=alive).body["shm"] is False
        sock.send_multipart(encode_message(Op.PUT, 3, {"id": 4712, "obj": data}, shm=policy))
        assert next_reply(sock, alive=alive).op is Op.ERROR
        shm.sweep(0)

        # with the key: accepted
        sock.send_multipart(encode_message(Op.HELLO, 4, {"peer": "local", "host": shm.host_key()}))
        assert next_reply(sock, alive=alive).body["shm"] is True
        sock.send_multipart(encode_message(Op.PUT, 5, {"id": 4713, "obj": data}, shm=policy))
        assert next_reply(sock, alive=alive).op is Op.REPLY
        assert shm.outstanding() == []
        sock.send_multipart(encode_message(Op.DEL, 6, {"ids": [4713]}))
        assert next_reply(sock, alive=alive).op is Op.REPLY
    assert alive()


def _shm_ext(name: str, shape: list[int], dtype: str = "float32") -> msgpack.ExtType:
    return msgpack.ExtType(int(Ext.SHM), msgpack.packb([name, dtype, shape, False]))


@pytest.mark.parametrize("case", ["traversal", "missing", "symlink", "wrong size", "empty"])
def test_bad_segments_are_refused_and_the_worker_survives(case: str, bob: WorkerClient,
                                                          tmp_path: Path) -> None:
    alive = alive_check(bob)
    victim = tmp_path / "victim"
    victim.write_bytes(b"\x00" * 64)
    fake = f"zmqsyft-{os.getpid()}-{os.urandom(16).hex()}"
    path = os.path.join(shm.segment_dir(), fake)
    shape = [16]
    name = fake
    if case == "traversal":
        name = "../../" + str(victim)
    elif case == "symlink":
        os.symlink(victim, path)
    elif case == "wrong size":
        with open(path, "wb") as f:
            f.write(b"\x00" * 60)
    elif case == "empty":
        shape = [0]
    try:
        with raw_dealer(bob) as sock:
            sock.send_multipart(encode_message(Op.HELLO, 1, {"peer": "local", "host": shm.host_key()}))
            next_reply(sock, alive=alive)
            header = msgpack.packb([PROTOCOL_VERSION, int(Op.PUT), 2, {"id": 99, "obj": _shm_ext(name, shape)}])
            sock.send_multipart([header])
            reply = next_reply(sock, alive=alive)
        assert reply.op is Op.ERROR
        assert reply.body["error"]["type"].endswith(".ProtocolError")
    finally:
        if os.path.lexists(path):
            os.unlink(path)
    assert victim.read_bytes() == b"\x00" * 64
    assert alive()


def test_decoder_refuses_shared_memory_unless_allowed() -> None:
    frames = encode_message(Op.PUT, 1, {"obj": torch.ones(8)}, shm=ShmPolicy(lambda: True, 1, 60.0))
    assert len(frames) == 1 and frames.shm_bytes == 32
    with pytest.raises(ProtocolError, match="not known to share"):
        decode_message(frames)
    msg = decode_message(frames, shm=True)
    assert torch.equal(msg.body["obj"], torch.ones(8)) and msg.shm_bytes == 32
    with pytest.raises(ProtocolError, match="cannot be opened"):
        decode_message(frames, shm=True)  # taken already: a segment is mapped once


def test_encoder_falls_back_to_frames_when_shared_memory_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "DIRECTORY", "/nonexistent-zmqsyft-dir")
    monkeypatch.setattr(shm, "_dir", None)
    data = torch.randn(1000)
    frames = encode_message(Op.PUT, 1, {"obj": data}, shm=ShmPolicy(lambda: True, 1, 60.0))
    assert frames.shm_bytes == 0 and len(frames) == 2
    assert torch.equal(decode_message(frames).body["obj"], data)


def test_the_decision_is_asked_once_and_only_for_large_tensors() -> None:
    asked: list[int] = []

    def use() -> bool:
        asked.append(1)
        return False
    policy = ShmPolicy(use, 1024, 60.0)
    encode_message(Op.PUT, 1, {"obj": [torch.ones(4), torch.ones(8)]}, shm=policy)
    assert asked == []
    frames = encode_message(Op.PUT, 1, {"obj": [torch.ones(512), torch.ones(1024)]}, shm=policy)
    assert asked == [1] and len(frames) == 3


def test_untaken_segments_are_swept_by_age() -> None:
    name = shm.write(b"\x01" * 4096, max_age=60.0)
    assert name in shm.outstanding()
    shm.sweep(3600.0)
    assert name in shm.outstanding()
    shm.sweep(0)
    assert name not in shm.outstanding()
    assert not os.path.exists(os.path.join(shm.segment_dir(), name))


def test_first_move_to_a_new_peer_waits_for_its_hello(spawn: Callable[..., WorkerClient],
                                                      hook: sy.TorchHook) -> None:
    """bob meets carol for the first time with a large tensor and a pointer relay queued behind
    it: both arrive, in order, and the tensor goes through shared memory."""
    bob, carol = spawn("bob"), spawn("carol")
    data = torch.randn(BIG)
    ptr = data.send(bob)
    ptr.move(carol)
    result = ptr + 1
    assert torch.equal(result.get(), data + 1)
    assert _shm_counters(carol)[0] == data.numel() * 4  # the moved tensor, once
    del ptr
    sy.sync()


def test_orphaned_segments_of_dead_writers_are_swept(tmp_path: Path) -> None:
    dead = run_script("-c", "import os; print(os.getpid())", timeout=60)
    assert dead.returncode == 0, dead.stderr
    dead_pid = int(dead.stdout)
    old = f"zmqsyft-{dead_pid}-{os.urandom(16).hex()}"
    young = f"zmqsyft-{dead_pid}-{os.urandom(16).hex()}"
    mine = f"zmqsyft-{os.getpid()}-{os.urandom(16).hex()}"
    for name in (old, young, mine):
        with open(os.path.join(shm.segment_dir(), name), "wb") as f:
            f.write(b"x")
    an_hour_ago = time.time() - 3600
    for name in (old, mine):
        os.utime(os.path.join(shm.segment_dir(), name), (an_hour_ago, an_hour_ago))
    try:
        shm.sweep_orphans(min_age=300)  # (this process's sweeper thread may come first)
        assert not os.path.exists(os.path.join(shm.segment_dir(), old))
        shm.sweep_orphans()  # a dead writer's message can never be answered: no need to wait
        assert not os.path.exists(os.path.join(shm.segment_dir(), young))
        shm.sweep_orphans()
        assert os.path.exists(os.path.join(shm.segment_dir(), mine)), \
            "a live writer's segments are its own business"
    finally:
        for name in (old, young, mine):
            path = os.path.join(shm.segment_dir(), name)
            if os.path.exists(path):
                os.unlink(path)


def test_a_dead_receiver_leaves_no_segment_behind(spawn: Callable[..., WorkerClient],
                                                  hook: sy.TorchHook) -> None:
    bob = spawn("bob")
    assert_answers_ping(bob)
    bob._proc.kill()  # type: ignore[union-attr]
    assert bob._proc.wait(10) == -signal.SIGKILL  # type: ignore[union-attr]
    with pytest.raises(sy.ZmqSyftError):
        torch.randn(BIG).send(bob)
        sy.sync()
    shm.sweep(0)  # what a sender does for untaken segments (after max_age, and at exit)
    assert _segments(os.getpid()) == []


@pytest.mark.timeout(120)
def test_a_worker_with_a_low_open_files_limit_keeps_many_shared_memory_tensors(
        hook: sy.TorchHook, tmp_path: Path) -> None:
    """Each tensor received through shared memory holds a file descriptor while it lives
    (Python's mmap keeps one). A worker started under ``ulimit -n 48`` failed its 36th 1 MiB
    tensor with EMFILE; it now raises its soft limit to the hard one on the first receive."""
    address = f"ipc://{tmp_path}/lim.sock"
    with cli_worker("--id", "lim", "--bind", address, nofile=48) as worker:
        # started under ulimit -Sn 48, the worker raised its soft limit to the hard one at start
        soft, hard = psutil.Process(worker.proc.pid).rlimit(psutil.RLIMIT_NOFILE)
        assert soft == hard != 48
        lim = worker.connect()
        ptrs = [torch.full((1 << 18,), float(i)).send(lim) for i in range(80)]  # 1 MiB each
        stats = lim.stats()
        assert stats["objects"] == 80
        assert stats["counters"]["shm_bytes_in"] == 80 << 20
        assert ptrs[79].sum().get().item() == 79.0 * (1 << 18)
        del ptrs
        assert lim._objects == {}
        lim.shutdown()
        assert worker.proc.wait(timeout=30) == 0


def test_a_segment_is_read_into_memory_when_no_descriptor_is_left() -> None:
    """With exactly one descriptor free, the segment opens but mmap cannot keep its own copy of
    the descriptor: the bytes are read into ordinary memory instead, and the file is gone."""
    script = """
import os, resource, torch
from zmqsyft.wire import shm
data = torch.arange(1 << 18, dtype=torch.float32)
name = shm.write(memoryview(data.numpy()), 60.0)
shm._fd_room = True                       # keep the limit as set below
free = os.open("/dev/null", os.O_RDONLY)
os.close(free)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (free + 1, hard))
segment = shm.open_segment(name, data.numel() * 4)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
back = torch.frombuffer(segment, dtype=torch.float32)
print(type(segment).__name__, torch.equal(back, data),
      os.path.exists(os.path.join(shm.segment_dir(), name)))
"""
    result = run_script("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["bytearray", "True", "False"]
