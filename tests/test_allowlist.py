"""The allow-list: op names from the wire resolve only through the fixed table."""

from __future__ import annotations

import builtins
import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.overrides

import zmqsyft as sy
from tests.helpers import alive_check, expect_error, next_reply, raw_dealer
from zmqsyft import WorkerClient, allowlist
from zmqsyft.allowlist import ALLOWED, DENIED, LOCAL_META, OPERATORS, is_inplace, lookup, name_of
from zmqsyft.errors import OpNotAllowed, SecurityError
from zmqsyft.ids import new_id
from zmqsyft.wire.codec import encode_message
from zmqsyft.wire.messages import ObjRef, Op, Summary

PACKAGE = Path(allowlist.__file__).parent


@pytest.mark.parametrize("name, func", [
    ("torch.add", torch.add),
    ("torch.matmul", torch.matmul),
    ("torch.Tensor.add", torch.Tensor.add),
    ("torch.Tensor.add_", torch.Tensor.add_),
    ("torch.Tensor.__add__", torch.Tensor.__add__),
    ("torch.Tensor.__radd__", torch.Tensor.__radd__),
    ("torch.Tensor.__iadd__", torch.Tensor.__iadd__),
    ("torch.Tensor.__getitem__", torch.Tensor.__getitem__),
    ("torch.Tensor.__setitem__", torch.Tensor.__setitem__),
    ("torch.Tensor.sum", torch.Tensor.sum),
    ("torch.nn.functional.relu", F.relu),
    ("torch.nn.functional.linear", F.linear),
    ("torch.linalg.norm", torch.linalg.norm),
    ("torch.fft.fft", torch.fft.fft),
    ("torch.special.expit", torch.special.expit),
])
def test_allowed_names_resolve_to_the_torch_callable(name: str, func: Any) -> None:
    assert lookup(name) is func
    assert ALLOWED[name] is func
    assert name_of(func) == name


def test_properties_resolve_through_their_getter() -> None:
    # method-wrappers are made afresh on each attribute access: compare, do not use ``is``
    assert lookup("torch.Tensor.shape.__get__") == torch.Tensor.shape.__get__
    assert lookup("torch.Tensor.T.__get__") == torch.Tensor.T.__get__
    assert lookup("torch.Tensor.shape.__get__")(torch.ones(2, 3)) == (2, 3)


@pytest.mark.parametrize("name", [
    "os.system",
    "os.popen",
    "subprocess.run",
    "builtins.eval",
    "builtins.exec",
    "builtins.open",
    "builtins.__import__",
    "eval",
    "torch.load",
    "torch.save",
    "torch.from_file",
    "torch.hub.load",
    "torch.jit.load",
    "torch.Tensor.__reduce_ex__",
    "torch.Tensor.__reduce__",
    "torch.Tensor.__setstate__",
    "torch.Tensor.__deepcopy__",
    "torch.Tensor.storage",
    "torch.Tensor.untyped_storage",
    "torch.Tensor.data_ptr",
    "torch.Tensor.share_memory_",
    "torch.Tensor.numpy",
    "torch.Tensor.__dlpack__",
    "torch.Tensor.__array__",
    "torch.Tensor.apply_",
    "torch.Tensor.map_",
    "torch.Tensor.register_hook",
    "torch.Tensor.grad_fn.__get__",
    "torch.Tensor.tofile",
    "torch.Tensor.cuda",
    "torch.Tensor._cdata",
    "torch.Tensor._cdata.__get__",
    "torch.Tensor._make_subclass",
    "torch._C._set_grad_enabled",
    "torch.Tensor.__class__",
    "torch.Tensor.__init_subclass__",
    "torch.Tensor.__torch_function__",
    "torch.nn.functional._canonical_mask",
    "torch.Tensor.add ",
    " torch.add",
    "torch.Tensor",
    "torch",
    "Tensor.add",
    "torch..add",
    "torch.ADD",
    "",
])
def test_names_outside_the_table_are_refused(name: str) -> None:
    with pytest.raises(OpNotAllowed) as info:
        lookup(name)
    assert repr(name) in str(info.value) and "nothing was run" in str(info.value)
    assert name not in ALLOWED


@pytest.mark.parametrize("value", [None, 123, 1.5, True, b"torch.add", ["torch.add"], ("torch.add",),
                                   {"torch.add": 1}, torch.add, object()])
def test_non_string_names_are_refused(value: Any) -> None:
    with pytest.raises(OpNotAllowed):
        lookup(value)


def test_op_not_allowed_is_a_security_error() -> None:
    with pytest.raises(SecurityError):
        lookup("os.system")
    with pytest.raises(PermissionError):
        lookup("os.system")


def test_denied_names_are_never_allowed() -> None:
    assert DENIED and not (DENIED & ALLOWED.keys())


def test_no_private_names_except_operators() -> None:
    for name in ALLOWED:
        assert name.startswith("torch."), name
        for part in name.split(".")[1:]:
            if part.startswith("_"):
                assert part in OPERATORS or part in ("__get__", "__set__"), name


def test_table_values_are_torch_callables_only() -> None:
    dangerous = {os.system, builtins.eval, builtins.exec, builtins.open, torch.load, torch.save,
                 getattr, setattr}
    for name, func in ALLOWED.items():
        assert callable(func), name
        assert func not in dangerous, name


def test_local_meta_names_are_allowed() -> None:
    assert LOCAL_META <= ALLOWED.keys()


@pytest.mark.parametrize("name, expected", [
    ("torch.Tensor.add_", True),
    ("torch.Tensor.mul_", True),
    ("torch.Tensor.zero_", True),
    ("torch.Tensor.requires_grad_", True),
    ("torch.Tensor.__iadd__", True),
    ("torch.Tensor.__imatmul__", True),
    ("torch.Tensor.__itruediv__", True),
    ("torch.Tensor.__ilshift__", True),
    ("torch.Tensor.__setitem__", True),
    ("torch.Tensor.add", False),
    ("torch.add", False),
    ("torch.Tensor.__add__", False),
    ("torch.Tensor.__radd__", False),
    ("torch.Tensor.__getitem__", False),
    ("torch.Tensor.__init__", False),
    ("torch.Tensor.__index__", False),
    ("torch.Tensor.__invert__", False),
    ("torch.Tensor.__iter__", False),
    ("torch.Tensor._foo_", False),
    ("torch.nn.functional.relu", False),
    ("torch.Tensor.sum", False),
])
def test_is_inplace(name: str, expected: bool) -> None:
    assert is_inplace(name) is expected


def test_every_allowed_inplace_method_really_mutates() -> None:
    x = torch.ones(3)
    before = x.data_ptr()
    out = ALLOWED["torch.Tensor.add_"](x, 1)
    assert out is x and x.data_ptr() == before and torch.equal(x, torch.full((3,), 2.0))
    y = torch.ones(3)
    ALLOWED["torch.Tensor.__iadd__"](y, 2)
    assert torch.equal(y, torch.full((3,), 3.0))


@pytest.mark.parametrize("func", [
    os.system, builtins.eval, builtins.print, torch.load, torch.save, torch.Tensor.data_ptr,
    torch.Tensor.storage, torch.Tensor.__reduce_ex__, torch.Tensor.register_hook,
    torch.Tensor.apply_, torch.Tensor.numpy, lambda x: x, len, 42, "torch.add", None,
])
def test_name_of_non_allowed(func: Any) -> None:
    assert name_of(func) is None


def test_name_of_unhashable() -> None:
    assert name_of([torch.add]) is None  # type: ignore[arg-type]
    assert name_of({"f": torch.add}) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("func, name", [
    (torch.add, "torch.add"),
    (torch.Tensor.add, "torch.Tensor.add"),
    (torch.Tensor.add_, "torch.Tensor.add_"),
    (torch.Tensor.__add__, "torch.Tensor.__add__"),
    (torch.Tensor.__getitem__, "torch.Tensor.__getitem__"),
    (F.relu, "torch.nn.functional.relu"),
    (torch.Tensor.shape.__get__, "torch.Tensor.shape.__get__"),
])
def test_name_of_allowed(func: Any, name: str) -> None:
    assert name_of(func) == name
    assert lookup(name_of(func)) == func
    assert name_of(func) == name  # cached answer is the same


def test_name_of_does_not_leak_into_table() -> None:
    n = len(ALLOWED)
    assert name_of(os.system) is None and name_of(torch.load) is None
    assert len(ALLOWED) == n and "torch.load" not in ALLOWED
    assert allowlist._NAMES.get(torch.load) is None


# ------------------------------------------------------------ the reviewed list
def _file_names(filename: str) -> list[str]:
    return allowlist.parse_reviewed((PACKAGE / filename).read_text(encoding="utf-8"))


def test_every_name_torch_offers_was_reviewed_exactly_once() -> None:
    allowed, refused = _file_names(allowlist.ALLOWED_FILE), _file_names(allowlist.REFUSED_FILE)
    assert len(allowed) == len(set(allowed)) and len(refused) == len(set(refused))
    assert not set(allowed) & set(refused), set(allowed) & set(refused)
    offered = allowlist.offered()
    assert len(offered) > 1000  # torch's list really was read
    unreviewed = offered.keys() - set(allowed) - set(refused)
    assert not unreviewed, f"torch {torch.__version__} offers names nobody reviewed: {unreviewed}"


def test_the_table_is_exactly_the_reviewed_allowed_names_torch_has() -> None:
    offered = allowlist.offered()
    allowed = _file_names(allowlist.ALLOWED_FILE)
    setters = {n for n in allowed if n.endswith(".__set__")}
    assert setters == {"torch.Tensor.grad.__set__", "torch.Tensor.requires_grad.__set__",
                       "torch.Tensor.data.__set__"}
    assert ALLOWED.keys() == {n for n in allowed if n in offered} | setters
    assert not ALLOWED.keys() & allowlist.DENIED
    assert DENIED == frozenset(_file_names(allowlist.REFUSED_FILE))


def test_a_new_torch_versions_addition_is_refused_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def brand_new_op(x: torch.Tensor) -> torch.Tensor:  # what a future torch might add
        return x

    real = torch.overrides.get_overridable_functions()
    fake = {ns: list(funcs) for ns, funcs in real.items()}
    fake[torch.Tensor].append(brand_new_op)
    monkeypatch.setattr(torch.overrides, "get_overridable_functions", lambda: fake)
    monkeypatch.setattr(torch.overrides, "resolve_name",
                        lambda f, _real=torch.overrides.resolve_name:
                        "torch.Tensor.brand_new_op" if f is brand_new_op else _real(f))
    offered = allowlist.offered()
    assert offered["torch.Tensor.brand_new_op"] is brand_new_op  # torch offers it ...
    table, names = allowlist.build(allowlist.REVIEWED[0], offered)
    assert "torch.Tensor.brand_new_op" not in table  # ... but nobody reviewed it
    assert brand_new_op not in names
    assert table.keys() == ALLOWED.keys()
    with pytest.raises(OpNotAllowed):
        lookup("torch.Tensor.brand_new_op")


def test_a_reviewed_name_this_torch_lacks_is_simply_absent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="zmqsyft.allowlist"):
        table, _ = allowlist.build(["torch.add", "torch.Tensor.gone_in_this_version",
                                    "torch.Tensor.gone.__set__"], allowlist.offered())
    assert table == {"torch.add": torch.add}
    assert "torch.Tensor.gone_in_this_version" in caplog.text


def test_parse_reviewed() -> None:
    text = "# header\n\n## group\ntorch.add\n  torch.Tensor.add_   # why\ntorch.Tensor.grad.__set__\n"
    assert allowlist.parse_reviewed(text) == ["torch.add", "torch.Tensor.add_",
                                              "torch.Tensor.grad.__set__"]
    for bad in ("os.system", "torch.add(1)", "torch..add", "torch.add torch.sub", "torch"):
        with pytest.raises(ValueError):
            allowlist.parse_reviewed(bad)


def test_the_reviewed_files_are_package_data() -> None:
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    data = config["tool"]["setuptools"]["package-data"]["zmqsyft"]
    assert allowlist.ALLOWED_FILE in data and allowlist.REFUSED_FILE in data


DANGEROUS = [
    # sparse layouts: index views that can be written and scattered out of bounds
    "torch.Tensor.to_sparse", "torch.Tensor.to_dense", "torch.Tensor.indices",
    "torch.Tensor.values", "torch.Tensor._indices", "torch.Tensor._values",
    "torch.Tensor.crow_indices", "torch.Tensor.col_indices", "torch.Tensor.coalesce",
    "torch.Tensor.sparse_mask", "torch.spmm", "torch.indices_copy",
    # uninitialised memory
    "torch.empty_like", "torch.Tensor.resize_", "torch.Tensor.resize_as_", "torch.Tensor.resize",
    "torch.Tensor.new_empty", "torch.Tensor.new_empty_strided", "torch.empty",
    "torch.empty_strided",
    # storage: raw or aliased with arbitrary strides
    "torch.Tensor.set_", "torch.Tensor.as_strided", "torch.Tensor.as_strided_",
    "torch.as_strided", "torch.as_strided_scatter", "torch.as_strided_copy",
    "torch.Tensor.storage", "torch.Tensor.untyped_storage", "torch.Tensor.storage_offset",
    "torch.Tensor.data_ptr", "torch.Tensor.share_memory_", "torch.Tensor.pin_memory",
    "torch.Tensor._base.__get__", "torch.Tensor.unsafe_split", "torch.Tensor.is_set_to",
    # other layouts and export
    "torch.Tensor.to_mkldnn", "torch.quantize_per_tensor", "torch.Tensor.dequantize",
    "torch.Tensor.int_repr", "torch.Tensor.q_scale", "torch.fbgemm_pack_quantized_matrix",
    "torch.Tensor.numpy", "torch.Tensor.__dlpack__", "torch.Tensor.__array__",
    "torch.Tensor.cuda", "torch.Tensor.chalf", "torch.Tensor.index",
]


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_names_are_refused(name: str) -> None:
    with pytest.raises(OpNotAllowed):
        lookup(name)
    offered = allowlist.offered()
    # a name torch offers is refused because it was reviewed and refused, not by accident
    assert name not in offered or name in DENIED


@pytest.mark.parametrize("call", [
    lambda: ALLOWED["torch.Tensor.to"](torch.ones(2), "meta"),
    lambda: ALLOWED["torch.Tensor.to"](torch.ones(2), device=torch.device("meta")),
    lambda: ALLOWED["torch.zeros_like"](torch.ones(2, 2), layout=torch.sparse_coo),
    lambda: ALLOWED["torch.ones_like"](torch.ones(2), device="meta"),
    lambda: ALLOWED["torch.full_like"](torch.ones(2), 3.0, device="meta"),
])
def test_casts_and_factories_cannot_leave_dense_cpu_memory(call: Callable[[], Any]) -> None:
    with pytest.raises(OpNotAllowed):
        call()


def test_casts_and_factories_still_work() -> None:
    x = torch.ones(2, 3)
    assert ALLOWED["torch.Tensor.to"](x, torch.float64).dtype is torch.float64
    assert ALLOWED["torch.Tensor.to"](x, "cpu") is x
    assert ALLOWED["torch.Tensor.type"](x, torch.int64).dtype is torch.int64
    assert ALLOWED["torch.Tensor.type"](x) == "torch.FloatTensor"
    assert torch.equal(ALLOWED["torch.zeros_like"](x), torch.zeros(2, 3))
    assert torch.equal(ALLOWED["torch.full_like"](x, 7.0), torch.full((2, 3), 7.0))
    assert name_of(torch.Tensor.to) == "torch.Tensor.to"
    assert name_of(torch.zeros_like) == "torch.zeros_like"


# ------------------------------------------------------ attacks on a real worker
def _objects_left(worker: WorkerClient, ids: set[int], keep: set[int]) -> None:
    """The worker holds ``keep`` and, of ``ids``, at most OpNotAllowed failure markers."""
    objects = worker._objects
    extra = set(objects) - keep
    assert extra <= ids, f"unexpected objects {extra - ids}"
    for key in extra:
        assert type(objects[key]) is Summary and "OpNotAllowed" in objects[key].text, objects[key]


ATTACKS: list[tuple[str, Callable[[int], list[Any]]]] = [
    ("torch.Tensor.to_sparse", lambda x: [ObjRef(x)]),
    ("torch.Tensor.indices", lambda x: [ObjRef(x)]),
    ("torch.empty_like", lambda x: [ObjRef(x)]),
    ("torch.Tensor.resize_", lambda x: [ObjRef(x), [1 << 16]]),
    ("torch.Tensor.set_", lambda x: [ObjRef(x)]),
    ("torch.as_strided", lambda x: [ObjRef(x), [1 << 16], [1]]),
    ("torch.Tensor.as_strided", lambda x: [ObjRef(x), [1 << 16], [1], 0]),
    ("torch.Tensor.new_empty", lambda x: [ObjRef(x), [1 << 16]]),
    ("torch.Tensor.untyped_storage", lambda x: [ObjRef(x)]),
]


def _still_serves(sock: Any, target: int, alive: Callable[[], bool]) -> None:
    """An allowed op on the same raw socket works: the worker kept serving."""
    sock.send_multipart(encode_message(Op.CALL, 900, {"fn": "torch.Tensor.add_",
                                                      "args": [ObjRef(target), 1.0],
                                                      "kwargs": {}, "out": None}))
    msg = next_reply(sock, alive=alive)
    assert (msg.op, msg.req_id) == (Op.REPLY, 900)


@pytest.mark.parametrize("fn, make_args", ATTACKS, ids=[fn for fn, _ in ATTACKS])
def test_storage_and_layout_attacks_are_refused_by_a_real_worker(
        bob: WorkerClient, hook: sy.TorchHook, fn: str,
        make_args: Callable[[int], list[Any]]) -> None:
    x = torch.tensor([1.0, 2.0, 3.0]).send(bob)
    target = x.id_at_location
    alive = alive_check(bob)
    result = new_id()
    with raw_dealer(bob) as sock:
        try:
            for req, out in ((1, [[result, [3], "float32", False]]), (2, None)):
                body = {"fn": fn, "args": make_args(target), "kwargs": {}, "out": out}
                sock.send_multipart(encode_message(Op.CALL, req, body))
                exc = expect_error(sock, req, OpNotAllowed, alive)
                assert repr(fn) in str(exc) and "nothing was run" in str(exc)
            _objects_left(bob, {result}, keep={target})
            assert torch.equal(bob._objects[target], torch.tensor([1.0, 2.0, 3.0]))
            _still_serves(sock, target, alive)
        finally:
            sock.send_multipart(encode_message(Op.DEL, 7777, {"ids": [result]}))
            next_reply(sock, alive=alive)
    assert alive()
    assert torch.equal(x.get(), torch.tensor([2.0, 3.0, 4.0]))


def test_the_sparse_index_write_exploit_is_refused_at_every_step(
        bob: WorkerClient, hook: sy.TorchHook) -> None:
    """to_sparse -> indices() (a view of the index storage) -> write an index -> to_dense
    would scatter out of bounds (SIGSEGV / heap write). Every step is refused."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).send(bob)
    target = x.id_at_location
    alive = alive_check(bob)
    sparse, index, dense = new_id(), new_id(), new_id()
    steps = [
        ("torch.Tensor.to_sparse", [ObjRef(target)], [[sparse, [2, 2], "float32", False]]),
        ("torch.Tensor.indices", [ObjRef(sparse)], [[index, [2, 2], "int64", False]]),
        ("torch.Tensor.__setitem__", [ObjRef(index), [0, 0], 1 << 40], None),
        ("torch.Tensor.to_dense", [ObjRef(sparse)], [[dense, [2, 2], "float32", False]]),
    ]
    with raw_dealer(bob) as sock:
        try:
            for req, (fn, args, out) in enumerate(steps, start=1):
                sock.send_multipart(encode_message(Op.CALL, req, {"fn": fn, "args": args,
                                                                  "kwargs": {}, "out": out}))
                msg = next_reply(sock, alive=alive)
                assert msg.req_id == req and msg.op is Op.ERROR, (fn, msg.op.name, msg.body)
                assert alive()
            objects = bob._objects
            assert type(objects[sparse]) is Summary and "OpNotAllowed" in objects[sparse].text
            assert not any(isinstance(v, torch.Tensor) and v.layout is not torch.strided
                           for v in objects.values())
            _still_serves(sock, target, alive)
        finally:
            sock.send_multipart(encode_message(Op.DEL, 7777, {"ids": [sparse, index, dense]}))
            next_reply(sock, alive=alive)
    assert torch.equal(x.get(), torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
