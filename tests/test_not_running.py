"""A worker that does not answer is reported as what it is: a spawned process known to have
ended is "not running" (with its exit code or signal); one that may still run but cannot be
reached (frozen, cut off, on another host) is named with its address, not called dead."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
import torch

import zmqsyft as sy

pytestmark = pytest.mark.timeout(90)


def test_a_killed_worker_is_not_running_and_says_by_which_signal(
        spawn: Callable[..., sy.WorkerClient]) -> None:
    dave = spawn("dave")
    p = torch.ones(3).send(dave)
    sy.sync()
    assert dave._proc is not None
    dave._proc.kill()
    assert dave._proc.wait(timeout=30) == -signal.SIGKILL
    with pytest.raises(sy.WorkerUnavailable) as info:
        p.get()
    assert "worker 'dave' is not running" in str(info.value)
    assert "killed by signal SIGKILL" in str(info.value), info.value


def test_a_frozen_worker_could_not_be_reached_and_is_not_called_dead(
        spawn: Callable[..., sy.WorkerClient]) -> None:
    dave = spawn("dave")
    p = torch.ones(3).send(dave)
    sy.sync()
    assert dave.pid is not None
    os.kill(dave.pid, signal.SIGSTOP)
    try:
        with pytest.raises(sy.WorkerUnavailable) as info:
            p.get()
    finally:
        os.kill(dave.pid, signal.SIGCONT)
    text = str(info.value)
    assert f"worker 'dave' at {dave.address} could not be reached" in text, text
    assert "not running" not in text, text
