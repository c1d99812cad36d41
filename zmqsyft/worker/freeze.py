"""Noticing that this worker was frozen, and which connections that ended.

A worker stopped for longer than its callers wait (``SIGSTOP``, a suspended VM, a debugger) was
given up on: each caller's heartbeats went unanswered, its connection was closed, and what it had
in flight was reported as failed (``OutcomeUnknown``). The requests still queued for the worker
must then not run when it resumes, or they would take effect after their callers were told they
failed. :class:`FreezeWatch` notices the freeze (a ticker thread stops ticking; the process used
little CPU meanwhile, so it was not merely busy) before the next request is handled, and ends
every connection known before it: their requests are answered ``RequestDropped`` and not run,
and their callers reconnect (a new connection, a new routing id, which is served).
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["FreezeWatch"]

log = logging.getLogger("zmqsyft.worker")

_TICK_S = 0.05
_KEPT = 1 << 16  # routing ids remembered (known, and ended); the oldest are forgotten


class FreezeWatch:
    """The ticker and the connections a freeze ended.

    Parameters
    ----------
    grace : float
        A gap longer than this, in which the process used less than half as much CPU time, is
        a freeze (a caller gives up on a silent worker two heartbeat intervals after the ping
        that went unanswered, so never for a shorter freeze: this is two of them).
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.freezes = 0
        self._tick = (time.monotonic(), time.process_time())
        self._seen = 0.0  # a freeze the ticker noticed first (seconds), for the loop to act on
        self._known: dict[bytes, None] = {}
        self._ended: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zmqsyft-freeze", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_TICK_S):  # (after a freeze, this may run before the loop)
            gap = self._gap()
            if gap:
                self._seen = gap
            self._tick = (time.monotonic(), time.process_time())

    def _gap(self) -> float:
        mono, cpu = self._tick
        gap = time.monotonic() - mono
        return gap if gap > self.grace and time.process_time() - cpu < gap / 2 else 0.0

    def ended(self, ident: bytes) -> float | None:
        """Before a request from ``ident`` is handled: the length of the freeze that ended its
        connection, or ``None`` (it is served; it is known from now on)."""
        mono, cpu = self._tick  # (self._gap(), inline: this runs for every request)
        gap = time.monotonic() - mono
        if gap <= self.grace or time.process_time() - cpu >= gap / 2:
            gap = self._seen
        if gap:
            self._seen = 0.0
            self._frozen(gap)
        if self._ended:
            seconds = self._ended.get(ident)
            if seconds is not None:
                return seconds
        known = self._known
        if ident not in known:
            known[ident] = None
            if len(known) > _KEPT:
                del known[next(iter(known))]
        return None

    def _frozen(self, gap: float) -> None:
        self.freezes += 1
        self._tick = (time.monotonic(), time.process_time())
        log.warning("worker was frozen for %.1fs (longer than its callers wait): the %d "
                    "connection(s) it knew are ended; their queued requests are dropped unrun",
                    gap, len(self._known))
        for ident in self._known:
            self._ended[ident] = gap
        self._known.clear()
        while len(self._ended) > _KEPT:
            del self._ended[next(iter(self._ended))]

    def close(self) -> None:
        self._stop.set()
