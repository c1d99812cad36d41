"""A worker's limits set on its command line, as an operator starts one from the shell: each flag
takes effect, each refusal names its limit, and a value that does not parse stops the worker
with a clear message before it binds anything."""

from __future__ import annotations

import pytest
import torch

import zmqsyft as sy
from tests.helpers import cli_worker, run_cli


@pytest.mark.timeout(60)
def test_limits_given_as_flags_are_enforced(hook: sy.TorchHook) -> None:
    with cli_worker("--id", "bob", "--max-store-bytes", "16MiB", "--max-op-flops", "1e9") as worker:
        bob = worker.connect()
        try:
            small = torch.ones(1 << 20).send(bob)  # 4 MiB
            with pytest.raises(sy.LimitExceeded, match="max_connection_bytes") as info:
                torch.ones(3 << 20).send(bob)  # 12 MiB: past the 8 MiB a connection may hold
            assert "8.0 MiB" in str(info.value)
            big = torch.rand(1000, 1000).send(bob)
            with pytest.raises(sy.LimitExceeded, match="max_op_flops"):
                big.matmul(big).get()  # 2e9 flops
            assert small.sum().get().item() == float(1 << 20)
        finally:
            bob.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max-frames", "many", "not a whole number"),
    ("--max-store-bytes", "1.5", "not a whole number"),
    ("--max-connections", "0", "max_connections must be >= 1"),
    ("--max-op-flops", "-1", "max_op_flops must be >= 0"),
])
def test_a_bad_limit_stops_the_worker_with_a_clear_message(flag: str, value: str, says: str) -> None:
    result = run_cli("worker", "--id", "bob", flag, value)
    assert result.returncode == 2, result
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
