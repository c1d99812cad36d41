"""What a caller is told when a worker dies, freezes or cannot be reached.

Two cases, kept apart because they mean different things to the caller's code: a request that
**was not sent** (the worker was known to be gone before it left: ``WorkerUnavailable``, nothing
happened) and one that **had left** when the worker was lost (``OutcomeUnknown``: it may or may
not have taken effect). Both name the worker, say what was found, and what to do.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import LimitExceeded, OutcomeUnknown, WorkerUnavailable
from ..wire.transport import REFUSED, REFUSED_ADVICE
from .handle import WorkerHandle

__all__ = ["gone", "outcome_unknown", "describe", "refused", "restarted", "unsent", "report",
           "quietly"]

_quiet = threading.local()


def report(worker: WorkerHandle) -> None:
    """An error about ``worker``'s loss is on its way to the caller (unless this thread is
    settling quietly: the reaper, ``sync()`` before it decides what to say)."""
    if not getattr(_quiet, "on", False):
        worker.loss_reported = True


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Errors met in this block are swallowed or decided on by the caller: they do not count
    as said to the user."""
    before = getattr(_quiet, "on", False)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = before


def describe(worker: WorkerHandle, why: str) -> str:
    """``why`` (an exit status, a monitor's finding) as a sentence about ``worker``."""
    status = worker._exit_status()
    if status is not None and status != "closed":
        return f"worker '{worker.id}' is not running: {status}"
    where = worker._ready_address or worker.address_hint
    return f"worker '{worker.id}' at {where} could not be reached: {why}"


def gone(worker: WorkerHandle, why: str, what: str) -> WorkerUnavailable:
    """``what`` was not sent: ``worker`` is known to be gone. Nothing of it happened."""
    report(worker)
    advice = ("spawn it again" if worker.spawned else
              "start it again (a request after it is back reconnects)")
    exc = WorkerUnavailable(f"{describe(worker, why)}; {what} was not sent ({advice})")
    worker.lost = worker.lost or why or "gone"
    worker.loss = worker.loss or exc
    return exc


def outcome_unknown(worker: WorkerHandle, why: str, what: str) -> OutcomeUnknown:
    """``what`` had left when ``worker`` was lost: whether it took effect is unknown."""
    worker.lost = why or "lost"
    exc = OutcomeUnknown(
        f"{describe(worker, why)}; {what} had been sent and got no answer: whether it took effect "
        "there is unknown (objects it made or changed may or may not exist)")
    worker.loss = worker.loss or exc
    return exc


def refused(worker: WorkerHandle, status: int, what: str) -> LimitExceeded:
    """``worker`` refused our connection during its handshake (ZAP ``status``)."""
    return LimitExceeded(f"worker '{worker.id}' at {worker.address} {REFUSED}; {what} (ZAP "
                         f"status {status}). {REFUSED_ADVICE}.")


def unsent(worker: WorkerHandle, exc: BaseException, what: str) -> BaseException:
    """The error for ``what``, still queued (never sent) when its connection failed with
    ``exc``: nothing of it happened, whatever ``exc`` says of what had left."""
    if not isinstance(exc, OutcomeUnknown):
        return exc
    return WorkerUnavailable(f"{describe(worker, worker.lost or str(exc))}; {what} was queued "
                             "and never sent: nothing of it happened")


def restarted(worker: WorkerHandle, keep: tuple[Any, ...], results: tuple[Any, ...],
              what: str) -> None:
    """``worker`` was found restarted as a request was about to leave: it may not name objects
    of the earlier process (``WorkerRestarted``); the results it makes are the new one's."""
    gen = worker.generation
    for ptr in keep:
        if getattr(ptr, "location", None) is worker and ptr._gen != gen:
            raise worker.restarted(ptr.id_at_location, what)
    for ptr in results:
        ptr._gen = gen
