"""The caller's end of a connection's sealed bulk channel (:mod:`zmqsyft.wire.bulk`): a client's
connection and a worker's link to a peer both keep one beside their CURVE connection, and send
their large requests on it (and a client takes its large replies from it)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.utils.z85

from ..config import Config
from ..errors import ProtocolError, RequestTimeout, WorkerUnavailable
from . import transport
from .bodies import Bulk
from .bulk import MAX_CHUNK_MESSAGE, BulkError, ChannelKeys, Opener, Sealer, blob_size, new_secret
from .codec import Frames, encode_message
from .messages import Message, Op

__all__ = ["CallerChannel", "bulk_bind", "bulk_address"]


class CallerChannel:
    """The caller's end of one connection's sealed channel (a client's connection, a worker's
    link to a peer): the secret its HELLO carries, then, once the HELLO reply names the
    worker's bulk socket, a DEALER to it, sealing large requests and opening sealed replies.

    Parameters
    ----------
    replies : bool
        Whether large replies may come sealed too (the HELLO says so; a worker's peer link,
        which cannot wait for them, asks for none).
    plain : bool
        For an insecure worker (no CURVE): chunks go unencrypted, but still beside the
        connection, whose heartbeats they would otherwise hold up.
    """

    def __init__(self, replies: bool = True, plain: bool = False) -> None:
        secret = new_secret()
        self.secret = zmq.utils.z85.encode(secret).decode()
        """For the HELLO (Z85)."""
        self.replies = replies
        self.plain = plain
        self.keys = ChannelKeys(secret, caller=True)
        self.sock: zmq.Socket | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._blob = 0

    @property
    def open(self) -> bool:
        """Whether large messages can go sealed (the worker named its bulk socket)."""
        return self.sock is not None

    def connect(self, ctx: zmq.Context, cfg: Config, worker_address: str,
                bulk_endpoint: str) -> None:
        """Connect to the worker's bulk socket, named in its HELLO reply (``""``: none), and
        show it where we are with an authentic empty chunk, so that sealed replies can come.
        ``ProtocolError`` for an endpoint that does not go with the worker's address."""
        if not bulk_endpoint or self.sock is not None:
            return
        address = bulk_address(worker_address, bulk_endpoint)
        keys = self.keys
        self.sock = transport.make_bulk_dealer(ctx, address, cfg, keys.user, keys.ticket,
                                               MAX_CHUNK_MESSAGE)
        self._sealer = Sealer(keys.channel, keys.send_key, self.plain)
        if self.replies:
            self._opener = Opener(keys.channel, keys.recv_key, -1, cfg.max_frames,
                                  plain=self.plain)
            self.sock.send(self._sealer.attach(), copy=False)

    def marker(self, req_id: int, frames: list[Any], threshold: int) -> tuple[Frames, int] | None:
        """If the message ``frames`` is to go sealed (the channel is open and it holds at least
        ``threshold`` bytes): the ``BULK`` marker to send in its place, and its blob, to
        :meth:`send` right after the marker; else ``None``."""
        if self.sock is None or len(frames) < 2:
            return None
        nbytes = blob_size(frames)
        if nbytes < threshold:
            return None
        self._blob += 1
        return (encode_message(Op.BULK, req_id, Bulk(blob=self._blob, frames=len(frames),
                                                     nbytes=nbytes)), self._blob)

    def send(self, blob: int, frames: list[Any]) -> None:
        """Send blob ``blob`` (its marker went first): ``zmq.ZMQError`` if the socket fails."""
        assert self.sock is not None and self._sealer is not None
        sock = self.sock
        for chunk in self._sealer.seal(blob, frames):
            sock.send(chunk, zmq.NOBLOCK, copy=False)  # (Again: no connection to queue it for)

    def collect(self, marker: Message, timeout: float, what: str,
                dead: Callable[[], str | None]) -> list[Any]:
        """The frames of the sealed reply a ``BULK`` marker stands for: read from the bulk
        socket until its blob is complete, within ``timeout`` seconds, while ``dead()`` says
        nothing (else ``WorkerUnavailable``, naming ``what`` the worker is)."""
        body = Bulk.from_wire(marker.body)
        opener, sock = self._opener, self.sock
        if opener is None or sock is None:
            raise ProtocolError("a BULK reply on a connection that asked for no sealed replies")
        deadline = time.monotonic() + timeout
        while True:
            frames = opener.take(body.blob)
            if frames is not None:
                if len(frames) != body.frames:
                    raise BulkError(f"a sealed reply of {len(frames)} frames for a marker of "
                                    f"{body.frames}")
                return frames
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"{what} sent the marker of a sealed reply but not the reply "
                                     f"itself on its bulk socket within {timeout:g}s")
            if sock.poll(max(1, int(min(remaining, 0.1) * 1000))):
                try:
                    opener.open(sock.recv(copy=False).buffer)
                except BulkError:
                    pass  # (not ours, or broken: the blob then fails or times out)
                continue
            why = dead()
            if why is not None:
                raise WorkerUnavailable(f"{what}: {why}; a sealed reply did not arrive")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self._sealer = self._opener = None


def bulk_bind(endpoint: str) -> str:
    """Where a worker bound at ``endpoint`` binds its bulk socket: the same host on a port of
    its own, or a socket beside its ipc socket."""
    if endpoint.startswith("tcp://"):
        return endpoint.rsplit(":", 1)[0] + ":0"
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        return "ipc://" + (path[:-len(".sock")] if path.endswith(".sock") else path) + ".bulk"
    raise ValueError(f"no bulk socket for {endpoint}")


def bulk_address(worker_address: str, bulk_endpoint: str) -> str:
    """Where to reach a worker's bulk socket, given the address its caller reached it at and the
    endpoint its HELLO reply named: over tcp the caller's host (the worker may have bound a
    wildcard) with the bulk port; over ipc the path it named."""
    if worker_address.startswith("tcp://") and bulk_endpoint.startswith("tcp://"):
        return worker_address.rsplit(":", 1)[0] + ":" + bulk_endpoint.rsplit(":", 1)[1]
    if (worker_address.startswith("ipc://") and bulk_endpoint.startswith("ipc://")
            and os.path.dirname(worker_address) == os.path.dirname(bulk_endpoint)):
        return bulk_endpoint  # (in the worker's own private directory)
    raise ProtocolError(f"the bulk endpoint {transport.clip(bulk_endpoint)} does not go with "
                        f"{transport.clip(worker_address)}")
