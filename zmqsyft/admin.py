"""The handlers about the worker itself and its own data (a base of :class:`~zmqsyft.handlers.Handlers`).

HELLO (a peer's name, its trust token, whether it shares this machine's ``/dev/shm``), PING,
STATS, SHUTDOWN; a data owner's own data (``load``/``add``, SEARCH) and trusted code (RUN).
:class:`AdminHandlers` also declares the worker primitives every handler uses.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING, Any

import torch

from . import executor, shm
from .codec import dtype_name
from .config import Config
from .errors import LocationMismatch, ProtocolError
from .messages import PROTOCOL_VERSION, Op, PointerDesc
from .store import PointerRecord, Store, new_id

if TYPE_CHECKING:
    from .worker import Callback, _Ctx

__all__ = ["AdminHandlers"]


class AdminHandlers:
    """Worker-level handlers, and the state and primitives every handler relies on."""

    id: str
    cfg: Config
    address: str
    addresses: set[str]
    store: Store
    _dirty: set[str]
    _running: bool
    _counters: dict[str, int]
    _per_peer: dict[str, dict[str, int]]
    _labels: dict[str, str]
    _trusted: set[bytes]
    _shm_peers: set[bytes]
    _graveyard: list[Any]
    _no_handover: set[str]
    trust_tokens: frozenset[str]

    def _reply(self, ctx: _Ctx, body: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    def _reply_error(self, ctx: _Ctx, exc: BaseException) -> None:
        raise NotImplementedError

    def _request(self, address: str, op: Op, body: dict[str, Any], callback: Callback | None) -> None:
        raise NotImplementedError

    def _answer_now(self) -> None:
        raise NotImplementedError

    def _resolve(self, obj_id: Any) -> Any:
        raise NotImplementedError

    def _describe(self, result: Any) -> Any:
        raise NotImplementedError

    def load(self, path: str, tags: list[str]) -> list[int]:
        """Load a tensor, or a dict of tensors, saved with ``torch.save``; store it tagged.

        Loading uses ``torch.load(weights_only=True)``: no code in the file is run. Every tensor
        gets ``tags``; a dict's entries also get ``#<key>``. Returns the new ids.
        """
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        items = loaded.items() if isinstance(loaded, dict) else [(None, loaded)]
        ids = []
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: expected tensors, found {type(value).__name__} under {key!r}")
            ids.append(self.add(value, [*tags, *([f"#{key}"] if key is not None else [])]))
        return ids

    def add(self, tensor: torch.Tensor, tags: list[str]) -> int:
        """Store a tensor this worker owns (its own data), with search tags; return its id."""
        obj_id = new_id()
        self.store.put(obj_id, tensor)
        self.store.tag(obj_id, frozenset(tags))
        return obj_id

    def _search(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        tags = body.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ProtocolError("SEARCH needs a list of tag strings")
        results = []
        for obj_id in self.store.search(frozenset(tags)):
            obj = self.store.get(obj_id)
            if isinstance(obj, torch.Tensor):
                results.append(PointerDesc(self.id, self.address, obj_id, new_id(), tuple(obj.shape),
                                           dtype_name(obj.dtype), obj.requires_grad, False))
        self._reply(ctx, {"results": results})

    def _hello(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        peer = body.get("peer")
        if isinstance(peer, str) and peer:
            self._labels[ctx.ident.hex()] = peer[:64]
        token = body.get("trust")
        if isinstance(token, str) and any(hmac.compare_digest(token, t) for t in self.trust_tokens):
            self._trusted.add(ctx.ident)
        if "host" in body:  # a peer on this machine may hand us large tensors in shared memory
            if body["host"] == shm.host_key() != "":
                self._shm_peers.add(ctx.ident)
            else:
                self._shm_peers.discard(ctx.ident)
        self._reply(ctx, {"id": self.id, "pid": os.getpid(), "version": PROTOCOL_VERSION,
                          "address": self.address, "trusted": ctx.ident in self._trusted,
                          "host": shm.host_key(), "shm": ctx.ident in self._shm_peers})

    def _run(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        fn = body.get("fn")
        if not callable(fn):
            raise ProtocolError("RUN needs a callable")
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
            raise ProtocolError("RUN args must be a list and kwargs a map")
        resolved = {ref.id: self._resolve(ref.id) for ref in executor.refs_in((args, kwargs))}
        if any(isinstance(o, PointerRecord) for o in resolved.values()):
            raise LocationMismatch(
                f"run() on worker '{self.id}' got a pointer to data on another worker; "
                "move the data here first")
        args, kwargs = executor.substitute((args, kwargs), lambda ref: resolved[ref.id])
        with torch.set_grad_enabled(bool(body.get("grad", True))):
            result = fn(*args, **kwargs)
        self._reply(ctx, {"result": self._describe(result)})

    def _ping(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        self._reply(ctx, {"id": self.id})

    def _shutdown(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        self._reply(ctx, {})
        self._running = False

    def _stats(self, ctx: _Ctx, body: dict[str, Any]) -> None:
        peers: dict[str, dict[str, int]] = {}
        for key, counts in self._per_peer.items():  # merged by the name each peer gave
            merged = peers.setdefault(self._labels.get(key, key), {})
            for name, value in counts.items():
                if name.startswith("largest_"):
                    merged[name] = max(merged.get(name, 0), value)
                else:
                    merged[name] = merged.get(name, 0) + value
        self._reply(ctx, {"id": self.id, "objects": len(self.store),
                          "counters": dict(self._counters), "peers": peers})
