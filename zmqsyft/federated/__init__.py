"""PySyft 0.2's import paths for federated learning: ``from zmqsyft.federated.floptimizer import
Optims`` (PySyft's ``syft.federated.floptimizer``). The implementations live in
:mod:`zmqsyft.client`; this package only re-exports them.
"""

from __future__ import annotations

from .floptimizer import Optims

__all__ = ["Optims"]
