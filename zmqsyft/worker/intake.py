"""What the worker's loop does with a message it cannot take in: count it, log it, and tell its
sender why where the message names a request. Nothing stored is ever touched: receiving and
decoding come before any handler."""

from __future__ import annotations

import logging
from typing import Any

import zmq

from ..errors import HandoverRefused, ProtocolError, RequestDropped, UntrustedPayload
from ..wire import transport
from ..wire.bodies import Batch
from ..wire.codec import decode_message
from ..wire.messages import NO_REPLY, Op, salvage_req_id
from .context import Ctx, Services
from .leases import Holder

__all__ = ["dropped", "undecodable", "ended", "batch"]

log = logging.getLogger("zmqsyft.worker")

_UNTRUSTED = (
    "worker '{}' refused a pickled payload (code, a module, an optimizer): it does not trust this "
    "sender. A worker started with spawn_worker() trusts its parent; one started from the shell "
    "trusts keys given with --trust KEYFILE, and sy.connect(address, ..., trust_token=T) when "
    "started with --trust-token-file FILE holding T (mode 600). Tensors and pointers need no trust.")


def dropped(w: Services, sock: zmq.Socket, exc: Exception) -> None:
    """A message that could not be received or handled: counted, logged, and the loop goes on.
    A caller whose request was too large to keep is told why, if its header names the request
    (``sock``: the worker's ROUTER, or a peer link's socket)."""
    w.traffic.counters["dropped_malformed"] += 1
    side = "a caller" if sock is w.router else "a peer worker"
    log.warning("worker %s: a message from %s was dropped: %s: %s", w.id, side,
                type(exc).__name__, exc)
    head = getattr(exc, "head", None)
    if sock is w.router and isinstance(exc, transport.Dropped) and head and len(head) > 1:
        req_id = salvage_req_id(head[1])
        if req_id:
            w.reply_error(Ctx(head[0], req_id), exc)


def undecodable(w: Services, ident: bytes, frames: list[Any], exc: Exception, nested: bool,
                holder: Holder) -> None:
    """A request that did not decode (``nested``: inside a ``BATCH``, counted with it): refused
    pickles, refused hand-overs and malformed messages, each counted apart; its sender is told
    if the request id can be salvaged."""
    if not nested:
        w.traffic.count(holder.principal.label, "in", frames[1:])
    counters = w.traffic.counters
    if isinstance(exc, UntrustedPayload):
        counters["refused_untrusted"] += 1
        exc = UntrustedPayload(_UNTRUSTED.format(w.id))
    elif isinstance(exc, HandoverRefused):  # the sender retries with a copy
        counters["handovers_refused"] += 1
    else:
        counters["dropped_malformed"] += 1
        log.warning("worker %s: undecodable message from %s: %s", w.id, ident.hex(), exc)
    req_id = salvage_req_id(frames[1])
    if req_id:
        w.reply_error(Ctx(ident, req_id, holder), exc)


def ended(w: Services, ident: bytes, frames: list[Any], frozen: float) -> None:
    """A message on a connection that a freeze of ``frozen`` seconds ended: nothing of it runs;
    each request in it is answered ``RequestDropped`` (its caller, if still there, reconnects)."""
    w.traffic.counters["dropped_ended"] += 1
    req_ids = [salvage_req_id(frames[1])] if len(frames) > 1 else []
    if req_ids == [NO_REPLY] and len(frames) == 2:  # a BATCH: each request in it
        try:
            msg = decode_message(frames[1:], trusted=False)
            if msg.op is Op.BATCH:
                req_ids = [salvage_req_id(raw) for raw in Batch.from_wire(msg.body).msgs]
        except Exception:  # noqa: BLE001 - nothing to answer then
            req_ids = []
    exc = RequestDropped(
        f"worker '{w.id}' dropped this request without running it: the worker was frozen for "
        f"{frozen:.1f}s, longer than its callers wait, so the connection it came on had ended "
        "(its caller was told the worker is unavailable). Nothing of it took effect; send it "
        "again (a new connection is served)")
    for req_id in req_ids:
        if req_id != NO_REPLY:
            w.reply_error(Ctx(ident, req_id), exc)


def batch(w: Services, ident: bytes, body: dict[str, Any]) -> list[bytes]:
    """The messages of a ``BATCH`` (none, counted and logged, if it is malformed)."""
    try:
        return Batch.from_wire(body).msgs
    except ProtocolError as exc:
        w.traffic.counters["dropped_malformed"] += 1
        log.warning("worker %s: BATCH from %s dropped: %s", w.id, ident.hex(), exc)
        return []
