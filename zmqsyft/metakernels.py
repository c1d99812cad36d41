"""torch's meta kernels without TorchDynamo.

Workers estimate every op's cost on ``meta`` tensors (``worker/costs.py``), and clients infer a
pipelined result's shape the same way. For most elementwise ops (``add``, ``mul``, ``exp``, ...)
torch's meta kernel is its Python reference implementation, wrapped in
``torch._compile._disable_dynamo``: on its first call that wrapper imports ``torch._dynamo``
(0.75 s of CPU and about 70 MiB on a 2 vCPU host) only to run the reference with TorchDynamo's
frame hook switched off. A process that never imported TorchDynamo has never set that hook, so
running the reference directly does exactly the same.

:func:`spare_dynamo` tells every such wrapper that exists now to do so, through the cache the
wrapper itself keeps (``fn.__dynamo_disable``, filled on its first call). A wrapper made later,
or a torch whose wrapper looks different, simply imports TorchDynamo as before: nothing breaks,
it only costs what it did. A process that imports TorchDynamo afterwards (a trusted client's own
``torch.compile``) traces into these references instead of stopping at them, which is what
TorchDynamo does with every other Python function of torch's.
"""

from __future__ import annotations

import gc
import sys
from types import FunctionType

__all__ = ["spare_dynamo"]

_spared = False  # (inherited by a fork: the fork server's scan covers its workers)


def _nothing() -> None:
    return None


def spare_dynamo() -> int:
    """Let the meta kernels that exist now run without importing ``torch._dynamo``; returns how
    many wrappers were told. Does nothing once done in this process (or in the process it was
    forked from) or once TorchDynamo is imported. Call it after ``import torch`` and before the
    first op on ``meta`` tensors; it scans every object once (about 50 ms)."""
    global _spared
    if _spared or "torch._dynamo" in sys.modules or "torch" not in sys.modules:
        return 0
    _spared = True
    try:
        from torch import _compile

        code = _compile._disable_dynamo(_nothing).__code__
        cell = code.co_freevars.index("fn")
    except (ImportError, AttributeError, ValueError):  # another torch: its wrappers stay as they are
        return 0
    told = 0
    for obj in gc.get_objects():
        if type(obj) is FunctionType and obj.__code__ is code and obj.__closure__:
            fn = obj.__closure__[cell].cell_contents
            if getattr(fn, "__dynamo_disable", None) is None:
                setattr(fn, "__dynamo_disable", fn)
                told += 1
    return told
