"""What the worker's loop does with a message it cannot take in: count it, log it, and tell its
sender why where the message names a request. Nothing stored is ever touched: receiving and
decoding come before any handler."""

from __future__ import annotations

import logging
from typing import Any

import zmq

from ..errors import HandoverRefused, UntrustedPayload
from ..wire import transport
from ..wire.messages import salvage_req_id
from .context import Ctx, Services
from .leases import Holder

__all__ = ["dropped", "undecodable"]

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
