"""PySyft Part 2, "federated learning", on real worker processes and real data.

Run it as it stands::

    python examples/02_federated_learning.py [--rounds 40] [--out .]

The training data (scikit-learn's diabetes data set) is split between bob and alice, two
worker processes. One model travels: each round it is sent to bob, trained on bob's data
there, fetched back, then the same at alice's. The code is the tutorial's, with only the import
and the worker lines changed. At the end the federated model's test error is printed beside the
error of the same model trained centrally on all the data, and the loss curves are saved as a PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _diabetes import load, make_model, mse, plot, train_central
from torch import optim

import zmqsyft as sy

hook = sy.TorchHook(torch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load()
    half = len(x_train) // 2

    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    with bob, alice:
        # the tutorial: send the data to the workers, keep the pointers
        data_bob, target_bob = x_train[:half].send(bob), y_train[:half].send(bob)
        data_alice, target_alice = x_train[half:].send(alice), y_train[half:].send(alice)
        datasets = [(data_bob, target_bob), (data_alice, target_alice)]

        model = make_model()
        opt = optim.SGD(params=model.parameters(), lr=args.lr)
        curves: dict[str, list[float]] = {"bob": [], "alice": []}
        for round_ in range(1, args.rounds + 1):
            for data, target in datasets:
                model.send(data.location)
                opt.zero_grad()
                pred = model(data)
                loss = ((pred - target) ** 2).mean()
                loss.backward()
                opt.step()
                model.get()
                curves[data.location.id].append(loss.get().item())
            print(f"round {round_:3d}  loss bob {curves['bob'][-1]:.4f}  "
                  f"alice {curves['alice'][-1]:.4f}")

    central, central_losses = train_central(x_train, y_train, 2 * args.rounds, args.lr)
    curves["central (every step)"] = central_losses[1::2]
    federated_mse, central_mse = mse(model, x_test, y_test), mse(central, x_test, y_test)
    path = plot(curves, "Part 2: one model trained in turn on bob and alice",
                args.out / "02_federated_learning.png")
    print(f"\ntest MSE federated {federated_mse:.4f}  central {central_mse:.4f}  "
          f"ratio {federated_mse / central_mse:.3f} (bar: within 10%)")
    print(f"loss curves saved to {path}")


if __name__ == "__main__":
    main()
