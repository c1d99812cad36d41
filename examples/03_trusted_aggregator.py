"""PySyft Part 4, "federated learning with a trusted aggregator", on real worker processes.

Run it as it stands::

    python examples/03_trusted_aggregator.py [--rounds 20] [--worker-iters 5] [--out .]

bob and alice are data owners: each worker process loads its own share of scikit-learn's
diabetes data from a file when it starts, and this program only ever finds it with
``search()``; it never holds it. Each round, a copy of the model is trained on bob's and on
alice's worker, both copies are moved straight to ``secure_worker`` (bob and alice push them
there; they do not pass through this program), averaged there, and only the average comes back.
So the model owner never sees anyone's data, nor either worker's model: each data owner's
worker enforces it (its ``sy.Policy``: the data may go only to ``secure_worker``, and only
losses and averages over both owners may leave), as the end of the run shows. The training loop is the
tutorial's, with only the import, the worker and the data lines changed. At the end the test
error is printed beside a centrally trained model's, and the loss curves are saved as a PNG.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _diabetes import load, make_model, mse, plot, train_central
from torch import optim

import zmqsyft as sy

hook = sy.TorchHook(torch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--worker-iters", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = load()
    half = len(x_train) // 2

    with tempfile.TemporaryDirectory() as tmp:
        # what each data owner has on its own disk
        torch.save({"data": x_train[:half], "target": y_train[:half]}, f"{tmp}/bob.pt")
        torch.save({"data": x_train[half:], "target": y_train[half:]}, f"{tmp}/alice.pt")
        # each data owner's rules, enforced by its worker: its data may go only to the
        # aggregator, only single numbers (losses) and averages over both owners come back
        secure_worker = sy.spawn_worker("secure_worker")
        policy = sy.Policy(trust=[secure_worker], allow=["scalar"])
        bob = sy.spawn_worker("bob", load=f"{tmp}/bob.pt", tags=["#diabetes"], policy=policy)
        alice = sy.spawn_worker("alice", load=f"{tmp}/alice.pt", tags=["#diabetes"], policy=policy)
        with bob, alice, secure_worker:
            bobs_data, = bob.search("#diabetes", "#data")
            bobs_target, = bob.search("#diabetes", "#target")
            alices_data, = alice.search("#diabetes", "#data")
            alices_target, = alice.search("#diabetes", "#target")

            model = make_model()
            curves: dict[str, list[float]] = {"bob": [], "alice": []}
            for round_ in range(1, args.rounds + 1):
                bobs_model = model.copy().send(bob)
                alices_model = model.copy().send(alice)
                bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=args.lr)
                alices_opt = optim.SGD(params=alices_model.parameters(), lr=args.lr)
                for _ in range(args.worker_iters):
                    # Train Bob's Model
                    bobs_opt.zero_grad()
                    bobs_pred = bobs_model(bobs_data)
                    bobs_loss = ((bobs_pred - bobs_target) ** 2).mean()
                    bobs_loss.backward()
                    bobs_opt.step()
                    bobs_loss = bobs_loss.get().data
                    # Train Alice's Model
                    alices_opt.zero_grad()
                    alices_pred = alices_model(alices_data)
                    alices_loss = ((alices_pred - alices_target) ** 2).mean()
                    alices_loss.backward()
                    alices_opt.step()
                    alices_loss = alices_loss.get().data
                alices_model.move(secure_worker)
                bobs_model.move(secure_worker)
                with torch.no_grad():
                    model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
                    model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())
                curves["bob"].append(bobs_loss.item())
                curves["alice"].append(alices_loss.item())
                print(f"round {round_:3d}  bob loss {bobs_loss.item():.4f}  "
                      f"alice loss {alices_loss.item():.4f}")

            me = sy.get_session().name
            for owner in (bob, alice):
                to_me = owner.stats()["peers"][me]
                print(f"{owner.id} sent this program {to_me['bytes_out']} bytes in all, its "
                      f"largest message {to_me['largest_out']} bytes (acknowledgements and losses)")

            # the tutorial's point, enforced: neither one model nor anyone's data leaves
            for attempt, take in (("bobs_model.get()", bobs_model.get),
                                  ("bobs_data.get()", bobs_data.get),
                                  ("(bobs_data + 0).get()", lambda: (bobs_data + 0).get())):
                try:
                    take()
                    print(f"{attempt}: NOT REFUSED")
                except sy.PrivacyError as refused:
                    print(f"{attempt} refused by worker '{refused.worker_id}': "
                          f"{str(refused).split(': ', 1)[-1][:90]}...")
                except sy.PointerError as refused:  # (the client knows it holds no ownership)
                    print(f"{attempt} refused: {str(refused)[:90]}...")

    central, central_losses = train_central(x_train, y_train, args.rounds * args.worker_iters, args.lr)
    curves["central (every local step)"] = central_losses[args.worker_iters - 1::args.worker_iters]
    federated_mse, central_mse = mse(model, x_test, y_test), mse(central, x_test, y_test)
    path = plot(curves, "Part 4: averaged on a trusted aggregator", args.out / "03_trusted_aggregator.png")
    print(f"\ntest MSE federated {federated_mse:.4f}  central {central_mse:.4f}  "
          f"ratio {federated_mse / central_mse:.3f} (bar: within 10%)")
    print(f"loss curves saved to {path}")


if __name__ == "__main__":
    main()
