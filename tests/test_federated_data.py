"""PySyft 0.2's federated datasets (Parts 6 and 7) and per-worker optimizers (Part 2, 0.2.9) on
real worker processes: ``federate``, ``BaseDataset``, ``FederatedDataset``,
``FederatedDataLoader``, ``Optims``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import zmqsyft as sy
from zmqsyft import PointerTensor
from zmqsyft.federated.floptimizer import Optims

pytestmark = pytest.mark.timeout(90)

X = torch.arange(30.0).view(10, 3)  # row i is [3i, 3i+1, 3i+2]: every row tells its index
Y = torch.arange(10)


def _stored(worker: sy.WorkerClient) -> list[torch.Tensor]:
    return sorted(worker._objects.values(), key=lambda t: (t.dim(), t.shape, t.flatten()[0].item()))


def _rows(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] / 3).long().tolist()


def test_federate_splits_the_data_and_sends_each_part_to_its_worker(
        bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    fd = sy.BaseDataset(X, Y).federate((bob, alice))
    assert isinstance(fd, sy.FederatedDataset)
    assert fd.workers == ["bob", "alice"] and len(fd) == 10
    for worker, part in (("bob", slice(0, 5)), ("alice", slice(5, 10))):
        dataset = fd[worker]
        # the program holds pointers only; each worker holds its own part, and nothing else
        assert isinstance(dataset.data, PointerTensor) and isinstance(dataset.targets, PointerTensor)
        assert dataset.location is dataset.data.location is dataset.targets.location
        assert dataset.location.id == worker and len(dataset) == 5
        held = _stored(dataset.location)
        assert len(held) == 2
        assert torch.equal(held[0], Y[part]) and torch.equal(held[1], X[part])
    assert fd[bob] is fd["bob"] and "bob" in fd and "carol" not in fd
    assert repr(fd) == ("FederatedDataset: 10 samples on 2 workers\n"
                        "    bob: 5 samples\n    alice: 5 samples")
    del fd  # (the pooled workers' stores must be empty after the test: dropping frees them)


def test_a_torch_dataset_federates_unevenly_sized_parts_too(
        bob: sy.WorkerClient, alice: sy.WorkerClient, carol: sy.WorkerClient) -> None:
    dataset = torch.utils.data.TensorDataset(X[:8], Y[:8])  # .federate comes from the hook
    fd = dataset.federate([bob, alice, carol])
    assert [len(fd[w]) for w in fd.workers] == [3, 3, 2]
    assert torch.equal(fd["carol"].targets.get(), Y[6:8])
    assert torch.equal(fd["carol"].data.get(), X[6:8])

    class Pairs(torch.utils.data.Dataset):  # any dataset of (data, target) samples
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return X[i] * 2, int(Y[i])

    fd2 = Pairs().federate((bob, alice))
    assert torch.equal(fd2["alice"].data.get(), X[3:5] * 2)
    assert torch.equal(fd2["alice"].targets.get(), Y[3:5])


def test_base_dataset_len_indexing_send_get(bob: sy.WorkerClient) -> None:
    dataset = sy.BaseDataset(X, Y, transform=lambda row: row + 1)
    assert len(dataset) == 10 and dataset.location is None
    data, target = dataset[2]
    assert torch.equal(data, X[2] + 1) and target.item() == 2
    remote = dataset.send(bob)
    assert remote.location is bob and dataset.location is None and len(remote) == 10
    data, target = remote[3]  # selected and transformed on bob
    assert isinstance(data, PointerTensor) and data.location is bob
    assert torch.equal(data.get(), X[3] + 1) and target.get().item() == 3
    assert "10 samples" in repr(remote) and "on 'bob'" in repr(remote)
    assert remote.get() is remote and remote.location is None
    assert torch.equal(remote.data, X) and torch.equal(remote.targets, Y)
    assert bob._objects == {}


def test_loader_batch_counts_with_and_without_drop_last(
        bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    fd = sy.BaseDataset(X, Y).federate((bob, alice))  # 5 samples each
    for drop_last, per_worker, sizes in ((False, 3, [2, 2, 1]), (True, 2, [2, 2])):
        loader = sy.FederatedDataLoader(fd, batch_size=2, drop_last=drop_last)
        assert len(loader) == 2 * per_worker
        assert loader.batches_per_worker() == {"bob": per_worker, "alice": per_worker}
        batches = list(loader)
        assert len(batches) == len(loader)
        # worker by worker: all of bob's batches, then all of alice's
        assert [d.location.id for d, _ in batches] == ["bob"] * per_worker + ["alice"] * per_worker
        assert [len(d) for d, _ in batches] == sizes * 2
        assert all(t.location is d.location for d, t in batches)
    assert len(sy.FederatedDataLoader(fd, batch_size=8)) == 2
    assert len(sy.FederatedDataLoader(fd, batch_size=8, drop_last=True)) == 0
    assert list(sy.FederatedDataLoader(fd, batch_size=8, drop_last=True)) == []
    steps = list(sy.FederatedDataLoader(fd, batch_size=4, iter_per_worker=True))
    assert [sorted(w.id for w in step) for step in steps] == [["alice", "bob"]] * 2
    assert [len(step[bob][0]) for step in steps] == [4, 1]


def test_batches_are_the_slices_made_on_the_worker_and_the_data_never_comes_here(
        bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    big = torch.randn(2000, 64)  # 512 KB: it would show in the traffic if it came back
    labels = torch.arange(2000)
    fd = sy.BaseDataset(big, labels).federate((bob, alice))

    def traffic(worker: sy.WorkerClient) -> tuple[int, int]:
        peers = worker.stats()["peers"].values()
        return sum(p["bytes_in"] for p in peers), sum(p["bytes_out"] for p in peers)

    before = {w: traffic(w) for w in (bob, alice)}
    batches = list(sy.FederatedDataLoader(fd, batch_size=100))
    sy.sync()
    after = {w: traffic(w) for w in (bob, alice)}
    for w in (bob, alice):
        sent_in, sent_out = after[w][0] - before[w][0], after[w][1] - before[w][1]
        # 10 batches of 100 indices go in (8 bytes each, plus the headers); acknowledgements
        # come out: no data (each worker's part alone is 256 KB)
        assert sent_in < 40_000 and sent_out < 10_000, (w.id, sent_in, sent_out)
    for i, (data, target) in enumerate(batches):
        owner = bob if i < 10 else alice
        rows = slice(i * 100, (i + 1) * 100)
        assert data.location is owner and target.location is owner
        if i in (0, 13):
            assert torch.equal(data.get(), big[rows]) and torch.equal(target.get(), labels[rows])


def test_a_datasets_transform_is_applied_to_each_batch_on_its_worker(bob: sy.WorkerClient) -> None:
    fd = sy.FederatedDataset([sy.BaseDataset(X, Y, transform=lambda x: x * 2 - 1).send(bob)])
    batches = list(sy.FederatedDataLoader(fd, batch_size=4))
    assert [len(d) for d, _ in batches] == [4, 4, 2]
    data, target = batches[1]
    assert data.location is bob and torch.equal(data.get(), X[4:8] * 2 - 1)
    assert torch.equal(target.get(), Y[4:8])


def test_shuffling_is_reproducible_with_a_seed_and_covers_every_sample_once_per_epoch(
        bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    fd = sy.BaseDataset(X, Y).federate((bob, alice))

    def epoch(loader: sy.FederatedDataLoader) -> list[tuple[str, list[int]]]:
        return [(d.location.id, t.get().tolist()) for d, t in loader]

    loader = sy.FederatedDataLoader(fd, batch_size=2, shuffle=True, seed=7)
    first, second = epoch(loader), epoch(loader)
    for order in (first, second):
        assert [w for w, _ in order] == ["bob"] * 3 + ["alice"] * 3
        assert sorted(i for w, b in order if w == "bob" for i in b) == [0, 1, 2, 3, 4]
        assert sorted(i for w, b in order if w == "alice" for i in b) == [5, 6, 7, 8, 9]
    again = sy.FederatedDataLoader(fd, batch_size=2, shuffle=True, seed=7)
    assert epoch(again) == first and epoch(again) == second
    assert first != second  # a fresh order each epoch (for this seed)
    # the rows travel with their targets
    data, target = next(iter(sy.FederatedDataLoader(fd, batch_size=5, shuffle=True, seed=3)))
    assert _rows(data.get()) == target.get().tolist()
    # without shuffling: in order
    assert epoch(sy.FederatedDataLoader(fd, batch_size=5)) == [("bob", [0, 1, 2, 3, 4]),
                                                                ("alice", [5, 6, 7, 8, 9])]


def _digits(n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n], dtype=torch.float32) / 16.0, torch.tensor(y[:n])


def test_part7_training_loop_reduces_the_loss_on_digits(
        bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    x, y = _digits()
    datasets = [sy.BaseDataset(x[:300], y[:300]).send(bob),
                sy.BaseDataset(x[300:], y[300:]).send(alice)]
    dataset = sy.FederatedDataset(datasets)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimizers = {w: optim.SGD(params=model.parameters(), lr=0.5) for w in dataset.workers}
    train_loader = sy.FederatedDataLoader(dataset, batch_size=50, shuffle=True, seed=0)
    assert len(train_loader) == 12
    losses = []
    for _ in range(3):
        loss_accum = 0.0
        for data, target in train_loader:
            model.send(data.location)
            optimizer = optimizers[data.location.id]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data), target)
            loss.backward()
            optimizer.step()
            model.get()
            loss_accum += loss.get().item()
        losses.append(loss_accum / len(train_loader))
    assert losses[2] < 0.7 * losses[0], losses
    assert all(type(p) is nn.Parameter for p in model.parameters())
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8, accuracy


def test_part7_as_written_on_data_the_workers_loaded_themselves(spawn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Part 7's own flow: each worker holds its data from the start; search() finds it."""
    x, y = _digits(200)
    workers = []
    for name, rows in (("bob", slice(0, 100)), ("alice", slice(100, 200))):
        torch.save({"data": x[rows], "target": y[rows]}, tmp_path / f"{name}.pt")
        workers.append(spawn(name, load=str(tmp_path / f"{name}.pt"), tags=["#digits"],
                             policy=sy.Policy(owner=sy.get_session().keys)))
    datasets = []
    for worker in workers:
        (data,) = worker.search("#digits", "#data")
        (target,) = worker.search("#digits", "#target")
        datasets.append(sy.BaseDataset(data, target))
    dataset = sy.FederatedDataset(datasets)
    assert dataset.workers == ["bob", "alice"] and len(dataset) == 200
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimizers = {w: optim.Adam(params=model.parameters(), lr=1e-2) for w in dataset.workers}
    train_loader = sy.FederatedDataLoader(dataset, batch_size=32, shuffle=False, drop_last=False)
    assert len(train_loader) == 8
    losses = []
    for _ in range(3):
        loss_accum = 0.0
        for data, target in train_loader:
            model.send(data.location)
            optimizer = optimizers[data.location.id]
            optimizer.zero_grad()
            pred = model(data)
            loss = F.cross_entropy(pred, target)
            loss.backward()
            optimizer.step()
            model.get()
            loss_accum += loss.get().item()
        losses.append(loss_accum)
    assert losses[2] < 0.7 * losses[0], losses
    del optimizers, optimizer, data, target, pred
    for worker in workers:  # its own data, and nothing left of the batches or Adam's state
        assert len(worker._objects) == 2


def test_part2_optims_one_optimizer_per_worker(bob: sy.WorkerClient,
                                                alice: sy.WorkerClient) -> None:
    """Part 2 as 0.2.9 has it: Adam, whose state stays with each worker's optimizer."""
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
    target = torch.tensor([[0], [0], [1], [1.0]])
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    local = copy.deepcopy(model)
    datasets = [(data[0:2].send(bob), target[0:2].send(bob)),
                (data[2:].send(alice), target[2:].send(alice))]
    optims = Optims(["bob", "alice"], optim=optim.Adam(params=model.parameters(), lr=0.1))
    local_opts = {w: optim.Adam(local.parameters(), lr=0.1) for w in ("bob", "alice")}
    losses = []
    for _ in range(10):
        for d, t in datasets:
            model.send(d.location)
            opt = optims.get_optim(d.location.id)
            opt.zero_grad()
            loss = ((model(d) - t) ** 2).sum()
            loss.backward()
            opt.step()
            model.get()
            losses.append(loss.get().item())
            # the same, locally, with one Adam per worker
            rows = slice(0, 2) if d.location is bob else slice(2, 4)
            lopt = local_opts[d.location.id]
            lopt.zero_grad()
            ((local(data[rows]) - target[rows]) ** 2).sum().backward()
            lopt.step()
    assert optims.get_optim("bob") is optims.get_optim(bob) is not optims.get_optim("alice")
    assert optims.count() == 2 and optims.get_optim("bob") is not optims.optim
    for a, b in zip(model.parameters(), local.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2]), losses
    # each worker's optimizer kept its own state on its own worker
    for worker in (bob, alice):
        state = optims.get_optim(worker.id).state
        assert state and all(s["exp_avg"].location is worker for s in state.values())
    assert not optims.optim.state  # the template is left alone
    del optims, datasets, d, t


def test_misuse_is_refused_with_what_to_do(bob: sy.WorkerClient, alice: sy.WorkerClient) -> None:
    dataset = sy.BaseDataset(X, Y)
    with pytest.raises(ValueError, match=r"no workers.*federate\(\(bob, alice\)\)"):
        dataset.federate(())
    with pytest.raises(ValueError, match="more than once"):
        dataset.federate((bob, bob))
    with pytest.raises(ValueError, match=r"cannot split 1 samples across 2 workers"):
        sy.BaseDataset(X[:1], Y[:1]).federate((bob, alice))
    with pytest.raises(ValueError, match="10 rows of data but 9 targets"):
        sy.BaseDataset(X, Y[:9])
    with pytest.raises(ValueError, match="is local; send it"):
        sy.FederatedDataset([dataset])
    with pytest.raises(TypeError, match=r"takes a sy.FederatedDataset.*federate"):
        sy.FederatedDataLoader(dataset)
    fd = dataset.federate([bob])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
            sy.FederatedDataLoader(fd, batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(KeyError) as caught:
        fd["carol"]
    assert str(caught.value) == ("no part of this FederatedDataset is on worker 'carol'; the "
                                 "workers holding parts are 'bob' (see .workers): index it by one of those")
    assert isinstance(caught.value, sy.WorkerNotInDataset)
    with pytest.raises(ValueError, match="already on worker 'bob'.*move"):
        fd["bob"].send(bob)
    with pytest.raises(ValueError, match="two datasets are on worker 'bob'"):
        sy.FederatedDataset([fd["bob"], fd["bob"]])
    with pytest.raises(KeyError, match="no optimizer for worker 'carol'"):
        Optims(["bob"], optim=optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)).get_optim("carol")
    with pytest.warns(UserWarning, match="ignores num_workers"):
        sy.FederatedDataLoader(fd, num_workers=1)
    del fd

