"""A client process that forks (``os.fork``, multiprocessing's ``fork``): the child has a copy of
the parent's workers, pointers and sockets, none of which it may use.

The sockets are the parent's (ZeroMQ's I/O threads do not exist in the child), the answers to
them go to the parent, and the worker processes are the parent's to stop. So the child gets a
clear error for any use of them, never a hang; dropping an inherited pointer frees nothing on
the parent's worker; the child's exit stops none of the parent's workers and does not wait on
them. It may spawn and use workers of its own, which its exit stops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, STARTUP

SCRIPT = textwrap.dedent("""
    import gc, json, os, select, sys, time
    import psutil, torch
    import zmqsyft as sy

    sy.TorchHook(torch)
    bob = sy.spawn_worker("bob")
    x = torch.arange(4.0).send(bob)
    parent = os.getpid()

    def report(**what):
        print(json.dumps(what), flush=True)

    pid = os.fork()
    if pid == 0:
        for name, use in [("op", lambda: x + x), ("get", lambda: x.get()),
                          ("ping", lambda: bob.ping())]:
            t0 = time.monotonic()
            try:
                use()
                report(step=name, error=None)
            except Exception as exc:
                report(step=name, error=type(exc).__name__, message=str(exc),
                       seconds=time.monotonic() - t0)
        alice = sy.spawn_worker("alice")  # one of the child's own
        y = torch.ones(3).send(alice)
        report(step="own", value=(y + y).get().tolist(), alice=alice.pid)
        del x  # the parent's object: nothing is freed on bob
        gc.collect()
        sy.sync()
        sys.exit(0)  # (the interpreter's exit: its atexit functions run)

    pidfd = os.pidfd_open(pid)
    ended, _, _ = select.select([pidfd], [], [], 120)
    if not ended:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    report(step="child", code=os.waitstatus_to_exitcode(status), hung=not ended)
    report(step="parent", value=(x + x).get().tolist(), bob_alive=bob._proc.poll() is None)
""")


@pytest.mark.timeout(300)
def test_a_forked_child_cannot_use_its_parents_workers_and_its_exit_leaves_them_alone(
        tmp_path: Path) -> None:
    script = tmp_path / "forking.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                            text=True, timeout=4 * STARTUP + 150, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    steps = {r["step"]: r for r in map(json.loads, result.stdout.splitlines())}
    for name in ("op", "get", "ping"):  # a clear error at once, naming the worker and the fork
        step = steps[name]
        assert step["error"] == "WorkerUnavailable", step
        assert "'bob'" in step["message"] and "fork" in step["message"], step
        assert step["seconds"] < 5, step
    assert steps["own"]["value"] == [2.0, 2.0, 2.0]
    assert steps["child"] == {"step": "child", "code": 0, "hung": False}, result.stderr
    # the child's exit stopped its own worker, and neither stopped nor freed anything of ours
    import psutil
    assert not psutil.pid_exists(steps["own"]["alice"]) or \
        psutil.Process(steps["own"]["alice"]).status() == psutil.STATUS_ZOMBIE
    assert steps["parent"] == {"step": "parent", "value": [0.0, 2.0, 4.0, 6.0], "bob_alive": True}
