"""Data owners keep their data: workers load it themselves; others find it with search()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zmqsyft as sy
from tests.helpers import cli_worker, run_cli

X = torch.arange(12.0).reshape(6, 2)
Y = torch.arange(6.0).reshape(6, 1)


def mine() -> sy.Policy:
    """This process owns the data its workers load in these tests (see tests/test_privacy.py
    for a model owner that does not)."""
    return sy.Policy(owner=sy.get_session().keys)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "bob.pt"
    torch.save({"data": X, "target": Y}, path)
    return path


def test_search_finds_the_workers_own_data(spawn, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob", load=str(dataset), tags=["#diabetes"], policy=mine())
    both = bob.search("#diabetes")
    assert [tuple(p.shape) for p in both] == [(6, 2), (6, 1)]
    (data,) = bob.search("#diabetes", "#data")
    (target,) = bob.search("#target")
    assert bob.search("#nothing") == [] and bob.search("#data", "#target") == []
    assert not data.owned and data.location is bob
    # computing on it gives results this process owns
    pred = data.sum(dim=1, keepdim=True)
    assert torch.equal((pred - target).get(), X.sum(dim=1, keepdim=True) - Y)
    # but the data itself cannot be taken
    with pytest.raises(sy.PointerError, match="does not own"):
        data.get()
    with pytest.raises(sy.PointerError, match="does not own"):
        data.move(spawn("alice"))
    # dropping the search results frees nothing
    ids = [p.id_at_location for p in both]
    del both, data, target, pred
    assert list(bob._objects) == ids
    assert torch.equal(bob._objects[ids[0]], X)


def test_search_pointers_work_in_a_chain(spawn, dataset: Path) -> None:  # type: ignore[no-untyped-def]
    bob = spawn("bob", load=str(dataset), tags=["#diabetes"], policy=mine())
    alice = spawn("alice")
    (data,) = bob.search("#data")
    on_alice = data.send(alice)  # alice holds a non-owning pointer to bob's data
    assert torch.equal((on_alice * 2).get().get(), X * 2)
    del on_alice
    assert alice._objects == {}
    assert len(bob._objects) == 2  # the data owner's data is untouched


def test_cli_loads_and_tags(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text('name = "bob\'s clinic"\nallow = ["any"]  # public data\n')
    with cli_worker("--id", "bob", "--bind", "tcp://127.0.0.1:0", "--load", str(dataset),
                    "--tag", "#diabetes", "--tag", "#train",
                    "--policy", str(tmp_path / "policy.toml")) as worker:
        assert worker.endpoint.startswith("tcp://127.0.0.1:"), worker.endpoint
        bob = worker.connect()
        (data,) = bob.search("#diabetes", "#train", "#data")
        assert torch.equal(data.mean(dim=0).get(), X.mean(dim=0))
        bob.shutdown()
        assert worker.proc.wait(timeout=30) == 0
        assert worker.stderr() == ""


def test_cli_refuses_a_file_that_is_not_tensors(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"data": X, "note": "not a tensor"}, path)
    result = run_cli("worker", "--id", "bob", "--load", str(path))
    assert result.returncode == 1
    assert "cannot load" in result.stderr and "note" in result.stderr
    assert "listening" not in result.stdout
