"""The PySyft 0.2 attributes of a pointer that are not about where it points: garbage
collection (``gc``, ``garbage_collection``, ``disable_gc``) and search tags (``tags``,
``description``, ``tag()``, ``describe()``), as a mixin of
:class:`~zmqsyft.client.pointer.PointerTensor`."""

from __future__ import annotations

from typing import Any

from ..wire.bodies import Tag
from ..wire.messages import Op
from ..wire.tags import check_description, check_tags

__all__ = ["PySyftAttributes"]


class PySyftAttributes:
    """Mixed into :class:`~zmqsyft.client.pointer.PointerTensor` (which owns the attributes
    used here: ``location``, ``id_at_location``, ``_owned``, ``_fin``, ``_tags``,
    ``_description``)."""

    location: Any
    id_at_location: int
    _owned: bool
    _fin: Any
    _tags: frozenset[str]
    _description: str | None

    @property
    def gc(self) -> bool:
        """Whether dropping this pointer frees the object on the worker (PySyft's ``gc`` and
        ``garbage_collection``; set it to False to keep the object when the pointer goes)."""
        return self._fin is not None

    @gc.setter
    def gc(self, on: bool) -> None:
        if not on:
            self.location.session.untrack(self._fin)
            self._fin = None
        elif self._owned and self._fin is None:
            self._fin = self.location.session.track(self, self.location.address,
                                                    self.id_at_location)

    garbage_collection = gc

    @property
    def disable_gc(self) -> Any:
        """This pointer, with :attr:`gc` off."""
        self.gc = False
        return self

    @property
    def tags(self) -> frozenset[str]:
        """The remote tensor's search tags, as this process knows them (add some with
        :meth:`tag`)."""
        return self._tags

    @tags.setter
    def tags(self, value: object) -> None:
        raise AttributeError(f"{self!r}: a pointer's tags are the remote tensor's; add some with "
                             ".tag('#a', ...), which its owner alone may")

    @property
    def description(self) -> str | None:
        """The remote tensor's description, as this process knows it (set it with
        :meth:`describe`)."""
        return self._description

    @description.setter
    def description(self, value: object) -> None:
        raise AttributeError(f"{self!r}: a pointer's description is the remote tensor's; set it "
                             "with .describe(text), which its owner alone may")

    # ------------------------------------------------------------ tags
    def tag(self, *tags: str) -> Any:
        """Add search tags to the remote tensor, which publishes it: anyone the worker serves
        finds it with ``search()`` and may compute with it (never take, change or delete it).
        Only its owner may tag it. Returns this pointer."""
        return self._annotate(check_tags(tags, f"tag() on worker '{self.location.id}'",
                                         self._tags), None, ".tag()")

    def describe(self, description: str) -> Any:
        """Set the remote tensor's description, shown with it in search results (not searched).
        Only its owner may. Returns this pointer."""
        where = f"describe() on worker '{self.location.id}'"
        return self._annotate([], check_description(description, where), ".describe()")

    def _annotate(self, tags: list[str], description: str | None, what: str) -> Any:
        self._check_usable(what)  # type: ignore[attr-defined]
        self.location.session.conn(self.location).request(
            Op.TAG, Tag(id=self.id_at_location, tags=tags, description=description),
            keep=(self,), what=what)
        if tags:
            self._tags = self._tags | frozenset(tags)
        if description is not None:
            self._description = description or None
        return self
