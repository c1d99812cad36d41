"""Zero-copy moves and gets: a worker moving (or giving back) a tensor it received through shared
memory hands the segment over (the destination maps the same file) when nothing else on it uses
that memory; otherwise, or when the destination cannot open the sender's descriptor, it copies."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

import zmqsyft as sy
from tests.helpers import alive_check, allow, configured, next_reply, raw_dealer
from zmqsyft import WorkerClient
from zmqsyft.errors import HandoverRefused, ProtocolError
from zmqsyft.keys import KeyPair
from zmqsyft.wire import shm
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.exc_codec import encode_exception
from zmqsyft.wire.messages import PROTOCOL_VERSION, Op
from zmqsyft.wire.tensors import sole_segment
from zmqsyft.wire.values import Ext, Handover, ShmPolicy

pytestmark = pytest.mark.skipif(not shm.host_key(), reason="this machine has no usable /dev/shm")

BIG = 2 * (1 << 20) // 4  # float32 elements: 2 MiB, above the 1 MiB default threshold
ALWAYS = ShmPolicy(lambda: True, 1, 60.0)


def _inodes(pid: int | None) -> set[int]:
    """Inodes of the shared-memory segments process ``pid`` has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return {int(line.split()[4]) for line in f if f"{shm.segment_dir()}/zmqsyft-" in line}


def _received(data: torch.Tensor) -> torch.Tensor:
    """``data`` as this process receives it from a same-host peer (mapped, held)."""
    return decode_message(encode_message(Op.PUT, 1, {"obj": data}, shm=ALWAYS), shm=True).body["obj"]


# ------------------------------------------------------------------ in one process

def test_a_received_segment_can_be_taken_over_by_name_and_descriptor() -> None:
    data = torch.arange(1024, dtype=torch.float32)
    t = _received(data)
    held = sole_segment(t)
    assert held is not None
    fd, name = held
    assert os.readlink(f"/proc/self/fd/{fd}") == f"{shm.segment_dir()}/{name} (deleted)"
    same = torch.frombuffer(shm.take_over(os.getpid(), fd, name, t.nbytes), dtype=torch.float32)
    same[0] = 42.0  # one memory, two mappings
    assert t[0].item() == 42.0 and torch.equal(t[1:], data[1:])


def test_the_descriptor_is_found_at_receive_time_or_else_by_a_scan() -> None:
    t = _received(torch.randn(1024))
    address = t.untyped_storage().data_ptr()
    name, nbytes, ref, known = shm._held[address]
    assert known is not None and os.readlink(f"/proc/self/fd/{known}").endswith(f"/{name} (deleted)")
    shm._held[address] = (name, nbytes, ref, 0)  # as if another thread had taken the number first
    assert shm.held_segment(address, nbytes) == (known, name)
    assert shm.held_segment(address, nbytes + 1) is None


@pytest.mark.parametrize("use", ["view", "alias", "other tensor", "autograd", "offset"])
def test_a_tensor_whose_memory_is_used_elsewhere_is_not_handed_over(use: str) -> None:
    t = _received(torch.randn(1024))
    assert sole_segment(t) is not None
    if use == "view":
        keep: object = t[:10]
    elif use == "alias":
        keep = t.detach()
    elif use == "other tensor":
        keep = torch.empty(0).set_(t.untyped_storage(), 0, (10,))
    elif use == "autograd":
        w = torch.ones(1024, requires_grad=True)
        keep = w * t  # saves t for backward
    else:
        t = t[1:]
        keep = None
    assert sole_segment(t) is None
    del keep
    if use != "offset":
        assert sole_segment(t) is not None, "once the other user is gone, it can go again"


def test_tensors_that_did_not_arrive_through_shared_memory_are_encoded_as_usual() -> None:
    frames = encode_message(Op.PUT, 1, {"obj": Handover(torch.ones(2048))}, shm=ALWAYS)
    assert [int(e.code) for e in _exts(frames[0])] == [Ext.SHM]
    assert torch.equal(decode_message(frames, shm=True).body["obj"], torch.ones(2048))
    frames = encode_message(Op.PUT, 1, {"obj": Handover(torch.ones(2048))})
    assert [int(e.code) for e in _exts(frames[0])] == [Ext.TENSOR]
    assert torch.equal(decode_message(frames).body["obj"], torch.ones(2048))


def _exts(header: bytes) -> list[msgpack.ExtType]:
    body = msgpack.unpackb(header)[3]
    return [v for v in body.values() if isinstance(v, msgpack.ExtType)]


@pytest.mark.parametrize("case", ["unrelated file", "closed descriptor", "no such process",
                                  "wrong name", "wrong size"])
def test_a_bad_take_over_is_refused_without_opening_anything_else(case: str, tmp_path: Path) -> None:
    t = _received(torch.randn(1024))
    fd, name = sole_segment(t) or (None, None)
    assert fd is not None and name is not None
    pid, nbytes = os.getpid(), t.nbytes
    victim = tmp_path / "victim"
    victim.write_bytes(b"\x00" * nbytes)
    other = os.open(victim, os.O_RDONLY)
    try:
        if case == "unrelated file":
            fd = other
        elif case == "closed descriptor":
            fd = 100_000
        elif case == "no such process":
            pid = 2 ** 22 + 12345
        elif case == "wrong name":
            name = f"zmqsyft-{os.getpid()}-{os.urandom(16).hex()}"
        else:
            nbytes += 4
        with pytest.raises(HandoverRefused):
            shm.take_over(pid, fd, name, nbytes)
    finally:
        os.close(other)
    assert victim.read_bytes() == b"\x00" * t.nbytes


@pytest.mark.parametrize("ref", [["1", 3, "x"], [0, 3, "zmqsyft-1-" + "0" * 32], [1, -1, "zmqsyft-1-" + "0" * 32],
                                 [1, 3, "../../etc/passwd"], [1, 3]])
def test_malformed_take_overs_are_protocol_errors(ref: list[object]) -> None:
    header = msgpack.packb([PROTOCOL_VERSION, int(Op.PUT), 1, {"obj": msgpack.ExtType(
        int(Ext.HANDOVER), msgpack.packb([*ref, "float32", [4], False]))}])
    with pytest.raises(ProtocolError):
        decode_message([header], shm=True)


def test_segments_live_in_a_directory_only_this_user_can_list() -> None:
    st = os.stat(shm.segment_dir())
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert os.path.dirname(shm.segment_dir()) == shm.DIRECTORY


def test_a_directory_someone_else_prepared_turns_shared_memory_off(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"zmqsyft-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(tmp_path / f"zmqsyft-{os.getuid()}", 0o755)
    monkeypatch.setattr(shm, "DIRECTORY", str(tmp_path))
    monkeypatch.setattr(shm, "_dir", None)
    monkeypatch.setattr(shm, "_key", None)
    assert shm.host_key() == ""
    with pytest.raises(OSError, match="not a directory of this user only"):
        shm.segment_dir()


# ------------------------------------------------------------------ between workers

def test_a_move_hands_the_segment_over_along_a_chain(spawn: Callable[..., WorkerClient],
                                                     hook: sy.TorchHook) -> None:
    bob, alice, carol = spawn("bob"), spawn("alice"), spawn("carol")
    data = torch.randn(BIG)
    ptr = data.send(bob)
    sy.sync()
    (inode,) = _inodes(bob.pid)
    ptr = ptr.move(alice)
    sy.sync()
    assert _inodes(alice.pid) == {inode} and _inodes(bob.pid) == set(), "one memory, passed on"
    ptr = ptr.move(carol)
    sy.sync()
    assert _inodes(carol.pid) == {inode} and _inodes(alice.pid) == set()
    ptr.add_(1)
    back = ptr.get()
    assert torch.equal(back, data + 1) and _inodes(os.getpid()) == {inode}, "and on to the client"
    sy.sync()
    assert _inodes(carol.pid) == set()
    assert carol.stats()["counters"]["shm_bytes_in"] == data.nbytes


@pytest.mark.parametrize("use", ["view", "same tensor"])
def test_a_moved_tensor_still_used_on_its_worker_is_copied(use: str, spawn: Callable[..., WorkerClient],
                                                           hook: sy.TorchHook) -> None:
    bob, alice = spawn("bob"), spawn("alice")
    data = torch.randn(BIG)
    ptr = data.send(bob)
    other = ptr[:8] if use == "view" else ptr.contiguous()  # bob: a view / the same tensor object
    sy.sync()
    (inode,) = _inodes(bob.pid)
    moved = ptr.move(alice)
    sy.sync()
    assert inode not in _inodes(alice.pid) and len(_inodes(alice.pid)) == 1
    moved.add_(1)  # must not reach what stays on bob
    assert other is not ptr
    assert torch.equal(other.get(), data[:8] if use == "view" else data)
    assert torch.equal(moved.get(), data + 1)


@contextmanager
def _fake_worker(refuse: bool, *known_by: WorkerClient) -> Iterator[tuple[str, str, list[int]]]:
    """A ROUTER that answers like a same-host worker but refuses take-overs, with a CURVE key
    the workers ``known_by`` are told; yields its address, its key and the list of the extension
    codes its PUTs carried."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    pair = KeyPair.fresh()
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    for worker in known_by:
        allow(worker, "fake", pair.text)
    seen: list[int] = []
    stop = [False]

    def serve() -> None:
        while not stop[0]:
            if not sock.poll(50):
                continue
            ident, *frames = sock.recv_multipart()
            header = msgpack.unpackb(frames[0])
            op, req_id, body = Op(header[1]), header[2], header[3]
            if op is Op.HELLO:
                reply = encode_message(Op.REPLY, req_id, {"id": "fake", "host": shm.host_key(), "shm": True})
            elif op is Op.PUT:
                seen.append(body["obj"].code)
                if body["obj"].code == Ext.HANDOVER and refuse:
                    error = encode_exception(HandoverRefused("no access to /proc here"), "fake")
                    reply = encode_message(Op.ERROR, req_id, {"error": error})
                else:
                    decode_message(frames, shm=True)  # takes it
                    reply = encode_message(Op.REPLY, req_id, {})
            else:
                reply = encode_message(Op.REPLY, req_id, {})
            if req_id:
                sock.send_multipart([ident, *reply])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}", pair.text, seen
    finally:
        stop[0] = True
        thread.join(5)
        sock.close(0)
        ctx.term()


def test_a_refused_take_over_is_retried_as_a_copy(spawn: Callable[..., WorkerClient],
                                                  hook: sy.TorchHook) -> None:
    bob = spawn("bob")
    alive = alive_check(bob)
    with _fake_worker(True, bob) as (address, key, seen), raw_dealer(bob) as sock:
        sock.send_multipart(encode_message(Op.HELLO, 1, {"peer": "local", "host": shm.host_key()}))
        next_reply(sock, alive=alive)
        for obj_id in (11, 12):
            sock.send_multipart(encode_message(Op.PUT, 2, {"id": obj_id, "obj": torch.ones(BIG)}, shm=ALWAYS))
            assert next_reply(sock, alive=alive).op is Op.REPLY
            sock.send_multipart(encode_message(Op.MOVE, 3, {"id": obj_id, "dest_address": address,
                                                            "dest_key": key}))
            reply = next_reply(sock, alive=alive)
            assert reply.op is Op.REPLY, reply.body
        # the first move tried a take-over, then copied; the second copied at once
        assert seen == [Ext.HANDOVER, Ext.SHM, Ext.SHM]
    assert bob.stats()["objects"] == 0 and alive()


def test_a_forged_take_over_is_refused_and_the_worker_survives(bob: WorkerClient, tmp_path: Path) -> None:
    alive = alive_check(bob)
    refused_before = bob.stats()["counters"].get("handovers_refused", 0)
    victim = tmp_path / "victim"
    victim.write_bytes(b"\x00" * 16)
    fd = os.open(victim, os.O_RDWR)
    try:
        with raw_dealer(bob) as sock:
            sock.send_multipart(encode_message(Op.HELLO, 1, {"peer": "local", "host": shm.host_key()}))
            next_reply(sock, alive=alive)
            name = f"zmqsyft-{os.getpid()}-{os.urandom(16).hex()}"
            obj = msgpack.ExtType(int(Ext.HANDOVER), msgpack.packb([os.getpid(), fd, name, "float32", [4], False]))
            sock.send_multipart([msgpack.packb([PROTOCOL_VERSION, int(Op.PUT), 2, {"id": 99, "obj": obj}])])
            reply = next_reply(sock, alive=alive)
        assert reply.op is Op.ERROR and reply.body["error"]["type"].endswith("HandoverRefused")
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"\x00" * 16
    assert bob.stats()["counters"].get("handovers_refused", 0) == refused_before + 1 and alive()


# ------------------------------------------------------------------ get

def test_a_get_takes_over_the_segment_without_a_copy(spawn: Callable[..., WorkerClient],
                                                     hook: sy.TorchHook) -> None:
    bob = spawn("bob")
    data = torch.randn(BIG)
    ptr = data.send(bob)
    sy.sync()
    (inode,) = _inodes(bob.pid)
    back = ptr.get()
    assert _inodes(os.getpid()) == {inode}, "the client maps the memory bob had"
    assert torch.equal(back, data)
    sy.sync()  # the delete of bob's hold on it went out with the FLUSH
    assert bob.stats()["objects"] == 0 and _inodes(bob.pid) == set()
    back.add_(1)  # ours now, writable
    assert torch.equal(back, data + 1)
    del back
    assert inode not in _inodes(os.getpid())


def test_a_get_of_a_tensor_still_used_on_its_worker_is_copied(spawn: Callable[..., WorkerClient],
                                                              hook: sy.TorchHook) -> None:
    bob = spawn("bob")
    data = torch.randn(BIG)
    ptr = data.send(bob)
    view = ptr[:8]
    sy.sync()
    (inode,) = _inodes(bob.pid)
    back = ptr.get()
    assert inode not in _inodes(os.getpid())
    back.add_(1)
    assert torch.equal(view.get(), data[:8]) and torch.equal(back, data + 1)


def test_a_get_whose_take_over_fails_fetches_a_copy_at_once(spawn: Callable[..., WorkerClient],
                                                            hook: sy.TorchHook,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As when the worker runs as another user: opening its descriptor fails in the client."""
    bob = spawn("bob")
    refused: list[int] = []

    def refuse(pid: object, fd: object, name: object, nbytes: int) -> object:
        refused.append(nbytes)
        raise HandoverRefused(f"cannot take over shared-memory segment {name} (test)")
    monkeypatch.setattr(shm, "take_over", refuse)
    with configured(timeout=10.0):
        data = torch.randn(BIG)
        ptr = data.send(bob)
        started = time.monotonic()
        back = ptr.get()
        assert time.monotonic() - started < 5, "the refusal reached get() at once, not at the timeout"
        assert refused == [data.nbytes] and torch.equal(back, data)
        sy.sync()
        assert bob.stats()["objects"] == 0


def test_a_get_naming_a_hold_id_in_use_is_answered_with_a_copy(bob: WorkerClient) -> None:
    alive = alive_check(bob)
    data = torch.randn(BIG)

    def answer(sock: zmq.Socket, req_id: int) -> list[bytes]:
        while True:
            assert sock.poll(10_000), "no reply"
            frames = sock.recv_multipart()
            if msgpack.unpackb(frames[0])[2] == req_id:
                return frames

    with raw_dealer(bob) as sock:
        sock.send_multipart(encode_message(Op.HELLO, 1, {"peer": "local", "host": shm.host_key()}))
        next_reply(sock, alive=alive)
        sock.send_multipart(encode_message(Op.PUT, 2, {"id": 31, "obj": data}, shm=ALWAYS))
        sock.send_multipart(encode_message(Op.PUT, 3, {"id": 32, "obj": "kept"}))
        sock.send_multipart(encode_message(Op.GET, 4, {"id": 31, "handover": 32}))
        frames = answer(sock, 4)
        sock.send_multipart(encode_message(Op.GET, 5, {"id": 32}))
        kept = decode_message(answer(sock, 5))
    assert msgpack.unpackb(frames[0])[3]["obj"].code == Ext.SHM, "a copy, not a hand-over"
    assert torch.equal(decode_message(frames, shm=True).body["obj"], data)
    assert kept.op is Op.REPLY and kept.body["obj"] == "kept", "the object under that id is untouched"
    assert bob.stats()["objects"] == 0 and alive()
