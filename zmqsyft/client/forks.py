"""Workers forked from a fork server: a process that imported torch and the worker once.

A new interpreter that imports torch takes seconds and about 150 MiB of memory of its own. The
fork server (``python -m zmqsyft forkserver``, :mod:`zmqsyft.forkserver`) pays that once; a
worker is then a fork of it, ready in tens of milliseconds, sharing the pages it does not write
to. The first :func:`spawn` starts it, with this interpreter, environment and working directory,
in a session of its own (a Ctrl-C aimed at ours does not reach it); it dies with this process
(its parent-death signal, and its end of the socket closing), and its workers die with it
(theirs). A worker forked from it has everything a spawned worker has: a process and a session
of its own, this process's environment and working directory as of the spawn, stdout and stderr
where ours are then, its ready and handover pipes, its keys. A change of our environment in a
variable read only at start-up (:data:`START_VARIABLES`) gets a fork server of its own; the
earlier one forks no more and ends with its last worker, but for one spare (:func:`_tidy_retired`).

:func:`spawn` returns a :class:`ForkedProcess`, which stands for the worker as its
``subprocess.Popen`` would: the fork server (its parent) reaps it and reports its status.
:func:`refusal` says when a worker must be a new interpreter instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from ..config import Config
from ..errors import SpawnError
from . import interrupts
from .forked import ForkedProcess

__all__ = ["spawn", "shutdown", "refusal", "worker_environ", "ForkedProcess", "ForkServer",
           "START_VARIABLES"]

log = logging.getLogger(__name__)

# environment variables read only when an interpreter starts or torch is imported: a worker whose
# environment differs from the fork server's in one of them is started as a new interpreter
# (not TORCHINDUCTOR_*: torch sets those in our own environment as it goes, and reads them late)
START_VARIABLES = ("PYTHON", "LD_", "LC_", "LANG", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "GOMP_",
                   "KMP_", "MKL_", "OPENBLAS_", "CUDA", "NVIDIA_", "TORCH_", "PYTORCH_",
                   "ZMQSYFT_SHM_DIR")


# Torch's OpenMP threads spin for a while after each parallel region, waiting for the next. A
# worker rarely has the machine to itself: spawned workers share it with their siblings and this
# process, and spinning threads of idle workers took the CPU from busy ones (a federated round
# with 8 owners on 2 CPUs: 1.3 s of CPU instead of 0.36 s). So spawned workers' threads sleep
# when idle, unless this process's environment chose otherwise.
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def worker_environ() -> dict[str, str]:
    """The environment a spawned worker starts from: ours, with ``OMP_WAIT_POLICY=PASSIVE``
    unless one of :data:`_WAIT_VARIABLES` is set here."""
    env = dict(os.environ)
    if not any(k in env for k in _WAIT_VARIABLES):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _start_time(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(START_VARIABLES)}


class ForkServer:
    """A running fork server and the reader thread that takes its answers and exit reports."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = worker_environ()
        try:
            self.proc = interrupts.popen(
                [sys.executable, "-m", "zmqsyft", "forkserver", "--parent-pid", str(os.getpid()),
                 "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=self.env, stdin=subprocess.DEVNULL,
                start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        interrupts.watch_child(self.proc)
        self.pid = self.proc.pid
        self.served = 0  # workers forked
        self.users = 0  # spawn() calls that chose it and have not returned yet
        self.gone: str | None = None  # why it no longer serves
        self._sock = ours
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[ForkedProcess, list[str]]] = {}  # asked, not answered
        self._procs: dict[int, ForkedProcess] = {}
        threading.Thread(target=self._read, name="zmqsyft-forkserver", daemon=True).start()

    def spawn(self, argv: list[str], env: dict[str, str], fds: list[tuple[int | None, int]],
              timeout: float) -> ForkedProcess:
        """Fork a worker running ``zmqsyft ARGV`` with environment ``env``; ``fds``: (the number it
        must have in the worker, or ``None`` for ``{fdI}`` in ``argv``; our descriptor). The
        first fork is waited for (up to ``timeout`` s: the server imports torch first, and a
        server that cannot fork is known then); later ones return at once, forked meanwhile."""
        why = (f"the fork server (pid {self.pid}) did not fork a worker within {timeout:g}s; "
               "it was killed")
        proc = ForkedProcess(argv, lambda: self.stop(why), time.monotonic() + timeout)
        with self._lock:
            if self.gone:
                raise SpawnError(self.gone)
            first = not self.served
            req_id = self._next = self._next + 1
            self._waiting[req_id] = (proc, argv)
        request = json.dumps({"id": req_id, "argv": argv, "env": env, "cwd": os.getcwd(),
                              "fds": [target for target, _ in fds]}).encode()
        with interrupts.held_back(True):  # (a Ctrl-C waits: no worker is forked and lost)
            try:
                socket.send_fds(self._sock, [request], [fd for _, fd in fds])
            except OSError as exc:
                with self._lock:
                    self._waiting.pop(req_id, None)
                raise SpawnError(self.gone or f"cannot reach the fork server: {exc}") from exc
            if first:
                proc.await_fork(None)
                if proc.error is not None or not proc.settled:
                    raise SpawnError(proc.error or self.gone or why)
        return proc

    def _read(self) -> None:
        why = f"the fork server (pid {self.pid}) exited"
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self._sock, 1 << 16, 1)
                if not data:
                    break
                self._take(json.loads(data), fds)
        except (OSError, ValueError) as exc:
            why = f"the fork server (pid {self.pid}) broke off: {exc}"
        with self._lock:
            self.gone = self.gone or why
            waiting, self._waiting = self._waiting, {}
            procs, self._procs = self._procs, {}
        for proc, _ in waiting.values():
            proc._failed(self.gone)
        for proc in procs.values():
            proc._orphaned()
        self._sock.close()

    def _take(self, message: dict[str, Any], fds: list[int]) -> None:
        if "exited" in message:
            with self._lock:
                proc = self._procs.pop(message["exited"], None)
            if proc is not None:
                proc._exited(int(message["code"]))
                _tidy_retired()
            return
        with self._lock:
            proc, _ = self._waiting.pop(message.get("id"), (None, []))
        if "error" in message:
            if proc is not None:
                proc._failed(f"the fork server could not fork: {message['error']}")
            return
        os.set_inheritable(fds[0], False)
        pid = int(message["pid"])
        if proc is None:  # (not asked for: nobody would stop it)
            signal.pidfd_send_signal(fds[0], signal.SIGKILL)
            os.close(fds[0])
            return
        with self._lock:
            self._procs[pid] = proc
            self.served += 1
        proc._forked(pid, fds[0])

    @property
    def idle(self) -> bool:
        """Whether it has no worker running and no fork under way."""
        with self._lock:
            return not (self._procs or self._waiting or self.users)

    def end(self) -> None:
        """Let it end by itself (it exits once it sees its socket closed; the process is
        reaped by :func:`~zmqsyft.client.interrupts.watch_child`). Never waits."""
        with self._lock:
            self.gone = self.gone or "the fork server was closed"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def stop(self, why: str) -> None:
        """Kill the fork server (its workers die with it)."""
        with self._lock:
            self.gone = self.gone or why
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self, timeout: float) -> bool:
        """Let the fork server end by itself: it kills and reaps the workers it still has, then
        exits, and is reaped here (so the CPU time of all of them counts as this process's
        children's). Killed if it has not ended within ``timeout`` s. Whether it ended alone."""
        with self._lock:
            self.gone = self.gone or "the fork server was closed"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # (its select() sees the end of the socket)
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False


_server: ForkServer | None = None
_retired: list[ForkServer] = []  # earlier servers (this process's environment changed since):
_server_lock = threading.Lock()  # they serve on for the workers they forked
_broken: str | None = None  # why a fork server could not start: not tried again
# retired servers kept once their last worker has ended (for an environment that switches back,
# as a test's monkeypatch does); the older idle ones are closed, each one ~180 MiB
SPARE_SERVERS = 1


def _tidy_retired() -> None:
    """Close the retired fork servers that have no worker left, but the newest
    :data:`SPARE_SERVERS` of them."""
    with _server_lock:
        idle = [s for s in _retired if s.gone or s.idle]
        ending = idle[:max(0, len(idle) - SPARE_SERVERS)]
        for server in ending:
            _retired.remove(server)
    for server in ending:
        server.end()


def shutdown(timeout: float = 10.0) -> None:
    """Close this process's fork servers and reap them; workers they forked that are still
    running are killed (close those first). The next spawn starts a new fork server."""
    global _server
    with _server_lock:
        servers = [s for s in [_server, *_retired] if s is not None]
        _server = None
        _retired.clear()
    for server in servers:
        server.close(timeout)


def _after_fork() -> None:
    """A forked child of ours has no reader thread: it starts a fork server of its own if it
    spawns, and lets go of ours (whose end of the socket it must not hold open)."""
    global _server, _server_lock
    _server_lock = threading.Lock()  # (another thread may have held it at the fork)
    for server in [_server, *_retired]:
        if server is not None:
            server._sock.close()
    _server = None
    _retired.clear()


os.register_at_fork(after_in_child=_after_fork)


def refusal(cfg: Config, env: dict[str, str]) -> str | None:
    """Why a worker with environment ``env`` is to be a new interpreter (``None``: forked)."""
    if not cfg.forkserver:
        return "the fork server is off (Config.forkserver, ZMQSYFT_FORKSERVER)"
    if not (sys.platform.startswith("linux") and hasattr(os, "pidfd_open")):
        return "the fork server needs Linux (pidfds)"
    if _broken is not None:
        return _broken
    wanted, base = _start_time(env), _start_time(worker_environ())
    if any(_start_time(s.env) == wanted for s in [_server, *_retired] if s is not None and not s.gone):
        return None
    if wanted != base:  # (equal: a fork server started now, from our environment, will do)
        changed = sorted(set(wanted.items()) ^ set(base.items()))
        return (f"its environment changes {changed[0][0]}, which is read only when an "
                "interpreter starts")
    return None


def spawn(argv: list[str], env: dict[str, str], fds: dict[str, int],
          timeout: float) -> ForkedProcess:
    """Fork a worker running ``zmqsyft ARGV --parent-pid <the fork server>`` plus, for each
    ``flag: fd`` of ``fds``, ``flag N`` where ``N`` is that descriptor's number in the worker;
    it gets our stdout and stderr. Starts the fork server if none runs (then this waits for it
    to import torch, up to ``timeout`` seconds, as the first use of a worker would).

    Raises ``SpawnError`` if the fork server cannot start, or fork its first worker (see
    :func:`refusal` first); a later fork that fails fails the returned process (its
    ``error``), and so the worker's first use.
    """
    global _server, _broken
    with _server_lock:
        if _server is not None and not _server.gone and \
                _start_time(env) != _start_time(_server.env):  # (our environment changed)
            _retired.append(_server)
            _server = next((s for s in _retired if not s.gone
                            and _start_time(s.env) == _start_time(env)), None)
            if _server is not None:  # (an earlier one started with this environment)
                _retired.remove(_server)
        if _server is None or _server.gone:
            try:
                _server = ForkServer()
            except OSError as exc:
                _broken = f"the fork server could not start: {exc}"
                raise SpawnError(_broken) from exc
        server = _server
        server.users += 1
    try:
        return _spawn(server, argv, env, fds, timeout)
    finally:
        with _server_lock:
            server.users -= 1
        _tidy_retired()


def _spawn(server: ForkServer, argv: list[str], env: dict[str, str], fds: dict[str, int],
           timeout: float) -> ForkedProcess:
    global _broken
    passed: list[tuple[int | None, int]] = []
    for std in (1, 2):
        try:
            os.fstat(std)
            passed.append((std, std))
        except OSError:  # (closed here: /dev/null there)
            pass
    full = [*argv, "--parent-pid", str(server.pid)]
    for flag, fd in fds.items():
        full += [flag, f"{{fd{len(passed)}}}"]
        passed.append((None, fd))
    try:
        return server.spawn(full, env, passed, timeout)
    except SpawnError:
        if not server.served:  # it never forked a worker: it cannot start here
            _broken = server.gone or "the fork server did not start"
        raise
