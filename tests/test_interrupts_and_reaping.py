"""A notebook's life: Ctrl-C while workers start or while a call waits, a kernel shutdown, a
kernel restart (SIGKILL of the parent). Each test runs a parent script in a fresh interpreter
and a process group of its own (as a kernel is), with a private ``TMPDIR``, and checks what is
left afterwards: the workers usable, every process reaped, no directory, no object.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, STARTUP, read_line, reap

PRELUDE = """
import os, signal, sys, threading, time
import torch
import zmqsyft as sy
hook = sy.TorchHook(torch)

def poll(check, within):
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.02)
    return True

def state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return "gone"
"""


@pytest.fixture
def tmpdir_env() -> Iterator[Path]:
    """A short private TMPDIR for the scripts (ipc paths have a length limit); removed after."""
    directory = Path(tempfile.mkdtemp(prefix="zi-"))
    try:
        yield directory
    finally:
        for entry in directory.iterdir():
            subprocess.run(["rm", "-rf", str(entry)], check=False)
        directory.rmdir()


def _start(script: str, tmp: Path, name: str = "script", *args: str) -> subprocess.Popen[bytes]:
    path = tmp / f"{name}.py"
    path.write_text(PRELUDE + script)
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(path), *args], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group, as a kernel's


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return "gone"


def _poll(check: Callable[[], bool], within: float) -> bool:
    """Whether ``check()`` came true within ``within`` seconds (looked at every 20 ms)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.02)
    return True


def _kill_leftovers(pids: list[int]) -> None:
    """Kill (after a failure) the workers a script left running, checking they are ours."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"zmqsyft" in f.read():
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        reap(proc)
    return out.decode(), err.decode()


def _dirs(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("zmqsyft-"))


@pytest.mark.timeout(240)
def test_an_interrupt_sent_to_the_process_group_while_workers_start_spares_them(
        tmpdir_env: Path) -> None:
    proc = _start("""
workers = [sy.spawn_worker(f"w{i}") for i in range(2)]
try:
    print("SPAWNED " + " ".join(str(w._proc.pid) for w in workers), flush=True)
    for w in workers:
        w.address  # the first use waits for the ready signal: interrupted here
    print("NOT INTERRUPTED", flush=True)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
for i, w in enumerate(workers):
    x = torch.arange(4.0) + i
    assert torch.equal(x.send(w).get(), x)
print("OK", flush=True)
""", tmpdir_env)
    pids: list[int] = []
    try:
        line = read_line(proc, STARTUP)
        assert line.startswith("SPAWNED "), line
        pids = [int(p) for p in line.split()[1:]]
        assert all(_state(p) != "gone" for p in pids)  # started, still importing torch
        os.killpg(proc.pid, signal.SIGINT)  # what Jupyter's interrupt does to a kernel
        assert read_line(proc, STARTUP) == "INTERRUPTED"
        out, err = _finish(proc, 2 * STARTUP)
    finally:
        reap(proc)
        _kill_leftovers(pids)
    assert proc.returncode == 0, err
    assert out.strip() == "OK", (out, err)


@pytest.mark.timeout(240)
def test_exit_stops_all_workers_at_once_and_reaps_every_child(tmpdir_env: Path) -> None:
    proc = _start("""
workers = [sy.spawn_worker(f"w{i}") for i in range(4)]
kept = [torch.ones(3).send(w) for w in workers]  # objects everywhere: deletes at exit
pids = [w.pid for w in workers]
print("PIDS " + " ".join(map(str, pids)), flush=True)
os.kill(pids[2], signal.SIGKILL)  # exits on its own while the session lives: reaped, no zombie
print("REAPED" if poll(lambda: state(pids[2]) == "gone", 20) else "ZOMBIE " + state(pids[2]),
      flush=True)
os.kill(pids[3], signal.SIGSTOP)  # frozen
poll(lambda: state(pids[3]) == "T", 20)
print("EXITING", flush=True)
""", tmpdir_env)
    pids: list[int] = []
    try:
        line = read_line(proc, 2 * STARTUP)
        assert line.startswith("PIDS "), line
        pids = [int(p) for p in line.split()[1:]]
        assert read_line(proc, 30) == "REAPED"
        assert read_line(proc, 30) == "EXITING"
        start = time.monotonic()
        _finish(proc, 60)
        took = time.monotonic() - start
        left = {pid: _state(pid) for pid in pids if _state(pid) != "gone"}
    finally:
        reap(proc)
        _kill_leftovers(pids)
    assert proc.returncode == 0
    assert not left, f"worker processes left (pid: state): {left}"
    assert took < 6, f"the exit took {took:.1f}s"  # (12 s before: one worker after another)


@pytest.mark.timeout(300)
def test_directories_of_a_killed_parent_are_swept_by_the_next_session(tmpdir_env: Path) -> None:
    holder = """
workers = [sy.spawn_worker(f"w{i}") for i in range(int(sys.argv[1]))]
assert all(torch.equal(torch.ones(2).send(w).get(), torch.ones(2)) for w in workers)
print("PIDS " + " ".join(str(w.pid) for w in workers), flush=True)
sys.stdin.readline()
"""
    killed = _start(holder, tmpdir_env, "killed", "2")
    alive = _start(holder, tmpdir_env, "alive", "1")
    pids: list[int] = []
    try:
        pids = [int(p) for p in read_line(killed, 2 * STARTUP).split()[1:]]
        pids += [int(p) for p in read_line(alive, 2 * STARTUP).split()[1:]]
        assert len(_dirs(tmpdir_env)) == 3
        killed.kill()  # a kernel restart
        killed.wait(timeout=30)
        # its workers die with it (their parent death signal)
        assert _poll(lambda: all(_state(p) in ("gone", "Z") for p in pids[:2]), 30), \
            "the workers outlived their killed parent"
        assert len(_dirs(tmpdir_env)) == 3  # nobody removed them
        # the next session sweeps the dead parent's, not the living one's nor its own
        second = _start("""
w = sy.spawn_worker("next")  # (its session swept what dead processes left)
assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))
own = os.path.dirname(w.address[len("ipc://"):])
print(len([n for n in os.listdir(os.environ["TMPDIR"]) if n.startswith("zmqsyft-")]),
      os.path.isdir(own), flush=True)
""", tmpdir_env, "second")
        out, err = _finish(second, 2 * STARTUP)
        assert second.returncode == 0, err
        assert out.split() == ["2", "True"], (out, err)  # its own and the living parent's
        assert alive.stdin is not None
        alive.stdin.close()  # a normal exit removes its own
        alive.wait(timeout=60)
        assert alive.returncode == 0
    finally:
        reap(killed)
        reap(alive)
        _kill_leftovers(pids)
    assert _dirs(tmpdir_env) == []


@pytest.mark.timeout(240)
def test_ctrl_c_while_a_call_waits_leaves_the_session_usable_and_nothing_behind(
        tmpdir_env: Path) -> None:
    proc = _start("""
from zmqsyft.client import connection
from zmqsyft.wire.messages import Op

sy.configure(timeout=20)
w = sy.spawn_worker("w")
base = len(w._objects)
sent, armed, real_send, pending = threading.Event(), [False], connection.Connection.send, [False]

def send(conn, op, *args, **kwargs):  # the hook: SIGINT once the armed request has left
    req_id = real_send(conn, op, *args, **kwargs)
    if armed[0] and op in (Op.PUT, Op.GET):
        armed[0] = False
        sent.set()
    return req_id

def interrupter():
    while True:
        sent.wait()
        sent.clear()
        if pending[0]:  # the signal lands in this thread: the caller's receive goes on, and
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # the reply comes while
            os.kill(w.pid, signal.SIGCONT)  # the KeyboardInterrupt is pending
        else:  # (at the main thread: its wait ends at once)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

connection.Connection.send = send
threading.Thread(target=interrupter, daemon=True).start()
big = torch.ones(25 * 2**20)  # 100 MiB
results = []
for call in ("send", "get", "get while pending"):
    ptr = big.send(w) if call != "send" else None
    os.kill(w.pid, signal.SIGSTOP)  # (its reply cannot come before the interrupt)
    assert poll(lambda: state(w.pid) == "T", 20)
    pending[0] = call == "get while pending"
    # "pending": one receive waits for the whole reply (with a signal raced before the wait,
    # the others would wait out the slice; here the reply ends it)
    connection._POLL_SLICE = 15.0 if pending[0] else 0.1
    armed[0] = True
    try:
        ptr = big.send(w) if call == "send" else ptr.get()
        results.append(call + " not interrupted")
    except KeyboardInterrupt:
        results.append(call + " interrupted")
    os.kill(w.pid, signal.SIGCONT)  # it answers now: the late reply is dropped
    del ptr
    x = torch.arange(5.0)
    assert torch.equal(x.send(w).get(), x)  # the session works, replies match their requests
    assert poll(lambda: len(w._objects) == base, 20), (call, len(w._objects), base)
print(", ".join(results), flush=True)
""", tmpdir_env)
    try:
        out, err = _finish(proc, 3 * STARTUP)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert out.strip() == ("send interrupted, get interrupted, get while pending interrupted"), \
        (out, err)


@pytest.mark.timeout(120)
def test_a_worker_spawned_from_a_short_lived_thread_outlives_the_thread(
        hook: object, tmp_path: Path) -> None:
    """``PR_SET_PDEATHSIG`` fires when the thread that forked the child ends, not the process:
    a worker spawned from a thread that then ended (a pool's, a test's) must go on serving."""
    import torch

    import zmqsyft as sy

    made: list[sy.WorkerClient] = []

    def start() -> None:
        worker = sy.spawn_worker("threaded")
        worker.ping()  # ready: it runs (and has asked to die with its parent) before we end
        made.append(worker)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(timeout=60)
    assert made, "spawn_worker did not return"
    worker = made[0]
    try:
        assert worker.ping() > 0  # (its starter thread has ended)
        x = torch.arange(3.0).send(worker)
        assert torch.equal((x * 2).get(), torch.arange(3.0) * 2)
        assert worker._proc is not None and worker._proc.poll() is None
    finally:
        worker.close()
