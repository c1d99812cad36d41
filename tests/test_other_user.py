"""Another local user, the way they would try: a process of theirs (``setpriv --reuid``).

Over ipc, speaking ZMTP by hand to a user's worker bound where they can reach it: the worker
refuses the handshake (its gate reads the peer's uid from the kernel), even with authentication
off, while its own user's connections are served. Over loopback tcp (which every local user can
reach, and ``/proc/net/tcp`` tells them which port is whose), with pyzmq and a key of their own,
knowing the worker's public key: refused, since only keys the worker was given are served, and
the user's secret keys are not theirs to read. Runs where the test may switch users (root, and
``setpriv`` installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.helpers import cli_worker, next_reply, raw_dealer
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import Op

NOBODY = 65534

# a ZMTP 3.0 client with the NULL mechanism, standard library only: greeting, READY, and the
# first command the worker answers with: READY (accepted) or ERROR (refused)
ZMTP_CLIENT = textwrap.dedent("""
    import socket, struct, sys
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(sys.argv[1])
    s.sendall(b"\\xff" + bytes(8) + b"\\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\\0")
              + b"\\0" + bytes(31))
    def prop(name, value):
        return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    body = b"\\x05READY" + prop(b"Socket-Type", b"DEALER") + prop(b"Identity", b"")
    s.sendall(bytes([0x04, len(body)]) + body)
    def take(n):
        data = b""
        while len(data) < n:
            more = s.recv(n - len(data))
            if not more:
                raise SystemExit("closed")
            data += more
        return data
    take(64)  # the worker's greeting
    flags, size = take(2)
    if flags & 0x02:
        size = struct.unpack(">Q", bytes([size]) + take(7))[0]
    command = take(size)
    print(command[1:1 + command[0]].decode())
""")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("switching to another user needs root and setpriv")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-I", *argv], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(60)
def test_another_user_cannot_handshake_with_a_users_ipc_worker() -> None:
    shared = Path(tempfile.mkdtemp(prefix="zmqsyft-shared-", dir="/tmp"))
    try:
        shared.chmod(0o777)  # bound where another user can reach the socket
        sock = shared / "bob.sock"
        # NULL mechanism (--insecure), so that only the uid check stands between them
        with cli_worker("--id", "bob", "--bind", f"ipc://{sock}", "--insecure") as worker:
            sock.chmod(0o777)
            theirs = as_nobody("-c", ZMTP_CLIENT, str(sock))
            assert theirs.returncode == 0, theirs.stderr
            assert theirs.stdout.strip() == "ERROR", theirs.stdout
            ours = subprocess.run([sys.executable, "-I", "-c", ZMTP_CLIENT, str(sock)],
                                  capture_output=True, text=True, timeout=30)
            assert ours.stdout.strip() == "READY", (ours.stdout, ours.stderr)
            with raw_dealer(worker) as caller:  # its own user is served as before
                caller.send_multipart(encode_message(Op.PING, 1, {}))
                assert next_reply(caller).op is Op.REPLY
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# a CURVE client with a fresh key of its own, knowing the worker's public key; prints how its
# handshake ended, and whether a reply came
CURVE_CLIENT = textwrap.dedent("""
    import sys, zmq
    from zmq.utils.monitor import recv_monitor_message
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    s.curve_serverkey = sys.argv[2].encode()
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    s.connect(sys.argv[1])
    s.send(sys.argv[3].encode("latin-1"))
    print("FAILED_AUTH" if mon.poll(20000) and recv_monitor_message(mon)["event"]
          == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "SUCCEEDED")
    print("REPLY" if s.poll(1000) else "NO REPLY")
    try:
        open(sys.argv[4]).read()
        print("READ THE SECRET")
    except PermissionError:
        print("SECRET UNREADABLE")
""")


@pytest.mark.timeout(60)
def test_another_user_cannot_use_a_users_loopback_tcp_worker() -> None:
    with cli_worker("--id", "bob", "--bind", "tcp://127.0.0.1:0") as worker:
        assert worker.client_keys is not None
        secret = next(Path(tempfile.gettempdir()).glob("zmqsyft-test-keys-*/test-client.key_secret"))
        ping = encode_message(Op.PING, 1, {})[0].decode("latin-1")
        python = os.path.join(sys.prefix, "bin", "python")  # (pyzmq: the test's environment)
        if os.getuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("switching to another user needs root and setpriv")
        nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python]
        probe = subprocess.run([*nobody, "-c", "import zmq"], capture_output=True, timeout=40,
                               stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            pytest.skip("the other user cannot run this environment's python with pyzmq "
                        "(it lives where only its owner may read)")
        theirs = subprocess.run(
            [*nobody, "-c", CURVE_CLIENT, worker.endpoint, worker.key, ping, str(secret)],
            capture_output=True, text=True, timeout=40, stdin=subprocess.DEVNULL)
        assert theirs.returncode == 0, theirs.stderr
        assert theirs.stdout.split("\n")[:3] == ["FAILED_AUTH", "NO REPLY", "SECRET UNREADABLE"], \
            theirs.stdout
        with raw_dealer(worker) as caller:  # the user's own key is served
            caller.send_multipart(encode_message(Op.PING, 2, {}))
            assert next_reply(caller).op is Op.REPLY
