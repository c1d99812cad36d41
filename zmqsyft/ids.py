"""Fresh object ids, used by both halves: a client names the objects it creates, a worker the
results it describes. Random (63 bits from the OS's CSPRNG), so that ids chosen independently by
different processes do not collide and cannot be guessed."""

from __future__ import annotations

import os
import threading

__all__ = ["new_id"]

_ids: list[int] = []  # random ids drawn ahead, 512 per system call
_ids_lock = threading.Lock()


def new_id() -> int:
    """A fresh random object id (63 bits from the OS's CSPRNG, never 0)."""
    try:
        return _ids.pop()
    except IndexError:
        with _ids_lock:
            if not _ids:
                raw = os.urandom(8 * 512)
                _ids.extend((int.from_bytes(raw[i:i + 8], "big") >> 1) or 1
                            for i in range(0, len(raw), 8))
        return new_id()


os.register_at_fork(after_in_child=_ids.clear)  # a forked child must not repeat its parent's ids
