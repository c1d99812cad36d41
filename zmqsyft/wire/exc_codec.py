"""The exception codec: remote exceptions → wire → local exceptions.

An exception raised on a worker travels as a plain map (no pickle): its type's module and name,
its message, the formatted remote traceback and the worker's id. On arrival it is rebuilt as the
*same type* when that type is safe to construct from a message (builtin exceptions, torch's
errors, zmqsyft's own errors); any other type becomes :class:`~zmqsyft.errors.RemoteError`. Either
way the remote traceback is attached, as a note that Python prints under the local traceback::

    +--- This exception occurred remotely on worker 'bob' -----------------
    Traceback (most recent call last):
      ...
    +---------------------------------------------------------------------

and as the attributes ``remote_traceback`` and ``worker_id``.
"""

from __future__ import annotations

import builtins
import traceback
from typing import Any

import torch

from .. import errors

__all__ = ["encode_exception", "decode_exception", "clean"]


def _safe_types() -> dict[str, type[BaseException]]:
    table: dict[str, type[BaseException]] = {}
    for name in dir(builtins):
        obj = getattr(builtins, name)
        if (isinstance(obj, type) and issubclass(obj, Exception)
                and not issubclass(obj, (OSError, UnicodeError))):
            # OSError and UnicodeError subclasses take structured constructor arguments
            table[f"builtins.{name}"] = obj
    for name in errors.__all__:
        cls = getattr(errors, name)
        table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for cls in (torch.OutOfMemoryError, torch.linalg.LinAlgError):
        table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    table.pop("builtins.ExceptionGroup", None)
    return table


_SAFE = _safe_types()

# control characters (terminal escape sequences), and the marks that reorder text, in a peer's
# error text are shown escaped: they would act on the terminal the traceback is printed to
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if chr(c) not in "\n\t"}
_UNPRINTABLE.update({c: f"\\u{c:04x}" for c in (*range(0x202a, 0x202f), *range(0x2066, 0x206a))})


def clean(text: str) -> str:
    """``text`` from another process, safe to print: control characters escaped."""
    return text.translate(_UNPRINTABLE)


def encode_exception(exc: BaseException, worker_id: str) -> dict[str, Any]:
    """Encode an exception raised on this worker (``worker_id``) for an ERROR reply."""
    cls = type(exc)
    tb_text = getattr(exc, "remote_traceback", None)
    origin = getattr(exc, "worker_id", None)
    if not tb_text:
        tb_text = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
        origin = worker_id
    type_name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, KeyError):
        message = str(exc.args[0]) if exc.args else ""
    else:
        message = str(exc)
    if isinstance(exc, errors.RemoteError) and exc.remote_type:  # relayed: keep the original
        type_name, message = exc.remote_type, exc.remote_message
    return {
        "type": type_name,
        "message": message,
        "traceback": tb_text,
        "worker": origin or worker_id,
        "via": worker_id,
    }


def _note(worker: str, via: str, tb_text: str) -> str:
    where = f"worker '{worker}'" if worker == via else f"worker '{worker}' (relayed by '{via}')"
    head = f"+--- This exception occurred remotely on {where} "
    return f"{head.ljust(72, '-')}\n{tb_text.rstrip()}\n+{'-' * 71}"


def decode_exception(data: Any) -> BaseException:
    """Rebuild an exception from an ERROR reply's ``error`` map."""
    if not isinstance(data, dict):
        return errors.ProtocolError(f"malformed error reply: {data!r}")
    type_name = clean(str(data.get("type", "")))
    message = clean(str(data.get("message", "")))
    tb_text = clean(str(data.get("traceback", "")))
    worker = clean(str(data.get("worker", "?")))
    via = clean(str(data.get("via", worker)))
    cls = _SAFE.get(type_name)
    exc: BaseException
    if cls is not None:
        try:
            exc = cls(message)
        except Exception:
            exc = errors.RemoteError(f"{type_name}: {message}", type_name, tb_text, worker, message)
    else:
        exc = errors.RemoteError(f"{type_name}: {message}", type_name, tb_text, worker, message)
    exc.remote_traceback = tb_text  # type: ignore[attr-defined]
    exc.worker_id = worker  # type: ignore[attr-defined]
    exc.add_note(_note(worker, via, tb_text))
    return exc
