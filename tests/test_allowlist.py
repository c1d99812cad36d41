"""The allow-list: op names from the wire resolve only through the fixed table."""

from __future__ import annotations

import builtins
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from zmqsyft import allowlist
from zmqsyft.allowlist import ALLOWED, DENIED, LOCAL_META, OPERATORS, is_inplace, lookup, name_of
from zmqsyft.errors import OpNotAllowed, SecurityError


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
