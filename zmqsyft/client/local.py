"""The local worker: this program, as PySyft 0.2 named it (``sy.local_worker``, ``hook.local_worker``,
``pointer.owner``).

In PySyft the program itself was a worker (``"me"``) that owned every pointer it made. zmqsyft's
program is a client, not a worker: nothing can be sent *to* it (``.get()`` brings data here), but
ported code that looks at the local worker finds the same answers: its ``id`` is ``"me"``, it is
a client worker (``is_client_worker``), it holds no objects of its own, and every pointer this
program owns has it as its ``owner``. It compares equal to ``"me"``, which is how pointers printed
and compared their owner before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LocalWorker", "LOCAL_WORKER"]


class LocalWorker:
    """This program as a PySyft-style worker: ``id == "me"``, ``is_client_worker``.

    Attributes
    ----------
    id : str
        ``"me"``.
    is_client_worker : bool
        True: it stores nothing (PySyft let code set it to False to keep objects locally, for
        building plans; zmqsyft's plans are traced, so the flag changes nothing here).
    """

    def __init__(self) -> None:
        self.id = "me"
        self.is_client_worker = True

    @property
    def _objects(self) -> dict[int, Any]:
        """Nothing: the program's tensors are plain local tensors, not stored objects."""
        return {}

    @property
    def _tensors(self) -> dict[int, Any]:
        return {}

    def __eq__(self, other: object) -> bool:
        return other is self or (isinstance(other, str) and other == self.id)

    def __hash__(self) -> int:
        return hash(self.id)

    def __str__(self) -> str:
        return self.id

    def __format__(self, spec: str) -> str:
        return format(self.id, spec)

    def __repr__(self) -> str:
        return "<LocalWorker id:me (this program)>"


LOCAL_WORKER = LocalWorker()
"""The one local worker of this process."""
