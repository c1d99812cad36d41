"""A worker's C heap keeps freed memory for its next tensors (``Config.malloc_keep``,
``zmqsyft.heap``), up to a bound; ``malloc_keep=0`` leaves glibc's defaults, which give every
freed large buffer back at once (and the next one costs a page fault per page)."""

from __future__ import annotations

import platform
import textwrap
import time

import psutil
import pytest
import torch

import zmqsyft as sy
from tests.helpers import configured, run_script

pytestmark = [pytest.mark.usefixtures("hook"),
              pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")]

MIB = 1 << 20


def _rss_given_back(keep: int) -> tuple[float, float]:
    """(MiB the worker's RSS grew by receiving 24 MiB through its socket, MiB it fell when the
    tensor was deleted), for a worker started with ``malloc_keep=keep``."""
    with configured(malloc_keep=keep, shm_threshold=0):  # (the bytes come in a ZeroMQ frame)
        w = sy.spawn_worker(f"heap{keep}-{time.monotonic_ns() % 10**6}")
        try:
            return _received_and_freed(w)
        finally:
            w.close()
            assert w._proc is not None
            w._proc.wait(timeout=30)


def _received_and_freed(w: sy.WorkerClient) -> tuple[float, float]:
    proc = psutil.Process(w.pid)
    w.ping()
    before = proc.memory_info().rss
    x = torch.ones(6 * MIB).send(w)  # 24 MiB, received into one malloc'd buffer
    w.ping()
    grown = proc.memory_info().rss
    del x
    sy.sync()
    w.ping()
    after = proc.memory_info().rss
    return (grown - before) / MIB, (grown - after) / MIB


@pytest.mark.timeout(120)
def test_a_worker_keeps_a_freed_tensors_memory_for_the_next_one() -> None:
    grown, fell = _rss_given_back(64 * MIB)
    assert grown >= 20, grown
    assert fell < 8, f"the worker gave {fell:.1f} MiB back at once"


@pytest.mark.timeout(120)
def test_malloc_keep_0_gives_a_freed_tensors_memory_back_at_once() -> None:
    grown, fell = _rss_given_back(0)
    assert grown >= 20, grown
    assert fell >= 20, f"the worker gave only {fell:.1f} MiB back"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keep", ["default", "0"])
def test_the_torch_hook_lets_the_client_keep_freed_memory(keep: str) -> None:
    """``sy.TorchHook(torch)`` does for the client what a worker does at its start (a model's
    deep copy per data owner and round reuses pages); ``ZMQSYFT_MALLOC_KEEP=0`` opts out."""
    script = textwrap.dedent("""
        import psutil, torch, zmqsyft as sy
        sy.TorchHook(torch)
        me = psutil.Process()
        before = me.memory_info().rss
        x = torch.ones(6 << 20)  # 24 MiB
        grown = me.memory_info().rss
        del x
        print((grown - before) >> 20, (grown - me.memory_info().rss) >> 20, flush=True)
    """)
    env = {} if keep == "default" else {"ZMQSYFT_MALLOC_KEEP": keep}
    result = run_script("-c", script, env=env)
    assert result.returncode == 0, result.stderr
    grown, fell = map(int, result.stdout.split())
    assert grown >= 20, result.stdout
    if keep == "default":
        assert fell < 8, f"the client gave {fell} MiB back at once"
    else:
        assert fell >= 20, f"the client gave only {fell} MiB back"
