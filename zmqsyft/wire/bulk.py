"""Sealed bulk data: large messages travel beside a CURVE connection, sealed with AES-256-GCM
(beside an insecure one too, unencrypted: see :class:`_Plain`).

libzmq's CURVE seals every message with XSalsa20-Poly1305 and copies it twice more on the way: a
100 MiB tensor crosses a CURVE connection at about a quarter of the speed of a plain one. Modern
CPUs seal with AES-GCM in hardware at several GB/s, so a connection's large messages take
another road, with the same guarantees (only the two ends can read them; nothing forged,
replayed, reordered or cut is accepted):

- The caller draws a 32-byte secret per connection and sends it in its ``HELLO``, which only the
  worker can read (CURVE). Both ends derive from it, with HMAC-SHA256, a 16-byte channel id and
  one AES-256 key per direction (:class:`ChannelKeys`).
- The worker binds a second socket, its *bulk endpoint* (a plain ROUTER: nothing on it is
  believed unless it opens with a channel's key), and names it in its ``HELLO`` reply.
- A message of at least ``Config.sealed_threshold`` bytes goes as a *blob*: its frames cut into
  chunks of at most :data:`CHUNK` bytes, each one ZeroMQ message on the bulk socket,
  ``header | AES-256-GCM(chunk) | tag`` (:class:`Sealer`); the 56-byte header (channel id,
  counter, blob id, frame index and count, offset, frame length) is the authenticated data and
  the counter is the nonce. In the message's place on the CURVE connection goes a ``BULK``
  marker naming the blob, so that the connection's order is kept: the receiver handles the
  marker once its blob is complete, as if the message itself had come then.
- The receiver (:class:`Opener`) accepts a chunk only if its channel id is one it gave out, its
  counter is above every counter it accepted on that channel (no replay, no reordering), it
  continues the blob in progress or starts the next one, its sizes are within the receiver's
  limits, and it decrypts (no forgery); it decrypts straight into the frame's buffer, which is
  the only copy.

Replies use the same road the other way, to the caller's bulk socket, once a sealed message of
the caller's has shown the worker where that is. The caller's end is
:class:`zmqsyft.wire.channel.CallerChannel`, the worker's :mod:`zmqsyft.worker.sealed`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ProtocolError

__all__ = ["CHUNK", "HEADER", "MAX_CHUNK_MESSAGE", "ChannelKeys", "Sealer", "Opener", "BulkError",
           "channel_of", "new_secret", "blob_size"]

CHUNK = 1 << 20
"""The most plaintext bytes in one chunk message (1 MiB: large enough that libzmq's per-message
cost vanishes, small enough to stay in the CPU's caches while it is sealed and sent)."""

_HEAD = struct.Struct("<16sQQIIQQ")  # channel, counter, blob, frame, frames, offset, frame length
HEADER = _HEAD.size  # 56
_TAG = 16
MAX_CHUNK_MESSAGE = HEADER + CHUNK + _TAG
"""The largest message a bulk socket accepts (its ``MAXMSGSIZE``)."""

_HAS_INTO = hasattr(AESGCM, "encrypt_into")


class BulkError(ProtocolError):
    """A chunk the receiver did not accept (forged, replayed, out of order, over its limits)."""


def new_secret() -> bytes:
    """A fresh connection secret (32 bytes from the operating system's generator)."""
    return secrets.token_bytes(32)


def channel_of(message: Any) -> bytes:
    """The channel id a chunk message names ('' if it is too short to be one)."""
    view = memoryview(message)
    return bytes(view[:16]) if view.nbytes >= HEADER else b""


def blob_size(frames: list[Any]) -> int:
    """How many bytes a message's frames hold."""
    return sum(memoryview(f).nbytes for f in frames)


class ChannelKeys:
    """The channel id and the two direction keys derived from a connection's secret.

    ``caller``: whether this end is the one that drew the secret (it sends with the caller's key
    and opens with the worker's; the worker the other way round).
    """

    __slots__ = ("channel", "send_key", "recv_key", "user", "ticket")

    def __init__(self, secret: bytes, caller: bool) -> None:
        if type(secret) is not bytes or len(secret) != 32:
            raise ProtocolError("a bulk channel secret is 32 bytes")

        def derive(label: bytes) -> bytes:
            return hmac.new(secret, b"zmqsyft bulk v1 " + label, hashlib.sha256).digest()

        self.channel = derive(b"channel")[:16]
        to_worker, to_caller = derive(b"caller->worker"), derive(b"worker->caller")
        self.send_key, self.recv_key = (to_worker, to_caller) if caller else (to_caller, to_worker)
        # the bulk socket's PLAIN credentials (sent in clear: they only keep strangers from
        # holding connections open; no chunk is believed for them)
        self.user = self.channel.hex().encode("ascii")
        self.ticket = derive(b"ticket")[:16].hex().encode("ascii")


class _Plain:
    """The cipher of an insecure worker's channel: chunks go as they are, with a zero tag.

    An insecure worker (``Config.insecure``) authenticates nobody and encrypts nothing, so
    sealing would protect nothing; its large messages still go on the bulk socket, beside the
    connection, so that a slow link carrying them never holds up the connection's heartbeats
    (behind one large frame they would arrive too late, and the connection be taken for dead).
    A CURVE worker's channels never take plain chunks: the cipher goes with the worker.
    """

    __slots__ = ()

    def encrypt_into(self, nonce: bytes, data: Any, aad: bytes, out: Any) -> None:
        n = memoryview(data).nbytes
        out[:n] = data
        out[n:n + _TAG] = bytes(_TAG)

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return bytes(data) + bytes(_TAG)

    def decrypt_into(self, nonce: bytes, data: Any, aad: bytes, out: Any) -> None:
        view = memoryview(data)
        out[:] = view[:view.nbytes - _TAG]

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return bytes(data[:len(data) - _TAG])


def _cipher(key: bytes, plain: bool) -> Any:
    return _Plain() if plain else AESGCM(key)


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


class Sealer:
    """Seals one direction of a channel: every chunk gets the next counter (never reused)."""

    __slots__ = ("channel", "_aead", "_counter")

    def __init__(self, channel: bytes, key: bytes, plain: bool = False) -> None:
        self.channel = channel
        self._aead = _cipher(key, plain)  # (plain: an insecure worker's channel, see _Plain)
        self._counter = 0

    def _chunk(self, blob: int, frame: int, frames: int, offset: int, length: int,
               data: memoryview) -> memoryview:
        self._counter += 1
        counter = self._counter
        n = data.nbytes
        out = memoryview(_buffer(HEADER + n + _TAG))
        head = _HEAD.pack(self.channel, counter, blob, frame, frames, offset, length)
        out[:HEADER] = head
        if _HAS_INTO:  # (the GIL is released while it runs: the I/O thread sends meanwhile)
            self._aead.encrypt_into(_nonce(counter), data, head, out[HEADER:])
        else:  # cryptography < 44
            out[HEADER:] = self._aead.encrypt(_nonce(counter), bytes(data), head)
        return out

    def attach(self) -> memoryview:
        """A chunk of no blob (id 0, no frames): shows the receiver where this end's bulk socket
        is (its routing id), authenticated like any chunk."""
        return self._chunk(0, 0, 0, 0, 0, memoryview(b""))

    def seal(self, blob: int, frames: list[Any]) -> Iterator[memoryview]:
        """The chunk messages of blob ``blob`` (> 0, increasing) holding ``frames`` in order."""
        count = len(frames)
        for index, frame in enumerate(frames):
            view = memoryview(frame).cast("B")
            length = view.nbytes
            if length == 0:
                yield self._chunk(blob, index, count, 0, 0, view)
                continue
            for offset in range(0, length, CHUNK):
                yield self._chunk(blob, index, count, offset, length, view[offset:offset + CHUNK])


class _Blob:
    __slots__ = ("id", "frames", "count", "index", "filled", "nbytes", "since")

    def __init__(self, blob_id: int, count: int) -> None:
        self.id = blob_id
        self.frames: list[Any] = []
        self.count = count
        self.index = -1  # the frame being filled
        self.filled = 0
        self.nbytes = 0
        self.since = time.monotonic()


class Opener:
    """Opens one direction of a channel; collects the blobs it completes until they are taken.

    Parameters
    ----------
    channel, key
        The channel id and the key of the direction it opens.
    max_bytes : int
        The largest blob accepted (the receiver's ``max_message_size``; ``<= 0``: any).
    max_frames : int
        The most frames in one blob (``0``: any).
    max_pending : int
        The most bytes of blobs received and not yet taken (``<= 0``: any); a blob past it is
        refused, and its marker is told so.
    plain : bool
        The channel of an insecure worker: chunks are not encrypted (:class:`_Plain`).
    """

    def __init__(self, channel: bytes, key: bytes, max_bytes: int = -1, max_frames: int = 0,
                 max_pending: int = -1, plain: bool = False) -> None:
        self.channel = channel
        self._aead = _cipher(key, plain)  # (plain: an insecure worker's channel, see _Plain)
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self.max_pending = max_pending
        self._last = 0  # the highest counter accepted
        self._last_blob = 0
        self._current: _Blob | None = None
        self.done: dict[int, tuple[list[Any], float]] = {}
        self.refused: dict[int, str] = {}  # blob -> why it was not kept (told to its marker)
        self.pending = 0

    def open(self, message: Any) -> int:
        """Take in one chunk message; the id of the blob it completed (0 if none: more to come,
        or an attach).

        Nothing changes here before the chunk is authenticated: a chunk that does not decrypt
        with the channel's key (a forgery by someone who saw the channel id go by) is refused
        and leaves the blob in progress as it was.

        Raises
        ------
        BulkError
            If the chunk is not accepted (nothing of it is kept; a blob an authentic chunk
            showed broken is dropped, and its marker will be told why).
        """
        view = memoryview(message).cast("B")
        if view.nbytes < HEADER + _TAG:
            raise BulkError("a chunk shorter than its header")
        channel, counter, blob, index, count, offset, length = _HEAD.unpack_from(view, 0)
        if channel != self.channel:
            raise BulkError("a chunk of another channel")
        if counter <= self._last:
            raise BulkError(f"a chunk replayed or out of order (counter {counter} after "
                            f"{self._last})")
        data = view[HEADER:]
        n = data.nbytes - _TAG
        head = bytes(view[:HEADER])
        nonce = _nonce(counter)
        if blob == 0:  # an attach: nothing but its authenticity
            if count or length or n or index or offset:
                raise BulkError("a malformed attach chunk")
            self._decrypt(nonce, data, head, bytearray(0))
            self._last = counter
            return 0
        if index >= count or offset + n > length or (length and not n) or offset % CHUNK:
            raise BulkError("a chunk whose sizes do not add up")
        cur = self._current
        continuing = cur is not None and cur.id == blob
        if continuing:
            assert cur is not None
            frame_full = cur.filled == len(cur.frames[cur.index])
            if count != cur.count:
                raise BulkError("a chunk changing its blob's frame count")
            if index == cur.index and offset == cur.filled and not frame_full:
                new_frame = False
            elif index == cur.index + 1 and offset == 0 and frame_full:
                new_frame = True
            else:
                raise BulkError(f"a chunk out of sequence in blob {blob}")
            nbytes = cur.nbytes
        else:
            if blob <= self._last_blob or index != 0 or offset != 0:
                raise BulkError(f"a chunk starting blob {blob} out of sequence")
            new_frame, nbytes = True, 0
        refusal = ""
        if new_frame:
            if self.max_frames and count > self.max_frames:
                refusal = (f"it has {count} frames, more than the {self.max_frames} allowed "
                           "(max_frames)")
            elif 0 < self.max_bytes < nbytes + length:
                refusal = (f"it holds more than {self.max_bytes:,} bytes, the most this side "
                           "accepts in one message (max_message_size)")
            elif 0 < self.max_pending < self.pending + length:
                refusal = (f"{self.pending:,} bytes of earlier sealed messages were still waiting "
                           "to be handled here")
        if refusal or not new_frame:
            target: Any = bytearray(n) if refusal else cur.frames[index]  # type: ignore[union-attr]
        else:
            target = _buffer(length)
        self._decrypt(nonce, data, head,
                      memoryview(target)[0 if refusal else offset:][:n] if n else bytearray(0))
        # authentic: from here on, the chunk counts
        self._last = counter
        if not continuing:
            if cur is not None:  # the blob in progress lost its end (a reconnect): drop it
                self._break(cur, "its transfer broke off")
            self._last_blob = blob
            cur = self._current = _Blob(blob, count)
        assert cur is not None
        if refusal:
            self._break(cur, refusal)
            raise BulkError(f"blob {blob} refused: {refusal}")
        if new_frame:
            cur.frames.append(target)
            cur.index += 1
            cur.nbytes += length
            self.pending += length
        cur.filled = offset + n
        if index == count - 1 and cur.filled == length:
            self._current = None
            frames = cur.frames
            if type(frames[0]) is not bytes:
                frames[0] = bytes(frames[0])  # the header: decoders want bytes
            self.done[blob] = (frames, cur.since)
            return blob
        return 0

    def _decrypt(self, nonce: bytes, data: memoryview, head: bytes, out: Any) -> None:
        try:
            if _HAS_INTO:
                self._aead.decrypt_into(nonce, data, head, out)
            else:  # cryptography < 44
                plain = self._aead.decrypt(nonce, bytes(data), head)
                if len(plain):
                    out[:] = plain
        except InvalidTag:
            raise BulkError("a chunk that does not authenticate (forged, or sealed with another "
                            "key)") from None

    def _break(self, cur: _Blob, why: str) -> None:
        self._refuse(cur.id, why)
        if self._current is cur:
            self._current = None

    def _refuse(self, blob: int, why: str) -> None:
        cur = self._current
        if cur is not None and cur.id == blob:
            self.pending -= sum(len(f) for f in cur.frames)
            self._current = None
        self._last_blob = max(self._last_blob, blob)
        self.refused[blob] = why
        while len(self.refused) > 64:  # (their markers never came: forget the oldest)
            del self.refused[next(iter(self.refused))]

    def take(self, blob: int) -> list[Any] | None:
        """The frames of completed blob ``blob`` (then forgotten here), or ``None`` if it is not
        complete. ``BulkError`` if it was refused or broken, saying why."""
        entry = self.done.pop(blob, None)
        if entry is not None:
            frames = entry[0]
            self.pending -= sum(len(f) for f in frames)
            return frames
        why = self.refused.pop(blob, None)
        if why is not None:
            raise BulkError(f"the sealed data of this message was not kept: {why}")
        return None

    def expire(self, older_than: float) -> int:
        """Forget completed blobs no marker claimed since ``older_than`` (``time.monotonic()``)
        and a blob in progress that started before it; how many."""
        gone = [b for b, (_, since) in self.done.items() if since < older_than]
        for blob in gone:
            self.take(blob)
        cur = self._current
        if cur is not None and cur.since < older_than:
            self._break(cur, "it did not complete in time")
            gone.append(cur.id)
        return len(gone)

    def close(self) -> None:
        """Free every buffer held."""
        self.done.clear()
        self._current = None
        self.pending = 0


def _buffer(n: int) -> Any:
    """A writable buffer of ``n`` bytes, not zeroed: what goes in is written over it at once
    (``bytearray(n)`` would write zeros first, costing as much again as decrypting)."""
    return bytearray(n) if n < 4096 else np.empty(n, dtype=np.uint8)
