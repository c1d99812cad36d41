"""What keeps a session whole when a notebook interrupts it, restarts it or shuts it down.

- **Private directories** (a spawned worker's ``ipc://`` socket): made by :func:`private_dir`
  with an owner marker this process holds an ``flock`` on; removed at exit by
  :func:`remove_dir`, and, if this process was killed, by the next zmqsyft process that
  starts a session (:func:`sweep_dirs`: a marker nobody holds locked means its creator is dead;
  a lock, unlike a pid, cannot be confused by pid reuse).
- **Children reaped**: :func:`watch_child` keeps every spawned worker in a table that a daemon
  thread polls (``waitpid(WNOHANG)`` through ``Popen.poll``), so a worker that exits on its own
  while the session lives leaves no zombie; at exit :func:`stop_all` asks every worker to stop
  at once (SIGTERM), kills the frozen ones (SIGSTOPped) at once, waits with one total bound,
  kills the rest and reaps them all.
- **Interrupted requests**: a Ctrl-C never makes a reply vanish (:func:`recv`), a message is
  never cut in two (:func:`held_back` keeps a Ctrl-C
  for after a multipart send), a reply read when a Ctrl-C comes fails its request instead of
  vanishing (:class:`Interruptible`), and :func:`abandon` marks a request whose waiter got a
  ``KeyboardInterrupt``: its reply is discarded when it comes; :func:`free_when_answered` frees
  the object an interrupted request creates once it has been answered (a delete never
  overtakes the request that creates its object).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import zmq

from ..errors import ZmqSyftError
from ..wire import transport
from ..wire.codec import ack_id
from ..wire.messages import salvage_req_id

__all__ = ["popen", "private_dir", "remove_dir", "sweep_dirs", "watch_child", "stop_all", "frozen",
           "drop_deletes", "abandon", "free_when_answered", "held_back", "Interruptible", "recv"]

log = logging.getLogger(__name__)

PREFIX = "zmqsyft-"
_MARKER = ".zmqsyft-owner"  # locked (flock) by the process that made the directory
_POLL = 0.5  # seconds between two looks for exited children

_locks: dict[str, int] = {}  # directory -> the descriptor holding its marker's lock
_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()
_reaper: threading.Thread | None = None


# ----------------------------------------------------------- directories
def private_dir() -> str:
    """A new directory (mode 0700) under the temporary directory, marked as this process's.

    The marker is locked before it gets its name, so a sweeper never sees it unlocked while
    its creator lives.
    """
    directory = tempfile.mkdtemp(prefix=PREFIX)
    tmp = os.path.join(directory, ".owner-new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, os.path.join(directory, _MARKER))
    except BaseException:
        os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    _locks[directory] = fd
    return directory


def remove_dir(directory: str) -> None:
    """Remove a directory made by :func:`private_dir` (or any other) and let go of its lock."""
    shutil.rmtree(directory, ignore_errors=True)
    fd = _locks.pop(directory, None)
    if fd is not None:
        os.close(fd)


def sweep_dirs(root: str | None = None) -> list[str]:
    """Remove the private directories of dead zmqsyft processes of this user; which they were.

    A directory counts only if it holds a marker (so nothing else named ``zmqsyft-*`` is ever
    touched) that no living process holds locked.
    """
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            fd = os.open(os.path.join(path, _MARKER), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # no marker (not ours, or its creator is still making it), or gone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its creator lives
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary directories of dead zmqsyft processes", len(removed))
    return removed


# ---------------------------------------------------------------- children
class _Spawner:
    """One long-lived thread that starts every worker process: a child's ``PR_SET_PDEATHSIG``
    fires when the *thread* that forked it ends, so a worker spawned from a short-lived thread
    (a pool's, a test's) would die with that thread instead of with this process. The thread is a
    daemon: it ends with the process, and the workers with it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], tuple[Any, ...], dict[str, Any]]] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(*args, **kwargs)``, run on the spawner thread (a Ctrl-C waits for
        it: the process is started and returned, never lost)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="zmqsyft-spawner",
                                                daemon=True)
                self._thread.start()
        job: Future[Any] = Future()
        with held_back(True):
            self._jobs.put((job, args, kwargs))
            return job.result()

    def _run(self) -> None:
        while True:
            job, args, kwargs = self._jobs.get()
            try:
                job.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                job.set_exception(exc)


popen = _Spawner().popen


def watch_child(proc: subprocess.Popen[bytes]) -> None:
    """Reap ``proc`` as soon as it exits (polled by a daemon thread while any child lives)."""
    global _reaper
    with _children_lock:
        _children.add(proc)
        if _reaper is None:
            _reaper = threading.Thread(target=_reap_children, name="zmqsyft-children", daemon=True)
            _reaper.start()


def _reap_children() -> None:
    global _reaper
    wakeup = threading.Event()  # (never set: a timed wait that an interpreter exit ends)
    while True:
        with _children_lock:
            for proc in [p for p in _children if p.poll() is not None]:
                _children.discard(proc)  # (poll() reaped it)
            if not _children:
                _reaper = None
                return
        wakeup.wait(_POLL)


def _after_fork() -> None:
    """A forked child has no reaper thread and none of these children, and holds no lock on
    its parent's directories (so they are swept once the parent dies, whatever the child)."""
    global _reaper
    _reaper = None
    _children.clear()
    for fd in _locks.values():
        os.close(fd)  # (closing our copy releases nothing the parent holds)
    _locks.clear()


os.register_at_fork(after_in_child=_after_fork)


def frozen(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, or traced): it would never answer."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def stop_all(procs: Iterable[subprocess.Popen[bytes]], bound: float) -> None:
    """Stop every process of ``procs`` at once and reap them all, within about ``bound`` s.

    Each running one is asked to exit (SIGTERM) at the same time; a frozen one is killed at
    once (it would never act on it); those still running after ``bound`` seconds in all are
    killed. Every one is reaped (no zombie is left).
    """
    running = []
    for proc in procs:
        if proc.poll() is not None:
            continue
        try:
            if frozen(proc.pid):
                proc.kill()
            else:
                proc.terminate()
        except OSError:
            pass
        running.append(proc)
    deadline = time.monotonic() + bound
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.debug("worker process %d did not exit within %gs: killed", proc.pid, bound)
            proc.kill()
    for proc in running:
        proc.wait()  # (killed ones: at once)
    with _children_lock:
        _children.difference_update(running)


def drop_deletes(queue: Any, addresses: set[str | None]) -> None:
    """Take the deletes for the workers at ``addresses`` out of ``queue`` (a deque of
    ``(address, id)``, which the reaper thread may be emptying meanwhile: no lock is taken,
    so a flush waiting on a frozen worker holds nothing up)."""
    kept = []
    while True:
        try:
            entry = queue.popleft()
        except IndexError:
            break
        if entry[0] not in addresses:
            kept.append(entry)
    queue.extend(kept)


# ------------------------------------------------------- interrupted requests
class _Discard:
    """Stands among an abandoned request's results: its error is dropped, not kept for a sync
    point (a connection keeps the errors of requests with no results and nobody waiting)."""

    @staticmethod
    def _mark_failed(exc: BaseException) -> None:
        pass


_DISCARD = _Discard()


def abandon(pending: Any, answered: dict[int, Any]) -> None:
    """The caller waiting for ``pending`` was interrupted: its reply, when it comes, is dropped
    (neither kept in ``answered`` for a ``wait()`` nor raised later); the pointers it keeps
    alive stay alive until then, so that no delete overtakes it."""
    answered.pop(pending.req_id, None)
    if not pending.done:
        pending.awaited = False
        if not any(r is _DISCARD for r in pending.results):  # (pointers compare with ==)
            pending.results = (*pending.results, _DISCARD)


class _Orphan:
    """Stands for an object an interrupted request creates; its collection frees the object."""

    __slots__ = ("__weakref__",)


def free_when_answered(conn: Any, since: int, what: str, track: Callable[[Any, str, int], Any],
                       free_later: Callable[[str, int], None], address: str, obj_id: int) -> None:
    """Free ``obj_id`` at ``address`` once the request that creates it has been answered: the
    last request ``what`` in flight on ``conn`` with an id from ``since`` on (what a caller
    knows when a Ctrl-C came before ``send()`` returned its id); at once if it has been
    answered already, or was never sent. An interrupted ``send()`` leaves nothing behind."""
    ids = [i for i, p in conn.inflight.items() if i >= since and p.what == what]
    if not ids:
        free_later(address, obj_id)
        return
    pending = conn.inflight[max(ids)]
    orphan = _Orphan()
    track(orphan, address, obj_id)  # the reaper frees it when the orphan is collected:
    pending.keep = (*pending.keep, orphan)  # when the answer (or the failure) drops `keep`
    abandon(pending, conn._answered)


_NOTHING = contextlib.nullcontext()
_poll, _POLLIN = zmq.zmq_poll, int(zmq.POLLIN)


def held_back(hold: bool) -> contextlib.AbstractContextManager[Any]:
    """``with held_back(True):`` a Ctrl-C (SIGINT) that comes inside the block is raised when
    it ends (in the main thread, where Python handles signals): a multipart message is then
    sent whole or not at all, never in part (which would garble the next one)."""
    if not hold or threading.current_thread() is not threading.main_thread():
        return _NOTHING
    return _HeldBack()


class _HeldBack:
    __slots__ = ("previous", "got")

    def __enter__(self) -> None:
        self.got: list[tuple[int, Any]] = []
        self.previous = signal.getsignal(signal.SIGINT)
        if callable(self.previous):  # (SIG_IGN, SIG_DFL: nothing to hold back)
            signal.signal(signal.SIGINT, lambda signum, frame: self.got.append((signum, frame)))

    def __exit__(self, *exc: object) -> None:
        if callable(self.previous):
            signal.signal(signal.SIGINT, self.previous)
            if self.got:
                self.previous(*self.got[0])  # (raises KeyboardInterrupt, by default)


class Interruptible:
    """Mixin for a connection: a Ctrl-C while a reply is being handled (a large one is being
    decoded) fails the request it answers, with a reason, instead of leaving it in flight for
    ever (then its waiter would time out, and the connection with it)."""

    inflight: dict[int, Any]

    def receive(self, frames: list[Any]) -> Any:
        try:
            return super().receive(frames)  # type: ignore[misc]
        except KeyboardInterrupt:
            req_id = (ack_id(frames[0]) or salvage_req_id(frames[0])) if frames else 0
            if req_id in self.inflight:
                self.answer(req_id, None, ZmqSyftError(  # type: ignore[attr-defined]
                    f"the reply to request {req_id} was lost: a Ctrl-C interrupted its reading; "
                    "what it did on the worker is unknown"))
            raise


def recv(sock: zmq.Socket, timeout_ms: int) -> list[Any]:
    """:func:`~zmqsyft.wire.transport.recv` of the next message within ``timeout_ms``
    (``zmq.Again`` if none), such that a Ctrl-C never loses one.

    pyzmq checks for signals after every receive, also a successful one: a SIGINT delivered to
    another thread while a blocking receive waits makes it raise ``KeyboardInterrupt`` with the
    message it has just taken off the socket. So the wait is a ``poll()`` (which takes
    nothing), and the receive does not block.
    """
    if not _poll(((sock, _POLLIN),), timeout_ms):  # (half the cost of sock.poll)
        raise zmq.Again()
    return transport.recv(sock, zmq.NOBLOCK)
