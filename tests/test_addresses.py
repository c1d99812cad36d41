"""Endpoints are checked before anything uses them (zmqsyft.config.check_endpoint): connect(),
spawn_worker(bind=...) and ``zmqsyft worker --bind`` say what was expected, and what was
probably meant, instead of a bare ``ZMQError: Invalid argument`` or a misleading refusal."""

from __future__ import annotations

import pytest

import zmqsyft as sy
from tests.helpers import run_cli
from zmqsyft.config import IPC_PATH_MAX, check_endpoint

LONG_IPC = "ipc:///tmp/" + "d" * 120 + "/bob.sock"

# (address, what the message must say)
FOR_CONNECT = [
    ("127.0.0.1:5555", "did you mean tcp://127.0.0.1:5555?"),
    ("localhost:80", "did you mean tcp://localhost:80?"),
    ("/tmp/bob.sock", "did you mean ipc:///tmp/bob.sock?"),
    ("bob", "expected tcp://HOST:PORT"),
    ("udp://127.0.0.1:5555", "not udp://"),
    ("http://127.0.0.1:5555", "did you mean tcp://127.0.0.1:5555?"),
    ("tcp://127.0.0.1", "needs a host and a port"),
    ("tcp://127.0.0.1:65536", "from 1 to 65535"),
    ("tcp://127.0.0.1:http", "from 1 to 65535"),
    ("tcp://127.0.0.1:0", "port 0 (any free port) is for binding"),
    ("tcp://*:5555", "did you mean tcp://127.0.0.1:5555?"),
    ("ipc://", "needs a path"),
    (LONG_IPC, f"limited to {IPC_PATH_MAX} bytes"),
]


@pytest.mark.parametrize(("address", "says"), FOR_CONNECT)
def test_connect_says_what_was_expected(address: str, says: str) -> None:
    with pytest.raises(sy.AddressError) as info:
        sy.connect(address, worker_key="x" * 40, timeout=5)
    assert isinstance(info.value, ValueError)
    assert says in str(info.value) and "connect()" in str(info.value), info.value


def test_what_a_bind_may_use_and_a_connect_may_not() -> None:
    for address in ("tcp://*:5555", "tcp://127.0.0.1:0", "tcp://[::1]:0", "tcp://lo:0",
                    "ipc:///tmp/x.sock", "ipc://@abstract"):
        assert check_endpoint(address, "--bind", bind=True) == address
    for address in ("tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://worker-3.lan:5555",
                    "ipc:///tmp/x.sock", "ipc://" + "/" + "p" * (IPC_PATH_MAX - 1)):
        assert check_endpoint(address, "connect()") == address
    with pytest.raises(sy.AddressError, match="limited to 107 bytes"):
        check_endpoint("ipc://" + "/" + "p" * IPC_PATH_MAX, "connect()")
    with pytest.raises(sy.AddressError, match="a string, not int"):
        check_endpoint(5555, "connect()")


def test_spawn_worker_checks_its_bind_before_starting_anything(hook: sy.TorchHook) -> None:
    with pytest.raises(sy.AddressError, match=r"did you mean tcp://127\.0\.0\.1:5555\?"):
        sy.spawn_worker("bob", bind="127.0.0.1:5555")
    with pytest.raises(sy.AddressError, match="limited to 107 bytes"):
        sy.spawn_worker("bob", bind=LONG_IPC)


@pytest.mark.parametrize(("bind", "says"), [
    ("127.0.0.1:5555", "did you mean tcp://127.0.0.1:5555?"),
    ("tcp://127.0.0.1:70000", "from 0 to 65535"),
    ("udp://127.0.0.1:5555", "not udp://"),
    (LONG_IPC, "limited to 107 bytes"),
])
@pytest.mark.parametrize("insecure", [False, True])
def test_the_cli_says_what_a_bind_should_be(bind: str, says: str, insecure: bool) -> None:
    proc = run_cli("worker", "--id", "dave", "--bind", bind, *(["--insecure"] if insecure else []))
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "--bind" in proc.stderr, proc.stderr
    assert "refusing to bind" not in proc.stderr and "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout
