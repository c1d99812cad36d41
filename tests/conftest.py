"""Fixtures: real worker processes over ipc (under a pytest temp dir) and tcp (127.0.0.1:0).

``bob``, ``alice`` and ``carol`` come from a pool kept for the session (one set per transport),
so that the suite does not pay a process start-up per test. After every test that used them,
the teardown drops the test's pointers and asserts that the workers' stores are empty again: the
whole suite doubles as a leak check. A worker that a test closed or killed, or that was left
dirty, is replaced. ``spawn`` makes fresh workers, for tests that kill or configure them.

Every worker is closed at the end and its process reaped (killed if it does not exit in time).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import zmqsyft as sy
from tests.helpers import configured
from zmqsyft import WorkerClient
from zmqsyft.wire.transport import ipc_endpoint


def _reap(workers: list[WorkerClient]) -> list[str]:
    """Close workers; return the names of any whose process would not exit."""
    stuck = []
    for worker in workers:
        worker.close()
    for worker in workers:
        proc = worker._proc
        if proc is not None and proc.poll() is None:  # pragma: no cover - close() failed
            proc.kill()
            proc.wait(timeout=10)
            stuck.append(worker.id)
    return stuck


@pytest.fixture(scope="session")
def hook() -> sy.TorchHook:
    return sy.TorchHook(torch)


@pytest.fixture(params=["ipc", "tcp"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _new_worker(name: str, transport_kind: str, directory: Path, **kwargs: object) -> WorkerClient:
    if transport_kind == "ipc":
        kwargs.setdefault("bind", ipc_endpoint(name, str(directory)))
    return sy.spawn_worker(name, transport_kind=transport_kind, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def _pool(tmp_path_factory: pytest.TempPathFactory, hook: sy.TorchHook) -> Iterator[dict]:
    pool: dict[tuple[str, str], WorkerClient] = {}
    pool_dir = tmp_path_factory.mktemp("pool")
    pool["dir"] = pool_dir  # type: ignore[index]
    yield pool
    stuck = _reap([w for k, w in pool.items() if k != "dir"])
    assert not stuck, f"workers {stuck} were still running after close()"


def _pooled(pool: dict, name: str, transport_kind: str) -> Iterator[WorkerClient]:
    key = (transport_kind, name)
    worker = pool.get(key)
    if worker is None or worker.closed or worker._exit_status() is not None:
        if worker is not None:
            _reap([worker])
        worker = pool[key] = _new_worker(name, transport_kind, pool["dir"])
    yield worker
    gc.collect()
    leaked: dict = {}
    try:
        if not worker.closed and worker._exit_status() is None:
            leaked = worker._snapshot()
    except sy.ZmqSyftError:
        leaked = {"unreachable": True}
    if leaked:
        del pool[key]
        _reap([worker])
        pytest.fail(f"the test left objects on {name}: {leaked}")


@pytest.fixture
def bob(_pool: dict, transport_kind: str) -> Iterator[WorkerClient]:
    yield from _pooled(_pool, "bob", transport_kind)


@pytest.fixture
def alice(_pool: dict, transport_kind: str) -> Iterator[WorkerClient]:
    yield from _pooled(_pool, "alice", transport_kind)


@pytest.fixture
def carol(_pool: dict, transport_kind: str) -> Iterator[WorkerClient]:
    yield from _pooled(_pool, "carol", transport_kind)


@pytest.fixture
def spawn(transport_kind: str, tmp_path: Path, hook: sy.TorchHook) -> Iterator[Callable[..., WorkerClient]]:
    """A factory of fresh workers on this test's transport, closed and reaped afterwards."""
    made: list[WorkerClient] = []

    def factory(name: str, **kwargs: object) -> WorkerClient:
        worker = _new_worker(name, transport_kind, tmp_path, **kwargs)
        made.append(worker)
        return worker

    yield factory
    gc.collect()
    stuck = _reap(made)
    assert not stuck, f"workers {stuck} were still running after close()"


@pytest.fixture
def restore_config() -> Iterator[None]:
    """The process-wide config as it was before the test, whatever the test configures (for the
    tests of ``configure()`` itself; elsewhere use ``with configured(...)``)."""
    with configured():
        yield
