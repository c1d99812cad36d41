"""``Optims``, where PySyft 0.2 kept it (``syft.federated.floptimizer``): one optimizer per
worker. See :class:`zmqsyft.client.optims.Optims`."""

from __future__ import annotations

from ..client.optims import Optims

__all__ = ["Optims"]
