"""The fork server's side: a process that imported torch and the worker once, and forks workers.

``python -m zmqsyft forkserver`` (started by :mod:`zmqsyft.client.forks`, never by hand) imports
what a worker needs, freezes it out of the garbage collector (so that no collection writes to the
pages its forks share with it), and then serves requests on the Unix socket (``SOCK_SEQPACKET``)
its client handed it. A request is one message: JSON ``{"id", "argv", "env", "cwd", "fds"}`` and
descriptors, one per entry of ``fds``: the number it must have in the worker (1, 2: its stdout
and stderr), or ``null`` for any free number, which replaces ``{fdI}`` in ``argv`` (its ready
and handover pipes: ``--ready-fd {fd2}``). The server forks; the child becomes the worker (see
:func:`_child`); the server answers ``{"id", "pid"}`` with a pidfd of the child (which names that
process and no other, even once its pid is reused), or ``{"id", "error"}``. It reaps its children
as they exit (SIGCHLD) and reports each one's status: ``{"exited": pid, "code": returncode}``,
negative for a signal, as ``subprocess.Popen`` has it.

It never runs a torch op and starts no thread, so a fork inherits no thread pool or lock held by
another thread. It exits when its client closes the socket or dies (its parent-death signal),
and kills its children then; they die with it anyway (theirs).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["serve", "MAX_MESSAGE", "MAX_FDS"]

MAX_MESSAGE = 1 << 20  # bytes of one request (an environment is a few KiB)
MAX_FDS = 8  # descriptors one request may pass


def serve(sock_fd: int, run: Callable[[list[str]], int]) -> int:
    """Serve fork requests on the socket ``sock_fd`` until the client goes; ``run(argv)`` is
    what a forked child runs (the ``zmqsyft`` command's main), its result the child's exit code.
    Returns 0."""
    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # (its C handler wakes the select)
    signal.set_wakeup_fd(wake_w)
    own = (sock, wake_r, wake_w, os.getcwd())
    children: set[int] = set()
    try:
        while True:
            readable, _, _ = select.select([sock, wake_r], [], [])
            if wake_r in readable:
                _drain(wake_r)
            for pid, code in _reap(children):
                sock.send(json.dumps({"exited": pid, "code": code}).encode())
            if sock in readable:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
                if not data:
                    return 0  # the client closed its end, or died
                _fork(sock, data, fds, children, run, own)
    except OSError:  # the client is gone (a send or receive on a closed socket)
        return 0
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)  # (not yet reaped: the pid is still theirs)
            except OSError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(children: set[int]) -> list[tuple[int, int]]:
    """The children that have exited, reaped: (pid, returncode)."""
    done = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        children.discard(pid)
        done.append((pid, os.waitstatus_to_exitcode(status)))
    return done


def _fork(sock: socket.socket, data: bytes, fds: list[int], children: set[int],
          run: Callable[[list[str]], int], own: tuple[Any, ...]) -> None:
    """Fork one worker for the request ``data`` (descriptors ``fds``) and answer it."""
    req_id = None
    try:
        request = json.loads(data)
        req_id = request["id"]
        argv, env, cwd, targets = request["argv"], request["env"], request["cwd"], request["fds"]
        if not (isinstance(argv, list) and isinstance(env, dict) and isinstance(cwd, str)
                and isinstance(targets, list) and len(targets) == len(fds)):
            raise ValueError("a request needs argv, env, cwd and one target per descriptor")
        argv = [str(a) for a in argv]
        env = {str(k): str(v) for k, v in env.items()}
        targets = [None if t is None else int(t) for t in targets]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except (ValueError, KeyError, TypeError, OSError) as exc:
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"id": req_id, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    if pid == 0:
        _child(argv, env, cwd, fds, targets, run, own)
    children.add(pid)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(sock, [json.dumps({"id": req_id, "pid": pid}).encode()], [pidfd])
    finally:
        os.close(pidfd)


def _child(argv: list[str], env: dict[str, str], cwd: str, fds: list[int],
           targets: list[int | None],
           run: Callable[[list[str]], int], own: tuple[Any, ...]) -> NoReturn:
    """Become the worker: a session of its own, default signal handlers, the client's
    environment and working directory, its descriptors at the numbers its argv names; then
    ``run(argv)``, the exit functions a normal interpreter exit runs, and exit."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sock, wake_r, wake_w, started_in = own
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        placed = _place(fds, targets)
        argv = [_fill(arg, placed) for arg in argv]
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        if sys.path and sys.path[0] == started_in:  # (``-m``: a new interpreter's would be cwd)
            sys.path[0] = cwd
        code = run(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: B036 - the child must exit here, whatever happened
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _place(fds: list[int], targets: list[int | None]) -> list[int]:
    """Put descriptor ``fds[i]`` at number ``targets[i]`` (at a free one where that is ``None``)
    and close the originals; stdout or stderr not given become ``/dev/null``. Returns where each
    one is."""
    high = max([*fds, *(t for t in targets if t is not None), 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in fds]
    for fd in fds:
        os.close(fd)
    placed = []
    for fd, target in zip(moved, targets, strict=True):
        if target is None:
            os.set_inheritable(fd, True)  # (as a spawned process has it)
            placed.append(fd)
        else:
            os.dup2(fd, target)
            os.close(fd)
            placed.append(target)
    missing = [std for std in (1, 2) if std not in targets]
    if missing:
        null = os.open(os.devnull, os.O_WRONLY)
        for std in missing:
            os.dup2(null, std)
        os.close(null)
    return placed


def _fill(arg: str, placed: list[int]) -> str:
    """``arg`` with ``{fdI}`` replaced by the number descriptor ``I`` got."""
    if "{fd" not in arg:
        return arg
    for i, fd in enumerate(placed):
        arg = arg.replace(f"{{fd{i}}}", str(fd))
    return arg
