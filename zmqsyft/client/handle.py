"""A worker handle: the worker's id and address, its readiness, its liveness, its teardown.

A handle belongs to a session (:mod:`zmqsyft.client.session`), which it reaches through
``handle.session``; so does every pointer to an object on that worker (``ptr.location.session``).
The public methods a user calls on a worker (``_objects``, ``search``, ``run``, ``stats``) are
added by :class:`~zmqsyft.client.api.WorkerClient`.

A spawned worker reports its bound endpoint on a private pipe (the ready handshake) and is shut
down (then killed, if need be) by ``close()``, by ``with``, and at interpreter exit. The first use
of a spawned worker's handle waits for the ready signal, so several workers start in parallel.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
from typing import Any, Protocol

from ..config import Config
from ..errors import SpawnError, WorkerRestarted, WorkerUnavailable, ZmqSyftError
from ..wire.bodies import Shutdown
from ..wire.messages import Op
from . import interrupts

__all__ = ["WorkerHandle", "SessionLike"]

log = logging.getLogger(__name__)


class SessionLike(Protocol):
    """What a handle needs of its session."""

    @property
    def cfg(self) -> Config: ...

    foreign: str | None  # why it may not be used here (the child of a fork), else None

    def conn(self, worker: Any) -> Any: ...

    def forget(self, worker: Any) -> None: ...

    def drop_connections(self, worker: Any) -> None: ...

    def introduce(self, worker: Any) -> None: ...


class WorkerHandle:
    """A handle to one worker process, local (spawned) or remote (connected).

    Attributes
    ----------
    id : str
        The worker's name (``"bob"``).
    address : str
        The endpoint its ROUTER is bound to; waits for a spawned worker to be ready.
    pid : int
        The worker's process id (as the worker reports it).
    session : Session
        The session this handle, and every pointer to this worker, belongs to.
    """

    def __init__(self, session: SessionLike, name: str, address_hint: str,
                 proc: subprocess.Popen[bytes] | None = None, ready_fd: int | None = None) -> None:
        self.session = session
        self.id = name
        self.address_hint = address_hint
        self._proc = proc
        self._ready_fd = ready_fd
        self._ready_lock = threading.Lock()
        self._ready_buf = b""  # what the worker wrote on the ready pipe so far
        self._ready_address: str | None = None if ready_fd is not None else address_hint
        # (a forked one's pid may still be on its way: the ready line says it too)
        self._pid: int | None = proc.pid if isinstance(proc, subprocess.Popen) else None
        self._spawn_deadline = time.monotonic() + session.cfg.spawn_timeout
        self.closed = False
        self.dirty = False  # it may have relayed requests on: sync() must FLUSH it
        self.trust_token: str | None = None  # presented in HELLO: lets us send pickled code
        self.private_dir: str | None = None  # the ipc socket's directory, made by spawn_worker
        self.key = ""  # the worker's public key (Z85 text; "": insecure)
        self.told: set[str] = set()  # other workers' public keys it knows (at start, by ALLOW)
        self.client_keys: Any = None  # the KeyPair we present to it (None: the session's)
        self.spawned = proc is not None  # by this process: we are its admin
        self.lease = 0.0  # how long it keeps our objects once we are disconnected (its HELLO)
        # the worker process we know (its HELLO's incarnation); each restart met counts a
        # generation, and pointers made before it name objects that are gone
        self.incarnation = ""
        self.generation = 0
        self.restarted_at = 0.0  # when its current process started (epoch seconds)
        self.lost: str | None = None  # why it was last found unreachable, until it answers again
        self.loss: WorkerUnavailable | None = None  # the first error that loss made
        self.loss_reported = False  # an error about that loss has reached the caller

    # ----------------------------------------------------------- readiness
    @property
    def address(self) -> str:
        if self._ready_address is None:
            with self._ready_lock:  # several threads may make the first use at once
                if self._ready_address is None:
                    self._wait_ready()
        assert self._ready_address is not None
        return self._ready_address

    @property
    def ready(self) -> bool:
        """Whether the worker's address is known (a spawned one has reported ready)."""
        return self._ready_address is not None

    def at(self, address: str) -> bool:
        """Whether this open handle stands for the worker bound at ``address``."""
        return not self.closed and (self._ready_address or self.address_hint) == address

    @property
    def pid(self) -> int | None:
        if self._pid is None:
            self._pid = self.session.conn(self).peer_info().pid
        return self._pid

    def _wait_ready(self) -> None:
        fd = self._ready_fd
        if fd is None:
            self._check_open()
            if self.session.foreign is not None:  # (a fork's child: see left_behind)
                raise WorkerUnavailable(f"worker '{self.id}' {self.session.foreign}")
            raise SpawnError(f"worker '{self.id}' never reported ready")
        # what was read is kept, and the pipe stays open, if a Ctrl-C interrupts the wait: the
        # next use of the handle waits on
        while b"\n" not in self._ready_buf:
            remaining = self._spawn_deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], min(max(remaining, 0.0), 0.5))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self._ready_buf += chunk
            elif remaining <= 0:
                self._close_ready_fd()
                self._kill()
                self.closed = True
                raise SpawnError(
                    f"worker '{self.id}' did not report ready within "
                    f"{self.session.cfg.spawn_timeout:g}s; it was killed")
        self._close_ready_fd()
        buf = self._ready_buf
        line = buf.decode(errors="replace").strip()
        if not line.startswith("READY "):
            code = self._proc.wait(timeout=5) if self._proc is not None else None
            self.closed = True
            if getattr(self._proc, "error", None):  # (never forked)
                raise SpawnError(f"worker '{self.id}' could not start: {self._proc.error}")
            raise SpawnError(
                f"worker '{self.id}' exited (code {code}) before it was ready; its error output "
                "is above")
        parts = line.split()
        if self.key and (len(parts) < 4 or parts[3] != self.key):
            self._kill()
            self.closed = True
            raise SpawnError(f"worker '{self.id}' reported ready with another key than the one it "
                             "was given; it was killed")
        self._ready_address = parts[1]
        if self._pid is None and parts[2].isdigit():
            self._pid = int(parts[2])
        self.session.introduce(self)

    # ------------------------------------------------------------- liveness
    def met(self, incarnation: str, started_ms: int, pid: int) -> None:
        """A HELLO reply came: the worker answers again; another process than the one known
        means it was restarted, and objects of the earlier one are gone."""
        self.lost, self.loss, self.loss_reported = None, None, False
        if not incarnation or incarnation == self.incarnation:
            return
        if self.incarnation:
            self.generation += 1
            self.restarted_at = started_ms / 1000
            self._pid = pid or None
            log.warning("worker '%s' at %s was restarted (a new process, pid %s); objects from "
                        "before are gone", self.id, self._ready_address, pid)
        self.incarnation = incarnation

    def restarted(self, obj_id: int, what: str) -> WorkerRestarted:
        """The error for using object ``obj_id`` of an earlier incarnation of this worker."""
        when = time.strftime("%H:%M:%S", time.localtime(self.restarted_at))
        what = what.replace(f" of object {obj_id}", "")  # (named once is enough)
        return WorkerRestarted(
            f"cannot use object {obj_id} for {what}: worker '{self.id}' at {self._ready_address} "
            f"was restarted at {when} (a new process, pid {self._pid}); objects from before are "
            "gone. Send the data to it again")

    def _close_ready_fd(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None

    def _exit_status(self) -> str | None:
        """``None`` while the worker may be alive; otherwise why it is not."""
        if self.closed:
            return "closed"
        if self._proc is not None:
            code = self._proc.poll()
            if code is not None and code < 0:
                return f"its process was killed by signal {_signal_name(-code)}"
            if code is not None:
                return f"its process exited with code {code}"
        return None

    def _check_open(self) -> None:
        if self.closed:
            raise WorkerUnavailable(f"worker '{self.id}' was closed")

    def left_behind(self) -> None:
        """In the child of a fork: the worker process, its ready pipe and its private directory
        are the parent's; closing this handle here only forgets it."""
        self._proc = None
        self._ready_fd = None
        self.private_dir = None
        self.spawned = False

    # ------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Ask the worker process to exit (also one this process did not spawn)."""
        if self.closed:
            return
        try:
            self.session.conn(self).request(Op.SHUTDOWN, Shutdown(), what="shutdown")
        except ZmqSyftError:
            pass
        self._teardown()

    def close(self) -> None:
        """Close the handle. A worker this process spawned is shut down (killed if it hangs)."""
        if self.closed:
            return
        if self._proc is not None:
            if self._proc.poll() is None and self._ready_fd is None:
                try:
                    conn = self.session.conn(self)
                    conn.wait(conn.send(Op.SHUTDOWN, Shutdown(), what="shutdown"), timeout=1.0)
                except ZmqSyftError:
                    pass
            elif self._proc.poll() is None:  # never used (not even ready): nothing of ours on it
                self._proc.terminate()
            self._reap(self.session.cfg.close_timeout)
        self._teardown()

    def _teardown(self) -> None:
        self.session.drop_connections(self)
        self.closed = True
        self.session.forget(self)
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        if self.private_dir is not None and (self._proc is None or self._proc.poll() is not None):
            interrupts.remove_dir(self.private_dir)
            self.private_dir = None

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        self._close_ready_fd()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close_at_exit(self) -> None:
        """Interpreter exit: stop a spawned worker (killed at once if frozen, or if it hangs),
        reap it, remove its private directory. The session stops all at once first
        (:func:`~zmqsyft.client.interrupts.stop_all`)."""
        if self._proc is None or self.closed:
            return
        interrupts.stop_all([self._proc], 2.0)
        self._reap(0)
        self.closed = True
        self._remove_private_dir()

    def __enter__(self) -> WorkerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._ready_address or self.address_hint
        state = " closed" if self.closed else ""
        pid = f" pid={self._pid}" if self._pid else ""
        return f"<WorkerClient {self.id} {where}{pid}{state}>"

    # identity, as object's own (C-level: a handle is hashed for every op, finding its
    # connection): one handle, one worker
    __hash__ = object.__hash__
    __eq__ = object.__eq__


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
