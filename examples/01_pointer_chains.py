"""Part 3 of the PySyft tutorials, "advanced remote execution tools", on real worker processes.

Run it as it stands::

    python examples/01_pointer_chains.py

bob and alice are two worker processes; this script is the third process. Every
``bob._objects`` below is read from bob's process over ZeroMQ. Ids are random, so yours differ.
"""

import torch

import zmqsyft as sy

hook = sy.TorchHook(torch)


def cell(n: int, source: str) -> None:
    print(f"\nIn [{n}]: {source}")


def main() -> None:
    # Section 3.1 - pointers to pointers
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    with bob, alice:
        cell(3, "x = torch.tensor([1,2,3,4])")
        x = torch.tensor([1, 2, 3, 4])
        print(x)

        cell(4, "x_ptr = x.send(bob)")
        x_ptr = x.send(bob)
        print(x_ptr)

        cell(5, "pointer_to_x_ptr = x_ptr.send(alice)")
        pointer_to_x_ptr = x_ptr.send(alice)
        print(pointer_to_x_ptr)

        cell(6, "bob._objects")
        print(bob._objects)
        cell(7, "alice._objects")
        print(alice._objects)

        cell(8, "x_ptr = pointer_to_x_ptr.get()")
        x_ptr = pointer_to_x_ptr.get()
        print(x_ptr)

        cell(9, "x = x_ptr.get()")
        x = x_ptr.get()
        print(x)

        cell(10, "bob._objects")
        print(bob._objects)
        cell(11, "alice._objects")
        print(alice._objects)

        # arithmetic on pointer -> pointer -> data
        cell(12, "p2p2x = torch.tensor([1,2,3,4,5]).send(bob).send(alice); y = p2p2x + p2p2x")
        p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)
        y = p2p2x + p2p2x

        cell(13, "bob._objects")
        print(bob._objects)
        cell(14, "alice._objects")
        print(alice._objects)

        cell(15, "y.get().get()")
        print(y.get().get())

        cell(16, "bob._objects")
        print(bob._objects)
        cell(17, "alice._objects")
        print(alice._objects)

        cell(18, "p2p2x.get().get()")
        print(p2p2x.get().get())

        cell(19, "bob._objects")
        print(bob._objects)
        cell(20, "alice._objects")
        print(alice._objects)

        # Section 3.2 - pointer chain operations: move
        cell(21, "x = torch.tensor([1,2,3,4,5]).send(bob)")
        x = torch.tensor([1, 2, 3, 4, 5]).send(bob)

        cell(22, "print('  bob:', bob._objects); print('alice:', alice._objects)")
        print("  bob:", bob._objects)
        print("alice:", alice._objects)

        cell(23, "x = x.move(alice)")
        x = x.move(alice)

        cell(24, "print('  bob:', bob._objects); print('alice:', alice._objects)")
        print("  bob:", bob._objects)
        print("alice:", alice._objects)

        cell(25, "x")
        print(x)
        print(f"\n(bob ran as pid {bob.pid}, alice as pid {alice.pid})")


if __name__ == "__main__":
    main()
