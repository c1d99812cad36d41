"""Workers forked from the fork server (``zmqsyft.client.forks``), on real processes.

Each keeps what a worker started as a new interpreter has (a process and a session of its own,
a private ipc directory, its own environment, the ready handshake and keys, death with its
client), the fork server's death takes its workers with it and is reported on their handles,
and a worker whose environment changes what only an interpreter start reads is not forked.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch

import zmqsyft as sy
from tests.helpers import ROOT, STARTUP, configured, read_line, reap, run_script
from zmqsyft.client import forks

pytestmark = pytest.mark.usefixtures("hook")


@contextmanager
def workers(n: int, **kwargs: object) -> Iterator[list[sy.WorkerClient]]:
    """``sy.spawn_workers(n, ...)``, every one closed and its process reaped afterwards."""
    made = sy.spawn_workers(n, prefix=f"fs{time.monotonic_ns() % 10**6}-", **kwargs)
    try:
        yield made
    finally:
        for w in made:
            w.close()
        for w in made:
            assert w._proc is not None
            if w._proc.poll() is None:  # pragma: no cover - close() failed
                w._proc.kill()
            w._proc.wait(timeout=30)


def gone_within(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ends (or is a zombie awaiting its new parent) within ``timeout``."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    try:
        proc.wait(timeout=timeout)
        return True
    except psutil.TimeoutExpired:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            leftover = psutil.Process(pid)
            if "zmqsyft" in " ".join(leftover.cmdline()):
                leftover.kill()
        except psutil.Error:
            pass


@pytest.mark.timeout(180)
def test_forked_workers_answer_each_in_a_process_session_and_directory_of_its_own() -> None:
    with workers(2, env={"FORKSERVER_TEST_MARK": "seen"}) as (a, b):
        for i, w in enumerate((a, b)):
            x = torch.arange(4.0) + i
            assert torch.equal((x.send(w) * 2).get(), x * 2)
        assert isinstance(a._proc, forks.ForkedProcess) and isinstance(b._proc, forks.ForkedProcess)
        server = forks._server
        assert server is not None and not server.gone
        assert a.pid != b.pid and os.getpid() not in (a.pid, b.pid)
        for w in (a, b):
            assert w.pid == w._proc.pid
            assert os.getsid(w.pid) == w.pid and os.getpgid(w.pid) == w.pid  # its own session
            assert psutil.Process(w.pid).ppid() == server.pid  # the fork server is its parent
            assert w.private_dir is not None and w.address == f"ipc://{w.private_dir}/{w.id}.sock"
            assert w.run(os.getenv, "FORKSERVER_TEST_MARK") == "seen"
            assert w.run(os.getenv, "ZMQSYFT_TRUST_TOKEN") is None
            assert w.run(os.getcwd) == os.getcwd()
        assert a.private_dir != b.private_dir
        assert a.key and b.key and a.key != b.key  # its own key pair, checked in the handshake
    assert psutil.Process(server.pid).is_running()  # it serves on for the next spawn


@pytest.mark.timeout(180)
def test_a_forked_worker_gets_the_clients_stdout_stderr_and_environment_of_the_moment(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a forked worker writes goes where ours goes at its spawn (not where it went when the
    fork server started), and it sees our environment and directory as they are then."""
    with workers(1) as (first,):  # (the fork server runs by now)
        first.ping()
    monkeypatch.setenv("FORKSERVER_TEST_LATER", "later")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    with workers(1, env={"ZMQSYFT_LOG_LEVEL": "info"}) as (w,):
        assert isinstance(w._proc, forks.ForkedProcess)
        assert w.run(os.getenv, "FORKSERVER_TEST_LATER") == "later"
        assert w.run(os.getcwd) == str(tmp_path)
        assert w.run(eval, "__import__('sys').path[0]") == str(tmp_path)  # (as `-m` there)
        import tempfile
        assert w.run(tempfile.gettempdir) == str(tmp_path)
        name = w.id
    err = capfd.readouterr().err
    assert f"worker {name}: started" in err and f"worker {name}: shut down" in err, err


@pytest.mark.timeout(120)
def test_a_sigkilled_forked_worker_is_reported_killed_by_sigkill() -> None:
    with workers(1) as (w,):
        w.ping()
        os.kill(w.pid, signal.SIGKILL)
        assert w._proc.wait(timeout=30) == -signal.SIGKILL
        with pytest.raises(sy.WorkerUnavailable, match="killed by signal SIGKILL"):
            torch.ones(2).send(w)


@pytest.mark.timeout(180)
def test_when_the_fork_server_dies_its_workers_die_and_the_next_spawn_starts_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a fork server of this test's own (the running one forked other tests' pooled workers)
    monkeypatch.setattr(forks, "_server", None)
    with workers(2) as made:
        for w in made:
            w.ping()
        server = forks._server
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)
        for w in made:  # (their parent-death signal: reported as such, not a hang)
            assert w._proc.wait(timeout=30) == -signal.SIGKILL
            assert gone_within(w.pid, 10)
            assert "killed by signal SIGKILL" in (w._exit_status() or "")
            with pytest.raises(sy.WorkerUnavailable):
                w.ping()
        assert server.proc.wait(timeout=30) == -signal.SIGKILL
    with workers(1) as (fresh,):
        fresh.ping()
        assert isinstance(fresh._proc, forks.ForkedProcess)
        assert forks._server is not None and forks._server.pid != server.pid
    forks._server.stop("the test is over")
    assert forks._server.proc.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.timeout(180)
def test_a_spawn_returns_before_its_fork_and_a_fork_that_never_comes_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the fork server has forked, a spawn returns without waiting for the fork (the
    server forks one request after the other meanwhile). A fork that never comes, because the
    server died (first) or hung (second: killed at the spawn deadline), fails the handle's
    first use with a SpawnError that says so, never a hang."""
    monkeypatch.setattr(forks, "_server", None)  # (one of this test's own)
    with workers(1) as (first,):
        first.ping()
        server = forks._server
        assert server is not None
        os.kill(server.pid, signal.SIGSTOP)  # it answers nothing from now on
        try:
            with workers(1) as (pending,):  # returned at once: the fork is not answered
                assert isinstance(pending._proc, forks.ForkedProcess)
                assert pending._proc.poll() is None and pending._pid is None
                os.kill(server.pid, signal.SIGKILL)
                with pytest.raises(sy.SpawnError, match="could not start: the fork server"):
                    pending.ping()
                assert pending._proc.returncode == 1
        finally:
            os.kill(server.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)
    monkeypatch.setattr(forks, "_server", None)
    with configured(spawn_timeout=8.0), workers(1) as (first,):
        first.ping()
        server = forks._server
        assert server is not None
        os.kill(server.pid, signal.SIGSTOP)
        with workers(1) as (stuck,):
            with pytest.raises(sy.SpawnError, match="did not report ready within 8s"):
                stuck.ping()
            assert server.proc.wait(timeout=30) == -signal.SIGKILL  # taken for stuck: killed
            assert "did not fork a worker within 8s" in (server.gone or "")


@pytest.mark.timeout(240)
def test_32_workers_are_ready_soon_and_all_reaped() -> None:
    start = time.monotonic()
    with workers(32) as made:
        for w in made:
            w.ping()
        took = time.monotonic() - start
        assert [w.id for w in made] == [f"{made[0].id[:-1]}{i}" for i in range(32)]
        assert len({w.pid for w in made}) == 32
        pids = [w.pid for w in made]
    assert took < 60, f"32 forked workers took {took:.1f}s to answer"  # (about 2 s on 2 cores)
    assert all(gone_within(pid, 10) for pid in pids)


def _client_messages(w: sy.WorkerClient) -> int:
    """How many messages ``w`` has had from this process (its ``stats()``)."""
    peers = w.stats()["peers"]
    return sum(p["messages_in"] for name, p in peers.items() if name.startswith("client:"))


@pytest.mark.timeout(180)
def test_workers_spawned_together_know_each_other_without_introductions() -> None:
    """``spawn_workers`` tells each worker the others' keys at its start: the first one gets
    no ALLOW for its three siblings (it did: one request, and one round trip, per pair), where
    workers spawned one by one are introduced, all at once; either way every one reaches every
    other (a tensor moved around the ring)."""
    counts = {}
    for how in ("together", "one by one"):
        tag = f"fsk{time.monotonic_ns() % 10**6}-"
        if how == "together":
            made = sy.spawn_workers(4, prefix=tag)
        else:
            made = [sy.spawn_worker(f"{tag}{i}") for i in range(4)]
        try:
            for w in made:
                w.ping()
            counts[how] = _client_messages(made[0])
            x = torch.arange(3.0).send(made[0])
            for w in [*made[1:], made[0]]:
                x = x.move(w)
            assert x.location is made[0] and x.get().tolist() == [0.0, 1.0, 2.0]
        finally:
            for w in made:
                w.close()
    assert counts["one by one"] - counts["together"] == 3, counts


def test_spawn_workers_refuses_a_negative_count() -> None:
    with pytest.raises(ValueError, match="n must be a whole number"):
        sy.spawn_workers(-1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["config", "start-time variable", "no fork server"])
def test_a_worker_is_a_new_interpreter_when_it_cannot_be_forked(
        how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    env = {"OMP_NUM_THREADS": "1"} if how == "start-time variable" else None
    if how == "no fork server":
        monkeypatch.setattr(forks, "_server", None)  # (the running one is back afterwards)
        monkeypatch.setattr(forks, "_broken", None)

        def cannot_start() -> None:
            raise OSError("no such interpreter")

        monkeypatch.setattr(forks, "ForkServer", cannot_start)
    with configured(forkserver=how != "config"), caplog.at_level(logging.WARNING), \
            workers(1, env=env) as (w,):
        assert isinstance(w._proc, subprocess.Popen), w._proc
        assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))
        if env:  # (read when the interpreter starts: a fork would have the fork server's)
            assert w.run(torch.get_num_threads) == 1
    if how == "no fork server":
        assert "started as a new interpreter: the fork server could not start" in caplog.text


@pytest.mark.timeout(240)
def test_a_forked_worker_has_the_torch_threads_of_a_new_one() -> None:
    with workers(1) as (forked,), configured(forkserver=False), workers(1) as (new,):
        assert isinstance(new._proc, subprocess.Popen)
        assert forked.run(torch.get_num_threads) == new.run(torch.get_num_threads)
        assert forked.run(torch.get_num_interop_threads) == new.run(torch.get_num_interop_threads)


CLIENT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import zmqsyft as sy
    from zmqsyft.client import forks

    made = sy.spawn_workers(2, prefix="orphan")
    for w in made:
        w.ping()
    print(forks._server.pid, *(w.pid for w in made), flush=True)
    sys.stdin.readline()  # the test has looked: now die without cleaning up
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.timeout(240)
def test_a_killed_client_leaves_no_worker_and_no_fork_server(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    client = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    pids: list[int] = []
    try:
        pids = [int(p) for p in read_line(client, 2 * STARTUP).split()]
        server, *forked = pids
        assert psutil.Process(server).ppid() == client.pid
        assert all(psutil.Process(p).ppid() == server for p in forked)
        assert client.stdin is not None
        client.stdin.write(b"go\n")
        assert client.wait(timeout=30) == -signal.SIGKILL
        left = [pid for pid in pids if not gone_within(pid, 15)]
        assert not left, f"processes {left} outlived their killed client (fork server: {server})"
    finally:
        reap(client)
        kill_leftovers(pids)



FORKING_CLIENT = textwrap.dedent("""
    import os, sys
    import torch
    import zmqsyft as sy
    from zmqsyft.client import forks

    sy.TorchHook(torch)
    w = sy.spawn_worker("before")
    w.ping()
    ours = forks._server.pid
    pid = os.fork()  # (a multiprocessing fork, say): the child lets go of our fork server
    if pid == 0:
        os._exit(0 if forks._server is None else 3)
    _, status = os.waitpid(pid, 0)
    after = sy.spawn_worker("after")
    assert torch.equal(torch.ones(2).send(after).get(), torch.ones(2)) and w.ping() is not None
    print(os.waitstatus_to_exitcode(status), forks._server.pid == ours, flush=True)
""")


@pytest.mark.timeout(240)
def test_a_forked_client_lets_go_of_our_fork_server_which_serves_on(tmp_path: Path) -> None:
    script = tmp_path / "forking.py"
    script.write_text(FORKING_CLIENT)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                            text=True, timeout=3 * STARTUP, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"], (result.stdout, result.stderr)


@pytest.mark.timeout(240)
def test_a_changed_environment_gets_a_fork_server_of_its_own_and_the_old_one_serves_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment changed a start-time variable after the fork server started
    (a test, a notebook cell): the next worker is forked from a new fork server started with
    it, not a new interpreter (seconds each); workers of the old one live on."""
    threads = "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1"
    with workers(1) as (before,):
        first = forks._server
        assert first is not None and isinstance(before._proc, forks.ForkedProcess)
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        with workers(1) as (after,):
            assert isinstance(after._proc, forks.ForkedProcess), after._proc
            assert forks._server is not None and forks._server.pid != first.pid
            assert psutil.Process(after.pid).ppid() == forks._server.pid
            assert after.run(torch.get_num_threads) == int(threads)  # (read at torch's import)
            assert torch.equal(torch.ones(2).send(before).get(), torch.ones(2))
            assert not first.gone
        monkeypatch.undo()  # back to the first environment: back to the first fork server
        with workers(1) as (again,):
            assert psutil.Process(again.pid).ppid() == first.pid == forks._server.pid


@pytest.mark.timeout(300)
def test_a_retired_fork_server_ends_with_its_last_worker_but_one_spare(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each environment a worker was forked for had a fork server (~180 MiB) until exit. Now one
    that serves an environment left behind ends once its last worker has, but the newest such
    one (kept for an environment that switches back, as a test's monkeypatch does)."""
    monkeypatch.setenv("PYTHONZMQSYFTTEST", "a")  # (read at start-up: a fork server each)
    with workers(1):
        a = forks._server
    monkeypatch.setenv("PYTHONZMQSYFTTEST", "b")
    with workers(1):
        b = forks._server
        monkeypatch.setenv("PYTHONZMQSYFTTEST", "c")
        with workers(1):
            c = forks._server
            assert a is not None and b is not None and c is not None
            assert len({a.pid, b.pid, c.pid}) == 3 and a.proc.poll() is None
    # b's last worker has ended: a and b are both idle and retired; the older one ends
    assert a.proc.wait(timeout=60) == 0
    assert a not in forks._retired and b in forks._retired  # (others' may be there too)
    assert b.proc.poll() is None and c.proc.poll() is None
    monkeypatch.setenv("PYTHONZMQSYFTTEST", "b")  # back: b forks again, c is the spare now
    with workers(1) as (again,):
        assert psutil.Process(again.pid).ppid() == b.pid == forks._server.pid
    idle = [s for s in forks._retired if s.idle]
    assert idle == [c] and c.proc.poll() is None and b.proc.poll() is None


def _cpu_s(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


@pytest.mark.timeout(120)
def test_shutdown_ends_the_fork_server_which_reaps_its_workers_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(forks, "_server", None)  # (one of this test's own)
    monkeypatch.setattr(forks, "_retired", [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    closed, running = sy.spawn_workers(2, prefix=f"fsdown{time.monotonic_ns() % 10**6}-")
    try:
        x = torch.ones(256, 256)
        for w in (closed, running):  # some CPU time in each: it must be counted as ours
            p = x.send(w)
            for _ in range(30):
                p = p @ p / 256
            p.get()
        server = forks._server
        assert server is not None and server.proc.poll() is None
        used = _cpu_s(closed.pid) + _cpu_s(running.pid)
        closed.close()
        forks.shutdown(timeout=30)
        # the server ended by itself (a kill would be -SIGKILL), after killing what still ran
        assert server.proc.returncode == 0
        assert running._proc.wait(timeout=30) == -signal.SIGKILL
        assert gone_within(running.pid, 10)
        with pytest.raises(sy.WorkerUnavailable):
            running.ping()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        counted = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert counted >= used, f"the workers used {used:.2f} s of CPU, {counted:.2f} s counted"
        assert forks._server is None
        with workers(1) as (fresh,):  # the next spawn starts another
            fresh.ping()
            assert forks._server is not None and forks._server.pid != server.pid
    finally:
        running.close()
        forks.shutdown(timeout=30)


@pytest.mark.timeout(180)
def test_workers_and_the_fork_server_never_load_the_client_half() -> None:
    """A worker imports ``zmqsyft`` for ``zmqsyft.worker``; the package's client names (the
    hook, pointers, spawning) are imported on first use, so that neither a fork server (whose
    modules its forks inherit) nor a worker started as a new interpreter loads them."""
    script = textwrap.dedent("""
        import sys, torch, zmqsyft as sy
        sy.TorchHook(torch)

        def client_modules():
            return sorted(m for m in sys.modules if m.startswith("zmqsyft.client"))

        forked = sy.spawn_worker("lazyforked")
        sy.configure(forkserver=False)
        fresh = sy.spawn_worker("lazyfresh")
        for w in (forked, fresh):
            x = torch.ones(3).send(w)
            print(w.id, (x + x).get().tolist(), len(w.run(client_modules)), flush=True)
            w.close()
    """)
    result = run_script("-c", script, timeout=150)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["lazyforked [2.0, 2.0, 2.0] 0",
                                             "lazyfresh [2.0, 2.0, 2.0] 0"], result.stdout
