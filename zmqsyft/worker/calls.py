"""The CALL handler: run an allow-listed op here, or relay it along a pointer chain.

An op whose arguments are all here runs here (:mod:`zmqsyft.worker.executor`). One whose
arguments are pointers to one other worker is relayed there, renamed into that worker's ids; with
caller-chosen result ids (``out``) the relay stores pointers to the results the next hop will
create and answers at once, without waiting for the next hop. A failed op leaves an error marker
under each result id, so that using the result raises the error.

**Who may use what.** An op's arguments must be the caller's own objects, or objects shared with
it read-only (``search()`` results): those can be computed with, but not changed (no in-place op
on them, not an ``out=`` target), and a result that would share their memory (a view) is made a
copy, so that what the caller owns never aliases what it may only read. Anything else is
reported missing, as an id that does not exist. Results belong to the caller's session.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

from .. import allowlist, secret
from ..errors import (
    AccessDenied,
    LimitExceeded,
    LocationMismatch,
    ObjectNotFound,
    ProtocolError,
    ZmqSyftError,
)
from ..ids import new_id
from ..privacy import EMPTY, Labels
from ..wire.bodies import Call, CallReply
from ..wire.exc_codec import encode_exception
from ..wire.messages import Message, ObjRef, Op, PointerDesc
from ..wire.tensors import dtype_name
from . import costs, executor, labels, results
from .access import Principal
from .chains import explained, record, restarted
from .context import Ctx, Services
from .leases import Holder
from .objects import resolve
from .store import ErrorMarker, PointerRecord

__all__ = ["call", "describe", "MAX_HOPS"]

log = logging.getLogger(__name__)
_RELAYED = object()  # a CALL sent on to the next hop: its reply is on its way
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype})  # passed to an op as they are
MAX_HOPS = 32  # longest pointer chain a CALL is relayed along (crafted cycles end here)


def call(w: Services, ctx: Ctx, body: Call) -> None:
    name, out = body.fn, body.out
    try:
        outcome = _run(w, ctx, body)
    except Exception as exc:
        # the caller may already hold pointers to the results: make their use raise this
        if w.store._labels and not isinstance(exc, ZmqSyftError) and labels.of_refs(
                w, [r.id for r in executor.refs_in((body.args, body.kwargs))]):
            exc.args = (labels.redact(str(exc)),)  # (its message may quote private values)
        _poison(w, out, exc, str(name), ctx.holder)
        raise
    if outcome is _RELAYED:
        return
    result, labelled = outcome
    if name.endswith(".__set__") and body.args and type(body.args[0]) is ObjRef:
        w.store.recount(body.args[0].id)  # x.data = y: x may hold more than it did
    if out is not None or allowlist.is_inplace(name):
        w.reply(ctx)
    else:
        labels.check_values(w, ctx.who.key, labelled, result, name)
        w.reply(ctx, CallReply(result=describe(w, result, name, ctx.holder, labelled)))


def _run(w: Services, ctx: Ctx, body: Call) -> Any:
    """``(result, its labels)``, or ``_RELAYED``."""
    name, args, kwargs, out = body.fn, body.args, body.kwargs, body.out
    func = allowlist.lookup(name)  # refuse before touching anything
    key = ctx.who.key
    if not kwargs:
        local = _local_args(w, args, key)
        if local is not None:  # the common case: the caller's tensors held here, plain values
            cost = _admit(w, ctx, name, func, local, kwargs, body.grad)
            labelled = (labels.of_refs(w, [a.id for a in args if type(a) is ObjRef])
                        if w.store._labels else EMPTY)
            return _labelled(w, ctx, name, func, local, kwargs, body.grad, out, cost, labelled)
        relay = _remote_args(w, args, key)
        if relay is not None:  # the common chain case: pointers to one other worker
            _forward(w, ctx, body, relay[1], kwargs, relay[0])
            return _RELAYED
    refs = executor.refs_in((args, kwargs))
    store, who = w.store, ctx.who
    for ref in refs:
        if not store.usable(ref.id, who):
            raise ObjectNotFound(store.missing(ref.id))
    shared = [ref.id for ref in refs if _read_only(w, ref.id, who)]
    if shared:
        _check_writes(w, name, args, kwargs, set(shared))
    resolved = {ref.id: resolve(w, ref.id, ctx.who) for ref in refs}
    remote = [o for o in resolved.values() if isinstance(o, PointerRecord)]
    if remote:
        _relay(w, ctx, body, resolved, remote)
        return _RELAYED
    args, kwargs = executor.substitute((args, kwargs), lambda ref: resolved[ref.id])
    cost = _admit(w, ctx, name, func, args, kwargs, body.grad)
    labelled = labels.of_refs(w, resolved)
    return _labelled(w, ctx, name, func, args, kwargs, body.grad, out, cost, labelled,
                     [resolved[i] for i in shared])


def _read_only(w: Services, obj_id: int, who: Principal) -> bool:
    """Whether ``who`` may only read the object, or what the pointers here it leads through
    point to (a pointer of its own to a search() result is no licence to change that)."""
    store = w.store
    for _ in range(MAX_HOPS):
        if store.read_only(obj_id, who):
            return True
        obj = store._objects.get(obj_id)
        if not (type(obj) is PointerRecord and obj.address in w.addresses):
            return False
        obj_id = obj.id_at_location
    return True


def _labelled(w: Services, ctx: Ctx, name: str, func: Any, args: Any, kwargs: Any, grad: bool,
              out: Any, cost: costs.Cost, labelled: Labels, shared: list[Any] | None = None
              ) -> tuple[Any, Labels]:
    """Run the op; what it changed gains its inputs' labels; its results carry them."""
    changes = labels.Changes(w, name, [*args, *kwargs.values()]) if labelled else None
    read = [(t, t._version) for t in shared if isinstance(t, torch.Tensor)] if shared else ()
    result = results.run(w, name, func, args, kwargs, grad, cost)
    if changes is not None:
        changes.label(w, labelled)
    if read and any(t._version != v for t, v in read):  # an op that writes where no list says
        log.error("worker %s: %s changed an argument shared read-only with its caller", w.id, name)
        raise AccessDenied(f"{name} changed an object on worker '{w.id}' that was shared with you "
                           "read-only (the worker did not know this op writes there: a zmqsyft "
                           "bug, please report it); its result was discarded")
    if shared:
        result = _unshare(result, shared)
    if name in secret.MAKES_SHARES:  # fresh secret shares
        labels.mark_shares(w, executor.result_tensors(result))
    return _finish(w, ctx, name, result, out, cost.exact, labelled), labelled


def _writes(name: str, args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether an op changes its first argument (in-place ops, setters, ``inplace`` set, by
    keyword or by position: ``F.threshold(x, 0.5, 0.0, True)``, ``inplace=1``)."""
    short = name.rsplit(".", 1)[-1]
    at = _inplace_at(name)
    flag = kwargs.get("inplace", args[at] if at is not None and at < len(args) else None)
    return (allowlist.is_inplace(name) or (short.endswith("_") and not short.startswith("__"))
            or (flag is not None and flag is not False and flag != 0))


@functools.cache
def _inplace_at(name: str) -> int | None:
    """Where an op takes ``inplace`` among its positional arguments, if it does."""
    try:
        params = list(inspect.signature(allowlist.lookup(name)).parameters)
    except (TypeError, ValueError):  # (a builtin without a signature: no inplace argument)
        return None
    return params.index("inplace") if "inplace" in params else None


# ops that change arguments other than the first: name -> (positions, keywords)
_ALSO_WRITES: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "torch.nn.functional.batch_norm": ((1, 2), ("running_mean", "running_var")),
    "torch.nn.functional.instance_norm": ((1, 2), ("running_mean", "running_var")),
    "torch.batch_norm": ((3, 4), ("running_mean", "running_var")),
    "torch.instance_norm": ((3, 4), ("running_mean", "running_var")),
    "torch.nn.functional.embedding": ((1,), ("weight",)),  # (renormalised with max_norm)
}


def _check_writes(w: Services, name: str, args: list[Any], kwargs: dict[str, Any],
                  shared: set[int]) -> None:
    """Refuse an op that would change an object the caller may only read."""
    written = executor.refs_in(kwargs.get("out"))
    if args and _writes(name, args, kwargs):
        written = written + executor.refs_in(args[0])
    positions, keywords = _ALSO_WRITES.get(name, ((), ()))
    written = written + executor.refs_in(
        [args[i] for i in positions if i < len(args)] + [kwargs.get(k) for k in keywords])
    for ref in written:
        if ref.id in shared:
            raise AccessDenied(
                f"{name} would change object {ref.id} on worker '{w.id}', which was shared with "
                "you read-only (a search() result): compute a new tensor from it instead "
                "(e.g. x + y, not x.add_(y)). Nothing was run")


def _unshare(result: Any, shared: list[Any]) -> Any:
    """The result with every tensor that shares memory with a read-only argument copied."""
    ptrs = {t.untyped_storage().data_ptr() for t in shared if isinstance(t, torch.Tensor)}
    if not ptrs:
        return result

    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() in ptrs:
            return leaf.clone()
        return leaf
    return executor.pytree.tree_map(one, result)


def _admit(w: Services, ctx: Ctx, name: str, func: Any, args: Any, kwargs: Any,
           grad: bool) -> costs.Cost:
    """Refuse an op before it runs when it would cost more than one op may (``max_op_flops``),
    or when its results would not fit in the store: an 80-byte request must not make the worker
    compute for minutes or allocate gigabytes. Returns the estimate: whether the results' size
    was inferred exactly (``.exact``; else what the op made is checked again once it has run)
    and, if known, its one result's shape and dtype."""
    cost = costs.estimate(name, func, args, kwargs, grad)
    limit = w.cfg.max_op_flops
    if limit and cost.flops > limit:
        raise LimitExceeded(
            f"{name} would cost about {_gflop(cost.flops)} (estimated from its arguments' "
            f"shapes), more than worker '{w.id}' allows one op (Config.max_op_flops = "
            f"{_gflop(limit)}); split it into smaller ops, or "
            "start the worker with a larger --max-op-flops / ZMQSYFT_MAX_OP_FLOPS. "
            "Nothing was run")
    if cost.nbytes:
        w.store.make_room(cost.nbytes, name, ctx.holder)
    return cost


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:,.{0 if flops >= 1e11 else 1}f} GFLOP"


def _local_args(w: Services, args: list[Any], key: str) -> list[Any] | None:
    """Positional arguments resolved in one pass when each is a tensor the caller (``key``)
    owns here or a plain value; ``None`` when anything needs the general path (pointers,
    containers, missing, failed or shared objects)."""
    objects, owners = w.store._objects, w.store._owner
    values = []
    for a in args:
        kind = type(a)
        if kind is ObjRef:
            obj = objects.get(a.id)
            if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
                return None
            if key and ((h := owners.get(a.id)) is None or h.principal.key != key):
                return None
            values.append(obj)
        elif kind in _PLAIN:
            values.append(a)
        else:
            return None
    return values


def _remote_args(w: Services, args: list[Any],
                 key: str) -> tuple[PointerRecord, list[Any]] | None:
    """Positional arguments to forward, in one pass, when each is a pointer record the caller
    (``key``) owns, to one and the same other worker, or a plain value; ``None`` otherwise (the
    general path decides)."""
    objects, owners, target, values = w.store._objects, w.store._owner, None, []
    for a in args:
        kind = type(a)
        if kind is ObjRef:
            obj = objects.get(a.id)
            if (type(obj) is not PointerRecord or obj.address in w.addresses
                    or (target is not None and obj.address != target.address)):
                return None
            if key and ((h := owners.get(a.id)) is None or h.principal.key != key):
                return None
            target = obj
            values.append(ObjRef(obj.id_at_location))
        elif kind in _PLAIN:
            values.append(a)
        else:
            return None
    return None if target is None else (target, values)


def _finish(w: Services, ctx: Ctx, name: str, result: Any, out: Any, known: bool = False,
            labelled: Labels = EMPTY) -> Any:
    if out is not None:
        if result is None and name == "torch.Tensor.grad.__get__":  # (the client expected one)
            raise RuntimeError(
                f"the tensor has no gradient on worker '{w.id}' (its .grad is None): no "
                "backward() reached it, or the backward() that was to reach it failed (sync() "
                "raises that error); the client had predicted one from the ops it sent")
        tensors = [result] if type(result) is torch.Tensor else executor.result_tensors(result)
        executor.check_outputs(name, tensors, out)
        if not known:  # (room for a known size was made before the op ran)
            w.store.make_room(sum(t.nbytes for t in tensors), name, ctx.holder)
        for spec, t in zip(out, tensors, strict=True):
            w.store.put(spec[0], t, ctx.holder, labelled)
    return result


def _poison(w: Services, out: list[Any] | None, exc: BaseException, name: str,
            holder: Holder | None) -> None:
    """Leave the failure under each result id the caller chose (one marker shared by all of
    them: a refused request with thousands of ids keeps one copy of its error, not thousands)."""
    if not isinstance(out, list):
        return
    marker = ErrorMarker(encode_exception(exc, w.id), name[:200])
    for spec in out:
        try:
            w.store.put(spec[0], marker, holder)
        except Exception:  # noqa: BLE001 - a bad id: nothing to poison
            pass


def describe(w: Services, result: Any, name: str = "the call", by: Holder | None = None,
             labelled: Labels = EMPTY) -> Any:
    """Store a result's tensors here, owned by ``by`` and labelled ``labelled``; return the
    result with
    pointer descriptors in their place. A result with a tensor this worker does not keep stores
    nothing (``SerializationError``)."""
    tensors = executor.result_tensors(result)
    executor.check_keepable(name, tensors)
    w.store.make_room(sum(t.nbytes for t in tensors), name, by)

    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            obj_id = new_id()
            w.store.put(obj_id, leaf, by, labelled)
            return PointerDesc(w.id, w.address, obj_id, obj_id, tuple(leaf.shape),
                               dtype_name(leaf.dtype), leaf.requires_grad, True, w.key,
                               w.incarnation)
        return leaf
    return executor.pytree.tree_map(one, result)


def _relay(w: Services, ctx: Ctx, body: Call, resolved: dict[int, Any],
           remote: list[PointerRecord]) -> None:
    addresses = {r.address for r in remote}
    if len(addresses) > 1 or len(remote) < len(resolved):
        places = sorted({f"'{r.location}'" for r in remote} | (
            {f"'{w.id}'"} if len(remote) < len(resolved) else set()))
        raise LocationMismatch(
            f"{body.fn}: the arguments live on different workers ({', '.join(places)}); "
            "move them to one worker first")
    args, kwargs = executor.substitute(
        (body.args, body.kwargs), lambda ref: type(ref)(resolved[ref.id].id_at_location))
    _forward(w, ctx, body, args, kwargs, remote[0])


def _forward(w: Services, ctx: Ctx, body: Call, args: Any, kwargs: Any,
             target: PointerRecord) -> None:
    """Send a CALL on to ``target``'s worker, its arguments already named in ids there."""
    name, out = body.fn, body.out
    if body.hops >= MAX_HOPS:
        raise ProtocolError(
            f"{name}: the pointer chain is longer than {MAX_HOPS} hops; it probably loops "
            "back on itself")
    restart = restarted(w, target)  # (known now only if the link to it has met that process)
    if restart is not None:
        raise restart
    onward = Call(fn=name, args=args, kwargs=kwargs, out=None, grad=body.grad, hops=body.hops + 1)
    if out is not None:
        onward.out = [[new_id(), *spec[1:]] for spec in out]
        for spec, nxt in zip(out, onward.out, strict=True):
            w.store.put(spec[0], PointerRecord(target.location, target.address, nxt[0],
                                               tuple(spec[1]), spec[2], bool(spec[3]), True,
                                               target.key, target.incarnation), ctx.holder)
        w.reply(ctx)
        w.answer_now()  # the caller need not wait for the forwarding
        # no answer wanted: a failure downstream poisons the result ids there (using the
        # result raises it), and FLUSH orders everything after it; no ack per op to wait for
        w.peers.request(target.address, Op.CALL, onward, None)
        return

    def done(msg: Message | None, exc: BaseException | None) -> None:
        if exc is not None:
            w.reply_error(ctx, explained(w, target, exc))
        elif allowlist.is_inplace(name):
            w.reply(ctx)
        else:
            try:
                result = CallReply.from_wire(msg.body).result if msg is not None else None
                w.reply(ctx, CallReply(result=_adopt(w, result, ctx.holder)))
            except Exception as failure:  # noqa: BLE001 - a peer's malformed reply
                w.reply_error(ctx, failure)
    w.peers.request(target.address, Op.CALL, onward, done)


def _adopt(w: Services, result: Any, by: Holder | None) -> Any:
    """Take ownership of a relayed result: store its pointers here (for ``by``), describe them
    as ours."""
    def one(leaf: Any) -> Any:
        if isinstance(leaf, PointerDesc):
            key = new_id()
            w.store.put(key, record(w, leaf), by)
            return PointerDesc(w.id, w.address, key, key, leaf.shape, leaf.dtype,
                               leaf.requires_grad, True, w.key, w.incarnation)
        return leaf
    return executor.pytree.tree_map(one, result)
