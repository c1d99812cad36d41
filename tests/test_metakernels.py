"""Shape and cost inference on ``meta`` tensors without TorchDynamo (``zmqsyft.metakernels``).

torch's meta kernels for elementwise ops import ``torch._dynamo`` on their first call (0.75 s of
CPU and about 70 MiB per process, and 0.75 s of every cold fork server's start). Workers,
forked or not, the fork server and clients compute the same results without ever importing it.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator

import pytest
import torch

import zmqsyft as sy
from tests.helpers import configured, run_script

pytestmark = pytest.mark.usefixtures("hook")


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in __import__("sys").modules


def _ops(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """Elementwise, reducing and matrix ops whose meta kernels are torch's Python references."""
    y = ((x * 2 + 1).exp().sigmoid() - x / 3).relu()
    return [y, y.mean(), (x > 0.5).float(), torch.where(x > 0, x, -x), x.clamp(0.1, 0.9).sqrt(),
            torch.nn.functional.softmax(x, dim=1), (x @ w).tanh(), torch.cat([x, y]).sum(0)]


@pytest.fixture(params=[True, False], ids=["forked", "new-interpreter"])
def worker(request: pytest.FixtureRequest) -> Iterator[sy.WorkerClient]:
    with configured(forkserver=request.param):
        w = sy.spawn_worker(f"meta{time.monotonic_ns() % 10**6}")
    try:
        yield w
    finally:
        w.close()
        assert w._proc is not None
        w._proc.wait(timeout=30)


def test_a_worker_estimates_elementwise_ops_without_importing_dynamo(
        worker: sy.WorkerClient) -> None:
    """Every op's cost is estimated on meta tensors before it runs; the results are right and
    ``torch._dynamo`` was never imported, neither by this worker nor by a fork server before it."""
    torch.manual_seed(0)
    x, w = torch.rand(5, 4), torch.rand(4, 3)
    got = [p.get() for p in _ops(x.send(worker), w.send(worker))]
    for mine, theirs in zip(_ops(x, w), got, strict=True):
        assert torch.allclose(mine, theirs)
    model = torch.nn.Linear(4, 2).send(worker)
    loss = ((model(x.send(worker)) - 1) ** 2).mean()
    loss.backward()
    assert model.weight.grad.get().shape == (2, 4)
    assert worker.run(_dynamo_loaded) is False


def test_a_client_infers_shapes_without_importing_dynamo() -> None:
    """A client's TorchHook warms up its meta kernels in the background, and its pipelined
    pointers' shapes are inferred on them: all without ``torch._dynamo``."""
    script = textwrap.dedent("""
        import sys, threading, torch, zmqsyft as sy
        sy.TorchHook(torch)
        for t in threading.enumerate():
            if t.name == "zmqsyft-warm-up":
                t.join()
        bob = sy.spawn_worker("metaclient")
        x = torch.rand(5, 4).send(bob)
        y = ((x * 2 + 1).exp().sigmoid() - x / 3).relu().mean(0)
        print(tuple(y.shape), y.get().shape == (4,), "torch._dynamo" in sys.modules, flush=True)
        bob.close()
    """)
    result = run_script("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(4,)", "True", "False"], result.stdout


def test_spare_dynamo_once_and_torch_compile_afterwards_still_works() -> None:
    """The wrappers are told once per process (a second call and a fork do nothing), a meta op
    then imports nothing more, and a process that imports TorchDynamo later still compiles and
    gets the eager result."""
    script = textwrap.dedent("""
        import sys, torch
        from zmqsyft import metakernels
        told = metakernels.spare_dynamo()
        again = metakernels.spare_dynamo()
        m = torch.ones(2, 3, device="meta")
        shape = tuple((torch.add(m, m) * 2).exp().shape)
        loaded = "torch._dynamo" in sys.modules
        f = torch.compile(lambda a: (a * 2 + 1).sigmoid(), backend="eager")
        x = torch.rand(3)
        same = torch.equal(f(x), (x * 2 + 1).sigmoid())
        print(told > 100, again, shape, loaded, same, flush=True)
    """)
    result = run_script("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "0", "(2,", "3)", "False", "True"], result.stdout

