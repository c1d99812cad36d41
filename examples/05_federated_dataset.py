"""PySyft Part 7, "federated learning with a federated dataset", on real worker processes.

Run it as it stands::

    python examples/05_federated_dataset.py [--epochs 3] [--batch-size 64]

scikit-learn's digits (1,797 handwritten digits of 8x8 pixels, shipped with it: nothing is
downloaded) are split into a training and a test part. The training part is cast in a
``sy.BaseDataset`` and federated over bob and alice, two worker processes, each receiving its
share straight away (``.federate((bob, alice))``, as in Part 6); the program keeps only
pointers. A ``sy.FederatedDataLoader`` then gives batches made on the workers, worker by
worker, and the tutorial's loop trains a small CNN: the model is sent to where the batch is,
trained there with that worker's optimizer (Part 7 keeps one Adam per worker: its state stays
on that worker) and fetched back. The
loss of each epoch is printed, then the accuracy on the test digits, which never left here.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import zmqsyft as sy

hook = sy.TorchHook(torch)


class Net(nn.Module):
    """A small CNN for 8x8 digits (Part 6's shape of network, scaled down)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = x.view(-1, 16 * 4 * 4)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images as (N, 1, 8, 8) floats in [0, 1]; 20% test."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(1)
    x_train, y_train, x_test, y_test = load_digits_tensors()

    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    with bob, alice:
        # the tutorial: cast the data in a BaseDataset, federate it, load it in batches
        dataset = sy.BaseDataset(x_train, y_train).federate((bob, alice))
        print(dataset)
        print("workers:", dataset.workers, f"({time.perf_counter() - start:.1f} s: both started, "
              "data sent)")
        train_loader = sy.FederatedDataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                              drop_last=False, seed=0)

        model = Net()
        optimizers = {w: torch.optim.Adam(params=model.parameters(), lr=args.lr)
                      for w in dataset.workers}
        for epoch in range(1, args.epochs + 1):
            loss_accum = 0.0
            for batch_idx, (data, target) in enumerate(train_loader):
                model.send(data.location)
                optimizer = optimizers[data.location.id]
                optimizer.zero_grad()
                pred = model(data)
                loss = F.nll_loss(pred, target)
                loss.backward()
                optimizer.step()
                model.get()
                loss = loss.get()
                loss_accum += loss.item()
                if batch_idx % 8 == 0:
                    print(f"Train Epoch: {epoch} [{batch_idx}/{len(train_loader)} "
                          f"({100.0 * batch_idx / len(train_loader):.0f}%)] on {data.location.id}"
                          f"\tBatch loss: {loss.item():.6f}")
            print(f"epoch {epoch}  mean loss {loss_accum / len(train_loader):.4f}  "
                  f"({time.perf_counter() - start:.1f} s)")

    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).sum().item()
    print(f"\nTest set: accuracy {correct}/{len(y_test)} ({100.0 * correct / len(y_test):.1f}%)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
