"""PySyft Part 8, "introduction to plans", on real worker processes.

Run it as it stands::

    python examples/07_plans.py

A plan is a function or a module traced once into a list of allow-listed torch ops. Sent to a
worker, it runs there on pointers in one message: the worker executes its ops one by one through
the same allow-list and ownership checks as any single op. Nothing is pickled; the plan's
parameters (and its ``state``) are sent like a model's. The cells follow the tutorial; only the
import and the worker lines differ (``device_1`` and ``device_2`` are worker processes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import zmqsyft as sy

hook = sy.TorchHook(torch)
hook.local_worker.is_client_worker = False  # (the tutorial's line: nothing to change here)


def cell(n: int, text: str) -> None:
    print(f"\nIn [{n}]: {text}")


def messages_in(worker: sy.WorkerClient) -> int:
    return sum(p["messages_in"] for p in worker.stats()["peers"].values())


def main() -> None:
    x11 = torch.tensor([-1, 2.0]).tag("input_data")
    x12 = torch.tensor([1, -2.0]).tag("input_data2")
    x21 = torch.tensor([-1, 2.0]).tag("input_data")
    x22 = torch.tensor([1, -2.0]).tag("input_data2")
    device_1 = sy.VirtualWorker(hook, id="device_1", data=(x11, x12))
    device_2 = sy.VirtualWorker(hook, id="device_2", data=(x21, x22))

    cell(1, "@sy.func2plan(args_shape=[(1,)]) def plan_double_abs(x): ...")

    @sy.func2plan(args_shape=[(1,)])
    def plan_double_abs(x: torch.Tensor) -> torch.Tensor:
        x = x + x
        x = torch.abs(x)
        return x

    print(plan_double_abs.is_built)

    cell(2, "pointer_to_data = device_1.search('input_data')[0]; "
            "pointer_plan = plan_double_abs.send(device_1)")
    pointer_to_data = device_1.search("input_data")[0]
    pointer_plan = plan_double_abs.send(device_1)
    print(pointer_to_data)
    print(pointer_plan)

    cell(3, "pointer_to_result = pointer_plan(pointer_to_data); pointer_to_result.get()")
    pointer_to_result = pointer_plan(pointer_to_data)
    print(pointer_to_result)
    print(pointer_to_result.get())

    cell(4, "class Net(sy.Plan): ... net.build(torch.tensor([1., 2.]))")

    class Net(sy.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(2, 3)
            self.fc2 = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.fc1(x))
            x = self.fc2(x)
            return F.log_softmax(x, dim=0)

    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        here = net(torch.tensor([-1, 2.0]))
    print(net, "  (here:", here, ")")

    cell(5, "pointer_to_net_1 = net.send(device_1); "
            "pointer_to_result = pointer_to_net_1(device_1.search('input_data')[0]); .get()")
    pointer_to_net_1 = net.send(device_1)
    pointer_to_data = device_1.search("input_data")[0]
    before = messages_in(device_1)
    pointer_to_result = pointer_to_net_1(pointer_to_data)
    sent = messages_in(device_1) - before - 1  # (less this stats() request)
    (trace,) = pointer_to_net_1._traces.values()
    print(pointer_to_result.get())
    print(f"(its {len(trace.ops)} ops reached device_1 in {sent} message, and each was checked "
          "there against the allow-list)")

    cell(6, "pointer_to_net_2 = net.send(device_2); "
            "pointer_to_net_2(device_2.search('input_data')[0]).get()")
    pointer_to_net_2 = net.send(device_2)
    print(pointer_to_net_2(device_2.search("input_data")[0]).get())

    cell(7, "@sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),)) def plan_abs(x, state)")

    @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1.0]),))
    def foo_func(x: torch.Tensor, state: sy.PlanState) -> torch.Tensor:
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    pointer_plan = foo_func.send(device_1)
    print(pointer_plan(torch.tensor([-1.0]).send(device_1)).get())

    for worker in (device_1, device_2):
        worker.close()


if __name__ == "__main__":
    main()
