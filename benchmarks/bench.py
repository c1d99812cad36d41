#!/usr/bin/env python
"""zmqsyft vs torch.distributed.rpc (TensorPipe) vs bare pyzmq, on one machine, in one run.

    python benchmarks/bench.py                 # full run (a few minutes on 2 cores)
    python benchmarks/bench.py --quick         # smoke mode: every workload once, tiny sizes
    python benchmarks/bench.py --only zmqsyft,pyzmq --json out.json

Each system runs in its own child process (a "suite"), one after the other, so that they never
compete for the CPU and a crash or hang in one cannot take the others down. A suite's child
process leads a new session; the orchestrator kills that whole process group if the suite
overruns its deadline, and every process a suite starts itself is reaped in a ``finally`` (and
dies with its parent through ``PR_SET_PDEATHSIG``). Processes synchronise through handshakes
(ready lines on pipes, first replies), never through sleeps.

Systems
-------
zmqsyft    the library: ``x.send(bob)``, ``p + p``, ``p.get()``, ``p.move(alice)`` ...; every
           connection CURVE (the default), except the "(no CURVE)" rows' workers, spawned with
           ``Config(insecure=True)``: a second table gives what CURVE costs (W2, W4 over tcp)
rpc        ``torch.distributed.rpc`` with the TensorPipe backend: client rank 0, "bob" rank 1,
           "alice" rank 2 (subprocesses, MASTER_ADDR=127.0.0.1, a free port). Remote objects
           are kept in a dict on the owner and named by integer ids (the cheapest faithful
           equivalent of a pointer); ops are ``rpc_sync``/``rpc_async`` calls of small
           functions.
pyzmq      the floor for a Python request: a DEALER/ROUTER request/reply with a msgpack header
           and tensor bytes as separate frames (``copy=False``) to a small put/add/get server
           in a subprocess.

Rows of zmqsyft alone, reported beside the others (their ratios in a table of their own, without
targets), each checked for the right result before it counts:

secure aggregation   one round of PySyft Part 10 against a plaintext trusted-aggregator round
           (Part 4), for 100k float32 values per update (10k in ``--quick``), the two taking
           turns: bench_secagg.py's workers and rounds (bob and alice with keys and policies
           that trust each other and secure_worker, their updates loaded from their own files;
           james the crypto provider). Secure: ``u.fix_precision().share(bob, alice,
           crypto_provider=james).get()`` for both updates, the sharings added, ``.get()
           .float_precision() / 2``; plaintext: ``u.copy().move(secure_worker)`` for both,
           ``((a + b) / 2).get()``; each followed, untimed, by ``sy.sync()``. Check: the secure
           average within 1e-3 (the fixed-point precision) of the plaintext one, and that one
           equal to the local average.
training step        one SGD step of an MLP (32-64-10, ReLU, MSE, a batch of 64, lr 0.05) whose
           parameters and batch are on bob, four ways, taking turns (one run of each in turn;
           each step followed by ``sy.sync()``): a ``sy.func2plan`` plan sent to bob (its
           parameters are its state) and called on the batch's pointers: its 23 ops in one
           message per step; the same function, the same ops, called op by op on pointers,
           pipelined (the default) and blocking (``pipeline=False``: a round trip per op); and
           the step as one writes it for a module (pipelined): ``model.send(bob)``,
           ``opt.zero_grad()``, ``F.mse_loss(model(x), y)``, ``loss.backward()``,
           ``opt.step()``. The plan's step writes its gradient out (the same ops as the
           op-by-op rows) and updates the parameters in place. Check, after
           all the timed steps (every way took the same number): the plan's parameters equal
           those of the same ops run one by one (<= 1e-6) and match the autograd step's
           (<= 1e-4).

A check that fails ends the suite (it is reported as failed, exit status 2).

Figures are medians over repeated runs; the [lo-hi] range is the spread of the per-run figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import operator
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

HERE = os.path.abspath(__file__)
MiB = 1 << 20
SYSTEMS = ("zmqsyft", "rpc", "pyzmq")
_ALIASES = {"torch-rpc": "rpc", "torch.rpc": "rpc", "tensorpipe": "rpc", "zmq": "pyzmq"}

# frames received from ZeroMQ are read-only buffers that are ours alone: torch warns about it
warnings.filterwarnings("ignore", message="The given buffer is not writable")
warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")


# ================================================================================ parameters
@dataclass
class Params:
    quick: bool
    lat_runs: int      # latency workloads: runs of ...
    lat_n: int         # ... this many timed operations (each run's figure is its median)
    lat_warmup: int    # untimed operations before each run
    big_bytes: int     # W4/W5/memory payload
    big_reps: int      # timed transfers per direction (after one warm-up)
    mem_reps: int      # peak-RSS measurements
    w7_ops: int        # W7 batch size
    w7_reps: int       # W7 batches
    startup_reps: int  # start-up measurements
    timeout: float     # per request / handshake deadline inside a suite (s)
    secagg_n: int = 100_000  # secure aggregation rows: float32 values per update
    secagg_rounds: int = 10  # timed rounds of each (after ``secagg_warmup`` untimed ones)
    secagg_warmup: int = 2
    train_runs: int = 7      # training-step rows: runs of ...
    train_steps: int = 40    # ... this many timed steps of each way (the median per run)
    train_warmup: int = 5    # untimed steps before each run


def make_params(quick: bool) -> Params:
    if quick:
        return Params(True, lat_runs=1, lat_n=5, lat_warmup=2, big_bytes=1 * MiB, big_reps=1,
                      mem_reps=1, w7_ops=50, w7_reps=1, startup_reps=1, timeout=90.0,
                      secagg_n=10_000, secagg_rounds=2, secagg_warmup=1, train_runs=1,
                      train_steps=5, train_warmup=2)
    return Params(False, lat_runs=7, lat_n=200, lat_warmup=30, big_bytes=100 * MiB, big_reps=9,
                  mem_reps=3, w7_ops=2000, w7_reps=7, startup_reps=5, timeout=60.0)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================================ helpers
def _pdeathsig() -> None:
    """preexec_fn: the child is killed when its parent (the suite) dies, however it dies."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """Read one line from ``proc.stdout`` (a ready handshake) within ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} did not report ready within {timeout:g}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{what} exited (code {proc.poll()}) before it was ready")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def reap(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Wait for a child we started; kill it (by its pid) if it does not exit in time."""
    if proc is None:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def close_workers(handles: list[Any]) -> None:
    """Close zmqsyft worker handles, reap their processes, remove their (empty) ipc directories."""
    paths = set()
    for w in handles:
        address = getattr(w, "_ready_address", None) or getattr(w, "address_hint", "")
        if isinstance(address, str) and address.startswith("ipc://"):
            paths.add(address[len("ipc://"):])
        with contextlib.suppress(Exception):
            w.close()
    for w in handles:
        reap(getattr(w, "_proc", None), timeout=5)  # safety net: close() already reaped
    # zmqsyft leaves its private zmqsyft-XXXX directory (sometimes with the socket file) behind
    # for every ipc worker; the workers are reaped now, so remove ours
    for path in paths:
        d = os.path.dirname(path)
        if os.path.basename(d).startswith(("zmqsyft-", "zs-")):
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _hwm_reset(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pid`` to its current RSS."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_read(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak RSS growth of a process over a ``with`` block.

    A psutil sampling thread (every 0.5 ms) plus, on Linux, the kernel's exact high-water mark
    (``VmHWM``, reset through ``/proc/<pid>/clear_refs`` at the start); the larger one wins.
    """

    def __init__(self, pid: int, interval: float = 0.0005) -> None:
        import psutil

        self.pid = pid
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.growth = 0
        self.method = "psutil sampling"

    def __enter__(self) -> PeakRSS:
        self.hwm_ok = _hwm_reset(self.pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process may be gone
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self.proc.memory_info().rss)
        if self.hwm_ok:
            hwm = _hwm_read(self.pid)
            if hwm is not None:
                self.peak = max(self.peak, hwm)
                self.method = "VmHWM + psutil sampling"
        self.growth = self.peak - self.base


def latency(P: Params, op: Callable[[Any], Any], pre: Callable[[], Any] | None = None,
            between: Callable[[], Any] | None = None) -> list[float]:
    """Per-run medians (seconds) of ``op(pre())``; only ``op`` is timed."""
    runs = []
    for _ in range(P.lat_runs):
        samples = []
        for i in range(P.lat_warmup + P.lat_n):
            arg = pre() if pre is not None else None
            t0 = time.perf_counter_ns()
            op(arg)
            dt = time.perf_counter_ns() - t0
            if i >= P.lat_warmup:
                samples.append(dt / 1e9)
            arg = None
        if between is not None:
            between()
        runs.append(statistics.median(samples))
    return runs


def suite_result(out: str, fallback: dict[str, Any], code: int | None,
                 deadline: float) -> dict[str, Any]:
    """What a suite's child process wrote to ``out`` as JSON (``fallback`` if nothing readable),
    its files removed, with a note if it was killed at its ``deadline`` (``code`` None) or
    failed."""
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = fallback
    finally:
        for path in (out, out + ".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(path)
    if code is None:
        res["notes"].append(f"suite killed after its {deadline:g}s deadline")
    elif code != 0:
        res["notes"].append(f"suite exited with code {code}")
    return res


def stop_rpc(rpc: Any, initialised: bool, clean: bool, procs: list[Any], timeout: float) -> None:
    """End an rpc suite: a forced shutdown if the graceful one did not happen, then reap the
    rank processes (killed if they do not exit in time)."""
    if initialised and not clean:
        with contextlib.suppress(Exception):
            rpc.shutdown(graceful=False)
    for p in procs:
        reap(p, timeout=timeout if clean else 2.0)


def write_report(path: str, info: dict[str, Any], args: argparse.Namespace, load0: Any,
                 load1: Any, foreign: float, total: float, **more: Any) -> None:
    """A benchmark script's ``--json`` file: the machine, the arguments, the load, and ``more``."""
    with open(path, "w") as f:
        json.dump({"info": info, "args": {k: v for k, v in vars(args).items()
                                          if not k.startswith("_")},
                   "load": {"start": load0, "end": load1, "foreign_cpu_s": foreign,
                            "seconds": total}, **more}, f, indent=1)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(seconds, result) of ``fn(*args)``."""
    t0 = time.perf_counter_ns()
    out = fn(*args)
    return (time.perf_counter_ns() - t0) / 1e9, out


class Results:
    def __init__(self, system: str, out: str | None = None) -> None:
        self.system = system
        self.out = out  # rewritten after every figure, so a killed suite still reports some
        self.data: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.checks: dict[str, dict[str, Any]] = {}

    def add(self, key: str, samples: Sequence[float] | float) -> None:
        values = list(samples) if isinstance(samples, Sequence) else [samples]
        self.data.setdefault(key, []).extend(float(s) for s in values)
        med = statistics.median(self.data[key])
        log(f"{self.system:8s} {key:26s} median {med:.6g} (n={len(self.data[key])})")
        self.save()

    def save(self) -> None:
        if self.out is not None:
            tmp = self.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.dump(), f)
            os.replace(tmp, self.out)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def check(self, name: str, value: float, limit: float) -> None:
        """A correctness check of a measured path (a max |difference| that must not exceed
        ``limit``): recorded, and a failure ends the suite, so that a broken path is not timed
        and reported as if it worked."""
        ok = value <= limit
        self.checks[name] = {"value": float(value), "limit": limit, "ok": ok}
        log(f"{self.system:8s} check {name}: {value:.3g} (<= {limit:g}: {'OK' if ok else 'FAIL'})")
        self.save()
        if not ok:
            raise RuntimeError(f"check failed: {name}: {value:.3g} > {limit:g}")

    def dump(self) -> dict[str, Any]:
        return {"system": self.system, "data": self.data, "notes": self.notes,
                "checks": self.checks}


# ================================================================================ zmqsyft
def suite_zmqsyft(P: Params, R: Results) -> None:
    import torch

    import zmqsyft as sy
    from zmqsyft.client import get_session

    sy.TorchHook(torch)
    sy.configure(timeout=P.timeout, spawn_timeout=P.timeout)

    def set_pipeline(on: bool) -> None:
        sy.configure(pipeline=on)
        if get_session().cfg.pipeline != on:  # the figures would be mislabelled
            raise RuntimeError("sy.configure(pipeline=...) did not reach the existing client")

    handles: list[Any] = []

    def spawn(name: str, **kw: Any) -> Any:
        w = sy.spawn_worker(name, **kw)
        handles.append(w)
        return w

    try:
        bob, alice = spawn("bob"), spawn("alice")
        # the tcp rows measure the socket path: shared memory off on both ends
        no_shm = replace(get_session().cfg, shm_threshold=0)
        bob_tcp = spawn("bob_tcp", transport_kind="tcp", config=no_shm)
        bob_noshm = spawn("bob_noshm", config=no_shm)
        # the same as bob and bob_tcp without CURVE (the NULL mechanism): what CURVE costs
        bob_plain = spawn("bob_plain", config=replace(get_session().cfg, insecure=True))
        bob_tcp_plain = spawn("bob_tcp_plain", transport_kind="tcp",
                              config=replace(no_shm, insecure=True))
        for w in (bob, alice, bob_tcp, bob_noshm, bob_plain, bob_tcp_plain):
            w.ping()  # waits for the ready handshake, then a first round trip
        if bob_plain.key or bob_tcp_plain.key or not (bob.key and bob_tcp.key):
            raise RuntimeError("the (no CURVE) rows would be mislabelled: a worker spawned "
                               "insecure has a key, or a default one has none")
        R.note("workers: bob and alice on ipc:// (spawn_worker's default), bob_tcp on "
               "tcp://127.0.0.1 (the W4 tcp rows, shared memory off: the socket path)")
        R.note("every zmqsyft connection is CURVE (the default) except in the '(no CURVE)' rows: "
               "bob_plain (ipc) and bob_tcp_plain (tcp) spawned with Config(insecure=True): "
               "NULL handshake, no encryption, and no per-object owner checks, so CURVE / no "
               "CURVE is the whole cost of the secure default; each pair is measured taking "
               "turns (one latency run or one transfer of each in turn). torch rpc and bare "
               "pyzmq do not encrypt")
        small: Any = torch.ones(4)  # Any: TorchHook adds .send()
        keep: list[Any] = []

        def clear() -> None:
            keep.clear()
            sy.sync()  # queued deletes are sent and acknowledged

        def in_turn(ops: dict[str, Callable[[Any], Any]], params: Params = P,
                    pipeline: dict[str, bool] | None = None) -> None:
            """Latency of each op (row key -> op), one run of each in turn, ``params.lat_runs``
            times, so that a drift in the machine's speed touches every row of the group alike.
            ``pipeline``: the setting of some rows' runs (set before each run, untimed)."""
            one_run = replace(params, lat_runs=1)
            samples: dict[str, list[float]] = {key: [] for key in ops}
            for _ in range(params.lat_runs):
                for key, op in ops.items():
                    if pipeline is not None and key in pipeline:
                        set_pipeline(pipeline[key])
                    samples[key] += latency(one_run, op, between=clear)
            for key, values in samples.items():
                R.add(key, values)

        set_pipeline(False)
        a = small.send(bob)
        cold, first = timed(operator.add, a, a)  # the first op on a pointer in this process
        R.add("first_op", cold)
        del first
        R.add("ping", latency(P, lambda _: bob.ping()))
        # W1: blocking send; the pointers are kept alive during a run (no deletes in the loop)
        R.add("W1", latency(P, lambda _: keep.append(small.send(bob)), between=clear))

        def keep_add(x: Any) -> Callable[[Any], None]:
            """``x + x``, the result kept alive during a run (W2 blocking)."""
            return lambda _: keep.append(x + x)
        a_plain = small.send(bob_plain)
        in_turn({"W2.blocking": keep_add(a), "W2.blocking.plain": keep_add(a_plain)})

        def overwrite(_: Any) -> None:
            """``z = a + a`` in a loop: each op also frees the previous result (a delete)."""
            keep[:] = [a + a]
        R.add("W2.dropped", latency(P, overwrite, between=clear))
        set_pipeline(True)

        def then_sync(x: Any) -> Callable[[Any], None]:
            """One pipelined ``x + x``, then a synchronisation point (the "+ sync()" rows)."""
            def run(_: Any) -> None:
                keep.append(x + x)
                sy.sync()
            return run
        R.add("W2.sync", latency(P, then_sync(a), between=clear))
        set_pipeline(False)
        R.add("W3", latency(P, lambda p: p.get(), pre=lambda: small.send(bob)))

        # W6: client -> alice -> bob
        c = small.send(bob).send(alice)
        R.add("W6.blocking", latency(P, lambda _: keep.append(c + c), between=clear))
        set_pipeline(True)
        R.add("W6.sync", latency(P, then_sync(c), between=clear))

        # W7: pipelined adds, then one synchronisation point
        def w7(n: int, hold: bool) -> float:
            t0 = time.perf_counter_ns()
            if hold:
                for _ in range(n):
                    keep.append(a + a)
            else:
                for _ in range(n):
                    a + a  # noqa: B018 - the result pointer is dropped at once
            sy.sync()
            dt = (time.perf_counter_ns() - t0) / 1e9
            clear()
            return n / dt
        w7(min(200, P.w7_ops), True)
        R.add("W7", [w7(P.w7_ops, True) for _ in range(P.w7_reps)])
        R.add("W7.dropped", [w7(P.w7_ops, False) for _ in range(P.w7_reps)])
        set_pipeline(False)

        # W4: big send / get over ipc and tcp
        big: Any = torch.ones(P.big_bytes // 4, dtype=torch.float32)
        shm_default = get_session().cfg.shm_threshold

        def w4(workers: dict[str, Any]) -> None:
            """Send ``big`` to each worker (row suffix -> worker) and get it back: one untimed
            warm-up each, then ``P.big_reps`` timed ones, the workers taking turns. Shared memory
            is on (the default) for the "ipc" rows only."""
            sends: dict[str, list[float]] = {kind: [] for kind in workers}
            gets: dict[str, list[float]] = {kind: [] for kind in workers}
            for i in range(1 + P.big_reps):
                for kind, w in workers.items():
                    sy.configure(shm_threshold=shm_default if kind == "ipc" else 0)
                    ts, p = timed(big.send, w)
                    tg, t = timed(p.get)
                    assert t.shape == big.shape
                    del t, p
                    if i:
                        sends[kind].append(ts)
                        gets[kind].append(tg)
            for kind in workers:
                R.add(f"W4.send.{kind}", sends[kind])
                R.add(f"W4.get.{kind}", gets[kind])
            sy.configure(shm_threshold=shm_default)
        w4({"ipc": bob})
        w4({"ipc_noshm": bob_noshm})
        w4({"tcp": bob_tcp, "tcp.plain": bob_tcp_plain})
        # the same get of a tensor bob computed itself (bob computes a large result into a
        # shared-memory segment of its own: the get maps it as well), the computation not timed
        computed = []
        for i in range(1 + P.big_reps):
            p = big.send(bob) + 0
            sy.sync()
            tg, t = timed(p.get)
            assert t.shape == big.shape
            del t, p
            if i:
                computed.append(tg)
        R.add("W4.get.computed", computed)
        R.note("W4 ipc rows: same-host shared memory (the default, shm_threshold=1 MiB): the get "
               "of the tensor just sent maps bob's memory (no copy); so does the 'computed on bob' "
               "row (bob computed it into shared memory); the 'shared memory off' rows: the same through the ipc socket "
               "(client and worker with shm_threshold=0)")

        # W5: move bob -> alice, started by the client (timed runs, then runs that watch the
        # client's peak RSS, so that the sampler does not disturb the timing)
        moves, rss = [], []
        for i in range(1 + P.big_reps + P.mem_reps):
            p = big.send(bob)
            if i <= P.big_reps:
                tm, _ = timed(p.move, alice)
                if i:
                    moves.append(tm)
            else:
                with PeakRSS(os.getpid()) as mon:
                    p.move(alice)
                rss.append(mon.growth)
            assert p.location is alice
            del p
            sy.sync()
        R.add("W5.move", moves)
        R.add("W5.client_rss", rss)
        computed = []  # the same move of a tensor bob computed (``+ 0``), the computation untimed
        for i in range(1 + P.big_reps):
            p = big.send(bob) + 0
            sy.sync()
            tm, _ = timed(p.move, alice)
            if i:
                computed.append(tm)
            del p
            sy.sync()
        R.add("W5.move.computed", computed)

        # memory: the worker's peak RSS growth while it receives the payload
        # (the worker then reads every byte once: a shared-memory tensor is mapped lazily, so
        # without this its pages would not show in its RSS at all)
        growth = []
        for _ in range(P.mem_reps):
            with PeakRSS(bob.pid) as mon:
                p = big.send(bob)
                p.sum().get()
            growth.append(mon.growth)
            del p
            sy.sync()
        R.add("mem.worker", growth)
        # a client getting the payload (and reading it once)
        growth = []
        for _ in range(P.mem_reps):
            p = big.send(bob)
            sy.sync()
            with PeakRSS(os.getpid()) as mon:
                t = p.get()
                t.sum()
            growth.append(mon.growth)
            del p, t
        R.add("mem.client_get", growth)
        R.note(f"peak RSS method: {mon.method}")

        # one training step on bob: a plan, the same ops one by one (pipelined, the default,
        # and blocking), a module with autograd; the client pipelined except for the blocking row
        set_pipeline(True)
        train = TrainStep(sy, bob)
        in_turn({"train.plan": train.plan_step, "train.ops": train.ops_step,
                 "train.ops.blocking": train.ops_blocking_step,
                 "train.autograd": train.autograd_step},
                replace(P, lat_runs=P.train_runs, lat_n=P.train_steps,
                        lat_warmup=P.train_warmup),
                pipeline={"train.plan": True, "train.ops": True, "train.ops.blocking": False,
                          "train.autograd": True})
        set_pipeline(False)
        for way, diff in train.differences().items():
            R.check(f"train step: plan vs {way}, max |parameter diff|", diff,
                    TRAIN_AUTOGRAD_TOL if way == "autograd" else TRAIN_SAME_OPS_TOL)
        del train
    finally:
        close_workers(handles)

    # secure aggregation against plaintext aggregation (bench_secagg.py's workers and rounds;
    # after the workers above are closed: its data owners are called bob and alice too)
    secagg_rows(P, R)

    # start-up: two workers until both answer, interleaved with a bare `import torch`
    starts, imports, imported = [], [], []
    for r in range(P.startup_reps):
        made: list[Any] = []
        try:
            t0 = time.perf_counter_ns()
            made.append(sy.spawn_worker(f"start{r}a"))
            made.append(sy.spawn_worker(f"start{r}b"))
            for w in made:
                w.ping()
            starts.append((time.perf_counter_ns() - t0) / 1e9)
        finally:
            close_workers(made)
        ready, total = import_torch_time(P.timeout)
        imports.append(total)
        imported.append(ready)
    R.add("startup", starts)
    R.add("startup.import_torch", imports)
    R.add("startup.import_torch_ready", imported)


TRAIN_BATCH, TRAIN_IN, TRAIN_HIDDEN, TRAIN_OUT = 64, 32, 64, 10
TRAIN_LR = 0.05
TRAIN_SAME_OPS_TOL = 1e-6  # the same ops on the same worker: equal, bar a rounding
TRAIN_AUTOGRAD_TOL = 1e-4  # the gradient written out against autograd's, after every step


def train_step(x: Any, y: Any, state: Any) -> Any:
    """One SGD step of the MLP ``relu(x W1^T + b1) W2^T + b2`` on the mean squared error, its
    gradient written out, the parameters (``state``: W1, b1,
    W2, b2) updated in place; returns the loss. The function of the plan, and run op by op on
    pointers as it is."""
    import torch.nn.functional as F  # noqa: N812

    w1, b1, w2, b2 = state.read()
    h = F.relu(F.linear(x, w1, b1))
    out = F.linear(h, w2, b2)
    d = (out - y) * (2.0 / out.numel())  # d loss / d out
    gw2, gb2 = d.t() @ h, d.sum(0)
    dh = (d @ w2) * (h > 0)
    gw1, gb1 = dh.t() @ x, dh.sum(0)
    for p, g in ((w1, gw1), (b1, gb1), (w2, gw2), (b2, gb2)):
        p.sub_(g * TRAIN_LR)
    return F.mse_loss(out, y)


class TrainStep:
    """The training-step rows: one MLP, one batch, on ``worker``, three ways (each starts from
    the same parameters and takes the same steps, so that they can be compared at the end)."""

    def __init__(self, sy: Any, worker: Any) -> None:
        import torch
        from torch import nn

        self.sy = sy
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(TRAIN_BATCH, TRAIN_IN, generator=g), torch.randn(TRAIN_BATCH, TRAIN_OUT, generator=g)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(TRAIN_IN, TRAIN_HIDDEN), nn.ReLU(),
                              nn.Linear(TRAIN_HIDDEN, TRAIN_OUT))
        self.initial = [p.detach().clone() for p in model.parameters()]
        plan = sy.func2plan(args_shape=[(TRAIN_BATCH, TRAIN_IN), (TRAIN_BATCH, TRAIN_OUT)],
                            state=[t.clone() for t in self.initial])(train_step)
        self.plan = plan.send(worker)  # its parameters (the state) are on the worker now
        self.state = sy.PlanState([t.clone().send(worker) for t in self.initial])
        self.state_blocking = sy.PlanState([t.clone().send(worker) for t in self.initial])
        self.model = model.send(worker)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=TRAIN_LR)
        self.x, self.y = x.send(worker), y.send(worker)

    def plan_step(self, _: Any) -> None:
        self.plan(self.x, self.y)
        self.sy.sync()

    def ops_step(self, _: Any) -> None:
        train_step(self.x, self.y, self.state)
        self.sy.sync()

    def ops_blocking_step(self, _: Any) -> None:  # (run with pipeline=False)
        train_step(self.x, self.y, self.state_blocking)
        self.sy.sync()

    def autograd_step(self, _: Any) -> None:
        import torch.nn.functional as F  # noqa: N812

        self.opt.zero_grad()
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.sy.sync()

    def differences(self) -> dict[str, float]:
        """Fetch every way's parameters: the max |difference| of each from the plan's. Raises
        if the steps did not move the parameters at all."""
        planned = self.plan.get().state.read()  # (.get() brings its state back)
        others = {
            "the same ops one by one (pipelined)": [t.get() for t in self.state.read()],
            "the same ops one by one (blocking)": [t.get() for t in self.state_blocking.read()],
            "autograd": [p.detach() for p in self.model.get().parameters()],
        }

        def diff(a: list[Any], b: list[Any]) -> float:
            return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))
        if diff(planned, self.initial) == 0.0:
            raise RuntimeError("the training steps did not change the parameters")
        return {way: diff(planned, params) for way, params in others.items()}


def secagg_rows(P: Params, R: Results) -> None:
    """A secure-aggregation round against a plaintext one, taking turns (bench_secagg.py's)."""
    import shutil

    from bench_secagg import TOLERANCE, ZmqsyftSystems, one_repetition, update_of

    n = P.secagg_n
    tmp = tempfile.mkdtemp(prefix="bench-secagg-")
    zs = None
    try:
        zs = ZmqsyftSystems([n], tmp, P.timeout)
        zs.ready()
        rounds = {"secure": zs.secure_round, "plaintext": zs.plaintext_round}
        settle = lambda _system: zs.settle()  # noqa: E731
        samples: dict[str, list[float]] = {s: [] for s in rounds}
        reference = (update_of(0, n) + update_of(1, n)) / 2
        secure_vs_plain = plain_vs_ref = 0.0
        for rep in range(P.secagg_warmup + P.secagg_rounds):
            times, outputs = one_repetition(rounds, n, rep, settle)
            if rep >= P.secagg_warmup:
                for s, dt in times.items():
                    samples[s].append(dt)
            secure_vs_plain = max(secure_vs_plain, float(
                (outputs["secure"] - outputs["plaintext"]).abs().max()))
            plain_vs_ref = max(plain_vs_ref, float((outputs["plaintext"] - reference).abs().max()))
        R.add("secagg.secure", samples["secure"])
        R.add("secagg.plain", samples["plaintext"])
        R.check("secure aggregation: secure vs plaintext average, max |diff|", secure_vs_plain,
                TOLERANCE)
        R.check("secure aggregation: plaintext vs the local average, max |diff|", plain_vs_ref,
                1e-6)
    finally:
        if zs is not None:
            zs.close()
        shutil.rmtree(tmp, ignore_errors=True)


def import_torch_time(timeout: float) -> tuple[float, float]:
    """``python -c "import torch"``: (seconds until torch is imported, seconds until it exited)."""
    code = "import torch, sys; sys.stdout.write('ready\\n'); sys.stdout.flush()"
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
    try:
        read_line(proc, timeout, "python -c 'import torch'")
        ready = (time.perf_counter_ns() - t0) / 1e9
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"python -c 'import torch' exited with code {proc.returncode}")
        return ready, (time.perf_counter_ns() - t0) / 1e9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# ================================================================================ torch rpc
# Functions run by the rpc ranks. They are module-level so that rpc pickles them by name
# (every rank runs this file as __main__).
_STORE: dict[int, Any] = {}
_IDS = itertools.count(1)


def rpc_ping() -> None:
    return None


def rpc_pid() -> int:
    return os.getpid()


def rpc_put(t: Any) -> int:
    i = next(_IDS)
    _STORE[i] = t
    return i


def rpc_put_as(i: int, t: Any) -> int:
    _STORE[i] = t
    return i


def rpc_add(a: int, b: int) -> int:
    import torch

    i = next(_IDS)
    _STORE[i] = torch.add(_STORE[a], _STORE[b])
    return i


def rpc_pop(i: int) -> Any:
    return _STORE.pop(i)


def rpc_clear() -> int:
    n = len(_STORE)
    _STORE.clear()
    return n


def rpc_move(i: int, dest: str) -> None:
    import torch.distributed.rpc as rpc

    rpc.rpc_sync(dest, rpc_put_as, args=(i, _STORE[i]))
    del _STORE[i]


def rpc_make_ptr(owner: str, remote_id: int) -> int:
    return rpc_put(("ptr", owner, remote_id))


def rpc_chain_add(a: int, b: int) -> int:
    import torch.distributed.rpc as rpc

    _, wa, ra = _STORE[a]
    _, wb, rb = _STORE[b]
    assert wa == wb
    return rpc_make_ptr(wa, rpc.rpc_sync(wa, rpc_add, args=(ra, rb)))


RPC_NAMES = ("client", "bob", "alice")


def _rpc_init(rank: int, timeout: float) -> None:
    import torch.distributed.rpc as rpc

    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=16, rpc_timeout=timeout,
                                           init_method="env://")
    rpc.init_rpc(RPC_NAMES[rank], rank=rank, world_size=3, rpc_backend_options=opts)


def rpc_rank_main(rank: int, timeout: float) -> int:
    """A server rank: join, serve until the client shuts the group down."""
    import torch.distributed.rpc as rpc

    _rpc_init(rank, timeout)
    rpc.shutdown(graceful=True)
    return 0


def suite_rpc(P: Params, R: Results) -> None:
    import torch
    import torch.distributed.rpc as rpc

    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TP_SOCKET_IFNAME="lo",
                      GLOO_SOCKET_IFNAME="lo")
    procs: list[subprocess.Popen] = []
    initialised = clean = False
    try:
        t0 = time.perf_counter_ns()
        for rank in (1, 2):
            procs.append(subprocess.Popen(
                [sys.executable, HERE, "--_rpc-rank", str(rank), "--_timeout", str(P.timeout)],
                stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig))
        _rpc_init(0, P.timeout)  # the rendezvous is the handshake
        initialised = True
        rpc.rpc_sync("bob", rpc_ping)
        rpc.rpc_sync("alice", rpc_ping)
        R.add("startup", (time.perf_counter_ns() - t0) / 1e9)
        R.note("rpc start-up: 2 rank processes + init_rpc of 3 ranks + one rpc_sync to each "
               "(one sample per suite run: the group cannot be re-initialised in one process)")

        def call(to: str, fn: Any, *args: Any) -> Any:
            return rpc.rpc_sync(to, fn, args=args)

        def clear(_: Any = None) -> None:
            call("bob", rpc_clear)
            call("alice", rpc_clear)

        small = torch.ones(4)
        a = call("bob", rpc_put, small)
        R.add("first_op", timed(call, "bob", rpc_add, a, a)[0])
        R.add("ping", latency(P, lambda _: call("bob", rpc_ping)))
        R.add("W1", latency(P, lambda _: call("bob", rpc_put, small), between=clear))
        a = call("bob", rpc_put, small)
        R.add("W2.blocking", latency(P, lambda _: call("bob", rpc_add, a, a)))
        R.add("W3", latency(P, lambda i: call("bob", rpc_pop, i),
                            pre=lambda: call("bob", rpc_put, small)))
        c = call("alice", rpc_make_ptr, "bob", a)
        R.add("W6.blocking", latency(P, lambda _: call("alice", rpc_chain_add, c, c)))

        def w7(n: int) -> float:
            t0 = time.perf_counter_ns()
            futs = [rpc.rpc_async("bob", rpc_add, args=(a, a)) for _ in range(n)]
            torch.futures.wait_all(futs)
            return n / ((time.perf_counter_ns() - t0) / 1e9)
        w7(min(200, P.w7_ops))
        R.add("W7", [w7(P.w7_ops) for _ in range(P.w7_reps)])
        clear()
        R.note("rpc W2/W6 results stay on the owner as dict entries named by ids; W7 uses "
               "rpc_async futures + torch.futures.wait_all")

        big = torch.ones(P.big_bytes // 4, dtype=torch.float32)
        sends, gets = [], []
        for i in range(1 + P.big_reps):
            ts, bid = timed(call, "bob", rpc_put, big)
            tg, t = timed(call, "bob", rpc_pop, bid)
            assert t.shape == big.shape
            del t
            if i:
                sends.append(ts)
                gets.append(tg)
        R.add("W4.send.ipc", sends)
        R.add("W4.get.ipc", gets)
        R.note("rpc W4 uses TensorPipe's default transports/channels for a local peer "
               "(shown in the ipc rows)")

        moves, rss = [], []
        for i in range(1 + P.big_reps + P.mem_reps):
            bid = call("bob", rpc_put, big)
            if i <= P.big_reps:
                tm, _ = timed(call, "bob", rpc_move, bid, "alice")
                if i:
                    moves.append(tm)
            else:
                with PeakRSS(os.getpid()) as mon:
                    call("bob", rpc_move, bid, "alice")
                rss.append(mon.growth)
            call("alice", rpc_clear)
        R.add("W5.move", moves)
        R.add("W5.client_rss", rss)

        bob_pid = call("bob", rpc_pid)
        growth = []
        for _ in range(P.mem_reps):
            with PeakRSS(bob_pid) as mon:
                bid = call("bob", rpc_put, big)
            growth.append(mon.growth)
            clear()
        R.add("mem.worker", growth)
        rpc.shutdown(graceful=True, timeout=P.timeout)
        clean = True
    finally:
        stop_rpc(rpc, initialised, clean, procs, P.timeout)


# ================================================================================ bare pyzmq
OP_PING, OP_PUT, OP_ADD, OP_GET, OP_DEL, OP_STOP = range(6)


def _tensor_of(frame: Any, dtype: str, shape: list[int]) -> Any:
    import torch

    raw = torch.frombuffer(frame.buffer, dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape)


def pyzmq_server_main(ipc_path: str, parent: int) -> int:
    """A put/add/get server: one ROUTER bound to an ipc and a tcp endpoint."""
    import msgpack
    import torch
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, val)
    sock.bind(f"ipc://{ipc_path}")
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"READY ipc://{ipc_path} tcp://127.0.0.1:{port} {os.getpid()}", flush=True)
    store: dict[int, Any] = {}
    ids = itertools.count(1)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:
                    return 0
                continue
            frames = sock.recv_multipart(copy=False)
            ident = frames[0]
            op, req, body = unpackb(frames[1].bytes)
            if op == OP_ADD:
                i = next(ids)
                store[i] = torch.add(store[body[0]], store[body[1]])
                out = [ident, packb([req, i])]
            elif op == OP_PUT:
                i = next(ids)
                store[i] = _tensor_of(frames[2], body[0], body[1])
                out = [ident, packb([req, i])]
            elif op == OP_GET:
                t = store.pop(body)
                out = [ident, packb([req, [str(t.dtype).removeprefix("torch."), list(t.shape)]]),
                       t.reshape(-1).view(torch.uint8).numpy()]
            elif op == OP_DEL:
                for i in body or list(store):
                    store.pop(i, None)
                out = [ident, packb([req, None])]
            elif op == OP_PING:
                out = [ident, packb([req, None])]
            elif op == OP_STOP:
                sock.send_multipart([ident, packb([req, None])])
                return 0
            else:
                out = [ident, packb([req, "bad op"])]
            sock.send_multipart(out, copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()


class ZmqClient:
    """DEALER side of the bare-pyzmq floor: header frame + tensor frames, copy=False."""

    def __init__(self, ctx: Any, endpoint: str, timeout: float) -> None:
        import msgpack
        import zmq

        self.zmq = zmq
        self.packb, self.unpackb = msgpack.packb, msgpack.unpackb
        self.sock = ctx.socket(zmq.DEALER)
        for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            self.sock.setsockopt(opt, val)
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout * 1000)
        self.req = itertools.count(1)

    def send(self, op: int, body: Any = None, tensor: Any = None) -> None:
        req = next(self.req)
        if tensor is None:
            self.sock.send_multipart([self.packb([op, req, body])], copy=False)
        else:
            import torch

            hdr = self.packb([op, req, [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]])
            self.sock.send_multipart([hdr, tensor.reshape(-1).view(torch.uint8).numpy()], copy=False)

    def recv(self) -> Any:
        if not self.sock.poll(self.timeout_ms):
            raise TimeoutError("pyzmq server did not answer")
        frames = self.sock.recv_multipart(copy=False)
        _, result = self.unpackb(frames[0].bytes)
        if len(frames) > 1:
            return _tensor_of(frames[1], result[0], result[1])
        return result

    def request(self, op: int, body: Any = None, tensor: Any = None) -> Any:
        self.send(op, body, tensor)
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


def suite_pyzmq(P: Params, R: Results) -> None:
    import torch
    import zmq

    tmp = tempfile.mkdtemp(prefix="bench-zmq-")
    ipc_path = os.path.join(tmp, "srv.sock")
    proc = subprocess.Popen([sys.executable, HERE, "--_pyzmq-server", ipc_path,
                             "--_parent", str(os.getpid())],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
    ctx = zmq.Context()
    clients: list[ZmqClient] = []
    stopped = False
    try:
        line = read_line(proc, P.timeout, "pyzmq server")
        _, ipc_ep, tcp_ep, pid = line.split()
        ipc = ZmqClient(ctx, ipc_ep, P.timeout)
        tcp = ZmqClient(ctx, tcp_ep, P.timeout)
        clients += [ipc, tcp]
        ipc.request(OP_PING)
        tcp.request(OP_PING)
        small = torch.ones(4)

        def clear(_: Any = None) -> None:
            ipc.request(OP_DEL, None)

        a = ipc.request(OP_PUT, tensor=small)
        R.add("first_op", timed(ipc.request, OP_ADD, [a, a])[0])
        R.add("ping", latency(P, lambda _: ipc.request(OP_PING)))
        R.add("W1", latency(P, lambda _: ipc.request(OP_PUT, tensor=small), between=clear))
        a = ipc.request(OP_PUT, tensor=small)
        R.add("W2.blocking", latency(P, lambda _: ipc.request(OP_ADD, [a, a])))
        R.add("W3", latency(P, lambda i: ipc.request(OP_GET, i),
                            pre=lambda: ipc.request(OP_PUT, tensor=small)))

        def w7(n: int) -> float:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                ipc.send(OP_ADD, [a, a])
            for _ in range(n):
                ipc.recv()
            return n / ((time.perf_counter_ns() - t0) / 1e9)
        w7(min(200, P.w7_ops))
        R.add("W7", [w7(P.w7_ops) for _ in range(P.w7_reps)])
        clear()

        big = torch.ones(P.big_bytes // 4, dtype=torch.float32)
        for kind, cl in (("ipc", ipc), ("tcp", tcp)):
            sends, gets = [], []
            for i in range(1 + P.big_reps):
                ts, bid = timed(cl.request, OP_PUT, None, big)
                tg, t = timed(cl.request, OP_GET, bid)
                assert t.shape == big.shape
                del t
                if i:
                    sends.append(ts)
                    gets.append(tg)
            R.add(f"W4.send.{kind}", sends)
            R.add(f"W4.get.{kind}", gets)

        growth = []
        for _ in range(P.mem_reps):
            with PeakRSS(int(pid)) as mon:
                ipc.request(OP_PUT, tensor=big)
            growth.append(mon.growth)
            clear()
        R.add("mem.worker", growth)
        ipc.request(OP_STOP)
        stopped = True
    finally:
        for cl in clients:
            cl.close()
        ctx.term()
        reap(proc, timeout=5.0 if stopped else 1.0)
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(OSError):
            os.unlink(ipc_path)
            os.rmdir(tmp)


# ================================================================================ orchestration
SUITES = {"zmqsyft": suite_zmqsyft, "rpc": suite_rpc, "pyzmq": suite_pyzmq}


def run_suite_child(name: str, quick: bool, out: str) -> int:
    P = make_params(quick)
    R = Results(name, out)
    try:
        SUITES[name](P, R)
        status = 0
    except BaseException as exc:  # noqa: BLE001 - report what we have, then fail
        import traceback

        traceback.print_exc()
        R.note(f"suite failed: {type(exc).__name__}: {exc}")
        status = 1
    if name == "zmqsyft":  # its workers are the fork server's children: reaped through it, so
        with contextlib.suppress(Exception):  # that their CPU counts as the suite's, not as load
            from zmqsyft.client import forks

            forks.shutdown()
    R.save()
    return status


def cpu_times() -> tuple[float, float, float]:
    """(machine busy CPU-s, machine steal CPU-s, CPU-s of this process and its reaped children)."""
    import resource

    busy = steal = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / tick  # user nice system irq softirq
        steal = v[7] / tick if len(v) > 7 else 0.0
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        own += ru.ru_utime + ru.ru_stime
    return busy, steal, own


def run_suite(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Run one suite in a child process (its own session), kill its process group on overrun."""
    fd, out = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, HERE, "--_suite", name, "--_out", out] + (["--quick"] if quick else [])
    log(f"suite {name}: starting")
    cpu0 = cpu_times()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the suite and everything it started
        proc.wait()
        code = None
    finally:
        # anything the suite left behind in its process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    res = suite_result(out, {"system": name, "data": {}, "notes": [], "checks": {}}, code,
                       timeout)
    res["ok"] = code == 0
    res["seconds"] = time.monotonic() - t0
    cpu1 = cpu_times()
    ncpu = os.cpu_count() or 1
    res["foreign_cpu"] = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[2] - cpu0[2]))
    res["steal_cpu"] = cpu1[1] - cpu0[1]
    res["cpu_capacity"] = res["seconds"] * ncpu
    log(f"suite {name}: {'done' if code == 0 else 'FAILED'} in {res['seconds']:.1f}s")
    return res


def merge(results: dict[str, Any], system: str, res: dict[str, Any]) -> None:
    """Add one suite run's samples to the previous rounds' of the same system."""
    if system not in results:
        res["rounds"] = 1
        results[system] = res
        return
    into = results[system]
    for key, vals in res["data"].items():
        into["data"].setdefault(key, []).extend(vals)
    into["notes"] += [n for n in res["notes"] if n not in into["notes"]]
    for name, c in res.get("checks", {}).items():  # the worst of the rounds
        old = into.setdefault("checks", {}).get(name)
        if old is None or c["value"] > old["value"] or not c["ok"]:
            into["checks"][name] = c
    into["ok"] = into["ok"] and res["ok"]
    into["rounds"] += 1
    for key in ("seconds", "foreign_cpu", "steal_cpu", "cpu_capacity"):
        into[key] = into.get(key, 0.0) + res.get(key, 0.0)


def machine_info() -> dict[str, Any]:
    import msgpack
    import psutil
    import torch
    import zmq

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    try:
        from importlib.metadata import version

        zs = version("zmqsyft")
    except Exception:  # noqa: BLE001
        zs = "?"
    commit = "?"
    with contextlib.suppress(Exception):
        repo = os.path.dirname(os.path.dirname(HERE))
        commit = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "zmqsyft": f"{zs} ({commit})",
    }


# ---------------------------------------------------------------- table
def _fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def rows(P: Params) -> list[tuple[str, str, str]]:
    size = _fmt_size(P.big_bytes)
    return [
        ("ping", "ping: empty request round trip", "us"),
        ("W1", "W1 send 4 x f32 to bob -> pointer", "us"),
        ("W2.blocking", "W2 add 4+4 on bob, blocking [zs: pipeline=False]", "us"),
        ("W2.blocking.plain", "W2 add 4+4, blocking (no CURVE)", "us"),
        ("W2.sync", "W2 add 4+4 on bob, pipelined + sync() per op", "us"),
        ("W2.dropped", "W2 same, blocking, freeing the previous result", "us"),
        ("W3", "W3 get 4 x f32 back", "us"),
        ("W4.send.ipc", f"W4 send {size}, ipc [rpc: TensorPipe default]", "xfer"),
        ("W4.get.ipc", f"W4 get {size}, ipc [rpc: TensorPipe default]", "xfer"),
        ("W4.get.computed", f"W4 get {size} computed on bob, ipc", "xfer"),
        ("W4.send.ipc_noshm", f"W4 send {size}, ipc, shared memory off", "xfer"),
        ("W4.get.ipc_noshm", f"W4 get {size}, ipc, shared memory off", "xfer"),
        ("W4.send.tcp", f"W4 send {size}, tcp 127.0.0.1", "xfer"),
        ("W4.get.tcp", f"W4 get {size}, tcp 127.0.0.1", "xfer"),
        ("W4.send.tcp.plain", f"W4 send {size}, tcp (no CURVE)", "xfer"),
        ("W4.get.tcp.plain", f"W4 get {size}, tcp (no CURVE)", "xfer"),
        ("W5.move", f"W5 move {size} bob -> alice (client-initiated)", "xfer"),
        ("W5.move.computed", f"W5 move {size} computed on bob -> alice", "xfer"),
        ("W5.client_rss", "W5 client peak RSS growth during the move", "mib"),
        ("W6.blocking", "W6 add via chain client->alice->bob, blocking", "us"),
        ("W6.sync", "W6 chain add, pipelined + sync() per op", "us"),
        ("W7", f"W7 {P.w7_ops} adds without waiting, then wait all", "ops"),
        ("W7.dropped", "W7 same, result pointers dropped at once", "ops"),
        ("startup", "start-up: spawn 2 workers until both answer", "s"),
        ("startup.import_torch", "  vs bare `python -c \"import torch\"` (to exit)", "s"),
        ("startup.import_torch_ready", "  vs the same, until torch is imported", "s"),
        ("first_op", "first remote add after start-up (one-time, cold)", "ms"),
        ("mem.worker", f"worker peak RSS growth receiving {size}", "mib"),
        ("mem.client_get", f"client peak RSS growth getting {size}", "mib"),
        ("secagg.secure", f"secure aggregation round, 2 x {P.secagg_n // 1000}k f32 (share, add, get)", "msr"),
        ("secagg.plain", "  plaintext round, trusted aggregator (move x2, avg, get)", "msr"),
        ("train.plan", f"train step on bob, plan (MLP {TRAIN_IN}-{TRAIN_HIDDEN}-{TRAIN_OUT}, batch {TRAIN_BATCH})", "msr"),
        ("train.ops", "  the same ops one by one on pointers, pipelined", "msr"),
        ("train.ops.blocking", "  the same ops one by one, blocking (pipeline=False)", "msr"),
        ("train.autograd", "  model.send, forward, backward, SGD step", "msr"),
    ]


def _fmt(v: float, kind: str, size: int) -> str:
    if kind == "us":
        return f"{v * 1e6:.0f} us"
    if kind == "xfer":
        return f"{v * 1e3:.1f} ms {size / MiB / v:.0f} MiB/s"
    if kind == "ops":
        return f"{v:,.0f} ops/s"
    if kind == "mib":
        return f"{v / MiB:.1f} MiB"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "ms":
        return f"{v * 1e3:.1f} ms"
    if kind == "msr":
        return f"{v * 1e3:.{2 if v < 0.01 else 1}f} ms"
    return f"{v:.4g}"


def _spread(vals: list[float], kind: str) -> str:
    if len(vals) < 2:
        return ""
    lo, hi = min(vals), max(vals)
    if kind == "us":
        return f" [{lo * 1e6:.0f}-{hi * 1e6:.0f}]"
    if kind == "xfer":
        digits = 1 if hi < 0.01 else 0
        return f" [{lo * 1e3:.{digits}f}-{hi * 1e3:.{digits}f}]"
    if kind == "ops":
        return f" [{lo:,.0f}-{hi:,.0f}]"
    if kind == "mib":
        return f" [{lo / MiB:.1f}-{hi / MiB:.1f}]"
    if kind == "s":
        return f" [{lo:.2f}-{hi:.2f}]"
    if kind == "msr":
        digits = 2 if hi < 0.01 else 1
        return f" [{lo * 1e3:.{digits}f}-{hi * 1e3:.{digits}f}]"
    return ""


def median_of(results: dict[str, Any], system: str, key: str) -> float | None:
    vals = results.get(system, {}).get("data", {}).get(key)
    return statistics.median(vals) if vals else None


def render_table(P: Params, results: dict[str, Any], systems: list[str]) -> str:
    header = ["workload"] + [{"rpc": "torch.rpc (TensorPipe)"}.get(s, s) for s in systems]
    body = []
    for key, label, kind in rows(P):
        cells = [label]
        for s in systems:
            vals = results.get(s, {}).get("data", {}).get(key)
            cells.append(_fmt(statistics.median(vals), kind, P.big_bytes) + _spread(vals, kind)
                         if vals else "-")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)


Ratio = tuple[str, float | None, str, bool | None]
"""(name, value, target such as "<= 1.5", met: True, False, or None when a figure is missing)"""


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _judge(targets: list[tuple[str, float | None, str, float]]) -> list[Ratio]:
    """Mark each (name, value, comparison, target) as met or missed (None without a value)."""
    final = []
    for name, value, op, target in targets:
        ok = None
        if value is not None:
            ok = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
        final.append((name, value, f"{op} {target:g}", ok))
    return final


def _medians(P: Params, results: dict[str, Any]) -> tuple[Callable[[str, str], float | None],
                                                          Callable[[str, str], float | None]]:
    """Two look-ups of a system's row: its median, and the throughput (bytes/s) of a transfer
    row's median time."""
    def m(system: str, key: str) -> float | None:
        return median_of(results, system, key)

    def thr(system: str, key: str) -> float | None:
        return _div(P.big_bytes, m(system, key))
    return m, thr


def ratios(P: Params, results: dict[str, Any]) -> list[Ratio]:
    """The targets against torch rpc and bare pyzmq, and zmqsyft's own (W5, memory, start-up)."""
    m, thr = _medians(P, results)
    return _judge([
        ("W2 zmqsyft blocking / pyzmq add round trip", _div(m("zmqsyft", "W2.blocking"), m("pyzmq", "W2.blocking")), "<=", 1.5),
        ("W2 zmqsyft blocking, no CURVE / pyzmq", _div(m("zmqsyft", "W2.blocking.plain"), m("pyzmq", "W2.blocking")), "<=", 1.5),
        ("W2 zmqsyft pipelined+sync / pyzmq add round trip", _div(m("zmqsyft", "W2.sync"), m("pyzmq", "W2.blocking")), "<=", 1.5),
        ("W2 zmqsyft blocking / torch-rpc", _div(m("zmqsyft", "W2.blocking"), m("rpc", "W2.blocking")), "<=", 0.5),
        ("W2 zmqsyft pipelined+sync / torch-rpc", _div(m("zmqsyft", "W2.sync"), m("rpc", "W2.blocking")), "<=", 0.5),
        ("W6/W2 zmqsyft, blocking (alice acks once relayed)", _div(m("zmqsyft", "W6.blocking"), m("zmqsyft", "W2.blocking")), "<=", 1.3),
        ("W6/W2 zmqsyft, pipelined+sync (done on bob)", _div(m("zmqsyft", "W6.sync"), m("zmqsyft", "W2.sync")), "<=", 1.3),
        ("W7 throughput zmqsyft / torch-rpc", _div(m("zmqsyft", "W7"), m("rpc", "W7")), ">=", 5.0),
        ("W4 send throughput zmqsyft(ipc) / torch-rpc", _div(thr("zmqsyft", "W4.send.ipc"), thr("rpc", "W4.send.ipc")), ">=", 1.0),
        ("W4 get throughput zmqsyft(ipc) / torch-rpc", _div(thr("zmqsyft", "W4.get.ipc"), thr("rpc", "W4.get.ipc")), ">=", 1.0),
        ("W4 get, computed on bob (a copy) / torch-rpc", _div(thr("zmqsyft", "W4.get.computed"), thr("rpc", "W4.get.ipc")), ">=", 1.0),
        ("W4 send throughput tcp zmqsyft / pyzmq", _div(thr("zmqsyft", "W4.send.tcp"), thr("pyzmq", "W4.send.tcp")), ">=", 0.9),
        ("W4 get throughput tcp zmqsyft / pyzmq", _div(thr("zmqsyft", "W4.get.tcp"), thr("pyzmq", "W4.get.tcp")), ">=", 0.9),
        ("W4 send throughput tcp zmqsyft, no CURVE / pyzmq", _div(thr("zmqsyft", "W4.send.tcp.plain"), thr("pyzmq", "W4.send.tcp")), ">=", 0.9),
        ("W4 get throughput tcp zmqsyft, no CURVE / pyzmq", _div(thr("zmqsyft", "W4.get.tcp.plain"), thr("pyzmq", "W4.get.tcp")), ">=", 0.9),
        ("W5 move time / W4 send time (zmqsyft, ipc)", _div(m("zmqsyft", "W5.move"), m("zmqsyft", "W4.send.ipc")), "<=", 1.2),
        ("W5 client RSS growth, MiB (zmqsyft)", _div(m("zmqsyft", "W5.client_rss"), MiB), "<", 5.0),
        ("worker RSS growth / payload (zmqsyft)", _div(m("zmqsyft", "mem.worker"), P.big_bytes), "<=", 1.2),
        ("client RSS growth getting / payload (zmqsyft)", _div(m("zmqsyft", "mem.client_get"), P.big_bytes), "<=", 1.2),
        ("start-up / `python -c \"import torch\"` (zmqsyft)", _div(m("zmqsyft", "startup"), m("zmqsyft", "startup.import_torch")), "<=", 1.5),
        ("start-up / import torch until imported (zmqsyft)", _div(m("zmqsyft", "startup"), m("zmqsyft", "startup.import_torch_ready")), "<=", 1.5),
    ])


def curve_ratios(P: Params, results: dict[str, Any]) -> list[Ratio]:
    """What CURVE costs zmqsyft: each row with CURVE (the default) against the same row on a
    worker spawned ``insecure`` (no CURVE), both measured in the same suite, taking turns."""
    m, thr = _medians(P, results)
    return _judge([
        ("W2 add round trip, blocking: time", _div(m("zmqsyft", "W2.blocking"), m("zmqsyft", "W2.blocking.plain")), "<=", 1.2),
        ("W4 send tcp (shared memory off): throughput", _div(thr("zmqsyft", "W4.send.tcp"), thr("zmqsyft", "W4.send.tcp.plain")), ">=", 0.7),
        ("W4 get tcp (shared memory off): throughput", _div(thr("zmqsyft", "W4.get.tcp"), thr("zmqsyft", "W4.get.tcp.plain")), ">=", 0.7),
    ])


def beside_ratios(P: Params, results: dict[str, Any]) -> list[Ratio]:
    """zmqsyft's rows of its own, reported beside the others: no targets."""
    m, _ = _medians(P, results)
    return [(name, value, "", None) for name, value in (
        (f"secure / plaintext aggregation round ({P.secagg_n // 1000}k f32)", _div(m("zmqsyft", "secagg.secure"), m("zmqsyft", "secagg.plain"))),
        ("train step: plan / the same ops one by one, pipelined", _div(m("zmqsyft", "train.plan"), m("zmqsyft", "train.ops"))),
        ("train step: plan / the same ops one by one, blocking", _div(m("zmqsyft", "train.plan"), m("zmqsyft", "train.ops.blocking"))),
        ("train step: plan / autograd step (pipelined)", _div(m("zmqsyft", "train.plan"), m("zmqsyft", "train.autograd"))),
    )]


def render_checks(results: dict[str, Any], systems: list[str]) -> str:
    lines = ["checks (the measured paths gave the right result)"]
    for s in systems:
        for name, c in results.get(s, {}).get("checks", {}).items():
            lines.append(f"  [{s}] {name}: {c['value']:.2g} (<= {c['limit']:g}: "
                         f"{'OK' if c['ok'] else 'FAIL'})")
    return "\n".join(lines) if len(lines) > 1 else ""


def render_ratios(rs: list[Ratio], title: str = "ratio") -> str:
    width = max([len(title)] + [len(r[0]) for r in rs])
    if not any(target for _, _, target, _ in rs):  # values only
        lines = [f"{title.ljust(width)}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
        lines += [f"{name.ljust(width)}  " + (f"{value:8.2f}" if value is not None else f"{'n/a':>8}")
                  for name, value, _, _ in rs]
        return "\n".join(lines)
    lines = [f"{title.ljust(width)}  {'value':>8}  {'target':8}  result",
             f"{'-' * width}  {'-' * 8}  {'-' * 8}  ------"]
    for name, value, target, ok in rs:
        v = f"{value:8.2f}" if value is not None else f"{'n/a':>8}"
        res = "n/a" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"{name.ljust(width)}  {v}  {target:8}  {res}")
    return "\n".join(lines)


def ratios_json(rs: list[Ratio]) -> list[dict[str, Any]]:
    return [{"name": n, "value": v, "target": t, "pass": ok} for n, v, t, ok in rs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: every workload once, 1 MiB instead of 100 MiB, 50 ops for W7")
    ap.add_argument("--only", default=",".join(SYSTEMS),
                    help="comma-separated systems to run: zmqsyft,rpc,pyzmq (default: all)")
    ap.add_argument("--json", metavar="FILE", help="also write raw samples and results as JSON")
    ap.add_argument("--suite-timeout", type=float, default=None,
                    help="seconds before a suite is killed (default 240, quick: 90)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="run every suite this many times, round-robin, and pool the samples "
                         "(default 2, quick: 1)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any ratio is a MISS")
    ap.add_argument("--torch-threads", type=int, default=None, metavar="N",
                    help="set OMP_NUM_THREADS/MKL_NUM_THREADS=N for every process (default: "
                         "torch's own choice)")
    # internal entry points of the child processes
    ap.add_argument("--_suite", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_rpc-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--_pyzmq-server", help=argparse.SUPPRESS)
    ap.add_argument("--_parent", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._suite:
        return run_suite_child(args._suite, args.quick, args._out)
    if args._rpc_rank is not None:
        return rpc_rank_main(args._rpc_rank, args._timeout)
    if args._pyzmq_server:
        return pyzmq_server_main(args._pyzmq_server, args._parent)

    systems = []
    for s in args.only.split(","):
        s = _ALIASES.get(s.strip().lower(), s.strip().lower())
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r} in --only; choose from {', '.join(SYSTEMS)}")
        if s not in systems:
            systems.append(s)
    P = make_params(args.quick)
    if args.torch_threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.torch_threads)
    timeout = args.suite_timeout or (90.0 if args.quick else 240.0)
    info = machine_info()
    t0 = time.monotonic()
    rounds = args.rounds or (1 if args.quick else 2)
    results: dict[str, Any] = {}
    for rnd in range(rounds):
        for s in systems:  # round-robin, so that a burst of outside load hits every system
            if rounds > 1:
                log(f"round {rnd + 1}/{rounds}")
            merge(results, s, run_suite(s, args.quick, timeout))
    total = time.monotonic() - t0

    out = []
    out.append(f"zmqsyft benchmark{' (QUICK smoke mode: tiny sizes, ratios not meaningful)' if P.quick else ''}")
    out.append(f"date     {info['date']}")
    out.append(f"machine  {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
               f"{info['memory_gib']} GiB, Linux {info['kernel']}")
    out.append(f"software python {info['python']}, torch {info['torch']}, pyzmq {info['pyzmq']} "
               f"(libzmq {info['libzmq']}), msgpack {info['msgpack']}, zmqsyft {info['zmqsyft']}")
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    out.append(f"threads  OMP_NUM_THREADS={threads} (torch intra-op threads per process)")
    out.append(f"command  {' '.join([os.path.basename(sys.executable), os.path.relpath(HERE)] + (argv if argv is not None else sys.argv[1:]))}")
    out.append(f"reps     {rounds} round(s) of every suite, each with latency: {P.lat_runs} runs x {P.lat_n} ops (+{P.lat_warmup} warm-up), "
               f"median of run medians; {_fmt_size(P.big_bytes)} transfers: {P.big_reps} (+1 warm-up); "
               f"W7: {P.w7_reps} x {P.w7_ops} ops; start-up: {P.startup_reps}; memory: {P.mem_reps}; "
               f"secure aggregation: {P.secagg_rounds} rounds of each (+{P.secagg_warmup}); "
               f"train step: {P.train_runs} runs x {P.train_steps} steps of each (+{P.train_warmup})")
    out.append(f"total    {total:.0f} s")
    for s in systems:
        r = results[s]
        if not r.get("ok"):
            out.append(f"load     {s} suite: n/a (the suite did not finish)")
        elif "cpu_capacity" in r:
            share = 100 * r["foreign_cpu"] / r["cpu_capacity"]
            steal = 100 * r["steal_cpu"] / r["cpu_capacity"]
            flag = "  <-- machine was NOT idle: figures are disturbed" if share > 5 or steal > 5 else ""
            out.append(f"load     {s} suite ({r['rounds']} x, {r['seconds']:.0f} s): other processes used "
                       f"{r['foreign_cpu']:.1f} CPU-s ({share:.0f}% of the machine), "
                       f"hypervisor steal {steal:.0f}%{flag}")
    out.append("")
    out.append(render_table(P, results, systems))
    out.append("")
    rs = ratios(P, results)
    out.append(render_ratios(rs))
    cs = curve_ratios(P, results) if "zmqsyft" in systems else []
    if cs:
        out.append("")
        out.append(render_ratios(cs, "CURVE / no CURVE (zmqsyft, same run)"))
    bs = beside_ratios(P, results) if "zmqsyft" in systems else []
    if bs:
        out.append("")
        out.append(render_ratios(bs, "zmqsyft alone, same run (no targets)"))
    checks = render_checks(results, systems)
    if checks:
        out.append("")
        out.append(checks)
    notes = [(s, n) for s in systems for n in results[s].get("notes", [])]
    if notes:
        out.append("")
        out.append("notes")
        out += [f"  [{s}] {n}" for s, n in notes]
    print("\n".join(out), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "params": asdict(P), "results": results,
                       "ratios": ratios_json(rs), "curve_ratios": ratios_json(cs),
                       "beside_ratios": ratios_json(bs),
                       "checks": {s: results[s].get("checks", {}) for s in systems}},
                      f, indent=1)
    failed = [s for s in systems if not results[s].get("ok")]
    if failed:
        print(f"\nFAILED suites: {', '.join(failed)}", file=sys.stderr)
        return 2
    if args.strict and any(ok is False for *_, ok in rs + cs):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
