"""The worker process: :class:`~zmqsyft.worker.loop.Worker` and the handlers it runs.

Imports :mod:`zmqsyft.wire` and the top-level modules, never :mod:`zmqsyft.client`.
"""

from __future__ import annotations

from .loop import Worker

__all__ = ["Worker"]
