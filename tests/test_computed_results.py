"""Large results computed on a worker leave it without a copy (issue 16, item 1).

A tensor computed on a worker (``x * 2``, ``(a + b) / 2``) is made in a shared-memory segment
when a caller on this machine uses shared memory with the worker, so that a move to a same-host
worker or a fetch by a same-host client maps that memory instead of copying it. What the tests
look at is where the memory is: the inode of the (unlinked) segment file behind a mapping, read
from ``/proc/<pid>/maps``. A hand-over maps the same file in the receiver; a copy is a new file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import zmqsyft as sy
from tests.helpers import run_script
from zmqsyft import WorkerClient
from zmqsyft.config import Config
from zmqsyft.wire import shm

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not shm.host_key(), reason="this machine has no usable /dev/shm")]

N = 1 << 20  # float32 elements: 4 MiB, above the 1 MiB default threshold


def _segments(pid: int, nbytes: int) -> set[int]:
    """Inodes of the shared-memory segments of at least ``nbytes`` that process ``pid`` maps."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and "/zmqsyft-" in fields[5] and "(deleted)" in fields[5]:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                if end - start >= nbytes:
                    found.add(int(fields[4]))
    return found


def test_a_computed_result_moves_and_is_fetched_by_handing_over_its_memory(
        bob: WorkerClient, alice: WorkerClient, hook: sy.TorchHook) -> None:
    x = torch.rand(N)
    ptr = x.send(bob)
    before = _segments(bob.pid, N * 4)
    doubled = ptr * 2
    sy.sync()
    made = _segments(bob.pid, N * 4) - before
    assert len(made) == 1, "the result was computed into a segment of its own"
    del ptr
    moved = doubled.move(alice)
    sy.sync()
    assert made <= _segments(alice.pid, N * 4), "alice maps bob's memory: no copy was made"
    back = moved.get()
    assert made <= _segments(os.getpid(), N * 4), "this process maps the same memory too"
    assert torch.equal(back, x * 2)
    back.add_(1)  # ordinary, writable memory here
    assert torch.equal(back, x * 2 + 1)


def test_an_average_on_an_aggregator_is_fetched_without_a_copy(
        bob: WorkerClient, alice: WorkerClient, hook: sy.TorchHook) -> None:
    a, b = torch.rand(N), torch.rand(N)
    on_bob, on_alice = a.send(bob), b.send(alice)
    update = on_alice.move(bob)
    average = (on_bob + update) / 2
    sy.sync()
    made = _segments(bob.pid, N * 4)
    result = average.get()
    assert torch.allclose(result, (a + b) / 2)
    assert made & _segments(os.getpid(), N * 4), "the average came as bob's own memory"


def test_results_are_the_same_with_and_without_shared_memory(
        spawn: Callable[..., WorkerClient], hook: sy.TorchHook) -> None:
    """Every kind of op (one that takes ``out=``, one that does not, integer and mixed dtypes,
    matmul, a reduction, autograd) gives what torch gives here, on a worker that computes into
    shared memory and on one that does not."""
    on, off = spawn("bob"), spawn("carol", config=Config(shm_threshold=0))
    x = torch.rand(N)
    i = torch.arange(N, dtype=torch.int32)
    m = torch.rand(1024, 1024)
    w = torch.rand(N, requires_grad=True)
    cases: list[tuple[str, Callable[..., torch.Tensor]]] = [
        ("mul", lambda t, k, mm, g: t * 2), ("add", lambda t, k, mm, g: t + t),
        ("div", lambda t, k, mm, g: t / 3), ("int+float", lambda t, k, mm, g: k + 0.5),
        ("int*int", lambda t, k, mm, g: k * 3), ("clone", lambda t, k, mm, g: t.clone()),
        ("matmul", lambda t, k, mm, g: mm @ mm), ("exp", lambda t, k, mm, g: t.exp()),
        ("where", lambda t, k, mm, g: torch.where(t > 0.5, t, -t)),
        ("sum-dim", lambda t, k, mm, g: mm.sum(0)), ("grad", lambda t, k, mm, g: g * 2),
        ("reshape", lambda t, k, mm, g: t.reshape(1024, 1024)), ("twice", lambda t, k, mm, g: t * 2),
    ]
    for worker in (on, off):
        remote = [v.send(worker) for v in (x, i, m, w)]
        for what, op in cases:
            expected = op(x, i, m, w)
            got = op(*remote).get()
            assert got.dtype == expected.dtype and got.shape == expected.shape, (what, worker.id)
            assert torch.equal(got, expected.detach()), (what, worker.id)
        del remote


def test_an_op_that_takes_no_out_argument_still_runs(bob: WorkerClient, hook: sy.TorchHook) -> None:
    x = torch.rand(N)
    ptr = x.send(bob)
    for _ in range(3):  # (learned once: the next calls go straight to the plain op)
        assert torch.equal(ptr.clone().get(), x)
        assert torch.equal(torch.nn.functional.relu(ptr - 0.5).get(), torch.relu(x - 0.5))


# ------------------------------------------------------------------ a full /dev/shm
@pytest.fixture
def tiny_shm() -> Iterator[Path]:
    """A 3 MiB tmpfs of our own (as /dev/shm for the processes given it): room for one
    2 MiB tensor, not for a 4 MiB result."""
    path = Path(tempfile.mkdtemp(prefix="zmqsyft-tinyshm-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=1777", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        shutil.rmtree(path)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_a_full_dev_shm_falls_back_to_ordinary_memory_and_the_worker_lives(tiny_shm: Path) -> None:
    script = textwrap.dedent(f"""
        import torch, zmqsyft as sy
        hook = sy.TorchHook(torch)
        with sy.spawn_worker("bob") as bob:
            x = torch.rand({N // 2})          # 2 MiB: sent through the tiny /dev/shm
            ptr = x.send(bob)
            y = torch.cat([ptr, ptr]) * 2     # 4 MiB results: no room for them there
            z = y + 1
            assert torch.equal(z.get(), torch.cat([x, x]) * 2 + 1)
            assert bob.stats()["counters"]["shm_bytes_in"] > 0, "shared memory was in use"
            print("ALIVE", bob.stats()["objects"])
    """)
    result = run_script("-c", script, env={"ZMQSYFT_SHM_DIR": str(tiny_shm)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ALIVE" in result.stdout


def test_a_trained_model_moves_and_comes_back_as_the_workers_memory(
        bob: WorkerClient, alice: WorkerClient, hook: sy.TorchHook) -> None:
    """Parameters after ``opt.step()`` (updated in place where they arrived), then
    ``model.move()`` and ``model.get()``: the weight is never copied on this machine."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # a 4 MiB weight
    reference = torch.nn.Linear(1024, 1024)
    reference.load_state_dict(model.state_dict())
    data, target = torch.rand(8, 1024), torch.rand(8, 1024)
    model.send(bob)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for net, x, y, o in ((model, data.send(bob), target.send(bob), opt),
                         (reference, data, target, torch.optim.SGD(reference.parameters(), lr=0.1))):
        o.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        o.step()
    sy.sync()
    weights = _segments(bob.pid, 1024 * 1024 * 4)
    assert weights, "the weight is in shared memory on bob"
    model.move(alice)
    sy.sync()
    assert weights & _segments(alice.pid, 1024 * 1024 * 4), "alice maps bob's weight: no copy"
    model.get()
    assert weights & _segments(os.getpid(), 1024 * 1024 * 4), "so does this process, after get()"
    assert torch.allclose(model.weight, reference.weight, atol=1e-6)
    assert torch.allclose(model.bias, reference.bias, atol=1e-6)


def test_a_result_freed_where_it_was_made_stops_taking_a_segment_until_one_leaves(
        spawn: Callable[..., WorkerClient], hook: sy.TorchHook) -> None:
    """An aggregator's ``torch.stack`` of the updates, freed right after its ``mean``, gains
    nothing from shared memory and pays for its fresh pages: after ``STAYED_LIMIT`` such
    results of the same op and shape in a row, the next one is made in ordinary memory, while
    the mean, fetched each round, stays in a segment. A stacked result that leaves again puts
    the stack back into shared memory. Every value is the same either way."""
    from zmqsyft.worker.results import STAYED_LIMIT

    agg = spawn("aggregator")
    a, b = torch.rand(N), torch.rand(N)
    pa, pb = a.send(agg), b.send(agg)

    def round_() -> tuple[set[int], set[int], torch.Tensor]:
        before = _segments(agg.pid, N * 4)
        stacked = torch.stack([pa, pb])
        sy.sync()
        stack_made = _segments(agg.pid, 2 * N * 4) - before
        mean = stacked.mean(0)
        del stacked  # (freed on the aggregator: it never left)
        sy.sync()
        mean_made = _segments(agg.pid, N * 4) - before - stack_made
        return stack_made, mean_made, mean.get()

    for r in range(STAYED_LIMIT):
        stack_made, mean_made, mean = round_()
        assert len(stack_made) == 1, f"round {r}: the stack is still made in a segment"
        assert len(mean_made) == 1 and torch.equal(mean, (a + b) / 2)
    for _ in range(2):
        stack_made, mean_made, mean = round_()
        assert stack_made == set(), "a stack freed every time is made in ordinary memory now"
        assert len(mean_made) == 1, "the mean, fetched every time, is still made in a segment"
        assert torch.equal(mean, (a + b) / 2)
    kept = torch.stack([pa, pb])  # this one leaves: the next ones are shared again
    assert torch.equal(kept.get(), torch.stack([a, b]))
    stack_made, _, mean = round_()
    assert len(stack_made) == 1, "once a stack left, stacks are made in segments again"
    assert torch.equal(mean, (a + b) / 2)
