"""Search tags and descriptions: what they may be, checked alike by callers and by workers.

An object's **tags** (``"#diabetes"``, ``"#data"``) are what ``search()`` matches, exactly and
all of them; its **description** is free text shown with it (in a pointer's repr), never matched.
Both travel in ``PUT``, ``TAG``, ``GET`` replies and ``SEARCH`` replies
(:mod:`zmqsyft.wire.bodies`). The client library checks them before sending, so a mistake is
reported at the line that made it; a worker checks them again, since a raw client can send
anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_TAGS", "MAX_TAG_CHARS", "MAX_DESCRIPTION_CHARS", "check_tags",
           "check_description", "query_tags"]

MAX_TAGS = 32
"""Most tags one object carries (and one search names)."""
MAX_TAG_CHARS = 128
"""Most characters in one tag."""
MAX_DESCRIPTION_CHARS = 8192
"""Most characters in a description (scikit-learn's longest bundled ``DESCR`` is about 5,000)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_tags(tags: Iterable[Any], where: str, already: Iterable[str] = ()) -> list[str]:
    """The tags, checked, sorted and without repeats; ``already``: those the object carries
    (they count towards :data:`MAX_TAGS`).

    Raises ``TypeError`` for a tag that is not a ``str``; ``ValueError`` for an empty tag, one
    of more than :data:`MAX_TAG_CHARS` characters or with unprintable characters (newlines,
    control characters), and for more than :data:`MAX_TAGS` tags in all. ``where`` says where
    (``"tag() on worker 'bob'"``).
    """
    out: set[str] = set()
    for tag in tags:
        if type(tag) is not str:
            raise TypeError(f"{where}: a tag is a str, such as '#diabetes', not "
                            f"{type(tag).__name__} {_shown(tag)}; pass each tag as its own "
                            "argument: tag('#a', '#b')")
        if not tag or len(tag) > MAX_TAG_CHARS or not tag.isprintable():
            why = ("is empty" if not tag else f"has {len(tag)} characters, more than the "
                   f"{MAX_TAG_CHARS} a tag may have" if len(tag) > MAX_TAG_CHARS else
                   "has unprintable characters (a newline, a control character)")
            raise ValueError(f"{where}: the tag {_shown(tag)} {why}; use a short word, such "
                             "as '#diabetes'")
        out.add(tag)
    total = out | set(already)
    if len(total) > MAX_TAGS:
        raise ValueError(f"{where}: {len(total)} tags, more than the {MAX_TAGS} one object may "
                         "carry (or one search may name); put the rest in its description")
    return sorted(out)


def check_description(text: Any, where: str) -> str:
    """The description, checked: a ``str`` (``TypeError`` otherwise) of at most
    :data:`MAX_DESCRIPTION_CHARS` characters, printable but for newlines and tabs
    (``ValueError`` otherwise)."""
    if type(text) is not str:
        raise TypeError(f"{where}: a description is a str, not {type(text).__name__} "
                        f"{_shown(text)}")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"{where}: the description has {len(text)} characters, more than the "
                         f"{MAX_DESCRIPTION_CHARS} one may have; shorten it")
    if not text.replace("\n", "").replace("\t", "").isprintable():
        raise ValueError(f"{where}: the description has control characters other than "
                         "newlines and tabs; remove them")
    return text


def query_tags(query: tuple[Any, ...], where: str) -> list[str]:
    """The tags of a search query, which may name them one by one (``search("#a", "#b")``) or
    in a list, as PySyft did (``search(["#a", "#b"])``); checked with :func:`check_tags`."""
    flat: list[Any] = []
    for item in query:
        flat.extend(item if isinstance(item, (list, tuple, set, frozenset)) else [item])
    return check_tags(flat, where)
