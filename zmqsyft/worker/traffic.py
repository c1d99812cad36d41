"""A worker's traffic counters: per peer (by the name it gave), each way, and what was dropped.

Counted on both of a worker's sides, the requests it serves (its ROUTER, keyed by routing id) and
the requests it sends (its peer links, keyed by address), and merged by the peers' names for
``stats()``: the data-owner examples read them to show who saw how much.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

__all__ = ["Traffic"]

_KEYS = {d: (f"messages_{d}", f"bytes_{d}", f"largest_{d}") for d in ("in", "out")}


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
        self.per_peer: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.labels: dict[str, str] = {}

    def count(self, key: str, direction: str, frames: list[Any], shm_bytes: int = 0) -> None:
        """One message to or from ``key``: its frames' bytes and the shared-memory bytes it named."""
        size = shm_bytes
        for f in frames:
            size += len(f) if type(f) is bytes else memoryview(f).nbytes
        messages, nbytes, largest = _KEYS[direction]
        if shm_bytes:
            self.counters[f"shm_bytes_{direction}"] += shm_bytes
        peer = self.per_peer[key]
        peer[messages] += 1
        peer[nbytes] += size
        if size > peer[largest]:
            peer[largest] = size

    def by_name(self) -> dict[str, dict[str, int]]:
        """The per-peer counts merged by the name each peer gave."""
        peers: dict[str, dict[str, int]] = {}
        for key, counts in self.per_peer.items():
            merged = peers.setdefault(self.labels.get(key, key), {})
            for name, value in counts.items():
                if name.startswith("largest_"):
                    merged[name] = max(merged.get(name, 0), value)
                else:
                    merged[name] = merged.get(name, 0) + value
        return peers
