"""Torch functions, tensor methods and operators on pointers run on the worker."""

from __future__ import annotations

import pytest
import torch

import zmqsyft as sy
from tests.helpers import configured
from zmqsyft import PointerTensor

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[5.0, 6.0], [7.0, 8.0]])

CASES = {
    "add": lambda a, b: a + b,
    "radd": lambda a, b: 1 + a,
    "sub": lambda a, b: a - b,
    "rsub": lambda a, b: 10 - a,
    "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b,
    "floordiv": lambda a, b: b // a,
    "mod": lambda a, b: b % a,
    "pow": lambda a, b: a ** 2,
    "matmul": lambda a, b: a @ b,
    "torch.matmul": lambda a, b: torch.matmul(a, b),
    "mm": lambda a, b: a.mm(b),
    "neg": lambda a, b: -a,
    "abs": lambda a, b: abs(a - 3),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != a,
    "lt": lambda a, b: a < 2.5,
    "le": lambda a, b: a <= 2,
    "gt": lambda a, b: b > a,
    "ge": lambda a, b: a >= 3,
    "sum": lambda a, b: a.sum(),
    "sum_dim": lambda a, b: a.sum(dim=0),
    "mean": lambda a, b: a.mean(),
    "max": lambda a, b: a.max(),
    "min": lambda a, b: torch.min(a),
    "reshape": lambda a, b: a.reshape(4),
    "view": lambda a, b: a.view(-1, 1),
    "index": lambda a, b: a[1],
    "slice": lambda a, b: a[:, 1:],
    "step_slice": lambda a, b: b.reshape(-1)[::2],
    "ellipsis": lambda a, b: a[..., 0],
    "bool_mask": lambda a, b: a[a > 2],
    "fancy_index": lambda a, b: a[[1, 0]],
    "cat": lambda a, b: torch.cat([a, b]),
    "stack": lambda a, b: torch.stack([a, b], dim=1),
    "long": lambda a, b: a.long(),
    "to_int32": lambda a, b: a.to(torch.int32),
    "double": lambda a, b: a.double(),
    "relu": lambda a, b: torch.nn.functional.relu(a - 2),
    "softmax": lambda a, b: a.softmax(dim=1),
    "transpose": lambda a, b: a.T,
    "where": lambda a, b: torch.where(a > 2, a, b),
    "zeros_like": lambda a, b: torch.zeros_like(a),
    "nonzero": lambda a, b: (a > 2).nonzero(),
    "unique": lambda a, b: torch.unique(b - a),
    "argmax": lambda a, b: a.argmax(),
    "clone": lambda a, b: a.clone(),
    "mixed_local": lambda a, b: a + torch.ones(2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_runs_remotely(bob: sy.WorkerClient, name: str) -> None:
    fn = CASES[name]
    a, b = A.send(bob), B.send(bob)
    result = fn(a, b)
    assert isinstance(result, PointerTensor) and result.location is bob
    expected = fn(A, B)
    assert result.shape == expected.shape and result.dtype == expected.dtype
    got = result.get()
    assert type(got) is torch.Tensor
    assert torch.equal(got, expected), f"{name}: {got} != {expected}"
    # the operands are untouched on the worker
    assert torch.equal(a.get(), A) and torch.equal(b.get(), B)


def test_inplace_ops_modify_the_remote_tensor(bob: sy.WorkerClient) -> None:
    a = A.send(bob)
    b = B.send(bob)
    same = a
    a += 1
    assert a is same
    a.add_(b)
    a.mul_(2)
    a[0, 0] = 100.0
    a[1] = b[0]
    expected = (A + 1 + B) * 2
    expected[0, 0] = 100.0
    expected[1] = B[0]
    assert torch.equal(a.get(), expected)


def test_values_come_back_as_values(bob: sy.WorkerClient) -> None:
    a = A.send(bob)
    assert a.sum().item() == 10.0
    assert a.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert bool((a > 0).all()) is True
    assert float(a[0, 1]) == 2.0
    assert a.shape == (2, 2) and a.size(0) == 2 and len(a) == 2 and a.dim() == 2
    assert a.dtype == torch.float32 and a.numel() == 4


def test_multiple_results_and_iteration(bob: sy.WorkerClient) -> None:
    a = A.send(bob)
    values, indices = a.max(dim=0)
    assert torch.equal(values.get(), torch.tensor([3.0, 4.0]))
    assert torch.equal(indices.get(), torch.tensor([1, 1]))
    rows = [r.get() for r in a]
    assert [r.tolist() for r in rows] == [[1.0, 2.0], [3.0, 4.0]]
    parts = [p.get() for p in a.split(1)]
    assert torch.equal(torch.cat(parts), A)


def test_blocking_mode_matches_pipelined(bob: sy.WorkerClient) -> None:
    with configured(pipeline=False):
        a = A.send(bob)
        assert torch.equal(((a + a) * 3).get(), (A + A) * 3)


def test_pointers_on_two_workers_raise_naming_both(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    a = A.send(bob)
    b = B.send(alice)
    with pytest.raises(sy.LocationMismatch) as info:
        a + b
    assert "'bob'" in str(info.value) and "'alice'" in str(info.value)
    with pytest.raises(sy.LocationMismatch):
        torch.cat([a, b])
    assert torch.equal(a.get(), A) and torch.equal(b.get(), B)


def test_pointer_is_a_tensor_with_remote_metadata(bob: sy.WorkerClient) -> None:
    w = torch.randn(3, 2, requires_grad=True)
    p = w.send(bob)
    assert isinstance(p, torch.Tensor)
    assert p.shape == (3, 2) and p.dtype == torch.float32 and p.requires_grad and p.is_leaf
    assert p.device == torch.device("cpu")
    assert torch.allclose(p.get(), w.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.int16, torch.bool])
def test_metadata_reads_match_the_remote_tensor(bob: sy.WorkerClient, dtype: torch.dtype) -> None:
    """What optimisers ask of every parameter (``is_sparse``, ``torch.is_complex``, ...) is
    answered from the pointer's metadata, and agrees with the tensor itself."""
    t = torch.zeros(2, 3, dtype=dtype)
    p = t.send(bob)
    for read in (lambda x: x.is_sparse, lambda x: x.layout, lambda x: x.is_floating_point(),
                 lambda x: x.is_complex(), lambda x: torch.is_complex(x),
                 lambda x: torch.is_floating_point(x), lambda x: x.element_size(),
                 lambda x: x.itemsize, lambda x: x.nelement(), lambda x: x.ndimension()):
        assert read(p) == read(t)


def test_stack_of_pointers_is_inferred_once_per_shape(bob: sy.WorkerClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of pointers is part of the inference cache's key: the same stack in a loop is
    inferred once, and other shapes, counts or dtypes still get their own, right answers."""
    from zmqsyft.client import dispatch

    inferred = []
    real = dispatch._infer_with_args
    monkeypatch.setattr(dispatch, "_infer_with_args",
                        lambda *a: inferred.append(a[1]) or real(*a))
    dispatch._CACHE.clear()
    a, b, c = (torch.full((3,), float(i)).send(bob) for i in range(3))
    for _ in range(3):
        s = torch.stack([a, b])
        assert s.shape == (2, 3)
    assert len(inferred) == 1
    assert torch.stack([a, b, c]).shape == (3, 3)
    d = torch.ones(4, dtype=torch.float64).send(bob)
    e = torch.ones(4, dtype=torch.float64).send(bob)
    s2 = torch.stack((d, e), dim=1)
    assert s2.shape == (4, 2) and s2.dtype == torch.float64
    assert len(inferred) == 3
    assert torch.equal(torch.stack([a, b, c]).mean(0).get(), torch.ones(3))
    assert torch.equal(s2.get(), torch.ones(4, 2, dtype=torch.float64))
