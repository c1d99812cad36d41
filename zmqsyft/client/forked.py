"""A worker forked by the fork server (:mod:`zmqsyft.client.forks`), seen as a
``subprocess.Popen``."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from ..errors import SpawnError

__all__ = ["ForkedProcess"]

_STATUS_WAIT = 2.0  # seconds an exited worker's status may take to come from the fork server


class ForkedProcess:
    """A worker forked by the fork server, seen as a ``subprocess.Popen``: ``pid``, ``args``,
    ``poll()``, ``wait(timeout)`` (``subprocess.TimeoutExpired``), ``send_signal()``,
    ``terminate()``, ``kill()`` and ``returncode`` (negative: the signal that ended it).

    It exists as soon as its fork is asked for (the fork server forks one request after the
    other while we go on); until the answer comes, ``poll()`` says it runs, a signal is sent
    once it exists, ``pid`` and ``wait()`` wait for the answer. A fork that failed has
    ``returncode`` 1 and ``error`` saying why. Signals go through a pidfd, which names this
    process and no other, even once the fork server has reaped it and its pid is reused. If the
    fork server dies first, the worker dies of its parent-death signal: it is then reported
    killed by SIGKILL once it has ended.
    """

    stdin = stdout = stderr = None

    def __init__(self, args: list[str], stuck: Callable[[], None] = lambda: None,
                 deadline: float = float("inf")) -> None:
        self.args = args
        self.returncode: int | None = None
        self.error: str | None = None  # why it was never forked
        self._pid: int | None = None
        self._pidfd = -1
        self._stuck, self._deadline = stuck, deadline  # (the fork server's answer is overdue)
        self._known = threading.Event()  # forked (pid, pidfd), or failed
        self._done = threading.Event()  # its status came, or the fork server is gone
        self._lock = threading.Lock()
        self._signal: int | None = None  # asked for before it was forked: sent once it is

    def _forked(self, pid: int, pidfd: int) -> None:
        with self._lock:
            self._pid, self._pidfd = pid, pidfd
            self._known.set()
            signum = self._signal
        if signum is not None:
            self.send_signal(signum)

    def _failed(self, why: str) -> None:
        with self._lock:
            if not self._known.is_set():
                self.error, self.returncode = why, 1
                self._known.set()
        self._done.set()

    def await_fork(self, timeout: float | None) -> bool:
        """Whether its fork was answered within ``timeout`` s; past its deadline the fork server
        is taken for stuck and killed (which fails it)."""
        if self._known.is_set():
            return True
        end = None if timeout is None else time.monotonic() + timeout
        while not self._known.is_set():
            now = time.monotonic()
            if now >= self._deadline:
                self._stuck()
                return self._known.wait(_STATUS_WAIT)
            if end is not None and now >= end:
                return False
            until = self._deadline if end is None else min(self._deadline, end)
            self._known.wait(until - now)
        return True

    @property
    def settled(self) -> bool:
        """Whether the fork server has answered: forked, or failed (``error``)."""
        return self._known.is_set()

    @property
    def pid(self) -> int:
        """Its process id (waits for the fork server's answer; ``SpawnError`` if it failed)."""
        self.await_fork(None)
        if self._pid is None:
            raise SpawnError(self.error or "the worker was never forked")
        return self._pid

    def _exited(self, code: int) -> None:
        with self._lock:
            if self.returncode is None:
                self.returncode = code
        self._done.set()

    def _orphaned(self) -> None:
        self._done.set()

    def _ended(self, timeout: float) -> bool:
        """Whether the process has ended (exited, reaped or not) within ``timeout`` seconds."""
        readable, _, _ = select.select([self._pidfd], [], [], max(timeout, 0.0))
        return bool(readable)

    def _settle(self, timeout: float) -> bool:
        """No status will come (the fork server died): once the process has ended, it was
        killed by its parent-death signal."""
        if not self._ended(timeout):
            return False
        with self._lock:
            if self.returncode is None:
                self.returncode = -signal.SIGKILL
        return True

    def poll(self) -> int | None:
        if not self._known.is_set():
            return None  # (being forked)
        if self.returncode is None and self._ended(0):  # its status is on its way
            if self._done.wait(_STATUS_WAIT) and self.returncode is None:
                self._settle(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.await_fork(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._done.wait(remaining):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        if self.returncode is None:  # the fork server died before it reported this one
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is None:
                select.select([self._pidfd], [], [])
            if not self._settle(0 if remaining is None else remaining):
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with self._lock:
            if not self._known.is_set():  # sent once it is forked (SIGKILL wins)
                if self._signal != signal.SIGKILL:
                    self._signal = signum
                return
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:  # (it has ended: its status is on its way)
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        try:
            if self._pidfd >= 0:
                os.close(self._pidfd)
        except (OSError, AttributeError):
            pass

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self._pid} returncode={self.returncode}>"
