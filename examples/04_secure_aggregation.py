"""PySyft Part 10, "federated learning with encrypted gradient aggregation", on real processes.

Run it as it stands::

    python examples/04_secure_aggregation.py [--rounds 20] [--worker-iters 5] [--out .]

bob and alice are data owners: each worker loads its own half of the diabetes data and trains a
copy of the model on it. There is no trusted aggregator: each one's model update is encoded in
fixed precision and split into additive secret shares mod 2**64 *on its own worker* (drawn from
the operating system's cryptographic generator), one share kept, one sent straight to the other
data owner; the shares are added where they are, and only the sum of both updates is
reconstructed. ``james`` is the crypto provider PySyft names (it would deal Beaver triples for
products; a sum needs none). The training loop is the tutorial's, with only the import, the
worker and the data lines changed.

Each data owner's worker enforces its ``sy.Policy``: its data may go only to the other data
owner's worker, and only losses and sums over both owners may leave. At the end the run shows
the refusals (one owner's update, reconstructed alone; one owner's model; a share), each data
owner's own audit from ``stats()`` (what it sent other workers derived from its data: only fresh
shares, never anything whole), and the test error beside plaintext federated averaging of the
same models (equal within fixed-point tolerance) and a centrally trained model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _diabetes import load, make_model, mse, plot, train_central
from torch import optim

import zmqsyft as sy

hook = sy.TorchHook(torch)


def federated_plaintext(halves: list[tuple[torch.Tensor, torch.Tensor]], rounds: int,
                        iters: int, lr: float) -> torch.nn.Module:
    """The same federated averaging in this process, in plaintext: the reference."""
    model = make_model()
    for _ in range(rounds):
        trained = []
        for x, y in halves:
            local = make_model()
            local.load_state_dict(model.state_dict())
            opt = optim.SGD(local.parameters(), lr=lr)
            for _ in range(iters):
                opt.zero_grad()
                ((local(x) - y) ** 2).mean().backward()
                opt.step()
            trained.append(local)
        with torch.no_grad():
            for p, *mine in zip(model.parameters(), *(m.parameters() for m in trained),
                                strict=True):
                p.copy_(sum(mine) / len(mine))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--worker-iters", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load()
    half = len(x_train) // 2
    halves = [(x_train[:half], y_train[:half]), (x_train[half:], y_train[half:])]

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"data": halves[0][0], "target": halves[0][1]}, f"{tmp}/bob.pt")
        torch.save({"data": halves[1][0], "target": halves[1][1]}, f"{tmp}/alice.pt")
        # each data owner trusts the other to hold shares of its data: their keys come first
        bob_keys, alice_keys = sy.KeyPair.fresh(), sy.KeyPair.fresh()
        bob = sy.spawn_worker("bob", keys=bob_keys, load=f"{tmp}/bob.pt", tags=["#diabetes"],
                              policy=sy.Policy(name="bob", trust=[alice_keys], allow=["scalar"]))
        alice = sy.spawn_worker("alice", keys=alice_keys, load=f"{tmp}/alice.pt",
                                tags=["#diabetes"],
                                policy=sy.Policy(name="alice", trust=[bob_keys], allow=["scalar"]))
        james = sy.spawn_worker("james")  # the crypto provider
        compute_nodes = [bob, alice]
        with bob, alice, james:
            remote_dataset: list[list[tuple[sy.PointerTensor, sy.PointerTensor]]] = [[], []]
            for i, worker in enumerate(compute_nodes):
                data, = worker.search("#diabetes", "#data")
                target, = worker.search("#diabetes", "#target")
                remote_dataset[i].append((data, target))

            model = make_model()
            curves: dict[str, list[float]] = {"bob": [], "alice": []}
            seconds = []
            for round_ in range(1, args.rounds + 1):
                models = [model.copy().send(w) for w in compute_nodes]
                optimizers = [optim.SGD(params=m.parameters(), lr=args.lr) for m in models]
                losses = []
                for i in range(len(compute_nodes)):
                    for data, target in remote_dataset[i]:
                        for _ in range(args.worker_iters):
                            optimizers[i].zero_grad()
                            loss = ((models[i](data) - target) ** 2).mean()
                            loss.backward()
                            optimizers[i].step()
                        losses.append(loss.get().item())
                # encrypted aggregation (the tutorial's code)
                started = time.perf_counter()
                params = [list(m.parameters()) for m in models]
                new_params = []
                for param_i in range(len(params[0])):
                    spdz_params = []
                    for remote_index in range(len(compute_nodes)):
                        spdz_params.append(params[remote_index][param_i].copy().fix_precision()
                                           .share(bob, alice, crypto_provider=james).get())
                    new_param = (spdz_params[0] + spdz_params[1]).get().float_precision() / 2
                    new_params.append(new_param)
                with torch.no_grad():
                    for model_param, new_param in zip(model.parameters(), new_params):  # noqa: B905
                        model_param.copy_(new_param)
                seconds.append(time.perf_counter() - started)
                curves["bob"].append(losses[0])
                curves["alice"].append(losses[1])
                print(f"round {round_:3d}  bob loss {losses[0]:.4f}  alice loss {losses[1]:.4f}")

            print(f"\nsecure aggregation of one round ({len(params[0])} tensors, 2 owners): "
                  f"median {sorted(seconds)[len(seconds) // 2] * 1e3:.1f} ms")
            print("\nwhat the data owners' workers refuse the model owner:")
            bobs_update = params[0][0].copy().fix_precision().share(
                bob, alice, crypto_provider=james).get()
            attempts = [
                ("bob's update alone, reconstructed", bobs_update.get),
                ("bob's trained model", lambda: models[0].weight.get()),
                ("alice's share of a new sharing of bob's update", lambda: params[0][0].copy()
                 .fix_precision().share(bob, alice).get().child.shares[1].get()),
            ]
            for what, take in attempts:
                try:
                    take()
                    print(f"  {what}: NOT REFUSED")
                except sy.PrivacyError as refused:
                    print(f"  {what}: refused by worker '{refused.worker_id}'")
            print("\neach data owner's audit (its worker's stats()):")
            for owner in compute_nodes:
                counters = owner.stats()["counters"]
                print(f"  {owner.id} sent other workers {counters.get('private_moved_as_shares', 0)} "
                      f"fresh shares of its data and {counters.get('private_moved_whole', 0)} "
                      f"objects derived from it whole; released "
                      f"{counters.get('private_released', 0)} values (losses and sums over both "
                      f"owners), refused {counters.get('privacy_refused', 0)}")

    plain = federated_plaintext(halves, args.rounds, args.worker_iters, args.lr)
    central, central_losses = train_central(x_train, y_train, args.rounds * args.worker_iters,
                                            args.lr)
    curves["central (every local step)"] = central_losses[args.worker_iters - 1::args.worker_iters]
    secure_mse, plain_mse = mse(model, x_test, y_test), mse(plain, x_test, y_test)
    central_mse = mse(central, x_test, y_test)
    path = plot(curves, "Part 10: secure aggregation", args.out / "04_secure_aggregation.png")
    print(f"\ntest MSE secure aggregation {secure_mse:.4f}  plaintext federated averaging "
          f"{plain_mse:.4f}  difference {abs(secure_mse - plain_mse):.5f} (fixed point: 10**-3)")
    print(f"test MSE central {central_mse:.4f}  ratio {secure_mse / central_mse:.3f}")
    print(f"loss curves saved to {path}")


if __name__ == "__main__":
    main()
