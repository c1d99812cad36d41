"""zmqsyft's pytest plugin: real worker processes as fixtures, for other projects' test suites.

Installed with zmqsyft (the ``pytest11`` entry point ``zmqsyft``; a package of its own beside
``zmqsyft``, so that loading it does not import zmqsyft and torch), so any suite in an
environment where zmqsyft is installed has these fixtures without a ``conftest.py``:

``zmqsyft_worker``
    One fresh worker process (named ``worker``) for the test, closed and reaped after it.
``zmqsyft_workers``
    A factory of fresh, named workers for the test: ``bob, alice = zmqsyft_workers("bob",
    "alice")`` (keyword arguments go to :func:`zmqsyft.spawn_worker`: ``load=``, ``policy=``,
    ``env=``, ...). All are closed and reaped after the test.
``zmqsyft_pool``
    Named workers kept for the whole session, so that a suite pays a process start-up once per
    name rather than once per test: ``bob, alice = zmqsyft_pool("bob", "alice")``. After each
    test the pointers it dropped are collected and every pooled worker it used must hold no
    object any more: a test that leaves objects behind fails, naming them, and that worker is
    replaced by a fresh one (so the next test starts clean). A pooled worker a test closed or
    killed is replaced too.
``zmqsyft_hook``
    The session's ``TorchHook`` (every fixture above makes sure it exists).

Settings, on the command line or in ``pytest.ini`` / ``[tool.pytest.ini_options]``:

================================  ========================  ==================================
command line                      ini                       what
================================  ========================  ==================================
``--zmqsyft-transport ipc|tcp``   ``zmqsyft_transport``     how workers listen (default ipc)
``--zmqsyft-timeout SECONDS``     ``zmqsyft_timeout``       reply timeout (``Config.timeout``)
``--zmqsyft-no-leak-check``       ``zmqsyft_leak_check``    the pool's empty-store check (on)
================================  ========================  ==================================

Every worker any of these fixtures started is closed when its test (or, for the pool, the
session) ends, and reaped: killed if it does not exit within ``Config.close_timeout``. That
holds when a test fails, when the run is interrupted (Ctrl-C: pytest's session end reaps what is
left) and, since every spawned worker dies with its parent process, even when pytest itself is
killed.

zmqsyft (and so torch) is imported only when a test uses one of the fixtures: installing
zmqsyft costs other suites nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from zmqsyft import TorchHook, WorkerClient

__all__ = ["Workers", "Pool"]

_TRANSPORTS = ("ipc", "tcp")
_STARTED: list[Any] = []  # every worker the fixtures started in this process, until reaped


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zmqsyft", "zmqsyft worker fixtures")
    group.addoption("--zmqsyft-transport", choices=_TRANSPORTS, default=None,
                    help="how the fixtures' workers listen: ipc (a private Unix socket, the "
                         "default) or tcp (127.0.0.1, a free port)")
    group.addoption("--zmqsyft-timeout", type=float, default=None, metavar="SECONDS",
                    help="seconds to wait for a worker's reply (zmqsyft's Config.timeout)")
    group.addoption("--zmqsyft-no-leak-check", action="store_true", default=False,
                    help="do not fail tests that leave objects on pooled workers")
    parser.addini("zmqsyft_transport", "ipc or tcp: how the fixtures' workers listen", default="")
    parser.addini("zmqsyft_timeout", "seconds to wait for a worker's reply", default="")
    parser.addini("zmqsyft_leak_check", "fail tests that leave objects on pooled workers",
                  type="bool", default=True)


def _setting(config: pytest.Config, option: str, ini: str) -> Any:
    value = config.getoption(option)
    return value if value is not None else (config.getini(ini) or None)


def pytest_configure(config: pytest.Config) -> None:
    transport = _setting(config, "zmqsyft_transport", "zmqsyft_transport") or "ipc"
    if transport not in _TRANSPORTS:
        raise pytest.UsageError(f"zmqsyft_transport = {transport!r} (pytest.ini): use one of "
                                f"{', '.join(_TRANSPORTS)}")
    timeout = _setting(config, "zmqsyft_timeout", "zmqsyft_timeout")
    if timeout is not None:
        try:
            timeout = float(timeout)
        except ValueError:
            timeout = -1.0
        if not timeout > 0:
            raise pytest.UsageError(f"zmqsyft_timeout = {timeout!r}: a number of seconds > 0")
    config.stash[_SETTINGS] = (transport, timeout)


_SETTINGS = pytest.StashKey[tuple[str, float | None]]()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run is over (finished, failed or interrupted): reap every worker still running."""
    _reap(list(_STARTED))


def _reap(workers: list[Any]) -> list[str]:
    """Close ``workers`` and make sure their processes are gone; the names of any that had to
    be killed."""
    stuck = []
    for worker in workers:
        try:
            worker.close()  # (waits Config.close_timeout, then kills)
        except Exception:  # noqa: BLE001 - reaping goes on
            pass
    for worker in workers:
        proc = getattr(worker, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
            stuck.append(worker.id)
        if worker in _STARTED:
            _STARTED.remove(worker)
    return stuck


def _spawn(settings: tuple[str, float | None], name: str, **kwargs: Any) -> WorkerClient:
    import zmqsyft as sy

    transport, timeout = settings
    if timeout is not None and "config" not in kwargs:
        from dataclasses import replace

        kwargs["config"] = replace(sy.get_config(), timeout=timeout)
    kwargs.setdefault("transport_kind", transport)
    worker = sy.spawn_worker(name, **kwargs)
    _STARTED.append(worker)
    return worker


@pytest.fixture(scope="session")
def zmqsyft_hook(pytestconfig: pytest.Config) -> TorchHook:
    """The session's ``TorchHook`` (``tensor.send(worker)`` and friends); with
    ``--zmqsyft-timeout``, the process-wide reply timeout is set too."""
    import torch

    import zmqsyft as sy

    _, timeout = pytestconfig.stash[_SETTINGS]
    if timeout is not None:
        sy.configure(timeout=timeout)
    return sy.TorchHook(torch)


class Workers:
    """The ``zmqsyft_workers`` fixture: ``workers("bob", "alice", **spawn_kwargs)`` starts fresh
    workers (one per name; a tuple for several names, the worker itself for one)."""

    def __init__(self, settings: tuple[str, float | None]) -> None:
        self._settings = settings
        self.started: list[WorkerClient] = []

    def __call__(self, *names: str, **kwargs: Any) -> Any:
        if not names:
            raise TypeError("zmqsyft_workers(): name at least one worker, e.g. "
                            "zmqsyft_workers('bob', 'alice')")
        made = []
        for name in names:
            worker = _spawn(self._settings, name, **kwargs)
            self.started.append(worker)
            made.append(worker)
        return made[0] if len(made) == 1 else tuple(made)


@pytest.fixture
def zmqsyft_workers(zmqsyft_hook: TorchHook, pytestconfig: pytest.Config) -> Iterator[Workers]:
    """A factory of fresh, named worker processes for this test, reaped after it."""
    workers = Workers(pytestconfig.stash[_SETTINGS])
    yield workers
    gc.collect()  # (the test's pointers free their objects before the workers go)
    stuck = _reap(workers.started)
    assert not stuck, f"zmqsyft: workers {stuck} did not exit when closed and were killed"


@pytest.fixture
def zmqsyft_worker(zmqsyft_workers: Workers) -> WorkerClient:
    """One fresh worker process, named ``worker``, for this test."""
    worker: WorkerClient = zmqsyft_workers("worker")
    return worker


class Pool:
    """The ``zmqsyft_pool`` fixture: ``pool("bob", "alice")`` gives the session's workers of those
    names, started at their first use; see the module's docs for the check after each test."""

    def __init__(self, settings: tuple[str, float | None]) -> None:
        self._settings = settings
        self.workers: dict[str, WorkerClient] = {}
        self.used: set[str] = set()

    def __call__(self, *names: str) -> Any:
        if not names:
            raise TypeError("zmqsyft_pool(): name at least one worker, e.g. "
                            "zmqsyft_pool('bob', 'alice')")
        got = [self._get(name) for name in names]
        return got[0] if len(got) == 1 else tuple(got)

    def _get(self, name: str) -> WorkerClient:
        worker = self.workers.get(name)
        if worker is None or worker.closed or worker._exit_status() is not None:
            if worker is not None:
                _reap([worker])
            worker = self.workers[name] = _spawn(self._settings, name)
        self.used.add(name)
        return worker

    def leftovers(self) -> dict[str, Any]:
        """What the workers used since the last call hold (name -> objects), after collecting
        the test's dropped pointers; the dirty ones are replaced at their next use."""
        import zmqsyft as sy

        gc.collect()
        left: dict[str, Any] = {}
        for name in sorted(self.used):
            worker = self.workers[name]
            if worker.closed or worker._exit_status() is not None:
                continue  # (closed or killed by the test: replaced at its next use)
            try:
                objects = worker._snapshot()
            except sy.ZmqSyftError as exc:
                objects = {"unreachable": f"{type(exc).__name__}: {exc}"}
            if objects:
                left[name] = objects
                del self.workers[name]
                _reap([worker])
        self.used.clear()
        return left


@pytest.fixture(scope="session")
def _zmqsyft_pool(zmqsyft_hook: TorchHook, pytestconfig: pytest.Config) -> Iterator[Pool]:
    pool = Pool(pytestconfig.stash[_SETTINGS])
    yield pool
    stuck = _reap(list(pool.workers.values()))
    assert not stuck, f"zmqsyft: pooled workers {stuck} did not exit when closed and were killed"


@pytest.fixture
def zmqsyft_pool(_zmqsyft_pool: Pool, pytestconfig: pytest.Config) -> Iterator[Pool]:
    """Named worker processes shared by the whole session; each test must leave them empty."""
    _zmqsyft_pool.used.clear()
    yield _zmqsyft_pool
    left = _zmqsyft_pool.leftovers()
    check = not pytestconfig.getoption("zmqsyft_no_leak_check") and pytestconfig.getini(
        "zmqsyft_leak_check")
    if left and check:
        described = "; ".join(f"{name}: {objects}" for name, objects in left.items())
        pytest.fail(f"zmqsyft: the test left objects on pooled workers ({described}). Free "
                    "them (.get() what you fetch, del what you no longer use) or use "
                    "zmqsyft_workers for fresh workers; those workers were replaced",
                    pytrace=False)

