"""Every cell of the seed tutorial (PySyft Part 3) on real worker processes, over ipc and tcp.

After each step the exact contents of ``bob._objects`` and ``alice._objects`` are asserted: which
ids, which tensors, which pointers (and where those point).
"""

from __future__ import annotations

from typing import Any

import torch

import zmqsyft as sy
from zmqsyft import PointerTensor


def assert_store(objects: dict[int, Any], expected: dict[int, Any]) -> None:
    assert list(objects) == list(expected), f"ids {list(objects)} != {list(expected)}"
    for key, want in expected.items():
        got = objects[key]
        if isinstance(want, torch.Tensor):
            assert type(got) is torch.Tensor and torch.equal(got, want), f"{key}: {got!r} != {want!r}"
        else:  # (owner, location id, id_at_location) of a pointer held by the worker
            assert isinstance(got, PointerTensor), f"{key}: expected a pointer, got {got!r}"
            assert (got.owner, got.location.id, got.id_at_location) == want
            assert got.id == key


def test_seed_tutorial(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    # In [3]/[4]
    x = torch.tensor([1, 2, 3, 4])
    x_ptr = x.send(bob)
    assert repr(x_ptr) == f"(Wrapper)>[PointerTensor | me:{x_ptr.id} -> bob:{x_ptr.id_at_location}]"
    assert x_ptr.location is bob and x_ptr.owner == "me"
    data_id = x_ptr.id_at_location
    ptr_id = x_ptr.id
    assert data_id.bit_length() > 32 and ptr_id != data_id

    # In [5]: a pointer to the pointer
    pointer_to_x_ptr = x_ptr.send(alice)
    assert pointer_to_x_ptr.location is alice
    assert pointer_to_x_ptr.id_at_location == ptr_id
    assert repr(pointer_to_x_ptr) == f"(Wrapper)>[PointerTensor | me:{pointer_to_x_ptr.id} -> alice:{ptr_id}]"

    # In [6]/[7]
    assert_store(bob._objects, {data_id: torch.tensor([1, 2, 3, 4])})
    assert_store(alice._objects, {ptr_id: ("alice", "bob", data_id)})
    assert repr(alice._objects) == (
        f"{{{ptr_id}: (Wrapper)>[PointerTensor | alice:{ptr_id} -> bob:{data_id}]}}")

    # In [8]: get the pointer back, with its ownership
    x_ptr = pointer_to_x_ptr.get()
    assert repr(x_ptr) == f"(Wrapper)>[PointerTensor | me:{ptr_id} -> bob:{data_id}]"
    assert x_ptr.owned

    # In [9]-[11]
    x = x_ptr.get()
    assert torch.equal(x, torch.tensor([1, 2, 3, 4]))
    assert_store(bob._objects, {})
    assert_store(alice._objects, {})

    # In [12]-[14]: arithmetic through the chain
    p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
    y = p2p2x + p2p2x
    assert y.location is alice and y.shape == (5,) and y.dtype == torch.int64
    bob_objs = bob._objects
    alice_objs = alice._objects
    assert len(bob_objs) == 2 and len(alice_objs) == 2
    (x_key, x_hold), (y_key, y_hold) = alice_objs.items()
    assert x_key == p2p2x.id_at_location and y_key == y.id_at_location
    assert_store(alice_objs, {x_key: ("alice", "bob", x_hold.id_at_location),
                              y_key: ("alice", "bob", y_hold.id_at_location)})
    assert_store(bob_objs, {x_hold.id_at_location: torch.tensor([1, 2, 3, 4, 5]),
                            y_hold.id_at_location: torch.tensor([2, 4, 6, 8, 10])})

    # In [15]-[17]
    assert torch.equal(y.get().get(), torch.tensor([2, 4, 6, 8, 10]))
    assert_store(bob._objects, {x_hold.id_at_location: torch.tensor([1, 2, 3, 4, 5])})
    assert_store(alice._objects, {x_key: ("alice", "bob", x_hold.id_at_location)})

    # In [18]-[20]
    assert torch.equal(p2p2x.get().get(), torch.tensor([1, 2, 3, 4, 5]))
    assert_store(bob._objects, {})
    assert_store(alice._objects, {})

    # In [21]-[25]: move
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    moved_id = x.id_at_location
    assert_store(bob._objects, {moved_id: torch.tensor([1, 2, 3, 4, 5])})
    assert_store(alice._objects, {})
    x = x.move(alice)
    assert_store(bob._objects, {})
    assert_store(alice._objects, {moved_id: torch.tensor([1, 2, 3, 4, 5])})
    assert repr(x) == f"(Wrapper)>[PointerTensor | me:{x.id} -> alice:{moved_id}]"
    assert torch.equal(x.get(), torch.tensor([1, 2, 3, 4, 5]))
    assert_store(alice._objects, {})


def test_workers_are_separate_processes(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    import os

    assert bob.pid not in (None, os.getpid()) and alice.pid not in (None, os.getpid(), bob.pid)
    assert bob.address != alice.address
