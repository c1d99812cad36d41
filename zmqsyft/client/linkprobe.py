"""Watching a link while a large message is on its way to a worker.

ZMTP heartbeats tell a lost link (a cable pulled, a host gone silent) within three heartbeat
intervals, but only on a connection that can send: libzmq queues its ``PING`` behind the message
it is writing, so while a large message is stuck in a send buffer that the network no longer
drains, no ``PING`` leaves, no heartbeat timeout runs, and the request would wait for its whole
reply timeout (and then advise raising it). A :class:`LinkProbe` opens a second, idle connection
to the same address while such a message is in flight; its heartbeats are never stuck behind
anything, so a lost link shows on it within the heartbeat grace. It is closed once nothing is in
flight (it takes a connection of the worker's ``max_connections`` meanwhile; one the worker
refuses is simply not used).
"""

from __future__ import annotations

from typing import Any

import zmq

from ..wire import transport

__all__ = ["LinkProbe", "LARGE"]

LARGE = 4 << 20  # messages of at least this many bytes in frames are watched this way (what
# the kernel buffers of both ends hold goes out at once; a larger one can get stuck)


class LinkProbe:
    """A second connection to one worker, open while a large message of ours is on its way."""

    __slots__ = ("sock", "watch", "nbytes")

    def __init__(self) -> None:
        self.sock: zmq.Socket | None = None
        self.watch: transport.PeerWatch | None = None
        self.nbytes = 0

    def start(self, conn: Any, frames: list[Any]) -> None:
        """Watch the link of connection ``conn`` (a :class:`~zmqsyft.client.connection.
        Connection`) if ``frames``, just sent on it, make a large message on a network transport
        (``ipc://`` links are not lost that way). The probe connects as ``conn`` does."""
        worker = conn.worker
        if len(frames) < 2 or not worker.address.startswith("tcp://"):
            return
        nbytes = sum(memoryview(f).nbytes for f in frames[1:])
        if nbytes < LARGE:
            return
        self.nbytes = max(self.nbytes, nbytes)
        if self.sock is None:
            keys, key = worker.client_keys or conn.host.keys, worker.key
            curve = (keys.public, keys.secret, key.encode("ascii")) if key else None
            self.sock, self.watch = transport.make_dealer(conn.host.ctx, worker.address,
                                                          conn.host.cfg, curve)

    def down(self) -> str | None:
        """Why the link is lost, if the probe says so; ``None`` if it is up, still connecting
        within the grace, or the worker refused the probe (then it says nothing)."""
        if self.watch is None:
            return None
        why = self.watch.down()
        if why is None or self.watch.refused is not None or self.watch.failed:
            return None
        return (f"the link to it was lost while a message of {self.nbytes / 2**20:,.1f} MiB was "
                f"on its way ({why.split(':')[0]}, on a second connection watching it); whether "
                "the request took effect is unknown. Check the network and the worker; "
                "waiting longer would not help")

    def settle(self, busy: bool) -> None:
        """A request was answered: close the probe if nothing is in flight any more."""
        if not busy and self.sock is not None:
            self.stop()

    def stop(self) -> None:
        """Close the probe (nothing large is in flight any more, or the connection failed)."""
        if self.sock is not None:
            if self.watch is not None:
                self.watch.close(self.sock)
            self.sock.close(linger=0)
        self.sock = self.watch = None
        self.nbytes = 0
