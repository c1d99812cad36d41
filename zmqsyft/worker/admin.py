"""Handlers about the worker itself: HELLO, PING, STATS, SHUTDOWN.

HELLO is the first message of every connection: the caller names itself (for the traffic
counters), may present a trust token (a match lets that connection send pickled payloads) and its
host key (a match lets both ends send large tensors through shared memory).
"""

from __future__ import annotations

import hmac
import os

from ..wire.bodies import Hello, HelloReply, Ping, PingReply, Shutdown, Stats, StatsReply
from ..wire.messages import PROTOCOL_VERSION
from ..wire.rpc import shm_match
from ..wire.shm import host_key
from .context import Ctx, Services

__all__ = ["hello", "ping", "stats", "shutdown"]


def hello(w: Services, ctx: Ctx, body: Hello) -> None:
    if body.peer:
        w.traffic.labels[ctx.ident.hex()] = body.peer[:64]
    if body.trust and any(hmac.compare_digest(body.trust, t) for t in w.trust_tokens):
        w.trusted.add(ctx.ident)
    if shm_match(body.host):  # a peer on this machine may hand us large tensors in shared memory
        w.shm_callers.add(ctx.ident)
    else:
        w.shm_callers.discard(ctx.ident)
    w.reply(ctx, HelloReply(id=w.id, pid=os.getpid(), version=PROTOCOL_VERSION, address=w.address,
                            trusted=ctx.ident in w.trusted, host=host_key(),
                            shm=ctx.ident in w.shm_callers,
                            max_message_size=w.cfg.max_message_size))


def ping(w: Services, ctx: Ctx, body: Ping) -> None:
    w.reply(ctx, PingReply(id=w.id))


def shutdown(w: Services, ctx: Ctx, body: Shutdown) -> None:
    w.reply(ctx)
    w.stop()


def stats(w: Services, ctx: Ctx, body: Stats) -> None:
    counters = dict(w.traffic.counters)
    counters["connections_open"] = w.gate.open_connections  # the gate's thread keeps these
    counters["connections_refused"] = w.gate.refused
    w.reply(ctx, StatsReply(id=w.id, objects=len(w.store), counters=counters,
                            peers=w.traffic.by_name()))
