"""The value/message codec on its own: no sockets, no worker processes.

Round trips of every extension type and of tensors of every wire dtype, zero-copy in both
directions, malformed input of many kinds (always ``ProtocolError``), values the wire does not
carry (``SerializationError``) and pickled payloads (``UntrustedPayload`` unless trusted).
"""

from __future__ import annotations

import math
import os
import random
import textwrap
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import pk, run_script
from zmqsyft.errors import ProtocolError, SerializationError, UntrustedPayload
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.messages import PROTOCOL_VERSION, Message, ObjRef, Op, PointerDesc, Summary
from zmqsyft.wire.tensors import DTYPES, dtype_name
from zmqsyft.wire.values import Ext

MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last, torch.channels_last_3d,
                  torch.preserve_format]


# ----------------------------------------------------------------- helpers
def as_wire(frames: list[Any], kind: str) -> list[Any]:
    """What a receiver gets: every frame as ``kind`` (fresh memory, as after a real transfer)."""
    out: list[Any] = []
    for f in frames:
        raw = bytes(memoryview(f))
        if kind == "bytes":
            out.append(raw)
        elif kind == "bytearray":
            out.append(bytearray(raw))
        elif kind == "frame":
            out.append(zmq.Frame(bytearray(raw)))
        else:  # pragma: no cover
            raise AssertionError(kind)
    return out


def roundtrip(body: dict[Any, Any], kind: str = "frame", op: Op = Op.PUT, req_id: int = 7,
              **decode_kw: Any) -> Message:
    msg = decode_message(as_wire(encode_message(op, req_id, body), kind), **decode_kw)
    assert msg.op is op and msg.req_id == req_id
    return msg


def same(a: Any, b: Any) -> bool:
    """Deep equality that also requires identical types (tuple is not list, Size is not tuple)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
                and torch.equal(a.detach(), b.detach()))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):  # as item lists, in order: a decoded key may be a tensor (hashed by id)
        return same(list(a.items()), list(b.items()))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, Summary):
        return a.text == b.text
    if isinstance(a, PointerDesc):
        return a.as_list() == b.as_list()
    return bool(a == b)


def assert_real_message(msg: Message) -> None:
    """A message the decoder accepted (from random or mutated bytes) is a real one: a known op,
    an integer request id, a map body, and it encodes again into the same message."""
    assert type(msg) is Message and type(msg.op) is Op, msg
    assert type(msg.req_id) is int and type(msg.body) is dict, msg
    again = decode_message(encode_message(msg.op, msg.req_id, msg.body))
    assert (again.op, again.req_id) == (msg.op, msg.req_id)
    assert same(again.body, msg.body), (again.body, msg.body)


P = msgpack.ExtType


def header(body: Any, version: Any = PROTOCOL_VERSION, op: Any = int(Op.PUT), req_id: Any = 1) -> bytes:
    return pk([version, op, req_id, body])


def tensor_ext(index: Any = 0, dtype: Any = "float32", shape: Any = (3,), rg: Any = False) -> Any:
    return P(int(Ext.TENSOR), pk([index, dtype, list(shape) if isinstance(shape, tuple) else shape, rg]))


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    n = math.prod(shape)
    base = torch.arange(n, dtype=torch.float64).reshape(shape) - n // 2
    if dtype is torch.bool:
        return (base.long() % 2).bool()
    if dtype.is_complex:
        return torch.complex(base, -base / 2).to(dtype)
    if dtype is torch.uint8:
        return base.abs().to(dtype)
    return base.to(dtype)


WIRE_KINDS = ["bytes", "bytearray", "frame"]


# ------------------------------------------------------ extension type round trips
@pytest.mark.parametrize("kind", WIRE_KINDS)
def test_plain_values_roundtrip(kind: str) -> None:
    body = {"none": None, "t": True, "f": False, "i": -(2**63), "u": 2**64 - 1, "x": 1.5,
            "s": "héllo", "b": b"\x00\xff", "l": [1, "a", None], "empty_l": [], "empty_d": {}}
    msg = roundtrip(body, kind)
    assert same(msg.body, body)
    assert msg.body["t"] is True and msg.body["f"] is False


def test_tuple_and_list_stay_distinct() -> None:
    value = (1, [2, (3, [4])], (), [()], ((),))
    got = roundtrip({"v": value, "l": [value, list(value)]}).body
    assert same(got["v"], value)
    assert type(got["v"]) is tuple and type(got["v"][1]) is list and type(got["v"][1][1]) is tuple
    assert type(got["l"][0]) is tuple and type(got["l"][1]) is list
    assert got["v"][2] == () and type(got["v"][3][0]) is tuple


@pytest.mark.parametrize("s", [slice(1, 5, 2), slice(None), slice(None, -1), slice(3, None, -1),
                               slice(None, None, 2), slice(-(2**40), 2**40, None)])
def test_slices(s: slice) -> None:
    got = roundtrip({"s": s, "idx": (s, Ellipsis, None, 0)}).body
    assert type(got["s"]) is slice and (got["s"].start, got["s"].stop, got["s"].step) == (s.start, s.stop, s.step)
    assert got["idx"][0] == s and got["idx"][1] is Ellipsis and got["idx"][2] is None


def test_ellipsis_is_the_singleton() -> None:
    got = roundtrip({"e": ..., "nested": [..., (...,)]}).body
    assert got["e"] is Ellipsis and got["nested"][0] is Ellipsis and got["nested"][1][0] is Ellipsis


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_dtypes(dtype: torch.dtype) -> None:
    got = roundtrip({"d": dtype, "kw": {"dtype": dtype}}).body
    assert got["d"] is dtype and got["kw"]["dtype"] is dtype
    assert DTYPES[dtype_name(dtype)] is dtype


@pytest.mark.parametrize("size", [torch.Size([]), torch.Size([0]), torch.Size([2, 3, 4]),
                                  torch.Size([2**40])])
def test_torch_size(size: torch.Size) -> None:
    got = roundtrip({"s": size, "t": tuple(size)}).body
    assert type(got["s"]) is torch.Size and got["s"] == size
    assert type(got["t"]) is tuple and got["t"] == tuple(size)


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cpu", 0), torch.device("meta"),
                                    torch.device("cuda", 1)])
def test_torch_device(device: torch.device) -> None:
    got = roundtrip({"d": device}).body["d"]
    assert type(got) is torch.device and got == device


@pytest.mark.parametrize("c", [0j, complex(1.5, -2.25), complex(-0.0, 1e300), complex(math.inf, -math.inf)])
def test_complex(c: complex) -> None:
    got = roundtrip({"c": c}).body["c"]
    assert type(got) is complex and got == c


def test_complex_nan() -> None:
    got = roundtrip({"c": complex(math.nan, 1)}).body["c"]
    assert type(got) is complex and math.isnan(got.real) and got.imag == 1


def test_summary_objref_pointerdesc() -> None:
    desc = PointerDesc("bob", "ipc:///tmp/x/bob.sock", 2**62 + 5, 17, (2, 3), "bfloat16", True, False)
    got = roundtrip({"sum": Summary("tensor(<big>)"), "ref": ObjRef(2**63 - 1),
                     "args": [ObjRef(1), (ObjRef(2),)], "ptr": desc}).body
    assert type(got["sum"]) is Summary and got["sum"].text == "tensor(<big>)"
    assert type(got["ref"]) is ObjRef and got["ref"] == ObjRef(2**63 - 1)
    assert got["args"] == [ObjRef(1), (ObjRef(2),)]
    assert type(got["ptr"]) is PointerDesc
    assert got["ptr"].as_list() == desc.as_list()
    assert got["ptr"].shape == (2, 3) and got["ptr"].owned is False and got["ptr"].requires_grad is True


def test_a_pointer_descriptor_names_its_holders_incarnation_when_known() -> None:
    """Protocol 10: a 10th field, the incarnation of the worker holding the object; a 9-field
    descriptor (protocol 9's format, or a sender that does not know it) decodes with it unknown."""
    desc = PointerDesc("bob", "ipc:///tmp/x/bob.sock", 5, 17, (2,), "float32", False, True,
                       "K" * 40, "0123456789abcdef")
    got = roundtrip({"ptr": desc}).body["ptr"]
    assert got.incarnation == "0123456789abcdef" and got.as_list() == desc.as_list()
    old = P(int(Ext.PTR), pk(["bob", "ipc:///tmp/x/bob.sock", 5, 17, [2], "float32", False, True,
                               "K" * 40]))
    got = decode_message([header({"ptr": old})]).body["ptr"]
    assert type(got) is PointerDesc and got.incarnation == "" and got.key == "K" * 40
    unknown = PointerDesc("bob", "ipc:///tmp/x/bob.sock", 5, 17, (2,), "float32", False, True)
    assert len(unknown.as_list()) == 9  # (an unknown incarnation is not sent)
    with pytest.raises(ProtocolError, match="malformed pointer descriptor"):
        decode_message([header({"ptr": P(int(Ext.PTR), pk([*desc.as_list(), "extra"]))})])


@pytest.mark.parametrize("fmt", MEMORY_FORMATS, ids=str)
def test_memory_formats(fmt: torch.memory_format) -> None:
    got = roundtrip({"kwargs": {"memory_format": fmt}}).body
    assert got["kwargs"]["memory_format"] is fmt


def test_nested_dicts_with_int_keys() -> None:
    body = {1: {2: {3: "x", -4: (5, 6)}}, "a": {0: [{-(2**63): None}]}, 2**64 - 1: "big"}
    got = roundtrip(body).body
    assert same(got, body)
    assert set(got) == {1, "a", 2**64 - 1} and type(got[1][2][-4]) is tuple


def test_builtin_subclasses_degrade_to_their_base() -> None:
    class S(str):
        pass

    got = roundtrip({"op": Op.CALL, "s": S("abc"), "flag": True}).body
    assert type(got["op"]) is int and got["op"] == int(Op.CALL)
    assert type(got["s"]) is str and got["s"] == "abc"
    assert got["flag"] is True


def test_request_id_and_op_survive() -> None:
    for op in Op:
        msg = decode_message(encode_message(op, 2**63, {}))
        assert msg.op is op and msg.req_id == 2**63 and msg.body == {}


# -------------------------------------------------------------------- tensors
@pytest.mark.parametrize("kind", WIRE_KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_tensor_every_dtype(dtype: torch.dtype, kind: str) -> None:
    t = sample(dtype)
    got = roundtrip({"t": t, "zero_dim": t[1, 2].clone(), "empty": t[:0]}, kind).body
    for key, want in (("t", t), ("zero_dim", t[1, 2]), ("empty", t[:0])):
        assert type(got[key]) is torch.Tensor
        assert got[key].dtype == dtype and got[key].shape == want.shape
        assert torch.equal(got[key], want), key
    assert got["zero_dim"].dim() == 0 and got["empty"].numel() == 0 and got["empty"].shape == (0, 4)


@pytest.mark.parametrize("make", [
    lambda: torch.empty(0),
    lambda: torch.empty(2, 0, 3),
    lambda: torch.empty(0, dtype=torch.complex128),
    lambda: torch.tensor(True),
    lambda: torch.tensor(3.5, dtype=torch.bfloat16),
    lambda: torch.tensor(1 + 2j, dtype=torch.complex64),
], ids=["empty1d", "empty3d", "empty_complex", "bool0d", "bf16_0d", "c64_0d"])
def test_tensor_edge_shapes(make: Any) -> None:
    t = make()
    got = roundtrip({"t": t}).body["t"]
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


@pytest.mark.parametrize("view", [
    lambda x: x.t(),
    lambda x: x[:, ::2],
    lambda x: x.flip(0)[::2],
    lambda x: x[1:, 1::3],
    lambda x: x.unsqueeze(0).expand(3, -1, -1),
    lambda x: x.permute(1, 0)[2:],
    lambda x: x.reshape(2, 3, 4).transpose(0, 2),
], ids=["transposed", "step2", "flipped_step", "offset_step", "expanded", "permuted_slice", "3d_transpose"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16, torch.complex128, torch.bool],
                         ids=str)
def test_non_contiguous_tensors(view: Any, dtype: torch.dtype) -> None:
    t = view(sample(dtype, (4, 6)))
    got = roundtrip({"t": t}).body["t"]
    assert got.shape == t.shape and got.dtype == dtype and torch.equal(got, t)
    assert got.is_contiguous()


def test_conj_and_neg_views_are_resolved() -> None:
    x = sample(torch.complex64)
    conj = x.conj()
    assert conj.is_conj()
    neg = x._neg_view()
    got = roundtrip({"conj": conj, "neg": neg}).body
    assert not got["conj"].is_conj() and torch.equal(got["conj"], x.conj().resolve_conj())
    assert not got["neg"].is_neg() and torch.equal(got["neg"], -x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.complex64], ids=str)
def test_requires_grad_kept(dtype: torch.dtype) -> None:
    leaf = sample(dtype).requires_grad_(True)
    nonleaf = leaf * 2
    plain = sample(dtype)
    param = torch.nn.Parameter(sample(dtype))
    got = roundtrip({"leaf": leaf, "nonleaf": nonleaf, "plain": plain, "param": param}).body
    assert got["leaf"].requires_grad and got["leaf"].is_leaf
    assert got["nonleaf"].requires_grad and got["nonleaf"].is_leaf  # history does not travel
    assert not got["plain"].requires_grad
    assert type(got["param"]) is torch.Tensor and got["param"].requires_grad
    assert torch.equal(got["nonleaf"].detach(), nonleaf.detach())
    assert torch.equal(got["leaf"].detach(), leaf.detach())


@pytest.mark.parametrize("kind", ["bytearray", "frame"])
def test_decoded_tensor_is_writable_and_equal(kind: str) -> None:
    t = torch.arange(10_000, dtype=torch.float32).reshape(100, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decoding must not warn about non-writable buffers
        got = roundtrip({"t": t}, kind).body["t"]
    assert torch.equal(got, t)
    got.add_(1)
    got[0, 0] = -5
    assert got[0, 0].item() == -5 and got[99, 99].item() == 10_000
    assert torch.equal(got[1:], t[1:] + 1)


def test_decoding_frames_never_warns_in_a_fresh_process() -> None:
    """torch warns once per process about a read-only buffer; the codec's first frame in a new
    process (and every frame, with ``torch.set_warn_always(True)``) must not show it."""
    code = textwrap.dedent("""
        import torch
        from zmqsyft.wire.codec import decode_message, encode_message
        from zmqsyft.wire.messages import Op
        # read-only, as received frames are
        frames = [memoryview(bytes(f)) for f in encode_message(Op.PUT, 1, {"t": torch.ones(3, 5)})]
        assert frames[1:] and frames[1].readonly, "the tensor travelled in a frame of its own"
        for always in (False, True):
            torch.set_warn_always(always)
            got = decode_message(frames).body["t"]
            assert torch.equal(got, torch.ones(3, 5))
        print("QUIET")
    """)
    proc = run_script("-W", "error", "-c", code, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "QUIET"


def test_tensors_in_containers_get_their_own_frames() -> None:
    a, b, c = sample(torch.float32), sample(torch.int16), sample(torch.bool)
    frames = encode_message(Op.CALL, 3, {"args": [a, (b, {"k": c})], "kwargs": {"x": a}})
    assert len(frames) == 5  # header + one frame per tensor occurrence
    got = decode_message(as_wire(frames, "frame")).body
    assert torch.equal(got["args"][0], a) and torch.equal(got["args"][1][0], b)
    assert torch.equal(got["args"][1][1]["k"], c) and torch.equal(got["kwargs"]["x"], a)


# ------------------------------------------------------------------ zero copy
def _address(buf: Any) -> int:
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8).ctypes.data


def test_encoding_a_large_contiguous_tensor_does_not_copy() -> None:
    t = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB
    frames = encode_message(Op.PUT, 1, {"obj": t})
    assert len(frames) == 2
    buf = frames[1]
    assert memoryview(buf).nbytes == t.numel() * 4
    assert _address(buf) == t.data_ptr()
    t[123] = -1.0  # the frame *is* the tensor's memory
    assert np.frombuffer(memoryview(buf).cast("B"), dtype=np.float32)[123] == -1.0


def test_encoding_a_contiguous_slice_does_not_copy() -> None:
    base = torch.arange(1_000_000, dtype=torch.int64)
    t = base[1000:500_000]
    buf = encode_message(Op.PUT, 1, {"obj": t})[1]
    assert _address(buf) == t.data_ptr() == base.data_ptr() + 1000 * 8


def test_encoding_a_non_contiguous_tensor_copies_once() -> None:
    t = torch.arange(1_000_000, dtype=torch.float32).reshape(1000, 1000).t()
    buf = encode_message(Op.PUT, 1, {"obj": t})[1]
    assert _address(buf) != t.data_ptr()
    assert np.array_equal(np.frombuffer(memoryview(buf).cast("B"), dtype=np.float32),
                          t.contiguous().reshape(-1).numpy())


def test_decoding_a_large_frame_does_not_copy() -> None:
    t = torch.arange(4_000_000, dtype=torch.float32)
    frames = encode_message(Op.PUT, 1, {"obj": t})
    frame = zmq.Frame(bytes(memoryview(frames[1])))
    got = decode_message([frames[0], frame]).body["obj"]
    assert got.data_ptr() == _address(frame.buffer)
    assert torch.equal(got, t)


# ---------------------------------------------------------------- malformed
def _check_protocol_error(frames: list[Any], match: str | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_message(frames)
    assert type(info.value) in (ProtocolError,), f"{type(info.value)} is not exactly ProtocolError"
    return info.value


MALFORMED: dict[str, list[Any]] = {
    "empty message": [],
    "empty header": [b""],
    "one garbage byte": [b"\xc1"],
    "truncated header": [header({"a": "hello world"})[:-4]],
    "trailing bytes": [header({}) + b"\x00"],
    "wrong version": [header({}, version=PROTOCOL_VERSION + 1)],
    "version as string": [header({}, version="1")],
    "unknown op": [header({}, op=99)],
    "negative op": [header({}, op=-1)],
    "op as string": [header({}, op="PUT")],
    "header is a map": [pk({"version": 1})],
    "header is an int": [pk(5)],
    "header too short": [pk([1, 3, 1])],
    "header too long": [pk([1, 3, 1, {}, 0])],
    "request id string": [header({}, req_id="1")],
    "request id bool": [header({}, req_id=True)],
    "request id float": [header({}, req_id=1.0)],
    "body is a list": [header([])],
    "body is None": [header(None)],
    "header frame not a buffer": [12345],
    "header frame is None": [None],
    "invalid utf-8 string": [b"\x94\x01\x03\x01\x81\xa2\xff\xfe\x01"],
    "unhashable map key": [b"\x94\x01\x03\x01\x81\x91\x01\x01"],
    "array longer than the input": [b"\x94\x01\x03\x01\x81\xa1v\xdd\x7f\xff\xff\xff"],
    "deep plain list": [b"\x94\x01\x03\x01\x81\xa1v" + b"\x91" * 100_000 + b"\x01"],
    "deep plain map": [b"\x94\x01\x03\x01\x81\xa1v" + b"\x81\x01" * 100_000 + b"\x01"],
    "tensor frame too short": [header({"t": tensor_ext()}), b"\x00" * 11],
    "tensor frame too long": [header({"t": tensor_ext()}), b"\x00" * 13],
    "tensor frame empty": [header({"t": tensor_ext()}), b""],
    "tensor unknown dtype": [header({"t": tensor_ext(dtype="float128")}), b"\x00" * 16],
    "tensor dtype object": [header({"t": tensor_ext(dtype="object")}), b"\x00" * 8],
    "tensor dtype not a string": [header({"t": tensor_ext(dtype=["float32"])}), b"\x00" * 12],
    "tensor dtype torch-prefixed": [header({"t": tensor_ext(dtype="torch.float32")}), b"\x00" * 12],
    "tensor missing frame": [header({"t": tensor_ext(index=1)}), b"\x00" * 12],
    "tensor no frames at all": [header({"t": tensor_ext()})],
    "tensor negative frame index": [header({"t": tensor_ext(index=-1)}), b"\x00" * 12],
    "tensor frame index not int": [header({"t": tensor_ext(index="0")}), b"\x00" * 12],
    "tensor negative shape": [header({"t": tensor_ext(shape=(-3,))}), b"\x00" * 12],
    "tensor two negative dims": [header({"t": tensor_ext(shape=(-1, -3))}), b"\x00" * 12],
    "tensor shape not a list": [header({"t": tensor_ext(shape=3)}), b"\x00" * 12],
    "tensor float shape": [header({"t": tensor_ext(shape=[3.0])}), b"\x00" * 12],
    "tensor string shape": [header({"t": tensor_ext(shape=["3"])}), b"\x00" * 12],
    "tensor huge shape": [header({"t": tensor_ext(shape=(2**62, 2**62))}), b"\x00" * 12],
    "tensor bool shape": [header({"t": tensor_ext(shape=[True, 3])}), b"\x00" * 12],
    "tensor grad on int dtype": [header({"t": tensor_ext(dtype="int32", rg=True)}), b"\x00" * 12],
    "tensor payload too short": [header({"t": P(int(Ext.TENSOR), pk([0, "float32"]))}), b"\x00" * 12],
    "tensor payload not a list": [header({"t": P(int(Ext.TENSOR), pk(5))}), b"\x00" * 12],
    "tensor payload garbage": [header({"t": P(int(Ext.TENSOR), b"\xc1")}), b"\x00" * 12],
    "tensor frame not a buffer": [header({"t": tensor_ext()}), 12],
    "unknown extension": [header({"t": P(77, pk(1))})],
    "unknown extension, empty": [header({"t": P(77, b"")})],
    "negative extension": [b"\x94\x01\x03\x01\x81\xa1t\xd4\xfb\x01"],
    "ref not an int": [header({"r": P(int(Ext.REF), pk("x"))})],
    "ref is a bool": [header({"r": P(int(Ext.REF), pk(True))})],
    "pointer too short": [header({"p": P(int(Ext.PTR), pk([1, 2]))})],
    "pointer unknown dtype": [header({"p": P(int(Ext.PTR), pk(["a", "b", 1, 2, [3], "nope", False, True]))})],
    "pointer string shape": [header({"p": P(int(Ext.PTR), pk(["a", "b", 1, 2, "ab", "float32", False, True]))})],
    "pointer id not int": [header({"p": P(int(Ext.PTR), pk(["a", "b", "1", 2, [3], "float32", False, True]))})],
    "slice of five": [header({"s": P(int(Ext.SLICE), pk([1, 2, 3, 4, 5]))})],
    "slice of an int": [header({"s": P(int(Ext.SLICE), pk(3))})],
    "dtype unknown": [header({"d": P(int(Ext.DTYPE), pk("object"))})],
    "dtype a map": [header({"d": P(int(Ext.DTYPE), pk({"a": 1}))})],
    "size of strings": [header({"s": P(int(Ext.SIZE), pk(["a"]))})],
    "size of floats": [header({"s": P(int(Ext.SIZE), pk([1.5]))})],
    "device invalid": [header({"d": P(int(Ext.DEVICE), pk("nonsense:zz"))})],
    "complex of three": [header({"c": P(int(Ext.COMPLEX), pk([1, 2, 3]))})],
    "complex of strings": [header({"c": P(int(Ext.COMPLEX), pk(["a", "b"]))})],
    "complex from string": [header({"c": P(int(Ext.COMPLEX), pk("1j"))})],
    "memory format unknown": [header({"m": P(int(Ext.MEMFMT), pk("nope"))})],
    "memory format a list": [header({"m": P(int(Ext.MEMFMT), pk([1]))})],
    "ellipsis payload garbage": [header({"e": P(int(Ext.ELLIPSIS), b"\xc1")})],
    "tuple payload truncated": [header({"t": P(int(Ext.TUPLE), b"\x93\x01")})],
}


@pytest.mark.parametrize("frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_input_raises_protocol_error(frames: list[Any]) -> None:
    _check_protocol_error(frames)


def test_malformed_errors_say_what_is_wrong() -> None:
    _check_protocol_error(MALFORMED["wrong version"], match=f"protocol version {PROTOCOL_VERSION + 1}")
    _check_protocol_error(MALFORMED["unknown op"], match="unknown op 99")
    _check_protocol_error(MALFORMED["tensor frame too short"], match="11 bytes")
    _check_protocol_error(MALFORMED["tensor unknown dtype"], match="float128")
    _check_protocol_error(MALFORMED["tensor missing frame"], match="frame 1")
    _check_protocol_error(MALFORMED["tensor negative shape"], match="shape")
    _check_protocol_error(MALFORMED["empty message"], match="empty")


def test_random_bytes_raise_protocol_error() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        try:
            msg = decode_message([data])
        except (ProtocolError, UntrustedPayload):
            continue
        # the odd random string may happen to be a valid message; then it must really be one
        assert_real_message(msg)


def _ext_key(code: int, payload: bytes) -> bytes:
    return pk([1, 3, 1, {"v": P(code, payload)}])


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_arbitrary_frames(head: bytes, rest: list[bytes]) -> None:
    try:
        msg = decode_message([head, *rest])
    except (ProtocolError, UntrustedPayload):
        return
    assert_real_message(msg)


VALID = encode_message(Op.CALL, 9, {"fn": "torch.add", "args": [ObjRef(5), sample(torch.float32), (1, slice(None, 2))],
                                   "kwargs": {"alpha": 2, "dtype": torch.float64}, "out": [[7, [3, 4], "float32", False]]})


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_message(data: st.DataObject) -> None:
    head = bytearray(bytes(VALID[0]))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(head) - 1)))
        if action == "flip" and head:
            head[pos] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del head[pos:pos + data.draw(st.integers(1, 8))]
        else:
            head[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    tail = bytes(memoryview(VALID[1]))
    if data.draw(st.booleans()):
        tail = tail[: data.draw(st.integers(0, len(tail)))]
    try:
        msg = decode_message([bytes(head), tail])
    except (ProtocolError, UntrustedPayload):
        return
    assert_real_message(msg)


def test_untrusted_pickle_in_a_mutation_is_security_not_crash() -> None:
    with pytest.raises(UntrustedPayload):
        decode_message([_ext_key(int(Ext.PICKLE), b"\x80\x05N.")])


def test_deeply_nested_extension_types_raise_protocol_error() -> None:
    # run in a child process: on the bug this segfaults the interpreter
    code = textwrap.dedent("""
        import msgpack
        from zmqsyft.wire.codec import decode_message
        from zmqsyft.errors import ProtocolError
        data = msgpack.packb(1)
        for _ in range(1000):
            data = msgpack.packb(msgpack.ExtType(1, b"\\x91" + data))
        header = msgpack.packb([1, 3, 1, {"v": msgpack.ExtType(1, b"\\x91" + data)}])
        assert len(header) < 10_000
        try:
            decode_message([header])
        except ProtocolError:
            print("PROTOCOL_ERROR")
        else:
            print("DECODED")
    """)
    proc = run_script("-c", code, timeout=60)
    assert proc.returncode == 0, f"decoder process died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "PROTOCOL_ERROR"


def test_moderately_nested_extension_types_decode() -> None:
    value: Any = 1
    for _ in range(50):
        value = (value,)
    got = roundtrip({"v": value}).body["v"]
    for _ in range(50):
        assert type(got) is tuple and len(got) == 1
        got = got[0]
    assert got == 1


# --------------------------------------------------------- unsupported values
class _Custom:
    pass


@pytest.mark.parametrize("value, type_name", [
    ({1, 2}, "builtins.set"),
    (frozenset(), "builtins.frozenset"),
    (object(), "builtins.object"),
    (_Custom(), "_Custom"),
    (lambda: 1, "builtins.function"),
    (torch.nn.Linear(1, 1), "torch.nn.modules.linear.Linear"),
    (np.zeros(3), "numpy.ndarray"),
])
def test_unsupported_type_raises_serialization_error(value: Any, type_name: str) -> None:
    with pytest.raises(SerializationError) as info:
        encode_message(Op.PUT, 1, {"obj": value})
    msg = str(info.value)
    assert type_name in msg and "pickle" in msg
    # also nested deep inside containers
    with pytest.raises(SerializationError, match=type_name.split(".")[-1]):
        encode_message(Op.CALL, 1, {"args": [1, (2, {"k": [value]})]})


@pytest.mark.parametrize("make, match", [
    (lambda: 2**64, "out of range"),
    (lambda: -(2**63) - 1, "out of range"),
    (lambda: torch.zeros(2, dtype=torch.uint16), "uint16"),
    (lambda: torch.uint16, "uint16"),
    (lambda: torch.float8_e4m3fn, "float8"),
    (lambda: torch.zeros(2, dtype=torch.float8_e5m2), "float8"),
    (lambda: torch.sparse_coo_tensor([[0]], [1.0], (2,)), "sparse"),
    (lambda: torch.ones(2, 2).to_sparse_csr(), "sparse_csr"),
], ids=["int_too_big", "int_too_small", "uint16_tensor", "uint16_dtype", "float8_dtype",
        "float8_tensor", "sparse_coo", "sparse_csr"])
def test_values_the_wire_cannot_carry(make: Any, match: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = make()
    with pytest.raises(SerializationError, match=match):
        encode_message(Op.PUT, 1, {"obj": value})


def test_quantized_tensor_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    with pytest.raises(SerializationError, match="quantized"):
        encode_message(Op.PUT, 1, {"obj": q})


def test_tensor_subclass_is_refused() -> None:
    class MyTensor(torch.Tensor):
        pass

    t = torch.ones(2).as_subclass(MyTensor)
    with pytest.raises(SerializationError, match="MyTensor"):
        encode_message(Op.PUT, 1, {"obj": t})


@pytest.mark.parametrize("make, name", [
    pytest.param(lambda: torch.empty(3, device="meta"), "meta"),
    pytest.param(lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
], ids=["meta", "nested"])
def test_unsendable_tensors_raise_serialization_error(make: Any, name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = make()
    with pytest.raises(SerializationError, match=name):
        encode_message(Op.PUT, 1, {"obj": value})


# --------------------------------------------------------------------- pickle
def _pickled_message() -> list[Any]:
    return encode_message(Op.PUT, 4, {"obj": {"fn": lambda x: x * 3, "s": {1, 2}}, "t": torch.ones(2)},
                          allow_pickle=True)


def test_pickle_refused_unless_trusted() -> None:
    frames = _pickled_message()
    head = msgpack.unpackb(bytes(frames[0]), ext_hook=lambda code, data: code)
    assert Ext.PICKLE in head[3]["obj"].values()  # the unsupported values did travel pickled
    with pytest.raises(UntrustedPayload, match="trust"):
        decode_message(as_wire(frames, "frame"))
    with pytest.raises(UntrustedPayload):
        decode_message(as_wire(frames, "bytes"), trusted=False)


def test_pickle_accepted_when_trusted() -> None:
    msg = decode_message(as_wire(_pickled_message(), "frame"), trusted=True)
    assert msg.body["obj"]["fn"](5) == 15 and msg.body["obj"]["s"] == {1, 2}
    assert torch.equal(msg.body["t"], torch.ones(2))


def test_hand_made_pickle_payload_never_runs_untrusted(tmp_path: Any) -> None:
    import cloudpickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.mknod, (str(marker),))

    head = header({"obj": P(int(Ext.PICKLE), cloudpickle.dumps(Evil()))})
    with pytest.raises(UntrustedPayload):
        decode_message([head])
    assert not marker.exists()
    decode_message([head], trusted=True)  # trusted: it is unpickled (and so it runs)
    assert marker.exists()


def test_pickle_needs_allow_pickle_on_encode() -> None:
    with pytest.raises(SerializationError):
        encode_message(Op.PUT, 4, {"obj": {1, 2}})
    frames = encode_message(Op.PUT, 4, {"obj": {1, 2}}, allow_pickle=True)
    assert decode_message(frames, trusted=True).body["obj"] == {1, 2}


# ------------------------------------------------------------- property based
_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20),
    st.sampled_from(list(DTYPES.values())), st.sampled_from(MEMORY_FORMATS), st.just(Ellipsis),
    st.builds(slice, st.none() | st.integers(-9, 9), st.none() | st.integers(-9, 9),
              st.none() | st.integers(-9, 9).filter(bool)),
    st.builds(complex, st.floats(allow_nan=False), st.floats(allow_nan=False)),
    st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size),
    st.sampled_from(["cpu", "meta", "cuda:0"]).map(torch.device),
    st.integers(1, 2**63 - 1).map(ObjRef),
    st.text(max_size=10).map(Summary),
    st.tuples(st.sampled_from(list(DTYPES.values())),
              st.lists(st.integers(0, 3), max_size=3)).map(lambda a: sample(a[0], tuple(a[1]))),
)
_values = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values, st.sampled_from(WIRE_KINDS))
def test_property_roundtrip(value: Any, kind: str) -> None:
    got = roundtrip({"v": value}, kind).body["v"]
    assert same(got, value), (value, got)


@pytest.mark.parametrize("req_id", [1, 127, 128, 65_536, 2**62 + 5])
def test_the_fast_empty_reply_is_the_same_message(req_id: int) -> None:
    from zmqsyft.wire.codec import ack_id, encode_ack

    assert encode_ack(req_id) == encode_message(Op.REPLY, req_id, {})
    msg = decode_message(encode_ack(req_id))
    assert (msg.op, msg.req_id, msg.body) == (Op.REPLY, req_id, {})
    assert ack_id(encode_ack(req_id)[0]) == req_id  # the client's shortcut reads it the same


def test_the_empty_reply_shortcut_leaves_everything_else_to_the_decoder() -> None:
    from zmqsyft.wire.codec import ack_id

    others = [encode_message(Op.REPLY, 5, {"id": "bob"})[0], encode_message(Op.ACKS, 0, {"ids": [1, 2]})[0],
              encode_message(Op.ERROR, 5, {})[0], encode_message(Op.REPLY, 0, {})[0],
              msgpack.packb([PROTOCOL_VERSION + 1, int(Op.REPLY), 5, {}]), b"", b"\xc1", b"\x94\x03"]
    assert [ack_id(f) for f in others] == [0] * len(others)
