"""A worker says what it does on stderr (``--log-level``, or ``ZMQSYFT_LOG_LEVEL`` for spawned
workers): at info its start (id, address, key), each connection accepted, refused and closed
(its principal), peer links made, and its shutdown; at debug every request too; at warning
none of that."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import torch

import zmqsyft as sy
from tests.helpers import CliWorker, allow, cli_worker, run_cli

pytestmark = pytest.mark.timeout(120)

INFO = {
    "started": r"INFO .*worker dora: started, pid \d+, listening on tcp://127\.0\.0\.1:\d+, key ",
    "accepted": r"INFO .*worker dora: accepted a CURVE connection from 127\.0\.0\.1 "
                r"\(test-client, key .{8}\.\.\.",
    "link": r"INFO .*worker dora: linked to the worker at tcp://127\.0\.0\.1:\d+",
    "closed": r"INFO .*worker dora: a connection of test-client closed",
    "refused": r"worker dora: refused a connection \(an unknown key",
    "shutdown": r"INFO .*worker dora: shut down",
}


def _wait_for(worker: CliWorker, pattern: str, within: float = 30.0) -> None:
    """Until ``pattern`` shows in the worker's stderr (the worker must keep running)."""
    deadline = time.monotonic() + within
    while not re.search(pattern, worker.stderr()):
        assert time.monotonic() < deadline, f"no {pattern!r} within {within}s:\n{worker.stderr()}"
        with pytest.raises(subprocess.TimeoutExpired):  # (a pause that ends if the worker dies)
            worker.proc.wait(timeout=0.05)


@pytest.mark.parametrize("level", ["info", "debug", "warning"])
def test_a_cli_worker_logs_what_it_does_at_its_level(level: str, hook: sy.TorchHook) -> None:
    with cli_worker("--id", "eve", "--log-level", level) as eve, \
            cli_worker("--id", "dora", "--log-level", level) as dora:
        keys = dora.client_keys
        assert keys is not None
        # dora may link to eve: each is told the other's key (by its admin: ALLOW), and eve
        # the key this process uses with dora (the moved tensor is stored for it)
        e = eve.connect()
        d = dora.connect()
        allow(e, "dora", d.key)
        allow(d, "eve", e.key)
        allow(e, "client", keys.public.decode("ascii"))
        x = torch.tensor([1.0, 2.0]).send(d)
        y = (x + x).move(e)  # dora links to eve (what it moved is this process's via dora's key)
        assert y.location is e
        del x, y
        d.close()  # the connection ends
        if level != "warning":
            _wait_for(dora, INFO["closed"])
        with pytest.raises(sy.ZmqSyftError):  # an unknown key: refused
            sy.connect(dora.endpoint, worker_key=dora.key, keys=sy.KeyPair.fresh(), timeout=3)
        if level != "warning":
            _wait_for(dora, INFO["refused"])
        dora.proc.terminate()  # (SIGTERM: it shuts down)
        assert dora.proc.wait(timeout=30) == 0
        e.close()
        text = dora.stderr()
    if level == "warning":
        assert " INFO " not in text and " DEBUG " not in text, text
        return
    for what, pattern in INFO.items():
        assert re.search(pattern, text), f"no {what} line:\n{text}"
    requests = re.findall(r"DEBUG .*worker dora: (\w+) \d+ from test-client", text)
    if level == "debug":
        assert {"HELLO", "PUT", "CALL", "MOVE"} <= set(requests), text
    else:
        assert not requests and " DEBUG " not in text, text


def test_a_spawned_worker_takes_its_level_from_the_environment(
        hook: sy.TorchHook, capfd: pytest.CaptureFixture[str]) -> None:
    bob = sy.spawn_worker("bob", transport_kind="tcp", env={"ZMQSYFT_LOG_LEVEL": "info"})
    try:
        assert torch.equal(torch.ones(2).send(bob).get(), torch.ones(2))
    finally:
        bob.close()
    err = capfd.readouterr().err
    assert re.search(r"INFO worker\[bob\] .*worker bob: started", err), err
    assert re.search(r"INFO worker\[bob\] .*worker bob: shut down", err), err


def test_an_unknown_log_level_is_refused_saying_which_there_are() -> None:
    proc = run_cli("worker", "--id", "dave", "--log-level", "chatty")
    assert proc.returncode == 2 and "debug, info, warning, error" in proc.stderr, proc.stderr
