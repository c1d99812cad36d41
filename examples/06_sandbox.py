"""Part 5 of the PySyft tutorials, "welcome to the sandbox", on real worker processes.

Run it as it stands (scikit-learn needed: ``pip install -e ".[examples]"``)::

    python examples/06_sandbox.py [--steps 5]

``sy.create_sandbox(globals())`` starts six worker processes and spreads scikit-learn's bundled
datasets across them, every part tagged and described. Then, as in the tutorial: tag and
describe tensors, send them to bob and search for them; search the grid of all six workers;
and (as Part 7 goes on to do) train a linear model on the pointers the search found, the model
visiting each worker in turn, and bring it back. Boston housing, the tutorial's data set, is no
longer shipped with scikit-learn: the diabetes data takes its place (``"#diabetes"``). Ids are
random, so yours differ.
"""

from __future__ import annotations

import argparse

import torch

import zmqsyft as sy


def cell(n: int, source: str) -> None:
    print(f"\nIn [{n}]: {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training passes over the workers")
    args = parser.parse_args()

    cell(1, "sy.create_sandbox(globals())")
    sandbox = sy.create_sandbox(globals())
    with sandbox:
        bob = globals()["bob"]  # (as a notebook has it after create_sandbox(globals()))
        cell(2, "workers")
        print(globals()["workers"])
        cell(3, "bob._objects  (here: the shapes of bob's parts of each data set)")
        print({k: tuple(v.shape) if isinstance(v, torch.Tensor) else v
               for k, v in bob._objects.items()})

        # Part 2: worker search
        cell(4, "x = torch.tensor([1,2,3,4,5]).tag('#radio', '#hospital1').describe(...)")
        x = torch.tensor([1, 2, 3, 4, 5]).tag("#radio", "#hospital1").describe(
            "The input datapoints to the hospital1 dataset.")
        y = torch.tensor([5, 4, 3, 2, 1]).tag("#radio", "#hospital2").describe(
            "The input datapoints to the hospital2 dataset.")
        z = torch.tensor([1, 2, 3, 4, 5]).tag("#fun", "#mnist").describe(
            "The images in the MNIST training dataset.")
        print(x.tags, x.description)
        cell(5, "x = x.send(bob); y = y.send(bob); z = z.send(bob); results = bob.search(['#radio'])")
        x, y, z = x.send(bob), y.send(bob), z.send(bob)
        results = bob.search(["#radio"])
        print(results)
        cell(6, "print(results[0].description)")
        print(results[0].description)
        cell(7, "bob.search(['#diabetes', '#data'])  (the tutorial's ['#boston', '#housing'])")
        print(bob.search(["#diabetes", "#data"]))

        # Part 3: the grid
        cell(8, "grid = sy.PrivateGridNetwork(*workers)")
        grid = sy.PrivateGridNetwork(*globals()["workers"])
        print(grid)
        cell(9, "data = grid.search('#diabetes', '#data'); target = grid.search('#diabetes', '#target')")
        data, target = grid.search("#diabetes", "#data"), grid.search("#diabetes", "#target")
        print({worker: [tuple(p.shape) for p in found] for worker, found in data.items()})

        # as Part 7: train on what the search found, the model visiting each worker
        cell(10, "model = nn.Linear(n_features, 1); train it on every worker's part, in turn")
        model = torch.nn.Linear(data["alice"][0].shape[1], 1)
        opt = torch.optim.SGD(params=model.parameters(), lr=0.5)
        for step in range(1, args.steps + 1):
            total = 0.0
            for worker in data:
                inputs, targets = data[worker][0], target[worker][0]
                model.send(inputs.location)
                opt.zero_grad()
                loss = ((model(inputs).view(-1) - targets) ** 2).mean()
                loss.backward()
                opt.step()
                model.get()
                total += loss.get().item()
            print(f"step {step:2d}  loss summed over the {len(data)} workers {total:10.1f}")
        print("the model is back here:", type(model.weight).__name__, tuple(model.weight.shape))
    print("\nthe sandbox's workers are stopped:", all(w.closed for w in sandbox.workers))


if __name__ == "__main__":
    main()
