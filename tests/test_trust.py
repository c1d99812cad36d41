"""Pickled payloads (user functions, modules) only reach workers that trust the sender."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from torch import nn

import zmqsyft as sy
from tests.helpers import cli_worker, run_script


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
        carol = sy.connect(worker.endpoint)
        with pytest.raises(sy.UntrustedPayload, match="--trust-token") as info:
            carol.run(lambda m: m.weight.sum(), nn.Linear(2, 1))
        assert "carol" in str(info.value)
        # tensors and pointers need no trust; the worker is fine
        p = torch.tensor([1.0, 2.0]).send(carol)
        assert torch.equal((p * 3).get(), torch.tensor([3.0, 6.0]))
        assert carol.stats()["counters"]["refused_untrusted"] == 1
        carol.close()


def test_shell_worker_with_a_trust_token() -> None:
    with cli_worker("--id", "dave", "--bind", "tcp://127.0.0.1:0",
                    "--trust-token", "s3cret-token") as worker:
        address = worker.endpoint
        wrong = sy.connect(address, trust_token="not-it")
        with pytest.raises(sy.UntrustedPayload):
            wrong.run(len, [1, 2, 3])
        dave = sy.connect(address, trust_token="s3cret-token")
        assert dave.run(len, [1, 2, 3]) == 3
        dave.close()


def test_another_program_cannot_send_pickle_to_my_spawned_worker(bob: sy.WorkerClient) -> None:
    script = textwrap.dedent(f"""
        import torch, zmqsyft as sy
        bob = sy.connect({bob.address!r})
        try:
            bob.run(print, "pwned")
        except sy.UntrustedPayload:
            print("refused")
    """)
    result = run_script("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
