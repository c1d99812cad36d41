"""A dead or frozen worker is reported as WorkerUnavailable within seconds, never a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import zmqsyft as sy
from tests.helpers import assert_answers_ping, configured


def test_frozen_worker_is_detected_by_heartbeats(spawn) -> None:  # type: ignore[no-untyped-def]
    dave = spawn("dave")
    p = torch.ones(3).send(dave)
    os.kill(dave.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(sy.WorkerUnavailable, match="dave"):
            p.get()
        elapsed = time.monotonic() - start
        # three heartbeat intervals (1 s each by default), far below the 60 s request timeout
        assert elapsed < 8, elapsed
    finally:
        os.kill(dave.pid, signal.SIGCONT)


def test_killed_relay_target_fails_the_chain_fast(spawn) -> None:  # type: ignore[no-untyped-def]
    bob, alice = spawn("bob"), spawn("alice")
    p2p = torch.ones(2).send(bob).send(alice)
    bob._proc.kill()
    assert bob._proc.wait(timeout=30) == -signal.SIGKILL
    start = time.monotonic()
    with pytest.raises(sy.WorkerUnavailable):
        p2p.remote_get()  # alice asks dead bob
    assert time.monotonic() - start < 8
    assert_answers_ping(alice, within=1.0)  # alice is fine and serving


def test_closing_a_worker_that_was_never_used_ends_it_at_once(spawn) -> None:  # type: ignore[no-untyped-def]
    """A spawned worker nobody used has not reported ready, so no SHUTDOWN can reach it; it is
    terminated, not left for close_timeout and then killed."""
    with configured(close_timeout=30.0):
        erin = spawn("erin")
        start = time.monotonic()
        erin.close()
        elapsed = time.monotonic() - start
    assert erin._proc.poll() is not None, "the process still runs after close()"
    assert erin._proc.returncode != -signal.SIGKILL, "it was killed after waiting close_timeout"
    assert elapsed < 15, f"close() took {elapsed:.1f}s"
