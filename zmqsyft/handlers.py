"""What a worker does for each op: the handlers behind the worker's dispatch table.

:class:`Handlers` is mixed into :class:`~zmqsyft.worker.Worker`, which provides the sockets and
the primitives the handlers use: ``_reply``/``_reply_error`` answer the caller, ``_request``
sends a request to a peer worker with a continuation, ``_dirty`` holds the peers relayed to
since their last flush. Handlers never block: whatever needs a peer continues in a callback.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import allowlist, executor
from .admin import AdminHandlers
from .codec import Handover, dtype_name
from .errors import HandoverRefused, LocationMismatch, ProtocolError
from .messages import Message, ObjRef, Op, PointerDesc, Summary
from .remote_exc import decode_exception, encode_exception
from .store import ErrorMarker, PointerRecord, new_id
from .tensors import sole_segment

if TYPE_CHECKING:
    from .worker import _Ctx

__all__ = ["Handlers", "MAX_HOPS"]

log = logging.getLogger(__name__)

_RELAYED = object()  # a CALL sent on to the next hop: its reply is on its way
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype})  # passed to an op as they are
MAX_HOPS = 32  # longest pointer chain a CALL is relayed along (crafted cycles end here)


class Handlers(AdminHandlers):
    """The op handlers of a worker (mixed into :class:`~zmqsyft.worker.Worker`): objects, ops,
    chains, moves, deletes and synchronisation; :class:`AdminHandlers` has the rest."""

    def _handler_table(self) -> dict[Op, Callable[[_Ctx, dict[str, Any]], None]]:
        return {
            Op.HELLO: self._hello, Op.PUT: self._put, Op.GET: self._get, Op.CALL: self._call,
            Op.DEL: self._del, Op.MOVE: self._move, Op.REMOTE_GET: self._remote_get,
            Op.OBJECTS: self._objects, Op.FLUSH: self._flush, Op.PING: self._ping,
            Op.STATS: self._stats, Op.SHUTDOWN: self._shutdown, Op.SEARCH: self._search,
            Op.RUN: self._run,
        }

    def _put(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        obj = body.get("obj")
        if isinstance(obj, PointerDesc):
            obj = PointerRecord.from_desc(obj)
        self.store.put(_id(body), obj)
        self._reply(ctx)

    def _get(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        obj_id = _id(body)
        obj = self.store.pop(obj_id)
        if isinstance(obj, ErrorMarker):
            raise decode_exception(obj.error)
        if isinstance(obj, PointerRecord):
            desc = obj.desc(ptr_id=obj_id, owned=obj.owned)
            self._settled(ctx, obj.address, lambda: self._reply(ctx, {"obj": desc}))
            return
        hold = body.get("handover")
        # nothing here uses it any more (the getrefcount argument and `obj` are the references):
        # a same-host caller may map its memory; it is kept under the caller's `hold` id until
        # the caller, having mapped it, deletes that (or asks for it again, if it could not)
        if (type(hold) is int and hold > 0 and hold not in self.store and type(obj) is torch.Tensor
                and sys.getrefcount(obj) == 2 and sole_segment(obj) is not None):
            self.store.put(hold, obj)
            self._reply(ctx, {"obj": Handover(obj)})
            return
        self._reply(ctx, {"obj": obj})

    def _settled(self, ctx: _Ctx, address: str, then: Callable[[], None]) -> None:
        """Run ``then`` once everything relayed to ``address`` has been handled there.

        Needed before a pointer to ``address`` leaves this worker: its new holder talks to
        ``address`` directly and must not overtake what this worker relayed there before.
        """
        if address not in self._dirty:
            then()
            return
        self._dirty.discard(address)

        def done(msg: Message | None, exc: BaseException | None) -> None:
            if exc is not None:
                self._reply_error(ctx, exc)
            else:
                then()
        self._request(address, Op.FLUSH, {}, done)

    def _resolve(self, obj_id: Any) -> Any:
        """The object behind an id, following pointers that point back at this worker."""
        obj = self.store.get(obj_id)
        for _ in range(64):
            if not (isinstance(obj, PointerRecord) and obj.address in self.addresses):
                break
            obj = self.store.get(obj.id_at_location)
        if isinstance(obj, ErrorMarker):
            raise decode_exception(obj.error)
        return obj

    def _call(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        name, out = body.get("fn"), body.get("out")
        try:
            result = self._run_call(ctx, name, body, out)
        except Exception as exc:
            # the caller may already hold pointers to the results: make their use raise this
            self._poison(out, exc, str(name))
            raise
        if result is _RELAYED:
            return
        if out is not None or allowlist.is_inplace(str(name)):
            self._reply(ctx)
        else:
            self._reply(ctx, {"result": self._describe(result)})

    def _run_call(self, ctx: _Ctx, name: Any, body: dict[str, Any], out: Any) -> Any:
        func = allowlist.lookup(name)  # refuse before touching anything
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        grad = body.get("grad", True)
        if out is not None and not _valid_out(out):
            raise ProtocolError("CALL 'out' must be a list of [id, shape, dtype, requires_grad]")
        if type(args) is list and type(kwargs) is dict and not kwargs:
            local = self._local_args(args)
            if local is not None:  # the common case: tensors held here and plain values
                return self._finish_call(name, executor.run(name, local, kwargs, grad, func), out)
            relay = self._remote_args(args)
            if relay is not None:  # the common chain case: pointers to one other worker
                self._forward_call(ctx, name, relay[1], kwargs, out, grad, relay[0], body.get("hops", 0))
                return _RELAYED
        resolved = {ref.id: self._resolve(ref.id) for ref in executor.refs_in((args, kwargs))}
        remote = [o for o in resolved.values() if isinstance(o, PointerRecord)]
        if remote:
            hops = body.get("hops", 0)
            self._relay_call(ctx, name, args, kwargs, out, grad, resolved, remote, hops)
            return _RELAYED
        args, kwargs = executor.substitute((args, kwargs), lambda ref: resolved[ref.id])
        return self._finish_call(name, executor.run(name, args, kwargs, grad, func), out)

    def _local_args(self, args: list[Any]) -> list[Any] | None:
        """Positional arguments resolved in one pass when each is a tensor stored here or a
        plain value; ``None`` when anything needs the general path (pointers, containers,
        missing or failed objects)."""
        objects = self.store._objects
        values = []
        for a in args:
            kind = type(a)
            if kind is ObjRef:
                obj = objects.get(a.id)
                if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
                    return None
                values.append(obj)
            elif kind in _PLAIN:
                values.append(a)
            else:
                return None
        return values

    def _remote_args(self, args: list[Any]) -> tuple[PointerRecord, list[Any]] | None:
        """Positional arguments to forward, in one pass, when each is a pointer record to one and
        the same other worker or a plain value; ``None`` otherwise (the general path decides)."""
        objects, target, values = self.store._objects, None, []
        for a in args:
            kind = type(a)
            if kind is ObjRef:
                obj = objects.get(a.id)
                if (type(obj) is not PointerRecord or obj.address in self.addresses
                        or (target is not None and obj.address != target.address)):
                    return None
                target = obj
                values.append(ObjRef(obj.id_at_location))
            elif kind in _PLAIN:
                values.append(a)
            else:
                return None
        return None if target is None else (target, values)

    def _finish_call(self, name: str, result: Any, out: Any) -> Any:
        if out is not None:
            tensors = executor.result_tensors(result)
            executor.check_outputs(name, tensors, out)
            for spec, t in zip(out, tensors, strict=True):
                self.store.put(spec[0], t)
        return result

    def _poison(self, out: list[Any] | None, exc: BaseException, name: str) -> None:
        if not isinstance(out, list):
            return
        for spec in out:
            try:
                self.store.put(spec[0], ErrorMarker(encode_exception(exc, self.id), name))
            except Exception:  # noqa: BLE001 - a bad id: nothing to poison
                pass

    def _describe(self, result: Any) -> Any:
        """Store a result's tensors here; return the result with pointer descriptors in their place."""
        def one(leaf: Any) -> Any:
            if isinstance(leaf, torch.Tensor):
                obj_id = new_id()
                self.store.put(obj_id, leaf)
                return PointerDesc(self.id, self.address, obj_id, obj_id, tuple(leaf.shape),
                                   dtype_name(leaf.dtype), leaf.requires_grad, True)
            return leaf
        return executor.pytree.tree_map(one, result)

    def _relay_call(self, ctx: _Ctx, name: str, args: Any, kwargs: Any, out: Any, grad: bool,
                    resolved: dict[int, Any], remote: list[PointerRecord], hops: int) -> None:
        addresses = {r.address for r in remote}
        if len(addresses) > 1 or len(remote) < len(resolved):
            places = sorted({f"'{r.location}'" for r in remote} | (
                {f"'{self.id}'"} if len(remote) < len(resolved) else set()))
            raise LocationMismatch(
                f"{name}: the arguments live on different workers ({', '.join(places)}); "
                "move them to one worker first")
        args, kwargs = executor.substitute(
            (args, kwargs), lambda ref: type(ref)(resolved[ref.id].id_at_location))
        self._forward_call(ctx, name, args, kwargs, out, grad, remote[0], hops)

    def _forward_call(self, ctx: _Ctx, name: str, args: Any, kwargs: Any, out: Any, grad: bool,
                      target: PointerRecord, hops: Any) -> None:
        """Send a CALL on to ``target``'s worker, its arguments already named in ids there."""
        if not isinstance(hops, int) or isinstance(hops, bool):
            raise ProtocolError("CALL 'hops' must be an integer")
        if hops >= MAX_HOPS:
            raise ProtocolError(
                f"{name}: the pointer chain is longer than {MAX_HOPS} hops; it probably loops "
                "back on itself")
        body: dict[str, Any] = {"fn": name, "args": args, "kwargs": kwargs, "grad": grad,
                                "hops": hops + 1}
        if out is not None:
            next_out = [[new_id(), *spec[1:]] for spec in out]
            for spec, nxt in zip(out, next_out, strict=True):
                self.store.put(spec[0], PointerRecord(target.location, target.address, nxt[0],
                                                      tuple(spec[1]), spec[2], bool(spec[3]), True))
            body["out"] = next_out
            self._reply(ctx)
            self._answer_now()  # the caller need not wait for the forwarding
            # no answer wanted: a failure downstream poisons the result ids there (using the
            # result raises it), and FLUSH orders everything after it; no ack per op to wait for
            self._request(target.address, Op.CALL, body, None)
            return
        body["out"] = None

        def done(msg: Message | None, exc: BaseException | None) -> None:
            if exc is not None:
                self._reply_error(ctx, exc)
            elif allowlist.is_inplace(name):
                self._reply(ctx)
            else:
                self._reply(ctx, {"result": self._adopt(msg.body.get("result") if msg else None)})
        self._request(target.address, Op.CALL, body, done)

    def _adopt(self, result: Any) -> Any:
        """Take ownership of a relayed result: store its pointers here, describe them as ours."""
        def one(leaf: Any) -> Any:
            if isinstance(leaf, PointerDesc):
                key = new_id()
                self.store.put(key, PointerRecord.from_desc(leaf))
                return PointerDesc(self.id, self.address, key, key, leaf.shape, leaf.dtype,
                                   leaf.requires_grad, True)
            return leaf
        return executor.pytree.tree_map(one, result)

    def _del(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise ProtocolError("DEL needs a list of ids")
        cascade: dict[str, list[int]] = defaultdict(list)
        for obj_id in ids:
            self._free(obj_id, cascade, 0)
        for address, targets in cascade.items():
            self._request(address, Op.DEL, {"ids": targets}, None)  # fire and forget
        self._reply(ctx)

    def _free(self, obj_id: Any, cascade: dict[str, list[int]], depth: int) -> None:
        obj = self.store.discard(obj_id)
        if isinstance(obj, PointerRecord) and obj.owned and depth < 64:
            if obj.address in self.addresses:
                self._free(obj.id_at_location, cascade, depth + 1)
            else:
                cascade[obj.address].append(obj.id_at_location)

    def _move(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        obj_id, dest = _id(body), body.get("dest_address")
        if not isinstance(dest, str):
            raise ProtocolError("MOVE needs dest_address")
        obj = self.store.get(obj_id)
        if dest in self.addresses:
            self._reply(ctx, {})
            return
        if isinstance(obj, ErrorMarker):
            raise decode_exception(obj.error)
        if isinstance(obj, PointerRecord):
            if obj.address == dest:  # the chain collapses: dest already holds the data
                self.store.pop(obj_id)
                desc = obj.desc(ptr_id=obj_id, owned=obj.owned)
                self._settled(ctx, obj.address, lambda: self._reply(ctx, {"collapsed": desc}))
                return
            payload: Any = obj.desc(ptr_id=obj_id, owned=obj.owned)
            self._settled(ctx, obj.address, lambda: self._push(ctx, obj_id, obj, dest, payload))
            return
        # referenced by the store and by `obj` only (and getrefcount's argument): nobody else here
        # will see the tensor again, so a same-host dest may take over its memory instead of a copy
        sole = sys.getrefcount(obj) == 3 and dest not in self._no_handover
        self._push(ctx, obj_id, obj, dest, Handover(obj) if sole and type(obj) is torch.Tensor else obj)

    def _push(self, ctx: _Ctx, obj_id: int, obj: Any, dest: str, payload: Any) -> None:
        """Store ``payload`` on ``dest`` under ``obj_id``; free it here once ``dest`` confirmed."""

        def done(msg: Message | None, exc: BaseException | None) -> None:
            if isinstance(exc, HandoverRefused) and type(payload) is Handover:
                log.info("worker %s: %s; sending a copy to %s from now on", self.id, exc, dest)
                self._no_handover.add(dest)
                self._push(ctx, obj_id, obj, dest, obj)
                return
            if exc is not None:
                self._reply_error(ctx, exc)
                return
            current = self.store.discard(obj_id)
            if current is not None and current is not obj:  # the id was reused meanwhile: keep it
                self.store.replace(obj_id, current)
            else:  # freed after the reply has gone (unmapping 100 MiB takes ~15 ms)
                self._graveyard.append(current)
            self._reply(ctx, {})
        self._request(dest, Op.PUT, {"id": obj_id, "obj": payload}, done)

    def _remote_get(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        obj_id = _id(body)
        record = self.store.get(obj_id)
        if not isinstance(record, PointerRecord):
            self._reply(ctx)  # the data is here already
            return
        if record.address in self.addresses:
            self.store.replace(obj_id, self.store.pop(record.id_at_location))
            self._reply(ctx)
            return

        def done(msg: Message | None, exc: BaseException | None) -> None:
            if exc is not None:
                self._reply_error(ctx, exc)
                return
            obj = msg.body.get("obj") if msg else None
            if isinstance(obj, PointerDesc):
                obj = PointerRecord.from_desc(obj)
            self.store.replace(obj_id, obj)
            self._reply(ctx)
        self._request(record.address, Op.GET, {"id": record.id_at_location}, done)

    def _objects(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        snapshot: dict[int, Any] = {}
        limit = self.cfg.snapshot_max_elements
        for key, obj in self.store.items():
            if isinstance(obj, torch.Tensor):
                snapshot[key] = obj.detach() if obj.numel() <= limit else Summary(
                    f"tensor(<{obj.numel()} elements>, shape={tuple(obj.shape)}, dtype={obj.dtype})")
            elif isinstance(obj, PointerRecord):
                snapshot[key] = obj.desc(ptr_id=key, owned=False)
            elif isinstance(obj, ErrorMarker):
                snapshot[key] = Summary(f"<failed {obj.op}: {obj.error.get('type')}: "
                                        f"{obj.error.get('message')}>")
            elif obj is None or isinstance(obj, (bool, int, float, str)):
                snapshot[key] = obj
            else:
                snapshot[key] = Summary(f"<{type(obj).__module__}.{type(obj).__qualname__}>")
        self._reply(ctx, {"objects": snapshot})

    def _flush(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            self._reply(ctx)
            return
        left = [len(dirty)]
        errors: list[BaseException] = []

        def done(msg: Message | None, exc: BaseException | None) -> None:
            if exc is not None:
                errors.append(exc)
            left[0] -= 1
            if left[0] == 0:
                if errors:
                    self._reply_error(ctx, errors[0])
                else:
                    self._reply(ctx)
        for address in dirty:
            self._request(address, Op.FLUSH, {}, done)

def _id(body: dict[str, Any], key: str = "id") -> int:
    """A positive integer object id from a request body, or ``ProtocolError``."""
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"{key!r} must be a positive integer object id, not {value!r}")
    return value


def _valid_out(out: Any) -> bool:
    """Whether a CALL's ``out`` is a list of ``[id, shape, dtype name, requires_grad]``."""
    return isinstance(out, list) and all(
        isinstance(spec, list) and len(spec) == 4 and isinstance(spec[0], int)
        and isinstance(spec[1], list) and all(isinstance(d, int) for d in spec[1])
        and isinstance(spec[2], str) for spec in out)
