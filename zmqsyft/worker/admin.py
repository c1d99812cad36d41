"""Handlers about the worker itself: HELLO, PING, STATS, SHUTDOWN, ALLOW.

HELLO is the first message of every connection: the caller names its session (what it stores is
kept for that session, see :mod:`~zmqsyft.worker.leases`), may present a trust token (a match
lets that connection send pickled payloads) and its host key (a match lets both ends send large
tensors through shared memory). Who the caller *is* comes from its connection's key, never from
what it says here.

SHUTDOWN and ALLOW are for admins only; STATS shows an admin everything, anyone else its own
share (its objects and bytes, its traffic).
"""

from __future__ import annotations

import hmac
import logging
import os

import zmq.utils.z85

from ..errors import AccessDenied, ProtocolError
from ..wire.bodies import (
    Allow,
    Hello,
    HelloReply,
    Ping,
    PingReply,
    Shutdown,
    Stats,
    StatsReply,
)
from ..wire.messages import PROTOCOL_VERSION
from ..wire.rpc import shm_match
from ..wire.shm import host_key
from . import results
from .access import INSECURE, Principal
from .context import Ctx, Services

__all__ = ["hello", "ping", "stats", "shutdown", "allow", "require_admin"]

log = logging.getLogger("zmqsyft.worker")


def require_admin(w: Services, ctx: Ctx, what: str) -> None:
    """Refuse (``AccessDenied``) unless the caller is one of the worker's admins."""
    if not ctx.who.admin:
        raise AccessDenied(
            f"{what} on worker '{w.id}' is for its admins (the process that spawned it, and keys "
            f"it was started with --admin KEYFILE); you are {ctx.who.label}")


def hello(w: Services, ctx: Ctx, body: Hello) -> None:
    who = ctx.who
    if w.access.insecure:  # nobody is authenticated: the name it gives labels its traffic
        who = Principal("", body.peer[:64] or INSECURE.name, admin=True)
    ctx.holder = w.leases.hello(ctx.ident, who, body.session, w.header)
    if body.trust and any(hmac.compare_digest(body.trust, t) for t in w.trust_tokens):
        w.trusted.add(ctx.ident)
    sealed = (w.sealed.hello(ctx.ident, body.bulk, body.sealed_replies) if w.sealed is not None
              else False)
    if shm_match(body.host):  # a peer on this machine may hand us large tensors in shared memory
        w.shm_callers.add(ctx.ident)
    else:
        w.shm_callers.discard(ctx.ident)
    who = ctx.who
    w.reply(ctx, HelloReply(id=w.id, pid=os.getpid(), version=PROTOCOL_VERSION, address=w.address,
                            trusted=who.trusted or ctx.ident in w.trusted, host=host_key(),
                            shm=ctx.ident in w.shm_callers,
                            max_message_size=w.cfg.max_message_size, worker_key=w.key,
                            principal=who.name, admin=who.admin,
                            lease_ms=int(w.cfg.lease * 1000), incarnation=w.incarnation,
                            started_ms=w.started_ms,
                            bulk=w.sealed.endpoint if sealed and w.sealed is not None else ""))


def ping(w: Services, ctx: Ctx, body: Ping) -> None:
    w.reply(ctx, PingReply(id=w.id))


def shutdown(w: Services, ctx: Ctx, body: Shutdown) -> None:
    require_admin(w, ctx, "SHUTDOWN")
    log.info("worker %s: shutting down, as %s asked", w.id, ctx.who.label)
    w.reply(ctx)
    w.stop()


def stats(w: Services, ctx: Ctx, body: Stats) -> None:
    results.drain()  # (counts what is left once what was freed before has gone)
    principals = w.leases.by_principal()
    peers = w.traffic.by_name()
    who = ctx.who
    if who.admin:
        counters = dict(w.traffic.counters)
        counters["connections_open"] = w.gate.open_connections  # the gate's thread keeps these
        counters["connections_refused"] = w.gate.refused
        objects = len(w.store)
    else:  # the caller's own share
        principals = {k: v for k, v in principals.items() if k == who.label}
        peers = {k: v for k, v in peers.items() if k == who.label}
        counters = {}
        objects = principals.get(who.label, {}).get("objects", 0)
    w.reply(ctx, StatsReply(id=w.id, objects=objects, counters=counters, peers=peers,
                            principals=principals))


def allow(w: Services, ctx: Ctx, body: Allow) -> None:
    """Know more keys from now on (an admin introduces the workers it spawned to each other)."""
    require_admin(w, ctx, "ALLOW")
    if w.access.insecure:
        w.reply(ctx)
        return
    checked = []
    for name, key in body.keys.items():
        if type(name) is not str or type(key) is not str or len(key) != 40:
            raise ProtocolError(f"ALLOW: {name!r} -> {key!r} is not a name and a public key")
        try:
            zmq.utils.z85.decode(key)
        except Exception:  # noqa: BLE001
            raise ProtocolError(f"ALLOW: the key of {name!r} is not Z85 text") from None
        checked.append(Principal(key, name[:64]))
    for principal in checked:
        w.access.allow(principal)
    w.reply(ctx)
