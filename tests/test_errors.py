"""Errors: remote exceptions with their type and traceback, released pointers, the allow-list."""

from __future__ import annotations

import pytest
import torch

import zmqsyft as sy
from zmqsyft import PointerTensor


def test_bad_op_raises_remote_error_with_traceback_and_worker_keeps_serving(bob: sy.WorkerClient) -> None:
    a = torch.ones(2, 2).send(bob)
    b = torch.ones(3).send(bob)
    with pytest.raises(RuntimeError) as info:
        a + b
    exc = info.value
    assert exc.worker_id == "bob"
    assert "Traceback" in exc.remote_traceback and "must match" in str(exc)
    assert any("occurred remotely on worker 'bob'" in note for note in exc.__notes__)
    del info, exc
    assert torch.equal((a * 2).get(), torch.full((2, 2), 2.0))
    assert list(bob._objects) == [a.id_at_location, b.id_at_location]


def test_pipelined_error_surfaces_on_use_of_the_result(bob: sy.WorkerClient) -> None:
    x = torch.tensor([1, 2]).send(bob)
    idx = torch.tensor([5]).send(bob)
    y = x[idx]  # out of bounds: only the worker can tell
    with pytest.raises(IndexError) as info:
        y.get()
    assert info.value.worker_id == "bob"
    assert torch.equal(x.get(), torch.tensor([1, 2]))


def test_pipelined_inplace_error_surfaces_at_next_sync(bob: sy.WorkerClient) -> None:
    x = torch.tensor([4, 6]).send(bob)
    x.floor_divide_(0)  # integer division by zero, in place
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        sy.sync()
    sy.sync()  # reported once
    assert torch.equal(x.get(), torch.tensor([4, 6]))


def test_get_twice_names_worker_and_id(bob: sy.WorkerClient) -> None:
    p = torch.tensor([1]).send(bob)
    p.get()
    with pytest.raises(sy.PointerReleased) as info:
        p.get()
    assert "'bob'" in str(info.value) and str(p.id_at_location) in str(info.value)
    with pytest.raises(sy.PointerReleased):
        p + 1


def test_pointer_to_missing_object(bob: sy.WorkerClient) -> None:
    ghost = PointerTensor(bob, 123456789, (2,), torch.float32)
    with pytest.raises(sy.ObjectNotFound) as info:
        ghost.get()
    assert "123456789" in str(info.value) and "'bob'" in str(info.value)
    with pytest.raises(sy.ObjectNotFound):
        (ghost + 1).get()


def test_sent_pointer_is_released(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    p = torch.tensor([1]).send(bob)
    p.send(alice)
    with pytest.raises(sy.PointerReleased, match="sent to worker 'alice'"):
        p.get()


def test_operations_outside_the_allow_list_are_refused(bob: sy.WorkerClient) -> None:
    p = torch.tensor([1.0]).send(bob)
    with pytest.raises(sy.OpNotAllowed):
        p.storage()
    with pytest.raises(sy.OpNotAllowed):
        p.data_ptr()
    with pytest.raises(sy.PointerError, match="get"):
        p.numpy()
    assert torch.equal(p.get(), torch.tensor([1.0]))


def test_snapshot_pointers_cannot_be_used(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    p2p = torch.tensor([1]).send(bob).send(alice)
    view = alice._objects[p2p.id_at_location]
    with pytest.raises(sy.PointerError, match="snapshot"):
        view.get()
    with pytest.raises(sy.PointerError):
        view + 1
    del view
    assert torch.equal(p2p.get().get(), torch.tensor([1]))


def test_send_to_something_that_is_not_a_worker() -> None:
    sy.TorchHook(torch)
    with pytest.raises(TypeError, match="worker handle"):
        torch.ones(1).send("bob")


def test_closed_worker(spawn) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob")
    p = torch.ones(1).send(bob)
    bob.close()
    assert bob._proc.poll() == 0, "close() shut the worker down cleanly (it was not killed)"
    with pytest.raises(sy.WorkerUnavailable, match="closed"):
        p.get()
    with pytest.raises(sy.WorkerUnavailable):
        torch.ones(1).send(bob)


def test_errors_propagate_through_pipelined_results(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    x = torch.tensor([1, 2]).send(bob).send(alice)  # through a chain too
    bad = x[torch.tensor([7])]
    worse = (bad + 1) * 2
    with pytest.raises(IndexError, match="out of bounds") as info:
        worse.get().get()
    assert info.value.worker_id == "bob"
    del info
    assert torch.equal(x.get().get(), torch.tensor([1, 2]))
