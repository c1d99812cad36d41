"""``zmqsyft keys new NAME``: a CURVE key pair whose secret half only its owner can read, made
without following a planted link or overwriting anything, usable by ZeroMQ as it is."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from tests.helpers import run_cli
from zmqsyft.keys import load_public, load_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(120)  # (each runs the CLI, which imports torch: slow on a busy machine)
def test_keys_new_writes_a_pair_with_a_private_secret(tmp_path: Path) -> None:
    result = run_cli("keys", "new", "alice", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    public_file, secret_file = tmp_path / "alice.key", tmp_path / "alice.key_secret"
    assert (mode(public_file), mode(secret_file)) == (0o644, 0o600)
    public, secret = zmq.auth.load_certificate(str(secret_file))
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(str(public_file)) == (public, None)
    assert public.decode() in result.stdout and secret.decode() not in result.stdout
    assert load_secret(secret_file) == (public, secret) and load_public(public_file) == public


@pytest.mark.timeout(120)  # (each runs the CLI, which imports torch: slow on a busy machine)
def test_keys_are_never_overwritten_nor_written_through_a_link(tmp_path: Path) -> None:
    assert run_cli("keys", "new", "alice", "--dir", str(tmp_path)).returncode == 0
    before = (tmp_path / "alice.key_secret").read_text()
    again = run_cli("keys", "new", "alice", "--dir", str(tmp_path))
    assert again.returncode == 2 and "never overwritten" in again.stderr, again.stderr
    assert (tmp_path / "alice.key_secret").read_text() == before
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "bob.key_secret").symlink_to(victim)  # planted where bob's secret would go
    planted = run_cli("keys", "new", "bob", "--dir", str(tmp_path))
    assert planted.returncode == 2 and "Traceback" not in planted.stderr, planted.stderr
    assert victim.read_text() == "mine"
    bad = run_cli("keys", "new", "../escape", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "not a key name" in bad.stderr
    assert not (tmp_path.parent / "escape.key").exists()


@pytest.mark.timeout(120)  # (each runs the CLI, which imports torch: slow on a busy machine)
def test_a_secret_key_others_can_read_is_refused(tmp_path: Path) -> None:
    assert run_cli("keys", "new", "alice", "--dir", str(tmp_path)).returncode == 0
    secret_file = tmp_path / "alice.key_secret"
    with pytest.raises(ValueError, match="holds no secret key"):
        load_secret(tmp_path / "alice.key")
    secret_file.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        load_secret(secret_file)


@pytest.mark.timeout(120)  # (each runs the CLI, which imports torch: slow on a busy machine)
def test_the_keys_authenticate_and_encrypt_a_zeromq_connection(tmp_path: Path) -> None:
    for name in ("server", "client"):
        assert run_cli("keys", "new", name, "--dir", str(tmp_path)).returncode == 0
    server_public, server_secret = load_secret(tmp_path / "server.key_secret")
    client_public, client_secret = load_secret(tmp_path / "client.key_secret")
    ctx = zmq.Context()
    try:
        rep, req = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
        for sock in (rep, req):
            sock.linger = 0
        rep.curve_server, rep.curve_secretkey = True, server_secret
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        req.curve_serverkey = load_public(tmp_path / "server.key")
        req.curve_publickey, req.curve_secretkey = client_public, client_secret
        req.connect(f"tcp://127.0.0.1:{port}")
        req.send(b"hello")
        assert rep.poll(10_000), "no message over CURVE"
        assert rep.recv() == b"hello"
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(90)
def test_a_shell_worker_serves_the_keys_it_was_given_with_their_rights(tmp_path: Path) -> None:
    """``--keys DIR`` is the worker's own pair; ``--allow DIR`` lets keys in, nothing more;
    ``--admin`` may stop it; ``--trust`` may send code."""
    import torch
    from torch import nn

    import zmqsyft as sy
    from tests.helpers import cli_worker
    from zmqsyft.wire.bodies import Shutdown
    from zmqsyft.wire.messages import Op

    own, allowed = tmp_path / "own", tmp_path / "allowed"
    for name, where in (("bob", own), ("plain", allowed), ("boss", allowed), ("coder", allowed)):
        assert run_cli("keys", "new", name, "--dir", str(where)).returncode == 0
    missing = run_cli("worker", "--id", "nobody", "--keys", str(own))
    assert missing.returncode == 2 and "zmqsyft keys new nobody" in missing.stderr, missing.stderr
    sy.TorchHook(torch)
    with cli_worker("--id", "bob", "--keys", str(own), "--allow", str(allowed),
                    "--admin", str(allowed / "boss.key"), "--trust", str(allowed / "coder.key")) as worker:
        assert worker.key == load_public(own / "bob.key").decode()  # the pair it was given
        connect = lambda name: sy.connect(worker.endpoint, worker_key=own / "bob.key",  # noqa: E731
                                          keys=allowed / name)
        plain = connect("plain")
        p = torch.ones(2).send(plain)
        assert torch.equal((p + 1).get(), torch.full((2,), 2.0))
        with pytest.raises(sy.AccessDenied, match="admins"):  # (shutdown() itself hides errors)
            plain.session.conn(plain).request(Op.SHUTDOWN, Shutdown())
        with pytest.raises(sy.UntrustedPayload):
            plain.run(len, [1, 2])
        assert plain.stats()["counters"] == {}  # not an admin: its own share only
        plain.close()
        coder = connect("coder")
        assert coder.run(lambda m: m.weight.numel(), nn.Linear(2, 3)) == 6
        coder.close()
        stranger = tmp_path / "stranger"
        assert run_cli("keys", "new", "eve", "--dir", str(stranger)).returncode == 0
        with pytest.raises(sy.LimitExceeded, match="key"):
            sy.connect(worker.endpoint, worker_key=own / "bob.key", keys=stranger / "eve",
                       timeout=5.0)
        boss = connect("boss")
        assert "counters" in boss.stats() and boss.stats()["counters"]
        boss.shutdown()
        assert worker.proc.wait(timeout=30) == 0

