#!/usr/bin/env python
"""One federated-averaging round with N data owners: zmqsyft against torch.distributed.rpc.

    python benchmarks/bench_scale.py                        # N = 2, 8, 32, 64; 7 timed rounds
    python benchmarks/bench_scale.py --quick                # smoke mode: N = 2, 2 rounds
    python benchmarks/bench_scale.py --n 2,8 --rounds 5 --json out.json
    python benchmarks/bench_scale.py --systems zmqsyft,rpc-passive   # leave one system out

The model is an MLP 784-1024-256-10 (1,068,810 float32 parameters, 4.1 MiB), the same for every
system. Each data owner holds one batch of 64 samples (784 features, 10 classes), drawn from a
generator seeded by the owner's index, the same in every system, and put on the owner once,
before anything is timed. One round, timed from the driver's first call to the average in hand:

zmqsyft  N owners and an aggregator are worker processes (``sy.spawn_workers`` when the
         library has it, else ``sy.spawn_worker`` in a loop). For each owner in turn:
         ``m = model.copy().send(owner)``, ``opt = SGD(m.parameters())``, ``opt.zero_grad()``,
         ``F.cross_entropy(m(x), y).backward()``, ``opt.step()``: every op runs on the owner and
         is pipelined (the driver does not wait for owner i's step before sending the model to
         owner i+1, so the owners train concurrently); then ``sy.move_all(models, aggregator)``
         (each owner pushes its parameters straight to the aggregator, all the moves in flight
         together; ``m.move(aggregator)`` for each owner in turn where the library has no
         ``move_all``), then on the
         aggregator ``torch.stack([...]).mean(0)`` per parameter and ``.get()`` of each average.
rpc      torch.distributed.rpc with the TensorPipe backend: the driver is rank 0, the aggregator
         rank 1, the owners ranks 2..N+1 (subprocesses of this script). The driver
         ``rpc_async``s the model's ``state_dict()`` to every owner at once; each owner loads it
         into its own copy of the model, does the same SGD step and sends its updated
         ``state_dict`` to the aggregator (``@rpc.functions.async_execution``: the owner returns
         the future of its ``rpc_async`` to the aggregator, so no thread waits); when every owner
         is done the driver ``rpc_sync``s the aggregator for the average (the same
         ``torch.stack(...).mean(0)`` per parameter, computed there). Before timing, each owner
         calls the aggregator once, one owner after the other, so that its connection there is
         made. If ``init_rpc`` fails with TensorPipe's default transports (at N = 48 on this
         2-CPU machine: every rank connects to the all-gather leader at once and the shared-
         memory transport's connect fails with EAGAIN), the suite is run once more with
         ``_transports=["uv"]`` (tcp), and the output says so. The suite and its ranks run with
         the environment as given: torch's OpenMP threads spin for a while after each parallel
         region (OMP_WAIT_POLICY unset) unless the environment says otherwise.
rpc-passive
         the rpc suite with ``OMP_WAIT_POLICY=PASSIVE`` in the environment of the suite's
         process (the driver) and of every rank from its start (before torch is imported): idle
         OpenMP threads sleep. zmqsyft starts its spawned workers and its fork server so unless
         the environment sets OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME, and its driver,
         the suite's process, is given OMP_WAIT_POLICY=PASSIVE as rpc-passive's is (a user's
         choice: a library cannot set it once torch is imported); with more busy processes than
         CPUs spinning threads take the CPU from busy ones, so rpc is measured both ways. The
         policy each process of each system started with is read from ``/proc/PID/environ`` and
         printed.

In every system the average is loaded into the driver's model after each round (the next round
trains from it), and the first round's average is checked against the same round computed
locally.

Per N the script prints two tables. Time per round: each system's median of the timed rounds
(after warm-up rounds) [min-max]; zmqsyft / each rpc variant (``zs/rpc``, ``zs/rpc-p``) and
``zs/best``, zmqsyft / the faster of the two rpc variants at that N, on which the goal (<= 0.50:
PASS, else MISS) is judged. CPU and resources, per system:

- CPU ms/round: the CPU time of all the system's processes (utime + stime from
  ``/proc/PID/stat``, all threads: the driver, the aggregator, every owner, and any other
  process below the driver, i.e. zmqsyft's fork server), read before the first timed round and
  after the last (the untimed work between rounds included), / the number of timed rounds
  (resolution 1/CLK_TCK = 10 ms per process per reading). With more busy processes than CPUs a
  round's wall time follows it, and other load on the machine disturbs it less than wall time.
- CPU zs/rpc: zmqsyft's CPU time / the smaller of the rpc variants'.
- start-up s: from the first spawn until all N+1 processes answered (zmqsyft, every worker
  answered a ping; rpc, ``init_rpc`` returned on the driver and every rank answered an
  ``rpc_sync``).
- USS/owner MiB, USS aggr MiB: the memory of each worker process, its USS (``Private_Clean +
  Private_Dirty`` from ``/proc/PID/smaps_rollup``) after the rounds, the median over the owners,
  and the aggregator's.

Then the CPU time per round by process, per system: driver / aggregator / all owners / other
(ms). It then fits time per round = intercept + slope x N (least squares, each system), and
compares the slope with the per-owner transfer cost, measured separately with the same workers:
zmqsyft, ``model.copy().send(owner)`` (the model to one owner) and ``m.move(aggregator)`` (one
update to the aggregator); rpc, one ``rpc_sync`` of the ``state_dict`` to an owner and one from
an owner to the aggregator; and with the cost of one local training step (the owners' compute,
which the 2-CPU machine cannot run in parallel for more than 2 owners). ``--json FILE`` writes
every raw sample (each suite's round times, CPU time by process, policies, ...) and the summary.

``--systems`` runs some of zmqsyft, rpc, rpc-passive (default all three); a system left out has
no column and no ratio; with one rpc variant there is no ``zs/best`` and the goal is judged
against that one.

A (system, N) runs only if N+1 processes of the owners' median USS measured at a smaller N for
that system (300 MiB before the first measurement) + 10%, 16 MiB per update the aggregator holds
and 1.5 GiB fit in ``MemAvailable``; otherwise it is reported as skipped, with the figures, so
that the largest N this machine holds shows.

Each (system, N) runs in a child process of its own (a "suite", leading a new session) with a
deadline; on overrun its whole process group is killed. Every process a suite starts is its
child, dies with it (``PR_SET_PDEATHSIG``; zmqsyft workers watch their parent) and is reaped in
a ``finally``. The systems never run at the same time, so they never share the CPUs or memory;
their order alternates from one N to the next. Only loopback: ipc sockets in private temporary
directories and ``127.0.0.1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

HERE = os.path.abspath(__file__)
SYSTEMS = ("zmqsyft", "rpc", "rpc-passive")
RPC_SYSTEMS = ("rpc", "rpc-passive")
# a system's environment, added to ours in its suite child (and so in every process it starts)
# the driver's threads sleep when idle too, in zmqsyft's suite as in rpc-passive's (the library
# sets it for the workers it spawns; the driver's environment is its user's to choose)
SYSTEM_ENV = {"rpc-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
              "zmqsyft": {"OMP_WAIT_POLICY": "PASSIVE"}}
SAMPLES, FEATURES, CLASSES, HIDDEN = 64, 784, 10, (1024, 256)
LR = 0.1
TOLERANCE = 1e-5  # first round's average against the local computation
# a (system, N) runs only if N+1 processes of the owners' USS measured at a smaller N (this,
# before the first measurement) + 10%, the updates the aggregator holds and MARGIN_MIB fit in
# MemAvailable: no OOM killer on a shared machine
DEFAULT_PROCESS_MIB = 300.0
UPDATE_MIB = 16.0
MARGIN_MIB = 1536.0

warnings.filterwarnings("ignore", message="The given buffer is not writable")
warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")

from bench import (  # noqa: E402
    _pdeathsig,
    close_workers,
    cpu_times,
    free_port,
    machine_info,
    stop_rpc,
    suite_result,
    write_report,
)


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================ shared
def make_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]),
                         nn.ReLU(), nn.Linear(HIDDEN[1], CLASSES))


def owner_data(i: int) -> tuple[Any, Any]:
    """Owner ``i``'s batch: the same in every process."""
    import torch

    g = torch.Generator().manual_seed(7_919 * (i + 1))
    return (torch.randn(SAMPLES, FEATURES, generator=g),
            torch.randint(0, CLASSES, (SAMPLES,), generator=g))


def local_step(model: Any, x: Any, y: Any) -> Any:
    """One SGD step on ``model`` itself (the reference, and the per-owner compute cost)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model


def reference_average(model: Any, n: int) -> dict[str, Any]:
    import copy

    import torch

    states = []
    for i in range(n):
        m = local_step(copy.deepcopy(model), *owner_data(i))
        states.append({k: v.detach() for k, v in m.state_dict().items()})
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def uss_mib(pid: int | None) -> float | None:
    """Unique set size of ``pid``: Private_Clean + Private_Dirty from smaps_rollup, MiB."""
    if pid is None:
        return None
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return None
    return total / 1024


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all its threads) ``pid`` has used: /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # (after the name, which may hold ")")
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14, 15
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, theirs, ...), from /proc/PID/stat's ppid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_policy(pid: int) -> str:
    """OMP_WAIT_POLICY in the environment ``pid`` started with ("unset" if absent)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"OMP_WAIT_POLICY="):
                    return item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        return "?"
    return "unset"


class CpuMeter:
    """CPU time of every process of a system: the driver (this process), its named workers or
    ranks, and any other process below this one (zmqsyft's fork server), by role."""

    def __init__(self, aggregator: int | None, owners: list[int | None]) -> None:
        me = os.getpid()
        self.roles: dict[str, list[int]] = {"driver": [me],
                                            "aggregator": [aggregator] if aggregator else [],
                                            "owners": [p for p in owners if p]}
        named = {q for pids in self.roles.values() for q in pids}
        self.roles["other"] = [q for q in descendants(me) if q not in named]
        self.missing = len(owners) + 1 - len(self.roles["owners"]) - len(self.roles["aggregator"])

    def snapshot(self) -> dict[str, float]:
        return {role: sum(c for c in (cpu_s(q) for q in pids) if c is not None)
                for role, pids in self.roles.items()}

    def policies(self) -> dict[str, list[str]]:
        return {role: sorted({wait_policy(q) for q in pids}) for role, pids in self.roles.items()
                if pids}


def max_diff(avg: dict[str, Any], ref: dict[str, Any]) -> float:
    return max((avg[k] - ref[k]).abs().max().item() for k in ref)


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter_ns()
    out = fn(*args)
    return (time.perf_counter_ns() - t0) / 1e9, out


class Out:
    """A suite's results, written to its JSON file after every figure (a killed suite still
    reports what it measured)."""

    def __init__(self, path: str, system: str, n: int) -> None:
        self.path = path
        self.data: dict[str, Any] = {"system": system, "n": n, "notes": []}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f)
        os.replace(self.path + ".tmp", self.path)


def run_rounds(label: str, one_round: Any, model: Any, ref: dict[str, Any], out: Out,
               warmup: int, rounds: int, meter: CpuMeter, after: Any = None) -> None:
    """Time ``one_round(r)`` (it returns the average) ``warmup + rounds`` times, ``after()``
    untimed after each; the first average is checked against ``ref``, each is loaded into
    ``model`` for the next round, and the timed ones are recorded as ``round_s``. ``meter``
    reads the CPU time of the system's processes before the first timed round and after the
    last (with its ``after()`` and loading): ``cpu_round_s`` is the difference / ``rounds``."""
    out.set("omp_wait_policy", meter.policies())
    out.set("cpu_processes", {role: len(pids) for role, pids in meter.roles.items()})
    if meter.missing:
        out.data["notes"].append(f"CPU time: {meter.missing} worker pid(s) unknown, not counted")
    times: list[float] = []
    cpu0: dict[str, float] = {}
    for r in range(warmup + rounds):
        if r == warmup:
            cpu0 = meter.snapshot()
        dt, avg = timed(one_round, r)
        if after is not None:
            after()
        if r == 0:
            out.set("check_max_diff", max_diff(avg, ref))
        model.load_state_dict(avg)
        if r >= warmup:
            times.append(dt)
            out.set("round_s", times)
    cpu1 = meter.snapshot()
    split = {role: (cpu1[role] - cpu0[role]) / rounds for role in cpu1}
    out.set("cpu_split_s", split)
    out.set("cpu_round_s", sum(split.values()))
    log(f"{label}: rounds {[f'{t * 1e3:.0f}' for t in times]} ms, CPU "
        f"{out.data['cpu_round_s'] * 1e3:.0f} ms per round")


def local_costs(out: Out, reps: int) -> None:
    """One local SGD step of the model on one owner's batch: the per-owner compute."""
    model = make_model()
    x, y = owner_data(0)
    local_step(model, x, y)
    out.set("local_step_s", [timed(local_step, model, x, y)[0] for _ in range(reps)])


# ================================================================================ zmqsyft
def suite_zmqsyft(n: int, rounds: int, warmup: int, reps: int, timeout: float, out: Out) -> None:
    import torch
    import torch.nn.functional as F

    import zmqsyft as sy

    sy.TorchHook(torch)
    sy.configure(timeout=timeout, spawn_timeout=timeout)
    handles: list[Any] = []
    try:
        t0 = time.perf_counter_ns()
        spawn_many = getattr(sy, "spawn_workers", None)
        if spawn_many is not None:
            owners = list(spawn_many(n, prefix="owner"))
            out.data["notes"].append("workers started with sy.spawn_workers")
        else:
            owners = [sy.spawn_worker(f"owner{i}") for i in range(n)]
        handles += owners
        aggregator = sy.spawn_worker("aggregator")
        handles.append(aggregator)
        for w in handles:
            w.ping()
        out.set("startup_s", (time.perf_counter_ns() - t0) / 1e9)
        log(f"zmqsyft n={n}: {n + 1} workers up in {out.data['startup_s']:.1f}s")

        data = [(x.send(w), y.send(w)) for w, (x, y) in
                zip(owners, (owner_data(i) for i in range(n)), strict=True)]
        sy.sync()
        model = make_model()
        ref = reference_average(model, n)

        move_all = getattr(sy, "move_all", None)
        if move_all is not None:
            out.data["notes"].append("updates moved with sy.move_all (all in flight together)")

        def fedavg_round() -> dict[str, Any]:
            trained = []
            for w, (x, y) in zip(owners, data, strict=True):
                m = model.copy().send(w)
                opt = torch.optim.SGD(m.parameters(), lr=LR)
                opt.zero_grad()
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                trained.append(m)
            if move_all is not None:
                move_all(trained, aggregator)
            else:
                for m in trained:
                    m.move(aggregator)
            names = [k for k, _ in trained[0].named_parameters()]
            params = [list(m.parameters()) for m in trained]
            with torch.no_grad():
                means = [torch.stack([p[j] for p in params]).mean(0) for j in range(len(names))]
            return {k: avg.get() for k, avg in zip(names, means, strict=True)}

        # (untimed after each: the deletes of the round's pointers are done)
        meter = CpuMeter(aggregator.pid, [w.pid for w in owners])
        run_rounds(f"zmqsyft n={n}", lambda r: fedavg_round(), model, ref, out, warmup, rounds,
                   meter, after=sy.sync)
        out.set("uss_owner_mib", [uss_mib(w.pid) for w in owners])
        out.set("uss_aggregator_mib", uss_mib(aggregator.pid))

        # the per-owner transfers, alone: the model to one owner, one update to the aggregator
        sends, moves = [], []
        for r in range(1 + reps):
            ts, m = timed(model.copy().send, owners[0])
            tm, _ = timed(m.move, aggregator)
            del m
            sy.sync()
            if r:
                sends.append(ts)
                moves.append(tm)
        out.set("send_model_s", sends)
        out.set("move_update_s", moves)
        data.clear()
    finally:
        close_workers(handles)


# ================================================================================ torch rpc
# Run by the rpc ranks; module-level so that rpc pickles them by name (every rank runs this
# file as __main__).
_OWNER: dict[str, Any] = {}
_UPDATES: dict[int, dict[str, Any]] = {}


def rpc_pid() -> int:
    return os.getpid()


def rpc_uss() -> float | None:
    return uss_mib(os.getpid())


def owner_load(i: int, x: Any, y: Any) -> None:
    """The owner's data (sent once, before timing) and its copy of the model."""
    _OWNER.update(index=i, x=x, y=y, model=make_model())


def _train(state: dict[str, Any]) -> dict[str, Any]:
    model = _OWNER["model"]
    model.load_state_dict(state)
    local_step(model, _OWNER["x"], _OWNER["y"])
    return {k: v.detach() for k, v in model.state_dict().items()}


def _async_execution(fn: Any) -> Any:
    import torch.distributed.rpc as rpc

    return rpc.functions.async_execution(fn)


@_async_execution
def owner_train(state: dict[str, Any], round_: int) -> Any:
    """One SGD step from ``state``; the update goes straight to the aggregator."""
    import torch.distributed.rpc as rpc

    return rpc.rpc_async("aggregator", agg_put, args=(round_, _OWNER["index"], _train(state)))


def agg_put(round_: int, i: int, update: dict[str, Any]) -> None:
    _UPDATES[i] = update


def agg_average(n: int) -> dict[str, Any]:
    import torch

    if len(_UPDATES) != n:
        raise RuntimeError(f"the aggregator has {len(_UPDATES)} updates, not {n}")
    updates = [_UPDATES.pop(i) for i in range(n)]
    return {k: torch.stack([u[k] for u in updates]).mean(0) for k in updates[0]}


def owner_hello() -> int:
    """On an owner: one call to the aggregator (its connection there is made before timing)."""
    import torch.distributed.rpc as rpc

    return rpc.rpc_sync("aggregator", rpc_pid)


def rpc_sink(state: dict[str, Any]) -> None:
    return None


def owner_push(state: dict[str, Any]) -> float:
    """On an owner: send ``state`` to the aggregator once; the time it took."""
    import torch.distributed.rpc as rpc

    return timed(rpc.rpc_sync, "aggregator", rpc_sink, (state,))[0]


RPC_TRANSPORTS_ENV = "BENCH_SCALE_RPC_TRANSPORTS"


def rpc_name(rank: int) -> str:
    return "driver" if rank == 0 else "aggregator" if rank == 1 else f"owner{rank - 2}"


def _rpc_init(rank: int, world: int, timeout: float) -> None:
    import torch.distributed.rpc as rpc

    transports = os.environ.get(RPC_TRANSPORTS_ENV)  # (set for a retry over tcp only)
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=16, rpc_timeout=timeout,
                                           init_method="env://",
                                           _transports=transports.split(",") if transports else None)
    rpc.init_rpc(rpc_name(rank), rank=rank, world_size=world, rpc_backend_options=opts)


def rpc_rank_main(rank: int, world: int, timeout: float) -> int:
    import torch.distributed.rpc as rpc

    _rpc_init(rank, world, timeout)
    rpc.shutdown(graceful=True, timeout=timeout)
    return 0


def suite_rpc(n: int, rounds: int, warmup: int, reps: int, timeout: float, out: Out,
              label: str = "rpc") -> None:
    import torch
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), TP_SOCKET_IFNAME="lo",
                      GLOO_SOCKET_IFNAME="lo")
    world = n + 2
    procs: list[subprocess.Popen] = []
    initialised = clean = False
    try:
        t0 = time.perf_counter_ns()
        for rank in range(1, world):
            procs.append(subprocess.Popen(
                [sys.executable, HERE, "--_rpc-rank", str(rank), "--_world", str(world),
                 "--_timeout", str(timeout)], stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig))
        _rpc_init(0, world, timeout)  # the rendezvous: every rank joined
        initialised = True
        names = [rpc_name(r) for r in range(1, world)]
        torch.futures.wait_all([rpc.rpc_async(name, rpc_pid) for name in names])
        out.set("startup_s", (time.perf_counter_ns() - t0) / 1e9)
        log(f"{label} n={n}: {n + 1} ranks up in {out.data['startup_s']:.1f}s")

        owners = names[1:]
        torch.futures.wait_all([rpc.rpc_async(name, owner_load, args=(i, *owner_data(i)))
                                for i, name in enumerate(owners)])
        for name in owners:  # one by one: not N connections to the aggregator at once
            rpc.rpc_sync(name, owner_hello)
        model = make_model()
        ref = reference_average(model, n)

        def fedavg_round(round_: int) -> dict[str, Any]:
            state = model.state_dict()
            torch.futures.wait_all([rpc.rpc_async(name, owner_train, args=(state, round_))
                                    for name in owners])
            return rpc.rpc_sync("aggregator", agg_average, args=(n,))

        meter = CpuMeter(procs[0].pid, [p.pid for p in procs[1:]])
        run_rounds(f"{label} n={n}", fedavg_round, model, ref, out, warmup, rounds, meter)
        out.set("uss_owner_mib", [uss_mib(p.pid) for p in procs[1:]])
        out.set("uss_aggregator_mib", uss_mib(procs[0].pid))

        state = model.state_dict()
        sends, moves = [], []
        for r in range(1 + reps):
            ts, _ = timed(rpc.rpc_sync, owners[0], rpc_sink, (state,))
            tm = rpc.rpc_sync(owners[0], owner_push, args=(state,))
            if r:
                sends.append(ts)
                moves.append(tm)
        out.set("send_model_s", sends)
        out.set("move_update_s", moves)
        rpc.shutdown(graceful=True, timeout=timeout)
        clean = True
    finally:
        stop_rpc(rpc, initialised, clean, procs, timeout)
        for p in procs:  # (reap kills only on overrun; a failed shutdown leaves them waiting)
            if p.poll() is None:
                p.kill()
                p.wait()


# ================================================================================ orchestration
def run_suite_child(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Out(args._out, args._suite, args._n)
    try:
        for var, value in SYSTEM_ENV.get(args._suite, {}).items():
            if os.environ.get(var) != value:  # (run_suite sets it, before torch is imported)
                raise RuntimeError(f"{args._suite} needs {var}={value} in its environment")
        local_costs(out, args.reps)
        if args._suite == "zmqsyft":
            suite_zmqsyft(args._n, args.rounds, args.warmup, args.reps, args._timeout, out)
        else:
            suite_rpc(args._n, args.rounds, args.warmup, args.reps, args._timeout, out,
                      label=args._suite)
    except BaseException as exc:
        out.data["notes"].append(f"failed: {type(exc).__name__}: {exc}"[:500])
        out.set("failed", True)
        raise
    return 0


def run_suite(system: str, n: int, args: argparse.Namespace,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one (system, N) in a child process leading its own session; kill its process group
    on overrun or on any interruption."""
    fd, path = tempfile.mkstemp(prefix=f"scale-{system}-{n}-", suffix=".json")
    os.close(fd)
    timeout = args.timeout + 4 * n  # a request deadline: start-up of many processes on 2 CPUs
    cmd = [sys.executable, HERE, "--_suite", system, "--_n", str(n), "--_out", path,
           "--_timeout", str(timeout), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
           "--reps", str(args.reps)]
    deadline = args.suite_timeout + 10 * n
    log(f"{system} n={n}: starting")
    cpu0 = cpu_times()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, **SYSTEM_ENV.get(system, {}), **(env or {})))
    code: int | None = None
    try:
        code = proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        pass
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the suite and anything it left behind
        proc.wait()
    res = suite_result(path, {"system": system, "n": n, "notes": []}, code, deadline)
    res["ok"] = code == 0 and "round_s" in res
    res["seconds"] = time.monotonic() - t0
    cpu1 = cpu_times()
    res["foreign_cpu"] = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[2] - cpu0[2]))
    log(f"{system} n={n}: {'done' if res['ok'] else 'FAILED'} in {res['seconds']:.1f}s")
    return res


def mem_available_mib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    return None


def med(v: Any) -> float | None:
    return statistics.median(v) if v else None


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares line through (N, seconds): (slope, intercept)."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def ms(v: float | None, width: int = 0) -> str:
    if v is None:
        return "—".rjust(width)
    x = v * 1e3
    text = f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"
    return text.rjust(width)


def mib(v: Any) -> str:
    return "—" if v is None else f"{v:.0f}"


SHORT = {"zmqsyft": "zs", "rpc": "rpc", "rpc-passive": "rpc-p"}


def split_text(split: dict[str, float] | None) -> str:
    if not split:
        return "—"
    return "/".join(ms(split.get(role)) for role in ("driver", "aggregator", "owners", "other"))


def render(results: dict[int, dict[str, dict[str, Any]]], ns: list[int],
           systems: list[str]) -> tuple[str, dict[str, Any]]:
    out: list[str] = []
    summary: dict[str, Any] = {"systems": systems, "per_n": {}, "fit": {}, "transfer": {},
                               "omp_wait_policy": {}}
    rpcs = [s for s in RPC_SYSTEMS if s in systems]
    both = "/".join(SHORT[s] for s in systems)

    def cell(r: dict[str, Any]) -> str:
        t = r.get("round_s") or []
        if t:
            return f"{ms(med(t))} [{ms(min(t))}-{ms(max(t))}]"
        return "not run" if not r else "skipped (memory)" if r.get("skipped") else "failed"

    def per(row: dict[str, Any], fmt: Any) -> str:
        return "/".join(fmt(row.get(s, {})) for s in systems)

    def dash(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    ratio_heads = [f"zs/{SHORT[s]}" for s in rpcs] + (["zs/best"] if len(rpcs) > 1 else [])
    head = (f"{'N':>4}  " + "  ".join(f"{s + ' ms/round':>24}" for s in systems) + "  "
            + "  ".join(f"{h:>7}" for h in ratio_heads) + f"  {'goal':>5}")
    out += ["time per round: median of the timed rounds [min-max]; zs/X = zmqsyft / X; goal: "
            "zmqsyft / the faster rpc at that N <= 0.50", head]
    cpu_heads = [f"CPU ms/round {both}", "CPU zs/rpc", f"start-up s {both}",
                 f"USS/owner MiB {both}", f"USS aggr MiB {both}"]
    cpu_head = f"{'N':>4}  " + "  ".join(cpu_heads)
    cpu_rows = ["", "CPU per round: CPU time of all the system's processes (driver, workers or "
                "ranks) over the timed rounds / rounds; CPU zs/rpc: against the rpc using less; "
                "USS: median over the owners", cpu_head]
    split_rows = ["", "CPU per round by process, ms: driver / aggregator / all owners / other "
                  "(zmqsyft's fork server)"]
    for n in ns:
        row = results.get(n, {})
        t = {s: med(row.get(s, {}).get("round_s")) for s in systems}
        cpu = {s: row.get(s, {}).get("cpu_round_s") for s in systems}
        z = t.get("zmqsyft")
        vs = {s: z / t[s] if z and t[s] else None for s in rpcs}
        timed_rpcs = [s for s in rpcs if t[s]]
        best = min(timed_rpcs, key=lambda s: t[s] or 0.0) if timed_rpcs else None
        ratio = vs[best] if best else None
        verdict = "—" if ratio is None else "PASS" if ratio <= 0.5 else "MISS"
        ratios = [vs[s] for s in rpcs] + ([ratio] if len(rpcs) > 1 else [])
        out.append(f"{n:>4}  " + "  ".join(f"{cell(row.get(s, {})):>24}" for s in systems) + "  "
                   + "  ".join(f"{dash(r, '.2f'):>7}" for r in ratios) + f"  {verdict:>5}")
        cpu_rpcs = [cpu[s] for s in rpcs if cpu[s]]
        cpu_z = cpu.get("zmqsyft")
        cpu_ratio = cpu_z / min(cpu_rpcs) if cpu_z and cpu_rpcs else None
        uss_owner = {s: med([u for u in row.get(s, {}).get("uss_owner_mib") or [] if u])
                     for s in systems}
        cells = [per(row, lambda r: ms(r.get("cpu_round_s"))), dash(cpu_ratio, ".2f"),
                 per(row, lambda r: dash(r.get("startup_s"), ".1f")),
                 "/".join(mib(uss_owner[s]) for s in systems),
                 per(row, lambda r: mib(r.get("uss_aggregator_mib")))]
        cpu_rows.append(f"{n:>4}  " + "  ".join(
            c.rjust(len(h)) for c, h in zip(cells, cpu_heads, strict=True)))
        split_rows.append(f"{n:>4}  " + "   ".join(
            f"{s} {split_text(row.get(s, {}).get('cpu_split_s'))}" for s in systems))
        summary["per_n"][n] = {
            "round_s": t, "zmqsyft_s": z, "rpc_s": t.get("rpc"),
            "rpc_passive_s": t.get("rpc-passive"), "best_rpc": best, "ratio": ratio,
            "ratio_vs": vs, "goal": verdict, "cpu_round_s": cpu, "cpu_ratio": cpu_ratio,
            "cpu_split_s": {s: row.get(s, {}).get("cpu_split_s") for s in systems},
            "startup_s": {s: row.get(s, {}).get("startup_s") for s in systems},
            "uss_owner_mib": uss_owner,
            "uss_aggregator_mib": {s: row.get(s, {}).get("uss_aggregator_mib") for s in systems}}
    out += cpu_rows + split_rows
    policies: dict[str, dict[str, set[str]]] = {}
    for n in ns:
        for s in systems:
            seen = results.get(n, {}).get(s, {}).get("omp_wait_policy") or {}
            for role, values in seen.items():
                policies.setdefault(s, {}).setdefault(role, set()).update(values)
    summary["omp_wait_policy"] = {s: {role: sorted(v) for role, v in roles.items()}
                                  for s, roles in policies.items()}
    out.append("OMP_WAIT_POLICY each process started with (/proc/PID/environ): " + "; ".join(
        f"{s}: " + ", ".join(f"{role} {'|'.join(sorted(v))}" for role, v in roles.items())
        for s, roles in policies.items()))
    out.append("")
    out.append("time per round against N: least-squares line, and the per-owner costs measured "
               "alone (medians)")
    for s in systems:
        pts = [(n, med(results[n][s]["round_s"])) for n in ns
               if results.get(n, {}).get(s, {}).get("round_s")]
        line = fit(pts)  # type: ignore[arg-type]
        sends = [v for n in ns for v in results.get(n, {}).get(s, {}).get("send_model_s") or []]
        moves = [v for n in ns for v in results.get(n, {}).get(s, {}).get("move_update_s") or []]
        steps = [v for n in ns for v in results.get(n, {}).get(s, {}).get("local_step_s") or []]
        per_owner = (med(sends) or 0) + (med(moves) or 0)
        growth = ""
        if len(pts) >= 2 and pts[0][1] > 0:
            (n0, t0), (n1, t1) = pts[0], pts[-1]
            growth = f"; t({n1})/t({n0}) = {t1 / t0:.1f} for N x{n1 / n0:.0f}"
        if line:
            slope, icpt = line
            out.append(f"  {s:11} slope {ms(slope)} ms per owner, intercept {ms(icpt)} ms{growth}")
        else:
            out.append(f"  {s:11} (fewer than 2 N measured: no line)")
        out.append(f"  {'':11} per-owner transfer: model to an owner {ms(med(sends))} ms + update "
                   f"to the aggregator {ms(med(moves))} ms = {ms(per_owner)} ms; one local "
                   f"training step {ms(med(steps))} ms"
                   + (f"; slope / transfer = {line[0] / per_owner:.2f}" if line and per_owner
                      else ""))
        summary["fit"][s] = {"slope_s": line[0] if line else None,
                             "intercept_s": line[1] if line else None}
        summary["transfer"][s] = {"send_model_s": med(sends), "move_update_s": med(moves),
                                  "per_owner_s": per_owner, "local_step_s": med(steps)}
    checks = []
    for n in ns:
        for s in systems:
            d = results.get(n, {}).get(s, {}).get("check_max_diff")
            if d is not None:
                checks.append((n, s, d))
    worst = max((d for _, _, d in checks), default=None)
    out.append("")
    out.append(f"check: first round's average against the same round computed locally, max "
               f"|difference| {worst if worst is None else f'{worst:.1e}'} over "
               f"{len(checks)} runs (<= {TOLERANCE:g}: "
               f"{'OK' if worst is not None and worst <= TOLERANCE else 'FAIL'})")
    summary["check_max_diff"] = worst
    notes = [f"{s} n={n}: {note}" for n in ns for s in systems
             for note in results.get(n, {}).get(s, {}).get("notes", [])]
    if notes:
        out.append("notes:")
        out += [f"  {note}" for note in notes]
    return "\n".join(out), summary


def zmqsyft_path() -> str:
    import zmqsyft

    return os.path.dirname(os.path.dirname(os.path.abspath(zmqsyft.__file__)))


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    info = machine_info()
    load0 = os.getloadavg()
    cpu0 = cpu_times()
    t_start = time.monotonic()
    results: dict[int, dict[str, dict[str, Any]]] = {}
    systems = args.systems
    per_process = {s: DEFAULT_PROCESS_MIB for s in systems}  # MiB, updated as measured
    measured: dict[str, float] = {}
    for k, n in enumerate(args.n):
        order = systems if k % 2 == 0 else systems[::-1]
        results[n] = {}
        for s in order:
            need = (n + 1) * per_process[s] * 1.1 + n * UPDATE_MIB + MARGIN_MIB
            have = mem_available_mib()
            if have is not None and need > have:
                note = (f"skipped: {n + 1} processes need about {need / 1024:.1f} GiB "
                        f"({per_process[s]:.0f} MiB each as measured at a smaller N, + 10%, + "
                        f"{UPDATE_MIB:.0f} MiB per update held, + {MARGIN_MIB / 1024:.1f} GiB), "
                        f"{have / 1024:.1f} GiB available")
                log(f"{s} n={n}: {note}")
                results[n][s] = {"system": s, "n": n, "ok": False, "skipped": True,
                                 "notes": [note]}
                continue
            res = results[n][s] = run_suite(s, n, args)
            if s in RPC_SYSTEMS and not res["ok"] and "startup_s" not in res:
                # TensorPipe's default transport for local peers (shm) can refuse a burst of
                # connections (init_rpc's all-gather: every rank connects to one leader at
                # once: "connect: Resource temporarily unavailable"); try once more over tcp
                why = "; ".join(res.get("notes", []))[:300]
                log(f"{s} n={n}: start-up failed ({why}); once more with TensorPipe over tcp (uv)")
                res = results[n][s] = run_suite(s, n, args, env={RPC_TRANSPORTS_ENV: "uv"})
                res["notes"].insert(0, f"TensorPipe over tcp (_transports=['uv']): with its "
                                       f"default transports the start-up failed: {why}")
                res["transports"] = "uv"
            owner = med([u for u in res.get("uss_owner_mib") or [] if u])
            if owner:  # (the measured figure replaces the default guess)
                measured[s] = max(measured.get(s, 0.0), owner)
                per_process[s] = measured[s]
    total = time.monotonic() - t_start
    cpu1 = cpu_times()
    load1 = os.getloadavg()
    foreign = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[2] - cpu0[2]))
    ncpu = os.cpu_count() or 1
    table, summary = render(results, args.n, systems)
    print("\n".join([
        f"zmqsyft scale benchmark: one FedAvg round, N owners + an aggregator"
        f"{' (QUICK smoke mode)' if args.quick else ''}",
        f"date     {info['date']}",
        f"machine  {info['cpu']}, {info['cores']} CPUs, {info['memory_gib']} GiB, Linux {info['kernel']}",
        f"software python {info['python']}, torch {info['torch']}, pyzmq {info['pyzmq']} "
        f"(libzmq {info['libzmq']}), zmqsyft {info['zmqsyft']} from {zmqsyft_path()}",
        "command  " + " ".join([os.path.basename(sys.executable), os.path.relpath(HERE)] + sys.argv[1:]),
        f"model    MLP {FEATURES}-{HIDDEN[0]}-{HIDDEN[1]}-{CLASSES}, 1,068,810 float32 parameters "
        f"(4.1 MiB); each owner one batch of {SAMPLES}; SGD lr {LR}",
        f"reps     {args.rounds} timed rounds per system and N (+{args.warmup} warm-up); transfers "
        f"alone {args.reps} times; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} here",
        f"load     loadavg {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, {load1[0]:.2f} "
        f"{load1[1]:.2f} {load1[2]:.2f} at end; other processes used {foreign:.1f} CPU-s "
        f"({100 * foreign / (total * ncpu):.0f}% of the machine) during the {total:.0f} s run",
        "",
        table,
    ]), flush=True)
    if args.json:
        write_report(args.json, info, args, load0, load1, foreign, total, summary=summary,
                     results={str(n): r for n, r in results.items()})
    failed = any(not r.get("ok") and not r.get("skipped")
                 for row in results.values() for r in row.values())
    bad = summary["check_max_diff"] is None or summary["check_max_diff"] > TOLERANCE
    return 2 if failed else 1 if bad else 0


def parse_ns(text: str) -> list[int]:
    try:
        ns = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n takes comma-separated integers, not {text!r}") from None
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError("every N must be at least 1")
    return ns


def parse_systems(text: str) -> list[str]:
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(SYSTEMS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"--systems takes some of {','.join(SYSTEMS)}, not "
                                         f"{text!r}")
    return [s for s in SYSTEMS if s in chosen]  # (always in this order, alternated per N)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=parse_ns, default=None,
                    help="comma-separated numbers of data owners (default 2,8,32,64; quick: 2)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per system and N (default 7; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds first (default 2; quick: 1)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed per-owner transfers and local steps (default 9; quick: 2)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: N = 2, 2 rounds")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="request and start-up deadline inside a suite, seconds, plus 4 s per "
                         "owner (default 60)")
    ap.add_argument("--suite-timeout", type=float, default=300.0,
                    help="a (system, N) suite that overruns this, plus 10 s per owner, is killed "
                         "with everything it started (default 300)")
    ap.add_argument("--torch-threads", type=int, default=None, metavar="N",
                    help="OMP_NUM_THREADS/MKL_NUM_THREADS=N in every process (default: torch's "
                         "own choice)")
    ap.add_argument("--json", metavar="FILE", help="also write every raw sample as JSON")
    ap.add_argument("--systems", type=parse_systems, default=list(SYSTEMS),
                    help=f"comma-separated systems to run, of {','.join(SYSTEMS)} (default all)")
    ap.add_argument("--_suite", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--_rpc-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_world", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._rpc_rank is not None:
        return rpc_rank_main(args._rpc_rank, args._world, args._timeout)
    if args.n is None:
        args.n = [2] if args.quick else [2, 8, 32, 64]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.reps is None:
        args.reps = 2 if args.quick else 9
    if args.rounds < 1 or args.warmup < 0 or args.reps < 1:
        ap.error("--rounds and --reps must be at least 1, --warmup at least 0")
    if args._suite is not None:
        return run_suite_child(args)
    if args.torch_threads is not None:  # inherited by every process started from here
        if args.torch_threads < 1:
            ap.error("--torch-threads must be at least 1")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.torch_threads)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
