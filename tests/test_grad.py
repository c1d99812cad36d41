"""Autograd state comes back with the data, as in PySyft 0.2: after ``x = ptr.get()`` (and a
``move``, a ``remote_get``, a module's ``get()``), ``x.grad`` is the gradient the worker
computed and ``x.requires_grad`` is as it was there; ``_objects`` shows the gradient too. A
gradient derived from a data owner's private data leaves only where the data itself would."""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import zmqsyft as sy
from zmqsyft.errors import PrivacyError, ProtocolError
from zmqsyft.wire.codec import decode_message, encode_message
from zmqsyft.wire.messages import Op
from zmqsyft.wire.tensors import tensor_buffer
from zmqsyft.wire.values import Decoder, Encoder, Ext

pytestmark = pytest.mark.timeout(120)

X = torch.tensor([1.5, -2.0, 3.25])


def _worked(worker: sy.WorkerClient, x: torch.Tensor = X) -> tuple[Any, torch.Tensor]:
    """A leaf sent to ``worker`` and the gradient ``backward()`` gives it there (and here)."""
    ptr = x.clone().requires_grad_(True).send(worker)
    loss = (ptr * ptr * 3).sum()
    loss.backward()
    del loss
    return ptr, 6 * x


# ---------------------------------------------------------------- codec (no sockets)
def test_the_codec_carries_a_gradient_and_refuses_one_that_does_not_fit() -> None:
    t = X.clone().requires_grad_(True)
    t.grad = torch.tensor([0.5, 0.25, 0.125])
    back = decode_message(encode_message(Op.PUT, 1, {"obj": t})).body["obj"]
    assert back.requires_grad and back.is_leaf
    assert torch.equal(back.grad, t.grad) and back.grad is not None
    assert decode_message(encode_message(Op.PUT, 2, {"obj": X})).body["obj"].grad is None

    enc = Encoder()  # a tensor of 3 elements whose "gradient" has 2, as a peer could send it
    header = enc._ext(Ext.TENSOR, [1, "float32", [3], True, torch.zeros(2)])
    with pytest.raises(ProtocolError, match="does not fit"):
        Decoder([*enc.buffers[:1], tensor_buffer(X)]).unpack(enc.pack(header))
    header = enc._ext(Ext.TENSOR, [1, "float32", [3], True, "not a tensor"])
    with pytest.raises(ProtocolError, match="must be a tensor"):
        Decoder([*enc.buffers[:1], tensor_buffer(X)]).unpack(enc.pack(header))


# ---------------------------------------------------------------- on real workers
def test_get_brings_the_gradient_and_requires_grad_back(bob: sy.WorkerClient) -> None:
    ptr, expected = _worked(bob)
    x = ptr.get()
    assert x.requires_grad and x.is_leaf
    assert x.grad is not None and torch.equal(x.grad, expected)
    plain = torch.ones(2).send(bob).get()
    assert not plain.requires_grad and plain.grad is None


def test_a_large_tensor_brings_its_large_gradient_back(bob: sy.WorkerClient) -> None:
    """≥ 1 MiB: tensor and gradient travel through shared memory (handed over on ipc)."""
    big = torch.arange(600_000, dtype=torch.float32) / 1000
    ptr, expected = _worked(bob, big)
    x = ptr.get()
    assert x.requires_grad and torch.equal(x.grad, expected)


def test_move_and_remote_get_keep_the_gradient(bob: sy.WorkerClient,
                                               alice: sy.WorkerClient) -> None:
    ptr, expected = _worked(bob)
    moved = ptr.move(alice)
    shown = alice._objects[moved.id_at_location]
    assert shown.requires_grad and torch.equal(shown.grad, expected)
    x = moved.get()
    assert x.requires_grad and torch.equal(x.grad, expected)

    ptr, expected = _worked(bob)
    chain = ptr.send(alice)  # alice holds a pointer to bob's tensor
    chain.remote_get()
    x = chain.get()
    assert isinstance(x, torch.Tensor) and x.requires_grad and torch.equal(x.grad, expected)


def test_objects_shows_the_gradient(bob: sy.WorkerClient) -> None:
    ptr, expected = _worked(bob)
    shown = bob._objects[ptr.id_at_location]
    assert shown.requires_grad and torch.equal(shown.grad, expected)
    assert torch.equal(shown.detach(), X)
    del ptr


def test_a_module_fetched_with_get_has_its_gradients(bob: sy.WorkerClient) -> None:
    torch.manual_seed(7)
    model = nn.Linear(3, 2)
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    data = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    reference(data).pow(2).sum().backward()
    model.send(bob)
    model(data.send(bob)).pow(2).sum().backward()
    model.get()
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert mine.grad is not None and torch.allclose(mine.grad, theirs.grad)


# ---------------------------------------------------------------- private data
SECRET = torch.tensor([[48213.5, 71937.25], [36291.75, 59403.5]])


@pytest.fixture(scope="module")
def clinic(hook: sy.TorchHook, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A data owner's worker holding private data (its policy trusts nobody else)."""
    path = tmp_path_factory.mktemp("grad") / "clinic.pt"
    torch.save({"data": SECRET}, path)
    worker = sy.spawn_worker("clinic", transport_kind="tcp", load=str(path),
                             policy=sy.Policy(name="clinic"))
    try:
        (p,) = worker.search("#data")
        yield types.SimpleNamespace(worker=worker, p=p)
    finally:
        worker.close()


def test_a_gradient_of_private_data_does_not_leave_through_get(clinic: Any) -> None:
    """``w.grad`` would be the column sums of the data: ``get()`` refuses ``w``, gradient and
    all, and ``_objects`` withholds both. (A guard: the gradient must not open a way out.)"""
    w = torch.zeros(2, requires_grad=True).send(clinic.worker)
    (clinic.p * w).sum().backward()
    shown = clinic.worker._objects[w.id_at_location]
    assert not isinstance(shown, torch.Tensor) and "private" in str(shown)
    with pytest.raises(PrivacyError) as info:
        w.get()
    text = f"{info.value}\n{getattr(info.value, 'remote_traceback', '')}"
    assert not re.search(r"(?<!\d)(84505|131340)(?!\d)", text), text
