"""The exception codec: exceptions raised on a worker, encoded as plain maps, rebuilt locally."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch

from zmqsyft import errors
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.exc_codec import decode_exception, encode_exception
from zmqsyft.wire.messages import Op


class CustomError(Exception):
    """A user exception type the receiver cannot (and must not) construct."""


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a real traceback (raised from a recognisable function)."""
    def remote_function_that_fails() -> None:
        raise exc
    try:
        remote_function_that_fails()
    except BaseException as caught:  # noqa: BLE001
        return caught
    raise AssertionError("unreachable")


def over_the_wire(data: dict[str, Any]) -> dict[str, Any]:
    """The encoded map as the receiver sees it, after a real encode/decode of an ERROR reply."""
    msg = decode_message(encode_message(Op.ERROR, 5, {"error": data}))
    assert msg.op is Op.ERROR
    return msg.body["error"]


def note_of(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", [])
    assert len(notes) == 1, notes
    return notes[0]


@pytest.mark.parametrize("exc", [
    ValueError("bad value"),
    TypeError("wrong type"),
    RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"),
    IndexError("index 5 is out of bounds"),
    ZeroDivisionError("division by zero"),
    NotImplementedError("no kernel"),
    AttributeError("no attribute x"),
    ArithmeticError("arith"),
    AssertionError("assert"),
    StopIteration("stop"),
    RecursionError("deep"),
    MemoryError("oom"),
    LookupError("lookup"),
], ids=lambda e: type(e).__name__)
def test_builtin_exceptions_are_rebuilt_as_their_type(exc: Exception) -> None:
    data = over_the_wire(encode_exception(raised(exc), "bob"))
    assert data["type"] == f"builtins.{type(exc).__qualname__}"
    got = decode_exception(data)
    assert type(got) is type(exc)
    assert str(got) == str(exc)
    assert got.worker_id == "bob"  # type: ignore[attr-defined]
    tb = got.remote_traceback  # type: ignore[attr-defined]
    assert "remote_function_that_fails" in tb and "Traceback (most recent call last)" in tb
    assert f"{type(exc).__name__}: {exc}" in tb
    note = note_of(got)
    assert "occurred remotely on worker 'bob'" in note
    assert "remote_function_that_fails" in note
    # Python prints the note under the local traceback
    printed = "".join(traceback.format_exception(got))
    assert "occurred remotely on worker 'bob'" in printed and "remote_function_that_fails" in printed


def test_key_error_message_is_not_double_quoted() -> None:
    got = decode_exception(over_the_wire(encode_exception(raised(KeyError("missing")), "bob")))
    assert type(got) is KeyError and got.args == ("missing",) and str(got) == "'missing'"


def test_key_error_without_args() -> None:
    got = decode_exception(over_the_wire(encode_exception(raised(KeyError()), "bob")))
    assert type(got) is KeyError
    assert got.worker_id == "bob"  # type: ignore[attr-defined]
    tb = got.remote_traceback  # type: ignore[attr-defined]
    assert "remote_function_that_fails" in tb and tb.rstrip().endswith("KeyError")
    assert "occurred remotely on worker 'bob'" in note_of(got)


@pytest.mark.parametrize("cls", [
    errors.ObjectNotFound, errors.OpNotAllowed, errors.UntrustedPayload, errors.ProtocolError,
    errors.SerializationError, errors.LocationMismatch, errors.PointerReleased, errors.PointerError,
    errors.WorkerUnavailable, errors.RequestTimeout, errors.SpawnError, errors.SecurityError,
    errors.ZmqSyftError, errors.CommunicationError,
])
def test_zmqsyft_errors_are_rebuilt_as_their_type(cls: type[Exception]) -> None:
    data = over_the_wire(encode_exception(raised(cls("object 5 does not exist")), "alice"))
    assert data["type"] == f"zmqsyft.errors.{cls.__qualname__}"
    got = decode_exception(data)
    assert type(got) is cls
    assert str(got) == "object 5 does not exist"
    assert got.worker_id == "alice"  # type: ignore[attr-defined]
    assert "remote_function_that_fails" in got.remote_traceback  # type: ignore[attr-defined]


def test_torch_out_of_memory_is_rebuilt() -> None:
    got = decode_exception(over_the_wire(encode_exception(raised(torch.OutOfMemoryError("oom")), "bob")))
    assert type(got) is torch.OutOfMemoryError and str(got) == "oom"


def test_real_torch_error_roundtrip() -> None:
    try:
        torch.ones(3) + torch.ones(4)
    except RuntimeError as exc:
        original = exc
    got = decode_exception(over_the_wire(encode_exception(original, "bob")))
    assert type(got) is RuntimeError and "must match" in str(got)


@pytest.mark.parametrize("exc, type_name", [
    (CustomError("custom failure"), f"{__name__}.CustomError"),
    (OSError("disk on fire"), "builtins.OSError"),
    (FileNotFoundError(2, "gone", "/x"), "builtins.FileNotFoundError"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), "builtins.UnicodeDecodeError"),
    (KeyboardInterrupt(), "builtins.KeyboardInterrupt"),
    (SystemExit(3), "builtins.SystemExit"),
    (ExceptionGroup("group", [ValueError("x")]), "builtins.ExceptionGroup"),
], ids=["custom", "oserror", "filenotfound", "unicode", "keyboardinterrupt", "systemexit", "group"])
def test_other_types_become_remote_error(exc: BaseException, type_name: str) -> None:
    data = over_the_wire(encode_exception(raised(exc), "bob"))
    assert data["type"] == type_name
    got = decode_exception(data)
    assert type(got) is errors.RemoteError
    assert got.remote_type == type_name
    assert got.worker_id == "bob"
    assert str(exc) in str(got) and type_name in str(got)
    assert "remote_function_that_fails" in got.remote_traceback
    assert "occurred remotely on worker 'bob'" in note_of(got)


def test_custom_type_name_is_never_imported() -> None:
    data = {"type": "os.system", "message": "rm -rf /", "traceback": "tb", "worker": "bob"}
    got = decode_exception(data)
    assert type(got) is errors.RemoteError and got.remote_type == "os.system"
    data = {"type": "subprocess.CalledProcessError", "message": "x", "traceback": "", "worker": "w"}
    assert type(decode_exception(data)) is errors.RemoteError


def test_relayed_exception_keeps_origin() -> None:
    first = decode_exception(over_the_wire(encode_exception(raised(ValueError("deep")), "bob")))
    # alice relays bob's error to the caller
    relayed = over_the_wire(encode_exception(first, "alice"))
    assert relayed["worker"] == "bob" and relayed["via"] == "alice"
    got = decode_exception(relayed)
    assert type(got) is ValueError and str(got) == "deep"
    assert got.worker_id == "bob"  # type: ignore[attr-defined]
    assert got.remote_traceback == first.remote_traceback  # type: ignore[attr-defined]
    note = note_of(got)
    assert "worker 'bob' (relayed by 'alice')" in note


def test_encoded_map_is_plain_data() -> None:
    data = encode_exception(raised(ValueError("v")), "bob")
    assert set(data) == {"type", "message", "traceback", "worker", "via"}
    assert all(isinstance(v, str) for v in data.values())
    assert data["message"] == "v" and data["worker"] == "bob" and data["via"] == "bob"
    assert data["type"] == "builtins.ValueError"
    assert "remote_function_that_fails" in data["traceback"] and "ValueError: v" in data["traceback"]


@pytest.mark.parametrize("data", [
    None,
    5,
    "ValueError: x",
    b"\x00",
    [],
    ["builtins.ValueError", "x"],
    (1, 2),
])
def test_non_map_error_payload_becomes_protocol_error(data: Any) -> None:
    got = decode_exception(data)
    assert type(got) is errors.ProtocolError
    assert "malformed error reply" in str(got)


@pytest.mark.parametrize("data", [
    {},
    {"type": None},
    {"type": 5, "message": 6, "traceback": 7, "worker": 8, "via": 9},
    {"type": ["builtins.ValueError"], "message": {"a": 1}},
    {"type": "builtins.ValueError"},
    {"type": "builtins.ValueError", "message": None, "traceback": None, "worker": None},
    {"type": "", "message": "x"},
    {"type": "builtins.", "message": "x"},
    {"type": "builtins.UnicodeDecodeError", "message": "x"},
    {"type": "builtins.OSError", "message": "x"},
    {"type": "builtins.BaseException", "message": "x"},
    {"type": "builtins.SystemExit", "message": "x"},
    {"type": "builtins.ExceptionGroup", "message": "x"},
    {"type": "builtins.BaseExceptionGroup", "message": "x"},
    {"type": "builtins.object", "message": "x"},
    {"type": "builtins.print", "message": "x"},
    {"type": "builtins.__import__", "message": "os"},
    {"type": "zmqsyft.errors.RemoteError", "message": "x"},
    {"type": "builtins.ValueError", "message": "x" * 100_000, "traceback": "t" * 100_000},
    {"type": "builtins.ValueError", "message": "m", "extra": [1, 2, 3], 7: "int key"},
])
def test_malformed_error_maps_do_not_crash(data: dict[Any, Any]) -> None:
    got = decode_exception(data)
    # only a plain builtin type named exactly is rebuilt; anything else is a RemoteError
    expected = ValueError if data.get("type") == "builtins.ValueError" else errors.RemoteError
    assert type(got) is expected, f"{type(got).__name__}: {got}"
    assert not isinstance(got, (SystemExit, KeyboardInterrupt, BaseExceptionGroup))
    assert isinstance(got.remote_traceback, str)  # type: ignore[attr-defined]
    traceback_text = data.get("traceback")
    if isinstance(traceback_text, str):
        assert got.remote_traceback == traceback_text  # type: ignore[attr-defined]
    worker = "?" if "worker" not in data else str(data["worker"])
    assert got.worker_id == worker  # type: ignore[attr-defined]
    assert f"occurred remotely on worker '{worker}'" in note_of(got)
    # and it is usable as an exception
    with pytest.raises(type(got)):
        raise got


def test_dangerous_type_names_do_not_run_anything() -> None:
    got = decode_exception({"type": "builtins.print", "message": "should not print"})
    assert type(got) is errors.RemoteError
    got = decode_exception({"type": "builtins.exec", "message": "raise SystemExit"})
    assert type(got) is errors.RemoteError


def test_missing_fields_have_defaults() -> None:
    got = decode_exception({"type": "builtins.ValueError", "message": "m"})
    assert type(got) is ValueError and str(got) == "m"
    assert got.worker_id == "?" and got.remote_traceback == ""  # type: ignore[attr-defined]


def test_relayed_remote_error_keeps_remote_type() -> None:
    first = decode_exception(over_the_wire(encode_exception(raised(CustomError("boom")), "bob")))
    assert type(first) is errors.RemoteError and first.remote_type == f"{__name__}.CustomError"
    got = decode_exception(over_the_wire(encode_exception(first, "alice")))
    assert type(got) is errors.RemoteError
    assert got.worker_id == "bob"
    assert got.remote_type == f"{__name__}.CustomError"


def test_torch_linalg_error_is_rebuilt_as_its_type() -> None:
    try:
        torch.linalg.cholesky(-torch.eye(2))
    except RuntimeError as exc:
        original = exc
    assert isinstance(original, torch.linalg.LinAlgError)
    got = decode_exception(over_the_wire(encode_exception(original, "bob")))
    assert type(got) is type(original)  # the exact type, not a RemoteError or a base class
    assert isinstance(got, torch.linalg.LinAlgError) and isinstance(got, RuntimeError)
    assert got.worker_id == "bob"  # type: ignore[attr-defined]
    assert "positive-definite" in str(got)
