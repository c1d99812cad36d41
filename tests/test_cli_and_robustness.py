"""Real processes: the ``zmqsyft worker`` command line, hostile peers, dead workers, orphans.

Every process a test starts is killed (if still running) and reaped in a ``finally``; nothing
synchronises with ``time.sleep``: output is read with deadlines, replies are polled with
deadlines, process exits are awaited with timeouts.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack
import psutil
import pytest
import torch
import zmq

import zmqsyft as sy
from tests.helpers import (
    ROOT,
    STARTUP,
    alive_check,
    assert_answers_ping,
    cli_worker,
    configured,
    dead_tcp_address,
    expect_error,
    next_reply,
    pk,
    raw_dealer,
    read_line,
    reap,
    run_cli,
    run_script,
    second_client,
)
from zmqsyft import WorkerClient
from zmqsyft.client import get_session
from zmqsyft.config import Config
from zmqsyft.errors import ObjectNotFound, OpNotAllowed, ProtocolError, UntrustedPayload
from zmqsyft.ids import new_id
from zmqsyft.keys import KeyPair
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.exc_codec import decode_exception
from zmqsyft.wire.messages import PROTOCOL_VERSION, ObjRef, Op, Summary
from zmqsyft.wire.values import Ext


# ------------------------------------------------------------------ helpers
def tensor_ext(dtype: str = "float32", shape: list[int] | None = None) -> msgpack.ExtType:
    return msgpack.ExtType(int(Ext.TENSOR), pk([0, dtype, shape or [3], False]))


def expect_only_failure_markers(worker: WorkerClient, ids: set[int], error: str,
                                keep: Collection[int] = ()) -> None:
    """The worker's store holds ``keep`` and, of ``ids``, only failure markers naming ``error``."""
    objects = worker._objects
    extra = set(objects) - set(keep)
    assert extra <= ids, f"unexpected objects {extra - ids}"
    for key in extra:
        assert type(objects[key]) is Summary and error in objects[key].text, objects[key]


def free_raw(sock: zmq.Socket, ids: list[int], alive: Callable[[], bool]) -> None:
    sock.send_multipart(encode_message(Op.DEL, 7777, {"ids": list(ids)}))
    msg = next_reply(sock, alive=alive)
    assert (msg.op, msg.req_id) == (Op.REPLY, 7777)


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_cli_worker_serves_and_shuts_down(kind: str, hook: sy.TorchHook, tmp_path: Path) -> None:
    bind = "tcp://127.0.0.1:0" if kind == "tcp" else f"ipc://{tmp_path}/carol.sock"
    with cli_worker("--id", "carol", "--bind", bind) as worker:
        proc, endpoint = worker.proc, worker.endpoint
        if kind == "tcp":
            assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", endpoint) and not endpoint.endswith(":0")
        else:
            assert endpoint == bind
        carol = worker.connect()
        try:
            assert carol.id == "carol"
            assert carol.pid == proc.pid
            x = torch.tensor([1.0, 2.0, 3.0]).send(carol)
            assert x.location is carol
            y = x + x
            assert torch.equal(y.get(), torch.tensor([2.0, 4.0, 6.0]))
            assert torch.equal(x.get(), torch.tensor([1.0, 2.0, 3.0]))
            assert carol.objects() == {}
            # this program is known by its key, under the name the worker's operator gave that
            # key (its file's name), whatever its HELLO says
            peers = carol.stats()["peers"]
            assert list(peers) == ["test-client"], peers
        finally:
            carol.shutdown()
        assert carol.closed
        assert proc.wait(timeout=30) == 0
        assert worker.stderr() == ""


def test_console_script_exists_and_shows_help() -> None:
    proc = run_cli("worker", "--help", console_script=True)
    assert proc.returncode == 0, proc.stderr
    for option in ("--id", "--bind", "--insecure", "--timeout", "--log-level"):
        assert option in proc.stdout
    assert "--ready-fd" not in proc.stdout and "--parent-pid" not in proc.stdout


def test_script_ending_right_after_torchhook_exits_cleanly() -> None:
    """TorchHook warms torch up in a thread; a process ending meanwhile must not abort.

    With a daemon warm-up thread the interpreter's shutdown killed it inside torch and the
    process died with "terminate called without an active exception" (status 134).
    """
    code = "import torch, zmqsyft as sy; sy.TorchHook(torch)"
    for _ in range(2):
        proc = run_script("-c", code, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "terminate" not in proc.stderr


def test_console_script_rejects_bad_usage() -> None:
    no_id = run_cli("worker", console_script=True)
    assert no_id.returncode == 2 and "--id" in no_id.stderr
    assert "listening" not in no_id.stdout
    no_command = run_cli(console_script=True)
    assert no_command.returncode == 2
    assert "required: command" in no_command.stderr and no_command.stdout == ""


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://[::]:0", "tcp://eth0:0",
                                  "tcp://lo:0"])
def test_an_insecure_non_loopback_bind_needs_insecure_network(bind: str) -> None:
    proc = run_cli("worker", "--id", "dave", "--bind", bind, "--insecure")
    assert proc.returncode == 2
    assert "--insecure-network" in proc.stderr and bind in proc.stderr
    assert "listening" not in proc.stdout


def test_a_non_loopback_bind_serves_curve_clients_only(hook: sy.TorchHook) -> None:
    # an interface name counts as exposed (the worker cannot tell); "lo" keeps this test on the
    # loopback interface, as every network test here is. Without --insecure it starts: every
    # connection is CURVE, from keys it was given
    with cli_worker("--id", "dave", "--bind", "tcp://lo:0") as worker:
        assert re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", worker.endpoint), worker.endpoint
        assert len(worker.key) == 40
        dave = worker.connect()
        try:
            assert dave.id == "dave" and dave.pid == worker.proc.pid
            assert_answers_ping(dave)
        finally:
            dave.close()
        with configured(insecure=True), pytest.raises(sy.WorkerUnavailable, match="handshake"):
            sy.connect(worker.endpoint, timeout=2.0)  # no key: the handshake fails


def test_non_loopback_bind_with_insecure_network_starts(hook: sy.TorchHook) -> None:
    with cli_worker("--id", "dave", "--bind", "tcp://lo:0", "--insecure",
                    "--insecure-network") as worker, configured(insecure=True):
        match = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", worker.endpoint)
        assert match, worker.endpoint
        assert worker.key == ""
        dave = sy.connect(f"tcp://127.0.0.1:{match.group(1)}")
        try:
            assert dave.id == "dave"
            assert dave.pid == worker.proc.pid
            assert_answers_ping(dave)
        finally:
            dave.close()
        worker.proc.terminate()  # SIGTERM: a clean exit
        assert worker.proc.wait(timeout=30) == 0
        assert "INSECURE" in worker.stderr()


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_connect_to_nothing_fails_at_once(kind: str, tmp_path: Path) -> None:
    """Nothing listens there: the connection is refused, and that is final (no waiting for the
    deadline, which was the behaviour before issue 14)."""
    with dead_tcp_address() as tcp_address, configured(timeout=10.0):
        address = tcp_address if kind == "tcp" else f"ipc://{tmp_path}/nobody.sock"
        start = time.monotonic()
        with pytest.raises(sy.WorkerUnavailable, match="no zmqsyft worker answered") as info:
            sy.connect(address, worker_key=KeyPair.fresh().text)
        elapsed = time.monotonic() - start
    assert elapsed < 1.5, f"refused after {elapsed:.1f}s"
    assert "nothing accepts connections at" in str(info.value)
    assert get_session().find(address) is None  # the failed handle is not kept


@contextlib.contextmanager
def mute_listener() -> Iterator[str]:
    """A loopback address that accepts TCP connections and never says anything."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_connect_timeout_argument() -> None:
    """Something accepts the connection but no worker answers: connect waits ``timeout``."""
    with mute_listener() as address:
        start = time.monotonic()
        with pytest.raises(sy.WorkerUnavailable, match="no zmqsyft worker answered"):
            sy.connect(address, timeout=1.0, worker_key=KeyPair.fresh().text)
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 5.0, f"connect gave up after {elapsed:.1f}s with timeout=1.0"
    assert get_session().find(address) is None


def test_configure_timeout_applies_to_existing_client() -> None:
    client = get_session()  # the client exists (as soon as any worker was used)
    default = sy.get_config().timeout
    with configured(timeout=1.0):
        # checked first so that, while the bug stands, the test does not wait the full default
        assert client.cfg.timeout == 1.0, f"the client still uses timeout={client.cfg.timeout}"
        with dead_tcp_address() as address:
            start = time.monotonic()
            with pytest.raises(sy.WorkerUnavailable):
                sy.connect(address, worker_key=KeyPair.fresh().text)
            elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"connect took {elapsed:.1f}s with timeout=1.0 configured"
    assert client.cfg.timeout == default  # and the restored config reaches it too


# ------------------------------------------------------------- hostile peers
def test_garbage_is_answered_or_dropped_and_worker_survives(bob: WorkerClient, hook: sy.TorchHook,
                                                           tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    alive = alive_check(bob)
    before = bob.stats()["counters"]
    dropped_before = before.get("dropped_malformed", 0) + before.get("refused_untrusted", 0)
    refused_before = before.get("refused_untrusted", 0)
    undecodable = 0
    poisoned = new_id()  # a result id a (pipelining) caller chose for a CALL that fails
    # a client whose key the worker accepts but does not trust with pickle
    with raw_dealer(bob, keys=second_client(bob)) as sock:
        # messages carrying a request id: each gets an ERROR reply of a sensible type
        cases: list[tuple[list[Any], type[BaseException], bool]] = [
            ([pk([PROTOCOL_VERSION + 1, int(Op.PING), 101, {}])], ProtocolError, True),
            ([pk([PROTOCOL_VERSION, 99, 102, {}])], ProtocolError, True),
            (encode_message(Op.CALL, 103, {"fn": "os.system", "args": [f"touch {marker}"],
                                           "kwargs": {}, "out": None}), OpNotAllowed, False),
            (encode_message(Op.CALL, 104, {"fn": "builtins.eval",
                                           "args": [f"open({str(marker)!r}, 'w')"],
                                           "kwargs": {}, "out": None}), OpNotAllowed, False),
            (encode_message(Op.CALL, 105, {"fn": "builtins.exec",
                                           "args": [f"open({str(marker)!r}, 'w')"],
                                           "kwargs": {}, "out": None}), OpNotAllowed, False),
            (encode_message(Op.CALL, 106, {"fn": "torch.add", "args": [ObjRef(4242), 1],
                                           "kwargs": {}, "out": None}), ObjectNotFound, False),
            (encode_message(Op.CALL, 107, {"fn": "torch.add", "args": [ObjRef(4242), 1], "kwargs": {},
                                           "out": [[poisoned, [3], "float32", False]]}),
             ObjectNotFound, False),
            ([pk([PROTOCOL_VERSION, int(Op.PUT), 108, {"id": 77, "obj": tensor_ext()}]), b"\x00" * 11],
             ProtocolError, True),
            ([pk([PROTOCOL_VERSION, int(Op.PUT), 109, {"id": 78, "obj": tensor_ext("float128")}]),
              b"\x00" * 48], ProtocolError, True),
            ([pk([PROTOCOL_VERSION, int(Op.PUT), 110, {"id": 79, "obj": tensor_ext(shape=[-3])}]),
              b"\x00" * 12], ProtocolError, True),
            ([pk([PROTOCOL_VERSION, int(Op.PUT), 111, {
                "id": 80, "obj": msgpack.ExtType(int(Ext.PICKLE), cloudpickle.dumps(
                    (os.mknod, (str(marker),))))}])], UntrustedPayload, True),
            (encode_message(Op.GET, 112, {"id": 999}), ObjectNotFound, False),
            (encode_message(Op.GET, 113, {"id": "not an id"}), ProtocolError, False),
            (encode_message(Op.REPLY, 114, {}), ProtocolError, False),
            (encode_message(Op.DEL, 115, {"ids": 5}), ProtocolError, False),
            (encode_message(Op.PUT, 116, {"id": -1, "obj": 1}), ProtocolError, False),
            (encode_message(Op.MOVE, 117, {"id": 1}), ProtocolError, False),
        ]
        for frames, error_type, is_undecodable in cases:
            req_id = msgpack.unpackb(bytes(memoryview(frames[0])), strict_map_key=False,
                                     ext_hook=lambda code, data: None)[2]
            sock.send_multipart(frames)
            expect_error(sock, req_id, error_type, alive)
            undecodable += is_undecodable
        # nothing was stored, except (possibly) the failure marker of the CALL's result id
        expect_only_failure_markers(bob, {poisoned}, "ObjectNotFound")
        free_raw(sock, [poisoned], alive)

        # messages without a usable request id are dropped silently: the next reply on this
        # connection is the answer to the PING sent after them
        rng = random.Random(42)
        garbage = [bytes(rng.getrandbits(8) for _ in range(64)) for _ in range(5)]
        for g in garbage:
            with pytest.raises((ProtocolError, UntrustedPayload)):
                decode_message([g])
        silent = [
            *[[g] for g in garbage],
            [b""],  # an empty message
            [pk({"version": 1})],  # header not a list
            [pk([PROTOCOL_VERSION, int(Op.PING), 120, {}])[:-2]],  # truncated header
            [pk([PROTOCOL_VERSION, 99, 0, {}])],  # unknown op, no reply wanted
            [pk([PROTOCOL_VERSION, int(Op.PUT), 0, {"id": 81, "obj": tensor_ext()}]), b"\x00"],
        ]
        for frames in silent:
            sock.send_multipart(frames)
        undecodable += len(silent)
        # decodable but failing, with request id 0 (no reply wanted)
        sock.send_multipart(encode_message(Op.CALL, 0, {"fn": "os.system", "args": ["true"],
                                                        "kwargs": {}, "out": None}))
        sock.send_multipart(encode_message(Op.PING, 999, {}))
        msg = next_reply(sock, alive=alive)
        assert (msg.op, msg.req_id, msg.body.get("id")) == (Op.REPLY, 999, "bob")
        assert not sock.poll(0)  # nothing else came back

    assert not marker.exists()
    assert bob._proc is not None and bob._proc.poll() is None
    # the worker still serves normally
    x = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    assert torch.equal((x + x).get(), torch.tensor([2.0, 4.0, 6.0]))
    objects = bob._objects
    assert list(objects) == [x.id_at_location]  # none of the garbage PUTs stored anything
    counters = bob.stats()["counters"]
    # undecodable messages are dropped and counted; a pickle from an untrusted sender is
    # counted as refused
    refused = counters.get("refused_untrusted", 0)
    assert counters.get("dropped_malformed", 0) + refused - dropped_before == undecodable
    assert refused - refused_before == 1


DISALLOWED = ["os.system", "builtins.setattr", "builtins.exec", "torch.Tensor.apply_", "torch.Tensor.map_",
              "torch.Tensor.__setstate__", "torch.Tensor.share_memory_", "torch.Tensor.storage",
              "torch.Tensor.untyped_storage", "torch.Tensor.data_ptr", "torch.Tensor.register_hook",
              "torch.Tensor.__reduce_ex__", "torch.Tensor._cdata", "torch.load", "torch.save",
              "torch.Tensor.numpy", "torch.Tensor.tofile"]


def test_disallowed_call_on_a_real_object_changes_nothing(bob: WorkerClient, hook: sy.TorchHook,
                                                          tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    x = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    target = x.id_at_location
    out_ids = [new_id() for _ in DISALLOWED]
    alive = alive_check(bob)
    with raw_dealer(bob) as sock:
        for i, fn in enumerate(DISALLOWED, start=1):
            for out in (None, [[out_ids[i - 1], [3], "float32", False]]):
                body = {"fn": fn, "args": [ObjRef(target), str(files / f"f{i}"), 0.0],
                        "kwargs": {}, "out": out, "inplace": True}
                sock.send_multipart(encode_message(Op.CALL, i, body))
                exc = expect_error(sock, i, OpNotAllowed, alive)
                assert repr(fn) in str(exc) and "nothing was run" in str(exc)
        objects = bob._objects
        assert torch.equal(objects[target], torch.tensor([1.0, 2.0, 3.0]))  # unchanged
        assert list(files.iterdir()) == []  # nothing ran
        # no result was made: a result id holds at most the refusal, for the caller to see
        expect_only_failure_markers(bob, set(out_ids), "OpNotAllowed", keep={target})
        free_raw(sock, out_ids, alive)

        # the same raw path with an allowed in-place op does act on the object (control)
        sock.send_multipart(encode_message(Op.CALL, 500, {"fn": "torch.Tensor.add_",
                                                          "args": [ObjRef(target), 10.0],
                                                          "kwargs": {}, "out": None}))
        msg = next_reply(sock, alive=alive)
        assert (msg.op, msg.req_id) == (Op.REPLY, 500)
    assert torch.equal(x.get(), torch.tensor([11.0, 12.0, 13.0]))


def test_deeply_nested_message_does_not_kill_worker(spawn: Callable[..., WorkerClient]) -> None:
    bob = spawn("bob")  # a fresh worker: on the bug it dies
    data = pk(1)
    for _ in range(1000):
        data = pk(msgpack.ExtType(int(Ext.TUPLE), b"\x91" + data))
    frames = [pk([PROTOCOL_VERSION, int(Op.PUT), 301, {"id": 5, "obj": msgpack.ExtType(int(Ext.TUPLE), b"\x91" + data)}])]
    assert len(frames[0]) < 10_000
    alive = alive_check(bob)
    assert_answers_ping(bob)
    with raw_dealer(bob) as sock:
        sock.send_multipart(frames)
        exc = expect_error(sock, 301, ProtocolError, alive)
    assert alive()
    assert_answers_ping(bob)
    assert bob.stats()["objects"] == 0, f"the refused PUT stored something ({exc})"


def test_malformed_call_fields_report_protocol_error(bob: WorkerClient) -> None:
    alive = alive_check(bob)
    with raw_dealer(bob) as sock:
        sock.send_multipart(encode_message(Op.CALL, 401, {"fn": "torch.add", "args": 5,
                                                          "kwargs": {}, "out": 7}))
        exc = expect_error(sock, 401, ProtocolError, alive)
        assert "CALL key 'args' takes list, not 5" in str(exc), exc  # the first bad key, named
    assert alive()
    assert bob._objects == {}  # nothing was run, nothing was stored


def test_pointer_cycle_between_workers_fails_fast(spawn: Callable[..., WorkerClient]) -> None:
    """A cycle of pointer records between workers is cut by the hop limit. (With ownership, a
    cycle cannot even be made: each hop relays as itself, and the record it reaches belongs to
    the previous hop's caller; insecure workers, where everyone owns everything, still need
    the limit.)"""
    from zmqsyft.wire.messages import PointerDesc

    insecure = Config(insecure=True)  # fresh workers: on the bug they never go quiet
    bob, alice = spawn("bob", config=insecure), spawn("alice", config=insecure)
    a, b = new_id(), new_id()
    with raw_dealer(bob) as to_bob, raw_dealer(alice) as to_alice:
        to_bob.send_multipart(encode_message(Op.PUT, 1, {"id": a, "obj": PointerDesc(
            "alice", alice.address, b, a, (3,), "float32", False, True, alice.key)}))
        assert next_reply(to_bob).op is Op.REPLY
        to_alice.send_multipart(encode_message(Op.PUT, 1, {"id": b, "obj": PointerDesc(
            "bob", bob.address, a, b, (3,), "float32", False, True, bob.key)}))
        assert next_reply(to_alice).op is Op.REPLY
        to_bob.send_multipart(encode_message(Op.CALL, 2, {"fn": "torch.Tensor.add", "args": [ObjRef(a), 1],
                                                          "kwargs": {}, "out": None}))
        msg = next_reply(to_bob, timeout=5.0, alive=alive_check(bob))
        assert (msg.op, msg.req_id) == (Op.ERROR, 2)
        exc = decode_exception(msg.body.get("error"))
        # the hop limit, not a timeout: a ProtocolError naming the loop, raised where it was seen
        assert type(exc) is ProtocolError, f"{type(exc).__name__}: {exc}"
        assert "loops back on itself" in str(exc) and exc.worker_id == "bob"  # type: ignore[attr-defined]
    assert bob.stats()["objects"] == 1 and alice.stats()["objects"] == 1


# -------------------------------------------------------------- dead workers
def test_sigkilled_worker_raises_worker_unavailable(spawn: Callable[..., WorkerClient],
                                                    hook: sy.TorchHook) -> None:
    bob = spawn("bob")
    x = torch.tensor([1.0, 2.0]).send(bob)
    assert torch.equal((x * 2).get(), torch.tensor([2.0, 4.0]))
    pid = bob.pid
    assert pid is not None and bob._proc is not None
    os.kill(pid, signal.SIGKILL)
    with configured(timeout=1.0):
        start = time.monotonic()
        with pytest.raises(sy.WorkerUnavailable):
            (x + 1).get()
        assert time.monotonic() - start < 5.0
        start = time.monotonic()
        with pytest.raises(sy.WorkerUnavailable, match="not running|did not answer"):
            bob.stats()
        assert time.monotonic() - start < 5.0
    assert bob._proc.wait(timeout=10) == -signal.SIGKILL


def test_sigkilled_connected_worker_raises_within_deadline(hook: sy.TorchHook) -> None:
    with cli_worker("--id", "erin") as worker:
        proc = worker.proc
        erin = worker.connect()
        try:
            x = torch.tensor([5.0]).send(erin)
            assert erin.stats()["objects"] == 1
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            with configured(timeout=1.0):
                start = time.monotonic()
                with pytest.raises(sy.WorkerUnavailable):
                    x.copy().get()
                assert time.monotonic() - start < 5.0
                start = time.monotonic()
                with pytest.raises(sy.WorkerUnavailable):
                    erin.ping()
                assert time.monotonic() - start < 5.0
        finally:
            erin.close()


ORPHAN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import zmqsyft as sy

    worker = sy.spawn_worker("orphan", transport_kind="tcp")
    worker.ping()
    print(worker.pid, flush=True)
    sys.stdin.readline()  # the test has looked at the worker: now die without cleaning up
    if sys.argv[1] == "exit":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def gone_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ends (or is a zombie awaiting its new parent) within ``timeout``."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            proc.wait(timeout=0.25)
            return True
        except psutil.TimeoutExpired:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
        except psutil.NoSuchProcess:
            return True
    return False


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "new-interpreter"])
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_worker_exits_when_its_parent_dies(how: str, forked: bool, tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    env = dict(os.environ, ZMQSYFT_FORKSERVER=str(int(forked)))
    parent = subprocess.Popen([sys.executable, str(script), how], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env=env)
    worker_pid: int | None = None
    try:
        worker_pid = int(read_line(parent, STARTUP))
        worker = psutil.Process(worker_pid)
        if forked:  # a fork of the fork server, our child, whose command line it has
            assert worker.ppid() != parent.pid
            assert psutil.Process(worker.ppid()).ppid() == parent.pid
        else:
            assert worker.ppid() == parent.pid
        cmdline = worker.cmdline()
        assert "zmqsyft" in cmdline and "--parent-pid" in cmdline and str(parent.pid) in cmdline
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        assert parent.stdin is not None
        parent.stdin.write(b"go\n")
        code = parent.wait(timeout=30)
        assert code == (0 if how == "exit" else -signal.SIGKILL)
        assert gone_within(worker_pid, 15.0), f"worker {worker_pid} outlived its parent"
    finally:
        reap(parent)
        if worker_pid is not None:
            try:
                leftover = psutil.Process(worker_pid)
                if "--parent-pid" in leftover.cmdline():
                    leftover.kill()
            except psutil.Error:
                pass
