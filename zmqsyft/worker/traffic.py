"""A worker's traffic counters: per peer (by the name it gave), each way, and what was dropped.

Counted on both of a worker's sides, the requests it serves (its ROUTER, keyed by routing id) and
the requests it sends (its peer links, keyed by address), and merged by the peers' names for
``stats()``: the data-owner examples read them to show who saw how much.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["Traffic"]

_AT = {"in": 0, "out": 3}  # where a direction's three counts start in a peer's list
_NAMES = ("messages_in", "bytes_in", "largest_in", "messages_out", "bytes_out", "largest_out")


class Traffic:
    """Messages, bytes and the largest message per peer and direction, plus event counters.

    Attributes
    ----------
    counters : dict
        Worker-wide events: ``dropped_malformed``, ``refused_untrusted``, ``late_replies``,
        ``unroutable_replies``, ``handovers_refused``, ``shm_bytes_in/out``, ``keepalives_in``
        (reply-less PINGs that keep sessions alive: not counted per peer).
    labels : dict
        Routing id (hex) or peer address -> the name that peer gave in its HELLO.
    """

    def __init__(self) -> None:
        self.counters: dict[str, int] = defaultdict(int)
        # peer -> [messages, bytes, largest] in, then the same out (a list: counted per message)
        self.per_peer: dict[str, list[int]] = {}
        self.labels: dict[str, str] = {}

    def count(self, key: str, direction: str, frames: list[Any], shm_bytes: int = 0) -> None:
        """One message to or from ``key``: its frames' bytes and the shared-memory bytes it named."""
        size = shm_bytes
        for f in frames:
            size += len(f) if type(f) is bytes else memoryview(f).nbytes
        at = _AT[direction]
        if shm_bytes:
            self.counters[f"shm_bytes_{direction}"] += shm_bytes
        peer = self.per_peer.get(key)
        if peer is None:
            peer = self.per_peer[key] = [0, 0, 0, 0, 0, 0]
        peer[at] += 1
        peer[at + 1] += size
        if size > peer[at + 2]:
            peer[at + 2] = size

    def by_name(self) -> dict[str, dict[str, int]]:
        """The per-peer counts merged by the name each peer gave (a direction appears once a
        message went that way)."""
        peers: dict[str, dict[str, int]] = {}
        for key, counts in self.per_peer.items():
            merged = peers.setdefault(self.labels.get(key, key), {})
            for at in (0, 3):
                if not counts[at]:
                    continue
                for i in (at, at + 1):
                    merged[_NAMES[i]] = merged.get(_NAMES[i], 0) + counts[i]
                merged[_NAMES[at + 2]] = max(merged.get(_NAMES[at + 2], 0), counts[at + 2])
        return peers
