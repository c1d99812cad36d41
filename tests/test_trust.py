"""Pickled payloads (user functions, modules) only reach workers that trust the sender."""

from __future__ import annotations

import copy
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import zmqsyft as sy
from tests.helpers import cli_worker, key_file, run_cli, run_script


def test_spawned_worker_trusts_its_parent_with_code_and_modules(bob: sy.WorkerClient) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    y = bob.run(lambda m, data: m(data), model, x.send(bob))
    assert isinstance(y, sy.PointerTensor) and y.location is bob
    assert torch.allclose(y.get(), model(x))

    init = nn.Linear(3, 1)  # seeded above: the same start here and on the worker

    def train(data: torch.Tensor, steps: int) -> float:  # a whole loop in one message
        m = copy.deepcopy(init)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(steps):
            opt.zero_grad()
            loss = (m(data) ** 2).mean()
            loss.backward()
            opt.step()
        return loss.item()

    expected = train(x, steps=3)
    got = bob.run(train, x.send(bob), steps=3)
    assert type(got) is float
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), (got, expected)
    assert expected < ((init(x) ** 2).mean().item()), "three SGD steps lowered the loss"


def test_shell_worker_trusts_nobody_and_keeps_serving() -> None:
    with cli_worker("--id", "carol", "--bind", "tcp://127.0.0.1:0") as worker:
        carol = worker.connect()
        with pytest.raises(sy.UntrustedPayload, match="--trust-token") as info:
            carol.run(lambda m: m.weight.sum(), nn.Linear(2, 1))
        assert "carol" in str(info.value)
        # tensors and pointers need no trust; the worker is fine
        p = torch.tensor([1.0, 2.0]).send(carol)
        assert torch.equal((p * 3).get(), torch.tensor([3.0, 6.0]))
        assert carol.stats()["counters"]["refused_untrusted"] == 1
        carol.close()


def token_file(tmp_path: Path, token: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.timeout(60)
def test_shell_worker_with_a_trust_token(tmp_path: Path) -> None:
    with cli_worker("--id", "dave", "--bind", "tcp://127.0.0.1:0",
                    "--trust-token-file", token_file(tmp_path, "s3cret-token")) as worker:
        with open(f"/proc/{worker.proc.pid}/cmdline", "rb") as f:
            assert b"s3cret-token" not in f.read()  # what every local user can read
        wrong = worker.connect(trust_token="not-it")
        with pytest.raises(sy.UntrustedPayload):
            wrong.run(len, [1, 2, 3])
        dave = worker.connect(trust_token="s3cret-token")
        assert dave.run(len, [1, 2, 3]) == 3
        dave.close()


def test_another_program_cannot_send_pickle_to_my_spawned_worker(bob: sy.WorkerClient,
                                                                tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import torch, zmqsyft as sy
        bob = sy.connect({bob.address!r}, worker_key={bob.key!r}, keys={key_file(tmp_path, bob)!r})
        try:
            bob.run(print, "pwned")
        except sy.UntrustedPayload:
            print("refused")
    """)
    result = run_script("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("args", "says"), [
    (("--trust-token", "s3cret-token"), "--trust-token-file"),
    (("--trust-token-file", "{loose}"), "chmod 600"),
    (("--trust-token-file", "{missing}"), "cannot read"),
])
def test_a_trust_token_others_could_read_stops_the_worker(tmp_path: Path, args: tuple, says: str) -> None:
    loose = token_file(tmp_path, "s3cret-token", mode=0o644)
    argv = [a.format(loose=loose, missing=tmp_path / "nope") for a in args]
    result = run_cli("worker", "--id", "dave", *argv)
    assert result.returncode == 2, result
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "s3cret-token" not in result.stderr


@pytest.mark.timeout(60)
def test_a_spawned_workers_token_is_in_neither_its_argv_nor_its_environment(bob: sy.WorkerClient) -> None:
    """Its parent hands it the token through a pipe: /proc/<pid>/cmdline (readable by every
    local user) and /proc/<pid>/environ do not hold it, nor does anything the worker starts."""
    token = bob.trust_token
    assert token
    for part in ("cmdline", "environ"):
        with open(f"/proc/{bob.pid}/{part}", "rb") as f:
            assert token.encode() not in f.read(), part
    assert bob.run(os.environ.get, "ZMQSYFT_TRUST_TOKEN") is None
    assert bob.run(len, [1, 2, 3]) == 3  # and it trusts its parent all the same
