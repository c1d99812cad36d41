"""Helpers shared by the test modules (fixtures live in ``conftest.py``).

Everything here that starts a process or waits for one has a deadline, and every process it
starts is killed (if still running) and reaped before it returns or leaves its ``with`` block.
Nothing synchronises with ``time.sleep``: output is read with ``selectors``, replies are polled,
exits are awaited with timeouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import msgpack
import pytest
import zmq

import zmqsyft as sy
from zmqsyft import WorkerClient
from zmqsyft.client import get_session
from zmqsyft.keys import KeyPair, new_keypair
from zmqsyft.wire.bodies import Allow
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.exc_codec import decode_exception
from zmqsyft.wire.messages import Message, Op

ROOT = Path(__file__).resolve().parent.parent
STARTUP = 60.0  # seconds a fresh interpreter may take to import torch and bind (2 slow cores)


# ------------------------------------------------------------------ config
@contextmanager
def configured(**changes: Any) -> Iterator[sy.Config]:
    """``sy.configure(**changes)`` inside the block; the process-wide config as it was before
    afterwards, whatever the block configured meanwhile. Only the public API is used."""
    saved = sy.get_config()
    try:
        yield sy.configure(**changes)
    finally:
        sy.configure(**dataclasses.asdict(saved))


# -------------------------------------------------------------- processes
def run_script(*args: str, timeout: float = 90, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a fresh interpreter (the way a user would) and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=full_env)


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``proc`` writes on stdout (unbuffered, binary), or fail after ``timeout``
    seconds or when stdout closes first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line on stdout within {timeout}s (got {buf!r})")
            if sel.select(remaining):
                chunk = os.read(fd, 1)  # (one byte at a time: what follows the line stays unread)
                if not chunk:
                    pytest.fail(f"stdout closed before a full line (exit code {proc.poll()}); got {buf!r}")
                buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs, wait for it (with a deadline), close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def zmqsyft_command(*args: str, console_script: bool = False) -> list[str]:
    """The ``zmqsyft ARGS`` command line: ``python -m zmqsyft ARGS`` with this interpreter, or
    the installed ``zmqsyft`` console script next to it."""
    if not console_script:
        return [sys.executable, "-m", "zmqsyft", *args]
    script = shutil.which("zmqsyft", path=os.path.dirname(sys.executable))
    assert script, f"no zmqsyft console script next to {sys.executable}"
    return [script, *args]


def run_cli(*args: str, console_script: bool = False, timeout: float = STARTUP) -> subprocess.CompletedProcess[str]:
    """Run ``zmqsyft ARGS`` to its end (``--help``, bad usage, a worker that refuses to start)
    and capture its output; a process still running after ``timeout`` seconds is killed and the
    test fails (``subprocess.TimeoutExpired``)."""
    return subprocess.run(zmqsyft_command(*args, console_script=console_script), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


@dataclasses.dataclass
class CliWorker:
    """A worker started from the shell: its process, the endpoint and key it printed, and the
    key pair of a client it was told to accept as its admin (``None`` with ``--insecure``)."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    _stderr: IO[bytes]
    key: str = ""
    line: str = ""  # the line it printed once listening
    client_keys: KeyPair | None = None

    @property
    def address(self) -> str:
        return self.endpoint

    def connect(self, **kwargs: Any) -> Any:
        """``sy.connect`` to it as its admin client."""
        return sy.connect(self.endpoint, worker_key=self.key or None, keys=self.client_keys,
                          **kwargs)

    def stderr(self) -> str:
        """What the worker wrote on stderr so far (all of it, once it has exited)."""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")


@contextmanager
def cli_worker(*args: str, startup: float = STARTUP, nofile: int | None = None) -> Iterator[CliWorker]:
    """``python -m zmqsyft worker ARGS``, as a user starts one from the shell.

    Waits at most ``startup`` seconds for its ``listening on <endpoint>`` line (failing the test
    with the worker's stderr otherwise) and yields the process and that endpoint. ``nofile`` sets
    the worker's soft limit of open files (``ulimit -Sn``) before it starts. On leaving the block
    the process is killed if it still runs, and reaped. stderr goes to a temporary file, so the
    worker can never block on it.
    """
    insecure = "--insecure" in args
    with contextlib.ExitStack() as stack:
        client_keys = None
        if not insecure:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="zmqsyft-test-keys-"))
            _, secret = new_keypair("test-client", folder)
            client_keys = KeyPair.load(secret)
            args = (*args, "--admin", os.path.join(folder, "test-client.key"))
        worker = stack.enter_context(_cli_worker(args, startup, nofile))
        worker.client_keys = client_keys
        yield worker


@contextmanager
def _cli_worker(args: tuple[str, ...], startup: float, nofile: int | None) -> Iterator[CliWorker]:
    command = zmqsyft_command("worker", *args)
    if nofile is not None:
        command = ["/bin/sh", "-c", f'ulimit -Sn {int(nofile)} && exec "$0" "$@"', *command]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, bufsize=0)
        try:
            worker = CliWorker(proc, "", err)
            try:
                line = read_line(proc, startup)
            except pytest.fail.Exception as exc:
                reap(proc)
                pytest.fail(f"{exc}\nworker stderr:\n{worker.stderr()}")
            match = re.search(r"listening on (\S+)", line)
            assert match, f"unexpected first line from the worker: {line!r}"
            worker.line = line.strip()
            worker.endpoint = match.group(1)
            key = re.search(r"with key (\S{40})", line)
            worker.key = key.group(1) if key else ""
            yield worker
        finally:
            reap(proc)


def run_in_threads(work: Callable[[int], None], n: int, timeout: float = 60.0) -> None:
    """Run ``work(0)`` ... ``work(n - 1)`` in ``n`` threads at once; the first failure in any of
    them is raised here, in the test's thread."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), f"a thread was still running after {timeout}s"
    if errors:
        raise errors[0]


# ----------------------------------------------------------------- workers
def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (``VmHWM``), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def settled_rss(ptr: Any) -> int:
    """The peak memory of the worker holding ``ptr``, once it has settled: an op on ``ptr`` makes
    sure the worker has loaded what estimating an op's cost needs (it does so in the background
    once started: about 70 MiB), so that growth measured from here on is the test's own."""
    ptr.sum().get()
    return peak_rss(ptr.location.pid)


def alive_check(worker: WorkerClient) -> Callable[[], bool]:
    """A function telling whether ``worker``'s process still runs (always true for a worker
    this process did not spawn)."""
    proc = worker._proc
    return (lambda: proc.poll() is None) if proc is not None else (lambda: True)


def peer_row(stats: dict, name: str) -> dict[str, int]:
    """``stats["peers"]`` summed over the principals named ``name`` (a worker's peers spawned by
    one session under one name, e.g. the ipc and the tcp ``alice``, are ``alice`` and
    ``alice (<key prefix>...)``)."""
    row: dict[str, int] = {}
    for label, counts in stats["peers"].items():
        if label == name or label.startswith(f"{name} ("):
            for k, v in counts.items():
                row[k] = max(row.get(k, 0), v) if k.startswith("largest_") else row.get(k, 0) + v
    return row


def messages_from_me(worker: WorkerClient) -> int:
    """How many messages ``worker`` has received from this process (this stats request too).

    A spawned worker counts them under the name its spawner gave this client's key
    (``client:<host>:<pid>``); a :func:`cli_worker` under ``"test-client"``, the name of the key
    file it was given.
    """
    peers = worker.stats()["peers"]
    name = get_session().name
    return int(peers[name if name in peers else "test-client"]["messages_in"])


def assert_answers_ping(worker: WorkerClient, within: float = 10.0) -> float:
    """``worker.ping()`` gives a round-trip time in (0, ``within``) seconds, and the worker did
    serve it: the messages it counts from this process grew by exactly the ping (and the second
    stats request). Returns the round-trip time."""
    before = messages_from_me(worker)
    rtt = worker.ping()
    after = messages_from_me(worker)
    assert type(rtt) is float and 0.0 < rtt < within, f"ping took {rtt!r}s"
    assert after - before == 2, f"{after - before} messages instead of the ping and one stats request"
    return rtt


@contextmanager
def dead_tcp_address() -> Iterator[str]:
    """A loopback address where nothing listens, reserved (bound, never listening) meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------- raw protocol access
def pk(value: Any) -> bytes:
    """``value`` packed as msgpack, the way the wire does."""
    return msgpack.packb(value, use_bin_type=True)


@contextmanager
def raw_dealer(worker: Any, keys: KeyPair | None = None) -> Iterator[zmq.Socket]:
    """A bare DEALER to a worker, bypassing zmqsyft's client entirely.

    ``worker``: a handle (spawned or connected), a :class:`CliWorker`, or a bare address (an
    insecure worker's). The connection is CURVE to the worker's key, as ``keys`` (default: the
    key the worker knows this test by: the session's, or the CLI worker's admin client's)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(use_curve(sock, worker, keys))
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def use_curve(sock: zmq.Socket, worker: Any, keys: KeyPair | None = None) -> str:
    """Make ``sock`` a CURVE client of ``worker`` (see :func:`raw_dealer`), before it connects;
    returns the address to connect to."""
    if isinstance(worker, str):
        return worker
    if worker.key:
        if keys is None:
            keys = (getattr(worker, "client_keys", None)
                    or getattr(getattr(worker, "session", None), "keys", None))
        assert keys is not None
        sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
        sock.curve_serverkey = worker.key.encode()
    return str(worker.address)


def next_reply(sock: zmq.Socket, timeout: float = 10.0,
               alive: Callable[[], bool] = lambda: True) -> Message:
    """The next message on ``sock``, decoded; fails after ``timeout`` seconds, or as soon as
    ``alive()`` says the worker died."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no reply within {timeout}s")
        if sock.poll(min(remaining, 0.2) * 1000):
            return decode_message(sock.recv_multipart(copy=False))
        if not alive():
            pytest.fail("the worker died instead of replying")


def expect_error(sock: zmq.Socket, req_id: int, error_type: type[BaseException],
                 alive: Callable[[], bool] = lambda: True, worker_id: str = "bob") -> BaseException:
    """The next reply on ``sock`` answers ``req_id`` with an ERROR of exactly ``error_type``
    raised on ``worker_id``; returns the rebuilt exception."""
    msg = next_reply(sock, alive=alive)
    assert msg.req_id == req_id
    assert msg.op is Op.ERROR, f"expected an ERROR reply, got {msg.op.name}: {msg.body}"
    exc = decode_exception(msg.body.get("error"))
    assert type(exc) is error_type, f"{type(exc).__name__}: {exc}"
    assert exc.worker_id == worker_id  # type: ignore[attr-defined]
    return exc


# ------------------------------------------------------------- fake peers
def second_client(*workers: Any, name: str = "mallory") -> KeyPair:
    """A fresh key the ``workers`` accept connections from (no rights beyond that): another
    client, for a :func:`raw_dealer`."""
    pair = KeyPair.fresh()
    for worker in workers:
        allow(worker, name, pair.text)
    return pair


def key_file(directory: Any, *workers: Any, name: str = "script") -> str:
    """A key pair ``NAME.key_secret`` in ``directory`` that the ``workers`` accept (no rights
    beyond that): for another program to ``sy.connect(..., keys=<this path>)``."""
    _, secret = new_keypair(name, directory)
    for worker in workers:
        allow(worker, name, KeyPair.load(secret).text)
    return str(secret)


def allow(worker: Any, name: str, key: str) -> None:
    """Introduce ``key`` to ``worker`` as ``name`` (we spawned it: we are its admin)."""
    worker.session.conn(worker).request(Op.ALLOW, Allow(keys={name: key}))


@contextmanager
def fake_peer(*known_by: Any, name: str = "fake") -> Iterator[tuple[zmq.Socket, str, str]]:
    """A bare ROUTER standing where a peer worker would, on a free loopback port, with a CURVE
    key of its own (accepting any client key); the workers ``known_by`` are told its key (a
    worker connects only to peers it knows). Yields the socket, its address and its key."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    pair = KeyPair.fresh()
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    for worker in known_by:
        allow(worker, name, pair.text)
    try:
        yield sock, f"tcp://127.0.0.1:{port}", pair.text
    finally:
        sock.close(linger=0)
        ctx.term()


def receive(sock: zmq.Socket, op: Op, timeout: float = 10.0) -> tuple[bytes, int]:
    """Wait for a message of ``op`` on a fake peer (skipping others); its sender and request id."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the fake peer got no {op.name} within {timeout}s")
        if sock.poll(remaining * 1000):
            ident, header, *_ = sock.recv_multipart()
            raw = msgpack.unpackb(header, strict_map_key=False, ext_hook=lambda code, data: None)
            if raw[1] == int(op):
                return ident, raw[2]


def answer(sock: zmq.Socket, ident: bytes, req_id: int, body: dict) -> None:
    sock.send_multipart([ident, *encode_message(Op.REPLY, req_id, body)])


# ------------------------------------------------------- network namespaces
def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` (iproute2), its output captured; never waits more than 30 s."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def ip_must(*args: str) -> None:
    """``ip ARGS``, which must succeed (the test fails with its error otherwise)."""
    done = ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"
